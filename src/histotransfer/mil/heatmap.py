"""Attention heatmaps of a MIL run: a PNG over the slide thumbnail and a GeoJSON that QuPath imports.

The PNG is drawn with array operations (no plotting library figure): each patch square's value is painted into
a canvas at thumbnail scale (overlaps averaged), mapped through the colormap's lookup table and blended with the
thumbnail; a legend strip (colour bar, ticks, value, scale and range) is appended on the right, leaving the
overlay pixels as computed. All slides of one call share one value range by default (``scale="cohort"``), so
colours compare across slides.

The GeoJSON holds one square Polygon per patch in level-0 pixel coordinates, with the attention as QuPath
measurements, so the attended regions can be inspected (and coloured by measurement) on the slide itself.

With lesion annotations, each annotated slide's lesion is outlined on its PNG and, for the slides scored
(positive in the run's split, or, for slides the run never saw, an annotation holding a lesion), the attention
localisation is stated in the legend and written to ``localisation.csv``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import cv2
import h5py
import matplotlib
import numpy as np
import pandas as pd

from .._io import output_folder, write_csv, write_png, write_text
from ..annotations import Annotation, load_annotation
from ..batch import REPORT_COLUMNS, BatchReport, SlideResult, run_batch
from ..errors import HistotransferError
from ..features import read_feature_file
from ..slide import check_identity, list_slides, open_slide, parse_identity
from .bags import check_bag
from .evaluate import (
    LOCALISATION_FILE,
    POSITIVE,
    check_threshold,
    describe_slide_localisation,
    localisation_frame,
    run_splits,
)
from .localisation import DEFAULT_THRESHOLD, annotation_files, attention_localisation
from .models import predict_bag
from .rundir import (
    check_inputs,
    check_run_folder,
    load_run_model,
    model_run,
    read_attention,
    read_config,
    run_fingerprint,
)
from .settings import HeatmapSettings

OBJECT_TYPES = ("detection", "annotation")
REPORT_FILE = "heatmaps.csv"
SCALES = ("cohort", "slide")
VALUES = ("score", "weight")
VALUE_LABELS = {"score": "attention score (pre-softmax)", "weight": "attention weight x patches (1 = uniform)"}
# Patch values are painted as integers in units of 1 / FIXED_ONE of the colour range: sums of overlapping
# squares are then exact (float cumulative sums are not) up to 2**17 squares over one pixel, and 2**28 steps
# are far finer than any colormap.
FIXED_ONE = 1 << 28


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    return value.item() if isinstance(value, np.generic) else value


def h5_patch_attrs(path: str | Path) -> dict[str, Any]:
    """The root attrs of an HDF5 file with those of its ``coords`` dataset over them (where CLAM and TRIDENT
    record the patch size), as plain values; ``{}`` for a missing or unreadable file."""
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
            if isinstance(f.get("coords"), h5py.Dataset):
                attrs.update({k: _plain(v) for k, v in f["coords"].attrs.items()})
    except OSError:
        return {}
    return attrs


def patch_side_level0(attrs: Mapping[str, Any], level_downsamples: Sequence[float]) -> int | None:
    """The patch side in level-0 px recorded in patch or feature file attrs, or None.

    ``patch_size_level0`` (ours, TRIDENT) is taken as is; otherwise CLAM's ``patch_size`` read at
    ``patch_level`` is scaled by that level's downsample of the slide."""
    if attrs.get("patch_size_level0") is not None:
        return round(float(attrs["patch_size_level0"]))
    size, level = attrs.get("patch_size"), attrs.get("patch_level")
    if size is None or level is None:
        return None
    if not 0 <= int(level) < len(level_downsamples):
        raise HistotransferError(
            f"the patch file reads level {level} but the slide has {len(level_downsamples)} "
            "level(s); check that the patch file belongs to this slide."
        )
    return round(float(size) * level_downsamples[int(level)])


