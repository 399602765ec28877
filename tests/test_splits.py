"""Patient-level splits: never a patient in two splits, every class in every split when possible."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from histotransfer.errors import HistotransferError
from histotransfer.mil import train_mil
from histotransfer.mil.splits import (
    SPLITS,
    check_no_leak,
    kfold_splits,
    random_split,
    read_split_file,
    rule_split,
)
from histotransfer.mil.synthetic import planted_bags, write_feature_folder

CLASSES = ["0", "1"]


def random_cohort(rng: np.random.Generator) -> pd.DataFrame:
    """Slides of random patients: 1-4 slides each, class balance 10-90%, some patients with both classes."""
    n_patients = int(rng.integers(4, 50))
    p_pos = rng.uniform(0.1, 0.9)
    p_mixed = rng.choice([0.0, 0.0, 0.2])
    rows = []
    for p in range(n_patients):
        label = int(rng.random() < p_pos)
        for s in range(int(rng.integers(1, 5))):
            y = 1 - label if s and rng.random() < p_mixed else label
            rows.append({"slide_id": f"p{p}_s{s}", "patient_id": f"p{p}", "label": y})
    return pd.DataFrame(rows)


def pure_patients_per_class(frame: pd.DataFrame) -> pd.Series:
    labels = frame.groupby("patient_id")["label"].agg(lambda s: frozenset(s))
    return pd.Series({c: sum(1 for v in labels if v == frozenset({c})) for c in (0, 1)})


def test_no_patient_in_two_splits_over_many_cohorts_and_seeds():
    rng = np.random.default_rng(1234)
    n_split, n_error = 0, 0
    for trial in range(300):
        frame = random_cohort(rng)
        seed = int(rng.integers(0, 10_000))
        try:
            split = random_split(frame, CLASSES, seed=seed)
        except HistotransferError as exc:
            n_error += 1
            assert pure_patients_per_class(frame).min() < 3, f"trial {trial}: split refused needlessly: {exc}"
            assert "at least 3 patients per class" in str(exc)
            continue
        n_split += 1
        assert split["slide_id"].tolist() == frame["slide_id"].tolist()
        assert set(split["split"]) == set(SPLITS)
        assert (split.groupby("patient_id")["split"].nunique() == 1).all(), f"trial {trial}: patient leak"
        for name in SPLITS:
            assert set(split.loc[split["split"] == name, "label"]) == {0, 1}, f"trial {trial}: {name} lacks a class"
    assert n_split > 200 and n_error > 0  # both outcomes were exercised


def test_kfold_test_folds_partition_patients_and_never_leak():
    rng = np.random.default_rng(99)
    done = 0
    for trial in range(80):
        frame = random_cohort(rng)
        folds = int(rng.integers(2, 6))
        try:
            splits = kfold_splits(frame, CLASSES, folds, seed=trial)
        except HistotransferError as exc:
            assert "patients per class" in str(exc)
            continue
        done += 1
        assert len(splits) == folds
        tested = pd.concat([s.loc[s["split"] == "test", "slide_id"] for s in splits])
        assert sorted(tested) == sorted(frame["slide_id"])  # each slide is tested exactly once
        for s in splits:
            check_no_leak(s)
            assert set(s["split"]) == set(SPLITS)
    assert done > 40


def test_sixteen_slides_get_both_classes_in_val_and_test():
    frame = pd.DataFrame(
        {
            "slide_id": [f"s{i:02d}" for i in range(16)],
            "patient_id": [f"s{i:02d}" for i in range(16)],
            "label": [0, 1] * 8,
        }
    )
    for seed in range(50):
        split = random_split(frame, CLASSES, seed=seed)
        counts = split.groupby(["split", "label"]).size()
        assert counts.loc["val"].tolist() == [1, 1] and counts.loc["test"].tolist() == [2, 2]


def test_fractions_follow_the_paper_on_a_larger_cohort():
    frame = pd.DataFrame(
        {"slide_id": [f"s{i}" for i in range(200)], "patient_id": [f"s{i}" for i in range(200)], "label": [0, 1] * 100}
    )
    sizes = random_split(frame, CLASSES, seed=3)["split"].value_counts()
    assert sizes["train"] == 130 and sizes["val"] == 30 and sizes["test"] == 40


def test_too_few_patients_of_a_class_is_a_clear_error():
    frame = pd.DataFrame({"slide_id": list("abcdefg"), "patient_id": list("aabcdef"), "label": [1, 1, 1, 0, 0, 0, 0]})
    with pytest.raises(HistotransferError, match=r"class '1' has slides from only 2 patient.*--split-file"):
        random_split(frame, CLASSES, seed=0)


@pytest.fixture()
def cohort(tmp_path: Path) -> tuple[Path, Path, pd.DataFrame]:
    bags = planted_bags(12, n_patches=(5, 8), dim=4, seed=2)
    write_feature_folder(tmp_path / "features", bags)
    frame = pd.DataFrame(
        {
            "slide_id": [b.slide_id for b in bags],
            "label": [b.label for b in bags],
            "patient_id": [f"p{i // 2}" for i in range(12)],
        }
    )
    frame.to_csv(tmp_path / "labels.csv", index=False)
    return tmp_path / "features", tmp_path / "labels.csv", frame


def test_user_split_file_is_obeyed_exactly(tmp_path, cohort):
    features, labels, frame = cohort
    chosen = {"p0": "val", "p1": "test", "p2": "train", "p3": "val", "p4": "train", "p5": "test"}
    split = frame.assign(split=frame["patient_id"].map(chosen))[["slide_id", "split"]]
    split.to_csv(tmp_path / "split.csv", index=False)
    run = train_mil(features, labels, tmp_path / "run", epochs=1, split_file=tmp_path / "split.csv")
    saved = pd.read_csv(run / "splits.csv", dtype=str)
    assert dict(zip(saved["slide_id"], saved["split"])) == dict(zip(split["slide_id"], split["split"]))
    predicted = pd.read_csv(run / "predictions.csv", dtype=str)
    assert dict(zip(predicted["slide_id"], predicted["split"])) == dict(zip(split["slide_id"], split["split"]))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.assign(split=s["split"].where(s["slide_id"] != "slide_001", "test")), "more than one split"),
        (lambda s: s.assign(split=s["split"].replace("val", "valid")), "unknown split name.*'valid'"),
        (lambda s: s.iloc[1:], "slide_000.*have no split"),
        (
            lambda s: pd.concat([s, pd.DataFrame({"slide_id": ["ghost"], "split": ["train"]})]),
            "ghost.*not in the label",
        ),
        (
            lambda s: s.assign(split=np.where(s["slide_id"].isin(["slide_000", "slide_001"]), "train", "test")),
            "train split must hold slides of both classes",
        ),
    ],
)
def test_bad_split_files_are_refused(tmp_path, cohort, change, message):
    _, _, frame = cohort
    base = frame.assign(split=np.where(np.arange(12) < 8, "train", np.where(np.arange(12) < 10, "val", "test")))
    base = base.assign(split=base.groupby("patient_id")["split"].transform("first"))
    change(base[["slide_id", "split"]]).to_csv(tmp_path / "split.csv", index=False)
    with pytest.raises(HistotransferError, match=message):
        read_split_file(tmp_path / "split.csv", frame)


def test_split_with_one_class_in_val_warns(tmp_path, cohort):
    _, _, frame = cohort
    split = frame.assign(split=np.where(frame["patient_id"] == "p0", "val", "train"))
    split[["slide_id", "split"]].to_csv(tmp_path / "split.csv", index=False)
    with pytest.warns(UserWarning, match="val split holds one class"):
        out = read_split_file(tmp_path / "split.csv", frame)
    assert out.loc[out["split"] == "val", "slide_id"].tolist() == ["slide_000", "slide_001"]


def test_camelyon16_rule_puts_test_slides_in_test_and_draws_validation_from_training():
    ids = (
        [f"normal_{i:03d}" for i in range(1, 13)]
        + [f"tumor_{i:03d}" for i in range(1, 9)]
        + [f"test_{i:03d}" for i in range(1, 7)]
    )
    labels = [0] * 12 + [1] * 8 + [0, 1, 0, 1, 0, 1]
    frame = pd.DataFrame({"slide_id": ids, "patient_id": ids, "label": labels})
    split = rule_split(frame, ["normal", "tumor"], "camelyon16", seed=0).set_index("slide_id")["split"]
    assert (split[[s for s in ids if s.startswith("test_")]] == "test").all()
    train_val = split[[s for s in ids if not s.startswith("test_")]]
    assert set(train_val) == {"train", "val"}
    # 15/80 of each class's training patients go to validation, by largest remainder: 12 -> 2.25 -> 2,
    # 8 -> 1.5 -> 1 (train's 6.5 comes first among equal remainders)
    val = train_val[train_val == "val"].index
    assert sum(s.startswith("normal") for s in val) == 2 and sum(s.startswith("tumor") for s in val) == 1
    assert rule_split(frame, ["normal", "tumor"], "camelyon16", seed=0).equals(
        rule_split(frame, ["normal", "tumor"], "camelyon16", seed=0)
    )
    with pytest.raises(HistotransferError, match="no slide id matches"):
        rule_split(frame[~frame["slide_id"].str.startswith("test_")], ["normal", "tumor"], "camelyon16")
    with pytest.raises(HistotransferError, match="unknown"):
        rule_split(frame, ["normal", "tumor"], "camelyon17")
