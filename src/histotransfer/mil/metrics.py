"""Slide-level classification metrics: AUC with a seeded bootstrap 95% CI, accuracy, balanced accuracy, F1.

Every metric takes one probability per slide, so a slide counts once however many patches it has.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

METRIC_KEYS = ("auc", "auc_ci_low", "auc_ci_high", "accuracy", "balanced_accuracy", "f1", "n_slides")


def bootstrap_aucs(labels: np.ndarray, probs: np.ndarray, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """AUCs of ``n_boot`` resamples of the slides (with replacement); resamples with one class are dropped.

    Equal to ``roc_auc_score`` per resample (the Mann-Whitney form with average ranks for ties), computed for
    all resamples at once: calling roc_auc_score a thousand times costs about a second per split in input
    validation alone.
    """
    labels = np.asarray(labels).astype(bool)
    probs = np.asarray(probs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(labels), size=(n_boot, len(labels)))
    y = labels[idx]
    n_pos = y.sum(axis=1)
    n_neg = y.shape[1] - n_pos
    ok = (n_pos > 0) & (n_neg > 0)
    ranks = rankdata(probs[idx[ok]], axis=1)
    u = (ranks * y[ok]).sum(axis=1) - n_pos[ok] * (n_pos[ok] + 1) / 2
    return u / (n_pos[ok] * n_neg[ok])


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def slide_metrics(labels, probs, n_boot: int = 1000, seed: int = 0) -> dict:
    """Metrics of one split from per-slide labels (0/1) and positive-class probabilities.

    Predictions are ``prob > 0.5`` (the argmax of two classes). AUC and its CI are ``None`` when the split
    holds one class. Inputs are sorted first, so the bootstrap does not depend on slide order.
    """
    labels = np.asarray(labels, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    order = np.lexsort((labels, probs))
    labels, probs = labels[order], probs[order]
    out: dict = dict.fromkeys(METRIC_KEYS)
    out["n_slides"] = len(labels)
    if len(labels) == 0:
        return out
    pred = (probs > 0.5).astype(int)
    out["accuracy"] = float(accuracy_score(labels, pred))
    out["f1"] = float(f1_score(labels, pred, zero_division=0))
    if len(np.unique(labels)) == 2:
        out["balanced_accuracy"] = float(balanced_accuracy_score(labels, pred))
        out["auc"] = float(roc_auc_score(labels, probs))
        boot = bootstrap_aucs(labels, probs, n_boot, seed)
        if len(boot):
            out["auc_ci_low"], out["auc_ci_high"] = (float(v) for v in np.percentile(boot, [2.5, 97.5]))
    else:
        out["balanced_accuracy"] = out["accuracy"]
    return {k: _num(v) if isinstance(v, float) else v for k, v in out.items()}
