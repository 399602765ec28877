"""Stain normalisation (Macenko, Reinhard) and stain augmentation (HED jitter) for uint8 RGB patch batches.

Slides from different centres differ in stain colour; a model can learn the centre's colour instead of the
tissue. Normalising every patch to one reference colour before the encoder removes most of that signal, and
jittering stain colour during fine-tuning keeps the encoder from relying on it.

**Fitting** a reference uses torchstain's NumPy Reinhard normaliser unchanged and its Macenko arithmetic laid
out for large samples (``_macenko_fit``, equal to it to float64 rounding) (``fit_macenko``, ``fit_reinhard``). A
reference is an image file, an in-memory RGB array (a patch or a slide region) or a sequence of them (patches
of several slides): a sequence is fitted on the concatenation of its pixels, one pooled estimate in which each
patch counts by its size, so a patch with little tissue cannot pull the target as far as an average of
per-patch targets would let it. Fitted numbers are rounded to 6 decimals: a normaliser saved with
``to_dict`` and reloaded gives identical outputs and ``tag``, and refitting the same reference on another
machine gives the same numbers unless one sits on a rounding boundary (float64 differences between
machines are far below 1e-6). Reinhard matches the Lab mean and standard deviation of all of a patch's
pixels, background included, as torchstain does.

**Applying** runs on a (B, H, W, 3) uint8 torch tensor on its own device, the whole batch at once. torchstain
normalises one image per call and keeps its constants on the CPU, so the same arithmetic is written here
batched (per-patch percentiles by sorting, stain unmixing by a batched pseudo-inverse); the tests check it
against torchstain's NumPy backend to within one grey level.

**References given as text** (``--stain-ref``, :func:`fit_reference`): a patch image file; a folder of patch
images (fitted as one set, as above); a slide region ``SLIDE@x,y,w,h`` (level-0 pixels of the slide file,
read at level 0); or a fitted target ``.json`` (``to_dict``, as ``histotransfer stain-fit`` writes it), loaded
as it is, so that every stage and machine uses the very same numbers.

**Scope: per slide or per patch.** With ``scope="slide"`` (what extraction does by default) the *source*
stain, the one the pixels are mapped from, is estimated once per slide (:meth:`StainNormalizer.fit_source`) and
every patch of that slide is mapped with it: Macenko unmixes each pixel with the slide's stain vectors and
scales its concentrations by the ratio of the target's to the slide's maximum concentrations, Reinhard maps
Lab by the slide's mean and spread. Each pixel then goes through one fixed map per slide, so patches of one
slide keep their colour differences (lesion darker than stroma) while the slide as a whole moves to the
target: the centre's colour goes, the tissue's own colour stays. With ``scope="patch"`` every patch is its
own source, which evens out those differences too. The slide's estimate is fitted by torchstain's NumPy
normalisers on the pooled pixels of up to :data:`SOURCE_PATCHES` of its patches, spread evenly over the
patch file's rows (all of them on a small slide), read and resized as the encoder gets them
(:func:`source_sample`; larger samples are thinned by a pixel stride to :data:`SOURCE_PIXELS`, which keeps
the distribution of pixel colours). The patches rather than the tiling's thumbnail: a thumbnail averages
nuclei with the stroma around them, which lowers the concentration percentiles Macenko scales by, so the
slide's estimate would not describe the pixels it is applied to. A slide whose sample holds fewer than
``min_pixels`` stained pixels, or whose estimate is degenerate (as for a patch, below), is left unchanged
(:class:`SlideStain` says why).

**Patches left unchanged.** Per patch, a patch is returned as it is (by both methods) when it has fewer than
``min_pixels`` stained pixels (optical density ``-log((I + 1) / io)`` of at least ``beta`` in all three
channels: the pixels Macenko's method estimates stains from; default 500, a few hundred pixels being what the
1st/99th percentile angles need to be stable), and for Macenko also when the estimate is degenerate (the two
stain vectors less than 1 degree apart, or a non-finite or zero maximum concentration), for Reinhard when a Lab
channel is constant.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torchstain.numpy.normalizers import NumpyReinhardNormalizer

from .._read import read_text
from ..colour import HED_FROM_RGB, RGB_FROM_HED
from ..errors import HistotransferError

METHODS = ("macenko", "reinhard")
MACENKO_DEFAULTS = {"io": 240.0, "alpha": 1.0, "beta": 0.15}
MIN_STAINED_PIXELS = 500
MIN_STAIN_ANGLE_DEG = 1.0
SCOPES = ("slide", "patch")
SOURCE_PATCHES = 64  # patches a slide's source stain is estimated on (all of a slide with fewer)
SOURCE_PIXELS = 1 << 20  # pixels at most in that estimate; a larger sample is thinned by a pixel stride
DECIMALS = 6
# sRGB (D65) to XYZ and the D65 white point: the constants of torchstain's Reinhard (OpenCV's), so that the
# batched Lab conversion below agrees with it.
RGB_TO_XYZ = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                       [0.019334, 0.119193, 0.950227]])
D65_WHITE = np.array([0.95047, 1.0, 1.08883])

Reference = str | os.PathLike[str] | np.ndarray
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SLIDE_REGION = re.compile(r"^(?P<path>.+)@(?P<x>\d+),(?P<y>\d+),(?P<w>\d+),(?P<h>\d+)$")
MAX_REGION_PIXELS = 4096 * 4096  # a reference region larger than this is a slide, not a reference


def _od_torch(pixels: torch.Tensor) -> torch.Tensor:
    return -torch.log((pixels.float() + 1.0) / 256.0)


def _from_od_torch(od: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_od_torch``, rounded to the nearest grey level and clipped to uint8."""
    return (256.0 * torch.exp(-od) - 1.0).round_().clamp_(0, 255).to(torch.uint8)


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


