"""Does group membership explain a model's AUC? The evidence and the verdict of the shortcut check.

A model that learned the centre (or staining batch) instead of the lesion ranks slides well across groups
whose share of positives differs, and at chance within each group. The verdict weighs:

* the model's **mean within-group AUC** with a 95% bootstrap interval (``within_group_auc``): the direct
  evidence, since inside one group the group cannot rank slides;
* the **group-only AUC** (``histotransfer.mil.shortcut.group_shortcut_auc``, with its permutation p-value),
  on all labelled slides and on the test split alone;
* the **colour-only AUC**, which only bounds what colour can tell from below (a linear model on colour may
  miss a centre that colour separates perfectly).

It warns when group membership is beyond chance and the model's pooled AUC comes within ``margin`` of it while
exceeding what the model's ranking within the groups supports (above the within-group interval: a model that reads
the tissue ranks slides across groups about as well as within them, however confounded the cohort), or the
within-group AUC is near chance (mean below ``WITHIN_FLOOR``, or, with an informative group, an interval
that reaches 0.5), or the test split alone is so confounded that the group reaches the model's test AUC. Colour
alone coming within the margin of the model is a reason only where no within-group AUC exists.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

WITHIN_FLOOR = 0.6
N_BOOT = 1000


def _pair_wins(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """1 where a positive outscores a negative, 0.5 for a tie, else 0: (n_pos, n_neg)."""
    return (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])


def within_group_auc(
    labels: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    groups: Sequence[Any] | np.ndarray,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean AUC within the groups that hold both classes, with a 95% percentile interval.

    The bootstrap resamples each group's positives and negatives separately (so every resample keeps both
    classes and the groups' sizes) and averages the groups' AUCs per resample. Returns ``mean``, ``ci_low``,
    ``ci_high`` (None when no group has both classes), ``n_groups`` (with both classes) and ``per_group``
    (group -> its AUC, None for a group with one class).
    """
    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=np.float64)
    g = np.asarray(groups, dtype=object).astype(str)
    rng = np.random.default_rng(seed)
    per: dict[str, float | None] = {}
    boots = []
    for name in sorted({str(v) for v in g}):
        inside = g == name
        pos, neg = s[inside & (y == 1)], s[inside & (y == 0)]
        if not len(pos) or not len(neg):
            per[name] = None
            continue
        wins = _pair_wins(pos, neg)
        per[name] = float(wins.mean())
        cp = rng.multinomial(len(pos), np.full(len(pos), 1 / len(pos)), size=n_boot)
        cn = rng.multinomial(len(neg), np.full(len(neg), 1 / len(neg)), size=n_boot)
        boots.append(((cp @ wins) * cn).sum(axis=1) / (len(pos) * len(neg)))
    aucs = [v for v in per.values() if v is not None]
    if not aucs:
        return {"mean": None, "ci_low": None, "ci_high": None, "n_groups": 0, "per_group": per}
    low, high = np.percentile(np.mean(boots, axis=0), [2.5, 97.5])
    return {
        "mean": float(np.mean(aucs)),
        "ci_low": float(low),
        "ci_high": float(high),
        "n_groups": len(aucs),
        "per_group": per,
    }


def scored_within(scored: pd.DataFrame, group_of: pd.Series, seed: int) -> dict[str, Any] | None:
    """``within_group_auc`` of scored slides (``slide_id``, ``label``, ``probability``) by ``group_of``
    (slide_id -> group; slides without one are left out); None when no slide has a group."""
    part = scored[scored["slide_id"].isin(group_of.index)]
    if not len(part):
        return None
    return within_group_auc(
        part["label"].to_numpy(int),
        part["probability"].to_numpy(float),
        group_of.loc[part["slide_id"]].to_numpy(),
        seed=seed,
    )


def _fmt_within(within: Mapping[str, Any]) -> str:
    return f"{within['mean']:.3f} (95% CI {within['ci_low']:.3f}-{within['ci_high']:.3f})"


def _informative(group: Mapping[str, Any] | None, alpha: float) -> bool:
    return bool(group and group.get("auc") is not None and group.get("p_value", 1.0) < alpha)


