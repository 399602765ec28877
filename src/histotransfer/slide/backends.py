"""Reader backends: OpenSlide, tiffslide, and plain images (PNG/JPEG/TIFF) read whole into memory."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from ..errors import HistotransferError
from .base import Slide, paste_clipped, to_rgb


def _float(value: object) -> float | None:
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) and out > 0 else None


def _size(dims: Sequence[float]) -> tuple[int, int]:
    """A backend's (width, height) as a pair of ints."""
    w, h = dims
    return int(w), int(h)


class OpenSlideSlide(Slide):
    """A slide read through OpenSlide (SVS, NDPI, MRXS, SCN, BIF, Philips and generic tiled TIFF, ...)."""

    backend = "openslide"

    def __init__(self, path: Path, mpp: float | None = None):
        import openslide

        self._osr = openslide.OpenSlide(str(path))
        props = self._osr.properties
        self.vendor = props.get(openslide.PROPERTY_NAME_VENDOR)
        self.dimensions = _size(self._osr.dimensions)
        self.level_dimensions = [_size(d) for d in self._osr.level_dimensions]
        self.level_downsamples = [float(d) for d in self._osr.level_downsamples]
        try:
            super().__init__(
                path,
                _float(props.get(openslide.PROPERTY_NAME_MPP_X)),
                _float(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)),
                mpp,
            )
        except HistotransferError:
            self.close()
            raise

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        # OpenSlide paints area outside the slide transparent; to_rgb composites it onto white.
        return to_rgb(np.asarray(self._osr.read_region(location, level, size)))

    def close(self) -> None:
        self._osr.close()


class TiffSlideSlide(Slide):
    """A slide read through tiffslide (the TIFF-family formats tifffile understands)."""

    backend = "tiffslide"

    def __init__(self, path: Path, mpp: float | None = None):
        import tiffslide

        self._ts = tiffslide.TiffSlide(str(path))
        try:
            self._check_complete(path)
        except HistotransferError:
            self._ts.close()
            raise
        props = self._ts.properties
        self.vendor = props.get("tiffslide.vendor")
        self.dimensions = _size(self._ts.dimensions)
        self.level_dimensions = [_size(d) for d in self._ts.level_dimensions]
        self.level_downsamples = [float(d) for d in self._ts.level_downsamples]
        try:
            super().__init__(
                path, _float(props.get("tiffslide.mpp-x")), _float(props.get("tiffslide.objective-power")), mpp
            )
        except HistotransferError:
            self.close()
            raise

    def _check_complete(self, path: Path) -> None:
        """Refuse a truncated file: tifffile fills missing tiles silently, which would read as blank glass."""
        size = path.stat().st_size
        for i, lvl in enumerate(self._ts.ts_tifffile.series[0].levels):
            page = lvl.keyframe
            offsets, counts = page.dataoffsets, page.databytecounts
            if not offsets or any(o + c > size for o, c in zip(offsets, counts, strict=False)):
                raise HistotransferError(
                    f"{path}: truncated or corrupt: the image data of level {i} is missing "
                    f"or lies beyond the end of the file ({size} bytes); copy it again."
                )

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        ds = self.level_downsamples[level]
        # tiffslide maps level-0 to level pixels with int(x / ds); its own padding is black, so clip here.
        ox, oy = (int(v / ds) if v >= 0 else math.floor(v / ds) for v in location)
        origin = (ox, oy)

        def read(x: int, y: int, w: int, h: int) -> np.ndarray:
            # (x, y) is the clipped origin: the request's own, or 0 where the request starts before the edge.
            loc = (location[0] if origin[0] >= 0 else 0, location[1] if origin[1] >= 0 else 0)
            return to_rgb(self._ts.read_region(loc, level, (w, h), as_array=True, padding=False))

        return paste_clipped(size, origin, self.level_dimensions[level], read)

    def close(self) -> None:
        self._ts.close()


class ImageSlide(Slide):
    """A plain PNG/JPEG/TIFF image held in memory as a one-level slide; it needs ``mpp`` from the user."""

    backend = "image"

    def __init__(self, path: Path, mpp: float | None = None):
        if mpp is None:
            raise HistotransferError(
                f"{path}: a plain image carries no microns-per-pixel; pass --mpp "
                "(e.g. --mpp 0.25 for a 40x scan, --mpp 0.5 for 20x)."
            )
        self._img = self._load(path)
        h, w = self._img.shape[:2]
        self.dimensions = (w, h)
        self.level_dimensions = [(w, h)]
        self.level_downsamples = [1.0]
        super().__init__(path, None, None, mpp)

    @staticmethod
    def _load(path: Path) -> np.ndarray:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            try:
                arr = tifffile.imread(str(path))
            except Exception as exc:
                raise HistotransferError(f"{path}: not a readable TIFF image ({exc}).") from exc
            if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] not in (3, 4):
                arr = np.moveaxis(arr, 0, -1)
            if arr.ndim not in (2, 3):
                raise HistotransferError(f"{path}: TIFF image of shape {arr.shape} is not a 2-D RGB image.")
            return to_rgb(arr)
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise HistotransferError(f"{path}: not a readable PNG/JPEG image; check the file.")
        if img.ndim == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGBA if img.shape[2] == 4 else cv2.COLOR_BGR2RGB)
        return to_rgb(img)

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        return paste_clipped(size, location, self.dimensions, lambda x, y, w, h: self._img[y : y + h, x : x + w])

    def close(self) -> None:
        self._img = np.empty((0, 0, 3), np.uint8)
