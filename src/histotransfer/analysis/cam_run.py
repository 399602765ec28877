"""``histotransfer cam``: Grad-CAM inside the patches a MIL run attends to most, slide by slide, and how well
the maps point at annotated lesions.

For each slide of a run (its ``RUN/attention`` files), the ``top_k`` patches with the highest raw attention
score are read from the slide file, once the file is checked to be the slide the run's patches were cut from,
and passed through the run's encoder (the frozen one of a ``train`` run, the fine-tuned one of a ``finetune``
run). :func:`~histotransfer.analysis.cam.grad_cam` differentiates the slide's ``target_class`` logit of the
run's own head (its standardisation included) over all the slide's patches, the others entering as their stored
feature rows. That is the function the run computes only when the encoder reproduces the stored rows of the
top-k patches: their largest difference, relative to the rows' largest magnitude, must stay within float
rounding (:data:`REPRODUCE_TOLERANCE`), or the command stops.

Resolution: a CAM is the last kept stage's (h, w) grid laid evenly over the patch, so one cell is the patch side
in microns divided by w (a 256 px patch at 20x is 128 um; ResNet18 up to layer2 at 64 px input gives 8 x 8
cells of 16 um).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import h5py
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .._io import (
    atomic_path,
    h5_files,
    output_folder,
    remove_stale_temps,
    write_csv,
    write_json,
    write_png,
)
from .._read import read_csv
from ..annotations import Annotation, load_annotation
from ..batch import REPORT_COLUMNS, BatchReport, SlideResult, error_result, summarize
from ..encoders import Encoder, Preprocessing, encoder_spec
from ..errors import HistotransferError, ProvenanceError
from ..features import FeatureBag, normalise_pixels, prepare_patch, read_feature_file
from ..finetune import run_encoder
from ..formats import open_h5, stamp
from ..mil import (
    AttentionMIL,
    annotation_files,
    attention_overlay,
    cam_localisation,
    cell_squares,
    check_inputs,
    cohort_localisation,
    describe_scored,
    heatmap_image,
    load_run_model,
    model_run,
    outline_lesion,
    read_attention,
    read_checkpoint,
    read_config,
    run_fingerprint,
    run_splits,
)
from ..patches import PatchReader, PatchSet, read_patch_file
from ..provenance import canonical_json, json_fingerprint
from ..runtime import resolve_device
from ..slide import check_identity, locate_slide, open_slide, parse_identity, slide_index
from ..stain import StainNormalizer, recorded_normalizer, recorded_source
from .cam import POSITIVE_CLASS, CamResult, grad_cam
from .settings import CamSettings

CAM_FORMAT = ("histotransfer.cam", 1)
SUMMARY_FILE = "cam.json"
REPORT_FILE = "cams.csv"
# Largest relative difference tolerated between the run's stored features of the top-k patches and the
# encoder's for the same pixels, by the precision the features were extracted at: float32 extraction (BatchNorm
# folded, IEEE float32 on GPUs too) agrees to about 1e-6; other weights, pixels or input sizes differ by order 1.
REPRODUCE_TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2, "fp16": 5e-2}
HALF_STORAGE_TOLERANCE = 5e-2  # features stored as float16
FIGURE_TILE = 160  # approximate side in pixels of each patch in <slide_id>_cam.png
FIGURE_COLUMNS = 4
CMAP = "jet"
CAM_COLUMNS = ["split", "label", "stage", "grid", "um_per_cell", "logit", "feature_gap", "annotated",
               "pointing_game", "pointing_chance", "n_pointing", "cam_mass", "lesion_area_share"]
DONE_MESSAGE = "done before with the same settings and run"


class EncoderMismatch(HistotransferError):
    """The encoder does not reproduce the run's stored features: its CAMs would explain another function."""


@dataclass
class CamRun:
    """What :func:`write_cams` did: the output folder, one result per slide and the ``cam.json`` contents."""

    folder: Path
    results: list[SlideResult]
    summary: dict[str, Any]


