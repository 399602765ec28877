"""Finding slide files: the one place that turns files and folders given by a user into slides.

Every stage that takes slides (tiling, heatmaps, fine-tuning, CKA, the study) lists them here, so they agree on what
a folder holds (files with a slide suffix, not hidden ones, sorted by name), on slide ids (the file name without its
extension) and on what is refused: a symbolic link loop, a folder without slides, two different files with one id,
and anything that is not a regular file (a named pipe would block the first read forever). The same file given twice
(e.g. through a symbolic link) is kept once and the repeat is returned marked as a duplicate, so a batch can report
it instead of dropping it silently.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .._read import special_file
from ..errors import HistotransferError
from .base import slide_id_of
from .open import SLIDE_SUFFIXES


@dataclass(frozen=True)
class SlideEntry:
    """A slide file; ``duplicate_of`` is set when it is the same file as an earlier entry."""

    slide_id: str
    path: Path
    duplicate_of: Path | None = None


def _resolve(path: Path) -> Path:
    """The real path of ``path``; a missing file resolves as far as it can (its slide then reports it)."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:  # Python 3.11 raises RuntimeError for a symbolic link loop
        raise HistotransferError(f"{path}: symbolic link loop; point it at a slide file or folder.") from exc


def folder_slides(folder: Path) -> list[Path]:
    """The slide files directly inside ``folder``: known suffixes, not hidden, sorted by name."""
    return sorted(
        p
        for p in folder.iterdir()
        if not p.name.startswith(".") and p.name.lower().endswith(SLIDE_SUFFIXES) and p.exists() and not p.is_dir()
    )


def list_slides(inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[SlideEntry]:
    """Slides from files and folders (see the module docstring), in the order given, folders by name.

    Raises HistotransferError for a link loop, a folder holding no slide file, two different files sharing a
    slide id, or a named pipe, device or socket. A file that does not exist is listed: the stage reports it in
    its row for that slide.
    """
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    paths: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if _resolve(p).is_dir():
            found = folder_slides(p)
            if not found:
                raise HistotransferError(f"{p}: folder holds no slide files ({', '.join(SLIDE_SUFFIXES)}).")
            paths += found
        else:
            paths.append(p)
    entries: list[SlideEntry] = []
    seen: dict[Path, Path] = {}
    by_id: dict[str, Path] = {}
    for p in paths:
        real = _resolve(p)
        what = special_file(real) if not real.is_dir() else None
        if what is not None:
            raise HistotransferError(f"{p}: is {what}, not a regular file; pass slide files or folders of slides.")
        sid = slide_id_of(p)
        if real in seen:
            entries.append(SlideEntry(sid, p, seen[real]))
            continue
        if sid in by_id:
            raise HistotransferError(
                f"two slides share the id '{sid}' (the file name without extension): {by_id[sid]} and {p}; "
                "rename one so that every slide id is unique."
            )
        seen[real], by_id[sid] = p, p
        entries.append(SlideEntry(sid, p))
    return entries


def slide_index(inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None) -> dict[str, Path] | None:
    """``slide_id -> file`` of the slides ``inputs`` name (None when ``inputs`` is None: use recorded paths)."""
    if inputs is None:
        return None
    return {e.slide_id: e.path.absolute() for e in list_slides(inputs) if e.duplicate_of is None}


def locate_slide(slide_id: str, recorded: str | None, index: dict[str, Path] | None, source: Path | str) -> Path:
    """The slide file of ``slide_id``: from ``index`` (the user's --slides) when listed there, else the path
    recorded by tiling; an error naming ``source`` (the file that needs it) and the fix otherwise."""
    if index is not None and slide_id in index:
        return index[slide_id]
    if recorded and Path(recorded).is_file():
        return Path(recorded)
    where = f"recorded slide path {recorded} does not exist" if recorded else "no slide path is recorded"
    hint = " (it lists no such slide)" if index is not None else ""
    raise HistotransferError(f"{source}: {where}; pass --slides with the folder or files holding {slide_id}.*{hint}.")