def _stained_count(rgb: np.ndarray, io: float, beta: float) -> int:
    od = -np.log((rgb.reshape(-1, 3).astype(np.float64) + 1) / io)
    return int((od >= beta).all(axis=1).sum())


def _check_stained(rgb: np.ndarray, min_pixels: int, io: float, beta: float) -> None:
    n = _stained_count(rgb, io, beta)
    if n < min_pixels:
        raise HistotransferError(
            f"stain reference: only {n} stained pixels (need {min_pixels}); it is mostly background. Pick a "
            "reference patch (or region) covered by tissue."
        )


def _rounded(values: np.ndarray) -> list:
    return np.round(np.asarray(values, dtype=np.float64), DECIMALS).tolist()


def _macenko_fit(rgb: np.ndarray, io: float, alpha: float, beta: float) -> tuple[np.ndarray, np.ndarray]:
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


def _macenko_estimate(rgb: np.ndarray, io: float, alpha: float, beta: float) -> tuple[dict[str, list], str]:
    """torchstain's Macenko fit of uint8 RGB pixels (rounded), and why it is degenerate ("" when it is not)."""
    try:
        stains, max_c = _macenko_fit(rgb, io, alpha, beta)
    except (np.linalg.LinAlgError, ValueError) as exc:
        return {}, f"Macenko's stain estimate failed ({exc})"
    estimate = {"stain_matrix": _rounded(stains), "max_concentrations": _rounded(max_c)}
    if not (np.isfinite(stains).all() and np.isfinite(max_c).all()) or max_c.min() <= 1e-6:
        return estimate, "Macenko's stain estimate is degenerate (a non-finite or zero maximum concentration)"
    cosine = abs(stains[:, 0] @ stains[:, 1]) / (np.linalg.norm(stains[:, 0]) * np.linalg.norm(stains[:, 1]))
    if cosine >= math.cos(math.radians(MIN_STAIN_ANGLE_DEG)):
        return estimate, (f"Macenko's two stain vectors are less than {MIN_STAIN_ANGLE_DEG:g} degree apart (one "
                          "colour only)")
    return estimate, ""


def _reinhard_estimate(rgb: np.ndarray) -> tuple[dict[str, list], str]:
    """torchstain's Reinhard fit of uint8 RGB pixels (rounded), and why it is degenerate ("" when it is not)."""
    normalizer = NumpyReinhardNormalizer()
    normalizer.fit(rgb.reshape(-1, 1, 3))
    estimate = {"lab_means": _rounded(normalizer.target_means), "lab_stds": _rounded(normalizer.target_stds)}
    if min(estimate["lab_stds"]) <= 1e-6:
        return estimate, "a Lab channel is constant"
    return estimate, ""


