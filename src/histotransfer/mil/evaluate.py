"""Apply a trained MIL run to (new) slides: predictions, attention, metrics when labels are given, and, with
lesion annotations, how well the attention localises the lesions of the positive slides."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .._io import file_sha256, output_folder, remove_stale_temps, write_csv, write_json
from .._read import read_csv
from ..annotations import Annotation
from ..errors import FormatError, HistotransferError
from .bags import load_bags, patch_size_level0
from .labels import feature_files, read_labels
from .localisation import (
    DEFAULT_THRESHOLD,
    attention_localisation,
    cohort_localisation,
    load_annotations,
)
from .metrics import slide_metrics
from .models import predict
from .rundir import (
    check_inputs,
    check_run_folder,
    fold_dirs,
    group_metrics,
    load_run_model,
    model_run,
    read_attention,
    read_checkpoint,
    read_config,
    run_fingerprint,
    write_attention,
)
from .shortcut import run_shortcut, slide_colour_stats_of
from .splits import SPLITS

POSITIVE = 1  # class index of the positive class in a run's label mapping
LOCALISATION_FILE = "localisation.csv"
EVALUATION_FILE = "evaluation.json"


def evaluate_run(
    run_dir: str | Path,
    features_dir: str | Path,
    labels_csv: str | Path | None = None,
    out_dir: str | Path | None = None,
    annotations_dir: str | Path | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    group_column: str | None = None,
) -> dict[str, Any]:
    """Predict every slide of ``features_dir`` (or, with ``labels_csv``, every labelled slide) with the run's
    model; write ``predictions.csv``, ``attention/<slide_id>.h5``, ``evaluation.json`` (what was evaluated,
    with the fingerprints of its inputs) and, with labels, ``metrics.json`` (``{"all": {...},
    "positive_class", "shortcut"}``) to ``out_dir`` (default ``RUN/evaluation``). With labels, the label
    file's further columns (e.g. centre) are kept in ``predictions.csv``, and ``shortcut`` says how well slide
    colour alone predicts these slides' labels (:func:`~histotransfer.mil.shortcut.run_shortcut`).

    With ``group_column`` (a column of the label file, e.g. centre; needs ``labels_csv``) ``metrics.json``
    also holds ``groups.all``: the metrics of each group and the mean within-group AUC, as ``train`` reports
    them per split, and the shortcut check adds the group-alone AUC.

    With ``annotations_dir`` (lesion annotations, see :func:`~histotransfer.mil.localisation.annotation_files`;
    needs ``labels_csv``) the attention of each positive slide that has an annotation is scored against it
    (:func:`~histotransfer.mil.localisation.attention_localisation`, lesion patch: at least ``threshold`` of
    its area is lesion): ``localisation.csv`` (one row per scored slide) and ``metrics.json["localisation"]``
    (:func:`localisation_summary`: cohort means and how many positive slides were scored).

    Features must come from the encoder the run was trained on, made with the same settings. Slides the run was
    trained on must have the very feature files it saw (else ProvenanceError). Every input is read and checked
    before anything is written. Returns ``{"out_dir", "predictions", "metrics", "positive_class",
    "localisation", "groups", "shortcut"}`` (localisation None without annotations, groups without
    ``group_column``, shortcut without labels).
    """
    run_dir = model_run(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "evaluation"
    if out_dir.exists() and not out_dir.is_dir():
        raise HistotransferError(f"--out {out_dir}: is an existing file, not a folder; choose a folder.")
    if group_column is not None and labels_csv is None:
        raise HistotransferError(
            f"--group-column {group_column}: groups are columns of the label file; pass --labels too."
        )
    if annotations_dir is not None:
        check_threshold(threshold)
        if labels_csv is None:
            raise HistotransferError(
                f"--annotations {annotations_dir}: localisation is scored on the positive "
                "slides, so it needs --labels; pass the label file of these slides."
            )
    config = read_config(run_dir)
    classes = read_checkpoint(run_dir)["classes"]
    model = load_run_model(run_dir)
    files = feature_files(features_dir)
    frame = None
    extra: list[str] = []
    if labels_csv is not None:
        table = read_labels(labels_csv, features_dir, classes=classes)
        frame, extra = table.frame, table.extra
        if group_column is not None and group_column not in extra:
            raise HistotransferError(
                f"{labels_csv}: has no column {group_column!r} for --group-column (its extra "
                f"columns: {', '.join(extra) or 'none'})."
            )
        files = {s: files[s] for s in frame["slide_id"]}
    bags, broken = load_bags(files, expect_dim=model.in_dim, expect_encoder=config["encoder"])
    if not bags.slide_ids:
        raise HistotransferError(f"{features_dir}: none of the feature files could be read; see the warnings.")
    check_inputs(config, dict(zip(bags.slide_ids, bags.fingerprints)), features_dir)
    positives: list[str] = []
    annotations: dict[str, Annotation] = {}
    if annotations_dir is not None and frame is not None:
        positives, annotations = _positive_annotations(annotations_dir, frame, bags, features_dir)
    probs, scores = predict(model, bags.features)
    if not np.isfinite(probs).all():
        bad = bags.slide_ids[int(np.argmax(~np.isfinite(probs).all(axis=1)))]
        raise HistotransferError(f"{run_dir}: the model gives no finite probability for slide {bad}; re-train it.")
    fingerprint = run_fingerprint(run_dir)
    check_run_folder(out_dir, fingerprint, run_dir, EVALUATION_FILE, "the evaluation")
    out_dir = output_folder(out_dir)
    remove_stale_temps(out_dir)
    for sid, coords, attrs, prob, score in zip(bags.slide_ids, bags.coords, bags.attrs, probs[:, 1], scores):
        write_attention(
            out_dir / "attention" / f"{sid}.h5", sid, coords, score, prob, patch_size_level0(attrs), attrs, fingerprint
        )
    predictions = pd.DataFrame({"slide_id": bags.slide_ids, "probability": probs[:, 1]})
    metrics = None
    localisation = None
    groups = shortcut = None
    positive = config["positive_class"]
    (out_dir / LOCALISATION_FILE).unlink(missing_ok=True)  # a previous call's scores must not outlive it
    if annotations_dir is not None:
        rows = attention_localisation_rows(out_dir / "attention", positives, annotations, threshold)
        write_csv(localisation_frame(rows), out_dir / LOCALISATION_FILE)
        localisation = localisation_summary(rows, positives, threshold)
    if frame is not None:
        predictions = frame[["slide_id", "patient_id", "label", *extra]].merge(predictions, on="slide_id")
        seed = config["seed"]
        metrics = {
            "all": slide_metrics(predictions["label"], predictions["probability"], seed=seed),
            "positive_class": positive,
        }
        if group_column is not None:
            groups = group_metrics(predictions, group_column, seed)
            metrics["groups"] = {"all": groups}
        shortcut = run_shortcut(
            predictions,
            slide_colour_stats_of(dict(zip(bags.slide_ids, bags.attrs))),
            metrics["all"]["auc"],
            group_column,
            seed,
        )
        metrics["shortcut"] = shortcut
        if localisation is not None:
            metrics["localisation"] = localisation
        write_json(metrics, out_dir / "metrics.json")
    predictions["predicted"] = [classes[int(p > 0.5)] for p in predictions["probability"]]
    write_csv(predictions, out_dir / "predictions.csv")
    if broken:
        write_csv(
            pd.DataFrame({"slide_id": list(broken), "message": list(broken.values())}), out_dir / "unreadable.csv"
        )
    write_json(
        {
            "run": str(run_dir.resolve()),
            "run_fingerprint": fingerprint,
            "features_dir": str(Path(features_dir).resolve()),
            "labels": None if labels_csv is None else str(Path(labels_csv).resolve()),
            "labels_sha256": None if labels_csv is None else file_sha256(labels_csv),
            "features": dict(zip(bags.slide_ids, bags.fingerprints)),
            "positive_class": positive,
        },
        out_dir / EVALUATION_FILE,
    )
    return {
        "out_dir": out_dir,
        "predictions": predictions,
        "positive_class": positive,
        "metrics": None if metrics is None else metrics["all"],
        "localisation": localisation,
        "groups": groups,
        "shortcut": shortcut,
    }


def _positive_annotations(
    annotations_dir: str | Path, frame: pd.DataFrame, bags: Any, features_dir: str | Path
) -> tuple[list[str], dict[str, Annotation]]:
    """The positive slides among ``bags`` and the annotations of those that have one, checked to be scorable
    (their feature files record the patch side) before anything is written."""
    positives = [s for s in frame.loc[frame["label"] == POSITIVE, "slide_id"] if s in set(bags.slide_ids)]
    annotations = load_annotations(annotations_dir, positives)
    sizes = dict(zip(bags.slide_ids, (patch_size_level0(a) for a in bags.attrs)))
    unsized = [s for s in annotations if sizes[s] is None]
    if unsized:
        raise HistotransferError(
            f"{features_dir}: the feature files of {', '.join(unsized[:5])} record no patch side "
            "(patch_size_level0), so their patches cannot be laid on the annotations; extract "
            "them with histotransfer."
        )
    return positives, annotations


def check_threshold(threshold: float) -> None:
    """Refuse a lesion-patch threshold outside (0, 1]."""
    if not 0 < threshold <= 1:
        raise HistotransferError(
            f"lesion threshold {threshold}: pass the lesion fraction of a patch's area that "
            "makes it a lesion patch, in (0, 1] (default 0.5)."
        )


def attention_file_localisation(
    path: str | Path, annotation: Annotation, threshold: float = DEFAULT_THRESHOLD
) -> dict[str, Any]:
    """:func:`~histotransfer.mil.localisation.attention_localisation` of a stored attention file: its raw
    scores against the lesion fraction of its patches (squares of the recorded ``patch_size_level0``)."""
    att = read_attention(path)
    size = att["attrs"].get("patch_size_level0")
    if size is None:
        raise FormatError(
            f"{path}: records no patch side (patch_size_level0), so its patches cannot be laid on "
            "the annotation; extract the features with histotransfer and re-run."
        )
    return attention_localisation(att["score"], annotation.patch_overlap(att["coords"], float(size)), threshold)


def attention_localisation_rows(
    attention_dir: Path,
    slide_ids: Sequence[str],
    annotations: Mapping[str, Annotation],
    threshold: float = DEFAULT_THRESHOLD,
) -> list[dict[str, Any]]:
    """One localisation row (``slide_id``, the scores, ``annotation``: its file) per slide of ``slide_ids`` that
    has an annotation, from ``attention_dir/<slide_id>.h5``."""
    return [
        {
            "slide_id": s,
            **attention_file_localisation(attention_dir / f"{s}.h5", annotations[s], threshold),
            "annotation": str(annotations[s].source),
        }
        for s in slide_ids
        if s in annotations
    ]


LOCALISATION_COLUMNS = [
    "slide_id",
    "top_patch_overlap",
    "mean_overlap",
    "attention_overlap",
    "top_patch_touches",
    "touching_share",
    "auc_touching",
    "top_patch_hit",
    "attention_mass",
    "lesion_patch_share",
    "auc",
    "n_patches",
    "n_touching",
    "n_lesion_patches",
    "annotation",
]


def localisation_frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Localisation rows as the table ``localisation.csv`` holds (its columns even when no slide is scored)."""
    columns = LOCALISATION_COLUMNS + [k for r in rows for k in r if k not in LOCALISATION_COLUMNS]
    return pd.DataFrame(list(rows), columns=list(dict.fromkeys(columns)))