@dataclass
class _Run:
    """What every slide needs from the run folder."""

    run_dir: Path
    config: dict[str, Any]
    encoder: Encoder
    head: AttentionMIL
    classes: list[str]
    device: torch.device
    fingerprint: str
    labels: dict[str, int]
    splits: dict[str, str]
    stain: StainNormalizer | None = None  # the stain normalisation the run's features were made with

    @property
    def features_dir(self) -> Path:
        return Path(self.config["features_dir"])

    @property
    def input_size(self) -> int | None:
        size = (self.config.get("encoder") or {}).get("input_size")
        return None if size is None else int(size)


class _CamReport(BatchReport):
    """``cams.csv``: the batch report's columns, then each slide's CAM and localisation columns
    (:data:`CAM_COLUMNS`); rows of slides not visited by this call keep the values they had."""

    def __init__(self, path: Path):
        self.extra: dict[str, dict[str, Any]] = {}
        super().__init__(path)

    def _read(self) -> dict[str, SlideResult]:
        rows = super()._read()
        if self.path.exists():
            table = read_csv(self.path)
            columns = [c for c in CAM_COLUMNS if c in table.columns]
            self.extra = {str(r["slide_id"]): {c: None if pd.isna(r[c]) else r[c] for c in columns}
                          for r in table.to_dict("records")}
        return rows

    def update_with(self, result: SlideResult, extra: dict[str, Any]) -> None:
        self.extra[result.slide_id] = extra
        self.update(result)

    def _write(self) -> None:
        rows = [{**asdict(r), **{c: self.extra.get(r.slide_id, {}).get(c) for c in CAM_COLUMNS}}
                for r in self.rows.values()]
        write_csv(pd.DataFrame(rows, columns=REPORT_COLUMNS + CAM_COLUMNS), self.path)


def _load_run(run_dir: Path, s: CamSettings) -> _Run:
    """The run's config, encoder (checked against its recorded weights), head, labels and fingerprint."""
    config = read_config(run_dir)
    if not (run_dir / "metrics.json").is_file():
        raise HistotransferError(f"{run_dir}: not a finished run (no metrics.json); pass a folder `histotransfer "
                                 "train` or `finetune` completed.")
    head = load_run_model(run_dir)
    if s.target_class >= head.n_classes:
        raise HistotransferError(f"--target-class {s.target_class}: the run's model has {head.n_classes} classes; "
                                 f"pass 0..{head.n_classes - 1}.")
    encoder = run_encoder(run_dir).with_blocks((config.get("encoder") or {}).get("blocks"))
    if encoder_spec(encoder.name).pool is not None:
        raise HistotransferError(f"{run_dir}: its encoder {encoder.name} pools its last stage otherwise than by a "
                                 "global average (e.g. a class token); Grad-CAM here needs a CNN encoder.")
    splits = run_splits(run_dir)
    device = resolve_device(s.device)
    fingerprint = run_fingerprint(run_dir)
    return _Run(run_dir, config, encoder.to(device).eval(), head.to(device).eval(),
                list(read_checkpoint(run_dir)["classes"]), device, fingerprint,
                dict(zip(splits["slide_id"], splits["label"].astype(int))), dict(zip(splits["slide_id"],
                                                                                      splits["split"])),
                recorded_normalizer(config.get("encoder") or {}, run_dir / "config.json"))


def _slide_ids(run_dir: Path, slide_ids: Sequence[str] | None) -> list[str]:
    """The run's slides (its attention files), or those of ``slide_ids``, each checked to be one of them."""
    have = [p.stem for p in h5_files(run_dir / "attention")] if (run_dir / "attention").is_dir() else []
    if not have:
        raise HistotransferError(f"{run_dir / 'attention'}: holds no attention files; pass a finished run folder.")
    if slide_ids is None:
        return have
    unknown = [s for s in slide_ids if s not in have]
    if unknown:
        raise HistotransferError(f"--slide-ids: {', '.join(unknown[:5])} not among the run's slides "
                                 f"({', '.join(have[:5])}{', ...' if len(have) > 5 else ''}).")
    return list(dict.fromkeys(slide_ids))