def fit_macenko(rgb: np.ndarray, io: float = 240.0, alpha: float = 1.0, beta: float = 0.15,
                min_pixels: int = MIN_STAINED_PIXELS) -> dict[str, list]:
    """Macenko target of uint8 RGB pixels (any shape ending in 3), by torchstain's NumPy normaliser:
    ``stain_matrix`` (3 x 2, haematoxylin then eosin columns) and ``max_concentrations`` (2)."""
    _check_stained(rgb, min_pixels, io, beta)
    target, reason = _macenko_estimate(rgb, io, alpha, beta)
    if reason:
        raise HistotransferError(f"stain reference: {reason}; pick a reference with both haematoxylin and eosin.")
    return target


def fit_reinhard(rgb: np.ndarray, io: float = 240.0, beta: float = 0.15,
                 min_pixels: int = MIN_STAINED_PIXELS) -> dict[str, list]:
    """Reinhard target of uint8 RGB pixels, by torchstain's NumPy normaliser: ``lab_means`` and ``lab_stds``
    (L in 0-100, a, b centred on 0) over all the pixels (``io``, ``beta``: what counts as stained)."""
    _check_stained(rgb, min_pixels, io, beta)
    return _reinhard_estimate(rgb)[0]


def source_sample(coords: np.ndarray, n: int = SOURCE_PATCHES) -> np.ndarray:
    """The coords of the patches a slide's source stain is estimated on: ``n`` of them spread evenly over the
    patch file's rows (which follow the tissue row by row), or all of a slide with fewer."""
    if len(coords) <= n:
        return coords
    return coords[np.unique(np.linspace(0, len(coords) - 1, n).round().astype(np.int64))]


def _thinned(patches: np.ndarray) -> np.ndarray:
    """The pixels (N, 3) of a patch sample, every ``stride``-th row and column of each patch so that at most
    about :data:`SOURCE_PIXELS` remain: a regular grid keeps the distribution of colours, unlike averaging."""
    b, h, w = patches.shape[:3]
    stride = max(1, math.ceil(math.sqrt(b * h * w / SOURCE_PIXELS)))
    return np.ascontiguousarray(patches[:, ::stride, ::stride]).reshape(-1, 3)


