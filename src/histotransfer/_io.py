"""Atomic file writes and small file helpers shared by every stage.

Every output is written under a temporary name in the same folder and renamed when complete, so an
interrupted run never leaves a half-written file that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

TMP_MARK = ".tmp-"


def temp_name(path: Path) -> Path:
    """The temporary sibling of ``path`` used while it is being written."""
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}{path.suffix}")


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path; on success rename it onto ``path``, on failure delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_temps(folder: str | os.PathLike[str]) -> None:
    """Delete temporary files left in ``folder`` by a killed run."""
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob(f".*{TMP_MARK}*"):
            p.unlink(missing_ok=True)


def h5_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The ``<slide_id>.h5`` files of ``folder``, sorted, without files still being written (hidden temps)."""
    return sorted(p for p in Path(folder).glob("*.h5") if not p.name.startswith("."))


def write_csv(df: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write a CSV atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def write_json(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write JSON atomically (indented, keys in insertion order)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def write_text(text: str, path: str | os.PathLike[str]) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
