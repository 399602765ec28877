"""Group-stratified (e.g. by centre) patient-level splits: every group in every split when the data allow it."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest

from histotransfer.errors import HistotransferError
from histotransfer.mil.splits import SPLITS, check_no_leak, kfold_splits, random_split

CLASSES = ["0", "1"]


def mixed_cohort(rng: np.random.Generator) -> pd.DataFrame:
    """6-39 patients of 1-3 slides; a patient's third slide has the other class."""
    rows = []
    for p in range(int(rng.integers(6, 40))):
        label = int(rng.random() < 0.5)
        for s in range(int(rng.integers(1, 4))):
            rows.append({"slide_id": f"p{p}_s{s}", "patient_id": f"p{p}", "label": label if s < 2 else 1 - label})
    return pd.DataFrame(rows)


def centre_cohort(rng: np.random.Generator, min_patients: int) -> pd.DataFrame:
    """2-5 centres of ``min_patients``-14 patients (1-2 slides each), each centre its own prevalence."""
    rows = []
    for c in range(int(rng.integers(2, 6))):
        prevalence = rng.uniform(0.1, 0.9)
        for p in range(int(rng.integers(min_patients, 15))):
            label = int(rng.random() < prevalence)
            rows += [
                {"slide_id": f"c{c}p{p}s{s}", "patient_id": f"c{c}p{p}", "label": label, "centre": f"C{c}"}
                for s in range(int(rng.integers(1, 3)))
            ]
    return pd.DataFrame(rows)


def assert_covered(split: pd.DataFrame, frame: pd.DataFrame) -> None:
    check_no_leak(split)
    assert split["slide_id"].tolist() == frame["slide_id"].tolist()
    assert split["centre"].tolist() == frame["centre"].tolist()
    for name in SPLITS:
        part = split[split["split"] == name]
        assert set(part["label"]) == {0, 1}, f"{name} lacks a class"
        assert set(part["centre"]) == set(frame["centre"]), f"{name} lacks a centre"


def test_without_a_group_column_the_splits_are_unchanged() -> None:
    """The hash of 40 cohorts' random splits and 3-fold splits (or refusals), made before groups existed."""
    rng = np.random.default_rng(2024)
    digest = hashlib.sha256()
    refused = 0
    for trial in range(40):
        frame = mixed_cohort(rng)
        try:
            digest.update(random_split(frame, CLASSES, seed=trial).to_csv(index=False).encode())
            for split in kfold_splits(frame, CLASSES, 3, seed=trial):
                digest.update(split.to_csv(index=False).encode())
        except HistotransferError as exc:
            refused += 1
            digest.update(str(exc).encode())
    assert 0 < refused < 40
    assert digest.hexdigest() == "4b799a291d56278e84fbceeb014c3ae06feef35f0173eab25ddec9726120412c"


def test_random_split_puts_every_centre_in_every_split() -> None:
    rng = np.random.default_rng(7)
    done = 0
    for trial in range(150):
        frame = centre_cohort(rng, min_patients=3)
        try:
            split = random_split(frame, CLASSES, seed=trial, group_column="centre")
        except HistotransferError as exc:  # too few patients of a class overall, as without centres
            assert "at least 3 patients per class" in str(exc)
            with pytest.raises(HistotransferError):
                random_split(frame, CLASSES, seed=trial)
            continue
        done += 1
        assert_covered(split, frame)
    assert done > 120


def test_kfold_puts_every_centre_in_every_split_of_every_fold() -> None:
    rng = np.random.default_rng(8)
    done = 0
    for trial in range(60):
        folds = int(rng.integers(2, 6))
        frame = centre_cohort(rng, min_patients=folds + 2)
        try:
            splits = kfold_splits(frame, CLASSES, folds, seed=trial, group_column="centre")
        except HistotransferError as exc:
            assert "patients per class" in str(exc)
            continue
        done += 1
        tested = pd.concat([s.loc[s["split"] == "test", "slide_id"] for s in splits])
        assert sorted(tested) == sorted(frame["slide_id"])  # test folds still partition the slides
        for split in splits:
            assert_covered(split, frame)
    assert done > 45


def test_a_small_centre_is_spread_over_the_splits() -> None:
    """Centre B has 3 patients: without the group column it can miss val or test; with it, never."""
    rows = [(f"A{i}", "A", i % 2) for i in range(30)] + [("B0", "B", 0), ("B1", "B", 1), ("B2", "B", 0)]
    frame = pd.DataFrame(rows, columns=["patient_id", "centre", "label"]).assign(slide_id=lambda f: f.patient_id)
    missed = 0
    for seed in range(30):
        plain = random_split(frame, CLASSES, seed=seed).assign(centre=frame["centre"])
        missed += any("B" not in set(plain.loc[plain["split"] == s, "centre"]) for s in SPLITS)
        split = random_split(frame, CLASSES, seed=seed, group_column="centre")
        assert_covered(split, frame)
        assert (split["split"] == "train").sum() >= 18  # the repair moves few patients
    assert missed > 0


def test_patient_with_slides_from_two_centres_stays_in_one_split() -> None:
    rng = np.random.default_rng(9)
    frame = centre_cohort(rng, min_patients=5)
    frame.loc[frame.index[:2], "patient_id"] = "shared"
    frame.loc[frame.index[:2], "centre"] = ["C0", "C1"]
    split = random_split(frame, CLASSES, seed=0, group_column="centre")
    check_no_leak(split)
    assert split.loc[split["patient_id"] == "shared", "split"].nunique() == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f.drop(columns="centre"), "group column 'centre' is not in the label table"),
        (lambda f: f.assign(centre=f["centre"].where(f.index != 3)), "slide.*have no group"),
        (lambda f: f.assign(centre=f["centre"].where(f.index != 3, " ")), "slide.*have no group"),
    ],
)
def test_bad_group_columns_are_refused(change, message) -> None:
    frame = change(centre_cohort(np.random.default_rng(1), min_patients=5))
    with pytest.raises(HistotransferError, match=message):
        random_split(frame, CLASSES, seed=0, group_column="centre")
    with pytest.raises(HistotransferError, match=message):
        kfold_splits(frame, CLASSES, 3, seed=0, group_column="centre")
