"""Shortcut checks: how well slide colour alone, or the centre alone, predicts the label.

In a multi-centre cohort the centres differ in stain colour and often in the share of positive slides. A
classifier can then score well by recognising the centre. These checks measure that ceiling on the same
slides, with cross-validated, out-of-fold predictions so that nothing is scored on data it was fitted to:

* ``histotransfer.colour.slide_colour_stats``: per-slide colour statistics of the tissue pixels of a thumbnail,
  in optical density (RGB) and in haematoxylin/eosin/DAB; tiling records them in each patch file.
* ``colour_shortcut_auc``: the AUC of a standardised logistic regression on those statistics.
* ``group_shortcut_auc``: the AUC of predicting each slide by the share of positives of its group (centre)
  among the training slides.
* ``shortcut_verdict``: one sentence comparing the model's AUC with the colour-only AUC.
* ``run_shortcut``: both checks on the labelled slides of a MIL run or evaluation, as ``metrics.json`` holds
  them (``shortcut`` key).

With ``patients`` the folds keep each patient's slides together (scikit-learn's ``StratifiedGroupKFold``), as
the runs' own splits do: two slides of one patient share a staining batch, and one of them in training would
tell the other's label.

Small cohorts are cross-validated repeatedly (``repeats``, default ``ceil(200 / n)`` capped at 20): each slide's
out-of-fold probabilities are averaged over the repeats and scored as one AUC, which removes most of the
variation that a single random fold assignment adds at small n.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeAlias

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import BaseCrossValidator, RepeatedStratifiedKFold, StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ..colour import COLOUR_STAT_NAMES
from ..errors import HistotransferError
from ..patches import read_colour_stats

DEFAULT_MARGIN = 0.05
Folds: TypeAlias = "int | BaseCrossValidator"


def _binary_labels(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or not np.isin(y, (0, 1)).all() or len(np.unique(y)) != 2:
        raise HistotransferError("shortcut check: labels must be 0/1 with both classes present, one per slide.")
    return y.astype(int)


def default_repeats(n: int) -> int:
    """Repeats of the cross-validation for ``n`` slides: ``ceil(200 / n)``, between 1 and 20."""
    return max(1, min(20, math.ceil(200 / n)))


Splits: TypeAlias = "Iterable[tuple[np.ndarray, np.ndarray]]"


def _minority(y: np.ndarray, patients: np.ndarray | None) -> int:
    """Slides (or, with ``patients``, patients) of the smaller class."""
    if patients is None:
        return int(np.bincount(y).min())
    return min(len(set(patients[y == c])) for c in (0, 1))


def _splits(y: np.ndarray, folds: Folds, repeats: int | None, seed: int,
            patients: np.ndarray | None = None) -> tuple[Splits, int, int]:
    """The cross-validation's (train, test) index pairs, its number of folds and of repeats."""
    x = np.zeros((len(y), 1))
    if not isinstance(folds, (int, np.integer)):
        return folds.split(x, y, patients), folds.get_n_splits(), 1
    minority = _minority(y, patients)
    unit = "slide(s)" if patients is None else "patient(s)"
    if minority < 2 or folds < 2:
        raise HistotransferError(
            f"shortcut check: {minority} {unit} in the smaller class and {folds} folds; cross-validation needs "
            f"at least 2 folds and 2 {unit.removesuffix('(s)')}s of each class."
        )
    k = min(int(folds), minority)
    r = default_repeats(len(y)) if repeats is None else repeats
    if patients is None:
        return RepeatedStratifiedKFold(n_splits=k, n_repeats=r, random_state=seed).split(x, y), k, r
    return (pair for i in range(r)
            for pair in StratifiedGroupKFold(k, shuffle=True, random_state=seed + i).split(x, y, patients)), k, r


def _out_of_fold(predict: Callable[[np.ndarray, np.ndarray], np.ndarray], y: np.ndarray,
                 splits: Splits) -> np.ndarray:
    """Each slide's positive-class score averaged over the folds that tested it. A fold whose training part
    holds one class (possible when whole patients are dealt) scores its test slides by that training share."""
    total, times = np.zeros(len(y)), np.zeros(len(y))
    for train, test in splits:
        one_class = len(np.unique(y[train])) < 2
        total[test] += np.full(len(test), y[train].mean()) if one_class else predict(train, test)
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


def _patients(patients: Sequence[Any] | np.ndarray | None, n: int) -> np.ndarray | None:
    if patients is None:
        return None
    p = np.asarray(patients, dtype=object)
    if p.shape != (n,) or pd.isna(p).any():
        raise HistotransferError(f"shortcut check: {len(p)} patients for {n} labels, or a missing one; give one "
                                 "patient per slide.")
    return p.astype(str)


