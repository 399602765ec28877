"""Tile slides into tissue patches at a target magnification, as the HistoTransfer paper does.

Per slide: tissue mask on a low-resolution level (``tissue.tissue_mask``), a sliding-window grid of patch
footprints over level 0, each patch's tissue fraction from the mask, and the patches with fraction
>= ``min_tissue`` kept. Outputs under ``out_dir``: ``patches/<slide_id>.h5``, ``masks/<slide_id>.png``,
``thumbnails/<slide_id>.png`` and the batch report ``tiling.csv``. Every file is written atomically; the
patch file is written last and marks the slide done, so a re-run skips it when its settings match.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np

from .._io import atomic_path, remove_stale_temps
from ..batch import BatchReport, SlideResult, one_line, run_batch
from ..errors import FormatError, HistotransferError
from ..slide import SLIDE_SUFFIXES, Slide, open_slide, slide_id_of
from .geometry import tiling_spec
from .patch_file import PatchSpec, read_patch_file, write_patch_file
from .tissue import tissue_mask

MASK_MPP = 8.0  # um per mask pixel (1.25x), finer when needed to give >= MASK_PIXELS_PER_PATCH per side
MASK_PIXELS_PER_PATCH = 16
THUMBNAIL_SIDE = 1024
SUBDIRS = ("patches", "masks", "thumbnails")


def mask_mpp_for(spec: PatchSpec) -> float:
    """Mask resolution: ``MASK_MPP``, or finer so a patch spans at least ``MASK_PIXELS_PER_PATCH`` pixels."""
    patch_um = spec.patch_size_level0 * spec.mpp  # type: ignore[operator]
    return max(min(MASK_MPP, patch_um / MASK_PIXELS_PER_PATCH), spec.mpp)  # type: ignore[type-var]


def slide_mask(slide: Slide, mask_mpp: float) -> np.ndarray:
    """The tissue mask of ``slide`` at ``mask_mpp`` (covering the whole level 0), read from a low level."""
    w, h = slide.dimensions
    ds = mask_mpp / slide.mpp
    size = (max(1, math.ceil(w / ds)), max(1, math.ceil(h / ds)))
    level = max((i for i, d in enumerate(slide.level_downsamples) if d <= ds * 1.001), default=0,
                key=lambda i: slide.level_downsamples[i])
    rgb = slide.read_level(level)
    rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    return tissue_mask(rgb, mpp=slide.mpp * w / size[0])


def grid_coords(dimensions: tuple[int, int], footprint: int, step: int) -> np.ndarray:
    """Level-0 (x, y) top-left corners of the footprints of a sliding window lying wholly inside the slide."""
    xs = np.arange(0, dimensions[0] - footprint + 1, step, dtype=np.int64)
    ys = np.arange(0, dimensions[1] - footprint + 1, step, dtype=np.int64)
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def tissue_fractions(mask: np.ndarray, dimensions: tuple[int, int], coords: np.ndarray,
                     footprint: int) -> np.ndarray:
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
        return (table[j, i] * (1 - fu) * (1 - fv) + table[j, i + 1] * fu * (1 - fv)
                + table[j + 1, i] * (1 - fu) * fv + table[j + 1, i + 1] * fu * fv)

    area = integral(x1, y1) - integral(x0, y1) - integral(x1, y0) + integral(x0, y0)
    return (area / ((x1 - x0) * (y1 - y0))).astype(np.float32)


def patch_coords(mask: np.ndarray, dimensions: tuple[int, int], spec: PatchSpec) -> tuple[np.ndarray, np.ndarray]:
    """The kept patches' level-0 coords and tissue fractions (fraction >= ``spec.min_tissue``)."""
    footprint = int(spec.patch_size_level0)  # type: ignore[arg-type]
    step = max(1, int(round(spec.stride * spec.downsample)))  # type: ignore[operator]
    coords = grid_coords(dimensions, footprint, step)
    fractions = tissue_fractions(mask, dimensions, coords, footprint)
    keep = fractions >= spec.min_tissue - 1e-6  # type: ignore[operator]
    return coords[keep], fractions[keep]


def draw_thumbnail(slide: Slide, mask: np.ndarray, coords: np.ndarray, footprint: int) -> np.ndarray:
    """An RGB thumbnail with the tissue contour (green) and the kept patch grid (blue) drawn on it."""
    img = np.ascontiguousarray(slide.thumbnail(THUMBNAIL_SIDE))
    th, tw = img.shape[:2]
    small = cv2.resize(mask.astype(np.uint8), (tw, th), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(small, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(img, contours, -1, (0, 160, 0), 2)
    sx, sy = tw / slide.dimensions[0], th / slide.dimensions[1]
    for x, y in coords.tolist():
        cv2.rectangle(img, (round(x * sx), round(y * sy)),
                      (round((x + footprint) * sx) - 1, round((y + footprint) * sy) - 1), (30, 60, 220), 1)
    return img


def _write_png(rgb_or_gray: np.ndarray, path: Path) -> None:
    img = rgb_or_gray if rgb_or_gray.ndim == 2 else cv2.cvtColor(rgb_or_gray, cv2.COLOR_RGB2BGR)
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), img):
            raise OSError(f"could not write {path}")


def _outputs(out_dir: Path, slide_id: str) -> tuple[Path, Path, Path]:
    return (out_dir / "patches" / f"{slide_id}.h5", out_dir / "masks" / f"{slide_id}.png",
            out_dir / "thumbnails" / f"{slide_id}.png")


