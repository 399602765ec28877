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
from .._read import check_regular_file, read_csv
from ..errors import HistotransferError

REQUIRED_COLUMNS = ("slide_id", "label")
_TRUE = {"true", "t", "yes", "y"}
_FALSE = {"false", "f", "no", "n"}


@dataclass
class LabelTable:
    """Labelled slides that have feature files, and what was left out.

    ``frame`` has one row per slide (sorted by slide_id) with ``slide_id``, ``patient_id``, ``label`` (int
    class index), ``label_name`` (the value as written in the CSV) and any further columns of the file
    (``extra``, e.g. ``centre``), kept as text. ``classes`` maps each class index to its name (index 1 is the
    positive class for AUC).
    """

    frame: pd.DataFrame
    classes: list[str]
    path: Path
    ignored: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)

    @property
    def positive_class(self) -> str:
        """The class whose probability is reported (AUC is of this class against the other)."""
        return self.classes[1] if len(self.classes) > 1 else self.classes[0]

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

    A missing, empty, special (a pipe), unparsable or non-UTF-8/16 file raises HistotransferError naming the file
    and the fix."""
    check_regular_file(path, kind)
    if not path.is_file():
        raise HistotransferError(f"{path}: no such {kind} file; pass a CSV with columns {header}.")
    try:
        df = read_csv(path, text=True, kind=kind, skipinitialspace=True)
    except pd.errors.EmptyDataError as exc:
        raise HistotransferError(f"{path}: is empty; write a header {header} and one row per slide.") from exc
    except pd.errors.ParserError as exc:
        raise HistotransferError(f"{path}: not a readable CSV ({' '.join(str(exc).split())}).") from exc
    df.columns = [str(c).strip() for c in df.columns]
    if len(df.columns) == 1:
        header = df.columns[0]
        for sep, name in ((";", "semicolons"), ("\t", "tabs"), ("|", "bars")):
            if sep in header:
                raise HistotransferError(
                    f"{path}: its header {header!r} is separated by {name}, not commas; save the file as a "
                    f"comma-separated CSV (columns {header.replace(sep, ',')})."
                )
    return df


def _normalise(values: pd.Series, path: Path) -> tuple[list[str], pd.Series]:
    """Canonical class names and per-row names: 0/1 and true/false spellings are unified; names that differ
    only by case are refused (one class written two ways would silently become two classes)."""
    lowered = values.str.lower()
    uniq = set(lowered)
    if uniq <= {"0", "1", "0.0", "1.0"}:
        return ["0", "1"], lowered.map(lambda v: str(int(float(v))))
    if uniq <= _TRUE | _FALSE:
        return ["false", "true"], lowered.map(lambda v: "true" if v in _TRUE else "false")
    names = sorted(set(values))
    by_lower: dict[str, list[str]] = {}
    for name in names:
        by_lower.setdefault(" ".join(name.lower().split()), []).append(name)
    clashes = [spellings for spellings in by_lower.values() if len(spellings) > 1]
    if clashes:
        shown = "; ".join(" and ".join(map(repr, c)) for c in clashes)
        raise HistotransferError(
            f"{path}: label(s) {shown} differ only by case or spacing; write each class the same way on every row."
        )
    return names, values


def _class_index(values: pd.Series, path: Path, classes: list[str] | None) -> tuple[list[str], pd.Series]:
    """Map label strings to class indices: 0/1, true/false, or two class names (sorted: the second is the
    positive class). With ``classes`` (a trained run's), every label must be one of them."""
    found, names = _normalise(values, path)
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


def parse_labels(labels_csv: str | Path, classes: list[str] | None = None) -> LabelTable:
    """Read and check a label table ``slide_id,label[,patient_id,...]`` on its own (no feature files needed).

    Raises HistotransferError for: a missing or empty file, a file separated by something other than commas,
    missing columns, empty cells, duplicate slide ids, class names that differ only by case, more than two
    classes or a single class. Further columns (e.g. ``centre``) are kept. With ``classes`` (to evaluate a
    trained run) labels are mapped to those classes and one class is enough.
    """
    path = Path(labels_csv)
    df = read_user_csv(path, "label", "slide_id,label[,patient_id]")
    missing_cols = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing_cols:
        raise HistotransferError(
            f"{path}: missing column(s) {', '.join(missing_cols)} (found {', '.join(map(repr, df.columns))}); the "
            "header needs slide_id,label."
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
        raise HistotransferError(f"{path}: duplicate slide_id(s) {', '.join(dup[:5])}; each slide must appear once.")
    fixed_classes = classes is not None
    classes, idx = _class_index(df["label"], path, classes)
    if not fixed_classes and idx.nunique() < 2:
        raise HistotransferError(
            f"{path}: every slide has label {df['label'].iloc[0]!r}; training needs slides of two classes."
        )
    extra = [c for c in df.columns if c not in ("slide_id", "label", "patient_id")]
    frame = (
        pd.DataFrame(
            {
                "slide_id": df["slide_id"],
                "patient_id": df["patient_id"],
                "label": idx.astype(int),
                "label_name": df["label"],
                **{c: df[c] for c in extra},
            }
        )
        .sort_values("slide_id", kind="stable")
        .reset_index(drop=True)
    )
    return LabelTable(frame, classes, path, extra=extra)


def read_labels(labels_csv: str | Path, features_dir: str | Path, classes: list[str] | None = None) -> LabelTable:
    """:func:`parse_labels`, checked against the feature files in ``features_dir``: a labelled slide without a
    feature file is an error; slides with a feature file but no label are returned in ``ignored`` (and warned
    about)."""
    table = parse_labels(labels_csv, classes)
    files = feature_files(features_dir)
    absent = [s for s in table.frame["slide_id"] if s not in files]
    if absent:
        more = f" and {len(absent) - 5} more" if len(absent) > 5 else ""
        raise HistotransferError(
            f"{table.path}: no feature file in {features_dir} for slide(s) {', '.join(absent[:5])}{more}; extract "
            "features for them or remove them from the label file."
        )
    table.ignored = sorted(set(files) - set(table.frame["slide_id"]))
    if table.ignored:
        more = f" and {len(table.ignored) - 10} more" if len(table.ignored) > 10 else ""
        warnings.warn(
            f"{len(table.ignored)} slide(s) in {features_dir} have no label in {table.path} and are ignored: "
            f"{', '.join(table.ignored[:10])}{more}",
            stacklevel=2,
        )
    return table
