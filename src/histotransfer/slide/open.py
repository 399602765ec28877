"""``open_slide``: pick the reader backend for a file."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import HistotransferError, one_line
from .backends import ImageSlide, OpenSlideSlide, TiffSlideSlide
from .base import Slide

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TIFF_SUFFIXES = (".tif", ".tiff")
# Files a folder given on the command line is searched for (OpenSlide's formats plus plain images).
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
                  ".qptiff", ".png", ".jpg", ".jpeg")


def open_slide(path: str | os.PathLike[str], mpp: float | None = None) -> Slide:
    """Open a slide: OpenSlide first, tiffslide when OpenSlide cannot, plain PNG/JPEG/TIFF when ``mpp`` is given.

    ``mpp`` (level-0 microns per pixel) overrides the slide's own. Raises HistotransferError naming the file
    when it is missing, unreadable, or carries no mpp and none was given.
    """
    path = Path(path)
    if not path.exists():
        raise HistotransferError(f"{path}: no such file; check the path.")
    if path.is_dir():
        raise HistotransferError(f"{path}: is a folder, not a slide file.")
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return ImageSlide(path, mpp)
    failures = []
    for backend in (OpenSlideSlide, TiffSlideSlide):
        try:
            return backend(path, mpp)
        except HistotransferError:
            raise
        except Exception as exc:  # each library raises its own types for files it cannot read
            failures.append(f"{backend.backend}: {one_line(exc)}")
    if suffix in TIFF_SUFFIXES and mpp is not None:
        return ImageSlide(path, mpp)
    raise HistotransferError(
        f"{path}: not a slide OpenSlide or tiffslide can read ({'; '.join(failures)}); check that the file is "
        "complete, or convert it to a pyramidal TIFF (plain PNG/JPEG/TIFF images are read with --mpp)."
    )