def localisation_summary(
    rows: Sequence[Mapping[str, Any]], positives: Sequence[str], threshold: float = DEFAULT_THRESHOLD
) -> dict[str, Any]:
    """The cohort view of per-slide localisation ``rows`` of some ``positives``: ``cohort`` (each numeric key's
    ``{"mean", "n"}`` over the scored slides), ``n_positive``, ``n_scored``, ``unannotated`` (positive slides
    not scored: no annotation), the lesion-patch ``threshold`` and ``n_with_lesion_patch`` (scored slides with
    at least one patch at the threshold: the others' lesion-patch scores are 0 whatever the attention)."""
    scored = {r["slide_id"] for r in rows}
    return {
        "n_positive": len(positives),
        "n_scored": len(scored),
        "unannotated": sorted(set(positives) - scored),
        "threshold": threshold,
        "n_with_lesion_patch": sum(int(r["n_lesion_patches"]) > 0 for r in rows),
        "cohort": cohort_localisation(rows),
    }


def run_splits(run_dir: str | Path) -> pd.DataFrame:
    """A run folder's ``splits.csv`` (slide_id, label as class index, split), slide ids as text."""
    path = Path(run_dir) / "splits.csv"
    if not path.is_file():
        raise HistotransferError(
            f"{path}: not found; pass a run folder written by `histotransfer train` or "
            "`finetune` (for cross-validation, one of its fold_<k> folders)."
        )
    splits = read_csv(path, missing=False)
    missing = {"slide_id", "label", "split"} - set(splits.columns)
    if missing:
        raise FormatError(
            f"{path}: missing column(s) {', '.join(sorted(missing))}; for cross-validation pass one "
            "of the run's fold_<k> folders."
        )
    return splits