def shortcut_verdict(
    model_auc: float,
    group: Mapping[str, Any] | None = None,
    within: Mapping[str, Any] | None = None,
    colour_auc: float | None = None,
    test_group: Mapping[str, Any] | None = None,
    group_name: str = "group",
    margin: float = 0.05,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """The verdict on a model's (pooled) AUC from all the evidence: ``{"warning", "reasons", "verdict"}``.

    ``group``: the group-only check on all labelled slides (``auc``, ``p_value``); ``within``: the model's
    ``within_group_auc`` on the scored slides; ``colour_auc``: the colour-only AUC; ``test_group``: the
    group-only check on the test split alone. Any may be None. ``verdict`` is None when there is no evidence.
    """
    informative = _informative(group, alpha)
    has_within = bool(within and within.get("mean") is not None)
    reasons: list[str] = []
    if within is not None and has_within:
        if within["mean"] < WITHIN_FLOOR and (informative or model_auc >= within["mean"] + margin):
            reasons.append(f"the model's mean within-{group_name} AUC is {_fmt_within(within)}, near chance")
        elif informative and within["ci_low"] <= 0.5:
            reasons.append(
                f"the model's mean within-{group_name} AUC, {_fmt_within(within)}, cannot be told from "
                "chance on these slides"
            )
    explained = not has_within or within["ci_high"] < model_auc  # type: ignore[index]
    if informative and explained and model_auc <= (g := dict(group or {}))["auc"] + margin:
        reasons.append(
            f"{group_name} alone reaches AUC {g['auc']:.3f} (permutation p={g['p_value']:.2g}), "
            f"within {margin:.2f} of the model's {model_auc:.3f}"
        )
    test_auc = (test_group or {}).get("auc")
    if test_auc is not None and test_auc > 0.5 and test_auc >= model_auc - margin:
        reasons.append(
            f"on the test split alone {group_name} reaches AUC {test_auc:.3f}: the split is confounded "
            f"by {group_name}, so the model's test AUC {model_auc:.3f} cannot show it reads the tissue"
        )
    if not has_within and colour_auc is not None and colour_auc >= model_auc - margin:
        reasons.append(f"colour alone reaches AUC {colour_auc:.3f}, within {margin:.2f} of the model's {model_auc:.3f}")
    if reasons:
        steps = [
            f"check the within-{group_name} AUC (the direct evidence)",
            "where lesion annotations exist, let them supervise the attention (train --annotations)",
            "train on stain-normalised features (--stain-norm macenko) or balance training across "
            f"{group_name} (--balance groups, with --group-column)",
            f"collect slides of both classes in every {group_name}",
        ]
        if test_auc is not None and any("test split" in r for r in reasons):
            steps.insert(0, f"re-split stratified by {group_name} (--group-column) or cross-validate (--folds)")
        text = (
            f"Warning: the model's AUC {model_auc:.3f} may come from {group_name} membership rather than the "
            f"tissue: {'; '.join(reasons)}. Next: {'; '.join(steps)}."
        )
        return {"warning": True, "reasons": reasons, "verdict": text}
    return {
        "warning": False,
        "reasons": [],
        "verdict": _quiet(model_auc, group, within, colour_auc, group_name, margin, informative),
    }


def _quiet(
    model_auc: float,
    group: Mapping[str, Any] | None,
    within: Mapping[str, Any] | None,
    colour_auc: float | None,
    group_name: str,
    margin: float,
    informative: bool,
) -> str | None:
    """What the evidence shows when nothing warns (never an all-clear the evidence cannot give)."""
    said = []
    if within and within.get("mean") is not None:
        said.append(f"the model's mean within-{group_name} AUC is {_fmt_within(within)}")
    if group and group.get("auc") is not None:
        said.append(
            f"{group_name} alone reaches AUC {group['auc']:.3f}"
            + (
                f", more than {margin:.2f} below the model's {model_auc:.3f}"
                if informative
                else f", not beyond chance (permutation p={group['p_value']:.2g})"
            )
        )
    if colour_auc is not None:
        said.append(f"colour alone reaches AUC {colour_auc:.3f}")
    if not said:
        return None
    text = "; ".join(said)
    if within and within.get("mean") is not None:
        return f"The model ranks slides within each {group_name}: {text}."
    return (
        f"No within-group AUC to judge by: {text}. Without a group column or distinct colour batches, "
        "pass --group-column (e.g. centre) to check whether the model reads the centre."
    )
