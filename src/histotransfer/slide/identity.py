"""The identity of a slide file, recorded by tiling and checked by every stage that reads the slide again.

A patch file's coordinates only mean something on the slide they were cut from. The identity holds what tells
two slide files apart cheaply: level-0 dimensions, level count, the file's own microns per pixel, its size in
bytes, and the sha256 of its first and last 1 MiB (a TIFF's header, first tiles and, often, its directory).
Reading it costs two small reads, so it is checked every time a slide is opened for its pixels.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from ..errors import ProvenanceError
from .base import Slide

HEAD_BYTES = 1 << 20
IDENTITY_KEYS = ("dimensions", "level_count", "native_mpp", "file_size", "head_sha256")


def edge_sha256(path: str | os.PathLike[str], n: int = HEAD_BYTES) -> str:
    """sha256 of a file's first and last ``n`` bytes (the whole file when it is smaller than 2n)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(f.read(n))
        if size > n:
            f.seek(max(n, size - n))
            h.update(f.read(n))
    return h.hexdigest()


def slide_identity(slide: Slide) -> dict[str, Any]:
    """The identity of an open slide (see the module docstring), as plain JSON values."""
    return {
        "dimensions": [int(slide.dimensions[0]), int(slide.dimensions[1])],
        "level_count": int(slide.level_count),
        "native_mpp": None if slide.native_mpp is None else round(float(slide.native_mpp), 9),
        "file_size": int(os.path.getsize(slide.path)),
        "head_sha256": edge_sha256(slide.path),
    }


def identity_differences(recorded: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """``key recorded vs actual`` for each identity key on which two identities differ."""
    return [f"{k} {recorded.get(k)} vs {actual.get(k)}" for k in IDENTITY_KEYS
            if k in recorded and recorded.get(k) != actual.get(k)]


def parse_identity(value: Any) -> dict[str, Any] | None:
    """A recorded identity from an HDF5 attr (JSON text) or a dict; None when nothing is recorded."""
    if value is None or value == "":
        return None
    if isinstance(value, bytes):
        value = value.decode()
    return json.loads(value) if isinstance(value, str) else dict(value)


def check_identity(slide: Slide, recorded: dict[str, Any] | None, source: str) -> None:
    """Raise ProvenanceError when ``slide`` is not the slide ``source`` (a patch file) was cut from.

    Files without a recorded identity (CLAM, TRIDENT) cannot be checked and pass.
    """
    if not recorded:
        return
    diff = identity_differences(recorded, slide_identity(slide))
    if diff:
        raise ProvenanceError(
            f"{slide.path} is not the slide {source} was cut from (differs in {'; '.join(diff)}); pass the "
            "original slide (--slides), or re-tile this one."
        )
