"""``PatchReader``: the pixels of a slide's patches, the hot path of feature extraction."""

from __future__ import annotations

import os
from typing import Any

import cv2
import numpy as np

from ..slide import Slide, TiledTiff, open_slide, open_tiled_tiff
from .geometry import resolve_spec
from .patch_file import PatchSpec

_UNSET: Any = object()


class PatchReader:
    """Reads (patch_size, patch_size, 3) uint8 RGB patches by their level-0 top-left (x, y).

    The footprint ``patch_size_level0`` is read from ``patch_level`` and resized (``cv2.INTER_AREA``) to
    ``patch_size``; when the level already has the target resolution it is read natively, unresized.
    Tiled TIFF and Aperio SVS levels are decoded tile by tile directly (``slide.tiff_tiles``), giving the
    pixels OpenSlide gives for level-pixel-aligned reads (OpenSlide resamples a level at sub-pixel offsets
    when a level-0 x/y is not a multiple of the level's downsample; here it is rounded to the nearest level
    pixel); other formats go through the slide's backend.

    A reader pickles by slide path and reopens the slide lazily in each process, so it can be handed to
    DataLoader workers (fork or spawn).
    """

    def __init__(self, slide: Slide, spec: PatchSpec):
        self.spec = resolve_spec(spec, slide)
        self.slide_path = slide.path
        self._mpp = slide.mpp
        self._level = int(self.spec.patch_level)  # type: ignore[arg-type]
        self._level_ds = slide.level_downsamples[self._level]
        self._read_size = max(1, round(self.spec.patch_size_level0 / self._level_ds))
        self._slide: Slide | None = slide
        self._owns_slide = False
        self._tiles: TiledTiff | None = _UNSET
        self._pid = os.getpid()

    @property
    def native(self) -> bool:
        """True when patches are read at their own resolution, without resizing."""
        return self._read_size == self.spec.patch_size

    def _open(self) -> tuple[Slide, TiledTiff | None]:
        if self._slide is None or self._pid != os.getpid():
            # A fresh process (DataLoader worker): never share a parent's native file handles.
            self._slide = open_slide(self.slide_path, mpp=self._mpp)
            self._owns_slide = True
            self._tiles = _UNSET
            self._pid = os.getpid()
        if self._tiles is _UNSET:
            s = self._slide
            self._tiles = open_tiled_tiff(s.path, s.backend, s.vendor, s.level_dimensions)
            if self._tiles is not None and self._tiles.can_read(self._level):
                self._tiles.fit_cache(self._level, self._read_size)
        return self._slide, self._tiles

    @property
    def direct(self) -> bool:
        """True when this reader decodes the slide's tiles directly (the fast path)."""
        tiles = self._open()[1]
        return tiles is not None and tiles.can_read(self._level)

    def read(self, x: int, y: int) -> np.ndarray:
        """The patch whose footprint's top-left corner is level-0 (x, y)."""
        slide, tiles = self._open()
        n = self._read_size
        if tiles is not None and tiles.can_read(self._level):
            region = tiles.read(self._level, round(x / self._level_ds), round(y / self._level_ds), n, n)
        else:
            region = slide.read_region((int(x), int(y)), self._level, (n, n))
        ps = self.spec.patch_size
        if n != ps:
            region = cv2.resize(region, (ps, ps), interpolation=cv2.INTER_AREA)
        return region

    def close(self) -> None:
        if isinstance(self._tiles, TiledTiff):
            self._tiles.close()
        self._tiles = _UNSET
        if self._owns_slide and self._slide is not None:
            self._slide.close()
        self._slide = None

    def __enter__(self) -> PatchReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_slide=None, _owns_slide=False, _tiles=_UNSET, _pid=-1)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._tiles = _UNSET
