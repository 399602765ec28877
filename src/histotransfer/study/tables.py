"""The paper's Tables I-V from the study's run tables (:mod:`.runs`), shown and written.

The summary tables have one row per encoder configuration, stain normalisation and MIL recipe with, per dataset,
the mean and sample sd of the test AUC over seeds, the number of test slides and, for a dataset with a group
column, the mean within-group AUC beside it. Table II pairs each histopathology encoder with the ImageNet
encoder of its architecture, as the paper's does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .._io import write_csv, write_text
from .grid import EncoderConfig
from .runs import weights_top1

TABLES = {
    "table1_architectures": "Table I. ImageNet-family architectures (full depth): slide-level test AUC",
    "table2_histopathology_encoders": "Table II. Histopathology encoders (full depth): slide-level test AUC",
    "table3_finetuning": "Table III. Frozen vs fine-tuned encoder: slide-level test AUC",
    "table4_truncation": "Table IV. Truncated encoders: slide-level test AUC by number of removed stages",
    "table5_localisation": "Table V. Localisation of the lesions of positive test slides, by encoder and truncation",
}
LOCALISATION_SCORES = {  # column of runs_localisation.csv -> what Table V calls it
    "top_patch_touches": "top patch touches lesion",
    "top_patch_overlap": "top patch's lesion share",
    "attention_overlap": "attention-weighted lesion share",
    "auc_touching": "patch AUC",
    "top_patch_hit": "top patch in lesion",
    "pointing_game": "CAM pointing game",
    "cam_mass": "CAM mass in lesion",
    "um_per_cell": "um per CAM cell",
}
LOCALISATION_CHANCE = {  # a score of Table V -> the column of runs_localisation.csv holding its chance level
    "top_patch_touches": "touching_share",
    "top_patch_overlap": "mean_overlap",
    "attention_overlap": "mean_overlap",
    "top_patch_hit": "lesion_patch_share",
    "pointing_game": "pointing_chance",
    "cam_mass": "lesion_area_share",
}
FOOTNOTE = (
    "Test-set slide-level AUC, mean ± sd over seeds (sd needs two seeds); n = test slides. A cross-validated "
    "run (the default below 200 patients) counts with its pooled out-of-fold AUC, every slide tested once (n = "
    "all slides). Within-group: the mean over groups (e.g. centres) of the AUC within each group, beside the "
    "AUC pooled over groups; a model that learned the group instead of the disease scores near 0.5 there."
)
LOCALISATION_FOOTNOTE = (
    "Means over seeds of each run's mean over its positive test slides that have an annotation (slides: how many); "
    "in parentheses, the chance level: what a patch drawn at random (uniform attention, a random CAM cell) gives. "
    "Top patch touches lesion: share of slides whose most-attended patch holds any lesion; its lesion share: the "
    "lesion fraction of that patch; attention-weighted lesion share: the patches' lesion fractions weighted by "
    "softmax attention; patch AUC: attention score, patches touching the lesion vs not (chance 0.5). Top patch in "
    "lesion: share of slides whose most-attended patch is at least half lesion (0 on a slide whose lesions are all "
    "smaller). CAM pointing game: share of attended lesion patches whose Grad-CAM maximum falls inside the lesion; "
    "CAM mass in lesion: share of the CAM inside it; um per CAM cell: the CAM's resolution (finer when late stages "
    "are removed)."
)


def footnote(name: str) -> str:
    """What a table's numbers are."""
    return LOCALISATION_FOOTNOTE if name == "table5_localisation" else FOOTNOTE


def weights_label(weights: str) -> str:
    """A weights option's name, or a checkpoint file's name."""
    return Path(weights).name if Path(weights).is_absolute() else weights


