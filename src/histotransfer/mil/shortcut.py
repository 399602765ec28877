"""Shortcut checks: how well slide colour alone, or the group (centre, staining batch) alone, predicts the
label, and whether that explains the model's AUC.

In a multi-centre cohort the centres differ in stain colour and often in the share of positive slides. A
classifier can then score well by recognising the centre. These checks measure that ceiling on the same
slides without using the slide's own label to score it:

* ``histotransfer.colour.slide_colour_stats``: per-slide colour statistics of the tissue pixels of a thumbnail,
  in optical density (RGB) and in haematoxylin/eosin/DAB; tiling records them in each patch file.
* ``colour_shortcut_auc``: the out-of-fold AUC of a standardised logistic regression on those statistics (a
  lower bound on what colour can tell: colour may separate the centres perfectly and still fit the label
  poorly through a linear model).
* ``group_shortcut_auc``: the AUC of scoring each slide by its group alone, with a permutation null.
* ``histotransfer.mil.batches``: staining batches inferred from colour when no group column is given.
* ``run_shortcut``: all of it on the labelled slides of a MIL run or evaluation, judged against the model's
  pooled and within-group AUC (``histotransfer.mil.verdict``), as ``metrics.json`` holds it
  (``shortcut``).

With ``patients`` the colour check's folds keep each patient's slides together (scikit-learn's
``StratifiedGroupKFold``), as the runs' own splits do: two slides of one patient share a staining batch, and one
of them in training would tell the other's label.

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
from .batches import describe_batches, infer_colour_batches
from .splits import SPLITS
from .verdict import scored_within, shortcut_verdict

DEFAULT_MARGIN = 0.05
DEFAULT_PERMUTATIONS = 1000
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


def _splits(
    y: np.ndarray, folds: Folds, repeats: int | None, seed: int, patients: np.ndarray | None = None
) -> tuple[Splits, int, int]:
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
    return (
        (
            pair
            for i in range(r)
            for pair in StratifiedGroupKFold(k, shuffle=True, random_state=seed + i).split(x, y, patients)
        ),
        k,
        r,
    )


def _out_of_fold(predict: Callable[[np.ndarray, np.ndarray], np.ndarray], y: np.ndarray, splits: Splits) -> np.ndarray:
    """Each slide's positive-class score averaged over the folds that tested it. A fold whose training part
    holds one class (possible when whole patients are dealt) scores its test slides by that training share."""
    total, times = np.zeros(len(y)), np.zeros(len(y))
    for train, test in splits:
        one_class = len(np.unique(y[train])) < 2
        total[test] += np.full(len(test), y[train].mean()) if one_class else predict(train, test)
        times[test] += 1
    if (times == 0).any():
        raise HistotransferError(
            "shortcut check: the cross-validation left some slides untested; use folds that test every slide."
        )
    return total / times


def _result(y: np.ndarray, scores: np.ndarray, k: int, r: int) -> dict[str, Any]:
    n1 = int(y.sum())
    n0 = len(y) - n1
    return {
        "auc": float(roc_auc_score(y, scores)),
        "n": len(y),
        "n_positive": n1,
        "folds": k,
        "repeats": r,
        "null_sd": null_auc_sd(n0, n1),
    }


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
        raise HistotransferError(
            f"shortcut check: {len(p)} patients for {n} labels, or a missing one; give one patient per slide."
        )
    return p.astype(str)


def colour_shortcut_auc(
    stats: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    seed: int = 0,
    folds: Folds = 5,
    repeats: int | None = None,
    patients: Sequence[Any] | np.ndarray | None = None,
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
        raise HistotransferError(
            f"shortcut check: colour statistics of shape {x.shape} must be finite, one row per label ({len(y)})."
        )
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    splits, k, r = _splits(y, folds, repeats, seed, _patients(patients, len(y)))

    def predict(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        return model.fit(x[train], y[train]).predict_proba(x[test])[:, 1]

    return _result(y, _out_of_fold(predict, y, splits), k, r)


def ordered_group_auc(positives: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    """AUC of the best group-only ranking from per-group counts of positive and negative slides (..., k):
    groups ordered by their share of positives (which maximises the AUC over all orders), the slides of a group
    tied. For two groups it is the AUC of the group indicator with the better sign; ``(a1 b0 + (a1 a0 + b1 b0)
    / 2) / (n1 n0)`` with group a the more positive one."""
    share = positives / np.maximum(positives + negatives, 1)
    order = np.argsort(share, axis=-1, kind="stable")
    pos, neg = np.take_along_axis(positives, order, -1), np.take_along_axis(negatives, order, -1)
    below = np.cumsum(neg, axis=-1) - neg
    return (pos * (below + 0.5 * neg)).sum(-1) / (positives.sum(-1) * negatives.sum(-1))


def _counts(codes: np.ndarray, y: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative slides per group of each row of group ``codes`` (rows, n) -> (rows, k) each."""
    flat = (codes + k * np.arange(len(codes))[:, None]).ravel()
    size = k * len(codes)
    pos = np.bincount(flat, weights=np.tile(y, len(codes)), minlength=size).reshape(-1, k)
    return pos, np.bincount(flat, minlength=size).reshape(-1, k) - pos


