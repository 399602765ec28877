"""The CKA figures: ``cka.png`` (CKA per stage with the baseline's mean and sd) and ``cka_matrix.png`` (every
stage of A against every stage of B).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .._io import atomic_path


def plot_bars(df: pd.DataFrame, path: Path, title: str) -> None:
    fig = Figure(figsize=(max(4.0, 1.1 * len(df) + 1.5), 3.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bars = ax.bar(range(len(df)), df["cka"], color="#4C72B0")
    for bar, value in zip(bars, df["cka"]):
        ax.text(bar.get_x() + bar.get_width() / 2, value + 0.01, f"{value:.3f}", ha="center", va="bottom", fontsize=8)
    low = float(df["cka"].min())
    if "baseline" in df:
        sd = df["baseline_sd"].fillna(0.0)
        ax.fill_between(
            range(len(df)),
            df["baseline"] - sd,
            df["baseline"] + sd,
            color="0.6",
            alpha=0.35,
            lw=0,
            label="baseline: mean ± sd",
        )
        ax.plot(
            range(len(df)), df["baseline"], color="0.4", linestyle="--", marker="x", label="A vs random init (baseline)"
        )
        ax.legend(fontsize=7, loc="lower left")
        low = min(low, float((df["baseline"] - sd).min()))
    ax.set_xticks(range(len(df)), df["stage"], rotation=20, ha="right")
    ax.set(ylim=(min(0.0, low), 1.1), ylabel="linear CKA", title=title)
    ax.title.set_fontsize(9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def plot_matrix(matrix: pd.DataFrame, path: Path, label_a: str, label_b: str) -> None:
    fig = Figure(figsize=(1.0 * matrix.shape[1] + 2.5, 0.8 * matrix.shape[0] + 1.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(matrix.to_numpy(), vmin=0, vmax=1, cmap="magma", origin="lower")
    for (i, j), value in np.ndenumerate(matrix.to_numpy()):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if value < 0.6 else "black")
    ax.set_xticks(range(matrix.shape[1]), matrix.columns, rotation=30, ha="right")
    ax.set_yticks(range(matrix.shape[0]), matrix.index)
    ax.set(xlabel=label_b, ylabel=label_a, title="linear CKA, stage by stage")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
