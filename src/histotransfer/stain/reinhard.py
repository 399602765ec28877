"""Reinhard stain normalisation: fitting a target or a slide's source estimate (Lab mean and spread of all the
pixels, background included, as torchstain does), and applying it to a batch of patches.

A target is fitted by torchstain's NumPy Reinhard normaliser unchanged; a slide's estimate from the Lab values
the application converts its pixels to (the same numbers to float32 rounding, ten times faster). Applying maps
each pixel's Lab values by the source's mean and spread to the target's, on a (B, N, 3) uint8 torch tensor, the
whole batch at once, with torchstain's (OpenCV's) Lab constants and its float32 arithmetic: Lab is an affine map
of the companded XYZ values, so the whole Lab map is one 3 x 4 affine map per patch between the conversion to
them and back. On the CPU the conversions run as OpenCV look-ups and matrix transforms and NumPy roots (about
three times faster than the same arithmetic as torch elementwise operations); on another device as torch
operations. A patch whose Lab channel is constant is left unchanged.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import torch
from torchstain.numpy.normalizers import NumpyReinhardNormalizer

from .density import MIN_STAINED_PIXELS, check_stained, rounded, stained_pixels

# sRGB (D65) to XYZ and the D65 white point: the constants of torchstain's Reinhard (OpenCV's), so that the
# batched Lab conversion below agrees with it.
RGB_TO_XYZ = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]])
D65_WHITE = np.array([0.95047, 1.0, 1.08883])


def reinhard_estimate(rgb: np.ndarray) -> tuple[dict[str, list], str]:
    """torchstain's Reinhard fit of uint8 RGB pixels (rounded), and why it is degenerate ("" when it is not)."""
    normalizer = NumpyReinhardNormalizer()
    normalizer.fit(rgb.reshape(-1, 1, 3))
    return _estimate(normalizer.target_means, normalizer.target_stds)


def reinhard_slide_estimate(rgb: np.ndarray) -> tuple[dict[str, list], str]:
    """A slide's source estimate from uint8 RGB pixels (rounded), and why it is degenerate: the Lab mean and
    standard deviation of the pixels as :func:`normalise_reinhard` converts them (:func:`lab_f`), accumulated in
    float64 by OpenCV. torchstain's fit (:func:`reinhard_estimate`) on the same pixels gives the same numbers to
    float32 rounding (within 1e-5), ten times more slowly: a small slide's estimate would cost as much as
    normalising its patches."""
    f = lab_f_numpy(torch.from_numpy(np.ascontiguousarray(rgb.reshape(1, -1, 3))))
    lab = cv2.transform(f.numpy(), np.hstack([LAB_FROM_F, LAB_OFFSET[:, None]]).astype(np.float32))
    mean, std = cv2.meanStdDev(lab)
    return _estimate(mean.ravel(), std.ravel())


def _estimate(means: np.ndarray, stds: np.ndarray) -> tuple[dict[str, list], str]:
    estimate = {"lab_means": rounded(means), "lab_stds": rounded(stds)}
    if min(estimate["lab_stds"]) <= 1e-6:
        return estimate, "a Lab channel is constant"
    return estimate, ""


def fit_reinhard(
    rgb: np.ndarray, io: float = 240.0, beta: float = 0.15, min_pixels: int = MIN_STAINED_PIXELS
) -> dict[str, list]:
    """Reinhard target of uint8 RGB pixels, by torchstain's NumPy normaliser: ``lab_means`` and ``lab_stds``
    (L in 0-100, a, b centred on 0) over all the pixels (``io``, ``beta``: what counts as stained)."""
    check_stained(rgb, min_pixels, io, beta)
    return reinhard_estimate(rgb)[0]


