"""A slide's CAM file, ``<slide_id>.h5`` (docs/formats.md): written atomically, read back with its attributes as
plain values, and recognised as done when it records the same fingerprint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .._io import atomic_path
from ..formats import open_h5, stamp
from .cam import CamResult

CAM_FORMAT = ("histotransfer.cam", 1)


def _h5_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    return value.item() if isinstance(value, np.generic) else value


def read_cam_file(path: str | Path) -> dict[str, Any]:
    """A CAM file as ``{"cam", "raw", "coords", "rank", "row", "score", "attrs"}`` (attrs as plain values)."""
    keys = ("cam", "raw", "coords", "rank", "row", "score")
    with open_h5(path, CAM_FORMAT, keys, "re-run `histotransfer cam` for this slide") as f:
        out: dict[str, Any] = {k: f[k][()] for k in keys}
        out["attrs"] = {k: _h5_attr(v) for k, v in f.attrs.items()}
    return out


def cam_file_done(path: Path, fingerprint: str) -> bool:
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            return _h5_attr(f.attrs.get("cam_fingerprint")) == fingerprint
    except OSError:
        return False


def write_cam_file(path: Path, result: CamResult, record: dict[str, Any], fingerprint: str) -> None:
    """``<slide_id>.h5``: the maps, their patches and how they were made (docs/formats.md)."""
    arrays = {
        "cam": result.maps,
        "raw": result.raw,
        "coords": np.asarray(record["coords"], np.int64),
        "rank": np.arange(1, len(result.maps) + 1, dtype=np.int64),
        "row": np.asarray(record["rows"], np.int64),
        "score": np.asarray(record["score"], np.float32),
    }
    skip = {"coords", "rows", "score", "pixels", "dimensions"}
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        stamp(f, CAM_FORMAT)
        for key, value in record.items():
            if key not in skip and value is not None:
                f.attrs[key] = value
        f.attrs["cam_fingerprint"] = fingerprint
        for key, value in arrays.items():
            f.create_dataset(key, data=value, track_times=False)