def _size_files(feature_file: Path) -> list[Path]:
    """A feature file and the patch file its attrs name (ours), where the patch side may be recorded."""
    patch_file = h5_patch_attrs(feature_file).get("patch_file")
    return [feature_file] + ([Path(patch_file)] if patch_file else [])


def attention_dirs(run_dir: Path, attention_dir: Path | None = None) -> list[Path]:
    """Where a run's attention files are looked for, in order: ``attention_dir``, ``RUN/attention`` (the
    run's slides), ``RUN/evaluation/attention`` (what ``histotransfer evaluate`` wrote by default)."""
    return ([Path(attention_dir)] if attention_dir is not None else []) + [
        run_dir / "attention",
        run_dir / "evaluation" / "attention",
    ]


def slide_attention(
    run_dir: Path,
    slide_id: str,
    features_dir: Path | None = None,
    attention_dir: Path | None = None,
    fingerprint: str | None = None,
) -> dict[str, Any]:
    """Coords, raw scores and softmax weights of one slide, the patch side in level-0 px its files record
    (``patch_size_level0``, or None) and ``size_files``: HDF5 files whose attrs may record it otherwise.

    From ``features_dir/<slide_id>.h5`` through the run's model when ``features_dir`` is given, else from the
    first attention file of ``attention_dirs`` (refused when made by another run than ``fingerprint``'s), else
    from the run's own features folder."""
    if features_dir is None:
        for folder in attention_dirs(run_dir, attention_dir):
            if (folder / f"{slide_id}.h5").is_file():
                return _stored_attention(run_dir, folder, slide_id, fingerprint)
    folder = Path(features_dir) if features_dir is not None else Path(read_config(run_dir)["features_dir"])
    path = folder / f"{slide_id}.h5"
    if not path.is_file():
        looked = ", ".join(str(d / f"{slide_id}.h5") for d in attention_dirs(run_dir, attention_dir))
        raise HistotransferError(
            f"no attention for slide {slide_id!r}: none of {looked}, {path} exists; run `histotransfer evaluate` "
            "on its features (or pass --attention DIR, or --features with the folder holding its feature file)."
            if features_dir is None
            else f"no feature file {path} for slide {slide_id!r}; pass --features with the folder holding it."
        )
    bag = read_feature_file(path)
    model, config = load_run_model(run_dir), read_config(run_dir)
    check_bag(path, bag, model.in_dim, config["encoder"])  # features of another encoder would draw nonsense
    check_inputs(config, {slide_id: bag.fingerprint}, folder)
    _, score = predict_bag(model, bag.features)
    s = score.astype(np.float64)
    weight = np.exp(s - s.max())
    return {
        "coords": bag.coords,
        "score": score,
        "weight": (weight / weight.sum()).astype(np.float32),
        "patch_size_level0": None,
        "size_files": _size_files(path),
        "identity": parse_identity(bag.attrs.get("slide_identity")),
        "source": str(path),
    }


def _stored_attention(run_dir: Path, folder: Path, slide_id: str, fingerprint: str | None) -> dict[str, Any]:
    att = read_attention(folder / f"{slide_id}.h5", fingerprint, own=folder == run_dir / "attention")
    attrs = att.pop("attrs")
    size = attrs.get("patch_size_level0")
    files: list[Path] = []
    if folder == run_dir / "attention":
        feature_file = Path(read_config(run_dir)["features_dir"]) / f"{slide_id}.h5"
        files = _size_files(feature_file) if feature_file.is_file() else []
    return {
        **att,
        "patch_size_level0": None if size is None else int(size),
        "size_files": files,
        "identity": parse_identity(attrs.get("slide_identity")),
        "source": str(folder / f"{slide_id}.h5"),
    }