def group_shortcut_auc(
    groups: Sequence[Any] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    seed: int = 0,
    patients: Sequence[Any] | np.ndarray | None = None,
    permutations: int = DEFAULT_PERMUTATIONS,
) -> dict[str, Any]:
    """AUC that group membership (e.g. the centre) alone reaches for the 0/1 ``labels``, with a permutation null.

    Each slide is scored by its group only: the AUC of the best ordering of the groups (``ordered_group_auc``;
    for two groups the group indicator with the better sign). No slide's score depends on its own label the
    way out-of-fold target encoding does (there, a positive's own fold lowers its group's training share, which
    ranks slides against their labels and biases the AUC low). Choosing the order on the same slides favours
    the groups a little, most with many small groups; the permutation null measures exactly that: the groups
    are dealt at random over the patients (each patient, or slide without ``patients``, keeps its slides and
    labels; a patient with slides in two groups counts once per group) ``permutations`` times with ``seed``,
    and ``p_value`` is the share of dealings whose AUC reaches the observed one. Returns ``auc``, ``n``,
    ``n_positive``, ``n_groups``, ``per_group`` (name -> ``n``, ``n_positive``), ``null_mean``, ``null_p95``,
    ``p_value``, ``permutations``.
    """
    g = np.asarray(groups, dtype=object)
    y = _binary_labels(labels)
    if len(g) != len(y) or pd.isna(g).any():
        raise HistotransferError(
            f"shortcut check: {len(g)} groups for {len(y)} labels, or a missing group; give one group per slide."
        )
    codes, names = pd.factorize(g.astype(str), sort=True)
    k = len(names)
    pos, neg = _counts(codes[None, :], y, k)
    auc = float(ordered_group_auc(pos, neg)[0])
    p = _patients(patients, len(y))
    units = pd.DataFrame({"unit": np.arange(len(y)) if p is None else p, "group": codes})
    unit_of = units.groupby(["unit", "group"], sort=False).ngroup().to_numpy()
    first = np.unique(unit_of, return_index=True)[1]
    dealt = np.random.default_rng(seed).permuted(np.tile(codes[first], (permutations, 1)), axis=1)
    null = ordered_group_auc(*_counts(dealt[:, unit_of], y, k))
    return {
        "auc": auc,
        "n": len(y),
        "n_positive": int(y.sum()),
        "n_groups": k,
        "per_group": {
            str(name): {"n": int(pos[0, i] + neg[0, i]), "n_positive": int(pos[0, i])} for i, name in enumerate(names)
        },
        "null_mean": float(null.mean()),
        "null_p95": float(np.percentile(null, 95)),
        "p_value": float((1 + np.sum(null >= auc - 1e-12)) / (1 + permutations)),
        "permutations": permutations,
    }


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