def localisation_table(runs: pd.DataFrame, datasets: Sequence[str]) -> pd.DataFrame:
    """Table V: per configuration, stain normalisation and recipe, per dataset, each localisation score's mean
    over seeds (the paper's claim that truncated encoders localise at a finer resolution, as measured numbers)."""
    keys = list(dict.fromkeys(zip(runs["config"], runs["stain"], runs["recipe"])))
    rows = []
    for config, stain, recipe in keys:
        sel = runs[(runs["config"] == config) & (runs["stain"] == stain) & (runs["recipe"] == recipe)]
        first = sel.iloc[0]
        row: dict[str, Any] = {
            "encoder": first["encoder"],
            "weights": first["weights"],
            "truncate": first["truncate"],
            "blocks": first["blocks"],
            "stain": stain,
            "recipe": recipe,
        }
        for ds in datasets:
            part = sel[sel["dataset"] == ds]
            row[f"{ds}_n_scored"] = _n_slides(part["n_scored"]) if len(part) else 0
            for key in LOCALISATION_SCORES:
                values = part[key].astype(float).dropna()
                row[f"{ds}_{key}"] = float(values.mean()) if len(values) else float("nan")
                if key in LOCALISATION_CHANCE:
                    chance = part[LOCALISATION_CHANCE[key]].astype(float).dropna()
                    row[f"{ds}_{key}_chance"] = float(chance.mean()) if len(chance) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def _n_slides(values: pd.Series) -> Any:
    """The test-slide count: one number when every seed has the same, else 'min-max'."""
    lo, hi = int(values.min()), int(values.max())
    return lo if lo == hi else f"{lo}-{hi}"


def _summary(values: pd.Series) -> tuple[float, float, int]:
    """(mean, sample sd, seeds) of the finite values; sd is NaN below two seeds."""
    v = values.to_numpy(dtype=float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else float("nan")), len(v)


def _row(
    cfg: EncoderConfig,
    stain: str,
    recipe: str,
    columns: Sequence[str],
    info: Mapping[str, Mapping[str, Any]],
    pretraining: str = "",
) -> dict[str, Any]:
    meta = info.get(cfg.name, {})
    row: dict[str, Any] = {
        "encoder": cfg.name,
        "weights": cfg.weights,
        "truncate": cfg.truncate,
        "blocks": cfg.blocks,
        "family": meta.get("family"),
        "architecture": meta.get("architecture", cfg.name),
        "pretraining": pretraining,
        "imagenet_top1": weights_top1(info, cfg.name, cfg.weights),
        "stain": stain,
        "recipe": recipe,
    }
    return {k: row[k] for k in columns}


def _select(runs: pd.DataFrame, cfg: EncoderConfig, stain: str, recipe: str, ds: str) -> pd.DataFrame:
    if not len(runs):
        return runs
    return runs[
        (runs["config"] == cfg.key) & (runs["dataset"] == ds) & (runs["recipe"] == recipe) & (runs["stain"] == stain)
    ]


Row = tuple[EncoderConfig, str, str, str]  # configuration, stain normalisation, MIL recipe, pre-training label


def _grid_table(
    runs: pd.DataFrame,
    rows: Sequence[Row],
    datasets: Sequence[str],
    columns: Sequence[str],
    info: Mapping[str, Mapping[str, Any]],
) -> pd.DataFrame:
    """One row per (configuration, stain, recipe, pre-training label), in order; per dataset: AUC mean, sd,
    seeds and test slides, and the mean within-group AUC's mean and sd over seeds (NaN without a group
    column)."""
    out = []
    for cfg, stain, recipe, pretraining in rows:
        row = _row(cfg, stain, recipe, columns, info, pretraining)
        for ds in datasets:
            sel = _select(runs, cfg, stain, recipe, ds)
            mean, sd, k = _summary(sel["auc"]) if len(sel) else (float("nan"), float("nan"), 0)
            w_mean, w_sd, _ = _summary(sel["within_group_auc"]) if len(sel) else (float("nan"), float("nan"), 0)
            row.update(
                {
                    f"{ds}_auc_mean": mean,
                    f"{ds}_auc_sd": sd,
                    f"{ds}_n_seeds": k,
                    f"{ds}_n_slides": _n_slides(sel["n_slides"]) if len(sel) else 0,
                    f"{ds}_within_group_auc_mean": w_mean,
                    f"{ds}_within_group_auc_sd": w_sd,
                }
            )
        out.append(row)
    names = list(columns) + [
        f"{ds}_{c}"
        for ds in datasets
        for c in ("auc_mean", "auc_sd", "n_seeds", "n_slides", "within_group_auc_mean", "within_group_auc_sd")
    ]
    return pd.DataFrame(out, columns=names)


