"""Feature extraction: patch pixels loaded (and decoded on the GPU) in batches, through an encoder of the zoo
(``histotransfer.encoders``), into feature files."""

from .._lazy import lazy_exports

_EXPORTS = {
    "extract_features": ".extract",
    "run_extraction": ".extract",
    "normalise_pixels": ".extract",
    "FeatureBag": ".feature_file",
    "NonFiniteFeatures": ".feature_file",
    "first_non_finite": ".feature_file",
    "FeatureWriter": ".feature_file",
    "encoder_attrs": ".feature_file",
    "read_feature_attrs": ".feature_file",
    "read_feature_file": ".feature_file",
    "PatchBatch": ".batches",
    "PatchBatches": ".loader",
    "SlideJob": ".loader",
    "patch_loader": ".loader",
    "prepare_patch": ".loader",
    "EncoderChoice": ".settings",
    "ExtractSettings": ".settings",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