def resolve_patch_side(
    att: Mapping[str, Any], level_downsamples: Sequence[float], patch_file: Path | None = None
) -> int:
    """The patch side in level-0 px: from the attention file, else the first of ``att["size_files"]`` and
    ``patch_file`` whose attrs record it (ours, CLAM or TRIDENT); an error when none does."""
    if att.get("patch_size_level0"):
        return int(att["patch_size_level0"])
    for path in [*att.get("size_files", []), *([patch_file] if patch_file is not None else [])]:
        side = patch_side_level0(h5_patch_attrs(path), level_downsamples)
        if side:
            return side
    raise HistotransferError(
        "the patch side in level-0 pixels is not recorded in the attention, feature or patch file attrs; pass "
        "--patches with the folder of its patch file, or --patch-size-level0 (the patch side times target mpp "
        "/ slide mpp)."
    )


def heatmap_values(score: np.ndarray, weight: np.ndarray, value: str) -> np.ndarray:
    """The values painted: the raw score, or the softmax weight times the number of patches (1 = uniform
    attention), which unlike the bare weight does not shrink as a slide has more patches."""
    if value == "score":
        return np.asarray(score, np.float64)
    return np.asarray(weight, np.float64) * len(weight)


def value_range(values: Sequence[np.ndarray]) -> tuple[float, float]:
    """The smallest and largest of all finite values."""
    finite = [v[np.isfinite(v)] for v in values]
    finite = [v for v in finite if v.size]
    if not finite:
        return 0.0, 0.0
    return min(float(v.min()) for v in finite), max(float(v.max()) for v in finite)


def colormap_lut(cmap: str) -> np.ndarray:
    """The colormap's lookup table as an (n, 3) float64 RGB array in 0..255 (value x in [0, 1] takes entry
    ``min(floor(x * n), n - 1)``, as the colormap itself does)."""
    colormap = matplotlib.colormaps[cmap]
    return colormap(np.arange(colormap.N))[:, :3] * 255.0


def _fixed_point(values: np.ndarray, vrange: tuple[float, float]) -> np.ndarray:
    """``values`` as fractions of ``vrange`` (clipped to [0, 1]; 0.5 when the range is empty) in units of
    1 / FIXED_ONE."""
    lo, hi = vrange
    values = np.asarray(values, np.float64)
    frac = np.full(len(values), 0.5) if hi <= lo else np.clip((values - lo) / (hi - lo), 0, 1)
    return np.rint(np.nan_to_num(frac, nan=0.5) * FIXED_ONE).astype(np.int64)


def _summed_squares(
    shape: tuple[int, int],
    rows: tuple[np.ndarray, np.ndarray],
    cols: tuple[np.ndarray, np.ndarray],
    weights: np.ndarray,
) -> np.ndarray:
    """Per pixel, the sum of the integer ``weights`` of the rectangles [r0, r1) x [c0, c1) covering it: corner
    increments of a difference image (``np.bincount``) summed by its integral image (``cv2.integral``),
    O(patches + pixels) however they overlap. Float64 holding integers, exact while sums stay below 2**53."""
    h, w = shape
    (r0, r1), (c0, c1) = rows, cols
    flat = np.concatenate([r0 * (w + 1) + c0, r0 * (w + 1) + c1, r1 * (w + 1) + c0, r1 * (w + 1) + c1])
    corner = np.concatenate([weights, -weights, -weights, weights]).astype(np.float64)
    diff = np.bincount(flat, corner, minlength=(h + 1) * (w + 1)).reshape(h + 1, w + 1)
    return cv2.integral(diff, sdepth=cv2.CV_64F)[1 : h + 1, 1 : w + 1]


def _blend_table(lut: np.ndarray, alpha: float) -> np.ndarray:
    """(3, 256, n + 1) uint8: for channel c, thumbnail value t and colour entry i < n, ``round((1 - alpha) * t +
    alpha * lut[i, c])``; entry n keeps t (pixels no patch covers). Blending becomes one lookup per pixel."""
    t = np.arange(256, dtype=np.float64)[:, None]
    table = np.empty((3, 256, len(lut) + 1), np.uint8)
    for c in range(3):
        table[c, :, :-1] = np.rint((1 - alpha) * t + alpha * lut[None, :, c]).clip(0, 255)
        table[c, :, -1] = t[:, 0]
    return table