def histopathology_pairs(
    encoders: Sequence[EncoderConfig], info: Mapping[str, Mapping[str, Any]]
) -> list[tuple[EncoderConfig, str]]:
    """Table II's rows: each full-depth histopathology encoder after the full-depth ImageNet encoder of the same
    architecture (when the study has one), as the paper pairs them (ResNet18 vs Ciga SimCLR, ...)."""

    def family(cfg: EncoderConfig) -> str | None:
        return info.get(cfg.name, {}).get("family")

    def arch(cfg: EncoderConfig) -> str:
        # The network's shape only: "ViT-L/16 (DINOv2)" and "ViT-L/16" are one architecture.
        return str(info.get(cfg.name, {}).get("architecture", cfg.name)).split(",")[0].split(" (")[0]

    imagenet = [c for c in encoders if c.full_depth and family(c) != "histopathology" and c.weights != "random"]
    rows: list[tuple[EncoderConfig, str]] = []
    for cfg in (c for c in encoders if c.full_depth and family(c) == "histopathology"):
        twin = next((c for c in imagenet if arch(c) == arch(cfg)), None)
        if twin is not None and (twin, "ImageNet") not in rows:
            rows.append((twin, "ImageNet"))
        rows.append((cfg, "histopathology" if cfg.weights != "random" else "none (random init)"))
    return rows


def build_tables(
    mil: pd.DataFrame,
    finetune: pd.DataFrame,
    encoders: Sequence[EncoderConfig],
    finetune_encoders: Sequence[EncoderConfig],
    datasets: Sequence[str],
    info: Mapping[str, Mapping[str, Any]],
    recipes: Sequence[str] = ("",),
    finetune_recipe: str = "",
    stains: Sequence[str] = ("none",),
) -> dict[str, pd.DataFrame]:
    """Tables I-IV as numeric DataFrames, rows in the study file's order (each configuration once per stain
    normalisation and MIL recipe), one column group per dataset."""

    def family(cfg: EncoderConfig) -> str | None:
        return info.get(cfg.name, {}).get("family")

    def by_recipe(configs: Sequence[EncoderConfig], label: str = "") -> list[Row]:
        return [(c, st, r, label) for c in configs for st in stains for r in recipes]

    full_imagenet = [c for c in encoders if c.full_depth and family(c) != "histopathology"]
    truncated_archs = {(c.name, c.weights) for c in encoders if not c.full_depth}
    # By network, then deepest first: truncations in order, then exact depths (blocks) from the deepest.
    truncation = sorted(
        (c for c in encoders if (c.name, c.weights) in truncated_archs),
        key=lambda c: (
            [(e.name, e.weights) for e in encoders].index((c.name, c.weights)),
            c.truncate,
            c.blocks is not None,
            -(c.blocks or 0),
        ),
    )

    ft_rows = []
    for cfg, stain in ((c, st) for c in finetune_encoders for st in stains):
        row: dict[str, Any] = {
            "encoder": cfg.name,
            "weights": cfg.weights,
            "truncate": cfg.truncate,
            "blocks": cfg.blocks,
            "stain": stain,
            "recipe": finetune_recipe,
        }
        for ds in datasets:
            sel = _select(finetune, cfg, stain, finetune_recipe, ds)
            sel = sel[np.isfinite(sel["frozen_auc"].astype(float)) & np.isfinite(sel["finetuned_auc"].astype(float))]
            f_mean, f_sd, k = _summary(sel["frozen_auc"])
            t_mean, t_sd, _ = _summary(sel["finetuned_auc"])
            row.update(
                {
                    f"{ds}_frozen_auc_mean": f_mean,
                    f"{ds}_frozen_auc_sd": f_sd,
                    f"{ds}_finetuned_auc_mean": t_mean,
                    f"{ds}_finetuned_auc_sd": t_sd,
                    f"{ds}_n_seeds": k,
                    f"{ds}_n_slides": _n_slides(sel["n_slides"]) if len(sel) else 0,
                }
            )
        ft_rows.append(row)
    ft_cols = ["encoder", "weights", "truncate", "blocks", "stain", "recipe"] + [
        f"{ds}_{c}"
        for ds in datasets
        for c in ("frozen_auc_mean", "frozen_auc_sd", "finetuned_auc_mean", "finetuned_auc_sd", "n_seeds", "n_slides")
    ]
    pairs = [(c, st, r, label) for c, label in histopathology_pairs(encoders, info) for st in stains for r in recipes]
    return {
        "table1_architectures": _grid_table(
            mil, by_recipe(full_imagenet), datasets, ["encoder", "weights", "imagenet_top1", "stain", "recipe"], info
        ),
        "table2_histopathology_encoders": _grid_table(
            mil, pairs, datasets, ["architecture", "encoder", "pretraining", "weights", "stain", "recipe"], info
        ),
        "table3_finetuning": pd.DataFrame(ft_rows, columns=ft_cols),
        "table4_truncation": _grid_table(
            mil, by_recipe(truncation), datasets, ["encoder", "weights", "truncate", "blocks", "stain", "recipe"], info
        ),
    }


