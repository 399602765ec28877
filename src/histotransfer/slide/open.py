"""``open_slide``: pick the reader backend for a file."""

from __future__ import annotations

import os
from pathlib import Path

from .._read import check_regular_file
from ..errors import HistotransferError, one_line
from .backends import ImageSlide, OpenSlideSlide, TiffSlideSlide
from .base import Slide

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TIFF_SUFFIXES = (".tif", ".tiff")
# Files a folder given on the command line is searched for (OpenSlide's formats plus plain images).
SLIDE_SUFFIXES = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".vms",
    ".vmu",
    ".scn",
    ".mrxs",
    ".svslide",
    ".bif",
    ".qptiff",
    ".png",
    ".jpg",
    ".jpeg",
)


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
    check_regular_file(path, "slide")
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return ImageSlide(path, mpp)
    image = _plain_image_kind(path)
    if image is not None:
        raise HistotransferError(
            f"{path}: is a {image} image, not a {suffix or 'slide'} slide (its extension does not match its "
            f"content); rename it to .{image.lower()} and pass --mpp with its microns per pixel."
        )
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


# The first bytes of the plain image formats read by ImageSlide, by name.
_IMAGE_MAGIC = {"PNG": b"\x89PNG\r\n\x1a\n", "JPEG": b"\xff\xd8\xff"}


def _plain_image_kind(path: Path) -> str | None:
    """``"PNG"`` or ``"JPEG"`` when the file's content is that image format (whatever its extension), else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return None
    return next((name for name, magic in _IMAGE_MAGIC.items() if head.startswith(magic)), None)
