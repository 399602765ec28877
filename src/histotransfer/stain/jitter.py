"""HED stain jitter: seeded stain-colour augmentation of uint8 patch batches during fine-tuning, which keeps
the encoder from relying on a centre's stain colour."""

from __future__ import annotations

from typing import Any

import torch

from ..colour import HED_FROM_RGB, RGB_FROM_HED
from ..errors import HistotransferError
from .density import from_od_torch, od_torch


class HedJitter:
    """Seeded HED stain augmentation (Tellez et al.): each patch's haematoxylin, eosin and DAB channels
    become ``alpha * s + beta`` with ``alpha ~ U(1 - sigma, 1 + sigma)`` and ``beta ~ U(-bias, bias)``
    drawn per patch and channel.

    The HED channels are the optical density ``-log((I + 1) / 256)`` unmixed by Ruifrok & Johnston's stain
    vectors, in natural-log OD units (scikit-image's rgb2hed divides these by ln(10^6) ~ 13.8, so its
    ``beta`` values are 13.8 times smaller). No clipping in HED space, so ``sigma = bias = 0`` gives back the
    input exactly. Draws come from a CPU ``torch.Generator``: the same seed gives the same sequence of
    outputs on any device.
    """

    def __init__(self, sigma: float = 0.05, bias: float = 0.05, seed: int = 0) -> None:
        if sigma < 0 or bias < 0:
            raise HistotransferError(f"HED jitter sigma {sigma} / bias {bias}: both must be >= 0.")
        self.sigma, self.bias, self.seed = float(sigma), float(bias), int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def describe(self) -> dict[str, Any]:
        """The settings, for a run's config."""
        return {
            "name": "hed_jitter",
            "sigma": self.sigma,
            "bias": self.bias,
            "seed": self.seed,
            "units": "natural-log optical density",
            "stain_vectors": "Ruifrok-Johnston H, E, DAB",
        }

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """Jitter a (B, H, W, 3) uint8 batch; returns uint8 (B, H, W, 3) on the same device."""
        if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise ValueError(f"expected a (B, H, W, 3) uint8 tensor, got {pixels.dtype} {tuple(pixels.shape)}")
        b = pixels.shape[0]
        scale = 1 + (torch.rand(b, 3, generator=self.generator) * 2 - 1) * self.sigma
        shift = (torch.rand(b, 3, generator=self.generator) * 2 - 1) * self.bias
        dev = pixels.device
        hed = od_torch(pixels) @ torch.tensor(HED_FROM_RGB, dtype=torch.float32, device=dev)
        hed = hed * scale.to(dev).view(b, 1, 1, 3) + shift.to(dev).view(b, 1, 1, 3)
        return from_od_torch(hed @ torch.tensor(RGB_FROM_HED, dtype=torch.float32, device=dev))
