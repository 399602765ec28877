"""The encoder zoo: every patch encoder behind one name (ImageNet, histopathology and foundation models), built
with its named weights and optionally truncated.

``registry`` holds the entries and imports no catalogue; the catalogues ``cnn`` and ``vit`` register into it;
``build`` (``create_encoder``) and ``weights`` stand on the registry; ``zoo`` imports the catalogues and is where
every lookup exported here comes from, so they always see every encoder.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "Encoder": ".build",
    "describe_encoder": ".build",
    "RANDOM_INIT_SEED": ".build",
    "create_encoder": ".zoo",
    "create_encoders": ".zoo",
    "encoder_id": ".zoo",
    "encoder_info": ".zoo",
    "encoder_spec": ".zoo",
    "list_encoders": ".zoo",
    "resolve_weights": ".zoo",
    "weights_top1": ".zoo",
    "BlockCuts": ".registry",
    "Checkpoint": ".registry",
    "EncoderSpec": ".registry",
    "HubFile": ".registry",
    "Preprocessing": ".registry",
    "Stage": ".registry",
    "WeightsOption": ".registry",
    "register": ".registry",
    "is_file_label": ".weights",
    "load_state_dict_file": ".weights",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
