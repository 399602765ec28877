"""Direct tile decoding for tiled TIFF and Aperio SVS: the fast path of patch reading.

OpenSlide's ``read_region`` composites every read through cairo into premultiplied ARGB and then converts it
back to RGB; for plain tiled pyramids (Aperio SVS, generic tiled TIFF) the same pixels are obtained by reading
each tile's compressed bytes at ``TiffPage.dataoffsets`` and decoding them with imagecodecs' libjpeg-turbo
(with the page's shared JPEG tables; other codecs through tifffile's ``page.decode``). Decoded tiles are kept
in an LRU cache because neighbouring patches of a grid share tiles; JPEG tiles are decoded into the buffers
of evicted ones, since touching freshly allocated memory costs as much as decoding.

Only formats whose pixels are exactly the stored tiles take this path; others (NDPI, MRXS, Ventana overlaps,
Leica multi-image, JPEG 2000 SVS, ...) stay with the slide's backend.

For decoders that take one complete JPEG stream per image (nvJPEG and libjpeg-turbo through
``torchvision.io.decode_jpeg``), :meth:`TiledTiff.jpeg_stream` gives each JPEG tile with its page's tables
spliced in and, for RGB-coded tiles, the marker that says so (``features.gpu_decode`` decodes them on the GPU).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import imagecodecs
import numpy as np
import tifffile

# TIFF compressions decoded bit-exactly by imagecodecs as by OpenSlide: none, LZW, JPEG, deflate, zstd.
FAST_COMPRESSIONS = {1, 5, 7, 8, 32946, 50000}
# Vendors (as each backend names them) whose levels are plain tiled pages.
FAST_VENDORS: dict[str, set[str | None]] = {"openslide": {"aperio", "generic-tiff"}, "tiffslide": {"aperio", None}}
PHOTOMETRIC_RGB, PHOTOMETRIC_YCBCR, COMPRESSION_JPEG = 2, 6, 7
JPEG_SOI, JPEG_EOI = b"\xff\xd8", b"\xff\xd9"
# An Adobe APP14 segment with transform 0 (length 14, "Adobe", version 100, flags 0, 0, transform 0): libjpeg
# and other decoders then take 3 components as RGB instead of guessing YCbCr from a stream without markers.
ADOBE_RGB_MARKER = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


@dataclass
class _Level:
    offsets: tuple[int, ...]
    counts: tuple[int, ...]
    tile_w: int
    tile_h: int
    tiles_across: int
    width: int
    height: int
    decode: Any
    jpegtables: bytes | None
    jpeg_colorspace: str | None  # set for JPEG tiles decoded straight into recycled buffers, else None


def _jpeg_colorspace(page: Any) -> str | None:
    """The colour space of a page's 3-sample JPEG tiles ("YCBCR" or "RGB"), else None.

    Aperio SVS stores RGB JPEG without a JFIF marker, which libjpeg would take for YCbCr (as tifffile does).
    """
    if page.compression != COMPRESSION_JPEG or page.samplesperpixel != 3 or page.extrasamples:
        return None
    if page.photometric == PHOTOMETRIC_RGB and not page.is_jfif:
        return "RGB"
    return "YCBCR"


def _usable(page: Any) -> TypeGuard[tifffile.TiffPage]:
    """Whether a page's tiles can be read directly (never a TiffFrame: it lacks these tags)."""
    try:
        return bool(
            page.is_tiled
            and page.imagedepth == 1
            and page.planarconfig == 1
            and page.bitspersample == 8
            and page.samplesperpixel in (3, 4)
            and page.compression in FAST_COMPRESSIONS
            and (
                page.photometric == PHOTOMETRIC_RGB
                or (page.photometric == PHOTOMETRIC_YCBCR and page.compression == COMPRESSION_JPEG)
            )
        )
    except AttributeError:
        return False


