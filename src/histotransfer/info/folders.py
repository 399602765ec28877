"""``info`` of the stage folders before training: a tiling or patches folder and a feature folder (slides,
patch counts, statuses, stale feature files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .._io import h5_files
from ..patches import REPORT_FILE, find_tiling, read_patch_file
from .records import (
    EXTRACT_REPORT,
    FEATURES_RECORD,
    Keyed,
    n_rows,
    open_h5_file,
    plain,
    read_json,
    spread,
    status_counts,
)


def _feature_folders(root: Path | None) -> Keyed:
    """The feature folders of a tiling (``<tiling>/features/<encoder_id>/``) and their slide counts."""
    base = root / "features" if root is not None else None
    if base is None or not base.is_dir():
        return Keyed()
    return Keyed(
        (d.name, {"slides": len(h5_files(d))})
        for d in sorted(base.iterdir())
        if d.is_dir() and ((d / FEATURES_RECORD).is_file() or h5_files(d))
    )


def describe_tiling(path: Path) -> dict[str, Any]:
    """Name, settings, slides, patches per slide, ``tiling.csv`` statuses and feature folders of a tiling
    (or of a bare folder of CLAM/TRIDENT patch files)."""
    tiling = find_tiling(path)
    counts = []
    for p in tiling.files:
        with open_h5_file(p) as f:
            counts.append(n_rows(f["coords"]))
    statuses, failed = status_counts(tiling.root / REPORT_FILE) if tiling.root else (None, None)
    return {
        "kind": "tiling" if tiling.root is not None else "patch folder",
        "path": str(tiling.root or tiling.patches),
        "tiling": tiling.name,
        "settings": tiling.settings,
        "patch_folder": str(tiling.patches),
        "slides": len(counts),
        "patches_per_slide": spread(counts),
        "statuses": statuses,
        "failed": failed,
        "feature_folders": _feature_folders(tiling.root),
    }


def _patch_folder_of(folder: Path, record: dict[str, Any] | None) -> Path | None:
    """The patches a feature folder was extracted from: its ``features.json``, else its tiling's folder."""
    for candidate in (
        Path(record["patches"]) if record and record.get("patches") else None,
        folder.parent.parent / "patches",
    ):
        if candidate is not None and candidate.is_dir():
            return candidate
    return None


def _stale_files(files: list[Path], patches: Path) -> list[str]:
    """Slides whose feature file was made from other patches than the patch file there now (or one gone)."""
    stale = []
    for p in files:
        with open_h5_file(p) as f:
            recorded = plain(f.attrs.get("patches_fingerprint"))
        if not recorded:
            continue
        source = patches / p.name
        if not source.is_file() or read_patch_file(source).fingerprint != recorded:
            stale.append(p.stem)
    return stale


def describe_feature_folder(path: Path) -> dict[str, Any]:
    """Encoder, tiling, files, dimension, ``extract.csv`` statuses and stale files of a feature folder."""
    record = read_json(path / FEATURES_RECORD)
    files = h5_files(path)
    dim = None
    if files:
        with open_h5_file(files[0]) as f:
            dim = int(f["features"].shape[-1])
    statuses, failed = status_counts(path / EXTRACT_REPORT)
    patches = _patch_folder_of(path, record)
    tiled = {p.stem for p in h5_files(patches)} if patches is not None else None
    return {
        "kind": "feature folder",
        "path": str(path),
        "encoder_id": (record or {}).get("encoder_id"),
        "tiling": (record or {}).get("tiling"),
        "encoder": (record or {}).get("encoder"),
        "files": len(files),
        "feature_dim": dim,
        "statuses": statuses,
        "failed": failed,
        "patch_folder": str(patches) if patches else None,
        "not_extracted": sorted(tiled - {p.stem for p in files}) if tiled is not None else None,
        "stale": _stale_files(files, patches) if patches is not None else None,
    }
