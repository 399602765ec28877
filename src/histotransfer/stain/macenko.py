"""Macenko stain normalisation: fitting a target or a slide's source estimate (stain vectors and maximum
concentrations), and applying it to a batch of patches.

**Fitting** uses torchstain's NumPy Macenko arithmetic laid out for large samples (:func:`macenko_fit`, equal to
it to float64 rounding). **Applying** runs on a (B, N, 3) uint8 torch tensor on its own device, the whole batch
at once: torchstain normalises one image per call and keeps its constants on the CPU, so the same arithmetic is
written here batched (per-patch percentiles by sorting, stain unmixing by a batched pseudo-inverse); the tests
check it against torchstain's NumPy backend to within one grey level. With a slide's source estimate, each
pixel is unmixed with the slide's stain vectors and its concentrations scaled by the ratio of the target's to
the slide's maximum concentrations. A patch is left unchanged when its estimate is degenerate: the two stain
vectors less than :data:`MIN_STAIN_ANGLE_DEG` apart, or a non-finite or zero maximum concentration.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..errors import HistotransferError
from .density import MIN_STAINED_PIXELS, check_stained, rounded

MACENKO_DEFAULTS = {"io": 240.0, "alpha": 1.0, "beta": 0.15}
MIN_STAIN_ANGLE_DEG = 1.0


def macenko_fit(rgb: np.ndarray, io: float, alpha: float, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """torchstain's NumPy Macenko fit (stain matrix 3 x 2, 99th-percentile concentrations 2) of uint8 RGB
    pixels, its float64 arithmetic laid out for a slide's million pixels: optical densities and the stained
    pixels looked up per grey level, channels first so that every product is one wide matrix product, and the
    concentrations by the pseudo-inverse of the stain matrix (the least-squares solution torchstain's
    ``lstsq`` gives, without a LAPACK solve over a million right-hand sides). The tests check it against
    torchstain."""
    lut = -np.log((np.arange(256, dtype=np.float64) + 1) / io)
    flat = rgb.reshape(-1, 3)
    od = lut[flat.T]  # (3, N)
    ok = lut >= beta
    od_hat = od[:, ok[flat[:, 0]] & ok[flat[:, 1]] & ok[flat[:, 2]]]
    _, eigvecs = np.linalg.eigh(np.cov(od_hat))
    plane = np.ascontiguousarray(eigvecs[:, 1:3])
    projected = plane.T @ od_hat
    phi = np.arctan2(projected[1], projected[0])
    min_phi, max_phi = np.percentile(phi, [alpha, 100 - alpha])
    v_min = plane @ np.array([np.cos(min_phi), np.sin(min_phi)])
    v_max = plane @ np.array([np.cos(max_phi), np.sin(max_phi)])
    stains = np.stack((v_min, v_max) if v_min[0] > v_max[0] else (v_max, v_min), axis=1)
    return stains, np.percentile(np.linalg.pinv(stains) @ od, 99, axis=1)


def macenko_estimate(rgb: np.ndarray, io: float, alpha: float, beta: float) -> tuple[dict[str, list], str]:
    """torchstain's Macenko fit of uint8 RGB pixels (rounded), and why it is degenerate ("" when it is not)."""
    try:
        stains, max_c = macenko_fit(rgb, io, alpha, beta)
    except (np.linalg.LinAlgError, ValueError) as exc:
        return {}, f"Macenko's stain estimate failed ({exc})"
    estimate = {"stain_matrix": rounded(stains), "max_concentrations": rounded(max_c)}
    if not (np.isfinite(stains).all() and np.isfinite(max_c).all()) or max_c.min() <= 1e-6:
        return estimate, "Macenko's stain estimate is degenerate (a non-finite or zero maximum concentration)"
    cosine = abs(stains[:, 0] @ stains[:, 1]) / (np.linalg.norm(stains[:, 0]) * np.linalg.norm(stains[:, 1]))
    if cosine >= math.cos(math.radians(MIN_STAIN_ANGLE_DEG)):
        return estimate, (
            f"Macenko's two stain vectors are less than {MIN_STAIN_ANGLE_DEG:g} degree apart (one colour only)"
        )
    return estimate, ""


def fit_macenko(
    rgb: np.ndarray, io: float = 240.0, alpha: float = 1.0, beta: float = 0.15, min_pixels: int = MIN_STAINED_PIXELS
) -> dict[str, list]:
    """Macenko target of uint8 RGB pixels (any shape ending in 3), by torchstain's NumPy normaliser:
    ``stain_matrix`` (3 x 2, haematoxylin then eosin columns) and ``max_concentrations`` (2)."""
    check_stained(rgb, min_pixels, io, beta)
    target, reason = macenko_estimate(rgb, io, alpha, beta)
    if reason:
        raise HistotransferError(f"stain reference: {reason}; pick a reference with both haematoxylin and eosin.")
    return target


