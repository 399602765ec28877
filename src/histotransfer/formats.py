"""Versioned layouts of the HDF5 files one stage writes and the next reads.

Each file we write carries ``format`` (a name) and ``format_version`` (an int) in its root attrs. Readers
accept files without these attrs (made by CLAM or TRIDENT) and check only the datasets they need, but refuse a
file of ours that has another name or version, naming the file and the fix.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py

from .errors import FormatError

PATCHES = ("histotransfer.patches", 2)
FEATURES = ("histotransfer.features", 2)
ATTENTION = ("histotransfer.attention", 1)


def stamp(f: h5py.File, fmt: tuple[str, int]) -> None:
    """Mark an HDF5 file as following layout ``fmt``."""
    f.attrs["format"] = fmt[0]
    f.attrs["format_version"] = fmt[1]


def check(f: h5py.File, fmt: tuple[str, int], path: str | Path, needs: tuple[str, ...] = ()) -> None:
    """Raise FormatError unless ``f`` is readable as layout ``fmt`` and holds datasets ``needs``."""
    name = f.attrs.get("format")
    if name is not None:
        name = name.decode() if isinstance(name, bytes) else str(name)
        version = int(f.attrs.get("format_version", -1))
        if name != fmt[0]:
            raise FormatError(f"{path}: is a '{name}' file, expected '{fmt[0]}'; pass the right folder.")
        if version != fmt[1]:
            raise FormatError(
                f"{path}: layout version {version} of '{name}', this histotransfer reads version {fmt[1]}; "
                "re-run the stage that made it with this version."
            )
    missing = [k for k in needs if k not in f]
    if missing:
        raise FormatError(f"{path}: missing dataset(s) {', '.join(missing)} required by '{fmt[0]}'.")


@contextmanager
def open_h5(path: str | Path, fmt: tuple[str, int], needs: tuple[str, ...], fix: str) -> Iterator[h5py.File]:
    """Open ``path`` read-only and ``check`` it as layout ``fmt``; a file HDF5 cannot open raises FormatError
    naming it and ``fix`` (what the user should do, e.g. "re-tile this slide")."""
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise FormatError(f"{path}: not a readable HDF5 file ({exc}); {fix}.") from exc
    with f:
        check(f, fmt, path, needs=needs)
        yield f
