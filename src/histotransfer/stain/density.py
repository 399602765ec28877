"""What both stain methods share: optical density, which pixels count as stained, and how fitted numbers
are rounded.

A pixel is stained when its optical density ``-log((I + 1) / io)`` is at least ``beta`` in all three channels:
the pixels Macenko's method estimates stains from, and the count both methods require of a reference, a slide's
sample and a patch (``min_pixels``, default :data:`MIN_STAINED_PIXELS`: a few hundred pixels being what the
1st/99th percentile angles need to be stable). Fitted numbers are rounded to :data:`DECIMALS` decimals, so that
a target saved and reloaded gives identical outputs, and refitting on another machine the same numbers unless
one sits on a rounding boundary (float64 differences between machines are far below 1e-6).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import HistotransferError

MIN_STAINED_PIXELS = 500
DECIMALS = 6


def od_torch(pixels: torch.Tensor) -> torch.Tensor:
    """Optical density ``-log((I + 1) / 256)`` of uint8 pixels, float32."""
    return -torch.log((pixels.float() + 1.0) / 256.0)


def from_od_torch(od: torch.Tensor) -> torch.Tensor:
    """Inverse of ``od_torch``, rounded to the nearest grey level and clipped to uint8."""
    return (256.0 * torch.exp(-od) - 1.0).round_().clamp_(0, 255).to(torch.uint8)


def stained_level(stained: np.ndarray) -> int:
    """The highest grey level (-1 for none) of those that are stained, from which of the 256 levels are: optical
    density falls as the level rises, so a channel is stained exactly when its level is at most this one."""
    if not stained.any():
        return -1
    level = int(np.flatnonzero(stained)[-1])
    if not stained[: level + 1].all():
        raise ValueError("optical density must fall with the grey level")
    return level


def stained_count(rgb: np.ndarray, io: float, beta: float) -> int:
    """How many of the uint8 RGB pixels are stained."""
    od = -np.log((np.arange(256, dtype=np.float64) + 1) / io)  # per grey level: the same numbers as per pixel
    low = rgb.reshape(-1, 3) <= stained_level(od >= beta)
    return int(np.count_nonzero(low[:, 0] & low[:, 1] & low[:, 2]))  # faster than a reduction over 3 columns


def check_stained(rgb: np.ndarray, min_pixels: int, io: float, beta: float) -> None:
    """Refuse a reference with fewer than ``min_pixels`` stained pixels."""
    n = stained_count(rgb, io, beta)
    if n < min_pixels:
        raise HistotransferError(
            f"stain reference: only {n} stained pixels (need {min_pixels}); it is mostly background. Pick a "
            "reference patch (or region) covered by tissue."
        )


def rounded(values: np.ndarray) -> list:
    """Fitted numbers as nested lists, rounded to :data:`DECIMALS` decimals."""
    return np.round(np.asarray(values, dtype=np.float64), DECIMALS).tolist()


def stained_pixels(pixels: torch.Tensor, io: float, beta: float) -> torch.Tensor:
    """Which pixels (B, N) are stained: optical density of at least ``beta`` in all three channels."""
    od = -torch.log((torch.arange(256, dtype=torch.float32) + 1.0) / io)  # per grey level, as per pixel
    level = stained_level((od >= beta).numpy())
    if level < 0:
        return torch.zeros(pixels.shape[:-1], dtype=torch.bool, device=pixels.device)
    return (pixels <= level).all(-1)
