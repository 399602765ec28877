"""``histotransfer cam``: Grad-CAM inside the patches a MIL run attends to most, slide by slide, and how well
the maps point at annotated lesions.

For each slide of a run (its ``RUN/attention`` files), the ``top_k`` patches with the highest raw attention
score are read from the slide file, once the file is checked to be the slide the run's patches were cut from,
and passed through the run's encoder (the frozen one of a ``train`` run, the fine-tuned one of a ``finetune``
run). :func:`~histotransfer.analysis.cam.grad_cam` differentiates the slide's ``target_class`` logit of the
run's own head (its standardisation included) over all the slide's patches, the others entering as their stored
feature rows. That is the function the run computes only when the encoder reproduces the stored rows of the
top-k patches: their largest difference, relative to the rows' largest magnitude, must stay within float
rounding (:data:`~.cam_slide.REPRODUCE_TOLERANCE`), or the command stops.

Resolution: a CAM is the last kept stage's (h, w) grid laid evenly over the patch, so one cell is the patch side
in microns divided by w (a 256 px patch at 20x is 128 um; ResNet18 up to layer2 at 64 px input gives 8 x 8
cells of 16 um).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .._io import h5_files, output_folder, remove_stale_temps, write_csv, write_json
from .._read import read_csv
from ..annotations import Annotation, load_annotation
from ..batch import REPORT_COLUMNS, BatchReport, SlideResult, error_result, summarize
from ..errors import HistotransferError
from ..mil import annotation_files, cam_localisation, cohort_localisation, describe_scored, model_run, read_attention
from ..provenance import json_fingerprint
from ..slide import slide_index
from .cam import POSITIVE_CLASS
from .cam_figures import figure_lines, localisation_caption, write_figures
from .cam_file import CAM_FORMAT, cam_file_done, read_cam_file, write_cam_file
from .cam_slide import EncoderMismatch, LoadedRun, load_run, slide_cam
from .settings import CamSettings

SUMMARY_FILE = "cam.json"

REPORT_FILE = "cams.csv"

CAM_COLUMNS = [
    "split",
    "label",
    "stage",
    "grid",
    "um_per_cell",
    "logit",
    "feature_gap",
    "annotated",
    "pointing_game",
    "pointing_chance",
    "n_pointing",
    "cam_mass",
    "lesion_area_share",
]

DONE_MESSAGE = "done before with the same settings and run"


@dataclass
class CamRun:
    """What :func:`write_cams` did: the output folder, one result per slide and the ``cam.json`` contents."""

    folder: Path
    results: list[SlideResult]
    summary: dict[str, Any]


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
            self.extra = {
                str(r["slide_id"]): {c: None if pd.isna(r[c]) else r[c] for c in columns}
                for r in table.to_dict("records")
            }
        return rows

    def update_with(self, result: SlideResult, extra: dict[str, Any]) -> None:
        self.extra[result.slide_id] = extra
        self.update(result)

    def _write(self) -> None:
        rows = [
            {**asdict(r), **{c: self.extra.get(r.slide_id, {}).get(c) for c in CAM_COLUMNS}} for r in self.rows.values()
        ]
        write_csv(pd.DataFrame(rows, columns=REPORT_COLUMNS + CAM_COLUMNS), self.path)


def _slide_ids(run_dir: Path, slide_ids: Sequence[str] | None) -> list[str]:
    """The run's slides (its attention files), or those of ``slide_ids``, each checked to be one of them."""
    have = [p.stem for p in h5_files(run_dir / "attention")] if (run_dir / "attention").is_dir() else []
    if not have:
        raise HistotransferError(f"{run_dir / 'attention'}: holds no attention files; pass a finished run folder.")
    if slide_ids is None:
        return have
    unknown = [s for s in slide_ids if s not in have]
    if unknown:
        raise HistotransferError(
            f"--slide-ids: {', '.join(unknown[:5])} not among the run's slides "
            f"({', '.join(have[:5])}{', ...' if len(have) > 5 else ''})."
        )
    return list(dict.fromkeys(slide_ids))


