"""The study's cell cache: one folder per unit of work, finished when its ``done.json`` says so.

A cell's hash covers its own settings and its dependencies' hashes, so changing a setting invalidates exactly
the cells that depend on it. ``done.json`` is written atomically and last; a cell without it (killed midway)
is redone, and a cell whose marker holds another hash (settings changed) is redone too. A failed cell writes
``failed.json`` (one-line reason) and ``error.log`` (traceback) instead, and is retried on the next run.
``started.json`` records the settings a cell's folder was started under, so a killed cell resumes where its
stage can (tiling, extraction, training, fine-tuning) and starts afresh when its settings changed.
"""

from __future__ import annotations

import json
import shutil
import traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .._io import write_json, write_text
from ..provenance import json_fingerprint
from .grid import EncoderConfig

DONE = "done.json"
FAILED = "failed.json"
STARTED = "started.json"


def settings_hash(obj: Any) -> str:
    """A stable short hash of JSON-able settings (cache keys)."""
    return json_fingerprint(obj)[:16]


@dataclass
class Cell:
    """One unit of work of the grid, living in ``out_dir / key``."""

    kind: str  # "demo", "tile", "extract", "mil", "finetune" or "cka"
    key: str  # relative folder (posix), unique in the study
    settings: dict[str, Any]  # what determines the cell's result (JSON-able)
    deps: tuple[Cell, ...] = ()
    dataset: str = ""
    encoder: EncoderConfig | None = None
    seed: int | None = None
    variant: str = ""  # the MIL variant (recipe) of mil and finetune cells
    stain: str = "none"  # the stain normalisation (extract.stain_norm) of extract, mil, finetune and cka cells
    # Settings under which a partial result in the folder may be resumed by the stage itself: None means
    # the stage checks its own per-slide settings (never wipe), "" means always start afresh.
    resume_key: str | None = ""
    # The dependencies whose hashes enter this cell's hash (None: all of them). A cell that uses one part of a
    # dependency's result (one truncation of an extraction) names that part in its settings instead.
    hashed: tuple[Cell, ...] | None = None
    hash: str = field(init=False)

    def __post_init__(self) -> None:
        deps = self.deps if self.hashed is None else self.hashed
        self.hash = settings_hash({"kind": self.kind, "settings": self.settings, "deps": [d.hash for d in deps]})

    def folder(self, out_dir: Path) -> Path:
        return out_dir / self.key

    def record(
        self, status: str, seconds: float | None = None, message: str = "", result: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The cell as the tables and report see it."""
        return {
            "kind": self.kind,
            "key": self.key,
            "folder": self.key,
            "dataset": self.dataset,
            "encoder": self.encoder.spec() if self.encoder else None,
            "config": self.encoder.key if self.encoder else "",
            "recipe": self.variant,
            "stain": self.stain,
            "seed": self.seed,
            "status": status,
            "seconds": seconds,
            "message": message,
            "result": result or {},
        }


def read_done(cell: Cell, out_dir: Path) -> dict[str, Any] | None:
    """The cell's ``done.json`` when it exists, parses, and matches the cell's current hash."""
    path = cell.folder(out_dir) / DONE
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return marker if marker.get("hash") == cell.hash else None


def prepare_folder(cell: Cell, out_dir: Path) -> Path:
    """Make the cell's folder ready to run: keep a partial result the stage can resume, else start afresh."""
    folder = cell.folder(out_dir)
    if folder.exists() and cell.resume_key is not None:
        try:
            started = json.loads((folder / STARTED).read_text()).get("resume_key")
        except (OSError, ValueError):
            started = None
        if not cell.resume_key or started != cell.resume_key:
            shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json({"key": cell.key, "hash": cell.hash, "resume_key": cell.resume_key}, folder / STARTED)
    return folder


def write_done(cell: Cell, out_dir: Path, result: dict[str, Any], seconds: float, message: str) -> None:
    folder = cell.folder(out_dir)
    (folder / FAILED).unlink(missing_ok=True)
    write_json(
        {
            "kind": cell.kind,
            "key": cell.key,
            "hash": cell.hash,
            "settings": cell.settings,
            "deps": [d.key for d in cell.deps],
            "result": result,
            "seconds": round(seconds, 3),
            "message": message,
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        },
        folder / DONE,
    )


def write_failed(cell: Cell, out_dir: Path, reason: str, exc: BaseException) -> None:
    folder = cell.folder(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DONE).unlink(missing_ok=True)
    write_text("".join(traceback.format_exception(exc)), folder / "error.log")
    write_json(
        {
            "kind": cell.kind,
            "key": cell.key,
            "hash": cell.hash,
            "reason": reason,
            "failed": datetime.now(UTC).isoformat(timespec="seconds"),
        },
        folder / FAILED,
    )
