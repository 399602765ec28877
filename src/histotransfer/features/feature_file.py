"""Read and write per-slide feature files (``features/<encoder_id>/<slide_id>.h5``).

Readers accept CLAM and TRIDENT files too: only ``features`` (N, D) and ``coords`` (N, 2) are required
(CLAM stores features as (N, D) and sometimes (1, N, D); both are accepted).

Our files record how they were made and from what (attrs, see docs/formats.md) and their own ``fingerprint``:
the sha256 of their coords and feature rows, computed while the rows are written. A run records the fingerprints
of the files it was trained on; for files without one (CLAM, TRIDENT) it is computed from the arrays.
"""

from __future__ import annotations

import hashlib
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .._io import atomic_path, ensure_space
from ..errors import FormatError
from ..formats import FEATURES, open_h5, stamp


@dataclass
class FeatureBag:
    """The features of one slide: one row per patch, with the patch's level-0 coordinates."""

    slide_id: str
    features: np.ndarray  # (N, D) float32
    coords: np.ndarray  # (N, 2) int64
    attrs: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""


def rows_fingerprint(coords: np.ndarray, features: np.ndarray) -> str:
    """The fingerprint of a feature file's contents, as :class:`FeatureWriter` computes it while writing."""
    h = _content_hash(coords)
    h.update(np.ascontiguousarray(features).tobytes())
    return h.hexdigest()


def _content_hash(coords: np.ndarray) -> Any:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(coords, dtype=np.int64).tobytes())
    return h


def first_non_finite(features: np.ndarray) -> int | None:
    """Index of the first row holding NaN or inf, None when every value is finite."""
    bad = ~np.isfinite(features).all(axis=1)
    return int(np.argmax(bad)) if bad.any() else None


_REEXTRACT = "re-run extraction for this slide"


# The attrs of a feature file that say how its features were made (absent in CLAM/TRIDENT files).
ENCODER_KEYS = (
    "encoder",
    "encoder_id",
    "truncate",
    "blocks",
    "weights",
    "weights_label",
    "weights_sha256",
    "input_size",
    "settings_fingerprint",
    "stain_tag",
    "stain_target",
)


def encoder_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """The attrs saying how a file's features were made, as plain JSON values (what runs record and compare)."""
    return {k: attrs[k].tolist() if hasattr(attrs[k], "tolist") else attrs[k] for k in ENCODER_KEYS if k in attrs}


class NonFiniteFeatures(FormatError):
    """A feature file holds NaN or inf: every number computed from that slide would be meaningless."""


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
    """Load one slide's features and coords as float32 / int64 arrays, validating shapes and values.

    A file holding NaN or inf is refused (FormatError naming the file and its first bad row): one such row
    would make every number computed from the slide meaningless."""
    path = Path(path)
    with open_h5(path, FEATURES, ("features", "coords"), _REEXTRACT) as f:
        stored = np.asarray(f["features"][()])
        coords = np.asarray(f["coords"][()], dtype=np.int64)
        attrs = {k: _attr(v) for k, v in f.attrs.items()}
    feats = stored.astype(np.float32, copy=False)
    if feats.ndim == 3 and feats.shape[0] == 1:
        feats = feats[0]
    if coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]
    if feats.ndim != 2 or coords.ndim != 2 or coords.shape[1] != 2 or len(feats) != len(coords):
        raise FormatError(f"{path}: expected features (N, D) and coords (N, 2), got {feats.shape} and {coords.shape}.")
    if len(feats) == 0:
        raise FormatError(f"{path}: holds no patches; re-tile the slide or drop it from the labels.")
    bad = first_non_finite(feats)
    if bad is not None:
        raise NonFiniteFeatures(
            f"{path}: row {bad} (patch at {tuple(int(v) for v in coords[bad])}) holds NaN or inf "
            "features; re-extract this slide."
        )
    fingerprint = str(attrs.get("fingerprint") or rows_fingerprint(coords, stored.reshape(feats.shape)))
    return FeatureBag(path.stem, feats, coords, attrs, fingerprint)


class _Discarded(Exception):
    """Raised into the temporary-file context to delete the file instead of renaming it."""


class FeatureWriter:
    """Stream one slide's features to ``path`` batch by batch, never holding them all in memory.

    ``open()`` starts a temporary file (``_io.atomic_path``); ``write()`` appends rows in coords order;
    ``close()`` records the contents' fingerprint and renames the file onto ``path`` once all ``len(coords)``
    rows are written; ``discard()`` deletes it.
    As a context manager it closes on success and discards on error. No timestamps are stored, so the same
    inputs give a byte-identical file.
    """

    def __init__(
        self,
        path: str | Path,
        coords: np.ndarray,
        dim: int,
        dtype: str = "float32",
        attrs: dict[str, Any] | None = None,
    ):
        self.path = Path(path)
        self.coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        self.dim = int(dim)
        self.dtype = np.dtype(dtype)
        self.attrs = attrs or {}
        self.rows_written = 0
        self._stack: ExitStack | None = None
        self._file: h5py.File | None = None
        self._features: h5py.Dataset | None = None
        self._hash = _content_hash(self.coords)

    def open(self) -> FeatureWriter:
        ensure_space(self.path, len(self.coords) * (self.dim * self.dtype.itemsize + 16))
        with ExitStack() as stack:
            tmp = stack.enter_context(atomic_path(self.path))
            f = self._file = stack.enter_context(h5py.File(tmp, "w"))
            stamp(f, FEATURES)
            for key, value in self.attrs.items():
                f.attrs[key] = value
            f.create_dataset("coords", data=self.coords, track_times=False)
            self._features = f.create_dataset(
                "features", shape=(len(self.coords), self.dim), dtype=self.dtype, track_times=False
            )
            self._stack = stack.pop_all()
        return self

    def write(self, rows: np.ndarray) -> None:
        """Append the next rows (in coords order)."""
        if self._features is None:
            raise ValueError(f"{self.path}: open() the writer before writing")
        rows = np.asarray(rows)
        end = self.rows_written + len(rows)
        if rows.ndim != 2 or rows.shape[1] != self.dim or end > len(self.coords):
            raise ValueError(
                f"{self.path}: rows of shape {rows.shape} do not fit ({len(self.coords)}, {self.dim}) "
                f"after {self.rows_written} rows"
            )
        rows = np.ascontiguousarray(rows.astype(self.dtype, copy=False))
        self._features[self.rows_written : end] = rows
        self._hash.update(rows.tobytes())
        self.rows_written = end

    @property
    def complete(self) -> bool:
        return self.rows_written == len(self.coords)

    def _take(self) -> ExitStack:
        stack, self._stack, self._features, self._file = self._stack, None, None, None
        if stack is None:
            raise ValueError(f"{self.path}: the writer is not open")
        return stack

    def close(self) -> None:
        """Publish the file under its final name; an incomplete file is deleted and raises ValueError."""
        if not self.complete:
            self.discard()
            raise ValueError(f"{self.path}: only {self.rows_written} of {len(self.coords)} rows were written")
        assert self._file is not None
        self._file.attrs["fingerprint"] = self._hash.hexdigest()
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
