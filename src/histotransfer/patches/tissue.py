"""Tissue detection on a low-resolution image of the slide.

Otsu's threshold on the HSV saturation channel, with blur and morphology sized in microns:

* **Channel: saturation.** Glass is white or grey (saturation near 0) however bright or dim the scan, while
  H&E-stained tissue is pink to purple (clearly saturated). Gray level confuses pale tissue with glass and
  dark dust, folds or black scan borders with tissue; saturation does not (black has saturation 0).
* **Blur: median, ~40 um.** Removes speckle (dust, JPEG noise, isolated nuclei) before thresholding while
  keeping tissue edges sharp, unlike a Gaussian.
* **Threshold: Otsu, floored, or given.** Otsu splits the bimodal glass/tissue histogram; the floor
  (``MIN_SATURATION``) keeps a blank slide, whose histogram is glass noise only, from being split at noise.
  Otsu assumes two classes: very pale tissue beside strongly stained tissue can fall under the threshold, which
  is what an explicit ``threshold`` (0-255, used as given, like CLAM's ``sthresh``) is for.
* **Morphology:** closing (~60 um) joins tissue torn by cracks or pale fat into one region; opening (~30 um)
  removes thin specks and fibres; tissue components under ``min_region_um2`` are dropped (dust, debris) and
  holes under ``min_hole_um2`` are filled (small gaps inside tissue), while larger holes (lumens, fat) stay
  background. Both default to ``MIN_AREA_UM2`` (0.02 mm^2). An area is the one inside the region's outline
  through the centres of its boundary mask pixels (OpenCV's contour area), so a speck measures a little less
  and a hole a little more than its pixel count: within half a mask pixel along the edge.
* **Pen ink (``exclude_pen``).** Marker ink is saturated, so Otsu on saturation keeps it as tissue. Ink is
  told from H&E by colour on the median-blurred image, where nuclei are averaged with the stroma around them:

  - *blue and green ink*: hue 70-240 degrees (``INK_HUE``, in OpenCV's half-degree units) with saturation of
    at least ``INK_SATURATION`` (so a faint colour cast of the glass is not ink). Eosin and haematoxylin lie
    between about 260 and 360 degrees (purple to pink) plus a little past 0 (red-pink); green, cyan and blue
    are colours H&E does not make. Yellow-brown (pigment, DAB) stays below 70 degrees and is kept; violet ink
    cannot be told from haematoxylin and is kept too.
  - *black ink*: value (brightness) below ``DARK_VALUE``. Black ink over tissue is darker still than on
    glass, while stained tissue at this resolution is brighter, its darkest parts (nuclei) being averaged
    with the stroma around them: the darkest tissue of the CMU-1 sample slide (keratin, dense epidermis)
    has value 70-90 at 2-8 um per pixel. Only very dark regions (thick folds, heavy pigment) fall under it.
  - Red ink is not excluded: its colour is that of eosin.

  Ink regions are opened (~30 um, so a few stray pixels do not punch holes in tissue) and dilated by
  ``INK_HALO_UM`` so the faint, less saturated halo at a stroke's edge goes with it. Ink is removed after the
  closing (which could otherwise bridge a stroke across the tissue) and again after hole filling (so that
  filling a small hole does not bring ink back).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

MIN_SATURATION = 20  # of 255: below it nothing counts as stained tissue (the floor under Otsu's threshold)
MEDIAN_UM = 40.0
CLOSE_UM = 60.0
OPEN_UM = 30.0
MIN_AREA_UM2 = 0.02e6  # 0.02 mm^2, default of both: smaller tissue regions are dropped, smaller holes filled
INK_HUE = (35, 120)  # OpenCV hue (degrees / 2), inclusive: 70-240 degrees, green through blue
INK_SATURATION = 50  # of 255: a blue/green hue counts as ink only this saturated (not a glass colour cast)
DARK_VALUE = 60  # of 255: darker than this (HSV value) counts as black ink
INK_HALO_UM = 50.0


@dataclass(frozen=True)
class TissueSegmentation:
    """A tissue mask and the pen ink taken out of it, both boolean and of the image's shape.

    ``excluded`` is where saturation alone would have found tissue but ink was found (empty without
    ``exclude_pen``); ``tissue`` and ``excluded`` never overlap.
    """

    tissue: np.ndarray
    excluded: np.ndarray


def _odd(n: float, low: int = 3) -> int:
    k = max(low, round(n))
    return k if k % 2 else k + 1


def _disk(um: float, mpp: float) -> np.ndarray:
    side = _odd(um / mpp)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side))


def filter_by_area(mask: np.ndarray, min_region: float, min_hole: float) -> np.ndarray:
    """``mask`` (uint8 0/1) with tissue components under ``min_region`` dropped and holes under ``min_hole``
    filled, areas in mask pixels (inside each outline, see the module doc).

    Works on contours (a two-level hierarchy: outer boundaries and their holes), which only touches region
    boundaries and is several times faster than labelling every pixel.
    """
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return mask
    out = mask.copy()
    parents = hierarchy[0][:, 3]
    areas = [cv2.contourArea(c) for c in contours]
    specks = [c for c, p, a in zip(contours, parents, areas, strict=True) if p < 0 and a < min_region]
    holes = [c for c, p, a in zip(contours, parents, areas, strict=True) if p >= 0 and a < min_hole]
    cv2.drawContours(out, specks, -1, 0, cv2.FILLED)
    cv2.drawContours(out, holes, -1, 1, cv2.FILLED)
    return out


def saturation_threshold(saturation: np.ndarray, threshold: int | None = None) -> float:
    """The saturation above which a pixel is tissue: ``threshold`` when given, else Otsu's, at least
    ``MIN_SATURATION``."""
    if threshold is not None:
        return float(threshold)
    otsu, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return max(otsu, MIN_SATURATION)


def ink_mask(rgb_blurred: np.ndarray, mpp: float) -> np.ndarray:
    """Where a median-blurred RGB ``uint8`` image shows blue, green or black pen ink, with its halo (bool)."""
    hsv = cv2.cvtColor(rgb_blurred, cv2.COLOR_RGB2HSV)
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    coloured = (hue >= INK_HUE[0]) & (hue <= INK_HUE[1]) & (sat >= INK_SATURATION)
    found = (coloured | (val < DARK_VALUE)).astype(np.uint8)
    ink = cv2.morphologyEx(found, cv2.MORPH_OPEN, _disk(OPEN_UM, mpp))
    halo = _disk(2 * INK_HALO_UM, mpp)  # a disk of radius INK_HALO_UM
    return cv2.dilate(ink, halo).astype(bool)


def segment_tissue(
    rgb_thumbnail: np.ndarray,
    mpp: float = 8.0,
    *,
    threshold: int | None = None,
    min_region_um2: float = MIN_AREA_UM2,
    min_hole_um2: float = MIN_AREA_UM2,
    exclude_pen: bool = False,
) -> TissueSegmentation:
    """Tissue (and excluded pen ink) of an RGB ``uint8`` image whose pixels are ``mpp`` microns wide (see the
    module doc for each step and option)."""
    rgb = np.ascontiguousarray(rgb_thumbnail[..., :3])
    blur = _odd(MEDIAN_UM / mpp)
    sat = cv2.medianBlur(cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1], blur)
    found = (sat > saturation_threshold(sat, threshold)).astype(np.uint8)
    mask = cv2.morphologyEx(found, cv2.MORPH_CLOSE, _disk(CLOSE_UM, mpp))
    ink = ink_mask(cv2.medianBlur(rgb, blur), mpp) if exclude_pen else np.zeros(mask.shape, bool)
    excluded = mask.astype(bool) & ink
    mask[ink] = 0
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, _disk(OPEN_UM, mpp))
    mask = filter_by_area(mask, min_region_um2 / mpp**2, min_hole_um2 / mpp**2)
    mask[ink] = 0
    return TissueSegmentation(mask.astype(bool), excluded)


def tissue_mask(rgb_thumbnail: np.ndarray, mpp: float = 8.0, **options: Any) -> np.ndarray:
    """The boolean tissue mask of :func:`segment_tissue` (same options)."""
    return segment_tissue(rgb_thumbnail, mpp, **options).tissue
