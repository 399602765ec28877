"""Tiling: tissue detection, patch grids at a target magnification, patch files and patch reading."""

from .._lazy import lazy_exports

_EXPORTS = {
    "TilingFolder": ".layout",
    "find_tiling": ".layout",
    "REPORT_FILE": ".layout",
    "SETTINGS_FILE": ".layout",
    "PatchSet": ".patch_file",
    "PatchSpec": ".patch_file",
    "read_colour_stats": ".patch_file",
    "read_patch_file": ".patch_file",
    "write_patch_file": ".patch_file",
    "PatchReader": ".reader",
    "TileSettings": ".settings",
    "TilingRun": ".tiling",
    "tile_slide": ".tiling",
    "tile_slides": ".tiling",
    "tissue_mask": ".tissue",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