def colour_shortcut_auc(stats: np.ndarray, labels: Sequence[int] | np.ndarray, seed: int = 0, folds: Folds = 5,
                        repeats: int | None = None, patients: Sequence[Any] | np.ndarray | None = None
                        ) -> dict[str, Any]:
    """Out-of-fold AUC that colour statistics (n_slides, n_stats) alone reach for the 0/1 ``labels``.

    Logistic regression on standardised statistics, stratified ``folds`` (fewer if the smaller class has
    fewer slides, or patients; or any scikit-learn splitter) repeated ``repeats`` times with ``seed``; with
    ``patients`` (one per slide) a patient's slides share a fold. Returns ``auc``, ``n``, ``n_positive``,
    ``folds``, ``repeats`` and ``null_sd`` (see ``null_auc_sd``).
    """
    x = np.asarray(stats, dtype=np.float64)
    y = _binary_labels(labels)
    if x.ndim != 2 or len(x) != len(y) or not np.isfinite(x).all():
        raise HistotransferError(f"shortcut check: colour statistics of shape {x.shape} must be finite, one row "
                                 f"per label ({len(y)}).")
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    splits, k, r = _splits(y, folds, repeats, seed, _patients(patients, len(y)))

    def predict(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        return model.fit(x[train], y[train]).predict_proba(x[test])[:, 1]

    return _result(y, _out_of_fold(predict, y, splits), k, r)


def group_shortcut_auc(groups: Sequence[Any] | np.ndarray, labels: Sequence[int] | np.ndarray, seed: int = 0,
                       folds: Folds = 5, repeats: int | None = None,
                       patients: Sequence[Any] | np.ndarray | None = None) -> dict[str, Any]:
    """Out-of-fold AUC of scoring each slide by its group's (e.g. centre's) share of positives among the
    training slides (the overall share for a group absent from training). Same folds and result as
    ``colour_shortcut_auc``."""
    g = pd.Series(np.asarray(groups, dtype=object))
    y = _binary_labels(labels)
    if len(g) != len(y) or g.isna().any():
        raise HistotransferError(f"shortcut check: {len(g)} groups for {len(y)} labels, or a missing group; give "
                                 "one group per slide.")
    splits, k, r = _splits(y, folds, repeats, seed, _patients(patients, len(y)))

    def predict(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        share = pd.Series(y[train]).groupby(g.iloc[train].to_numpy()).mean()
        return g.iloc[test].map(share).fillna(y[train].mean()).to_numpy(dtype=float)

    return _result(y, _out_of_fold(predict, y, splits), k, r)


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


def slide_colour_stats_of(attrs: Mapping[str, Mapping[str, Any]]) -> dict[str, np.ndarray | None]:
    """Each slide's colour statistics, read from the patch file its feature attrs name (``patch_file``); None
    for a slide whose patch file is gone or records none (CLAM/TRIDENT files, tilings made before)."""
    out: dict[str, np.ndarray | None] = {}
    for slide_id, a in attrs.items():
        stats = read_colour_stats(a["patch_file"]) if a.get("patch_file") else None
        ok = stats is not None and stats.shape == (len(COLOUR_STAT_NAMES),) and bool(np.isfinite(stats).all())
        out[slide_id] = stats if ok else None
    return out


def _check(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A check's result, or why it could not run (too few slides of a class, ...)."""
    try:
        return run()
    except HistotransferError as exc:
        return {"auc": None, "skipped": str(exc)}


def run_shortcut(slides: pd.DataFrame, stats: Mapping[str, np.ndarray | None], model_auc: float | None,
                 group_column: str | None = None, seed: int = 0, margin: float = DEFAULT_MARGIN) -> dict[str, Any]:
    """The shortcut check of a run's labelled ``slides`` (``slide_id``, ``patient_id``, ``label`` and, with
    ``group_column``, the group), as ``metrics.json["shortcut"]`` holds it.

    Both checks are cross-validated over all these slides with patient-level folds, out of fold: no slide is
    scored by a model fitted on it, and nothing of the MIL model (its split, training or predictions) is used,
    so it cannot leak into them. Slides without colour statistics are left out of the colour check and counted
    (``n_without_stats``). ``verdict`` compares ``model_auc`` (the run's test AUC) with the colour AUC.
    """
    known = {s: v for s in slides["slide_id"] if (v := stats.get(s)) is not None}
    have = list(known)
    part = slides.set_index("slide_id").loc[have]
    colour: dict[str, Any] = {"auc": None, "skipped": "no slide records colour statistics (patch files of other "
                                                      "tools, or tiled before they were recorded: re-tile)"}
    if have:
        colour = _check(lambda: colour_shortcut_auc(np.stack(list(known.values())),
                                                    part["label"].to_numpy(int), seed,
                                                    patients=part["patient_id"].to_numpy()))
    group = None
    if group_column is not None:
        group = _check(lambda: group_shortcut_auc(slides[group_column].to_numpy(), slides["label"].to_numpy(int),
                                                  seed, patients=slides["patient_id"].to_numpy()))
    colour_auc = colour.get("auc")
    verdict = None
    if colour_auc is not None and model_auc is not None:
        verdict = shortcut_verdict(model_auc, colour_auc, margin)
    return {"colour_auc": colour_auc, "group_auc": None if group is None else group.get("auc"),
            "n": len(have), "n_without_stats": len(slides) - len(have), "model_auc": model_auc, "margin": margin,
            "warning": bool(verdict and verdict.startswith("Warning")), "verdict": verdict,
            "colour": colour, "group": group, "group_column": group_column,
            "basis": "out-of-fold over every labelled slide of the run, patient-level folds; no MIL model output"}


def describe_shortcut(shortcut: Mapping[str, Any]) -> str:
    """The shortcut check in one line for the console."""
    if shortcut["colour_auc"] is None:
        why = (shortcut.get("colour") or {}).get("skipped", "")
        text = f"colour alone: not computed ({why}; {shortcut['n_without_stats']} slide(s) without colour statistics)"
    else:
        text = (f"colour alone AUC {shortcut['colour_auc']:.3f} (n={shortcut['n']}"
                + (f", {shortcut['n_without_stats']} without colour statistics" if shortcut["n_without_stats"] else "")
                + ")")
    if shortcut.get("group_auc") is not None:
        text += f", {shortcut['group_column']} alone AUC {shortcut['group_auc']:.3f}"
    return text + (f". {shortcut['verdict']}" if shortcut.get("verdict") else "")