def format_auc(mean: float, sd: float, n_slides: Any, with_n: bool = True) -> str:
    """'0.912 ± 0.013 (n=48)'; an en dash where there is no finished run."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    text = f"{mean:.3f}" if (sd is None or math.isnan(sd)) else f"{mean:.3f} ± {sd:.3f}"
    return f"{text} (n={n_slides})" if with_n else text


def _depth(table: pd.DataFrame) -> list[Any]:
    """The depth column as shown: the truncation, or ``N blocks`` for a transformer cut to N blocks."""
    blocks = table["blocks"] if "blocks" in table else [None] * len(table)
    return [t if b is None or pd.isna(b) else f"{int(b)} blocks" for t, b in zip(table["truncate"], blocks)]


def _localisation_display(table: pd.DataFrame, datasets: Sequence[str]) -> pd.DataFrame:
    out = pd.DataFrame(
        {
            "Encoder": table["encoder"],
            "Weights": table["weights"].map(weights_label),
            "Truncation": _depth(table),
            "Stain": table["stain"],
            "MIL recipe": table["recipe"],
        }
    )
    for ds in datasets:
        out[f"{ds}: slides"] = table[f"{ds}_n_scored"]
        for key, title in LOCALISATION_SCORES.items():
            digits = 1 if key == "um_per_cell" else 3
            chances = table[f"{ds}_{key}_chance"] if key in LOCALISATION_CHANCE else [math.nan] * len(table)
            out[f"{ds}: {title}"] = [
                "–" if pd.isna(v) else f"{v:.{digits}f}" + ("" if pd.isna(c) else f" ({c:.3f})")
                for v, c in zip(table[f"{ds}_{key}"], chances)
            ]
    return out


def display_table(name: str, table: pd.DataFrame, datasets: Sequence[str]) -> pd.DataFrame:
    """The human-readable form of a numeric table: one formatted AUC column per dataset."""
    if name == "table5_localisation":
        return _localisation_display(table, datasets)
    out = pd.DataFrame()
    if "architecture" in table:
        out["Architecture"] = table["architecture"]
    out["Encoder"] = table["encoder"]
    if "pretraining" in table:
        out["Pre-training"] = table["pretraining"]
    out["Weights"] = table["weights"].map(weights_label)
    if "truncate" in table and name != "table1_architectures" and name != "table2_histopathology_encoders":
        out["Truncation"] = _depth(table)
    if "imagenet_top1" in table:
        out["ImageNet top-1 (%)"] = [
            ("–" if v is None or pd.isna(v) else f"{float(v):.1f}") for v in table["imagenet_top1"]
        ]
    if "stain" in table:
        out["Stain"] = table["stain"]
    if "recipe" in table:
        out["MIL recipe"] = table["recipe"]
    for ds in datasets:
        if name == "table3_finetuning":
            out[f"{ds}: frozen"] = [
                format_auc(m, s, n)
                for m, s, n in zip(
                    table[f"{ds}_frozen_auc_mean"], table[f"{ds}_frozen_auc_sd"], table[f"{ds}_n_slides"]
                )
            ]
            out[f"{ds}: fine-tuned"] = [
                format_auc(m, s, n)
                for m, s, n in zip(
                    table[f"{ds}_finetuned_auc_mean"], table[f"{ds}_finetuned_auc_sd"], table[f"{ds}_n_slides"]
                )
            ]
        else:
            out[ds] = [
                format_auc(m, s, n)
                for m, s, n in zip(table[f"{ds}_auc_mean"], table[f"{ds}_auc_sd"], table[f"{ds}_n_slides"])
            ]
            within = table.get(f"{ds}_within_group_auc_mean")
            if within is not None and within.notna().any():  # the dataset has a group column
                out[f"{ds}: within-group"] = [
                    format_auc(m, s, None, with_n=False) for m, s in zip(within, table[f"{ds}_within_group_auc_sd"])
                ]
    return out


def _shown(value: float) -> str:
    return "–" if value is None or pd.isna(value) else f"{float(value):.3f}"


def _within_shown(mean: float, low: float, high: float) -> str:
    return _shown(mean) + ("" if pd.isna(low) or pd.isna(high) else f" ({low:.3f}–{high:.3f})")


def shortcut_table(mil: pd.DataFrame) -> pd.DataFrame:
    """The shortcut check of every MIL run beside its test AUC (empty when no run could be checked): the mean
    within-group test AUC with its 95% interval, the AUC of colour alone and of the group alone, and the verdict
    when it warns."""
    if not len(mil) or mil[["within_group_auc", "colour_auc", "group_auc"]].isna().all().all():
        return pd.DataFrame()
    return pd.DataFrame(
        {
            "Dataset": mil["dataset"],
            "Configuration": mil["config"],
            "Stain": mil["stain"],
            "MIL recipe": mil["recipe"],
            "Seed": mil["seed"],
            "Test AUC": mil["auc"].map(_shown),
            "Within-group test AUC (95% CI)": [
                _within_shown(m, lo, hi)
                for m, lo, hi in zip(mil["within_group_auc"], mil["within_group_ci_low"], mil["within_group_ci_high"])
            ],
            "Colour-only AUC": mil["colour_auc"].map(_shown),
            "Group-only AUC": mil["group_auc"].map(_shown),
            "Verdict": [v if w else "" for v, w in zip(mil["shortcut_verdict"], mil["shortcut_warning"])],
        }
    )


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (written here to avoid a `tabulate` dependency for a few lines)."""

    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in df.columns) + " |", "| " + " | ".join("---" for _ in df.columns) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_tables(
    tables_dir: Path, tables: Mapping[str, pd.DataFrame], datasets: Sequence[str], long: Mapping[str, pd.DataFrame]
) -> dict[str, pd.DataFrame]:
    """Write each table as CSV (numeric) and Markdown (formatted), plus the long per-run CSVs.

    Returns the formatted tables, which the HTML report shows.
    """
    shown = {}
    for name, table in tables.items():
        write_csv(table, tables_dir / f"{name}.csv")
        disp = display_table(name, table, datasets)
        shown[name] = disp
        body = to_markdown(disp) if len(disp) else "_No encoder configuration of the study belongs here._\n"
        write_text(f"**{TABLES[name]}**\n\n{body}\n{footnote(name)}\n", tables_dir / f"{name}.md")
    for name, df in long.items():
        write_csv(df, tables_dir / f"{name}.csv")
    return shown