def _split_groups(predictions: pd.DataFrame, group_of: pd.Series, seed: int) -> dict[str, Any] | None:
    """The group-only check on each split of a run's ``predictions`` (None without a ``split`` column)."""
    if "split" not in predictions.columns:
        return None

    def check(part: pd.DataFrame) -> dict[str, Any]:
        return _check(
            lambda: group_shortcut_auc(
                group_of.loc[part["slide_id"]].to_numpy(),
                part["label"].to_numpy(int),
                seed,
                part["patient_id"].to_numpy(),
            )
        )

    grouped = predictions[predictions["slide_id"].isin(group_of.index)]
    return {name: check(grouped[grouped["split"] == name]) for name in SPLITS}


def _groups(
    slides: pd.DataFrame, known: Mapping[str, np.ndarray], group_column: str | None, seed: int
) -> tuple[pd.Series | None, dict[str, Any] | None]:
    """slide_id -> group (the column's, or inferred staining batches when there is no column and the colour
    forms distinct batches; None otherwise) and the inferred batches (None with a column)."""
    if group_column is not None:
        return pd.Series(slides[group_column].astype(str).to_numpy(), index=slides["slide_id"]), None
    if not known:
        return None, None
    labels = slides.set_index("slide_id").loc[list(known), "label"].to_numpy(int)
    batches = infer_colour_batches(np.stack(list(known.values())), labels, list(known), seed)
    if batches["n_batches"] < 2:
        return None, batches
    return pd.Series(batches["batch_of"]), batches


