"""The identity of a slide file, recorded by tiling and checked by every stage that reads the slide again.

A patch file's coordinates only mean something on the slide they were cut from. The identity holds what tells
two slide files apart cheaply: level-0 dimensions, level count, the file's own microns per pixel, its size in
bytes, the sha256 of its first and last 1 MiB (a TIFF's header, first tiles and, often, its directory) and the
sha256 of a sparse sample spread over the whole file (64 blocks of 64 KiB at offsets fixed by the size), which
catches a file edited in the middle with its size unchanged. Reading it costs 66 small reads (about 6 MiB), so it
is checked every time a slide is opened for its pixels (``benchmarks/bench_identity.py`` measures it).

An identity recorded before the sample existed has no ``sample_sha256``: it is checked on the keys it holds.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from ..errors import ProvenanceError
from .base import Slide

HEAD_BYTES = 1 << 20
SAMPLE_BLOCKS = 64
SAMPLE_BYTES = 64 << 10
IDENTITY_KEYS = ("dimensions", "level_count", "native_mpp", "file_size", "head_sha256", "sample_sha256")


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


def sample_offsets(size: int, blocks: int = SAMPLE_BLOCKS, block: int = SAMPLE_BYTES) -> list[int]:
    """Where the sparse sample's blocks start in a file of ``size`` bytes: evenly spaced, first at 0, last ending
    at the end of the file; one block (the whole file) when it is no larger than the sample."""
    if size <= blocks * block:
        return [0]
    step = (size - block) / (blocks - 1)
    return [round(i * step) for i in range(blocks)]


def sample_sha256(path: str | os.PathLike[str], blocks: int = SAMPLE_BLOCKS, block: int = SAMPLE_BYTES) -> str:
    """sha256 of ``blocks`` blocks of ``block`` bytes spread evenly over a file (the whole file when smaller)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size <= blocks * block:
            h.update(f.read())
        else:
            for offset in sample_offsets(size, blocks, block):
                h.update(os.pread(f.fileno(), block, offset))
    return h.hexdigest()


def slide_identity(slide: Slide) -> dict[str, Any]:
    """The identity of an open slide (see the module docstring), as plain JSON values."""
    return {
        "dimensions": [int(slide.dimensions[0]), int(slide.dimensions[1])],
        "level_count": int(slide.level_count),
        "native_mpp": None if slide.native_mpp is None else round(float(slide.native_mpp), 9),
        "file_size": int(os.path.getsize(slide.path)),
        "head_sha256": edge_sha256(slide.path),
        "sample_sha256": sample_sha256(slide.path),
    }


def identity_differences(recorded: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """``key recorded vs actual`` for each identity key on which two identities differ (keys ``recorded`` lacks,
    such as ``sample_sha256`` in an identity recorded before it existed, are not compared)."""
    return [
        f"{k} {recorded.get(k)} vs {actual.get(k)}"
        for k in IDENTITY_KEYS
        if k in recorded and recorded.get(k) != actual.get(k)
    ]


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
