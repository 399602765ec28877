"""Read and write per-slide feature files (``features/<encoder_id>/<slide_id>.h5``).

Readers accept CLAM and TRIDENT files too: only ``features`` (N, D) and ``coords`` (N, 2) are required
(CLAM stores features as (N, D) and sometimes (1, N, D); both are accepted).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .._io import atomic_path
from ..errors import FormatError
from ..formats import FEATURES, open_h5, stamp


@dataclass
class FeatureBag:
    """The features of one slide: one row per patch, with the patch's level-0 coordinates."""

    slide_id: str
    features: np.ndarray  # (N, D) float32
    coords: np.ndarray  # (N, 2) int64
    attrs: dict[str, Any] = field(default_factory=dict)


_REEXTRACT = "re-run extraction for this slide"


def _attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_feature_attrs(path: str | Path) -> dict[str, Any]:
    """The root attrs of a feature file, without loading its arrays."""
    with open_h5(path, FEATURES, ("features", "coords"), _REEXTRACT) as f:
        return {k: _attr(v) for k, v in f.attrs.items()}


def read_feature_file(path: str | Path) -> FeatureBag:
    """Load one slide's features and coords as float32 / int64 arrays, validating shapes."""
    path = Path(path)
    with open_h5(path, FEATURES, ("features", "coords"), _REEXTRACT) as f:
        feats = np.asarray(f["features"][()], dtype=np.float32)
        coords = np.asarray(f["coords"][()], dtype=np.int64)
        attrs = {k: _attr(v) for k, v in f.attrs.items()}
    if feats.ndim == 3 and feats.shape[0] == 1:
        feats = feats[0]
    if coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]
    if feats.ndim != 2 or coords.ndim != 2 or coords.shape[1] != 2 or len(feats) != len(coords):
        raise FormatError(
            f"{path}: expected features (N, D) and coords (N, 2), got {feats.shape} and {coords.shape}."
        )
    if len(feats) == 0:
        raise FormatError(f"{path}: holds no patches; re-tile the slide or drop it from the labels.")
    return FeatureBag(path.stem, feats, coords, attrs)


class _Discarded(Exception):
    """Raised into the temporary-file context to delete the file instead of renaming it."""


class FeatureWriter:
    """Stream one slide's features to ``path`` batch by batch, never holding them all in memory.

    ``open()`` starts a temporary file (``_io.atomic_path``); ``write()`` appends rows in coords order;
    ``close()`` renames it onto ``path`` once all ``len(coords)`` rows are written; ``discard()`` deletes it.
    As a context manager it closes on success and discards on error. No timestamps are stored, so the same
    inputs give a byte-identical file.
    """

    def __init__(self, path: str | Path, coords: np.ndarray, dim: int, dtype: str = "float32",
                 attrs: dict[str, Any] | None = None):
        self.path = Path(path)
        self.coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        self.dim = int(dim)
        self.dtype = np.dtype(dtype)
        self.attrs = attrs or {}
        self.rows_written = 0
        self._stack: ExitStack | None = None
        self._features: h5py.Dataset | None = None

    def open(self) -> FeatureWriter:
        with ExitStack() as stack:
            tmp = stack.enter_context(atomic_path(self.path))
            f = stack.enter_context(h5py.File(tmp, "w"))
            stamp(f, FEATURES)
            for key, value in self.attrs.items():
                f.attrs[key] = value
            f.create_dataset("coords", data=self.coords, track_times=False)
            self._features = f.create_dataset("features", shape=(len(self.coords), self.dim), dtype=self.dtype,
                                              track_times=False)
            self._stack = stack.pop_all()
        return self

    def write(self, rows: np.ndarray) -> None:
        """Append the next rows (in coords order)."""
        if self._features is None:
            raise ValueError(f"{self.path}: open() the writer before writing")
        rows = np.asarray(rows)
        end = self.rows_written + len(rows)
        if rows.ndim != 2 or rows.shape[1] != self.dim or end > len(self.coords):
            raise ValueError(f"{self.path}: rows of shape {rows.shape} do not fit ({len(self.coords)}, {self.dim}) "
                             f"after {self.rows_written} rows")
        self._features[self.rows_written:end] = rows.astype(self.dtype, copy=False)
        self.rows_written = end

    @property
    def complete(self) -> bool:
        return self.rows_written == len(self.coords)

    def _take(self) -> ExitStack:
        stack, self._stack, self._features = self._stack, None, None
        if stack is None:
            raise ValueError(f"{self.path}: the writer is not open")
        return stack

    def close(self) -> None:
        """Publish the file under its final name; an incomplete file is deleted and raises ValueError."""
        if not self.complete:
            self.discard()
            raise ValueError(f"{self.path}: only {self.rows_written} of {len(self.coords)} rows were written")
        self._take().close()

    def discard(self) -> None:
        """Delete the temporary file; nothing appears under the final name."""
        err = _Discarded()
        self._take().__exit__(_Discarded, err, None)

    def __enter__(self) -> FeatureWriter:
        return self.open()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()