def judge(
    check: Mapping[str, Any],
    scored: pd.DataFrame,
    model_auc: float | None,
    seed: int = 0,
    splits: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A shortcut ``check`` (what ``run_shortcut`` returns) judged against a model's ``scored`` slides
    (``slide_id``, ``label``, ``probability``, and the group column when the check has one) and its pooled
    ``model_auc``: the check with ``model_auc``, ``within`` (the model's ``within_group_auc`` by the check's
    groups), ``splits`` and ``warning``, ``reasons``, ``verdict``
    (:func:`~histotransfer.mil.verdict.shortcut_verdict`)."""
    column, batches = check.get("group_column"), check.get("batches") or {}
    group_of = None
    if column is not None:
        group_of = pd.Series(scored[column].astype(str).to_numpy(), index=scored["slide_id"])
    elif batches.get("n_batches", 1) > 1:
        group_of = pd.Series(batches["batch_of"])
    within = None if group_of is None else scored_within(scored, group_of, seed)
    judged: dict[str, Any] = {"warning": False, "reasons": [], "verdict": None}
    if model_auc is not None:
        judged = shortcut_verdict(
            model_auc,
            check.get("group"),
            within,
            check.get("colour_auc"),
            ((splits or {}).get("test") or None),
            check.get("group_name") or "group",
            check["margin"],
        )
    return {**check, "model_auc": model_auc, "within": within, "splits": splits, **judged}


def run_shortcut(
    predictions: pd.DataFrame,
    stats: Mapping[str, np.ndarray | None],
    model_auc: float | None,
    group_column: str | None = None,
    seed: int = 0,
    margin: float = DEFAULT_MARGIN,
) -> dict[str, Any]:
    """The shortcut check of a run's labelled, predicted slides (``slide_id``, ``patient_id``, ``label``,
    ``probability``, with ``split`` the run's split, and with ``group_column`` the group), as
    ``metrics.json["shortcut"]`` holds it.

    The label-only checks use all these slides and nothing of the model: colour alone (out of fold, patient-level
    folds), and the group alone (``group_shortcut_auc``) by ``group_column``, or, without one, by the staining
    batches inferred from colour (``histotransfer.mil.batches``; ``batches``). Slides without colour statistics
    are left out of the colour checks and counted (``n_without_stats``). The model is then judged (``judge``)
    on the test split (all slides without ``split``) against ``model_auc``, with the group-only AUC of each
    split (``splits``).
    """
    known = {s: v for s in predictions["slide_id"] if (v := stats.get(s)) is not None}
    have = list(known)
    part = predictions.set_index("slide_id").loc[have]
    colour: dict[str, Any] = {
        "auc": None,
        "skipped": "no slide records colour statistics (patch files of other "
        "tools, or tiled before they were recorded: re-tile)",
    }
    if have:
        colour = _check(
            lambda: colour_shortcut_auc(
                np.stack(list(known.values())),
                part["label"].to_numpy(int),
                seed,
                patients=part["patient_id"].to_numpy(),
            )
        )
    group_of, batches = _groups(predictions, known, group_column, seed)
    group = None
    if group_of is not None:
        grouped = predictions[predictions["slide_id"].isin(group_of.index)]
        group = _check(
            lambda: group_shortcut_auc(
                group_of.loc[grouped["slide_id"]].to_numpy(),
                grouped["label"].to_numpy(int),
                seed,
                grouped["patient_id"].to_numpy(),
            )
        )
    source = "column" if group_column is not None else ("colour batches" if group_of is not None else None)
    check = {
        "colour_auc": colour.get("auc"),
        "group_auc": None if group is None else group.get("auc"),
        "group_p_value": None if group is None else group.get("p_value"),
        "group_source": source,
        "group_name": group_column or ("colour batch" if group_of is not None else None),
        "n": len(have),
        "n_without_stats": len(predictions) - len(have),
        "margin": margin,
        "colour": colour,
        "group": group,
        "group_column": group_column,
        "batches": batches,
        "basis": "label-only checks over every labelled slide of the run (colour: out of fold, patient-level "
        "folds; group: permutation null over patients); the model is judged on its test slides",
    }
    scored = predictions[predictions["split"] == "test"] if "split" in predictions.columns else predictions
    splits = None if group_of is None else _split_groups(predictions, group_of, seed)
    return judge(check, scored, model_auc, seed, splits)


def _auc_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def describe_shortcut(shortcut: Mapping[str, Any]) -> str:
    """The shortcut check for the console: the evidence on one line, then the inferred batches, the
    group-only AUC of each split and the verdict, each on its own line."""
    if shortcut["colour_auc"] is None:
        why = (shortcut.get("colour") or {}).get("skipped", "")
        text = f"colour alone: not computed ({why}; {shortcut['n_without_stats']} slide(s) without colour statistics)"
    else:
        text = (
            f"colour alone AUC {shortcut['colour_auc']:.3f} (n={shortcut['n']}"
            + (f", {shortcut['n_without_stats']} without colour statistics" if shortcut["n_without_stats"] else "")
            + ")"
        )
    name = shortcut.get("group_name") or "group"
    if shortcut.get("group_auc") is not None:
        text += f", {name} alone AUC {shortcut['group_auc']:.3f} (permutation p={shortcut['group_p_value']:.2g})"
    within = shortcut.get("within") or {}
    if within.get("mean") is not None:
        text += (
            f", model within-{name} AUC {within['mean']:.3f} (95% CI {within['ci_low']:.3f}-{within['ci_high']:.3f})"
        )
    lines = [text]
    if shortcut.get("batches"):
        lines.append(describe_batches(shortcut["batches"]))
    if shortcut.get("splits"):
        lines.append(
            f"{name} alone AUC per split: "
            + ", ".join(f"{s} {_auc_text(r.get('auc'))}" for s, r in shortcut["splits"].items())
        )
    if shortcut.get("verdict"):
        lines.append(shortcut["verdict"])
    return "\n  ".join(lines)
