"""``info`` of a MIL or fine-tuned run folder (settings, splits, AUC per split, with ``check`` its inputs) and of
a study folder (cells by status and kind).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from .._read import read_csv, read_yaml
from ..finetune.settings import FinetuneSettings
from ..mil import feature_fingerprint, read_config, run_finished
from ..mil.settings import MilSettings
from .records import Keyed, read_json

SPLIT_ORDER = ("train", "val", "test")

CELL_STATUSES = ("done", "cached", "failed", "blocked")


def _split_counts(run: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The split method and the slides in each split (or each cross-validation fold)."""
    split = config.get("split") or {}
    out: dict[str, Any] = {"method": split.get("method")}
    if "fold" in split:
        out["fold"] = split["fold"]
    path = run / "splits.csv"
    if path.is_file():
        df = read_csv(path, text=True)
        column = "split" if "split" in df.columns else "fold"
        counts = Counter(df[column])
        keys = [s for s in SPLIT_ORDER if s in counts] if column == "split" else sorted(counts, key=int)
        out.update((k if column == "split" else f"fold_{k}", counts[k]) for k in keys)
    return out


def _split_metrics(metrics: dict[str, Any]) -> Keyed:
    """AUC, its 95% CI and the number of slides per split, as ``metrics.json`` holds them."""
    return Keyed(
        (s, {k: metrics[s].get(k) for k in ("auc", "auc_ci_low", "auc_ci_high", "n_slides")})
        for s in SPLIT_ORDER
        if isinstance(metrics.get(s), dict)
    )


def _cv_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Mean and sd over folds of each split's AUC, each fold's test AUC, and the test metrics of the pooled
    out-of-fold predictions."""
    mean, sd = metrics.get("mean") or {}, metrics.get("sd") or {}
    out: dict[str, Any] = {
        "auc_over_folds": Keyed(
            (s, {"auc_mean": mean[s].get("auc"), "auc_sd": (sd.get(s) or {}).get("auc")})
            for s in SPLIT_ORDER
            if s in mean
        ),
        "fold_test_metrics": Keyed((k, _split_metrics(m).get("test")) for k, m in (metrics.get("folds") or {}).items()),
    }
    if metrics.get("pooled"):
        out["pooled_out_of_fold"] = _split_metrics(metrics["pooled"]).get("test")
    return out


def _inputs_check(config: dict[str, Any]) -> dict[str, Any]:
    """Whether the feature files now in the run's ``features_dir`` are the ones it was trained on."""
    recorded = (config.get("inputs") or {}).get("features") or {}
    folder = Path(config.get("features_dir") or "")
    missing, changed = [], []
    for sid, fingerprint in recorded.items():
        path = folder / f"{sid}.h5"
        if not path.is_file():
            missing.append(sid)
        elif feature_fingerprint(path) != fingerprint:
            changed.append(sid)
    return {
        "features_dir": str(folder),
        "checked": len(recorded),
        "unchanged": len(recorded) - len(missing) - len(changed),
        "changed": sorted(changed),
        "missing": sorted(missing),
    }


def _run_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The settings that determine the run's result (devices, workers and batch sizes left out)."""
    cls = FinetuneSettings if config.get("kind") == "finetune" else MilSettings
    return {k: v for k, v in (config.get("settings") or {}).items() if k not in cls.runtime_fields()}


def describe_run(path: Path, check: bool = False) -> dict[str, Any]:
    """Kind, settings, encoder, labels, split, metrics and inputs of a MIL, cross-validation or fine-tuned run
    folder (with ``check``: whether its feature files are still the ones it was trained on)."""
    config = read_config(path)
    metrics = read_json(path / "metrics.json")
    folds = metrics is not None and "folds" in metrics
    if config.get("kind") == "finetune":
        kind = "fine-tuned run"
    else:
        kind = "cross-validation run" if folds else "MIL run"
    encoder = config.get("encoder") or {}
    out: dict[str, Any] = {
        "kind": kind,
        "path": str(path),
        "finished": run_finished(path),
        "settings": _run_settings(config),
        "encoder": encoder.get("encoder_id") or "not recorded (CLAM/TRIDENT features)",
        "features_dir": config.get("features_dir"),
        "labels": config.get("labels"),
        "positive_class": config.get("positive_class"),
        "split": _split_counts(path, config),
    }
    if metrics is not None:
        out.update(_cv_metrics(metrics) if folds else {"metrics": _split_metrics(metrics)})
    out["trained_on"] = {
        "feature_files": len((config.get("inputs") or {}).get("features") or {}),
        "unreadable": len(config.get("unreadable_slides") or {}),
    }
    if check:
        out["inputs_check"] = _inputs_check(config)
        if metrics is not None:  # metrics written, yet unfinished: the model file is missing or does not load
            out["model_loads"] = out["finished"]
    if config.get("kind") == "finetune":
        out["source_run"] = ((config.get("finetune") or {}).get("source") or {}).get("run")
        comparison = read_json(path / "comparison.json") or {}
        out["comparison"] = Keyed(
            (s, {"frozen_auc": v.get("frozen_auc"), "finetuned_auc": v.get("finetuned_auc")})
            for s, v in (comparison.get("splits") or {}).items()
        )
    return out


def describe_study(path: Path) -> dict[str, Any]:
    """Name, cells by kind and status, failed and blocked cells with their reason, and the report of a study."""
    spec = read_yaml(path / "study.yaml")[1] if (path / "study.yaml").is_file() else None
    out: dict[str, Any] = {
        "kind": "study",
        "path": str(path),
        "name": spec.get("name") if isinstance(spec, dict) else None,
    }
    cells_csv = path / "cells.csv"
    if cells_csv.is_file():
        df = read_csv(cells_csv, text=True)
        order = [s for s in CELL_STATUSES if s in set(df["status"])] + sorted(set(df["status"]) - set(CELL_STATUSES))
        by_kind = Keyed()
        for kind, group in df.groupby("kind", sort=False):
            counts = Counter(group["status"])
            by_kind[kind] = {s: counts[s] for s in order if counts[s]}
        totals = Counter(df["status"])
        out.update(
            {
                "cells": len(df),
                "statuses": Keyed((s, totals[s]) for s in order),
                "by_kind": by_kind,
                "failed": Keyed(df.loc[df["status"] == "failed", ["key", "message"]].itertuples(index=False)),
                "blocked": Keyed(df.loc[df["status"] == "blocked", ["key", "message"]].itertuples(index=False)),
            }
        )
    else:
        out["cells"] = "none run yet (no cells.csv)"
    report = path / "report.html"
    out["report"] = str(report) if report.is_file() else None
    return out