def localisation_of_run(
    run_dir: str | Path, annotations_dir: str | Path, split: str | None = "test", threshold: float = DEFAULT_THRESHOLD
) -> dict[str, Any]:
    """How well a run's attention (``RUN/attention``) localises the lesions of its positive slides.

    Scores each positive slide of ``split`` (default ``test``: the slides the model never fitted; None: every
    split) that has an annotation in ``annotations_dir``. Returns :func:`localisation_summary` plus ``run``,
    ``split`` (``"all"`` for None) and ``slides``: the per-slide rows (``slide_id``, ``split``, the scores of
    :func:`~histotransfer.mil.localisation.attention_localisation`, ``annotation``).

    A cross-validation run is scored out of fold: each slide by the attention of the fold that tested it, so every
    positive slide counts once (``split`` must then be ``test``).
    """
    run_dir = Path(run_dir)
    check_threshold(threshold)
    if split is not None and split not in SPLITS:
        raise HistotransferError(f"split {split!r}: use one of {', '.join(SPLITS)}, or None for every split.")
    folds = fold_dirs(run_dir)
    if folds and split != "test":
        raise HistotransferError(
            f"{run_dir}: a cross-validation run is scored on its test folds only; pass "
            "split='test', or one of its fold_<k> folders."
        )
    rows: list[dict[str, Any]] = []
    positives: list[str] = []
    for source in folds or [run_dir]:
        splits = run_splits(source)
        chosen = splits if split is None else splits[splits["split"] == split]
        ids = sorted(chosen.loc[chosen["label"].astype(int) == POSITIVE, "slide_id"])
        split_of = dict(zip(splits["slide_id"], splits["split"]))
        annotations = load_annotations(annotations_dir, ids)
        rows += [
            {"slide_id": r["slide_id"], "split": split_of[r["slide_id"]], **r}
            for r in attention_localisation_rows(source / "attention", ids, annotations, threshold)
        ]
        positives += ids
    rows.sort(key=lambda r: r["slide_id"])
    return {
        "run": str(run_dir.resolve()),
        "split": split or "all",
        **localisation_summary(rows, sorted(positives), threshold),
        "slides": rows,
    }


