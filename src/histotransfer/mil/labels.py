"""Read and validate a slide label table against a folder of feature files.

Everything a training run needs from the user's CSV is checked here, before any file is written: a bad table
stops the run with an error naming the file and the fix.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .._io import h5_files
from ..errors import HistotransferError

ALLOWED_COLUMNS = ("slide_id", "label", "patient_id")
_TRUE = {"true", "t", "yes", "y"}
_FALSE = {"false", "f", "no", "n"}


@dataclass
class LabelTable:
    """Labelled slides that have feature files, and what was left out.

    ``frame`` has one row per slide (sorted by slide_id) with ``slide_id``, ``patient_id``, ``label`` (int
    class index) and ``label_name`` (the value as written in the CSV). ``classes`` maps each class index to
    its name (index 1 is the positive class for AUC).
    """

    frame: pd.DataFrame
    classes: list[str]
    path: Path
    ignored: list[str] = field(default_factory=list)

    @property
    def mapping(self) -> dict[str, int]:
        """Class name -> class index, as saved in a run's config."""
        return {name: i for i, name in enumerate(self.classes)}


def feature_files(features_dir: str | Path) -> dict[str, Path]:
    """``slide_id -> path`` for every ``<slide_id>.h5`` in ``features_dir``."""
    folder = Path(features_dir)
    if not folder.is_dir():
        raise HistotransferError(
            f"{folder}: no such features folder; pass the folder holding <slide_id>.h5 feature files "
            "(e.g. OUT/features/<encoder_id>)."
        )
    files = {p.stem: p for p in h5_files(folder)}
    if not files:
        raise HistotransferError(f"{folder}: holds no <slide_id>.h5 feature files; run `histotransfer extract` first.")
    return files


def read_user_csv(path: Path, kind: str, header: str) -> pd.DataFrame:
    """A CSV the user wrote (a ``kind`` file with columns ``header``) as strings, column names stripped.

    A missing, empty or unparsable file raises HistotransferError naming the file and the fix."""
    if not path.is_file():
        raise HistotransferError(f"{path}: no such {kind} file; pass a CSV with columns {header}.")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise HistotransferError(f"{path}: is empty; write a header {header} and one row per slide.")
    except pd.errors.ParserError as exc:
        raise HistotransferError(f"{path}: not a readable CSV ({' '.join(str(exc).split())}).") from exc
    df.columns = [str(c).strip() for c in df.columns]
    return df


def _normalise(values: pd.Series) -> tuple[list[str], pd.Series]:
    """Canonical class names and per-row names: 0/1 and true/false spellings are unified."""
    lowered = values.str.lower()
    uniq = set(lowered)
    if uniq <= {"0", "1", "0.0", "1.0"}:
        return ["0", "1"], lowered.map(lambda v: str(int(float(v))))
    if uniq <= _TRUE | _FALSE:
        return ["false", "true"], lowered.map(lambda v: "true" if v in _TRUE else "false")
    return sorted(set(values)), values


def _class_index(values: pd.Series, path: Path, classes: list[str] | None) -> tuple[list[str], pd.Series]:
    """Map label strings to class indices: 0/1, true/false, or two class names (sorted: the second is the
    positive class). With ``classes`` (a trained run's), every label must be one of them."""
    found, names = _normalise(values)
    if classes is not None:
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise HistotransferError(
                f"{path}: label(s) {', '.join(map(repr, unknown))} are not classes of the run "
                f"({', '.join(map(repr, classes))}); use the run's class names."
            )
        found = list(classes)
    elif len(found) > 2:
        raise HistotransferError(
            f"{path}: column 'label' holds {len(found)} classes ({', '.join(found[:6])}); histotransfer trains "
            "binary slide classifiers: use two classes (0/1, true/false or two names)."
        )
    return found, names.map({n: i for i, n in enumerate(found)})


def read_labels(labels_csv: str | Path, features_dir: str | Path, classes: list[str] | None = None) -> LabelTable:
    """Read ``slide_id,label[,patient_id]`` and check it against the feature files in ``features_dir``.

    Raises HistotransferError for: a missing or empty file, unknown or missing columns, empty cells, duplicate
    slide ids, labelled slides without a feature file, more than two classes or a single class. Slides with a
    feature file but no label are returned in ``ignored`` (and warned about). With ``classes`` (to evaluate
    a trained run) labels are mapped to those classes and one class is enough.
    """
    path = Path(labels_csv)
    df = read_user_csv(path, "label", "slide_id,label[,patient_id]")
    unknown = [c for c in df.columns if c not in ALLOWED_COLUMNS]
    if unknown:
        raise HistotransferError(
            f"{path}: unknown column(s) {', '.join(map(repr, unknown))}; allowed: slide_id, label, patient_id."
        )
    missing_cols = [c for c in ("slide_id", "label") if c not in df.columns]
    if missing_cols:
        raise HistotransferError(
            f"{path}: missing column(s) {', '.join(missing_cols)}; the header needs slide_id,label."
        )
    if df.empty:
        raise HistotransferError(f"{path}: has a header but no rows; add one row per slide.")
    df = df.apply(lambda col: col.str.strip())
    if "patient_id" not in df.columns:
        df["patient_id"] = df["slide_id"]
    df["patient_id"] = df["patient_id"].where(df["patient_id"] != "", df["slide_id"])
    for col in ("slide_id", "label"):
        empty = df.index[df[col] == ""]
        if len(empty):
            raise HistotransferError(f"{path}: empty '{col}' on line(s) {', '.join(str(i + 2) for i in empty[:5])}.")
    dup = df["slide_id"][df["slide_id"].duplicated()].unique()
    if len(dup):
        raise HistotransferError(
            f"{path}: duplicate slide_id(s) {', '.join(dup[:5])}; each slide must appear once."
        )
    files = feature_files(features_dir)
    absent = [s for s in df["slide_id"] if s not in files]
    if absent:
        more = f" and {len(absent) - 5} more" if len(absent) > 5 else ""
        raise HistotransferError(
            f"{path}: no feature file in {features_dir} for slide(s) {', '.join(absent[:5])}{more}; extract "
            "features for them or remove them from the label file."
        )
    fixed_classes = classes is not None
    classes, idx = _class_index(df["label"], path, classes)
    if not fixed_classes and idx.nunique() < 2:
        raise HistotransferError(
            f"{path}: every slide has label {df['label'].iloc[0]!r}; training needs slides of two classes."
        )
    frame = pd.DataFrame({
        "slide_id": df["slide_id"], "patient_id": df["patient_id"],
        "label": idx.astype(int), "label_name": df["label"],
    }).sort_values("slide_id", kind="stable").reset_index(drop=True)
    ignored = sorted(set(files) - set(frame["slide_id"]))
    if ignored:
        more = f" and {len(ignored) - 10} more" if len(ignored) > 10 else ""
        warnings.warn(
            f"{len(ignored)} slide(s) in {features_dir} have no label in {path} and are ignored: "
            f"{', '.join(ignored[:10])}{more}", stacklevel=2,
        )
    return LabelTable(frame, classes, path, ignored)