def _recorded_slide_path(run_dir: Path, slide_id: str, index: dict[str, Path] | None) -> str:
    """The slide file of a slide as far as the run's attention file says (for the report; "" if unknown)."""
    if index is not None and slide_id in index:
        return str(index[slide_id])
    try:
        return str(read_attention(run_dir / "attention" / f"{slide_id}.h5")["attrs"].get("slide_path", ""))
    except HistotransferError:
        return ""


def _guard(out: Path, run: _Run, s: CamSettings) -> None:
    """Refuse an output folder that holds CAMs of another run or made with other settings."""
    path = out / SUMMARY_FILE
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except ValueError as exc:
        raise HistotransferError(f"{path}: not readable JSON ({exc}); delete it or choose another --out.") from None
    diffs = s.differences(old.get("settings") or {})
    if old.get("run_fingerprint") != run.fingerprint:
        diffs.insert(0, f"run ({old.get('run')} vs {run.run_dir.resolve()}, or its model or encoder changed)")
    if diffs:
        raise HistotransferError(f"{out}: holds CAMs made differently (differs in: {'; '.join(diffs)}); choose "
                                 "another --out or delete that folder.")


def _cam_fingerprint(run: _Run, s: CamSettings, slide_id: str) -> str:
    """What a slide's CAM file must record to be reused: the settings, the run and the slide's features."""
    features = ((run.config.get("inputs") or {}).get("features") or {}).get(slide_id)
    return json_fingerprint({"settings": s.result_settings(), "run": run.fingerprint, "features": features})


def _h5_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    return value.item() if isinstance(value, np.generic) else value


def read_cam_file(path: str | Path) -> dict[str, Any]:
    """A CAM file as ``{"cam", "raw", "coords", "rank", "row", "score", "attrs"}`` (attrs as plain values)."""
    keys = ("cam", "raw", "coords", "rank", "row", "score")
    with open_h5(path, CAM_FORMAT, keys, "re-run `histotransfer cam` for this slide") as f:
        out: dict[str, Any] = {k: f[k][()] for k in keys}
        out["attrs"] = {k: _h5_attr(v) for k, v in f.attrs.items()}
    return out


def _done(path: Path, fingerprint: str) -> bool:
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            return _h5_attr(f.attrs.get("cam_fingerprint")) == fingerprint
    except OSError:
        return False


def _tolerance(attrs: dict[str, Any]) -> float:
    tol = REPRODUCE_TOLERANCE.get(str(attrs.get("precision", "fp32")), HALF_STORAGE_TOLERANCE)
    return max(tol, HALF_STORAGE_TOLERANCE) if attrs.get("dtype") == "float16" else tol


@dataclass
class _SlideInputs:
    """One slide's checked inputs: its attention, its feature rows, its patch file and its slide file."""

    attention: dict[str, Any]
    bag: FeatureBag
    patches: PatchSet
    patch_file: str
    slide_path: Path


def _slide_inputs(run: _Run, slide_id: str, index: dict[str, Path] | None) -> _SlideInputs:
    """A slide's inputs, checked: the feature file is the one the run was trained on, its rows are the
    attention file's patches, and the patch file is the one the features were made from."""
    att = read_attention(run.run_dir / "attention" / f"{slide_id}.h5", run.fingerprint, own=True)
    feature_file = run.features_dir / f"{slide_id}.h5"
    bag = read_feature_file(feature_file)
    check_inputs(run.config, {slide_id: bag.fingerprint}, run.features_dir)
    if not np.array_equal(att["coords"], bag.coords):
        raise ProvenanceError(f"{feature_file}: its patches are not those of the run's attention file; re-train "
                              "the run.")
    patch_file = bag.attrs.get("patch_file")
    if not patch_file or not Path(patch_file).is_file():
        raise HistotransferError(f"{feature_file}: names patch file {patch_file!r}, which does not exist; keep the "
                                 "tiling output where extraction read it.")
    patches = read_patch_file(patch_file)
    if bag.attrs.get("patches_fingerprint") and bag.attrs["patches_fingerprint"] != patches.fingerprint:
        raise ProvenanceError(f"{patch_file}: the slide was re-tiled since its features were extracted; re-extract "
                              "and re-train before computing CAMs.")
    if patches.spec.patch_size_level0 is None:
        raise HistotransferError(f"{patch_file}: records no patch side in level-0 pixels; re-tile the slide.")
    slide_path = locate_slide(slide_id, bag.attrs.get("slide_path") or patches.spec.slide_path, index, feature_file)
    return _SlideInputs(att, bag, patches, str(patch_file), slide_path)


