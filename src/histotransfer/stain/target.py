"""Stain targets from a stage's options: fitting a reference given as text, and writing and reading fitted
targets.

A reference given as text (``--stain-ref``, :func:`fit_reference`) is a patch image file; a folder of patch
images (fitted as one set); a slide region ``SLIDE@x,y,w,h`` (level-0 pixels of the slide file, read at level
0); or a fitted target ``.json`` (``StainNormalizer.to_dict``, as ``histotransfer stain-fit`` writes it), loaded
as it is, so that every stage and machine uses the very same numbers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .._read import read_text
from ..errors import HistotransferError
from .normaliser import StainNormalizer, check_method
from .reference import SLIDE_REGION, Reference, folder_images, read_slide_region


def read_stain_target(path: str | os.PathLike[str]) -> StainNormalizer:
    """A fitted target written by :func:`write_stain_target` (or ``histotransfer stain-fit``)."""
    try:
        data = json.loads(read_text(path, "stain target"))
    except (OSError, ValueError) as exc:
        raise HistotransferError(
            f"{path}: not a readable stain target JSON ({exc}); write it with histotransfer stain-fit."
        ) from exc
    if not isinstance(data, dict):
        raise HistotransferError(
            f"{path}: not a stain target (a JSON object with method, target, settings); "
            "write it with histotransfer stain-fit."
        )
    return StainNormalizer.from_dict(data)


def write_stain_target(normalizer: StainNormalizer, path: str | os.PathLike[str]) -> Path:
    """Write ``normalizer.to_dict()`` as JSON: a reference every later fit-free use loads as it is."""
    from .._io import write_json

    write_json(normalizer.to_dict(), path)
    return Path(path)


def fit_reference(method: str, reference: str | os.PathLike[str]) -> StainNormalizer:
    """The ``method`` normaliser of a reference given as text: a fitted target ``.json`` (loaded; its method
    must be ``method``), a slide region ``SLIDE@x,y,w,h``, a folder of patch images (one pooled fit) or a
    patch image file."""
    check_method(method)
    text = str(reference)
    path = Path(text).expanduser()
    if path.suffix.lower() == ".json" and path.is_file():
        loaded = read_stain_target(path)
        if loaded.method != method:
            raise HistotransferError(
                f"{path}: a {loaded.method} target, but stain normalisation {method} was "
                f"asked for; pass --stain-norm {loaded.method} or another reference."
            )
        return loaded
    if not path.exists() and SLIDE_REGION.match(text):
        source: Reference | list[Path] = read_slide_region(text)
    elif path.is_dir():
        source = folder_images(path)
    elif path.is_file():
        source = path
    else:
        raise HistotransferError(
            f"{text}: no such stain reference; give a patch image, a folder of them, "
            "SLIDE@x,y,w,h or a fitted target .json."
        )
    try:
        return StainNormalizer.fit(method, source)
    except HistotransferError as exc:
        raise HistotransferError(f"{text}: {exc}") from None


def stain_normalizer(
    method: str, reference: str | os.PathLike[str] | None, scope: str = "slide"
) -> StainNormalizer | None:
    """The normaliser of a stage's ``stain_norm`` / ``stain_ref`` / ``stain_scope`` options: None for
    ``"none"``. The scope is the stage's, whatever scope a fitted target ``.json`` was recorded with."""
    if method == "none":
        return None
    if reference is None:
        raise HistotransferError(f"stain normalisation {method} needs a reference (--stain-ref).")
    return fit_reference(method, reference).with_scope(scope)
