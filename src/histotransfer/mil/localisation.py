"""Does the model look at the lesion? Attention and Grad-CAM localisation against lesion annotations.

Meant for positive slides with a lesion annotation (``histotransfer.annotations``); per slide:

* :func:`attention_localisation` - from the patches' raw attention scores and lesion fractions (the share of
  each patch's area that is lesion). Scores that hold for lesions smaller than a patch, each beside its chance
  level (what a patch drawn at random, or uniform attention, gives): the top-attended patch's lesion share
  (chance: the slide's mean lesion share), whether it touches the lesion at all (chance: the share of patches
  that do), the attention-weighted lesion share (chance: the mean lesion share) and the patch-level AUC of the
  score for patches touching the lesion vs not (chance 0.5). Then the same with *lesion patches*, those at
  least ``threshold`` lesion (default 0.5, the majority): a slide whose lesions are all smaller than that has
  none, and those scores say nothing about it.
* :func:`cam_localisation` - from Grad-CAM maps of some of its patches (``histotransfer.analysis.cam``): the
  pointing game (Zhang et al., 2016) over the patches that contain lesion (chance: a random cell of each of
  them), and the share of CAM mass on lesion (chance: the cells' mean lesion fraction).

:func:`cohort_localisation` averages either over slides.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import softmax
from sklearn.metrics import roc_auc_score

from ..annotations import GEOJSON_SUFFIXES, MASK_SUFFIXES, Annotation, load_annotation
from ..errors import HistotransferError

DEFAULT_THRESHOLD = 0.5


def _auc(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC of ``scores`` for ``positive`` vs the rest; None with one class."""
    return float(roc_auc_score(positive, scores)) if positive.any() and not positive.all() else None


