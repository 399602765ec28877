"""Where a tiling lives: ``OUT/<tiling name>/`` with ``patches/``, ``masks/``, ``thumbnails/``, ``tiling.csv``
and ``tiling.json``, the settings in the folder's name as TRIDENT users know it (``20x_512px_0px_overlap``).

Several tilings of the same slides coexist under one ``OUT``; re-tiling with other settings writes another
folder and never touches this one. Downstream commands are given any of ``OUT`` (when it holds exactly one
tiling), the tiling folder, or its ``patches`` folder — or a CLAM/TRIDENT folder of patch files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._io import h5_files
from ..errors import HistotransferError

SUBDIRS = ("patches", "masks", "thumbnails")
SETTINGS_FILE = "tiling.json"
REPORT_FILE = "tiling.csv"


@dataclass(frozen=True)
class TilingFolder:
    """A tiling found on disk: its folder (None for a bare folder of patch files), patch folder and name."""

    root: Path | None
    patches: Path
    name: str | None
    settings: dict[str, Any] | None

    @property
    def files(self) -> list[Path]:
        return h5_files(self.patches)


def _read_settings(folder: Path) -> dict[str, Any] | None:
    path = folder / SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise HistotransferError(f"{path}: not readable JSON ({exc}); re-run `histotransfer tile`.") from exc


def _tiling_at(folder: Path) -> TilingFolder:
    record = _read_settings(folder)
    return TilingFolder(
        folder,
        folder / "patches",
        record.get("name") if record else folder.name,
        record.get("settings") if record else None,
    )


def find_tiling(path: str | Path) -> TilingFolder:
    """The tiling that ``path`` designates (see the module docstring); a one-line error when there is none or
    when ``path`` holds several tilings (listing them)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise HistotransferError(
            f"{folder}: no such folder; pass a tiling folder written by `histotransfer tile` (or its patches folder)."
        )
    if (folder / SETTINGS_FILE).is_file() or ((folder / "patches").is_dir() and h5_files(folder / "patches")):
        return _tiling_at(folder)
    if h5_files(folder):
        parent = folder.parent
        if folder.name == "patches" and (parent / SETTINGS_FILE).is_file():
            return _tiling_at(parent)
        return TilingFolder(None, folder, None, None)
    tilings = sorted(p for p in folder.iterdir() if p.is_dir() and (p / SETTINGS_FILE).is_file())
    if len(tilings) == 1:
        return _tiling_at(tilings[0])
    if tilings:
        listing = ", ".join(p.name for p in tilings)
        raise HistotransferError(
            f"{folder}: holds {len(tilings)} tilings ({listing}); pass one of them, e.g. {tilings[0]}."
        )
    raise HistotransferError(f"{folder}: holds no patch files (*.h5) and no tiling; run `histotransfer tile` first.")