def _already_tiled(out_dir: Path, slide_id: str, spec: PatchSpec) -> int | None:
    """The patch count of a complete earlier tiling of this slide with ``spec``, else None."""
    patch_path, mask_path, thumb_path = _outputs(out_dir, slide_id)
    if not (patch_path.exists() and mask_path.exists() and thumb_path.exists()):
        return None
    try:
        done = read_patch_file(patch_path)
    except FormatError:
        return None
    return len(done) if done.spec == spec else None


def tile_slide(slide_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], magnification: float = 20.0,
               patch_size: int = 512, stride: int | None = None, min_tissue: float = 0.5,
               mpp: float | None = None) -> SlideResult:
    """Tile one slide; returns its ``tiling.csv`` row (status ``ok`` or ``no_tissue``).

    Bad input (missing, unreadable, no mpp, magnification above the slide's) raises HistotransferError.
    A slide already tiled with the same settings is not redone (status ``ok``, message "already tiled").
    """
    t0 = time.perf_counter()
    slide_path, out_dir = Path(slide_path), Path(out_dir)
    slide_id = slide_id_of(slide_path)
    patch_path, mask_path, thumb_path = _outputs(out_dir, slide_id)
    with open_slide(slide_path, mpp=mpp) as slide:
        spec = tiling_spec(slide, magnification, patch_size, stride, min_tissue)
        done = _already_tiled(out_dir, slide_id, spec)
        if done is not None:
            return SlideResult(slide_id, str(slide_path), "ok", done, time.perf_counter() - t0, "already tiled")
        try:
            mask = slide_mask(slide, mask_mpp_for(spec))
            coords, fractions = patch_coords(mask, slide.dimensions, spec)
            thumbnail = draw_thumbnail(slide, mask, coords, int(spec.patch_size_level0))  # type: ignore[arg-type]
        except HistotransferError:
            raise
        except Exception as exc:  # a decoder's own error type: say what it means for the user
            raise HistotransferError(f"{slide_path}: cannot read the slide's pixels ({one_line(exc)}); the file "
                                     "may be truncated or corrupt.") from exc
    _write_png(mask.astype(np.uint8) * 255, mask_path)
    _write_png(thumbnail, thumb_path)
    if len(coords) == 0:
        patch_path.unlink(missing_ok=True)  # an earlier tiling with other settings no longer holds
        return SlideResult(slide_id, str(slide_path), "no_tissue", 0, time.perf_counter() - t0,
                           f"{slide_path}: no patch has tissue fraction >= {min_tissue}; see {thumb_path}")
    write_patch_file(patch_path, coords, fractions, spec)
    return SlideResult(slide_id, str(slide_path), "ok", len(coords), time.perf_counter() - t0, "")


def expand_slides(slides: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Slide paths from files and folders (a folder's slide files, by name); duplicate ids raise."""
    paths: list[Path] = []
    for entry in slides:
        entry = Path(entry)
        if entry.is_dir():
            found = sorted(p for p in entry.iterdir()
                           if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in SLIDE_SUFFIXES)
            if not found:
                raise HistotransferError(f"{entry}: folder holds no slide files ({', '.join(SLIDE_SUFFIXES)}).")
            paths += found
        else:
            paths.append(entry)
    unique: dict[Path, Path] = {}
    for p in paths:
        unique.setdefault(p.resolve(), p)
    by_id: dict[str, list[Path]] = {}
    for p in unique.values():
        by_id.setdefault(slide_id_of(p), []).append(p)
    clashes = {sid: ps for sid, ps in by_id.items() if len(ps) > 1}
    if clashes:
        detail = "; ".join(f"{sid}: {', '.join(map(str, ps))}" for sid, ps in sorted(clashes.items()))
        raise HistotransferError(f"two slides share an id (the file name without extension): {detail}; "
                                 "rename one so that every slide id is unique.")
    return list(unique.values())


def _tile_or_report(slide_path: str, out_dir: Path, settings: dict) -> SlideResult:
    """tile_slide with user-facing errors turned into an ``error`` row (their message names the file)."""
    t0 = time.perf_counter()
    try:
        return tile_slide(slide_path, out_dir, **settings)
    except HistotransferError as exc:
        return SlideResult(slide_id_of(slide_path), slide_path, "error", 0, time.perf_counter() - t0,
                           " ".join(str(exc).split()))


def tile_slides(slides: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
                magnification: float = 20.0, patch_size: int = 512, stride: int | None = None,
                min_tissue: float = 0.5, mpp: float | None = None, workers: int = 1) -> list[SlideResult]:
    """Tile many slides (files or folders) into ``out_dir``; one failing slide is reported, not fatal.

    Duplicate slide ids raise before any work. Re-running skips slides tiled with the same settings and
    re-tiles those whose settings differ; temporary files of a killed run are removed first.
    ``workers > 1`` tiles slides in that many processes.
    """
    paths = expand_slides(slides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for folder in (out, *(out / d for d in SUBDIRS)):
        remove_stale_temps(folder)
    settings = dict(magnification=magnification, patch_size=patch_size, stride=stride, min_tissue=min_tissue,
                    mpp=mpp)
    report = BatchReport(out / "tiling.csv")
    items = [(slide_id_of(p), str(p)) for p in paths]
    if workers <= 1:
        return run_batch(items, lambda _sid, p: _tile_or_report(p, out, settings), report, desc="tiling")
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures: dict[str, Future[SlideResult]] = {
            p: pool.submit(_tile_or_report, p, out, settings) for _, p in items}
        return run_batch(items, lambda _sid, p: futures[p].result(), report, desc="tiling")
