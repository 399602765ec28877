"""Stain normalisation (Macenko, Reinhard) and stain augmentation (HED jitter), for every stage that reads
patch pixels: extraction, fine-tuning, CKA and Grad-CAMs.

Slides from different centres differ in stain colour; a model can learn the centre's colour instead of the
tissue. Normalising every patch to one reference colour before the encoder removes most of that signal, and
jittering stain colour during fine-tuning keeps the encoder from relying on it. Modules by job: ``density``
(optical density, stained pixels), ``macenko`` and ``reinhard`` (each method's fit and batched application),
``source`` (a slide's source stain estimate), ``reference`` (reference pixels), ``normaliser`` (the
:class:`StainNormalizer` and its records), ``target`` (fitting, writing and reading targets from a stage's
options) and ``jitter`` (HED augmentation).
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "HedJitter": ".jitter",
    "SLIDE_REGION": ".reference",
    "SOURCE_PATCHES": ".source",
    "SlideStain": ".source",
    "StainNormalizer": ".normaliser",
    "fit_reference": ".target",
    "load_reference": ".reference",
    "read_stain_target": ".target",
    "recorded_normalizer": ".normaliser",
    "recorded_source": ".source",
    "source_sample": ".source",
    "stain_normalizer": ".target",
    "stain_tag": ".normaliser",
    "write_reference_patches": ".reference",
    "write_stain_target": ".target",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
