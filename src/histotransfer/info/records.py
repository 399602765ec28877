"""What the pipeline's files record, read for ``info``: HDF5 attrs as plain JSON values, a stage report's
slides per status, a JSON record if readable, and the mapping whose keys are data (shown as they are).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .._read import read_csv
from ..batch import REPORT_COLUMNS, STATUS_ORDER
from ..errors import HistotransferError

FEATURES_RECORD = "features.json"

EXTRACT_REPORT = "extract.csv"

WHAT = (
    "pass a slide, a patch, feature or attention file (.h5), a tiling or patches folder, a feature folder, "
    "a run folder or a study folder"
)


class Keyed(dict):
    """A mapping keyed by data (slide ids, encoder ids, splits, statuses): its keys are shown as they are."""


def plain(value: Any) -> Any:
    """An HDF5 attr as a plain JSON value."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def h5_attrs(obj: h5py.HLObject) -> dict[str, Any]:
    return {k: plain(v) for k, v in obj.attrs.items()}


def open_h5_file(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise HistotransferError(f"{path}: not a readable HDF5 file ({exc}); {WHAT}.") from exc


def n_rows(dataset: h5py.Dataset) -> int:
    """Rows of an (N, K) dataset, or of CLAM's (1, N, K)."""
    return int(dataset.shape[-2]) if dataset.ndim >= 2 else int(dataset.shape[0])


def layout_of(root: dict[str, Any], coords: dict[str, Any]) -> str:
    """Who wrote an HDF5 file: ours (name and version), or CLAM/TRIDENT told apart by their ``coords`` attrs."""
    if "format" in root:
        return f"{root['format']} v{root.get('format_version')}"
    return "TRIDENT" if "patch_size_level0" in coords else "CLAM"


def status_counts(csv: Path) -> tuple[Keyed, Keyed] | tuple[None, None]:
    """A stage report's rows per status (in the report's status order) and its failed slides with the reason."""
    if not csv.is_file():
        return None, None
    df = read_csv(csv, text=True, usecols=lambda c: c in REPORT_COLUMNS)
    counts = Counter(df["status"])
    order = sorted(counts, key=lambda s: (STATUS_ORDER.index(s) if s in STATUS_ORDER else len(STATUS_ORDER), s))
    failed = df[df["status"] == "error"]
    return Keyed((s, counts[s]) for s in order), Keyed(zip(failed["slide_id"], failed["message"]))


def spread(counts: list[int]) -> dict[str, Any]:
    """min / median / max / total of per-slide patch counts."""
    if not counts:
        return {"min": None, "median": None, "max": None, "total": 0}
    return {"min": min(counts), "median": float(np.median(counts)), "max": max(counts), "total": sum(counts)}


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
