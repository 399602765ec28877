"""Tiling: tissue detection, patch grids at a target magnification, patch files and patch reading."""

from .patch_file import PatchSet, PatchSpec, read_patch_file, write_patch_file
from .reader import PatchReader
from .tiling import tile_slide, tile_slides
from .tissue import tissue_mask

__all__ = ["PatchReader", "PatchSet", "PatchSpec", "read_patch_file", "tile_slide", "tile_slides",
           "tissue_mask", "write_patch_file"]
