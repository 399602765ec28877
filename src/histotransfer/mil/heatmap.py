"""Attention heatmaps of a MIL run: a PNG over the slide thumbnail and a GeoJSON that QuPath imports.

The GeoJSON holds one square Polygon per patch in level-0 pixel coordinates, with the attention as QuPath
measurements, so the attended regions can be inspected (and coloured by measurement) on the slide itself.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from .._io import atomic_path, write_text
from ..batch import BatchReport, SlideResult, run_batch
from ..errors import HistotransferError
from ..features.feature_file import read_feature_file
from ..slide import list_slides, open_slide
from .bags import patch_size_level0
from .models import predict_bag
from .rundir import load_run_model, read_attention, read_config

OBJECT_TYPES = ("detection", "annotation")


def slide_attention(run_dir: Path, slide_id: str, features_dir: Path | None = None) -> dict[str, Any]:
    """Coords, raw scores and softmax weights of one slide, and its patch side in level-0 px (or None).

    From ``features_dir/<slide_id>.h5`` through the run's model when ``features_dir`` is given, else from the
    run's ``attention/<slide_id>.h5``, else from the run's own features folder."""
    stored = run_dir / "attention" / f"{slide_id}.h5"
    if features_dir is None and stored.is_file():
        att = read_attention(stored)
        size = att["attrs"].get("patch_size_level0")
        return {**att, "patch_size_level0": None if size is None else int(size)}
    folder = Path(features_dir) if features_dir is not None else Path(read_config(run_dir)["features_dir"])
    path = folder / f"{slide_id}.h5"
    if not path.is_file():
        raise HistotransferError(
            f"no attention for slide {slide_id!r}: neither {stored} nor {path} exists; pass --features with "
            "the folder holding its feature file."
        )
    bag = read_feature_file(path)
    _, score = predict_bag(load_run_model(run_dir), bag.features)
    s = score.astype(np.float64)
    weight = np.exp(s - s.max())
    return {"coords": bag.coords, "score": score, "weight": (weight / weight.sum()).astype(np.float32),
            "patch_size_level0": patch_size_level0(bag.attrs)}


def attention_geojson(coords: np.ndarray, score: np.ndarray, weight: np.ndarray, patch_size: int,
                      object_type: str = "detection") -> dict[str, Any]:
    """A GeoJSON FeatureCollection: one square Polygon per patch (level-0 px) with its attention as QuPath
    ``measurements`` (``attention_score`` raw, ``attention_weight`` softmax, ``attention_rank`` 1 = top)."""
    if object_type not in OBJECT_TYPES:
        raise HistotransferError(f"object type {object_type!r}: use one of {', '.join(OBJECT_TYPES)}.")
    rank = np.empty(len(score), dtype=np.int64)
    rank[np.argsort(-np.asarray(score), kind="stable")] = np.arange(1, len(score) + 1)
    features = []
    for i, ((x, y), s, w) in enumerate(zip(np.asarray(coords).tolist(), score.tolist(), weight.tolist())):
        x1, y1 = x + patch_size, y + patch_size
        features.append({
            "type": "Feature",
            "id": f"patch-{i}",
            "geometry": {"type": "Polygon", "coordinates": [[[x, y], [x1, y], [x1, y1], [x, y1], [x, y]]]},
            "properties": {
                "objectType": object_type,
                "name": f"patch {i}",
                "measurements": {"attention_score": s, "attention_weight": w, "attention_rank": int(rank[i])},
            },
        })
    return {"type": "FeatureCollection", "features": features}


def attention_overlay(thumb: np.ndarray, dimensions: tuple[int, int], coords: np.ndarray, values: np.ndarray,
                      patch_size: int, norm: Normalize, cmap: str = "jet", alpha: float = 0.5) -> np.ndarray:
    """``thumb`` with each patch square painted in the colour of its value (overlaps averaged)."""
    h, w = thumb.shape[:2]
    sx, sy = w / dimensions[0], h / dimensions[1]
    total = np.zeros((h, w), np.float64)
    count = np.zeros((h, w), np.int32)
    for (x, y), v in zip(np.asarray(coords).tolist(), np.asarray(values, np.float64).tolist()):
        c0, r0 = int(math.floor(x * sx)), int(math.floor(y * sy))
        c1 = max(int(math.ceil((x + patch_size) * sx)), c0 + 1)
        r1 = max(int(math.ceil((y + patch_size) * sy)), r0 + 1)
        total[max(r0, 0):r1, max(c0, 0):c1] += v
        count[max(r0, 0):r1, max(c0, 0):c1] += 1
    covered = count > 0
    colour = matplotlib.colormaps[cmap](norm(total[covered] / count[covered]))[:, :3] * 255
    out = thumb.astype(np.float64)
    out[covered] = (1 - alpha) * out[covered] + alpha * colour
    return out.round().clip(0, 255).astype(np.uint8)


def _save_png(image: np.ndarray, norm: Normalize, cmap: str, title: str, path: Path) -> None:
    h, w = image.shape[:2]
    fig = Figure(figsize=(8 * w / max(h, w) + 1.5, 8 * h / max(h, w) + 0.6), dpi=max(100, min(250, max(h, w) / 8)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(image)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.04, pad=0.02,
                 label="attention score (pre-softmax)")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")


def write_heatmaps(run_dir: str | Path, slides: Sequence[str | Path], out_dir: str | Path, *,
                   features_dir: str | Path | None = None, patch_size_level0: int | None = None,
                   mpp: float | None = None, max_side: int = 2048, object_type: str = "detection",
                   cmap: str = "jet") -> list[Path]:
    """Write ``<slide_id>.png`` (attention over the thumbnail, with a colour bar) and ``<slide_id>.geojson``
    (patch squares in level-0 px with attention measurements) for each slide file (or folder of slides).

    The attention comes from the run (``RUN/attention``) or, with ``features_dir``, from new feature files.
    The patch side in level-0 px comes from ``patch_size_level0``, else the feature/patch file attrs. A slide
    that fails is reported in ``out_dir/heatmaps.csv`` and skipped. Returns the files written.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    entries = [e for e in list_slides(slides) if e.duplicate_of is None]
    if object_type not in OBJECT_TYPES:
        raise HistotransferError(f"--object-type {object_type}: use one of {', '.join(OBJECT_TYPES)}.")
    load_run_model(run_dir)  # fail early on a folder that is not a finished run
    written: list[Path] = []

    def work(slide_id: str, slide_path: str) -> SlideResult:
        t0 = time.perf_counter()
        att = slide_attention(run_dir, slide_id, None if features_dir is None else Path(features_dir))
        size = patch_size_level0 or att["patch_size_level0"]
        if not size:
            raise HistotransferError(
                "the patch side in level-0 pixels is not in the feature or patch file attrs; pass "
                "--patch-size-level0 (the patch side times target mpp / slide mpp)."
            )
        score = np.asarray(att["score"], np.float64)
        lo, hi = float(score.min()), float(score.max())
        norm = Normalize(lo, hi if hi > lo else lo + 1e-6)
        with open_slide(slide_path, mpp=mpp) as slide:
            thumb = slide.thumbnail(max_side)
            image = attention_overlay(thumb, slide.dimensions, att["coords"], score, size, norm, cmap)
        png, geo = out_dir / f"{slide_id}.png", out_dir / f"{slide_id}.geojson"
        _save_png(image, norm, cmap, f"{slide_id}: attention of {len(score)} patches", png)
        collection = attention_geojson(att["coords"], att["score"], att["weight"], int(size), object_type)
        write_text(json.dumps(collection, separators=(",", ":")), geo)
        written.extend([png, geo])
        return SlideResult(slide_id, slide_path, "ok", len(score), time.perf_counter() - t0)

    report = BatchReport(out_dir / "heatmaps.csv")
    run_batch([(e.slide_id, str(e.path)) for e in entries], work, report, desc="heatmaps")
    return written
