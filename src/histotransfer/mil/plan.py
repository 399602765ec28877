"""Plan a MIL run before any work: validate labels and split, fingerprint the inputs, build ``config.json``, and
tell whether the run is already done.

Everything here reads small files only (label and split CSVs, feature-file attributes), without torch, so a
finished run is recognised instantly and a bad input is refused before anything is written.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import h5py
import pandas as pd

from .. import __version__
from .._io import file_sha256
from ..errors import HistotransferError, one_line
from ..features import encoder_attrs, read_feature_attrs, read_feature_file
from .labels import LabelTable, feature_files, read_labels
from .rundir import DONE_FILE, guard
from .settings import CV_BELOW_PATIENTS, DEFAULT_HIDDEN, STD_FLOOR_FRACTION, MilSettings
from .splits import DEFAULT_FRACTIONS, kfold_splits, random_split, read_split_file, rule_split
from .supervision import annotation_fingerprints, supervised_slides


@dataclass
class RunPlan:
    """A run (or k-fold set of runs) to train: its settings, inputs, splits and ``config.json``."""

    out_dir: Path
    settings: MilSettings
    table: LabelTable
    files: dict[str, Path]
    splits: list[pd.DataFrame]
    config: dict[str, Any]
    split_file: Path | None
    folds: int | None
    finished: bool = False
    annotations: dict[str, Path] = field(default_factory=dict)  # lesion annotations supervising the attention

    @property
    def run_dirs(self) -> list[Path]:
        if self.folds is None:
            return [self.out_dir]
        return [self.out_dir / f"fold_{k}" for k in range(self.folds)]

    def fold_config(self, k: int) -> dict[str, Any]:
        if self.folds is None:
            return self.config
        return {**self.config, "split": {**self.config["split"], "fold": k}}

    def without(self, broken: dict[str, str]) -> RunPlan:
        """The plan without slides whose feature file could not be read (recorded in the config)."""
        table = replace(
            self.table, frame=self.table.frame[~self.table.frame["slide_id"].isin(broken)].reset_index(drop=True)
        )
        if self.split_file is None:
            splits = make_splits(table, self.settings, None, self.folds)
        else:
            splits = [s[~s["slide_id"].isin(broken)].reset_index(drop=True) for s in self.splits]
            if splits[0].loc[splits[0]["split"] == "train", "label"].nunique() < 2:
                raise HistotransferError(
                    f"{self.split_file}: without the unreadable slide(s) {', '.join(broken)} the train split holds "
                    "one class; re-extract their features or change the split."
                )
        config = {**self.config, "unreadable_slides": {**self.config["unreadable_slides"], **broken}}
        config["inputs"] = {
            **config["inputs"],
            "features": {s: fp for s, fp in config["inputs"]["features"].items() if s not in broken},
        }
        if "annotations" in config["inputs"]:
            config["inputs"]["annotations"] = {
                s: fp for s, fp in config["inputs"]["annotations"].items() if s not in broken
            }
        return replace(
            self,
            table=table,
            splits=splits,
            config=config,
            files={s: p for s, p in self.files.items() if s not in broken},
            annotations={s: p for s, p in self.annotations.items() if s not in broken},
        )


def make_splits(
    table: LabelTable, settings: MilSettings, split_file: Path | None, folds: int | None
) -> list[pd.DataFrame]:
    """The run's split(s): the user's file, k folds, a named official split, or the seeded patient-level
    random split (stratified by group too with ``group_column``)."""
    seed, group = settings.seed, settings.group_column
    if split_file is not None:
        return [read_split_file(split_file, table.frame)]
    if folds is not None:
        return kfold_splits(table.frame, table.classes, folds, seed, group_column=group)
    if settings.split_rule is not None:
        return [rule_split(table.frame, table.classes, settings.split_rule, seed, group_column=group)]
    return [random_split(table.frame, table.classes, seed, group_column=group)]


def feature_fingerprint(path: Path) -> str | None:
    """A feature file's recorded fingerprint (computed from its arrays for files that record none); None when
    the file cannot be read (training reports it and goes on without it)."""
    return _fingerprint_or_reason(path)[0]


def _fingerprint_or_reason(path: Path) -> tuple[str | None, str]:
    """The feature file's fingerprint, or None and why the file cannot be read (naming it)."""
    try:
        with h5py.File(path, "r") as f:
            value = f.attrs.get("fingerprint")
        if value:
            return (value.decode() if isinstance(value, bytes) else str(value)), ""
        return read_feature_file(path).fingerprint, ""
    except (HistotransferError, OSError, KeyError, ValueError) as exc:
        reason = one_line(exc)
        return None, reason if str(path) in reason else f"{path}: {reason}"