# sRGB decoding of the 256 grey levels, as torchstain computes it per pixel (in float32).
_LEVELS = np.arange(256, dtype=np.float32) / np.float32(255)
SRGB_DECODE = np.where(
    _LEVELS > 0.04045,
    ((_LEVELS + np.float32(0.055)) / np.float32(1.055)) ** np.float32(2.4),
    _LEVELS / np.float32(12.92),
).astype(np.float32)
# Linear RGB to XYZ relative to the white point, and back.
XYZ_WHITE_FROM_RGB = RGB_TO_XYZ / D65_WHITE[:, None]
RGB_FROM_XYZ_WHITE = np.linalg.inv(RGB_TO_XYZ) * D65_WHITE[None, :]
# Lab is an affine map of f, the companded XYZ / white (fx, fy, fz): Lab = LAB_FROM_F @ f + LAB_OFFSET.
LAB_FROM_F = np.array([[0.0, 116.0, 0.0], [500.0, -500.0, 0.0], [0.0, 200.0, -200.0]])
LAB_OFFSET = np.array([-16.0, 0.0, 0.0])
F_FROM_LAB = np.linalg.inv(LAB_FROM_F)
CUBE_ROOT_FROM = 0.008856  # below it (in XYZ / white) f is linear, as in torchstain's conversion
CUBE_FROM = 0.2068966  # below it (in f) the inverse is linear
GAMMA_FROM = 0.0031308  # below it (in linear RGB) the sRGB encoding is linear


def _affine(matrix: np.ndarray) -> np.ndarray:
    """A 3 x 3 matrix as OpenCV's 3 x 4 affine transform (no offset), float32."""
    return np.hstack([matrix, np.zeros((3, 1))]).astype(np.float32)


