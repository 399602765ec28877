"""``histotransfer info PATH``: say what a file or folder of the pipeline is and what it holds, without opening
HDF5 files by hand.

:func:`describe` tells the kind of ``PATH`` (a slide, a patch, feature or attention file, a tiling or patches
folder, a feature folder, a MIL or fine-tuned run folder, a study folder) and returns what it holds as plain JSON
values; :func:`render` prints that as aligned text. It reads attrs, shapes and the small JSON/CSV records, never
whole arrays, except the one feature file it is given (checked for NaN/inf rows) and the coordinates of patch
files (to tell whether features are stale). Nothing here imports torch.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "describe": ".paths",
    "failed_checks": ".paths",
    "render": ".text",
    "Keyed": ".records",
    "describe_slide": ".files",
    "describe_patch_file": ".files",
    "describe_feature_file": ".files",
    "describe_attention_file": ".files",
    "describe_tiling": ".folders",
    "describe_feature_folder": ".folders",
    "describe_run": ".runs",
    "describe_study": ".runs",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
