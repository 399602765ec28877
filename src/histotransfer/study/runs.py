"""The study's run tables from its finished cells: one row per run, every number read from the run's own files.

``runs_mil.csv`` (a run's ``metrics.json``: slide-level test AUC and the number of test slides; for a
cross-validated run, the AUC of its pooled out-of-fold predictions over every slide, with the protocol, the mean ±
sd of the folds' test AUCs, the mean within-group test AUC and the shortcut check), ``runs_finetune.csv``,
``cka_stages.csv`` and ``runs_localisation.csv`` (the cohort means of a run's attention and CAM localisation).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .._read import read_csv
from .grid import EncoderConfig

ATTENTION_SCORES = (
    "top_patch_touches",
    "touching_share",
    "top_patch_overlap",
    "mean_overlap",
    "attention_overlap",
    "auc_touching",
    "top_patch_hit",
    "lesion_patch_share",
    "attention_mass",
    "auc",
)
CAM_SCORES = ("pointing_game", "pointing_chance", "cam_mass", "lesion_area_share")


def _nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _test_metrics(run: Path) -> tuple[float, int]:
    """(test AUC, test slides) from a run folder's metrics.json (a cross-validation's: of its pooled out-of-fold
    predictions); AUC is NaN when it could not be computed."""
    metrics = json.loads((run / "metrics.json").read_text())
    test = metrics["pooled"]["test"] if "pooled" in metrics else metrics["test"]
    return _nan(test.get("auc")), int(test.get("n_slides") or 0)


def _protocol(run: Path) -> dict[str, Any]:
    """A MIL run's protocol (``split`` or ``K-fold CV``) and, cross-validated, the mean and sd of its folds' test
    AUCs (NaN for one split)."""
    metrics = json.loads((run / "metrics.json").read_text())
    if "pooled" not in metrics:
        return {"protocol": "split", "fold_auc_mean": float("nan"), "fold_auc_sd": float("nan")}
    return {
        "protocol": f"{metrics['protocol']['folds']}-fold CV",
        "fold_auc_mean": _nan(metrics["mean"]["test"]["auc"]),
        "fold_auc_sd": _nan(metrics["sd"]["test"]["auc"]),
    }


def _multi_centre(run: Path) -> dict[str, Any]:
    """A run's mean within-group test AUC with its interval (by the group column, or by the staining batches the
    shortcut check inferred from colour; a cross-validation's: of its pooled out-of-fold predictions) and the
    shortcut check (NaN / empty where it has none)."""
    metrics = json.loads((run / "metrics.json").read_text())
    shortcut = metrics.get("shortcut") or {}
    within = shortcut.get("within") or {}
    groups = (
        metrics["pooled"].get("groups") if "pooled" in metrics else (metrics.get("groups") or {}).get("test")
    ) or {}
    mean = within.get("mean")
    if mean is None:
        mean = groups.get("mean_within_group_auc")
    return {
        "within_group_auc": _nan(mean),
        "within_group_ci_low": _nan(within.get("ci_low")),
        "within_group_ci_high": _nan(within.get("ci_high")),
        "colour_auc": _nan(shortcut.get("colour_auc")),
        "group_auc": _nan(shortcut.get("group_auc")),
        "shortcut_warning": bool(shortcut.get("warning")),
        "shortcut_verdict": shortcut.get("verdict") or "",
    }


def weights_top1(info: Mapping[str, Mapping[str, Any]], name: str, weights: str) -> float | None:
    """The ImageNet top-1 of the weights a configuration actually loads: only ImageNet weights have one
    (random weights and checkpoint files have none)."""
    return ((info.get(name, {}).get("weights") or {}).get(weights) or {}).get("imagenet_top1")


def _encoder_columns(spec: Mapping[str, Any], info: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    cfg = EncoderConfig(spec["name"], spec["weights"], int(spec["truncate"]), spec.get("blocks"))
    return {
        "config": cfg.key,
        "encoder": cfg.name,
        "weights": cfg.weights,
        "truncate": cfg.truncate,
        "blocks": cfg.blocks,
        "family": info.get(cfg.name, {}).get("family"),
        "imagenet_top1": weights_top1(info, cfg.name, cfg.weights),
    }


def mil_runs(
    out_dir: Path, records: Sequence[Mapping[str, Any]], info: Mapping[str, Mapping[str, Any]]
) -> pd.DataFrame:
    """One row per finished MIL run: dataset, encoder configuration, seed, test AUC, test slides, run folder."""
    rows = []
    for r in records:
        if r["kind"] != "mil":
            continue
        run = r["result"]["run"]
        auc, n = _test_metrics(out_dir / run)
        rows.append(
            {
                "dataset": r["dataset"],
                **_encoder_columns(r["encoder"], info),
                "recipe": r.get("recipe", ""),
                "stain": r.get("stain", "none"),
                "seed": r["seed"],
                "auc": auc,
                "n_slides": n,
                "run": run,
                **_protocol(out_dir / run),
                **_multi_centre(out_dir / run),
            }
        )
    return pd.DataFrame(
        rows,
        columns=[
            "dataset",
            "config",
            "encoder",
            "weights",
            "truncate",
            "blocks",
            "family",
            "imagenet_top1",
            "recipe",
            "stain",
            "seed",
            "auc",
            "n_slides",
            "run",
            "protocol",
            "fold_auc_mean",
            "fold_auc_sd",
            "within_group_auc",
            "within_group_ci_low",
            "within_group_ci_high",
            "colour_auc",
            "group_auc",
            "shortcut_warning",
            "shortcut_verdict",
        ],
    )


def finetune_runs(
    out_dir: Path, records: Sequence[Mapping[str, Any]], info: Mapping[str, Mapping[str, Any]]
) -> pd.DataFrame:
    """One row per finished fine-tuning run, with the frozen run of the same seed beside it."""
    rows = []
    for r in records:
        if r["kind"] != "finetune":
            continue
        frozen_auc, _ = _test_metrics(out_dir / r["result"]["frozen_run"])
        auc, n = _test_metrics(out_dir / r["result"]["run"])
        rows.append(
            {
                "dataset": r["dataset"],
                **_encoder_columns(r["encoder"], info),
                "recipe": r.get("recipe", ""),
                "stain": r.get("stain", "none"),
                "seed": r["seed"],
                "frozen_auc": frozen_auc,
                "finetuned_auc": auc,
                "n_slides": n,
                "run": r["result"]["run"],
                "frozen_run": r["result"]["frozen_run"],
            }
        )
    return pd.DataFrame(
        rows,
        columns=[
            "dataset",
            "config",
            "encoder",
            "weights",
            "truncate",
            "blocks",
            "family",
            "imagenet_top1",
            "recipe",
            "stain",
            "seed",
            "frozen_auc",
            "finetuned_auc",
            "n_slides",
            "run",
            "frozen_run",
        ],
    )


def cka_stages(out_dir: Path, records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per (CKA run, stage): which encoders were compared on which dataset, the CKA, its
    random-initialisation baseline as mean and sd over its draws (NaN when not computed; the sd NaN for runs made
    with a single draw), the estimator and the number of patches."""
    frames = []
    for r in records:
        if r["kind"] != "cka":
            continue
        csv = out_dir / r["result"]["csv"]
        df = read_csv(csv)
        record = json.loads((csv.parent / "cka.json").read_text()) if (csv.parent / "cka.json").is_file() else {}
        frames.append(
            pd.DataFrame(
                {
                    "dataset": r["dataset"],
                    "comparison": r["result"]["comparison"],
                    "stain": r.get("stain", "none"),
                    "seed": r["seed"],
                    "stage_index": np.arange(len(df)),
                    "stage": df["stage"].astype(str),
                    "cka": df["cka"].astype(float),
                    "baseline": df["baseline"].astype(float) if "baseline" in df else np.nan,
                    "baseline_sd": df["baseline_sd"].astype(float) if "baseline_sd" in df else np.nan,
                    "estimator": record.get("estimator", "biased"),
                    "n_patches": record.get("n_patches"),
                    "warning": " ".join(record.get("warnings") or []),
                    "csv": r["result"]["csv"],
                }
            )
        )
    columns = [
        "dataset",
        "comparison",
        "stain",
        "seed",
        "stage_index",
        "stage",
        "cka",
        "baseline",
        "baseline_sd",
        "estimator",
        "n_patches",
        "warning",
        "csv",
    ]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def localisation_runs(
    out_dir: Path, records: Sequence[Mapping[str, Any]], info: Mapping[str, Mapping[str, Any]]
) -> pd.DataFrame:
    """One row per MIL run whose dataset has lesion annotations: the cohort means of its attention localisation
    (positive test slides) and, when the study made CAMs of it, their localisation and resolution."""
    cams = {
        (r["dataset"], r["config"], r.get("stain", "none"), r.get("recipe", ""), r["seed"]): r["result"]["cams"]
        for r in records
        if r["kind"] == "cam"
    }
    rows = []
    for r in records:
        if r["kind"] != "mil" or not r["result"].get("localisation"):
            continue
        loc = json.loads((out_dir / r["result"]["localisation"]).read_text())
        row = {
            "dataset": r["dataset"],
            **_encoder_columns(r["encoder"], info),
            "recipe": r.get("recipe", ""),
            "stain": r.get("stain", "none"),
            "seed": r["seed"],
            "n_scored": loc["n_scored"],
            **{k: (loc["cohort"].get(k) or {}).get("mean") for k in ATTENTION_SCORES},
        }
        cam_file = cams.get((r["dataset"], r["config"], r.get("stain", "none"), r.get("recipe", ""), r["seed"]))
        if cam_file is not None:
            cam = json.loads((out_dir / cam_file).read_text())
            cohort = (cam.get("localisation") or {}).get("cohort") or {}
            row.update({k: (cohort.get(k) or {}).get("mean") for k in CAM_SCORES})
            row["um_per_cell"] = (cam.get("resolution") or {}).get("um_per_cell")
        rows.append(row)
    columns = [
        "dataset",
        "config",
        "encoder",
        "weights",
        "truncate",
        "blocks",
        "recipe",
        "stain",
        "seed",
        "n_scored",
        *ATTENTION_SCORES,
        *CAM_SCORES,
        "um_per_cell",
    ]
    return pd.DataFrame(rows, columns=columns)
