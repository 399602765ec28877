"""The study's figures: CKA per stage (the paper's Fig. 2), AUC vs ImageNet top-1, AUC vs truncation.

Each figure is drawn only when the study produced its data; points are means over seeds with sd error bars.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from .._io import atomic_path
from .tables import weights_label


@dataclass
class Figure:
    """A written figure (``path`` set) or the reason it was not drawn."""

    name: str
    title: str
    caption: str
    path: Path | None = None
    missing: str = ""


def _save(fig: plt.Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def _panels(n: int, width: float = 4.6, height: float = 3.6) -> tuple[plt.Figure, list[plt.Axes]]:
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False, layout="constrained")
    return fig, list(axes[0])


def _agg(df: pd.DataFrame, by: list[str], value: str) -> pd.DataFrame:
    g = df[df[value].notna()].groupby(by, sort=False)[value]
    return pd.DataFrame({"mean": g.mean(), "sd": g.std(ddof=1).fillna(0.0)}).reset_index()


def _auc_axis(ax: plt.Axes, lows: pd.Series) -> None:
    """AUC on a fixed scale (chance level 0.5 and perfect 1.0 in view) so panels compare at a glance."""
    ax.set_ylim(min(0.45, float(lows.min()) - 0.05), 1.02)
    ax.set_ylabel("test AUC")


def cka_per_stage(cka: pd.DataFrame, path: Path) -> Figure:
    """One panel per comparison; CKA (mean ± sd over seeds) against stage, one line per dataset."""
    fig_info = Figure(
        "cka_per_stage",
        "CKA per stage",
        "Linear CKA between the two encoders' activations at each stage, on the same patches "
        "(1 = same representation up to rotation and scale). Mean ± sd over seeds. Dashed: the "
        "baseline, CKA between the first encoder and random initialisations of its architecture on "
        "the same patches (mean over draws and seeds), shaded ± the sd over its random draws: what "
        "architecture and inputs alone give.",
    )
    if cka.empty:
        fig_info.missing = "the study has no CKA results (add 'finetune' and 'cka' sections)."
        return fig_info
    comparisons = list(dict.fromkeys(cka["comparison"]))
    fig, axes = _panels(len(comparisons))
    for ax, comp in zip(axes, comparisons):
        sub = cka[cka["comparison"] == comp]
        for ds in dict.fromkeys(sub["dataset"]):
            part = sub[sub["dataset"] == ds]
            agg = _agg(part, ["stage_index", "stage"], "cka").sort_values("stage_index")
            line = ax.errorbar(agg["stage_index"], agg["mean"], yerr=agg["sd"], marker="o", capsize=3, label=ds)
            ax.set_xticks(agg["stage_index"], agg["stage"], rotation=30, ha="right")
            if "baseline" in part and part["baseline"].notna().any():
                base = _agg(part, ["stage_index"], "baseline").sort_values("stage_index")
                ax.plot(
                    base["stage_index"],
                    base["mean"],
                    linestyle="--",
                    marker="x",
                    color=line[0].get_color(),
                    alpha=0.7,
                    label=f"{ds}: baseline (random init)",
                )
                spread = part.groupby("stage_index")["baseline_sd"].mean().reindex(base["stage_index"]).fillna(0.0)
                ax.fill_between(
                    base["stage_index"],
                    base["mean"] - spread.to_numpy(),
                    base["mean"] + spread.to_numpy(),
                    color=line[0].get_color(),
                    alpha=0.15,
                    lw=0,
                )
        estimators = ", ".join(sorted(set(sub["estimator"].dropna()))) if "estimator" in sub else "biased"
        ax.set_ylim(min(0.0, float(sub[["cka", "baseline"]].min().min()) - 0.05) if "baseline" in sub else 0, 1.05)
        ax.set_xlabel(f"stage ({estimators} estimator)")
        ax.set_title(comp, fontsize=9)
        ax.set_ylabel("linear CKA")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("CKA per stage")
    fig_info.path = _save(fig, path)
    return fig_info


def auc_vs_top1(mil: pd.DataFrame, path: Path) -> Figure:
    """Test AUC (mean ± sd over seeds) of full-depth ImageNet encoders against their ImageNet top-1."""
    fig_info = Figure(
        "auc_vs_imagenet_top1",
        "AUC vs ImageNet top-1",
        "Slide-level test AUC of each full-depth encoder with ImageNet weights against the ImageNet "
        "top-1 accuracy of the weights it loaded (random or other weights have none and are not "
        "drawn). Mean ± sd over seeds.",
    )
    sel = (
        mil[
            (mil["truncate"] == 0)
            & mil["blocks"].isna()
            & (mil["family"] != "histopathology")
            & mil["imagenet_top1"].notna()
        ]
        if len(mil)
        else mil
    )
    if sel.empty:
        fig_info.missing = "no finished full-depth encoder with ImageNet weights (only they have an ImageNet top-1)."
        return fig_info
    sel = sel.assign(imagenet_top1=sel["imagenet_top1"].astype(float))
    datasets = list(dict.fromkeys(sel["dataset"]))
    fig, axes = _panels(len(datasets))
    for ax, ds in zip(axes, datasets):
        agg = _agg(sel[sel["dataset"] == ds], ["config", "encoder", "imagenet_top1"], "auc")
        ax.errorbar(agg["imagenet_top1"], agg["mean"], yerr=agg["sd"], fmt="o", capsize=3)
        for _, r in agg.iterrows():
            ax.annotate(
                r["encoder"], (r["imagenet_top1"], r["mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        ax.margins(x=0.2)  # room for the encoder names
        _auc_axis(ax, agg["mean"] - agg["sd"])
        ax.set_title(ds)
        ax.set_xlabel("ImageNet top-1 (%)")
        ax.grid(alpha=0.3)
    fig.suptitle("Slide-level AUC vs ImageNet top-1")
    fig_info.path = _save(fig, path)
    return fig_info


def auc_vs_truncation(mil: pd.DataFrame, path: Path) -> Figure:
    """Test AUC (mean ± sd over seeds) against the number of removed stages, one line per encoder."""
    fig_info = Figure(
        "auc_vs_truncation",
        "AUC vs truncation",
        "Slide-level test AUC against the number of final stages removed from the encoder "
        "(0 = full network). Mean ± sd over seeds.",
    )
    if mil.empty:
        fig_info.missing = "no finished MIL run."
        return fig_info
    mil = mil[mil["blocks"].isna()]  # exact depths (blocks) are not on the truncation axis
    archs = mil.groupby(["encoder", "weights"], sort=False)["truncate"].nunique()
    keep = {k for k, n in archs.items() if n > 1}
    sel = mil[[(e, w) in keep for e, w in zip(mil["encoder"], mil["weights"])]]
    if sel.empty:
        fig_info.missing = "no encoder was run at more than one truncation."
        return fig_info
    datasets = list(dict.fromkeys(sel["dataset"]))
    fig, axes = _panels(len(datasets))
    for ax, ds in zip(axes, datasets):
        sub = sel[sel["dataset"] == ds]
        lows = []
        for (enc, w), grp in sub.groupby(["encoder", "weights"], sort=False):
            agg = _agg(grp, ["truncate"], "auc").sort_values("truncate")
            label = f"{enc} ({weights_label(w)})"
            ax.errorbar(agg["truncate"], agg["mean"], yerr=agg["sd"], marker="o", capsize=3, label=label)
            lows.append(agg["mean"] - agg["sd"])
        _auc_axis(ax, pd.concat(lows))
        ax.set_xticks(sorted(sub["truncate"].unique()))
        ax.set_title(ds)
        ax.set_xlabel("stages removed (truncation)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Slide-level AUC vs truncation")
    fig_info.path = _save(fig, path)
    return fig_info


def draw_figures(figures_dir: Path, mil: pd.DataFrame, cka: pd.DataFrame) -> list[Figure]:
    """Draw every figure whose data exists into ``figures_dir``."""
    return [
        cka_per_stage(cka, figures_dir / "fig2_cka_per_stage.png"),
        auc_vs_top1(mil, figures_dir / "auc_vs_imagenet_top1.png"),
        auc_vs_truncation(mil, figures_dir / "auc_vs_truncation.png"),
    ]
