"""Stain references as pixels: image files, RGB arrays, slide regions ``SLIDE@x,y,w,h`` and folders of patch
images, and writing a cohort's reference folder (each slide's fullest patch).

A sequence of references is fitted on the concatenation of its pixels, one pooled estimate in which each patch
counts by its size, so a patch with little tissue cannot pull the target as far as an average of per-patch
targets would let it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from ..errors import HistotransferError

Reference = str | os.PathLike[str] | np.ndarray
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SLIDE_REGION = re.compile(r"^(?P<path>.+)@(?P<x>\d+),(?P<y>\d+),(?P<w>\d+),(?P<h>\d+)$")
MAX_REGION_PIXELS = 4096 * 4096  # a reference region larger than this is a slide, not a reference


def _read_image(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise HistotransferError(f"{path}: not a readable image; give an RGB PNG or JPEG patch as stain reference.")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _as_rgb(array: np.ndarray, what: str) -> np.ndarray:
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] not in (3, 4):
        raise HistotransferError(
            f"{what}: stain reference must be a uint8 RGB(A) array (H, W, 3|4), got {array.dtype} "
            f"{tuple(array.shape)}; convert it with np.asarray(image, np.uint8)."
        )
    return array[..., :3]


def load_reference(reference: Reference | Sequence[Reference]) -> np.ndarray:
    """The reference's RGB pixels as one uint8 (N, 1, 3) array: an image file, an RGB(A) array, or a
    sequence of either (their pixels concatenated)."""
    items = [reference] if isinstance(reference, (str, os.PathLike, np.ndarray)) else list(reference)
    if not items:
        raise HistotransferError("stain reference: the list of reference patches is empty; give at least one.")
    pixels = []
    for i, item in enumerate(items):
        rgb = _read_image(Path(item)) if isinstance(item, (str, os.PathLike)) else _as_rgb(item, f"reference {i}")
        pixels.append(rgb.reshape(-1, 3))
    return np.concatenate(pixels)[:, None, :]


def read_slide_region(spec: str) -> np.ndarray:
    """The RGB pixels of a slide region ``SLIDE@x,y,w,h``: ``w`` x ``h`` level-0 pixels from (x, y), read at
    level 0."""
    from ..slide import open_slide

    match = SLIDE_REGION.match(spec)
    if match is None:
        raise HistotransferError(f"{spec}: not a slide region; write it as SLIDE@x,y,w,h in level-0 pixels.")
    x, y, w, h = (int(match[k]) for k in ("x", "y", "w", "h"))
    if w * h == 0 or w * h > MAX_REGION_PIXELS:
        raise HistotransferError(
            f"{spec}: a region of {w} x {h} pixels; give a tissue region of 1 to "
            f"{MAX_REGION_PIXELS} pixels (e.g. 2048,2048)."
        )
    # The region is in level-0 pixels, so the slide's resolution plays no part: any mpp opens it.
    with open_slide(match["path"], mpp=1.0) as slide:
        sw, sh = slide.dimensions
        if x + w > sw or y + h > sh:
            raise HistotransferError(
                f"{spec}: the region ends at ({x + w}, {y + h}), outside the slide's level 0 "
                f"({sw} x {sh}); pick a region inside it."
            )
        return slide.read_region((x, y), 0, (w, h))


def write_reference_patches(patches: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Write, for each slide of a tiling (a patch folder or a tiling folder), the patch most covered by tissue
    (the first of the fullest) as ``<slide_id>.png`` in ``out_dir``: a folder to pass as ``stain_ref`` (fitted
    as one set), whose target is then the cohort's average tissue rather than one patch's mix of tissue, lesion
    and glass."""
    from ..patches import PatchReader, find_tiling, read_patch_file
    from ..slide import open_slide

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for path in find_tiling(patches).files:
        patch_set = read_patch_file(path)
        if not len(patch_set.coords):
            continue
        x, y = patch_set.coords[int(np.argmax(patch_set.tissue_fraction))]
        with (
            open_slide(patch_set.spec.slide_path, mpp=patch_set.spec.mpp) as slide,
            PatchReader(slide, patch_set.spec) as reader,
        ):
            rgb = reader.read(int(x), int(y))
        if not cv2.imwrite(str(out / f"{path.stem}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
            raise HistotransferError(f"{out / path.stem}.png: could not be written; check the folder.")
    return out


def folder_images(folder: Path) -> list[Path]:
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not images:
        raise HistotransferError(
            f"{folder}: holds no patch images ({', '.join(IMAGE_SUFFIXES)}) to fit a stain "
            "reference on; give a folder of reference patches."
        )
    return images