def _read_slide(inputs: _SlideInputs, rows: np.ndarray, prep: Preprocessing, max_side: int
                ) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """The patches of ``rows`` as the encoder takes them (uint8 (k, S, S, 3), resized and cropped as extraction
    prepares them: ``prepare_patch``; the feature-gap check confirms the pixels match), the slide's thumbnail
    and its level-0 dimensions, read only once the slide file is checked to be the slide tiled."""
    spec = inputs.patches.spec
    with open_slide(inputs.slide_path, mpp=spec.mpp) as slide:
        recorded = parse_identity(inputs.attention["attrs"].get("slide_identity")) or inputs.patches.identity
        check_identity(slide, recorded, inputs.patch_file)
        with PatchReader(slide, spec) as reader:
            pixels = np.stack([prepare_patch(reader.read(int(x), int(y)), prep)
                               for x, y in inputs.bag.coords[rows]])
        return pixels, slide.thumbnail(max_side), slide.dimensions


def _checked_gap(run: _Run, inputs: _SlideInputs, result: CamResult, rows: np.ndarray) -> float:
    """The feature gap relative to the stored rows' largest magnitude; an error beyond float rounding."""
    gap = (result.feature_gap or 0.0) / max(float(np.abs(inputs.bag.features[rows]).max()), 1e-6)
    if gap > _tolerance(inputs.bag.attrs):
        raise EncoderMismatch(
            f"{run.features_dir / (inputs.bag.slide_id + '.h5')}: the encoder ({run.encoder.name}, "
            f"{run.encoder.depth_tag}) does not reproduce the run's features of the same patches (relative "
            f"difference {gap:.3g}), so its CAMs would not explain the run's predictions; the weights, input size, "
            "stain normalisation or slides (--slides) differ from those the run used."
        )
    return gap


def _slide_cam(run: _Run, s: CamSettings, slide_id: str, index: dict[str, Path] | None
               ) -> tuple[CamResult, dict[str, Any], np.ndarray]:
    """Grad-CAM of one slide's top-k patches, the record written with it and the slide's thumbnail."""
    inputs = _slide_inputs(run, slide_id, index)
    att, bag, spec = inputs.attention, inputs.bag, inputs.patches.spec
    top = np.argsort(-att["score"], kind="stable")[: s.top_k]
    raw, thumb, dimensions = _read_slide(inputs, top, run.encoder.preprocessing.at(run.input_size), s.max_side)
    # A per-slide normalisation maps the patches with the slide's source estimate extraction recorded.
    source = (recorded_source(bag.attrs, run.features_dir / f"{slide_id}.h5")
              if run.stain is not None and run.stain.per_slide else None)
    normalised = normalise_pixels(torch.from_numpy(raw), run.stain, run.device, source)
    pixels = normalised.cpu().numpy()  # what the encoder sees, and the figure shows
    x = run.encoder.preprocess(normalised, run.device)
    result = grad_cam(run.encoder, run.head, x, slide_features=torch.from_numpy(bag.features).to(run.device),
                      rows=top, target_class=s.target_class, batch_size=s.batch_size)
    gap = _checked_gap(run, inputs, result, top)
    side = int(spec.patch_size_level0)
    record = {
        "slide_id": slide_id, "stage": result.stage, "grid": list(result.grid), "patch_size_level0": side,
        "mpp": spec.mpp, "um_per_cell": None if spec.mpp is None else side * float(spec.mpp) / result.grid[1],
        "input_size": int(pixels.shape[1]), "target_class": result.target_class,
        "target_class_name": run.classes[result.target_class], "logit": result.logit, "feature_gap": gap,
        "n_patches": len(bag.coords), "slide_identity": att["attrs"].get("slide_identity", ""),
        "features_fingerprint": bag.fingerprint, "run": str(run.run_dir.resolve()),
        "run_fingerprint": run.fingerprint, "settings": canonical_json(s.record()),
        "coords": bag.coords[top], "rows": top, "score": att["score"][top], "pixels": pixels,
        "dimensions": dimensions,
    }
    return result, record, thumb