def describe_scored(summary: Mapping[str, Any], measures: Callable[[Callable[[str], str]], str]) -> str:
    """A localisation summary (attention's or Grad-CAM's) in one line: how many positive slides were scored,
    then ``measures(mean)``, where ``mean(key)`` formats the cohort mean of ``key``."""
    cohort = summary["cohort"]
    missing = summary["unannotated"]
    head = f"scored {summary['n_scored']} of {summary['n_positive']} positive slide(s)" + (
        f" ({len(missing)} without annotation: {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})"
        if missing
        else ""
    )
    if not summary["n_scored"]:
        return head

    def mean(key: str) -> str:
        value = (cohort.get(key) or {}).get("mean")
        return "n/a" if value is None else f"{value:.3f}"

    return f"{head}: {measures(mean)}"


def describe_localisation(summary: Mapping[str, Any]) -> str:
    """An attention localisation summary in one line (:func:`describe_scored`), each score beside its chance
    level: first by lesion share, then by lesion patch (with how many slides have one)."""
    with_patch = summary.get("n_with_lesion_patch")
    return describe_scored(
        summary,
        lambda mean: (
            f"top patch touches the lesion {mean('top_patch_touches')} (random patch {mean('touching_share')}), "
            f"its lesion share {mean('top_patch_overlap')} (random patch {mean('mean_overlap')}), attention-weighted "
            f"lesion share {mean('attention_overlap')} (uniform {mean('mean_overlap')}), patch AUC touching vs not "
            f"{mean('auc_touching')} (chance 0.5); lesion patches (>= {summary.get('threshold', DEFAULT_THRESHOLD):g} "
            f"lesion{'' if with_patch is None else f', on {with_patch} slide(s)'}): top patch on one "
            f"{mean('top_patch_hit')} (random patch {mean('lesion_patch_share')}), attention mass on them "
            f"{mean('attention_mass')} (uniform {mean('lesion_patch_share')}), patch AUC {mean('auc')}"
        ),
    )


def describe_slide_localisation(scores: Mapping[str, Any]) -> str:
    """One slide's attention localisation (:func:`~histotransfer.mil.localisation.attention_localisation`) in
    one short line, to follow ``lesion:``; each score beside its chance level."""

    def num(key: str) -> str:
        value = scores.get(key)
        return "n/a" if value is None or pd.isna(value) else f"{float(value):.3f}"

    return (
        f"top patch {'on' if scores['top_patch_touches'] else 'off'} it (random {num('touching_share')}), "
        f"its share {num('top_patch_overlap')} (random {num('mean_overlap')}), attention-weighted share "
        f"{num('attention_overlap')}, patch AUC {num('auc_touching')}"
    )