class TiledTiff:
    """Reads regions of a tiled TIFF's pyramid levels by decoding its tiles directly."""

    def __init__(
        self, path: str | os.PathLike[str], level_dimensions: list[tuple[int, int]], cache_bytes: int = 128 << 20
    ):
        self.path = Path(path)
        self._tf = tifffile.TiffFile(self.path)
        self._fd = os.open(self.path, os.O_RDONLY)
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._cached = 0
        self._spare: list[np.ndarray] = []
        pages: list[tifffile.TiffPage | tifffile.TiffFrame] = []
        if self._tf.series:
            pages += [lvl.keyframe for lvl in self._tf.series[0].levels]
        pages += list(self._tf.pages)
        self.levels: dict[int, _Level] = {}
        for i, (w, h) in enumerate(level_dimensions):
            for page in pages:
                if _usable(page) and (page.imagewidth, page.imagelength) == (w, h):
                    self.levels[i] = _Level(
                        tuple(page.dataoffsets),
                        tuple(page.databytecounts),
                        page.tilewidth,
                        page.tilelength,
                        -(-w // page.tilewidth),
                        w,
                        h,
                        page.decode,
                        page.jpegtables,
                        _jpeg_colorspace(page),
                    )
                    break

    def can_read(self, level: int) -> bool:
        return level in self.levels

    def jpeg_colorspace(self, level: int) -> str | None:
        """ "RGB" or "YCBCR" for a level of 3-sample JPEG tiles, else None (other codecs, extra samples)."""
        return self.levels[level].jpeg_colorspace

    def covered(self, level: int, x: int, y: int, w: int, h: int) -> tuple[range, range]:
        """The tile rows and columns holding the pixels of region (x, y, w, h) that lie inside the level."""
        lv = self.levels[level]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, lv.width), min(y + h, lv.height)
        if x1 <= x0 or y1 <= y0:
            return range(0), range(0)
        return (range(y0 // lv.tile_h, (y1 - 1) // lv.tile_h + 1), range(x0 // lv.tile_w, (x1 - 1) // lv.tile_w + 1))

    def jpeg_stream(self, level: int, index: int) -> bytes | None:
        """Tile ``index`` of a JPEG level as one complete JPEG stream; None for a sparse (never scanned) tile.

        A TIFF page stores the tables its tiles share once (the JPEGTables tag), each tile as an abbreviated
        stream without them; here they are spliced in after the tile's start marker. RGB-coded tiles (Aperio's,
        without a JFIF marker) get an Adobe APP14 marker with transform 0 first, so that the decoder does not
        convert them from YCbCr.
        """
        lv = self.levels[level]
        if lv.jpeg_colorspace is None:
            raise ValueError(f"{self.path}: level {level} is not JPEG-compressed")
        count = lv.counts[index]
        if count == 0:
            return None
        data = os.pread(self._fd, count, lv.offsets[index])
        if not data.startswith(JPEG_SOI):
            raise ValueError(f"{self.path}: tile {index} of level {level} is not a JPEG stream")
        tables = lv.jpegtables or b""
        tables = tables.removeprefix(JPEG_SOI).removesuffix(JPEG_EOI)
        marker = ADOBE_RGB_MARKER if lv.jpeg_colorspace == "RGB" else b""
        return JPEG_SOI + marker + tables + data[len(JPEG_SOI) :]

    def fit_cache(self, level: int, region_side: int, cap: int = 128 << 20) -> None:
        """Size the tile cache for reading ``region_side`` px squares of ``level`` in grid (row) order.

        One band of tile rows as tall as a region plus one, across the level, holds every tile a later
        region of the grid shares; a larger cache only costs fresh memory.
        """
        lv = self.levels[level]
        rows = -(-region_side // lv.tile_h) + 1
        self._cache_bytes = min(cap, rows * lv.tiles_across * lv.tile_w * lv.tile_h * 3)

    def _tile(self, level: int, index: int) -> np.ndarray | None:
        key = (level, index)
        tile = self._cache.get(key)
        if tile is not None:
            self._cache.move_to_end(key)
            return tile
        lv = self.levels[level]
        count = lv.counts[index]
        if count == 0:  # a sparse (never scanned) tile: background
            return None
        data = os.pread(self._fd, count, lv.offsets[index])
        if lv.jpeg_colorspace is not None:
            shape = (lv.tile_h, lv.tile_w, 3)
            spare = self._spare.pop() if self._spare and self._spare[-1].shape == shape else None
            try:
                tile = imagecodecs.jpeg8_decode(
                    data, tables=lv.jpegtables, colorspace=lv.jpeg_colorspace, outcolorspace="RGB", out=spare
                )
            except ValueError:  # a tile stored smaller than the tile size does not fit the buffer
                tile = imagecodecs.jpeg8_decode(
                    data, tables=lv.jpegtables, colorspace=lv.jpeg_colorspace, outcolorspace="RGB"
                )
        else:
            segment = lv.decode(data, index, jpegtables=lv.jpegtables)[0]
            tile = segment.reshape(segment.shape[-3:])[..., :3]
        self._cache[key] = tile
        self._cached += tile.nbytes
        while self._cached > self._cache_bytes and len(self._cache) > 1:
            old = self._cache.popitem(last=False)[1]
            self._cached -= old.nbytes
            if old.flags.c_contiguous and len(self._spare) < 8:
                self._spare.append(old)
        return tile

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """(h, w, 3) RGB pixels of ``level`` whose top-left is level pixel (x, y); outside the level white."""
        lv = self.levels[level]
        out = np.full((h, w, 3), 255, np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, lv.width), min(y + h, lv.height)
        rows, cols = self.covered(level, x, y, w, h)
        for ty in rows:
            for tx in cols:
                tile = self._tile(level, ty * lv.tiles_across + tx)
                if tile is None:
                    continue
                gx, gy = tx * lv.tile_w, ty * lv.tile_h
                ax0, ay0 = max(x0, gx), max(y0, gy)
                ax1 = min(x1, gx + lv.tile_w, gx + tile.shape[1])
                ay1 = min(y1, gy + lv.tile_h, gy + tile.shape[0])
                out[ay0 - y : ay1 - y, ax0 - x : ax1 - x] = tile[ay0 - gy : ay1 - gy, ax0 - gx : ax1 - gx]
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._tf.close()
        self._cache.clear()
        self._spare.clear()
        self._cached = 0


def open_tiled_tiff(
    path: Path, backend: str, vendor: str | None, level_dimensions: list[tuple[int, int]]
) -> TiledTiff | None:
    """A direct tile reader for a slide whose format allows one, else None (read through the backend)."""
    if backend not in FAST_VENDORS or vendor not in FAST_VENDORS[backend]:
        return None
    try:
        tiled = TiledTiff(path, level_dimensions)
    except Exception:  # not parseable by tifffile: the backend still reads it
        return None
    if not tiled.levels:
        tiled.close()
        return None
    return tiled
