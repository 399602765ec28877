"""Colour arithmetic of H&E slides shared by the stages: optical density, the haematoxylin/eosin/DAB stain
vectors and the colour statistics of a slide's tissue (what tiling records and the shortcut check reads).

Plain NumPy, no stage of its own: tiling computes the statistics, stain normalisation and the shortcut check
(later stages) use the same definitions.
"""

from __future__ import annotations

import numpy as np

from .errors import HistotransferError

# Ruifrok & Johnston's optical-density vectors of haematoxylin, eosin and DAB (rows), as scikit-image's
# rgb2hed uses them (scikit-image is not a dependency; these nine numbers are all it would give).
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
COLOUR_CHANNELS = ("od_r", "od_g", "od_b", "haematoxylin", "eosin", "dab")
COLOUR_STATISTICS = ("mean", "std", "p10", "p50", "p90")
COLOUR_STAT_NAMES = tuple(f"{c}_{s}" for c in COLOUR_CHANNELS for s in COLOUR_STATISTICS)


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Optical density ``-log((I + 1) / 256)`` of uint8 RGB values (float32; white 255 is 0)."""
    return -np.log((rgb.astype(np.float32) + 1.0) / 256.0)


def slide_colour_stats(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Colour statistics (``COLOUR_STAT_NAMES``, 30 float64 values) of the tissue pixels of a thumbnail.

    ``rgb`` is a uint8 RGB(A) thumbnail (H, W, 3|4), ``mask`` its boolean tissue mask (H, W). For each of
    the optical densities of R, G, B and the haematoxylin, eosin and DAB channels: mean, standard deviation
    and the 10th, 50th and 90th percentiles over the tissue pixels.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] not in (3, 4):
        raise HistotransferError(
            f"thumbnail: expected a uint8 RGB(A) image (H, W, 3|4), got {rgb.dtype} {tuple(rgb.shape)}."
        )
    if mask.shape != rgb.shape[:2]:
        raise HistotransferError(
            f"tissue mask of shape {tuple(mask.shape)} does not match the thumbnail "
            f"{tuple(rgb.shape[:2])}; compute the mask on the same thumbnail."
        )
    od = optical_density(rgb[..., :3][mask.astype(bool)]).astype(np.float64)
    if len(od) == 0:
        raise HistotransferError("tissue mask is empty: this slide has no tissue pixels to measure.")
    channels = np.concatenate([od, od @ HED_FROM_RGB], axis=1)
    percentiles = np.percentile(channels, [10, 50, 90], axis=0)
    stats = np.stack([channels.mean(0), channels.std(0), *percentiles], axis=1)
    return stats.reshape(-1)