def _percentile(values: torch.Tensor, valid: torch.Tensor | None, q: float) -> torch.Tensor:
    """Per-row ``q``-th percentile of ``values`` (..., N) over its ``valid`` entries, interpolated linearly
    as NumPy's default. Sorting is used because torch.nanquantile caps its input size and takes no
    per-row counts."""
    if valid is None:
        count = torch.full(values.shape[:-1], values.shape[-1], device=values.device)
    else:
        values = values.masked_fill(~valid, math.inf)
        count = valid.sum(-1)
    ordered = values.sort(dim=-1).values
    position = (count.clamp(min=1) - 1).to(values.dtype) * (q / 100.0)
    low = position.floor()
    lo = ordered.gather(-1, low.long().unsqueeze(-1)).squeeze(-1)
    hi = ordered.gather(-1, position.ceil().long().unsqueeze(-1)).squeeze(-1)
    return lo + (hi - lo) * (position - low)


def _masked_covariance(od: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-patch 3 x 3 covariance of the valid pixels' OD (ddof 1, as np.cov; zero for fewer than 2)."""
    weights = valid.unsqueeze(-1).to(od.dtype)
    count = weights.sum(1, keepdim=True).clamp(min=2)
    centred = (od - (od * weights).sum(1, keepdim=True) / count) * weights
    return centred.transpose(1, 2) @ centred / (count - 1)


def _stain_vectors(od: torch.Tensor, valid: torch.Tensor, alpha: float) -> torch.Tensor:
    """Macenko's stain vectors per patch (B, 3, 2): the extreme angles (``alpha`` percentiles) of the valid
    pixels in the plane of the two main eigenvectors, haematoxylin (larger red OD) first."""
    plane = torch.linalg.eigh(_masked_covariance(od, valid)).eigenvectors[..., 1:3]
    projected = od @ plane
    phi = torch.atan2(projected[..., 1], projected[..., 0])
    angles = torch.stack([_percentile(phi, valid, alpha), _percentile(phi, valid, 100 - alpha)], -1)
    v_min, v_max = (plane @ torch.stack([angles[:, i].cos(), angles[:, i].sin()], -1).unsqueeze(-1) for i in (0, 1))
    min_first = (v_min[:, 0] > v_max[:, 0]).view(-1, 1, 1)
    return torch.where(min_first, torch.cat([v_min, v_max], -1), torch.cat([v_max, v_min], -1))


def normalise_macenko(
    pixels: torch.Tensor,
    target: dict[str, Any],
    io: float,
    alpha: float,
    beta: float,
    min_pixels: int,
    source: dict[str, list] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Macenko-normalised pixels (B, N, 3) uint8 and which patches could be normalised (B,): each patch
    from its own stain estimate, or all from the slide's ``source`` estimate.

    torchstain re-estimates the source stain of every image it normalises and takes no given estimate, so the
    transfer from a slide's estimate is its arithmetic written out here (the tests check it against torchstain's
    formulas with the slide's pooled estimate)."""
    od = -torch.log((pixels.float() + 1.0) / io)
    if source is None:
        stained = (od >= beta).all(-1)
        enough = stained.sum(1) >= max(min_pixels, 2)
        # Patches with too few stained pixels are estimated from all their pixels, only to keep the arithmetic
        # finite; they are returned unchanged.
        stains = _stain_vectors(od, stained | ~enough.unsqueeze(1), alpha)
    else:
        stains = torch.tensor(source["stain_matrix"], device=od.device, dtype=od.dtype).unsqueeze(0)
    concentrations = torch.linalg.pinv(stains) @ od.transpose(1, 2)
    if source is None:
        max_c = _percentile(concentrations, None, 99)
    else:
        max_c = torch.tensor(source["max_concentrations"], device=od.device, dtype=od.dtype).unsqueeze(0)
    ref_stains = torch.tensor(target["stain_matrix"], device=od.device, dtype=od.dtype)
    ref_max = torch.tensor(target["max_concentrations"], device=od.device, dtype=od.dtype)
    out = io * torch.exp(-ref_stains @ (concentrations * (ref_max / max_c).unsqueeze(-1)))
    if source is None:
        cosine = torch.nn.functional.cosine_similarity(stains[..., 0], stains[..., 1], dim=-1).abs()
        ok = (
            enough
            & torch.isfinite(max_c).all(-1)
            & (max_c > 1e-6).all(-1)
            & (cosine < math.cos(math.radians(MIN_STAIN_ANGLE_DEG)))
        )
    else:  # checked when the slide's estimate was fitted
        ok = torch.ones(len(pixels), dtype=torch.bool, device=od.device)
    # Truncation, not rounding, as torchstain's astype(uint8).
    return out.clamp_(max=255).transpose(1, 2).to(torch.uint8), ok
