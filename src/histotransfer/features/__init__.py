"""Patch encoders (ImageNet and histopathology, optionally truncated) and feature extraction."""

from .._lazy import lazy_exports

_EXPORTS = {
    "Encoder": ".encoders", "create_encoder": ".encoders", "encoder_id": ".encoders",
    "extract_features": ".extract", "run_extraction": ".extract",
    "FeatureBag": ".feature_file", "FeatureWriter": ".feature_file", "read_feature_attrs": ".feature_file",
    "read_feature_file": ".feature_file",
    "encoder_info": ".registry", "list_encoders": ".registry", "register": ".registry",
    "load_state_dict_file": ".weights",
    "EncoderChoice": ".settings", "ExtractSettings": ".settings",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
