"""Read and write per-slide feature files (``features/<encoder_id>/<slide_id>.h5``).

Readers accept CLAM and TRIDENT files too: only ``features`` (N, D) and ``coords`` (N, 2) are required
(CLAM stores features as (N, D) and sometimes (1, N, D); both are accepted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import FormatError
from ..formats import FEATURES, check


@dataclass
class FeatureBag:
    """The features of one slide: one row per patch, with the patch's level-0 coordinates."""

    slide_id: str
    features: np.ndarray  # (N, D) float32
    coords: np.ndarray  # (N, 2) int64
    attrs: dict[str, Any] = field(default_factory=dict)


def _attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_feature_attrs(path: str | Path) -> dict[str, Any]:
    """The root attrs of a feature file, without loading its arrays."""
    with h5py.File(path, "r") as f:
        check(f, FEATURES, path, needs=("features", "coords"))
        return {k: _attr(v) for k, v in f.attrs.items()}


def read_feature_file(path: str | Path) -> FeatureBag:
    """Load one slide's features and coords as float32 / int64 arrays, validating shapes."""
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise FormatError(f"{path}: not a readable HDF5 file ({exc}); re-run extraction for this slide.") from exc
    with f:
        check(f, FEATURES, path, needs=("features", "coords"))
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
