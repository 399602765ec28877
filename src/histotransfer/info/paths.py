"""Which kind of path ``info`` is given (by file name and suffix, HDF5 layout or the records a folder holds),
its description, and what ``--check`` found wrong in it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .._io import h5_files
from ..errors import HistotransferError
from ..patches import REPORT_FILE, SETTINGS_FILE
from ..slide import SLIDE_SUFFIXES
from .files import describe_attention_file, describe_feature_file, describe_patch_file, describe_slide
from .folders import describe_feature_folder, describe_tiling
from .records import EXTRACT_REPORT, FEATURES_RECORD, WHAT, open_h5_file, plain
from .runs import describe_run, describe_study

# Records that name the folder they lie in: ``info FILE`` describes that folder.
FOLDER_RECORDS = frozenset(
    {
        "config.json",
        "metrics.json",
        "comparison.json",
        FEATURES_RECORD,
        EXTRACT_REPORT,
        SETTINGS_FILE,
        REPORT_FILE,
        "cells.csv",
        "study.yaml",
    }
)


def _h5_kind(path: Path) -> str:
    """``patches``, ``features`` or ``attention``: by the layout name of our files, by datasets otherwise."""
    with open_h5_file(path) as f:
        name = plain(f.attrs.get("format"))
        datasets = set(f.keys())
    if isinstance(name, str) and name.startswith("histotransfer."):
        return name.removeprefix("histotransfer.")
    if "features" in datasets:
        return "features"
    if "coords" in datasets:
        return "patches"
    raise HistotransferError(
        f"{path}: an HDF5 file without 'coords' or 'features' (not a patch or feature file); {WHAT}."
    )


def _describe_file(path: Path, check: bool) -> dict[str, Any]:
    if path.name in FOLDER_RECORDS:
        return _describe_folder(path.parent, check)
    if path.suffix.lower() == ".h5":
        kind = _h5_kind(path)
        if kind == "patches":
            return describe_patch_file(path, check)
        if kind == "features":
            return describe_feature_file(path)
        if kind == "attention":
            return describe_attention_file(path)
        raise HistotransferError(f"{path}: a '{kind}' file, which info does not describe; {WHAT}.")
    if path.name.lower().endswith(SLIDE_SUFFIXES):
        return describe_slide(path)
    raise HistotransferError(f"{path}: not a file `histotransfer info` describes; {WHAT}.")


def _folder_h5_kind(path: Path) -> str | None:
    files = h5_files(path)
    return _h5_kind(files[0]) if files else None


def _describe_folder(path: Path, check: bool) -> dict[str, Any]:
    if (path / "config.json").is_file():
        return describe_run(path, check)
    if (path / "cells.csv").is_file() or (path / "study.yaml").is_file():
        return describe_study(path)
    if (path / FEATURES_RECORD).is_file() or (path / EXTRACT_REPORT).is_file():
        return describe_feature_folder(path)
    kind = _folder_h5_kind(path)
    if kind == "features":
        return describe_feature_folder(path)
    tilings = [p for p in path.iterdir() if p.is_dir() and (p / SETTINGS_FILE).is_file()]
    if kind == "patches" or (path / SETTINGS_FILE).is_file() or tilings or _folder_h5_kind(path / "patches"):
        return describe_tiling(path)
    raise HistotransferError(f"{path}: not a folder `histotransfer info` describes; {WHAT}.")


def describe(path: str | Path, check: bool = False) -> dict[str, Any]:
    """What ``path`` is and what it holds, as JSON values: ``kind``, ``path``, then the kind's fields.

    ``check`` also opens the slide a patch file was cut from and compares it with the identity recorded, and
    compares a run's feature files with the fingerprints it was trained on. Raises HistotransferError (one
    line) for a path that is missing or not something histotransfer reads or writes.
    """
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise HistotransferError(f"{path}: no such file or folder; check the path.")
    return _describe_folder(path, check) if path.is_dir() else _describe_file(path, check)


def failed_checks(description: dict[str, Any]) -> list[str]:
    """What ``describe(..., check=True)`` found wrong: a slide file that is not the one tiled, a run's feature
    files changed or missing since training. Empty when every check passed (or none could be made)."""
    found = []
    if description.get("slide_matches") is False:
        found.append(
            f"{description['path']}: the slide file is not the one tiled "
            f"({'; '.join(description.get('slide_differences') or [])})"
        )
    inputs = description.get("inputs_check") or {}
    if inputs.get("changed") or inputs.get("missing"):
        found.append(
            f"{description['path']}: feature files changed ({len(inputs['changed'])}) or missing "
            f"({len(inputs['missing'])}) since training, in {inputs['features_dir']}"
        )
    if description.get("model_loads") is False:
        found.append(
            f"{description['path']}: metrics.json is written but model.pt is missing or does not load; "
            "re-run the command that made the run (it redoes it)"
        )
    return found
