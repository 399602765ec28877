"""Reinhard stain normalisation: fitting a target or a slide's source estimate (Lab mean and spread of all the
pixels, background included, as torchstain does), and applying it to a batch of patches.

Fitting is torchstain's NumPy Reinhard normaliser unchanged; applying maps each pixel's Lab values by the
source's mean and spread to the target's, on a (B, N, 3) uint8 torch tensor, the whole batch at once, with
torchstain's (OpenCV's) Lab constants. A patch whose Lab channel is constant is left unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchstain.numpy.normalizers import NumpyReinhardNormalizer

from .density import MIN_STAINED_PIXELS, check_stained, rounded, stained_pixels

# sRGB (D65) to XYZ and the D65 white point: the constants of torchstain's Reinhard (OpenCV's), so that the
# batched Lab conversion below agrees with it.
RGB_TO_XYZ = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                       [0.019334, 0.119193, 0.950227]])
D65_WHITE = np.array([0.95047, 1.0, 1.08883])


def reinhard_estimate(rgb: np.ndarray) -> tuple[dict[str, list], str]:
    """torchstain's Reinhard fit of uint8 RGB pixels (rounded), and why it is degenerate ("" when it is not)."""
    normalizer = NumpyReinhardNormalizer()
    normalizer.fit(rgb.reshape(-1, 1, 3))
    estimate = {"lab_means": rounded(normalizer.target_means), "lab_stds": rounded(normalizer.target_stds)}
    if min(estimate["lab_stds"]) <= 1e-6:
        return estimate, "a Lab channel is constant"
    return estimate, ""


def fit_reinhard(rgb: np.ndarray, io: float = 240.0, beta: float = 0.15,
                 min_pixels: int = MIN_STAINED_PIXELS) -> dict[str, list]:
    """Reinhard target of uint8 RGB pixels, by torchstain's NumPy normaliser: ``lab_means`` and ``lab_stds``
    (L in 0-100, a, b centred on 0) over all the pixels (``io``, ``beta``: what counts as stained)."""
    check_stained(rgb, min_pixels, io, beta)
    return reinhard_estimate(rgb)[0]


def rgb_to_lab(pixels: torch.Tensor) -> torch.Tensor:
    """CIE Lab (L 0-100, float32) of uint8 RGB (..., 3), by torchstain's formulas."""
    # The sRGB decoding of the 256 grey levels, looked up: the same numbers as computing it per pixel.
    levels = torch.arange(256, dtype=torch.float32, device=pixels.device) / 255
    decode = torch.where(levels > 0.04045, ((levels + 0.055) / 1.055) ** 2.4, levels / 12.92)
    linear = decode[pixels.long()]
    xyz = linear @ torch.tensor(RGB_TO_XYZ.T, dtype=torch.float32, device=pixels.device)
    xyz = xyz / torch.tensor(D65_WHITE, dtype=torch.float32, device=pixels.device)
    f = torch.where(xyz > 0.008856, xyz.clamp(min=0) ** (1 / 3), 7.787 * xyz + 16 / 116)
    return torch.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Inverse of ``rgb_to_lab``, clipped to [0, 1]."""
    y = (lab[..., 0] + 16) / 116
    f = torch.stack([lab[..., 1] / 500 + y, y, y - lab[..., 2] / 200], -1)
    xyz = torch.where(f > 0.2068966, f**3, (f - 16 / 116) / 7.787)
    xyz = xyz * torch.tensor(D65_WHITE, dtype=lab.dtype, device=lab.device)
    linear = xyz @ torch.tensor(np.linalg.inv(RGB_TO_XYZ).T, dtype=lab.dtype, device=lab.device)
    rgb = torch.where(linear > 0.0031308, 1.055 * linear.clamp(min=0) ** (1 / 2.4) - 0.055, 12.92 * linear)
    return rgb.clamp(0, 1)


def normalise_reinhard(pixels: torch.Tensor, target: dict[str, Any], io: float, beta: float,
              min_pixels: int, source: dict[str, list] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reinhard-normalised pixels (B, N, 3) uint8 and which patches could be normalised (B,): each patch by
    its own Lab mean and spread, or all by the slide's ``source`` estimate (written out for the reason
    ``normalise_macenko`` gives)."""
    lab = rgb_to_lab(pixels)
    if source is None:
        mean, std = lab.mean(1, keepdim=True), lab.std(1, correction=0, keepdim=True)
    else:
        mean = torch.tensor(source["lab_means"], device=lab.device, dtype=lab.dtype).view(1, 1, 3)
        std = torch.tensor(source["lab_stds"], device=lab.device, dtype=lab.dtype).view(1, 1, 3)
    ref_mean = torch.tensor(target["lab_means"], device=lab.device, dtype=lab.dtype)
    ref_std = torch.tensor(target["lab_stds"], device=lab.device, dtype=lab.dtype)
    out = lab_to_rgb((lab - mean) / std * ref_std + ref_mean) * 255
    if source is None:
        ok = (stained_pixels(pixels, io, beta).sum(1) >= min_pixels) & (std.squeeze(1) > 1e-6).all(-1)
    else:  # checked when the slide's estimate was fitted
        ok = torch.ones(len(pixels), dtype=torch.bool, device=lab.device)
    return out.to(torch.uint8), ok
