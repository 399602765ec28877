"""Shortcut checks: how well slide colour alone, or the centre alone, predicts the label.

In a multi-centre cohort the centres differ in stain colour and often in the share of positive slides. A
classifier can then score well by recognising the centre. These checks measure that ceiling on the same
slides, with cross-validated, out-of-fold predictions so that nothing is scored on data it was fitted to:

* ``slide_colour_stats``: per-slide colour statistics of the tissue pixels of a thumbnail, in optical density
  (RGB) and in haematoxylin/eosin/DAB.
* ``colour_shortcut_auc``: the AUC of a standardised logistic regression on those statistics.
* ``group_shortcut_auc``: the AUC of predicting each slide by the share of positives of its group (centre)
  among the training slides.
* ``shortcut_verdict``: one sentence comparing the model's AUC with the colour-only AUC.

Small cohorts are cross-validated repeatedly (``repeats``, default ``ceil(200 / n)`` capped at 20): each slide's
out-of-fold probabilities are averaged over the repeats and scored as one AUC, which removes most of the
variation that a single random fold assignment adds at small n.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import BaseCrossValidator, RepeatedStratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ..errors import HistotransferError
from ..features import HED_FROM_RGB, optical_density

COLOUR_CHANNELS = ("od_r", "od_g", "od_b", "haematoxylin", "eosin", "dab")
COLOUR_STATISTICS = ("mean", "std", "p10", "p50", "p90")
COLOUR_STAT_NAMES = tuple(f"{c}_{s}" for c in COLOUR_CHANNELS for s in COLOUR_STATISTICS)
DEFAULT_MARGIN = 0.05
Folds: TypeAlias = "int | BaseCrossValidator"


def slide_colour_stats(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Colour statistics (``COLOUR_STAT_NAMES``, 30 float64 values) of the tissue pixels of a thumbnail.

    ``rgb`` is a uint8 RGB(A) thumbnail (H, W, 3|4), ``mask`` its boolean tissue mask (H, W). For each of
    the optical densities of R, G, B and the haematoxylin, eosin and DAB channels: mean, standard deviation
    and the 10th, 50th and 90th percentiles over the tissue pixels.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] not in (3, 4):
        raise HistotransferError(f"thumbnail: expected a uint8 RGB(A) image (H, W, 3|4), got {rgb.dtype} "
                                 f"{tuple(rgb.shape)}.")
    if mask.shape != rgb.shape[:2]:
        raise HistotransferError(f"tissue mask of shape {tuple(mask.shape)} does not match the thumbnail "
                                 f"{tuple(rgb.shape[:2])}; compute the mask on the same thumbnail.")
    od = optical_density(rgb[..., :3][mask.astype(bool)]).astype(np.float64)
    if len(od) == 0:
        raise HistotransferError("tissue mask is empty: this slide has no tissue pixels to measure.")
    channels = np.concatenate([od, od @ HED_FROM_RGB], axis=1)
    percentiles = np.percentile(channels, [10, 50, 90], axis=0)
    stats = np.stack([channels.mean(0), channels.std(0), *percentiles], axis=1)
    return stats.reshape(-1)


def _binary_labels(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or not np.isin(y, (0, 1)).all() or len(np.unique(y)) != 2:
        raise HistotransferError("shortcut check: labels must be 0/1 with both classes present, one per slide.")
    return y.astype(int)


def default_repeats(n: int) -> int:
    """Repeats of the cross-validation for ``n`` slides: ``ceil(200 / n)``, between 1 and 20."""
    return max(1, min(20, math.ceil(200 / n)))


def _splitter(y: np.ndarray, folds: Folds, repeats: int | None, seed: int) -> tuple[BaseCrossValidator, int, int]:
    """The cross-validation splitter, its number of folds and of repeats."""
    if not isinstance(folds, (int, np.integer)):
        return folds, folds.get_n_splits(), 1
    minority = int(np.bincount(y).min())
    if minority < 2 or folds < 2:
        raise HistotransferError(
            f"shortcut check: {minority} slide(s) in the smaller class and {folds} folds; cross-validation needs "
            "at least 2 folds and 2 slides of each class."
        )
    k = min(int(folds), minority)
    r = default_repeats(len(y)) if repeats is None else repeats
    return RepeatedStratifiedKFold(n_splits=k, n_repeats=r, random_state=seed), k, r


def _out_of_fold(predict: Callable[[np.ndarray, np.ndarray], np.ndarray], y: np.ndarray,
                 splitter: BaseCrossValidator) -> np.ndarray:
    """Each slide's positive-class score averaged over the folds that tested it."""
    total, times = np.zeros(len(y)), np.zeros(len(y))
    for train, test in splitter.split(np.zeros((len(y), 1)), y):
        total[test] += predict(train, test)
        times[test] += 1
    if (times == 0).any():
        raise HistotransferError("shortcut check: the cross-validation left some slides untested; use folds that "
                                 "test every slide.")
    return total / times