def _recorded_slide_path(run_dir: Path, slide_id: str, index: dict[str, Path] | None) -> str:
    """The slide file of a slide as far as the run's attention file says (for the report; "" if unknown)."""
    if index is not None and slide_id in index:
        return str(index[slide_id])
    try:
        return str(read_attention(run_dir / "attention" / f"{slide_id}.h5")["attrs"].get("slide_path", ""))
    except HistotransferError:
        return ""


def _guard(out: Path, run: LoadedRun, s: CamSettings) -> None:
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
        raise HistotransferError(
            f"{out}: holds CAMs made differently (differs in: {'; '.join(diffs)}); choose "
            "another --out or delete that folder."
        )


def _cam_fingerprint(run: LoadedRun, s: CamSettings, slide_id: str) -> str:
    """What a slide's CAM file must record to be reused: the settings, the run and the slide's features."""
    features = ((run.config.get("inputs") or {}).get("features") or {}).get(slide_id)
    return json_fingerprint({"settings": s.result_settings(), "run": run.fingerprint, "features": features})


def _localise(
    run: LoadedRun, slide_id: str, maps: np.ndarray, coords: np.ndarray, side: float, annotation: Annotation | None
) -> dict[str, Any] | None:
    """CAM localisation of a positive annotated slide (None for the others: not scored)."""
    if annotation is None or run.labels.get(slide_id) != POSITIVE_CLASS:
        return None
    return cam_localisation(maps, coords, side, annotation)


def _extra(
    run: LoadedRun, slide_id: str, cam: dict[str, Any], scores: dict[str, Any] | None, annotated: bool
) -> dict[str, Any]:
    """A slide's CAM columns of ``cams.csv``."""
    attrs = cam["attrs"]
    grid = [int(v) for v in np.asarray(attrs["grid"]).reshape(-1)]
    return {
        "split": run.splits.get(slide_id),
        "label": run.labels.get(slide_id),
        "stage": attrs["stage"],
        "grid": f"{grid[0]}x{grid[1]}",
        "um_per_cell": attrs.get("um_per_cell"),
        "logit": attrs["logit"],
        "feature_gap": attrs["feature_gap"],
        "annotated": annotated,
        **{
            k: (scores or {}).get(k)
            for k in ("pointing_game", "pointing_chance", "n_pointing", "cam_mass", "lesion_area_share")
        },
    }


def _slide_work(
    run: LoadedRun,
    s: CamSettings,
    out: Path,
    slide_id: str,
    index: dict[str, Path] | None,
    annotation_paths: dict[str, Path],
) -> tuple[SlideResult, dict[str, Any], dict[str, Any] | None]:
    """Compute (or reuse) one slide's CAMs; its report row, its CAM columns and its localisation scores."""
    t0 = time.perf_counter()
    path = out / f"{slide_id}.h5"
    fingerprint = _cam_fingerprint(run, s, slide_id)
    annotation = load_annotation(annotation_paths[slide_id]) if slide_id in annotation_paths else None
    status, message = "skipped", DONE_MESSAGE
    if not cam_file_done(path, fingerprint):
        result, record, thumb = slide_cam(run, s, slide_id, index)
        lines = figure_lines(record, len(result.maps))
        scores = _localise(run, slide_id, result.maps, record["coords"], record["patch_size_level0"], annotation)
        if scores is not None:
            lines.append(localisation_caption(scores))
        write_figures(out, slide_id, result, record, thumb, lines, annotation)
        write_cam_file(path, result, record, fingerprint)
        status, message = "ok", ""
    cam = read_cam_file(path)
    scores = _localise(run, slide_id, cam["cam"], cam["coords"], float(cam["attrs"]["patch_size_level0"]), annotation)
    slide_path = _recorded_slide_path(run.run_dir, slide_id, index)
    row = SlideResult(slide_id, slide_path, status, len(cam["cam"]), round(time.perf_counter() - t0, 3), message)
    return row, _extra(run, slide_id, cam, scores, annotation is not None), scores