def _affine_map(f: torch.Tensor, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``f @ a.T + c`` per patch (``a`` (B | 1, 3, 3), ``c`` (B | 1, 3)); on the CPU by OpenCV's transform,
    several times faster there than a batched torch matrix product of this shape."""
    if f.device.type != "cpu":
        return torch.baddbmm(c.unsqueeze(1).expand(len(f), 1, 3), f, a.transpose(1, 2).expand(len(f), 3, 3))
    fn = np.ascontiguousarray(f.numpy())
    m = torch.cat([a, c.unsqueeze(-1)], -1).numpy()
    if len(m) == 1:
        return torch.from_numpy(cv2.transform(fn, m[0]))
    return torch.from_numpy(np.stack([cv2.transform(fn[i : i + 1], m[i])[0] for i in range(len(fn))]))


def lab_f(pixels: torch.Tensor) -> torch.Tensor:
    """f (B, N, 3) float32 of uint8 RGB pixels (B, N, 3): the sRGB-decoded pixels in XYZ relative to D65 white,
    companded (cube root, linear near black), by torchstain's formulas; Lab is ``LAB_FROM_F @ f + LAB_OFFSET``.
    On the CPU by :func:`lab_f_numpy`, elsewhere by :func:`lab_f_torch`."""
    return lab_f_numpy(pixels) if pixels.device.type == "cpu" else lab_f_torch(pixels)


def lab_f_numpy(pixels: torch.Tensor) -> torch.Tensor:
    """:func:`lab_f` of CPU pixels by OpenCV's look-up and matrix transform and NumPy's cube root: the same
    float32 arithmetic as :func:`lab_f_torch`, several times faster than torch's elementwise operations."""
    rgb = np.ascontiguousarray(pixels.numpy())
    xyz = cv2.transform(cv2.LUT(rgb, SRGB_DECODE), _affine(XYZ_WHITE_FROM_RGB))
    f = np.cbrt(xyz)
    if xyz.min() <= CUBE_ROOT_FROM:  # near black: rare in a patch
        dark = xyz <= CUBE_ROOT_FROM
        f[dark] = np.float32(7.787) * xyz[dark] + np.float32(16 / 116)
    return torch.from_numpy(f)


def lab_f_torch(pixels: torch.Tensor) -> torch.Tensor:
    """:func:`lab_f` by torch, on the pixels' device."""
    decode = torch.from_numpy(SRGB_DECODE).to(pixels.device)
    xyz = decode[pixels.long()] @ torch.tensor(XYZ_WHITE_FROM_RGB.T, dtype=torch.float32, device=pixels.device)
    return torch.where(xyz > CUBE_ROOT_FROM, xyz.clamp(min=0) ** (1 / 3), 7.787 * xyz + 16 / 116)


def rgb_of_f(f: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (B, N, 3) of f, the inverse of :func:`lab_f`: sRGB-encoded, clipped to [0, 1] and scaled to 255,
    truncated as torchstain's ``astype(uint8)``. On the CPU by :func:`rgb_of_f_numpy`, elsewhere by
    :func:`rgb_of_f_torch`."""
    return rgb_of_f_numpy(f) if f.device.type == "cpu" else rgb_of_f_torch(f)


def rgb_of_f_numpy(f: torch.Tensor) -> torch.Tensor:
    """:func:`rgb_of_f` of a CPU tensor by NumPy and OpenCV (powers and the matrix transform); ``x ** (1 / 2.4)``
    is computed as ``c * c ** (1 / 4)`` with ``c`` the cube root of ``x``, equal to float32 rounding and faster
    than a general power."""
    fn = np.ascontiguousarray(f.numpy())
    xyz = cv2.pow(fn, 3)
    if fn.min() <= CUBE_FROM:
        low = fn <= CUBE_FROM
        xyz[low] = (fn[low] - np.float32(16 / 116)) / np.float32(7.787)
    linear = cv2.transform(xyz, _affine(RGB_FROM_XYZ_WHITE))
    np.maximum(linear, 0, out=linear)
    out = np.cbrt(linear)
    out *= cv2.sqrt(cv2.sqrt(out))
    out *= np.float32(1.055 * 255)
    out -= np.float32(0.055 * 255)
    if linear.min() <= GAMMA_FROM:
        low = linear <= GAMMA_FROM
        out[low] = linear[low] * np.float32(12.92 * 255)
    np.minimum(out, 255, out=out)  # no lower clip needed: both branches give >= 0 from linear >= 0
    return torch.from_numpy(out.astype(np.uint8))


def rgb_of_f_torch(f: torch.Tensor) -> torch.Tensor:
    """:func:`rgb_of_f` by torch, on the tensor's device."""
    xyz = torch.where(f > CUBE_FROM, f**3, (f - 16 / 116) / 7.787)
    linear = xyz @ torch.tensor(RGB_FROM_XYZ_WHITE.T, dtype=f.dtype, device=f.device)
    rgb = torch.where(linear > GAMMA_FROM, 1.055 * linear.clamp(min=0) ** (1 / 2.4) - 0.055, 12.92 * linear)
    return (rgb.clamp(0, 1) * 255).to(torch.uint8)


def normalise_reinhard(
    pixels: torch.Tensor,
    target: dict[str, Any],
    io: float,
    beta: float,
    min_pixels: int,
    source: dict[str, list] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reinhard-normalised pixels (B, N, 3) uint8 and which patches could be normalised (B,): each patch by
    its own Lab mean and spread, or all by the slide's ``source`` estimate (written out for the reason
    ``normalise_macenko`` gives).

    Lab is an affine map of f (:func:`lab_f`), and so is the Reinhard map of Lab: the two compose into one affine
    map of f per patch (``f @ A.T + c``, one batched matrix product), between the conversion of the pixels to f
    and back (:func:`rgb_of_f`). Torchstain's per-pixel arithmetic, in fewer passes over the batch."""
    f = lab_f(pixels)
    dev = f.device
    if source is None:
        lab = f @ torch.tensor(LAB_FROM_F.T, dtype=f.dtype, device=dev) + torch.tensor(
            LAB_OFFSET, dtype=f.dtype, device=dev
        )
        mean, std = lab.mean(1).double(), lab.std(1, correction=0).double()
    else:
        mean = torch.tensor(source["lab_means"], dtype=torch.float64, device=dev).view(1, 3)
        std = torch.tensor(source["lab_stds"], dtype=torch.float64, device=dev).view(1, 3)
    ref_mean = torch.tensor(target["lab_means"], dtype=torch.float64, device=dev)
    ref_std = torch.tensor(target["lab_stds"], dtype=torch.float64, device=dev)
    # A patch with a constant Lab channel is returned unchanged; mapping it by 1 keeps its arithmetic finite.
    scale = ref_std / torch.where(std > 1e-6, std, 1.0)  # (B | 1, 3)
    to_lab = torch.tensor(LAB_FROM_F, dtype=torch.float64, device=dev)
    to_f = torch.tensor(F_FROM_LAB, dtype=torch.float64, device=dev)
    offset = torch.tensor(LAB_OFFSET, dtype=torch.float64, device=dev)
    a = to_f @ (scale.unsqueeze(-1) * to_lab)  # (B | 1, 3, 3)
    c = ((offset - mean) * scale + ref_mean - offset) @ to_f.T  # (B | 1, 3)
    moved = _affine_map(f, a.float(), c.float())
    out = rgb_of_f(moved)
    if source is None:
        ok = (stained_pixels(pixels, io, beta).sum(1) >= min_pixels) & (std > 1e-6).all(-1)
    else:  # checked when the slide's estimate was fitted
        ok = torch.ones(len(pixels), dtype=torch.bool, device=dev)
    return out, ok