def _loss(settings: MilSettings) -> str:
    """The training loss in words, for the config."""
    if settings.annotations is None:
        return "cross_entropy"
    return (
        f"cross_entropy + {settings.attention_weight:g} x binary cross-entropy of the attention scores against "
        "the patches touching the lesion (annotated positive training slides)"
    )


def _encoder_of(paths: list[Path]) -> dict[str, Any]:
    """Encoder attrs of the first readable feature file (unreadable ones are reported when loading)."""
    for path in paths:
        try:
            return encoder_attrs(read_feature_attrs(path))
        except (HistotransferError, OSError):
            continue
    raise HistotransferError(f"{paths[0].parent}: none of the labelled slides' feature files can be read.")


def _check_options(split_file: Path | None, folds: int | None, settings: MilSettings) -> None:
    explicit = "folds" in settings.model_fields_set
    cv = folds is not None or settings.protocol == "cv" or (settings.protocol == "auto" and explicit)
    given = [
        name
        for name, on in (
            ("--split-file", split_file is not None),
            ("cross-validation", cv),
            ("--split-rule", settings.split_rule is not None),
        )
        if on
    ]
    if len(given) > 1:
        raise HistotransferError(
            f"{' and '.join(given)} exclude each other; pass one (--protocol split keeps a single split)."
        )
    if folds is not None and folds < 2:
        raise HistotransferError(f"--folds {folds}: cross-validation needs at least 2 folds.")
    if settings.protocol == "split" and explicit:
        raise HistotransferError(
            f"--folds {settings.folds} with --protocol split: folds are for cross-validation; "
            "pass --protocol cv (or auto), or drop --folds."
        )


def choose_protocol(
    table: LabelTable, settings: MilSettings, split_file: Path | None, folds: int | None = None
) -> tuple[int | None, str]:
    """The number of cross-validation folds (None: one train/val/test split) and why, in words.

    ``cv`` (or ``folds`` given) always cross-validates with the folds asked for. ``auto`` cross-validates a cohort
    of fewer than ``CV_BELOW_PATIENTS`` patients with ``settings.folds`` folds, lowered to what the smaller class
    allows (k-fold needs k + 2 patients of each class); a split file or rule, or a class of fewer than 4
    patients, gives a single split."""
    if folds is not None:
        return folds, f"{folds} folds asked for"
    if settings.protocol == "cv":
        return settings.folds, f"--protocol cv, {settings.folds} folds"
    if settings.protocol == "split":
        return None, "--protocol split"
    if split_file is not None or settings.split_rule is not None:
        return None, "auto: the split is given (split file or rule)"
    if "folds" in settings.model_fields_set:
        return settings.folds, f"auto: --folds {settings.folds} given"
    frame = table.frame
    n_patients = int(frame["patient_id"].nunique())
    if n_patients >= CV_BELOW_PATIENTS:
        return None, f"auto: {n_patients} patients, at least {CV_BELOW_PATIENTS}"
    smaller = int(frame.groupby("label")["patient_id"].nunique().min())
    k = min(settings.folds, smaller - 2)
    if k < 2:
        return None, (
            f"auto: {n_patients} patients, fewer than {CV_BELOW_PATIENTS}, but the smaller class has "
            f"{smaller}; cross-validation needs 4"
        )
    lowered = f"; {k} folds, as the smaller class has {smaller} patients" if k < settings.folds else ""
    return k, f"auto: {n_patients} patients, fewer than {CV_BELOW_PATIENTS}{lowered}"


