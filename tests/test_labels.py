"""Label tables: accepted spellings, and every bad table stops training before anything is written."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from histotransfer.errors import HistotransferError
from histotransfer.mil import train_mil
from histotransfer.mil.labels import read_labels
from histotransfer.mil.synthetic import planted_bags, write_feature_folder


@pytest.fixture()
def features(tmp_path: Path) -> Path:
    folder = tmp_path / "features"
    write_feature_folder(folder, planted_bags(6, n_patches=(4, 6), dim=4, seed=0))
    return folder


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return path


def rows(ids, labels, header="slide_id,label") -> str:
    return header + "\n" + "".join(f"{i},{y}\n" for i, y in zip(ids, labels))


IDS = [f"slide_{i:03d}" for i in range(6)]


@pytest.mark.parametrize(
    ("values", "classes", "expected"),
    [
        (["0", "1", "1", "0", "1", "0"], ["0", "1"], [0, 1, 1, 0, 1, 0]),
        (["True", "false", "TRUE", "False", "true", "false"], ["false", "true"], [1, 0, 1, 0, 1, 0]),
        (["tumor", "normal", "tumor", "normal", "normal", "tumor"], ["normal", "tumor"], [1, 0, 1, 0, 0, 1]),
    ],
)
def test_label_spellings_map_to_classes(tmp_path, features, values, classes, expected):
    table = read_labels(write(tmp_path, rows(IDS, values)), features)
    assert table.classes == classes
    assert table.frame["label"].tolist() == expected
    assert table.mapping == {c: i for i, c in enumerate(classes)}
    assert table.frame["patient_id"].tolist() == IDS  # patient defaults to the slide


def test_patient_column_and_unlabelled_slides_are_ignored_with_a_warning(tmp_path, features):
    text = "slide_id,label,patient_id\n" + "".join(f"{s},{i % 2},p{i // 2}\n" for i, s in enumerate(IDS[:4]))
    with pytest.warns(UserWarning, match="2 slide.*ignored.*slide_004, slide_005"):
        table = read_labels(write(tmp_path, text), features)
    assert table.ignored == ["slide_004", "slide_005"]
    assert table.frame["patient_id"].tolist() == ["p0", "p0", "p1", "p1"]


BAD = {
    "empty file": ("", "is empty"),
    "header only": ("slide_id,label\n", "no rows"),
    "semicolons": (
        "slide_id;label\n" + "".join(f"{s};{i % 2}\n" for i, s in enumerate(IDS)),
        "separated by semicolons.*columns slide_id,label",
    ),
    "classes differing by case": (
        rows(IDS, ["Tumor", "tumor", "normal", "Tumor", "normal", "normal"]),
        "'Tumor' and 'tumor' differ only by case",
    ),
    "missing label column": ("slide_id\n" + "\n".join(IDS) + "\n", "missing column"),
    "duplicate slide": (rows(IDS + IDS[:1], [0, 1, 0, 1, 0, 1, 0]), "duplicate slide_id.*slide_000"),
    "missing feature file": (rows([*IDS, "slide_999"], [0, 1, 0, 1, 0, 1, 1]), "no feature file.*slide_999"),
    "single class": (rows(IDS, ["tumor"] * 6), "two classes"),
    "three classes": (rows(IDS, ["a", "b", "c", "a", "b", "c"]), "3 classes"),
    "empty label": (rows(IDS, ["0", "1", "", "1", "0", "1"]), "empty 'label'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_label_file_errors_before_training_and_writes_nothing(tmp_path, features, case):
    text, message = BAD[case]
    labels = write(tmp_path, text)
    out = tmp_path / "run"
    with pytest.raises(HistotransferError, match=message) as err:
        train_mil(features, labels, out, epochs=1, protocol="split")
    assert str(labels) in str(err.value)
    assert not out.exists()


def test_missing_label_file_and_features_folder(tmp_path, features):
    with pytest.raises(HistotransferError, match="no such label file"):
        read_labels(tmp_path / "nope.csv", features)
    labels = write(tmp_path, rows(IDS, [0, 1] * 3))
    with pytest.raises(HistotransferError, match="no such features folder"):
        read_labels(labels, tmp_path / "nofeatures")


def test_run_classes_allow_one_class_and_reject_others(tmp_path, features):
    labels = write(tmp_path, rows(IDS[:3], ["tumor"] * 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = read_labels(labels, features, classes=["normal", "tumor"])
    assert table.frame["label"].tolist() == [1, 1, 1]
    with pytest.raises(HistotransferError, match="not classes of the run"):
        read_labels(labels, features, classes=["0", "1"])