def _run_slides(
    run: LoadedRun,
    s: CamSettings,
    out: Path,
    slide_ids: list[str],
    index: dict[str, Path] | None,
    annotation_paths: dict[str, Path],
    report: _CamReport,
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
    return {
        "stage": first["stage"],
        "grid": [int(v) for v in np.asarray(first["grid"]).reshape(-1)],
        "input_size": int(first["input_size"]),
        "patch_size_level0": int(first["patch_size_level0"]),
        "um_per_cell": float(np.median(um)) if um else None,
        "um_per_cell_range": [min(um), max(um)] if um else None,
    }


def cam_localisation_summary(scored: dict[str, dict[str, Any]], positives: Sequence[str]) -> dict[str, Any]:
    """Cohort view of per-slide CAM localisation: ``n_positive`` (positive slides with CAMs), ``n_scored``,
    ``unannotated`` (positive slides without annotation, not scored) and ``cohort`` (each score's
    ``{"mean", "n"}`` over the scored slides, e.g. ``pointing_game``, ``cam_mass``, ``lesion_area_share``)."""
    return {
        "n_positive": len(positives),
        "n_scored": len(scored),
        "unannotated": sorted(set(positives) - set(scored)),
        "cohort": cohort_localisation([{"slide_id": k, **v} for k, v in sorted(scored.items())]),
    }


def write_cams(
    run_dir: str | Path,
    out_dir: str | Path,
    settings: CamSettings | None = None,
    slides: Any = None,
    annotations_dir: str | Path | None = None,
    slide_ids: Sequence[str] | None = None,
    **overrides: Any,
) -> CamRun:
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
    run = load_run(run_dir, s)
    ids = _slide_ids(run_dir, slide_ids)
    index = slide_index(slides)
    annotation_paths = annotation_files(annotations_dir) if annotations_dir is not None else {}
    out = Path(out_dir)
    _guard(out, run, s)
    out = output_folder(out)
    remove_stale_temps(out)
    claim = {
        "format": CAM_FORMAT[0],
        "format_version": CAM_FORMAT[1],
        "run": str(run_dir.resolve()),
        "run_fingerprint": run.fingerprint,
        "run_kind": run.config.get("kind", "train"),
        "encoder": run.config.get("encoder"),
        "settings": s.record(),
        "target_class_name": run.classes[s.target_class],
    }
    write_json(claim, out / SUMMARY_FILE)
    t0 = time.perf_counter()
    results, scored = _run_slides(run, s, out, ids, index, annotation_paths, _CamReport(out / REPORT_FILE))
    done = [r.slide_id for r in results if r.status in ("ok", "skipped")]
    positives = [sid for sid in done if run.labels.get(sid) == POSITIVE_CLASS]
    summary = {
        **claim,
        "resolution": _resolution(out, results),
        "seconds": round(time.perf_counter() - t0, 3),
        "slides": {r.slide_id: r.status for r in results},
        "annotations": None if annotations_dir is None else str(Path(annotations_dir).resolve()),
        "localisation": None if annotations_dir is None else cam_localisation_summary(scored, positives),
    }
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
    return (
        f"Grad-CAM of the {summary['target_class_name']!r} logit at {res['stage']}: {h}x{w} cells per patch "
        f"({res['input_size']} px input) = {size}"
    )


def describe_cam_localisation(summary: dict[str, Any]) -> str:
    """A CAM localisation summary in one line: how many positive slides were scored, then the cohort means."""
    return describe_scored(
        summary,
        lambda mean: (
            f"pointing game {mean('pointing_game')} (random cell {mean('pointing_chance')}), CAM mass on lesion "
            f"{mean('cam_mass')} "
            f"(uniform {mean('lesion_area_share')})"
        ),
    )


def cam_summary_text(run: CamRun) -> str:
    """What the command prints: resolution, the batch summary and, with annotations, the localisation."""
    lines = [describe_resolution(run.summary), summarize(run.results, "cam", run.summary["seconds"], run.folder)]
    if run.summary.get("localisation") is not None:
        lines.append(f"CAM localisation: {describe_cam_localisation(run.summary['localisation'])}")
    return "\n".join(lines)