@dataclass(frozen=True)
class SlideStain:
    """A slide's source stain, fitted once on a sample of its patches (:meth:`StainNormalizer.fit_source`).

    ``estimate`` holds the numbers a target holds (Macenko ``stain_matrix`` and ``max_concentrations``,
    Reinhard ``lab_means`` and ``lab_stds``), or None where the sample gives none: the slide's patches are then
    left unchanged and ``reason`` says why. ``n_patches``, ``n_pixels``, ``n_stained``: the sample.
    """

    estimate: dict[str, list] | None
    n_patches: int
    n_pixels: int
    n_stained: int
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers for JSON (what feature files record as ``stain_source``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SlideStain:
        """The estimate ``to_dict`` described."""
        missing = {"estimate", "n_patches", "n_pixels", "n_stained"} - set(data)
        if missing:
            raise HistotransferError(f"slide stain estimate lacks {', '.join(sorted(missing))}; re-extract the "
                                     "features.")
        return cls(data["estimate"], int(data["n_patches"]), int(data["n_pixels"]), int(data["n_stained"]),
                   str(data.get("reason", "")))


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
    v_min, v_max = (plane @ torch.stack([angles[:, i].cos(), angles[:, i].sin()], -1).unsqueeze(-1)
                    for i in (0, 1))
    min_first = (v_min[:, 0] > v_max[:, 0]).view(-1, 1, 1)
    return torch.where(min_first, torch.cat([v_min, v_max], -1), torch.cat([v_max, v_min], -1))


def _stained(pixels: torch.Tensor, io: float, beta: float) -> torch.Tensor:
    """Which pixels (B, N) are stained: optical density of at least ``beta`` in all three channels."""
    return (-torch.log((pixels.float() + 1.0) / io) >= beta).all(-1)


def _macenko(pixels: torch.Tensor, target: dict[str, Any], io: float, alpha: float, beta: float,
             min_pixels: int, source: dict[str, list] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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
        ok = (enough & torch.isfinite(max_c).all(-1) & (max_c > 1e-6).all(-1)
              & (cosine < math.cos(math.radians(MIN_STAIN_ANGLE_DEG))))
    else:  # checked when the slide's estimate was fitted
        ok = torch.ones(len(pixels), dtype=torch.bool, device=od.device)
    # Truncation, not rounding, as torchstain's astype(uint8).
    return out.clamp_(max=255).transpose(1, 2).to(torch.uint8), ok


def _rgb_to_lab(pixels: torch.Tensor) -> torch.Tensor:
    """CIE Lab (L 0-100, float32) of uint8 RGB (..., 3), by torchstain's formulas."""
    # The sRGB decoding of the 256 grey levels, looked up: the same numbers as computing it per pixel.
    levels = torch.arange(256, dtype=torch.float32, device=pixels.device) / 255
    decode = torch.where(levels > 0.04045, ((levels + 0.055) / 1.055) ** 2.4, levels / 12.92)
    linear = decode[pixels.long()]
    xyz = linear @ torch.tensor(RGB_TO_XYZ.T, dtype=torch.float32, device=pixels.device)
    xyz = xyz / torch.tensor(D65_WHITE, dtype=torch.float32, device=pixels.device)
    f = torch.where(xyz > 0.008856, xyz.clamp(min=0) ** (1 / 3), 7.787 * xyz + 16 / 116)
    return torch.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def _lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_rgb_to_lab``, clipped to [0, 1]."""
    y = (lab[..., 0] + 16) / 116
    f = torch.stack([lab[..., 1] / 500 + y, y, y - lab[..., 2] / 200], -1)
    xyz = torch.where(f > 0.2068966, f**3, (f - 16 / 116) / 7.787)
    xyz = xyz * torch.tensor(D65_WHITE, dtype=lab.dtype, device=lab.device)
    linear = xyz @ torch.tensor(np.linalg.inv(RGB_TO_XYZ).T, dtype=lab.dtype, device=lab.device)
    rgb = torch.where(linear > 0.0031308, 1.055 * linear.clamp(min=0) ** (1 / 2.4) - 0.055, 12.92 * linear)
    return rgb.clamp(0, 1)


def _reinhard(pixels: torch.Tensor, target: dict[str, Any], io: float, beta: float,
              min_pixels: int, source: dict[str, list] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reinhard-normalised pixels (B, N, 3) uint8 and which patches could be normalised (B,): each patch by
    its own Lab mean and spread, or all by the slide's ``source`` estimate (written out for the reason
    ``_macenko`` gives)."""
    lab = _rgb_to_lab(pixels)
    if source is None:
        mean, std = lab.mean(1, keepdim=True), lab.std(1, correction=0, keepdim=True)
    else:
        mean = torch.tensor(source["lab_means"], device=lab.device, dtype=lab.dtype).view(1, 1, 3)
        std = torch.tensor(source["lab_stds"], device=lab.device, dtype=lab.dtype).view(1, 1, 3)
    ref_mean = torch.tensor(target["lab_means"], device=lab.device, dtype=lab.dtype)
    ref_std = torch.tensor(target["lab_stds"], device=lab.device, dtype=lab.dtype)
    out = _lab_to_rgb((lab - mean) / std * ref_std + ref_mean) * 255
    if source is None:
        ok = (_stained(pixels, io, beta).sum(1) >= min_pixels) & (std.squeeze(1) > 1e-6).all(-1)
    else:  # checked when the slide's estimate was fitted
        ok = torch.ones(len(pixels), dtype=torch.bool, device=lab.device)
    return out.to(torch.uint8), ok


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise HistotransferError(f"stain method {method!r} is unknown; use one of {', '.join(METHODS)}.")


def _check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise HistotransferError(f"stain scope {scope!r} is unknown; use one of {', '.join(SCOPES)}.")


@dataclass(frozen=True)
class StainNormalizer:
    """Normalises uint8 RGB patch batches to a fitted reference's stain colour (see the module doc).

    ``target`` holds the fitted numbers (``fit_macenko`` / ``fit_reinhard``); ``settings`` are ``io`` and
    ``beta`` (which pixels count as stained, for both methods), Macenko's ``alpha`` and ``min_pixels``.
    ``scope`` says where the source stain comes from: ``patch`` (each patch's own) or ``slide`` (the slide's
    estimate, :meth:`fit_source`, passed with every batch of the slide; see the module doc).
    """

    method: str
    target: dict[str, list]
    settings: dict[str, float] = field(default_factory=lambda: {**MACENKO_DEFAULTS,
                                                                "min_pixels": MIN_STAINED_PIXELS})
    scope: str = "patch"

    def __post_init__(self) -> None:
        _check_method(self.method)
        _check_scope(self.scope)

    @classmethod
    def fit(cls, method: str, reference: Reference | Sequence[Reference], io: float = 240.0,
            alpha: float = 1.0, beta: float = 0.15, min_pixels: int = MIN_STAINED_PIXELS,
            scope: str = "patch") -> StainNormalizer:
        """Fit ``method`` ("macenko" | "reinhard") to a reference (see ``load_reference``)."""
        settings = {"io": float(io), "alpha": float(alpha), "beta": float(beta), "min_pixels": int(min_pixels)}
        _check_method(method)
        rgb = load_reference(reference)
        if method == "macenko":
            return cls(method, fit_macenko(rgb, io, alpha, beta, min_pixels), settings, scope)
        return cls(method, fit_reinhard(rgb, io, beta, min_pixels), settings, scope)

    def with_scope(self, scope: str) -> StainNormalizer:
        """The same target applied with another scope."""
        return replace(self, scope=scope)

    @property
    def per_slide(self) -> bool:
        """Whether every batch needs its slide's source estimate."""
        return self.scope == "slide"

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers for JSON: ``method``, ``target``, ``settings``, and ``scope`` when it is ``slide``
        (a per-patch normaliser is described, and tagged, as it was before per-slide normalisation existed)."""
        return {"method": self.method, "target": self.target, "settings": self.settings,
                **({"scope": self.scope} if self.per_slide else {})}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StainNormalizer:
        """The normaliser that ``to_dict`` described."""
        missing = {"method", "target", "settings"} - set(data)
        if missing:
            raise HistotransferError(f"stain normaliser description lacks {', '.join(sorted(missing))}; "
                                     "save it with StainNormalizer.to_dict().")
        return cls(data["method"], data["target"], data["settings"], data.get("scope", "patch"))

    def tag(self) -> str:
        """``<method>-<8 hex>``: the method and a hash of target, settings and scope, for encoder ids and attrs."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return f"{self.method}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"

    def fit_source(self, patches: np.ndarray) -> SlideStain:
        """A slide's source stain, by torchstain's NumPy normaliser on the pooled pixels of a sample of its
        patches (uint8 (B, H, W, 3), as the encoder gets them: :func:`source_sample`), thinned to about
        :data:`SOURCE_PIXELS`. Macenko: stain vectors and 99th-percentile concentrations, over all the
        pixels as for a target; Reinhard: Lab mean and spread of all of them (the background between the
        tissue of the patches included, as a target's)."""
        if patches.dtype != np.uint8 or patches.ndim != 4 or patches.shape[-1] != 3:
            raise ValueError(f"expected a (B, H, W, 3) uint8 array, got {patches.dtype} {tuple(patches.shape)}")
        pixels = _thinned(patches)
        s = self.settings
        n_stained = _stained_count(pixels, s["io"], s["beta"])
        counts = {"n_patches": len(patches), "n_pixels": len(pixels), "n_stained": n_stained}
        need = max(int(s["min_pixels"]), 2)
        if n_stained < need:
            return SlideStain(None, **counts, reason=f"only {n_stained} stained pixels in the {len(patches)} "
                                                     f"patch(es) sampled (need {need})")
        if self.method == "macenko":
            estimate, reason = _macenko_estimate(pixels, s["io"], s["alpha"], s["beta"])
        else:
            estimate, reason = _reinhard_estimate(pixels)
        return SlideStain(None if reason else estimate, **counts, reason=reason)

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor, source: SlideStain | None = None) -> torch.Tensor:
        """Normalise a (B, H, W, 3) uint8 batch; returns uint8 (B, H, W, 3) on the same device. A per-slide
        normaliser takes the batch's slide's ``source`` estimate (a batch holds patches of one slide)."""
        if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise ValueError(f"expected a (B, H, W, 3) uint8 tensor, got {pixels.dtype} {tuple(pixels.shape)}")
        if self.per_slide != (source is not None):
            raise ValueError("a per-slide normaliser takes the slide's source estimate (fit_source), a per-patch "
                             "one none")
        if pixels.numel() == 0 or (source is not None and source.estimate is None):
            return pixels.clone()
        flat = pixels.reshape(pixels.shape[0], -1, 3)
        s = self.settings
        estimate = None if source is None else source.estimate
        if self.method == "macenko":
            out, ok = _macenko(flat, self.target, s["io"], s["alpha"], s["beta"], int(s["min_pixels"]), estimate)
        else:
            out, ok = _reinhard(flat, self.target, s["io"], s["beta"], int(s["min_pixels"]), estimate)
        return torch.where(ok.view(-1, 1, 1), out, flat).reshape(pixels.shape)


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
        return {"name": "hed_jitter", "sigma": self.sigma, "bias": self.bias, "seed": self.seed,
                "units": "natural-log optical density", "stain_vectors": "Ruifrok-Johnston H, E, DAB"}

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """Jitter a (B, H, W, 3) uint8 batch; returns uint8 (B, H, W, 3) on the same device."""
        if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise ValueError(f"expected a (B, H, W, 3) uint8 tensor, got {pixels.dtype} {tuple(pixels.shape)}")
        b = pixels.shape[0]
        scale = 1 + (torch.rand(b, 3, generator=self.generator) * 2 - 1) * self.sigma
        shift = (torch.rand(b, 3, generator=self.generator) * 2 - 1) * self.bias
        dev = pixels.device
        hed = _od_torch(pixels) @ torch.tensor(HED_FROM_RGB, dtype=torch.float32, device=dev)
        hed = hed * scale.to(dev).view(b, 1, 1, 3) + shift.to(dev).view(b, 1, 1, 3)
        return _from_od_torch(hed @ torch.tensor(RGB_FROM_HED, dtype=torch.float32, device=dev))


def read_slide_region(spec: str) -> np.ndarray:
    """The RGB pixels of a slide region ``SLIDE@x,y,w,h``: ``w`` x ``h`` level-0 pixels from (x, y), read at
    level 0."""
    from ..slide import open_slide

    match = SLIDE_REGION.match(spec)
    if match is None:
        raise HistotransferError(f"{spec}: not a slide region; write it as SLIDE@x,y,w,h in level-0 pixels.")
    x, y, w, h = (int(match[k]) for k in ("x", "y", "w", "h"))
    if w * h == 0 or w * h > MAX_REGION_PIXELS:
        raise HistotransferError(f"{spec}: a region of {w} x {h} pixels; give a tissue region of 1 to "
                                 f"{MAX_REGION_PIXELS} pixels (e.g. 2048,2048).")
    # The region is in level-0 pixels, so the slide's resolution plays no part: any mpp opens it.
    with open_slide(match["path"], mpp=1.0) as slide:
        sw, sh = slide.dimensions
        if x + w > sw or y + h > sh:
            raise HistotransferError(f"{spec}: the region ends at ({x + w}, {y + h}), outside the slide's level 0 "
                                     f"({sw} x {sh}); pick a region inside it.")
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
        with open_slide(patch_set.spec.slide_path, mpp=patch_set.spec.mpp) as slide, \
                PatchReader(slide, patch_set.spec) as reader:
            rgb = reader.read(int(x), int(y))
        if not cv2.imwrite(str(out / f"{path.stem}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
            raise HistotransferError(f"{out / path.stem}.png: could not be written; check the folder.")
    return out


def _folder_images(folder: Path) -> list[Path]:
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not images:
        raise HistotransferError(f"{folder}: holds no patch images ({', '.join(IMAGE_SUFFIXES)}) to fit a stain "
                                 "reference on; give a folder of reference patches.")
    return images


def read_stain_target(path: str | os.PathLike[str]) -> StainNormalizer:
    """A fitted target written by :func:`write_stain_target` (or ``histotransfer stain-fit``)."""
    try:
        data = json.loads(read_text(path, "stain target"))
    except (OSError, ValueError) as exc:
        raise HistotransferError(f"{path}: not a readable stain target JSON ({exc}); write it with "
                                 "histotransfer stain-fit.") from exc
    if not isinstance(data, dict):
        raise HistotransferError(f"{path}: not a stain target (a JSON object with method, target, settings); "
                                 "write it with histotransfer stain-fit.")
    return StainNormalizer.from_dict(data)


def write_stain_target(normalizer: StainNormalizer, path: str | os.PathLike[str]) -> Path:
    """Write ``normalizer.to_dict()`` as JSON: a reference every later fit-free use loads as it is."""
    from .._io import write_json

    write_json(normalizer.to_dict(), path)
    return Path(path)


def fit_reference(method: str, reference: str | os.PathLike[str]) -> StainNormalizer:
    """The ``method`` normaliser of a reference given as text: a fitted target ``.json`` (loaded; its method
    must be ``method``), a slide region ``SLIDE@x,y,w,h``, a folder of patch images (one pooled fit) or a
    patch image file."""
    _check_method(method)
    text = str(reference)
    path = Path(text).expanduser()
    if path.suffix.lower() == ".json" and path.is_file():
        loaded = read_stain_target(path)
        if loaded.method != method:
            raise HistotransferError(f"{path}: a {loaded.method} target, but stain normalisation {method} was "
                                     f"asked for; pass --stain-norm {loaded.method} or another reference.")
        return loaded
    if not path.exists() and SLIDE_REGION.match(text):
        source: Reference | list[Path] = read_slide_region(text)
    elif path.is_dir():
        source = _folder_images(path)
    elif path.is_file():
        source = path
    else:
        raise HistotransferError(f"{text}: no such stain reference; give a patch image, a folder of them, "
                                 "SLIDE@x,y,w,h or a fitted target .json.")
    try:
        return StainNormalizer.fit(method, source)
    except HistotransferError as exc:
        raise HistotransferError(f"{text}: {exc}") from None


def stain_normalizer(method: str, reference: str | os.PathLike[str] | None,
                     scope: str = "slide") -> StainNormalizer | None:
    """The normaliser of a stage's ``stain_norm`` / ``stain_ref`` / ``stain_scope`` options: None for
    ``"none"``. The scope is the stage's, whatever scope a fitted target ``.json`` was recorded with."""
    if method == "none":
        return None
    if reference is None:
        raise HistotransferError(f"stain normalisation {method} needs a reference (--stain-ref).")
    return fit_reference(method, reference).with_scope(scope)


def recorded_normalizer(record: Mapping[str, Any], source: str | os.PathLike[str] = "") -> StainNormalizer | None:
    """The normaliser a feature file's attrs or a run's encoder record name in ``stain_target`` (the JSON of
    ``to_dict``); None where none was used (or the features are not ours)."""
    value = record.get("stain_target")
    if not value:
        return None
    try:
        data = json.loads(value) if isinstance(value, str) else dict(value)
        return StainNormalizer.from_dict(data)
    except (ValueError, TypeError) as exc:
        raise HistotransferError(f"{source}: unreadable stain_target record ({exc}); re-extract the features.") \
            from exc


def recorded_source(attrs: Mapping[str, Any], source: str | os.PathLike[str] = "") -> SlideStain:
    """The slide's source estimate a feature file of per-slide normalised features records in ``stain_source``
    (what a later stage applies to see the pixels extraction saw)."""
    value = attrs.get("stain_source")
    if not value:
        raise HistotransferError(f"{source}: per-slide stain-normalised features without the slide's stain_source "
                                 "record; re-extract the features.")
    try:
        return SlideStain.from_dict(json.loads(value))
    except (ValueError, TypeError) as exc:
        raise HistotransferError(f"{source}: unreadable stain_source record ({exc}); re-extract the features.") \
            from exc


def stain_tag(normalizer: StainNormalizer | None) -> str:
    """``normalizer.tag()``, or ``none``."""
    return "none" if normalizer is None else normalizer.tag()