def attention_localisation(
    scores: np.ndarray, overlap: np.ndarray, threshold: float = DEFAULT_THRESHOLD
) -> dict[str, Any]:
    """Localisation of one slide's attention, from raw scores (N,) and lesion area fractions (N,) in [0, 1].

    The top patch is the highest-scored one (the first in order on ties); attention is the softmax of the
    scores. Returns, by lesion share: ``top_patch_overlap`` (the top patch's lesion fraction), ``mean_overlap``
    (the patches' mean lesion fraction: the top patch's expected share were it drawn at random, and the
    attention-weighted share of uniform attention), ``attention_overlap`` (the attention-weighted mean lesion
    fraction), ``top_patch_touches`` (the top patch holds any lesion), ``touching_share`` (the share of patches
    that do: its chance), ``auc_touching`` (score vs touching the lesion; None with one class); by lesion
    patch (at least ``threshold`` lesion): ``top_patch_hit``, ``attention_mass`` (attention on lesion patches),
    ``lesion_patch_share`` (their share: the chance of both), ``auc``; and the counts ``n_patches``,
    ``n_touching``, ``n_lesion_patches``.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    overlap = np.asarray(overlap, dtype=np.float64).reshape(-1)
    if len(scores) == 0 or scores.shape != overlap.shape:
        raise ValueError(f"scores and overlap must be two (N,) arrays with N >= 1, got {scores.shape}, {overlap.shape}")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    weights = softmax(scores)
    touching = overlap > 0
    lesion = overlap >= threshold
    top = int(np.argmax(scores))
    return {
        "top_patch_overlap": float(overlap[top]),
        "mean_overlap": float(overlap.mean()),
        "attention_overlap": float(weights @ overlap),
        "top_patch_touches": bool(touching[top]),
        "touching_share": float(touching.mean()),
        "auc_touching": _auc(touching, scores),
        "top_patch_hit": bool(lesion[top]),
        "attention_mass": float(weights[lesion].sum()),
        "lesion_patch_share": float(lesion.mean()),
        "auc": _auc(lesion, scores),
        "n_patches": len(scores),
        "n_touching": int(touching.sum()),
        "n_lesion_patches": int(lesion.sum()),
    }


def cell_squares(patch_coords: np.ndarray, patch_size_level0: float, grid: tuple[int, int]) -> np.ndarray:
    """Level-0 top-left corners (B, h, w, 2) of the CAM cells: the (h, w) grid laid evenly over each patch."""
    h, w = grid
    if h != w:
        raise ValueError(f"CAM grid {grid} is not square; patches are square")
    xy = np.asarray(patch_coords, dtype=np.float64).reshape(-1, 1, 1, 2)
    step = patch_size_level0 / w
    offsets = np.stack(np.meshgrid(np.arange(w), np.arange(h), indexing="xy"), axis=-1) * step
    return xy + offsets[None]


def cam_localisation(
    cam_maps: np.ndarray, patch_coords: np.ndarray, patch_size_level0: float, annotation: Annotation
) -> dict[str, Any]:
    """Localisation of Grad-CAM maps (B, h, w) (ReLU'd) of patches at ``patch_coords`` (B, 2) level-0.

    Each map's cells are laid evenly over its patch's level-0 square. Pointing game: a patch's hit is the
    centre of its highest cell (first in row-major order on ties) inside the lesion; it is played by the
    patches that overlap the lesion and whose map has a positive maximum (an all-zero map points nowhere).
    Returns ``pointing_game`` (hit rate; None when no patch plays), ``pointing_chance`` (the hit rate of a
    cell drawn at random in each playing patch: the mean share of their cells centred in the lesion; None
    when no patch plays), ``n_pointing``, ``cam_mass`` (the share
    of all the maps' summed mass on lesion, each cell weighted by its lesion area fraction; None when the maps
    are all zero), ``lesion_area_share`` (mean lesion fraction of the cells, what a uniform map would give)
    and ``n_patches``.
    """
    maps = np.asarray(cam_maps, dtype=np.float64)
    if maps.ndim != 3 or len(maps) != len(np.asarray(patch_coords).reshape(-1, 2)):
        raise ValueError(f"cam_maps must be (B, h, w) with one patch coordinate per map, got {maps.shape}")
    b, h, w = maps.shape
    corners = cell_squares(patch_coords, patch_size_level0, (h, w))
    step = patch_size_level0 / w
    cover = annotation.patch_overlap(corners.reshape(-1, 2), step).reshape(b, h, w)
    peak = maps.reshape(b, -1).argmax(axis=1)
    peak_xy = corners.reshape(b, -1, 2)[np.arange(b), peak] + step / 2
    hits = annotation.contains_xy(peak_xy[:, 0], peak_xy[:, 1])
    centres = corners.reshape(-1, 2) + step / 2
    inside = annotation.contains_xy(centres[:, 0], centres[:, 1]).reshape(b, -1)
    playing = (cover.reshape(b, -1).max(axis=1) > 0) & (maps.reshape(b, -1).max(axis=1) > 0)
    total = maps.sum()
    return {
        "pointing_game": float(hits[playing].mean()) if playing.any() else None,
        "pointing_chance": float(inside[playing].mean()) if playing.any() else None,
        "n_pointing": int(playing.sum()),
        "cam_mass": float((maps * cover).sum() / total) if total > 0 else None,
        "lesion_area_share": float(cover.mean()),
        "n_patches": int(b),
    }


def cohort_localisation(per_slide: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float | int | None]]:
    """Mean over slides of every numeric (or boolean) key of per-slide results, with n the slides counted.

    Slides whose value is None (e.g. an AUC with one class) are left out of that key's mean; a key without
    any value has mean None. Pass the positive slides with annotations only.
    """
    keys = dict.fromkeys(k for result in per_slide for k in result)
    out: dict[str, dict[str, float | int | None]] = {}
    for key in keys:
        values = [r.get(key) for r in per_slide]
        if not all(v is None or isinstance(v, numbers.Real) for v in values):
            continue
        present = [float(v) for v in values if v is not None and not math.isnan(float(v))]
        out[key] = {"mean": float(np.mean(present)) if present else None, "n": len(present)}
    return out


def annotation_files(annotations_dir: str | Path) -> dict[str, Path]:
    """``slide_id -> file`` of the lesion annotations in a folder: ``<slide_id>.geojson`` (or ``.json``, QuPath
    GeoJSON in level-0 pixels) or a mask image ``<slide_id>.png`` (``.tif``, ``.tiff``, ``.bmp``) with its
    sidecar ``<slide_id>.png.json`` holding ``{"downsample": D}``. Sidecars and hidden files are skipped; two
    annotations of one slide are an error."""
    folder = Path(annotations_dir)
    if not folder.is_dir():
        raise HistotransferError(
            f"{folder}: no such annotations folder; pass the folder holding <slide_id>.geojson "
            "or <slide_id>.png lesion annotations."
        )
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        suffix = path.suffix.lower()
        sidecar = suffix in GEOJSON_SUFFIXES and Path(path.stem).suffix.lower() in MASK_SUFFIXES
        if path.name.startswith(".") or sidecar or suffix not in GEOJSON_SUFFIXES + MASK_SUFFIXES:
            continue
        if path.stem in found:
            raise HistotransferError(f"{found[path.stem]} and {path}: two annotations of slide {path.stem}; keep one.")
        found[path.stem] = path
    if not found:
        raise HistotransferError(
            f"{folder}: holds no lesion annotation (<slide_id> with "
            f"{', '.join(GEOJSON_SUFFIXES + MASK_SUFFIXES)}); pass the annotations folder."
        )
    return found


def load_annotations(annotations_dir: str | Path, slide_ids: Sequence[str]) -> dict[str, Annotation]:
    """The annotations of those of ``slide_ids`` that have one in ``annotations_dir`` (others are left out)."""
    files = annotation_files(annotations_dir)
    return {s: load_annotation(files[s]) for s in slide_ids if s in files}
