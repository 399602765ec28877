"""Staining batches inferred from slide colour, for cohorts without a group (centre) column.

Slides stained in one batch share a colour; a batch whose share of positive slides differs from the rest
lets a model score the batch instead of the tissue. ``infer_colour_batches`` clusters the slides' colour
statistics (``histotransfer.colour.slide_colour_stats``) and tests each cluster's prevalence.

Criterion: k-means (scikit-learn) on the statistics for each k from 2 to ``min(6, n // 5)``; a k
counts only when every cluster holds at least ``max(3, 5% of the slides)`` (a lone odd slide is no batch); the
counting k with the highest mean silhouette is kept when that silhouette reaches ``MIN_SILHOUETTE`` (0.5, the
lower bound of "reasonable structure" in Kaufman and Rousseeuw), otherwise the slides form one batch. The
statistics share one unit (optical density), so distances are taken as they are: standardising them would give
every statistic that follows tissue composition as much weight as those that follow the stain. Slides whose
colour varies continuously therefore give one batch; distinct tissue types may still form clusters, which is
why a batch counts against the model only through its prevalence (the group check's permutation null).

Each batch's prevalence is compared with that of all other slides by Fisher's exact test (scipy); a batch
differs beyond chance when its p-value times the number of batches (Bonferroni) is below ``ALPHA``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import fisher_exact
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score

MIN_SILHOUETTE = 0.5
MAX_BATCHES = 6
ALPHA = 0.05


def _candidates(n: int) -> range:
    """The numbers of batches tried for ``n`` slides: 2 to ``min(6, n // 5)`` (empty below 10 slides)."""
    return range(2, min(MAX_BATCHES, n // 5) + 1)


def _best_clustering(x: np.ndarray, seed: int) -> tuple[np.ndarray, float | None]:
    """Cluster labels of the chosen k (all zeros for one batch) and the best silhouette of the counting ks."""
    smallest = max(3, math.ceil(0.05 * len(x)))
    best: tuple[float, np.ndarray] | None = None
    for k in _candidates(len(x)):
        labels = KMeans(k, n_init=10, random_state=seed).fit_predict(x)
        if np.bincount(labels, minlength=k).min() < smallest:
            continue
        score = float(silhouette_score(x, labels))
        if best is None or score > best[0]:
            best = (score, labels)
    if best is None:
        return np.zeros(len(x), int), None
    return (best[1] if best[0] >= MIN_SILHOUETTE else np.zeros(len(x), int)), best[0]


def infer_colour_batches(
    stats: np.ndarray, labels: Sequence[int] | np.ndarray, slide_ids: Sequence[str], seed: int = 0
) -> dict[str, Any]:
    """Staining batches of slides from their colour statistics (n_slides, n_stats) and 0/1 ``labels``.

    Returns ``n_batches`` (1 when the colour forms no distinct clusters), ``silhouette`` (of the best k tried;
    None when no k could be tried), ``criterion`` (the rule, in words), ``batches`` (name -> ``n``,
    ``n_positive``, ``prevalence``, ``fisher_p`` against the other slides, ``differs``: beyond chance after
    Bonferroni) and ``batch_of`` (slide_id -> batch name). Batches are named ``batch_1``... by size.
    """
    x = np.asarray(stats, dtype=np.float64)
    y = np.asarray(labels, dtype=int)
    found, silhouette = _best_clustering(x, seed)
    order = np.argsort(-np.bincount(found), kind="stable")
    names = {int(c): f"batch_{i + 1}" for i, c in enumerate(order)}
    batch = np.array([names[int(c)] for c in found])
    k = len(names)
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(set(batch), key=lambda b: int(b.split("_")[1])):
        inside = batch == name
        pos, neg = int(y[inside].sum()), int((1 - y[inside]).sum())
        rest_pos, rest_neg = int(y[~inside].sum()), int((1 - y[~inside]).sum())
        p = float(fisher_exact([[pos, neg], [rest_pos, rest_neg]])[1]) if k > 1 else 1.0
        out[name] = {
            "n": pos + neg,
            "n_positive": pos,
            "prevalence": pos / (pos + neg),
            "fisher_p": p,
            "differs": bool(p * k < ALPHA),
        }
    return {
        "n_batches": k,
        "silhouette": silhouette,
        "criterion": f"k-means on the colour statistics (optical density), k = 2..min({MAX_BATCHES}, n/5) "
        "with every cluster at least max(3, 5% of slides); best mean silhouette kept if >= "
        f"{MIN_SILHOUETTE}, else one batch",
        "batches": out,
        "batch_of": dict(zip(map(str, slide_ids), batch.tolist())),
    }


def describe_batches(result: dict[str, Any]) -> str:
    """Inferred batches in one line for the console."""
    if result["n_batches"] < 2:
        best = result["silhouette"]
        sil = "" if best is None else f" (best silhouette {best:.2f} < {MIN_SILHOUETTE})"
        return f"slide colour forms no distinct staining batches{sil}"
    parts = [
        f"{name} {b['n']} slides, {b['prevalence']:.0%} positive"
        + (f" (differs from the rest, Fisher p={b['fisher_p']:.2g})" if b["differs"] else "")
        for name, b in result["batches"].items()
    ]
    return (
        f"{result['n_batches']} staining batches inferred from slide colour (silhouette "
        f"{result['silhouette']:.2f}): " + "; ".join(parts)
    )