def attention_overlay(
    thumb: np.ndarray,
    dimensions: tuple[int, int],
    coords: np.ndarray,
    values: np.ndarray,
    patch_size: int,
    vrange: tuple[float, float],
    cmap: str = "jet",
    alpha: float = 0.5,
) -> np.ndarray:
    """``thumb`` (RGB uint8) with each patch square painted in the colour of its value within ``vrange``.

    A square covers the thumbnail pixels its level-0 extent touches (at least one); where squares overlap
    their values are averaged before colouring. Painted pixels are ``round((1 - alpha) * thumb + alpha *
    colour)``; the others keep the thumbnail's colour."""
    h, w = thumb.shape[:2]
    sx, sy = w / dimensions[0], h / dimensions[1]
    xy = np.asarray(coords, np.float64).reshape(-1, 2)
    c0 = np.clip(np.floor(xy[:, 0] * sx), 0, w).astype(np.int64)
    r0 = np.clip(np.floor(xy[:, 1] * sy), 0, h).astype(np.int64)
    c1 = np.clip(np.maximum(np.ceil((xy[:, 0] + patch_size) * sx), c0 + 1), 0, w).astype(np.int64)
    r1 = np.clip(np.maximum(np.ceil((xy[:, 1] + patch_size) * sy), r0 + 1), 0, h).astype(np.int64)
    count = _summed_squares((h, w), (r0, r1), (c0, c1), np.ones(len(xy), np.int64))
    total = _summed_squares((h, w), (r0, r1), (c0, c1), _fixed_point(values, vrange))
    lut = colormap_lut(cmap)
    n = len(lut)
    # floor(n * mean fraction): exact on these integer-valued float64 sums (floor_divide works through fmod)
    index = np.minimum(np.floor_divide(total * n, np.maximum(count, 1) * FIXED_ONE), n - 1).astype(np.int32)
    index[count == 0] = n
    table = _blend_table(lut, alpha)
    out = np.empty_like(thumb)
    for c in range(3):
        out[..., c] = table[c].ravel()[thumb[..., c].astype(np.int32) * (n + 1) + index]
    return out


def _text_size(text: str, scale: float, thickness: int) -> tuple[int, int]:
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    return tw, th + base