def _result(y: np.ndarray, scores: np.ndarray, k: int, r: int) -> dict[str, Any]:
    n1 = int(y.sum())
    n0 = len(y) - n1
    return {"auc": float(roc_auc_score(y, scores)), "n": len(y), "n_positive": n1, "folds": k, "repeats": r,
            "null_sd": null_auc_sd(n0, n1)}


def null_auc_sd(n_negative: int, n_positive: int) -> float:
    """Standard deviation of the AUC of uninformative scores (Mann-Whitney under the null):
    ``sqrt((n0 + n1 + 1) / (12 n0 n1))``. Cross-validated AUCs of uninformative data spread somewhat more
    (refitting per fold adds noise), so read it as a lower bound: an AUC within about 3 of these of 0.5 is
    chance."""
    return math.sqrt((n_negative + n_positive + 1) / (12 * n_negative * n_positive))


def colour_shortcut_auc(stats: np.ndarray, labels: Sequence[int] | np.ndarray, seed: int = 0, folds: Folds = 5,
                        repeats: int | None = None) -> dict[str, Any]:
    """Out-of-fold AUC that colour statistics (n_slides, n_stats) alone reach for the 0/1 ``labels``.

    Logistic regression on standardised statistics, stratified ``folds`` (fewer if the smaller class has
    fewer slides; or any scikit-learn splitter) repeated ``repeats`` times with ``seed``. Returns ``auc``,
    ``n``, ``n_positive``, ``folds``, ``repeats`` and ``null_sd`` (see ``null_auc_sd``).
    """
    x = np.asarray(stats, dtype=np.float64)
    y = _binary_labels(labels)
    if x.ndim != 2 or len(x) != len(y) or not np.isfinite(x).all():
        raise HistotransferError(f"shortcut check: colour statistics of shape {x.shape} must be finite, one row "
                                 f"per label ({len(y)}).")
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    splitter, k, r = _splitter(y, folds, repeats, seed)

    def predict(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        return model.fit(x[train], y[train]).predict_proba(x[test])[:, 1]

    return _result(y, _out_of_fold(predict, y, splitter), k, r)


def group_shortcut_auc(groups: Sequence[Any] | np.ndarray, labels: Sequence[int] | np.ndarray, seed: int = 0,
                       folds: Folds = 5, repeats: int | None = None) -> dict[str, Any]:
    """Out-of-fold AUC of scoring each slide by its group's (e.g. centre's) share of positives among the
    training slides (the overall share for a group absent from training). Same folds and result as
    ``colour_shortcut_auc``."""
    g = pd.Series(np.asarray(groups, dtype=object))
    y = _binary_labels(labels)
    if len(g) != len(y) or g.isna().any():
        raise HistotransferError(f"shortcut check: {len(g)} groups for {len(y)} labels, or a missing group; give "
                                 "one group per slide.")
    splitter, k, r = _splitter(y, folds, repeats, seed)

    def predict(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        share = pd.Series(y[train]).groupby(g.iloc[train].to_numpy()).mean()
        return g.iloc[test].map(share).fillna(y[train].mean()).to_numpy(dtype=float)

    return _result(y, _out_of_fold(predict, y, splitter), k, r)


def shortcut_verdict(model_auc: float, colour_auc: float, margin: float = DEFAULT_MARGIN) -> str:
    """One sentence: does colour alone come within ``margin`` of the model's AUC?

    The default margin, 0.05, is about the half-width of the 95% confidence interval of an AUC near 0.85 on
    a test set of 200-300 slides: a smaller gap between the model and colour alone cannot be told apart
    from noise there, so the model's score may be colour (on fewer slides the interval is wider still).
    """
    for name, value in (("model AUC", model_auc), ("colour AUC", colour_auc), ("margin", margin)):
        if not 0 <= value <= 1:
            raise HistotransferError(f"shortcut verdict: {name} {value} is not between 0 and 1.")
    if colour_auc >= model_auc - margin:
        return (f"Warning: colour alone reaches AUC {colour_auc:.3f}, within {margin:.2f} of the model's "
                f"{model_auc:.3f}; the model may be reading stain colour or the centre rather than the tissue. "
                "Normalise stain, stratify splits by centre and report per-centre results.")
    return (f"Colour alone reaches AUC {colour_auc:.3f}, more than {margin:.2f} below the model's "
            f"{model_auc:.3f}: colour does not explain the model's score.")