def plan_run(
    features_dir: str | Path,
    labels_csv: str | Path,
    out_dir: str | Path,
    settings: MilSettings,
    split_file: str | Path | None = None,
    folds: int | None = None,
) -> RunPlan:
    """Validate the inputs and build the run's config; ``finished`` when ``out_dir`` already holds this run.

    Whether the run is one split or k-fold cross-validation is :func:`choose_protocol`'s answer (recorded with
    its reason in the config's ``split``). Raises HistotransferError (before anything is written) for bad labels,
    a bad split, or an ``out_dir`` holding a run made with other settings or inputs (naming each field that
    differs).
    """
    split_path = Path(split_file) if split_file is not None else None
    _check_options(split_path, folds, settings)
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise HistotransferError(f"--out {out}: is an existing file, not a folder; choose a folder.")
    table = read_labels(labels_csv, features_dir)
    all_files = feature_files(features_dir)
    files = {s: all_files[s] for s in table.frame["slide_id"]}
    if settings.group_column is not None and settings.group_column not in table.extra:
        raise HistotransferError(
            f"{labels_csv}: has no column {settings.group_column!r} for --group-column "
            f"(its extra columns: {', '.join(table.extra) or 'none'})."
        )
    folds, why = choose_protocol(table, settings, split_path, folds)
    splits = make_splits(table, settings, split_path, folds)
    fingerprints = {sid: _fingerprint_or_reason(p) for sid, p in files.items()}
    annotations: dict[str, Path] = {}
    if settings.annotations is not None:  # recorded resolved, so that a run is the same from any folder
        folder = settings.annotations.expanduser().resolve()
        settings = MilSettings.build(settings, annotations=folder)
        annotations = supervised_slides(folder, table, splits)
    s = settings
    config: dict[str, Any] = {
        "kind": "mil",
        "settings": s.record(),
        "features_dir": str(Path(features_dir).resolve()),
        "encoder": _encoder_of(list(files.values())),
        "labels": str(Path(labels_csv).resolve()),
        "label_mapping": table.mapping,
        "positive_class": table.positive_class,
        "label_columns": table.extra,
        "seed": s.seed,
        "model": {
            "name": s.model,
            "hidden": s.hidden or DEFAULT_HIDDEN,
            "dropout": s.dropout,
            "standardize": s.standardize,
            "std_floor_fraction": STD_FLOOR_FRACTION if s.standardize else None,
        },
        "training": {
            "epochs": s.epochs,
            "lr": s.lr,
            "optimizer": "Adam",
            "weight_decay": 0.0,
            "loss": _loss(s),
            "steps": "one slide per step, shuffled each epoch",
            "selection": f"best validation {s.select_by}, ties: lower validation loss",
            "early_stopping": s.early_stopping,
        },
        "split": (
            {"method": "file", "file": str(split_path.resolve())}
            if split_path is not None
            else {"method": "k-fold", "folds": folds, "why": why}
            if folds is not None
            else {"method": "rule", "rule": s.split_rule}
            if s.split_rule is not None
            else {"method": "random", "fractions": DEFAULT_FRACTIONS, "why": why}
        ),
        "inputs": {
            "features": {sid: fp for sid, (fp, _) in fingerprints.items()},
            "labels_sha256": file_sha256(labels_csv),
            "split_file_sha256": file_sha256(split_path) if split_path is not None else None,
        },
        "ignored_slides": table.ignored,
        "unreadable_slides": {},
        "versions": {"histotransfer": __version__},
    }
    if annotations:
        config["inputs"]["annotations"] = annotation_fingerprints(annotations)
    plan = RunPlan(out, s, table, files, splits, config, split_path, folds, annotations=annotations)
    unreadable = {sid: reason for sid, (fp, reason) in fingerprints.items() if fp is None}
    if unreadable:  # decided here, not when loading, so that a re-run plans (and compares) the same run
        for reason in unreadable.values():
            warnings.warn(f"skipping unreadable feature file {reason}", stacklevel=2)
        plan = plan.without(unreadable)
    if folds is not None:
        guard(out, config)
    finished = [guard(run_dir, plan.fold_config(k)) for k, run_dir in enumerate(plan.run_dirs)]
    plan.finished = all(finished) and (folds is None or (out / DONE_FILE).is_file())
    return plan