def _caption(lines: Sequence[str], length: int, scale: float, thickness: int) -> np.ndarray:
    """``lines`` drawn black on white, shrunk to fit ``length`` px, rotated to read bottom to top."""
    widest = max(_text_size(t, scale, thickness)[0] for t in lines)
    scale = min(scale, scale * length / max(widest, 1))
    line_h = max(_text_size(t, scale, thickness)[1] for t in lines) + max(2, round(4 * scale))
    canvas = np.full((line_h * len(lines), length, 3), 255, np.uint8)
    for i, text in enumerate(lines):
        tw, _ = _text_size(text, scale, thickness)
        cv2.putText(
            canvas,
            text,
            ((length - tw) // 2, (i + 1) * line_h - max(2, round(4 * scale))),
            cv2.FONT_HERSHEY_SIMPLEX,
            scale,
            (0, 0, 0),
            thickness,
            cv2.LINE_AA,
        )
    return cv2.rotate(canvas, cv2.ROTATE_90_COUNTERCLOCKWISE)


def tick_labels(vrange: tuple[float, float], n: int = 5) -> list[str]:
    """``n`` evenly spaced values from low to high, rounded to three significant digits of the range's span
    (so the middle of -2..2 reads 0, not -0.000115)."""
    lo, hi = vrange
    span = hi - lo
    decimals = 2 - math.floor(math.log10(span)) if span > 0 else 3
    return [f"{round(lo + span * k / (n - 1), decimals) + 0.0:g}" for k in range(n)]


def legend_strip(height: int, vrange: tuple[float, float], cmap: str, lines: Sequence[str]) -> np.ndarray:
    """An RGB strip ``height`` px tall: a vertical colour bar (top = high), five tick labels of ``vrange``
    and ``lines`` as a caption, sized to the image it goes beside."""
    unit = max(height / 2048, 0.35)
    scale, thickness = 0.9 * unit, max(1, round(1.6 * unit))
    margin, bar_w, gap = min(round(24 * unit), height // 4), round(28 * unit), round(10 * unit)
    labels = tick_labels(vrange)
    label_w = max(_text_size(t, scale, thickness)[0] for t in labels)
    top, bottom = margin, height - margin
    caption = _caption(lines, bottom - top, scale, thickness)
    strip = np.full((height, margin + bar_w + gap + label_w + gap + caption.shape[1] + margin, 3), 255, np.uint8)
    lut = colormap_lut(cmap)
    frac = (bottom - 1 - np.arange(top, bottom)) / max(bottom - 1 - top, 1)
    bar = lut[np.minimum((frac * len(lut)).astype(np.int64), len(lut) - 1)]
    strip[top:bottom, margin : margin + bar_w] = np.rint(bar).astype(np.uint8)[:, None, :]
    x_text = margin + bar_w + gap
    for k, text in enumerate(labels):
        y = round(bottom - 1 - (bottom - 1 - top) * k / 4)
        cv2.line(strip, (margin + bar_w, y), (margin + bar_w + gap // 2, y), (0, 0, 0), thickness)
        th = _text_size(text, scale, thickness)[1]
        baseline = min(max(y + th // 2, th), height - 1)
        cv2.putText(strip, text, (x_text, baseline), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness, cv2.LINE_AA)
    x_cap = x_text + label_w + gap
    strip[top:bottom, x_cap : x_cap + caption.shape[1]] = caption
    return strip


def heatmap_image(overlay: np.ndarray, vrange: tuple[float, float], cmap: str, lines: Sequence[str]) -> np.ndarray:
    """``overlay`` with the legend strip appended on its right (the overlay pixels unchanged)."""
    return np.hstack([overlay, legend_strip(overlay.shape[0], vrange, cmap, lines)])


def outline_lesion(
    image: np.ndarray, annotation: Annotation, dimensions: tuple[int, int], colour: tuple[int, int, int] = (0, 0, 0)
) -> np.ndarray:
    """``image`` (an RGB thumbnail of a slide of level-0 ``dimensions``) with the lesion's outline drawn on it:
    the annotation rasterised at the thumbnail's scale, its contours traced by OpenCV."""
    h, w = image.shape[:2]
    lesion = annotation.rasterize((h, w), dimensions[0] / w).astype(np.uint8)
    contours, _ = cv2.findContours(lesion, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    out = image.copy()
    cv2.drawContours(out, contours, -1, colour, max(1, round(max(h, w) / 700)), cv2.LINE_AA)
    return out


def localisation_caption(scores: Mapping[str, Any]) -> str:
    """One legend line stating a slide's attention localisation."""
    return f"lesion: {describe_slide_localisation(scores)}"


def scored_slide(slide_id: str, annotation: Annotation, labels: Mapping[str, int]) -> bool:
    """Whether a slide's localisation is scored: positive in the run's split, or, for a slide the run never
    saw, an annotation that holds a lesion."""
    return labels[slide_id] == POSITIVE if slide_id in labels else not annotation.is_empty


def attention_geojson(
    coords: np.ndarray, score: np.ndarray, weight: np.ndarray, patch_size: int, object_type: str = "detection"
) -> dict[str, Any]:
    """A GeoJSON FeatureCollection: one square Polygon per patch (level-0 px) with its attention as QuPath
    ``measurements`` (``attention_score`` raw, ``attention_weight`` softmax, ``attention_rank`` 1 = top)."""
    if object_type not in OBJECT_TYPES:
        raise HistotransferError(f"object type {object_type!r}: use one of {', '.join(OBJECT_TYPES)}.")
    rank = np.empty(len(score), dtype=np.int64)
    rank[np.argsort(-np.asarray(score), kind="stable")] = np.arange(1, len(score) + 1)
    features = []
    for i, ((x, y), s, w) in enumerate(zip(np.asarray(coords).tolist(), score.tolist(), weight.tolist())):
        x1, y1 = x + patch_size, y + patch_size
        features.append(
            {
                "type": "Feature",
                "id": f"patch-{i}",
                "geometry": {"type": "Polygon", "coordinates": [[[x, y], [x1, y], [x1, y1], [x, y1], [x, y]]]},
                "properties": {
                    "objectType": object_type,
                    "name": f"patch {i}",
                    "measurements": {"attention_score": s, "attention_weight": w, "attention_rank": int(rank[i])},
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


class RunReport(BatchReport):
    """``heatmaps.csv``: the batch report with the run every row was drawn from (``run``, ``run_fingerprint``)."""

    def __init__(self, path: Path, run: dict[str, str]):
        self.run = run
        super().__init__(path)

    def _write(self) -> None:
        rows = pd.DataFrame([asdict(r) for r in self.rows.values()], columns=REPORT_COLUMNS)
        write_csv(rows.assign(**self.run), self.path)


def _check_choice(option: str, given: str, allowed: Sequence[str]) -> None:
    if given not in allowed:
        raise HistotransferError(f"{option} {given}: use one of {', '.join(allowed)}.")


def _load_all(
    run_dir: Path, slide_ids: Sequence[str], features_dir: Path | None, attention_dir: Path | None, fingerprint: str
) -> dict[str, dict[str, Any] | Exception]:
    """Each slide's attention, or the error that stopped it (reported once, when the slide's turn comes)."""
    loaded: dict[str, dict[str, Any] | Exception] = {}
    for slide_id in slide_ids:
        try:
            loaded[slide_id] = slide_attention(run_dir, slide_id, features_dir, attention_dir, fingerprint)
        except Exception as exc:  # one broken slide must not stop the others
            loaded[slide_id] = exc
    return loaded


def write_heatmaps(
    run_dir: str | Path,
    slides: Sequence[str | Path],
    out_dir: str | Path,
    *,
    features_dir: str | Path | None = None,
    attention_dir: str | Path | None = None,
    patches_dir: str | Path | None = None,
    patch_size_level0: int | None = None,
    mpp: float | None = None,
    max_side: int = 2048,
    object_type: str = "detection",
    scale: str = "cohort",
    value: str = "score",
    cmap: str = "jet",
    annotations_dir: str | Path | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> list[Path]:
    """Write ``<slide_id>.png`` (attention over the thumbnail, with a legend strip) and ``<slide_id>.geojson``
    (patch squares in level-0 px with attention measurements) for each slide file (or folder of slides).

    The attention comes from ``attention_dir``, ``RUN/attention`` or ``RUN/evaluation/attention`` (what
    ``histotransfer evaluate`` wrote), or, with ``features_dir``, from new feature files through the run's
    model. ``value`` is ``score`` (raw pre-softmax) or ``weight`` (softmax weight times the slide's number of
    patches); ``scale="cohort"`` colours all slides of the call on one value range, ``"slide"`` each on its
    own. The patch side in level-0 px is ``patch_size_level0``, else what the attention, feature or patch file
    (``patches_dir/<slide_id>.h5``: ours, CLAM's or TRIDENT's) records. A slide that fails is reported in
    ``out_dir/heatmaps.csv`` and skipped.

    ``annotations_dir`` (``<slide_id>.geojson`` or a ``<slide_id>.png`` mask with its sidecar): each annotated
    slide's lesion is outlined, and the slides scored (:func:`scored_slide`) get their attention localisation
    (lesion patch: at least ``threshold`` of its area) in the legend and in ``out_dir/localisation.csv``.
    Returns the files written.
    """
    HeatmapSettings.build(max_side=max_side, patch_size_level0=patch_size_level0, mpp=mpp)
    _check_choice("--object-type", object_type, OBJECT_TYPES)
    _check_choice("--scale", scale, SCALES)
    _check_choice("--value", value, VALUES)
    run_dir, out_dir = model_run(run_dir), Path(out_dir)
    entries = [e for e in list_slides(slides) if e.duplicate_of is None]
    load_run_model(run_dir)  # fail early on a folder that is not a finished run
    fingerprint = run_fingerprint(run_dir)
    check_run_folder(out_dir, fingerprint, run_dir, REPORT_FILE, "heatmaps")
    annotation_paths: dict[str, Path] = {}
    labels: dict[str, int] = {}
    if annotations_dir is not None:
        check_threshold(threshold)
        annotation_paths = annotation_files(annotations_dir)
        splits = run_splits(run_dir)
        labels = dict(zip(splits["slide_id"], splits["label"].astype(int)))
    localised: list[dict[str, Any]] = []
    items = [(e.slide_id, str(e.path)) for e in entries]
    loaded = _load_all(
        run_dir,
        [sid for sid, _ in items],
        None if features_dir is None else Path(features_dir),
        None if attention_dir is None else Path(attention_dir),
        fingerprint,
    )
    values = {sid: heatmap_values(a["score"], a["weight"], value) for sid, a in loaded.items() if isinstance(a, dict)}
    cohort = value_range(list(values.values()))
    output_folder(out_dir)
    written: list[Path] = []

    def work(slide_id: str, slide_path: str) -> SlideResult:
        t0 = time.perf_counter()
        att = loaded[slide_id]
        if isinstance(att, Exception):
            raise att
        patch_file = None if patches_dir is None else Path(patches_dir) / f"{slide_id}.h5"
        with open_slide(slide_path, mpp=mpp) as slide:
            check_identity(slide, att["identity"], att["source"])
            size = patch_size_level0 or resolve_patch_side(att, slide.level_downsamples, patch_file)
            thumb, dimensions = slide.thumbnail(max_side), slide.dimensions
        vrange = cohort if scale == "cohort" else value_range([values[slide_id]])
        overlay = attention_overlay(thumb, dimensions, att["coords"], values[slide_id], size, vrange, cmap)
        lines = [
            f"{slide_id}: {len(att['score'])} patches",
            f"{VALUE_LABELS[value]}, {scale} scale {vrange[0]:.3g} to {vrange[1]:.3g}",
        ]
        if slide_id in annotation_paths:
            annotation = load_annotation(annotation_paths[slide_id])
            overlay = outline_lesion(overlay, annotation, dimensions)
            if scored_slide(slide_id, annotation, labels):
                scores = attention_localisation(att["score"], annotation.patch_overlap(att["coords"], size), threshold)
                localised.append({"slide_id": slide_id, **scores, "annotation": str(annotation.source)})
                lines.append(localisation_caption(scores))
        png, geo = out_dir / f"{slide_id}.png", out_dir / f"{slide_id}.geojson"
        write_png(heatmap_image(overlay, vrange, cmap, lines), png)
        collection = attention_geojson(att["coords"], att["score"], att["weight"], int(size), object_type)
        write_text(json.dumps(collection, separators=(",", ":")), geo)
        written.extend([png, geo])
        return SlideResult(slide_id, slide_path, "ok", len(att["score"]), time.perf_counter() - t0)

    run = {"run": str(run_dir.resolve()), "run_fingerprint": fingerprint}
    run_batch(items, work, RunReport(out_dir / REPORT_FILE, run), desc="heatmaps")
    if annotations_dir is not None:
        path = out_dir / LOCALISATION_FILE
        write_csv(localisation_frame(localised), path)
        written.append(path)
    return written
