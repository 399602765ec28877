"""The ``Slide`` interface every reader backend implements.

A slide is a pyramid of levels; level 0 is the full resolution. All locations are level-0 pixel (x, y), all
sizes are (width, height) at the level read, and every read returns an RGB ``uint8`` array with area outside
the slide painted white (the colour of glass), whatever the backend.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..errors import HistotransferError

# Multi-part extensions removed as a whole when deriving a slide id.
MULTI_SUFFIXES = (".ome.tiff", ".ome.tif")


def slide_id_of(path: str | Path) -> str:
    """The slide id: the file name without its extension (``a.ome.tiff`` -> ``a``, ``b.svs`` -> ``b``)."""
    name = Path(path).name
    for suffix in MULTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def magnification_to_mpp(magnification: float) -> float:
    """Objective power to microns per pixel (the usual convention: 20x = 0.5 um/px, 40x = 0.25 um/px)."""
    return 10.0 / magnification


class Slide(ABC):
    """A whole-slide image opened read-only; use as a context manager or call ``close()``.

    Subclasses set the geometry attributes in ``__init__`` and implement ``_read`` and ``close``.
    ``mpp`` is the level-0 microns per pixel (the ``mpp`` given to ``open_slide`` overrides the slide's);
    ``native_mpp`` is the slide's own (None when its metadata has none); ``magnification`` is the objective
    power read from the slide, or ``10 / mpp`` when it has none.
    """

    backend: str = ""
    vendor: str | None = None

    def __init__(self, path: Path, native_mpp: float | None, native_magnification: float | None, mpp: float | None):
        self.path = Path(path)
        self.slide_id = slide_id_of(path)
        self._mpp_override = mpp
        self.native_mpp = (
            native_mpp if native_mpp is not None and math.isfinite(native_mpp) and native_mpp > 0 else None
        )
        if mpp is not None:
            if not (math.isfinite(mpp) and mpp > 0):
                raise HistotransferError(
                    f"{self.path}: --mpp must be a positive number of microns per pixel, got {mpp}."
                )
            self.mpp = float(mpp)
        elif self.native_mpp is not None:
            self.mpp = float(self.native_mpp)
        else:
            raise HistotransferError(
                f"{self.path}: the slide carries no microns-per-pixel (mpp) in its metadata; pass --mpp "
                "(e.g. --mpp 0.25 for a 40x scan, --mpp 0.5 for 20x)."
            )
        if mpp is None and native_magnification is not None and native_magnification > 0:
            self.magnification: float | None = float(native_magnification)
        else:
            self.magnification = 10.0 / self.mpp

    # Geometry, set by subclasses.
    dimensions: tuple[int, int]
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @abstractmethod
    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Backend read: (h, w, 3) uint8 RGB, area outside the slide white."""

    @abstractmethod
    def close(self) -> None:
        """Release the backend's file handles."""

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read ``size`` (w, h) pixels of ``level`` whose top-left corner is level-0 ``location`` (x, y)."""
        if not 0 <= level < self.level_count:
            raise ValueError(f"{self.path}: level {level} out of range (the slide has {self.level_count})")
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise ValueError(f"region size must be positive, got {size}")
        return self._read((int(location[0]), int(location[1])), level, (w, h))

    def best_level_for_side(self, max_side: int) -> int:
        """The lowest-resolution level whose longest side is still at least ``max_side`` (else level 0)."""
        best = 0
        for i, (w, h) in enumerate(self.level_dimensions):
            if max(w, h) >= max_side:
                best = i
        return best

    def read_level(self, level: int) -> np.ndarray:
        """The whole of one level as an RGB array (meant for the small, low-resolution levels)."""
        return self.read_region((0, 0), level, self.level_dimensions[level])

    def thumbnail(self, max_side: int) -> np.ndarray:
        """An RGB image of the whole slide whose longest side is ``max_side`` (never upscaled)."""
        level = self.best_level_for_side(max_side)
        img = self.read_level(level)
        scale = max_side / max(img.shape[:2])
        if scale >= 1:
            return img
        size = (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale)))
        return cv2.resize(img, size, interpolation=cv2.INTER_AREA)

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled by path: a worker process reopens the file with the same backend instead of sharing a
        # native handle (every backend takes (path, mpp)).
        return (type(self), (self.path, self._mpp_override))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.path)!r}, backend={self.backend!r}, "
            f"dimensions={self.dimensions}, levels={self.level_count}, mpp={self.mpp:.4g})"
        )


def paste_clipped(size: tuple[int, int], origin: tuple[int, int], bounds: tuple[int, int], read: Any) -> np.ndarray:
    """A white (h, w, 3) canvas holding the in-bounds part of a level region.

    ``origin`` is the region's top-left in level pixels, ``bounds`` the level's (w, h), and
    ``read(x, y, w, h)`` returns the in-bounds pixels of that level rectangle.
    """
    w, h = size
    ox, oy = origin
    out = np.full((h, w, 3), 255, np.uint8)
    x0, y0 = max(ox, 0), max(oy, 0)
    x1, y1 = min(ox + w, bounds[0]), min(oy + h, bounds[1])
    if x1 > x0 and y1 > y0:
        out[y0 - oy : y1 - oy, x0 - ox : x1 - ox] = read(x0, y0, x1 - x0, y1 - y0)
    return out


def to_rgb(arr: np.ndarray) -> np.ndarray:
    """An (h, w, 3) uint8 RGB view of a gray, RGB or RGBA array (alpha composited onto white)."""
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.integer) and arr.max(initial=0) > 255:
            arr = (arr.astype(np.float32) / (np.iinfo(arr.dtype).max / 255.0)).round()
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2)
    if arr.shape[2] == 4:
        alpha = arr[..., 3:4].astype(np.uint16)
        if alpha.min() == 255:
            return np.ascontiguousarray(arr[..., :3])
        rgb = arr[..., :3].astype(np.uint16)
        return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    return np.ascontiguousarray(arr[..., :3])
