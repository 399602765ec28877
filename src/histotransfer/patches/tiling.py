"""Tile slides into tissue patches at a target magnification, as the HistoTransfer paper does.

Per slide: tissue mask on a low-resolution level (``tissue.segment_tissue``), a sliding-window grid of patch
footprints over level 0 (from the slide's corner, or centred on the tissue), each patch's tissue fraction from
the mask, and the patches with fraction >= ``min_tissue`` kept. Outputs go to the tiling's own folder
``OUT/<tiling name>/`` (``layout``): ``patches/<slide_id>.h5``, ``masks/<slide_id>.png``,
``thumbnails/<slide_id>.png``, the batch report ``tiling.csv`` and the settings ``tiling.json``. The patch file
also records the colour statistics of the slide's tissue, measured on the thumbnail already read for the
picture (``colour.slide_colour_stats``), which the shortcut check of later runs reads. Every file is
written atomically; the patch file is written last and marks the slide done, so a re-run skips it when its
settings and the slide file itself are unchanged.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal, cast

import cv2
import numpy as np

from .. import __version__
from .._io import output_folder, remove_stale_temps, write_json, write_png
from ..batch import BatchReport, SlideResult, error_result, run_batch
from ..colour import slide_colour_stats
from ..errors import FormatError, HistotransferError, one_line
from ..slide import Slide, identity_differences, list_slides, open_slide, slide_id_of, slide_identity
from .geometry import tiling_spec
from .layout import REPORT_FILE, SETTINGS_FILE, SUBDIRS
from .patch_file import PatchSpec, read_patch_file, write_patch_file
from .settings import TileSettings
from .tissue import TissueSegmentation, segment_tissue

MASK_MPP = 8.0  # um per mask pixel (1.25x), finer when needed to give >= MASK_PIXELS_PER_PATCH per side
MASK_PIXELS_PER_PATCH = 16
THUMBNAIL_SIDE = 1024
MASK_TISSUE, MASK_EXCLUDED = 255, 128  # grey levels of the mask PNG; background is 0
TISSUE_COLOUR, EXCLUDED_COLOUR, PATCH_COLOUR = (0, 160, 0), (220, 30, 30), (30, 60, 220)  # thumbnail RGB
DONE_MESSAGE = "already done with these settings"


def mask_mpp_for(spec: PatchSpec) -> float:
    """Mask resolution: ``MASK_MPP``, or finer so a patch spans at least ``MASK_PIXELS_PER_PATCH`` pixels."""
    mpp = cast(float, spec.mpp)  # tiling_spec's specs are complete
    patch_um = cast(int, spec.patch_size_level0) * mpp
    return max(min(MASK_MPP, patch_um / MASK_PIXELS_PER_PATCH), mpp)


def slide_segmentation(slide: Slide, mask_mpp: float, settings: TileSettings | None = None) -> TissueSegmentation:
    """The tissue (and excluded pen ink) of ``slide`` at ``mask_mpp`` (covering the whole level 0), read from a
    low level, with the segmentation options of ``settings`` (default: the defaults)."""
    s = settings if settings is not None else TileSettings.build()
    w, h = slide.dimensions
    ds = mask_mpp / slide.mpp
    size = (max(1, math.ceil(w / ds)), max(1, math.ceil(h / ds)))
    level = max(
        (i for i, d in enumerate(slide.level_downsamples) if d <= ds * 1.001),
        default=0,
        key=lambda i: slide.level_downsamples[i],
    )
    rgb = slide.read_level(level)
    rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    return segment_tissue(
        rgb,
        mpp=slide.mpp * w / size[0],
        threshold=s.threshold,
        min_region_um2=s.min_region_um2,
        min_hole_um2=s.min_hole_um2,
        exclude_pen=s.exclude_pen,
    )


def slide_mask(slide: Slide, mask_mpp: float, settings: TileSettings | None = None) -> np.ndarray:
    """The boolean tissue mask of :func:`slide_segmentation`."""
    return slide_segmentation(slide, mask_mpp, settings).tissue


def tissue_bbox(mask: np.ndarray, dimensions: tuple[int, int]) -> tuple[float, float, float, float] | None:
    """The level-0 box ``(x0, y0, x1, y1)`` (end exclusive) of the mask pixels that are set; None if none is."""
    if not mask.any():
        return None
    x, y, w, h = cv2.boundingRect(mask.astype(np.uint8))
    sx, sy = dimensions[0] / mask.shape[1], dimensions[1] / mask.shape[0]
    return x * sx, y * sy, (x + w) * sx, (y + h) * sy


def centred_starts(lo: float, hi: float, length: int, footprint: int, step: int) -> np.ndarray:
    """Starts of the fewest windows, ``step`` apart, spanning ``[lo, hi)``, centred on it and shifted, if
    needed, to lie wholly inside ``[0, length)`` (fewer when not that many fit)."""
    fit = (length - footprint) // step + 1
    needed = max(1, math.ceil((hi - lo - footprint) / step) + 1)
    n = min(needed, fit)
    if n <= 0:
        return np.zeros(0, np.int64)
    span = (n - 1) * step + footprint
    start = min(max(round((lo + hi - span) / 2), 0), length - span)
    return start + step * np.arange(n, dtype=np.int64)


def grid_coords(
    dimensions: tuple[int, int], footprint: int, step: int, bbox: tuple[float, float, float, float] | None = None
) -> np.ndarray:
    """Level-0 (x, y) top-left corners of the footprints of a sliding window lying wholly inside the slide.

    Without ``bbox`` the grid starts at the slide's (0, 0), as TRIDENT's does: a strip at the right and bottom
    edges narrower than a step is never covered. With a level-0 ``bbox`` (x0, y0, x1, y1) it is the grid of
    :func:`centred_starts` on each axis: just covering the box and centred on it (one grid for the slide,
    where CLAM starts one at the corner of each tissue region's box).
    """
    if bbox is None:
        xs = np.arange(0, dimensions[0] - footprint + 1, step, dtype=np.int64)
        ys = np.arange(0, dimensions[1] - footprint + 1, step, dtype=np.int64)
    else:
        xs = centred_starts(bbox[0], bbox[2], dimensions[0], footprint, step)
        ys = centred_starts(bbox[1], bbox[3], dimensions[1], footprint, step)
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def tissue_fractions(mask: np.ndarray, dimensions: tuple[int, int], coords: np.ndarray, footprint: int) -> np.ndarray:
    """The fraction of each footprint the mask covers, each mask pixel a uniform square of level 0.

    Evaluated on the mask's summed-area table, bilinearly interpolated at the footprint's fractional
    corners: the integral of a piecewise-constant image is bilinear inside each pixel, so this is exact.
    """
    mh, mw = mask.shape
    table = cv2.integral(mask.astype(np.uint8), sdepth=cv2.CV_64F)
    sx, sy = mw / dimensions[0], mh / dimensions[1]
    x0, y0 = coords[:, 0] * sx, coords[:, 1] * sy
    x1, y1 = (coords[:, 0] + footprint) * sx, (coords[:, 1] + footprint) * sy

    def integral(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        u, v = np.clip(u, 0, mw), np.clip(v, 0, mh)
        i, j = np.minimum(u.astype(np.int64), mw - 1), np.minimum(v.astype(np.int64), mh - 1)
        fu, fv = u - i, v - j
        return (
            table[j, i] * (1 - fu) * (1 - fv)
            + table[j, i + 1] * fu * (1 - fv)
            + table[j + 1, i] * (1 - fu) * fv
            + table[j + 1, i + 1] * fu * fv
        )

    area = integral(x1, y1) - integral(x0, y1) - integral(x1, y0) + integral(x0, y0)
    return (area / ((x1 - x0) * (y1 - y0))).astype(np.float32)


def patch_coords(
    mask: np.ndarray, dimensions: tuple[int, int], spec: PatchSpec, grid: Literal["origin", "tissue"] = "origin"
) -> tuple[np.ndarray, np.ndarray]:
    """The kept patches' level-0 coords and tissue fractions (fraction >= ``spec.min_tissue``) on a grid from
    the slide's corner (``origin``) or centred on the mask's bounding box (``tissue``)."""
    footprint = int(spec.patch_size_level0)  # type: ignore[arg-type]
    step = max(1, round(spec.stride * spec.downsample))  # type: ignore[operator]
    bbox = tissue_bbox(mask, dimensions) if grid == "tissue" else None
    coords = grid_coords(dimensions, footprint, step, bbox)
    fractions = tissue_fractions(mask, dimensions, coords, footprint)
    keep = fractions >= spec.min_tissue - 1e-6  # type: ignore[operator]
    return coords[keep], fractions[keep]


def _draw_outline(img: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> None:
    small = cv2.resize(mask.astype(np.uint8), (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(small, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(img, contours, -1, colour, 2)


def thumbnail_colour_stats(thumbnail: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """``slide_colour_stats`` of the thumbnail's tissue: the mask brought to the thumbnail's size (a pixel is
    tissue when at least half of it is; any tissue at all when that leaves none). None without tissue."""
    if not mask.any():
        return None
    size = (thumbnail.shape[1], thumbnail.shape[0])
    cover = cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    tissue = cover >= 0.5
    if not tissue.any():
        tissue = cover > 0
    return slide_colour_stats(thumbnail, tissue)


def draw_thumbnail(
    slide: Slide,
    mask: np.ndarray,
    coords: np.ndarray,
    footprint: int,
    excluded: np.ndarray | None = None,
    image: np.ndarray | None = None,
) -> np.ndarray:
    """An RGB thumbnail (``image``, else read from the slide) with the tissue contour (green), the excluded
    pen ink's contour (red) and the kept patch grid (blue) drawn on a copy."""
    img = np.array(slide.thumbnail(THUMBNAIL_SIDE) if image is None else image, copy=True, order="C")
    th, tw = img.shape[:2]
    _draw_outline(img, mask, TISSUE_COLOUR)
    if excluded is not None and excluded.any():
        _draw_outline(img, excluded, EXCLUDED_COLOUR)
    sx, sy = tw / slide.dimensions[0], th / slide.dimensions[1]
    for x, y in coords.tolist():
        cv2.rectangle(
            img,
            (round(x * sx), round(y * sy)),
            (round((x + footprint) * sx) - 1, round((y + footprint) * sy) - 1),
            PATCH_COLOUR,
            1,
        )
    return img


def mask_image(segmentation: TissueSegmentation) -> np.ndarray:
    """The mask PNG's pixels: ``MASK_TISSUE`` for tissue, ``MASK_EXCLUDED`` for excluded pen ink, 0 else."""
    img = segmentation.tissue.astype(np.uint8) * MASK_TISSUE
    img[segmentation.excluded] = MASK_EXCLUDED
    return img


def _outputs(folder: Path, slide_id: str) -> tuple[Path, Path, Path]:
    return (
        folder / "patches" / f"{slide_id}.h5",
        folder / "masks" / f"{slide_id}.png",
        folder / "thumbnails" / f"{slide_id}.png",
    )


def _already_tiled(
    folder: Path, slide_id: str, spec: PatchSpec, identity: dict[str, Any], settings: TileSettings
) -> int | None:
    """The patch count of a complete earlier tiling of this very slide file with these settings, else None."""
    patch_path, mask_path, thumb_path = _outputs(folder, slide_id)
    if not (patch_path.exists() and mask_path.exists() and thumb_path.exists()):
        return None
    try:
        done = read_patch_file(patch_path)
    except FormatError:
        return None
    # A patch file without colour statistics (tiled before they were recorded) is redone to gain them: the same
    # patches, so their features are kept. An identity recorded before the sparse sample existed is compared on
    # the keys it holds (re-tiling would change the patches' fingerprint and so redo every slide's features).
    same_slide = done.identity is not None and not identity_differences(done.identity, identity)
    same = (
        done.spec == spec
        and same_slide
        and done.colour_stats is not None
        and _with_defaults(done.tiling_settings) == settings.result_settings()
    )
    return len(done) if same else None


def _with_defaults(recorded: dict[str, Any] | None) -> dict[str, Any] | None:
    """Recorded tiling settings completed with the defaults of options added since they were recorded: those
    defaults tile exactly as before the options existed."""
    if recorded is None:
        return None
    return {**TileSettings.build().result_settings(), **recorded}


def tiling_folder(out_dir: str | os.PathLike[str], settings: TileSettings) -> Path:
    """``out_dir/<tiling name>``: where a tiling with ``settings`` lives."""
    return Path(out_dir) / settings.folder_name


def tile_slide(
    slide_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    settings: TileSettings | None = None,
    **overrides: Any,
) -> SlideResult:
    """Tile one slide into ``out_dir/<tiling name>/``; returns its ``tiling.csv`` row.

    ``settings`` (or keyword overrides such as ``magnification=20, patch_size=512``) say how. Status ``ok``,
    ``skipped`` (the same slide file was already tiled with the same settings) or ``no_tissue``. Bad input
    (missing, unreadable, no mpp, magnification above the slide's, patch larger than the slide) raises
    HistotransferError naming the file.
    """
    s = TileSettings.build(settings, **overrides)
    t0 = time.perf_counter()
    slide_path = Path(slide_path)
    folder = tiling_folder(out_dir, s)
    slide_id = slide_id_of(slide_path)
    patch_path, mask_path, thumb_path = _outputs(folder, slide_id)
    with open_slide(slide_path, mpp=s.mpp) as slide:
        spec = tiling_spec(slide, s.magnification, s.patch_size, s.stride, s.min_tissue)
        identity = slide_identity(slide)
        done = _already_tiled(folder, slide_id, spec, identity, s)
        if done is not None:
            return SlideResult(
                slide_id, str(slide_path), "skipped", done, round(time.perf_counter() - t0, 3), DONE_MESSAGE
            )
        try:
            segmentation = slide_segmentation(slide, mask_mpp_for(spec), s)
            coords, fractions = patch_coords(segmentation.tissue, slide.dimensions, spec, s.grid)
            image = np.ascontiguousarray(slide.thumbnail(THUMBNAIL_SIDE))
            colour = thumbnail_colour_stats(image, segmentation.tissue)
            footprint = int(spec.patch_size_level0)  # type: ignore[arg-type]
            thumbnail = draw_thumbnail(slide, segmentation.tissue, coords, footprint, segmentation.excluded, image)
        except HistotransferError:
            raise
        except Exception as exc:  # a decoder's own error type: say what it means for the user
            raise HistotransferError(
                f"{slide_path}: cannot read the slide's pixels ({one_line(exc)}); the file may be truncated or corrupt."
            ) from exc
    write_png(mask_image(segmentation), mask_path)
    write_png(thumbnail, thumb_path)
    seconds = round(time.perf_counter() - t0, 3)
    if len(coords) == 0:
        patch_path.unlink(missing_ok=True)  # an earlier tiling of another version of this slide no longer holds
        return SlideResult(
            slide_id,
            str(slide_path),
            "no_tissue",
            0,
            seconds,
            f"{slide_path}: no patch has tissue fraction >= {s.min_tissue}; see {thumb_path}",
        )
    write_patch_file(patch_path, coords, fractions, spec, identity, s.folder_name, s.result_settings(), colour)
    return SlideResult(slide_id, str(slide_path), "ok", len(coords), seconds, "")


def _tile_or_report(slide_path: str, out_dir: Path, settings: TileSettings) -> SlideResult:
    """tile_slide with a failure turned into an ``error`` row (its message names the file)."""
    t0 = time.perf_counter()
    try:
        return tile_slide(slide_path, out_dir, settings)
    except Exception as exc:  # one broken slide is reported; the batch goes on
        return error_result(slide_id_of(slide_path), slide_path, exc, t0)


@dataclass
class TilingRun:
    """What a call of :func:`tile_slides` did: the tiling folder, its patch folder and one row per slide."""

    folder: Path
    results: list[SlideResult]

    @property
    def patches(self) -> Path:
        return self.folder / "patches"


def tile_slides(
    slides: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    settings: TileSettings | None = None,
    **overrides: Any,
) -> TilingRun:
    """Tile many slides (files or folders) into ``out_dir/<tiling name>/``; one failing slide is reported, not
    fatal.

    ``settings`` (or keyword overrides) say how (see :class:`TileSettings`). The same file given twice is a
    ``duplicate`` row; two files with one slide id raise before any work. Re-running skips slides tiled with the
    same settings and redoes those whose file changed; temporary files of a killed run are removed first.
    """
    s = TileSettings.build(settings, **overrides)
    entries = list_slides(slides)
    out = output_folder(out_dir)
    folder = tiling_folder(out, s)
    for sub in (folder, *(folder / d for d in SUBDIRS)):
        sub.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(sub)
    write_json({"name": s.folder_name, "settings": s.record(), "histotransfer": __version__}, folder / SETTINGS_FILE)
    report = BatchReport(folder / REPORT_FILE)
    # A repeat under another name gets its own row; one under the same name (the same slide id) is noted on
    # the row of the file it repeats, since report rows are keyed by slide id.
    duplicates = [
        SlideResult(
            e.slide_id, str(e.path), "duplicate", 0, 0.0, f"{e.path}: the same file as {e.duplicate_of}; tiled once"
        )
        for e in entries
        if e.duplicate_of is not None
    ]
    same_id = {
        e.slide_id: e
        for e in entries
        if e.duplicate_of is not None and e.slide_id in {o.slide_id for o in entries if o.duplicate_of is None}
    }
    items = [(e.slide_id, str(e.path)) for e in entries if e.duplicate_of is None]
    if s.workers <= 1:
        results = run_batch(items, lambda _sid, p: _tile_or_report(p, out, s), report, desc="tiling")
    else:
        with ProcessPoolExecutor(max_workers=s.workers, mp_context=get_context("spawn")) as pool:
            futures: dict[str, Future[SlideResult]] = {p: pool.submit(_tile_or_report, p, out, s) for _, p in items}
            results = run_batch(items, lambda _sid, p: futures[p].result(), report, desc="tiling")
    for row in duplicates:
        if row.slide_id in same_id:
            original = next(r for r in results if r.slide_id == row.slide_id)
            original.message = "; ".join(
                m for m in (original.message, f"also given as {same_id[row.slide_id].path}") if m
            )
            report.update(original)
        else:
            report.update(row)
    return TilingRun(folder, results + duplicates)
