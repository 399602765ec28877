"""The encoder zoo: every patch encoder behind one name (ImageNet, histopathology and foundation models), built
with its named weights and optionally truncated."""

from .._lazy import lazy_exports

_EXPORTS = {
    "Encoder": ".build", "create_encoder": ".build", "create_encoders": ".build", "describe_encoder": ".build",
    "encoder_id": ".build", "RANDOM_INIT_SEED": ".build",
    "Checkpoint": ".registry", "EncoderSpec": ".registry", "HubFile": ".registry", "Preprocessing": ".registry",
    "Stage": ".registry", "WeightsOption": ".registry", "register": ".registry",
    "encoder_info": ".registry", "encoder_spec": ".registry", "list_encoders": ".registry",
    "weights_top1": ".registry",
    "is_file_label": ".weights", "load_state_dict_file": ".weights", "resolve_weights": ".weights",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