def _write_cam_file(path: Path, result: CamResult, record: dict[str, Any], fingerprint: str) -> None:
    """``<slide_id>.h5``: the maps, their patches and how they were made (docs/formats.md)."""
    arrays = {"cam": result.maps, "raw": result.raw, "coords": np.asarray(record["coords"], np.int64),
              "rank": np.arange(1, len(result.maps) + 1, dtype=np.int64),
              "row": np.asarray(record["rows"], np.int64), "score": np.asarray(record["score"], np.float32)}
    skip = {"coords", "rows", "score", "pixels", "dimensions"}
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        stamp(f, CAM_FORMAT)
        for key, value in record.items():
            if key not in skip and value is not None:
                f.attrs[key] = value
        f.attrs["cam_fingerprint"] = fingerprint
        for key, value in arrays.items():
            f.create_dataset(key, data=value, track_times=False)


def _cell_layout(maps: np.ndarray, coords: np.ndarray, side: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Every CAM cell as a square: level-0 corners (B*h*w, 2), values and the cell side."""
    h, w = maps.shape[1:]
    corners = cell_squares(coords, side, (h, w)).reshape(-1, 2)
    return corners, maps.reshape(-1), side / w


def _cam_range(maps: np.ndarray) -> tuple[float, float]:
    return 0.0, float(maps.max()) if maps.size else 0.0


def _label_tile(tile: np.ndarray, text: str) -> np.ndarray:
    """``tile`` with a white caption strip above it."""
    strip = np.full((18, tile.shape[1], 3), 255, np.uint8)
    cv2.putText(strip, text, (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([strip, tile])


def cam_figure(pixels: np.ndarray, maps: np.ndarray, scores: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """The k patches (uint8 (k, S, S, 3)) with their CAM (k, h, w) painted over them on one colour range
    (0 to the largest cell of the k maps), ranked left to right, top to bottom, with the legend strip."""
    k, w = len(maps), maps.shape[2]
    tile = w * max(1, round(FIGURE_TILE / w))
    vrange = _cam_range(maps)
    tiles = []
    for i in range(k):
        image = cv2.resize(pixels[i], (tile, tile), interpolation=cv2.INTER_CUBIC)
        corners, values, cell = _cell_layout(maps[i:i + 1], np.zeros((1, 2)), float(tile))
        painted = attention_overlay(image, (tile, tile), corners, values, cell, vrange, CMAP)
        tiles.append(_label_tile(painted, f"#{i + 1} score {scores[i]:.3g}"))
    blank = np.full_like(tiles[0], 255)
    columns = min(k, FIGURE_COLUMNS)
    tiles += [blank] * (-len(tiles) % columns)
    rows = [np.hstack(tiles[r:r + columns]) for r in range(0, len(tiles), columns)]
    return heatmap_image(np.vstack(rows), vrange, CMAP, lines)


def slide_figure(thumb: np.ndarray, dimensions: tuple[int, int], maps: np.ndarray, coords: np.ndarray,
                 side: float, lines: Sequence[str], annotation: Annotation | None = None) -> np.ndarray:
    """The slide thumbnail with every CAM cell painted at its level-0 place (colour range as
    :func:`cam_figure`), each top-k patch framed in white and the lesion, if annotated, outlined in black."""
    vrange = _cam_range(maps)
    corners, values, cell = _cell_layout(maps, coords, side)
    image = attention_overlay(thumb, dimensions, corners, values, cell, vrange, CMAP)
    sx, sy = image.shape[1] / dimensions[0], image.shape[0] / dimensions[1]
    for x, y in np.asarray(coords, np.float64):
        cv2.rectangle(image, (int(x * sx), int(y * sy)), (math.ceil((x + side) * sx), math.ceil((y + side) * sy)),
                      (255, 255, 255), 1)
    if annotation is not None:
        image = outline_lesion(image, annotation, dimensions)
    return heatmap_image(image, vrange, CMAP, lines)


def _figure_lines(record: dict[str, Any], k: int) -> list[str]:
    h, w = record["grid"]
    um = "n/a" if record["um_per_cell"] is None else f"{record['um_per_cell']:.3g} um"
    return [f"{record['slide_id']}: top {k} of {record['n_patches']} patches by attention",
            f"Grad-CAM of the {record['target_class_name']!r} logit at {record['stage']}: {h}x{w} cells of {um}"]


def _localise(run: _Run, slide_id: str, maps: np.ndarray, coords: np.ndarray, side: float,
              annotation: Annotation | None) -> dict[str, Any] | None:
    """CAM localisation of a positive annotated slide (None for the others: not scored)."""
    if annotation is None or run.labels.get(slide_id) != POSITIVE_CLASS:
        return None
    return cam_localisation(maps, coords, side, annotation)


def _localisation_caption(scores: dict[str, Any]) -> str:
    def num(key: str) -> str:
        return "n/a" if scores[key] is None else f"{scores[key]:.3f}"

    return (f"lesion: pointing game {num('pointing_game')} (random cell {num('pointing_chance')}) over "
            f"{scores['n_pointing']} patch(es), CAM mass {num('cam_mass')} (uniform {num('lesion_area_share')})")


def _extra(run: _Run, slide_id: str, cam: dict[str, Any], scores: dict[str, Any] | None,
           annotated: bool) -> dict[str, Any]:
    """A slide's CAM columns of ``cams.csv``."""
    attrs = cam["attrs"]
    grid = [int(v) for v in np.asarray(attrs["grid"]).reshape(-1)]
    return {"split": run.splits.get(slide_id), "label": run.labels.get(slide_id), "stage": attrs["stage"],
            "grid": f"{grid[0]}x{grid[1]}", "um_per_cell": attrs.get("um_per_cell"), "logit": attrs["logit"],
            "feature_gap": attrs["feature_gap"], "annotated": annotated,
            **{k: (scores or {}).get(k) for k in ("pointing_game", "pointing_chance", "n_pointing", "cam_mass",
                                                  "lesion_area_share")}}


def _slide_work(run: _Run, s: CamSettings, out: Path, slide_id: str, index: dict[str, Path] | None,
                annotation_paths: dict[str, Path]) -> tuple[SlideResult, dict[str, Any], dict[str, Any] | None]:
    """Compute (or reuse) one slide's CAMs; its report row, its CAM columns and its localisation scores."""
    t0 = time.perf_counter()
    path = out / f"{slide_id}.h5"
    fingerprint = _cam_fingerprint(run, s, slide_id)
    annotation = load_annotation(annotation_paths[slide_id]) if slide_id in annotation_paths else None
    status, message = "skipped", DONE_MESSAGE
    if not _done(path, fingerprint):
        result, record, thumb = _slide_cam(run, s, slide_id, index)
        lines = _figure_lines(record, len(result.maps))
        scores = _localise(run, slide_id, result.maps, record["coords"], record["patch_size_level0"], annotation)
        if scores is not None:
            lines.append(_localisation_caption(scores))
        _write_figures(out, slide_id, result, record, thumb, lines, annotation)
        _write_cam_file(path, result, record, fingerprint)
        status, message = "ok", ""
    cam = read_cam_file(path)
    scores = _localise(run, slide_id, cam["cam"], cam["coords"], float(cam["attrs"]["patch_size_level0"]),
                       annotation)
    slide_path = _recorded_slide_path(run.run_dir, slide_id, index)
    row = SlideResult(slide_id, slide_path, status, len(cam["cam"]), round(time.perf_counter() - t0, 3), message)
    return row, _extra(run, slide_id, cam, scores, annotation is not None), scores


def _write_figures(out: Path, slide_id: str, result: CamResult, record: dict[str, Any], thumb: np.ndarray,
                      lines: list[str], annotation: Annotation | None) -> None:
    """``<slide_id>_cam.png`` (the patches and their maps) and ``<slide_id>_slide.png`` (the cells over the
    thumbnail)."""
    write_png(cam_figure(record["pixels"], result.maps, record["score"], lines), out / f"{slide_id}_cam.png")
    write_png(slide_figure(thumb, record["dimensions"], result.maps, record["coords"],
                           float(record["patch_size_level0"]), lines, annotation), out / f"{slide_id}_slide.png")


def _run_slides(run: _Run, s: CamSettings, out: Path, slide_ids: list[str], index: dict[str, Path] | None,
                annotation_paths: dict[str, Path], report: _CamReport
                ) -> tuple[list[SlideResult], dict[str, dict[str, Any]]]:
    """Every slide in turn: a slide that fails is reported and skipped, except when the encoder does not
    reproduce the run's features (then no slide can be explained: the command stops)."""
    results, scored = [], {}
    for slide_id in tqdm(slide_ids, desc="cam", unit="slide", dynamic_ncols=True):
        t0 = time.perf_counter()
        extra: dict[str, Any] = {}
        try:
            result, extra, scores = _slide_work(run, s, out, slide_id, index, annotation_paths)
            if scores is not None:
                scored[slide_id] = scores
        except EncoderMismatch:
            raise
        except Exception as exc:  # one broken slide must not stop the others
            result = error_result(slide_id, _recorded_slide_path(run.run_dir, slide_id, index), exc, t0)
            tqdm.write(f"error: {result.message}")
        report.update_with(result, extra)
        results.append(result)
    return results, scored


def _resolution(out: Path, results: list[SlideResult]) -> dict[str, Any]:
    """Grid, stage and microns per CAM cell over the slides done (``um_per_cell``: their median, with the
    range when slides differ in resolution)."""
    attrs = [read_cam_file(out / f"{r.slide_id}.h5")["attrs"] for r in results if r.status in ("ok", "skipped")]
    if not attrs:
        return {}
    um = [float(a["um_per_cell"]) for a in attrs if a.get("um_per_cell") is not None]
    first = attrs[0]
    return {"stage": first["stage"], "grid": [int(v) for v in np.asarray(first["grid"]).reshape(-1)],
            "input_size": int(first["input_size"]), "patch_size_level0": int(first["patch_size_level0"]),
            "um_per_cell": float(np.median(um)) if um else None,
            "um_per_cell_range": [min(um), max(um)] if um else None}


def cam_localisation_summary(scored: dict[str, dict[str, Any]], positives: Sequence[str]) -> dict[str, Any]:
    """Cohort view of per-slide CAM localisation: ``n_positive`` (positive slides with CAMs), ``n_scored``,
    ``unannotated`` (positive slides without annotation, not scored) and ``cohort`` (each score's
    ``{"mean", "n"}`` over the scored slides, e.g. ``pointing_game``, ``cam_mass``, ``lesion_area_share``)."""
    return {"n_positive": len(positives), "n_scored": len(scored),
            "unannotated": sorted(set(positives) - set(scored)),
            "cohort": cohort_localisation([{"slide_id": k, **v} for k, v in sorted(scored.items())])}


def write_cams(run_dir: str | Path, out_dir: str | Path, settings: CamSettings | None = None,
               slides: Any = None, annotations_dir: str | Path | None = None,
               slide_ids: Sequence[str] | None = None, **overrides: Any) -> CamRun:
    """Grad-CAM of each slide's ``top_k`` most-attended patches for a ``train`` or ``finetune`` run.

    ``settings`` (or keyword overrides such as ``top_k=8, device="cpu"``) say how (:class:`CamSettings`);
    ``slides`` (a folder or files) where the slide files are if they moved; ``slide_ids`` limits the call to
    some of the run's slides. Writes, per slide, ``<slide_id>.h5`` (maps, patches and how they were made),
    ``<slide_id>_cam.png`` and ``<slide_id>_slide.png``; ``cams.csv`` (status and CAM columns per slide) and
    ``cam.json`` (settings, run, resolution and, with ``annotations_dir``, the CAM localisation of the positive
    annotated slides of this call: :func:`cam_localisation_summary`). Slides already done with the same
    settings and run are skipped; a folder holding CAMs of another run or settings is refused. Returns a
    :class:`CamRun`.
    """
    s = CamSettings.build(settings, **overrides)
    run_dir = Path(model_run(run_dir))
    run = _load_run(run_dir, s)
    ids = _slide_ids(run_dir, slide_ids)
    index = slide_index(slides)
    annotation_paths = annotation_files(annotations_dir) if annotations_dir is not None else {}
    out = Path(out_dir)
    _guard(out, run, s)
    out = output_folder(out)
    remove_stale_temps(out)
    claim = {"format": CAM_FORMAT[0], "format_version": CAM_FORMAT[1], "run": str(run_dir.resolve()),
             "run_fingerprint": run.fingerprint, "run_kind": run.config.get("kind", "train"),
             "encoder": run.config.get("encoder"), "settings": s.record(),
             "target_class_name": run.classes[s.target_class]}
    write_json(claim, out / SUMMARY_FILE)
    t0 = time.perf_counter()
    results, scored = _run_slides(run, s, out, ids, index, annotation_paths, _CamReport(out / REPORT_FILE))
    done = [r.slide_id for r in results if r.status in ("ok", "skipped")]
    positives = [sid for sid in done if run.labels.get(sid) == POSITIVE_CLASS]
    summary = {**claim, "resolution": _resolution(out, results), "seconds": round(time.perf_counter() - t0, 3),
               "slides": {r.slide_id: r.status for r in results},
               "annotations": None if annotations_dir is None else str(Path(annotations_dir).resolve()),
               "localisation": None if annotations_dir is None else cam_localisation_summary(scored, positives)}
    write_json(summary, out / SUMMARY_FILE)
    return CamRun(out, results, summary)


def describe_resolution(summary: dict[str, Any]) -> str:
    """The CAM resolution of a ``cam.json`` in one line."""
    res = summary.get("resolution") or {}
    if not res:
        return "no slide done"
    h, w = res["grid"]
    um = res["um_per_cell"]
    spread = res["um_per_cell_range"]
    if um is None:
        size = "microns unknown (the slides record no mpp)"
    elif spread[1] - spread[0] > 1e-6 * spread[1]:
        size = f"{um:.3g} um per cell (median; {spread[0]:.3g}-{spread[1]:.3g} across slides)"
    else:
        size = f"{um:.3g} um per cell"
    return (f"Grad-CAM of the {summary['target_class_name']!r} logit at {res['stage']}: {h}x{w} cells per patch "
            f"({res['input_size']} px input) = {size}")


def describe_cam_localisation(summary: dict[str, Any]) -> str:
    """A CAM localisation summary in one line: how many positive slides were scored, then the cohort means."""
    return describe_scored(summary, lambda mean: (
        f"pointing game {mean('pointing_game')} (random cell {mean('pointing_chance')}), CAM mass on lesion "
        f"{mean('cam_mass')} "
        f"(uniform {mean('lesion_area_share')})"))


def cam_summary_text(run: CamRun) -> str:
    """What the command prints: resolution, the batch summary and, with annotations, the localisation."""
    lines = [describe_resolution(run.summary), summarize(run.results, "cam", run.summary["seconds"], run.folder)]
    if run.summary.get("localisation") is not None:
        lines.append(f"CAM localisation: {describe_cam_localisation(run.summary['localisation'])}")
    return "\n".join(lines)
