"""Patient-level train/val/test splits: stratified random, k-fold, or read from the user's file.

A patient's slides always land in one split. scikit-learn's ``StratifiedGroupKFold`` keeps groups together but
neither takes arbitrary fractions (65/15/20) nor guarantees that every class reaches a small val or test
split, so the allocation is done here: patients are grouped by the set of classes of their slides (their
stratum), each stratum is shuffled with the seed and dealt to the splits by the target fractions, then a
repair pass moves single patients so each split holds every class whenever the data allow it.

With a group column (e.g. ``centre``), a stratum is the patient's classes and groups, and a second repair
pass moves patients so that every group reaches every split too, never taking from a split a class or group
it would then lack. In k-fold, test folds must partition the patients, so there same-class patients are
swapped between test folds instead, until each test fold holds its share of each group. Groups are covered
whenever this greedy repair finds a way (in practice: for random splits when each group has 3 patients, for
k folds when it has k + 2); classes keep their guarantee.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import HistotransferError
from .labels import read_user_csv

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = {"train": 0.65, "val": 0.15, "test": 0.20}
# In k-fold, the share of the non-test patients used for validation: 15 / 80, as in the default split.
KFOLD_VAL_FRACTION = DEFAULT_FRACTIONS["val"] / (1 - DEFAULT_FRACTIONS["test"])
_COVER_ORDER = ("train", "test", "val")  # the order in which a split missing a class is repaired


def _patients(frame: pd.DataFrame, group_column: str | None = None) -> pd.DataFrame:
    """One row per patient (sorted): the set of classes of its slides, the set of their groups (empty
    without a group column) and its stratum name (classes first, so a class's patients sort together)."""
    by_patient = frame.groupby("patient_id", sort=True)
    out = pd.DataFrame({"classes": by_patient["label"].agg(lambda s: frozenset(int(v) for v in s))})
    out["stratum"] = ["+".join(map(str, sorted(c))) for c in out["classes"]]
    out["groups"] = [frozenset()] * len(out)
    if group_column is not None:
        out["groups"] = by_patient[group_column].agg(lambda s: frozenset(str(v) for v in s))
        out["stratum"] += "|" + pd.Series(["+".join(sorted(g)) for g in out["groups"]], index=out.index)
    return out


def _tokens(patients: pd.DataFrame) -> dict[str, frozenset]:
    """Per patient, what a split should cover: its classes and its groups."""
    return {
        p: frozenset({("class", c) for c in row.classes} | {("group", g) for g in row.groups})
        for p, row in patients.iterrows()
    }


def _check_groups(frame: pd.DataFrame, group_column: str | None) -> None:
    if group_column is None:
        return
    if group_column not in frame.columns:
        raise HistotransferError(
            f"group column {group_column!r} is not in the label table (columns: "
            f"{', '.join(map(str, frame.columns))}); add it or drop the group option."
        )
    if frame[group_column].isna().any() or (frame[group_column].astype(str).str.strip() == "").any():
        missing = frame.loc[
            frame[group_column].isna() | (frame[group_column].astype(str).str.strip() == ""), "slide_id"
        ]
        raise HistotransferError(
            f"group column {group_column!r}: slide(s) {', '.join(map(str, missing[:5]))} "
            "have no group; fill it in for every slide."
        )


def _largest_remainder(n: int, fractions: list[float]) -> list[int]:
    """Split ``n`` items into integer counts proportional to ``fractions``, at least one per nonzero share
    when there are enough items."""
    raw = np.asarray(fractions, dtype=float) * n / sum(fractions)
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    wanted = [i for i, f in enumerate(fractions) if f > 0]
    if n >= len(wanted):
        for i in wanted:
            if counts[i] == 0:
                counts[int(np.argmax(counts))] -= 1
                counts[i] = 1
    return counts.tolist()


def _deal(patients: pd.DataFrame, fractions: dict[str, float], rng: np.random.Generator) -> dict[str, str]:
    """Assign each patient to a split, stratum by stratum, in proportion to ``fractions``."""
    names = list(fractions)
    assign: dict[str, str] = {}
    for _, group in patients.groupby("stratum", sort=True):
        ids = list(group.index[rng.permutation(len(group))])
        start = 0
        for name, count in zip(names, _largest_remainder(len(ids), [fractions[n] for n in names])):
            assign.update({p: name for p in ids[start : start + count]})
            start += count
    order = [n for n in _COVER_ORDER if n in names and fractions[n] > 0]
    _cover(assign, patients["classes"].to_dict(), order, rng)
    if patients["groups"].map(len).any():
        _cover(assign, _tokens(patients), order, rng)
    return assign


def _cover(assign: dict[str, str], pclasses: dict[str, frozenset], splits: list[str], rng: np.random.Generator) -> None:
    """Move single patients into splits that miss a class, only from splits that keep all their classes.

    Donors are taken from the largest split first, and single-class patients before mixed ones. The
    "classes" may be any sortable tokens (classes and groups, see ``_tokens``)."""
    all_classes = sorted(set().union(*pclasses.values()))
    for target in splits:
        for c in all_classes:
            members = {s: sorted(p for p in assign if assign[p] == s) for s in splits}
            if any(c in pclasses[p] for p in members[target]):
                continue
            candidates = []
            for donor in splits:
                if donor == target or len(members[donor]) < 2:
                    continue
                have = set().union(*(pclasses[p] for p in members[donor]))
                for p in members[donor]:
                    rest = set().union(*(pclasses[q] for q in members[donor] if q != p))
                    if c in pclasses[p] and rest >= have:
                        candidates.append((-len(members[donor]), len(pclasses[p]), p))
            if candidates:
                order = rng.permutation(len(candidates))
                best = min(range(len(candidates)), key=lambda i: (candidates[i][:2], order[i]))
                assign[candidates[best][2]] = target


def _missing(split: pd.DataFrame, names: list[str], n_classes: int) -> dict[str, list[int]]:
    """Classes (of ``0..n_classes-1``) absent from each split name in ``names``."""
    return {s: [c for c in range(n_classes) if c not in set(split.loc[split["split"] == s, "label"])] for s in names}


def _too_small(frame: pd.DataFrame, classes: list[str], needed: int, what: str) -> HistotransferError:
    counts = frame.groupby("label")["patient_id"].nunique().reindex(range(len(classes)), fill_value=0)
    worst = int(counts.idxmin())
    return HistotransferError(
        f"class {classes[worst]!r} has slides from only {int(counts.min())} patient(s); {what} needs at least "
        f"{needed} patients per class so that every split holds both classes (validation AUC picks the model, "
        "test AUC reports it). Label more slides, or pass --split-file with your own split (a val or test "
        "split with one class then gets no AUC)."
    )


def check_no_leak(split: pd.DataFrame, source: str | Path = "split") -> None:
    """Raise HistotransferError if a patient has slides in two splits."""
    per_patient = split.groupby("patient_id")["split"].nunique()
    leaked = per_patient.index[per_patient > 1].tolist()
    if leaked:
        raise HistotransferError(
            f"{source}: patient(s) {', '.join(map(str, leaked[:5]))} have slides in more than one split; put all "
            "slides of a patient in the same split."
        )


def _columns(group_column: str | None) -> list[str]:
    return ["slide_id", "patient_id", "label", *([group_column] if group_column else [])]


def random_split(
    frame: pd.DataFrame,
    classes: list[str],
    seed: int = 0,
    fractions: dict[str, float] | None = None,
    group_column: str | None = None,
) -> pd.DataFrame:
    """Patient-level stratified split of ``frame`` (slide_id, patient_id, label) into train/val/test.

    Fractions (default 65/15/20) are of patients within each stratum. Each split gets every class whenever
    each class has at least 3 patients; otherwise HistotransferError explains the minimum. With
    ``group_column`` (kept in the output), strata are (classes, groups) and every group reaches every split
    when the data allow it (see the module doc).
    """
    _check_groups(frame, group_column)
    fractions = dict(fractions or DEFAULT_FRACTIONS)
    rng = np.random.default_rng(seed)
    assign = _deal(_patients(frame, group_column), fractions, rng)
    out = frame[_columns(group_column)].copy()
    out["split"] = out["patient_id"].map(assign)
    used = [s for s in SPLITS if fractions.get(s, 0) > 0]
    if any(_missing(out, used, len(classes)).values()):
        raise _too_small(frame, classes, len(used), "a patient-level train/val/test split")
    check_no_leak(out)
    return out


def _spread_groups(fold_of: dict[str, int], patients: pd.DataFrame, folds: int) -> None:
    """Swap patients of the same classes between test folds until each fold holds its share of each group.

    A group of n patients should have at least ``n // folds`` of them in every test fold (so at least one
    when n >= folds, and the rest left for train and val). A patient of a group g moves into a fold below
    its share of g from a fold above it; in exchange, a patient of the same classes moves back, taken only
    from groups that the receiving fold holds above their share. Class counts per fold stay as they were;
    each swap raises one fold's count towards its share and lowers none below it, so the loop ends."""
    groups, classes = patients["groups"].to_dict(), patients["classes"].to_dict()
    count: list[Counter[str]] = [Counter() for _ in range(folds)]  # patients of each group per fold
    for p, k in fold_of.items():
        count[k].update(groups[p])
    share = {g: n // folds for g, n in sum(count, Counter()).items()}

    def spare(p: str) -> bool:  # p's fold stays at or above its share of each of p's groups without p
        return all(count[fold_of[p]][h] > share[h] for h in groups[p])

    def move(p: str, k: int) -> None:
        count[fold_of[p]].subtract(groups[p])
        count[k].update(groups[p])
        fold_of[p] = k

    ordered = sorted(fold_of)
    changed = True
    while changed:
        changed = False
        for k in range(folds):
            for g in sorted(share):
                if count[k][g] >= share[g]:
                    continue
                pairs = (
                    (p, q)
                    for p in ordered
                    if g in groups[p] and spare(p)
                    for q in ordered
                    if fold_of[q] == k and classes[q] == classes[p] and spare(q)
                )
                pair = next(pairs, None)
                if pair is not None:
                    p, q = pair
                    j = fold_of[p]
                    move(p, k)
                    move(q, j)
                    changed = True


def kfold_splits(
    frame: pd.DataFrame,
    classes: list[str],
    folds: int,
    seed: int = 0,
    val_fraction: float = KFOLD_VAL_FRACTION,
    group_column: str | None = None,
) -> list[pd.DataFrame]:
    """Patient-level stratified k-fold: fold k's patients are the test split, the rest are split into
    train/val (``val_fraction`` of them, stratified). Test folds partition the patients. With
    ``group_column`` (kept in the output), every group reaches every split when the data allow it."""
    if folds < 2:
        raise HistotransferError(f"--folds {folds}: cross-validation needs at least 2 folds.")
    _check_groups(frame, group_column)
    rng = np.random.default_rng(seed)
    patients = _patients(frame, group_column)
    fold_of: dict[str, int] = {}
    offset = 0
    for _, group in patients.groupby("stratum", sort=True):
        ids = list(group.index[rng.permutation(len(group))])
        fold_of.update({p: (offset + i) % folds for i, p in enumerate(ids)})
        offset += len(ids)
    if group_column is not None:
        _spread_groups(fold_of, patients, folds)
    out = []
    for k in range(folds):
        rest = patients.loc[[p for p in patients.index if fold_of[p] != k]]
        assign = _deal(rest, {"train": 1 - val_fraction, "val": val_fraction}, rng)
        assign.update({p: "test" for p in patients.index if fold_of[p] == k})
        split = frame[_columns(group_column)].copy()
        split["split"] = split["patient_id"].map(assign)
        if any(_missing(split, list(SPLITS), len(classes)).values()):
            raise _too_small(frame, classes, folds + 2, f"{folds}-fold cross-validation")
        check_no_leak(split)
        out.append(split)
    return out


# Official splits known by name: a slide whose id matches the pattern is in the test split.
SPLIT_RULES = {
    # CAMELYON16: 270 training slides (normal_NNN, tumor_NNN) and 129 test slides (test_NNN).
    "camelyon16": re.compile(r"^test_\d+$", re.IGNORECASE),
}


def rule_split(
    frame: pd.DataFrame,
    classes: list[str],
    rule: str,
    seed: int = 0,
    val_fraction: float = KFOLD_VAL_FRACTION,
    group_column: str | None = None,
) -> pd.DataFrame:
    """A dataset's official split (``SPLIT_RULES``): its test slides are the test split; validation is drawn
    from the training slides (``val_fraction`` of their patients, stratified, seeded, patient-level)."""
    if rule not in SPLIT_RULES:
        raise HistotransferError(f"split rule {rule!r}: unknown; known rules: {', '.join(SPLIT_RULES)}.")
    _check_groups(frame, group_column)
    is_test = frame["slide_id"].map(lambda sid: bool(SPLIT_RULES[rule].match(str(sid))))
    if not is_test.any() or is_test.all():
        which = "no" if not is_test.any() else "every"
        raise HistotransferError(
            f"split rule {rule!r}: {which} slide id matches its test naming "
            f"({SPLIT_RULES[rule].pattern}); check the slide ids or use another split."
        )
    test_patients = set(frame.loc[is_test, "patient_id"])
    patients = _patients(frame, group_column)
    rest = patients.loc[[p for p in patients.index if p not in test_patients]]
    assign = _deal(rest, {"train": 1 - val_fraction, "val": val_fraction}, np.random.default_rng(seed))
    assign.update({p: "test" for p in test_patients})
    out = frame[_columns(group_column)].copy()
    out["split"] = out["patient_id"].map(assign)
    check_no_leak(out, f"split rule {rule!r}")
    missing = _missing(out, list(SPLITS), len(classes))
    if missing["train"] or missing["val"]:
        raise _too_small(frame, classes, 2, f"the {rule} split's train/val part")
    return out


def read_split_file(path: str | Path, frame: pd.DataFrame) -> pd.DataFrame:
    """The user's split (``slide_id,split``; other columns, e.g. of a run's splits.csv, are ignored), obeyed
    exactly. It must name every labelled slide and no other; splits are train/val/test; train needs two
    classes; a patient may not be in two splits. A val or test split with one class is warned about."""
    path = Path(path)
    df = read_user_csv(path, "split", "slide_id,split")
    if not {"slide_id", "split"} <= set(df.columns):
        raise HistotransferError(f"{path}: needs columns slide_id,split (found {', '.join(df.columns)}).")
    df = df[["slide_id", "split"]].apply(lambda c: c.str.strip())
    dup = df["slide_id"][df["slide_id"].duplicated()].unique()
    if len(dup):
        raise HistotransferError(f"{path}: duplicate slide_id(s) {', '.join(dup[:5])}.")
    bad = sorted(set(df["split"]) - set(SPLITS))
    if bad:
        raise HistotransferError(f"{path}: unknown split name(s) {', '.join(map(repr, bad))}; use train, val or test.")
    extra = sorted(set(df["slide_id"]) - set(frame["slide_id"]))
    if extra:
        raise HistotransferError(f"{path}: slide(s) {', '.join(extra[:5])} are not in the label file; remove them.")
    absent = sorted(set(frame["slide_id"]) - set(df["slide_id"]))
    if absent:
        raise HistotransferError(
            f"{path}: labelled slide(s) {', '.join(absent[:5])} have no split; add them or remove them from the "
            "label file."
        )
    out = frame.drop(columns="split", errors="ignore").merge(df, on="slide_id", how="left")  # keeps group columns
    check_no_leak(out, path)
    missing = _missing(out, list(SPLITS), int(frame["label"].max()) + 1)
    if missing["train"] or not (out["split"] == "train").any():
        raise HistotransferError(f"{path}: the train split must hold slides of both classes.")
    for s in ("val", "test"):
        if (out["split"] == s).any() and missing[s]:
            warnings.warn(f"{path}: the {s} split holds one class only; its AUC is undefined.", stacklevel=2)
    return out
