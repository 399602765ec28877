"""Patch encoders (ImageNet, histopathology and foundation models, optionally truncated) and feature extraction."""

from .._lazy import lazy_exports

_EXPORTS = {
    "Encoder": ".encoders", "create_encoder": ".encoders", "describe_encoder": ".encoders",
    "encoder_id": ".encoders",
    "extract_features": ".extract", "run_extraction": ".extract", "normalise_pixels": ".extract",
    "FeatureBag": ".feature_file", "NonFiniteFeatures": ".feature_file", "first_non_finite": ".feature_file",
    "FeatureWriter": ".feature_file", "encoder_attrs": ".feature_file",
    "read_feature_attrs": ".feature_file", "read_feature_file": ".feature_file",
    "PatchBatch": ".loader", "PatchBatches": ".loader", "SlideJob": ".loader", "patch_loader": ".loader",
    "prepare_patch": ".loader", "Preprocessing": ".registry",
    "encoder_info": ".registry", "encoder_spec": ".registry", "list_encoders": ".registry",
    "register": ".registry",
    "load_state_dict_file": ".weights", "resolve_weights": ".weights",
    "HED_FROM_RGB": "..colour", "RGB_FROM_HED": "..colour", "optical_density": "..colour", "StainNormalizer": ".stain",
    "HedJitter": ".stain", "fit_reference": ".stain", "recorded_normalizer": ".stain",
    "read_stain_target": ".stain", "recorded_source": ".stain", "SlideStain": ".stain", "source_sample": ".stain",
    "SLIDE_REGION": ".stain", "stain_normalizer": ".stain", "stain_tag": ".stain", "write_stain_target": ".stain",
    "write_reference_patches": ".stain",
    "is_file_label": ".weights",
    "EncoderChoice": ".settings", "ExtractSettings": ".settings",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
