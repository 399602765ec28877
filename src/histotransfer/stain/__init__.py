"""Stain normalisation (Macenko, Reinhard) and stain augmentation (HED jitter), for every stage that reads
patch pixels: extraction, fine-tuning, CKA and Grad-CAMs."""

from .._lazy import lazy_exports

_EXPORTS = {
    "HedJitter": ".normalise", "SLIDE_REGION": ".normalise", "SOURCE_PATCHES": ".normalise",
    "SlideStain": ".normalise", "StainNormalizer": ".normalise", "fit_reference": ".normalise",
    "load_reference": ".normalise", "read_stain_target": ".normalise", "recorded_normalizer": ".normalise",
    "recorded_source": ".normalise", "source_sample": ".normalise", "stain_normalizer": ".normalise",
    "stain_tag": ".normalise", "write_reference_patches": ".normalise", "write_stain_target": ".normalise",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
