"""Tissue detection on a low-resolution image of the slide.

Otsu's threshold on the HSV saturation channel, with blur and morphology sized in microns:

* **Channel: saturation.** Glass is white or grey (saturation near 0) however bright or dim the scan, while
  H&E-stained tissue is pink to purple (clearly saturated). Gray level confuses pale tissue with glass and
  dark dust, folds or black scan borders with tissue; saturation does not (black has saturation 0).
* **Blur: median, ~40 um.** Removes speckle (dust, JPEG noise, isolated nuclei) before thresholding while
  keeping tissue edges sharp, unlike a Gaussian.
* **Threshold: Otsu, floored.** Otsu splits the bimodal glass/tissue histogram; the floor
  (``MIN_SATURATION``) keeps a blank slide, whose histogram is glass noise only, from being split at noise.
  Otsu assumes two classes: very pale tissue beside strongly stained tissue can fall under the threshold.
* **Morphology:** closing (~60 um) joins tissue torn by cracks or pale fat into one region; opening (~30 um)
  removes thin specks and fibres; components under ``MIN_AREA_UM2`` are dropped (dust, debris) and holes under
  the same area are filled (small gaps inside tissue), while large holes (lumens, fat) stay background.
"""

from __future__ import annotations

import cv2
import numpy as np

MIN_SATURATION = 20  # of 255: below it nothing counts as stained tissue
MEDIAN_UM = 40.0
CLOSE_UM = 60.0
OPEN_UM = 30.0
MIN_AREA_UM2 = 0.02e6  # 0.02 mm^2


def _odd(n: float, low: int = 3) -> int:
    k = max(low, int(round(n)))
    return k if k % 2 else k + 1


def _filter_by_area(mask: np.ndarray, min_area: float) -> np.ndarray:
    """Drop tissue components and fill holes smaller than ``min_area`` pixels.

    Works on contours (a two-level hierarchy: outer boundaries and their holes), which only touches region
    boundaries and is several times faster than labelling every pixel.
    """
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return mask
    out = mask.copy()
    parents = hierarchy[0][:, 3]
    small = [cv2.contourArea(c) < min_area for c in contours]
    specks = [c for c, p, s in zip(contours, parents, small, strict=True) if s and p < 0]
    holes = [c for c, p, s in zip(contours, parents, small, strict=True) if s and p >= 0]
    cv2.drawContours(out, specks, -1, 0, cv2.FILLED)
    cv2.drawContours(out, holes, -1, 1, cv2.FILLED)
    return out


def tissue_mask(rgb_thumbnail: np.ndarray, mpp: float = 8.0) -> np.ndarray:
    """A boolean tissue mask of an RGB ``uint8`` image whose pixels are ``mpp`` microns wide (see module doc)."""
    rgb = np.ascontiguousarray(rgb_thumbnail[..., :3])
    sat = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
    sat = cv2.medianBlur(sat, _odd(MEDIAN_UM / mpp))
    otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = (sat > max(otsu, MIN_SATURATION)).astype(np.uint8)
    close = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (_odd(CLOSE_UM / mpp), _odd(CLOSE_UM / mpp)))
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, close)
    opening = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (_odd(OPEN_UM / mpp), _odd(OPEN_UM / mpp)))
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, opening)
    return _filter_by_area(mask, MIN_AREA_UM2 / mpp**2).astype(bool)
