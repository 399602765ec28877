"""The stain normaliser: a fitted target (Macenko or Reinhard) and the scope it is applied with, its JSON
description and tag, and applying it to uint8 (B, H, W, 3) batches on their own device.

**Scope: per slide or per patch.** With ``scope="slide"`` (what extraction does by default) the *source*
stain, the one the pixels are mapped from, is estimated once per slide (:meth:`StainNormalizer.fit_source`,
on a sample of its patches: :mod:`.source`) and every patch of that slide is mapped with it. Each pixel then
goes through one fixed map per slide, so patches of one slide keep their colour differences (lesion darker than
stroma) while the slide as a whole moves to the target: the centre's colour goes, the tissue's own colour
stays. With ``scope="patch"`` every patch is its own source, which evens out those differences too. A slide
whose sample holds fewer than ``min_pixels`` stained pixels, or whose estimate is degenerate, is left unchanged
(:class:`SlideStain` says why); so, per patch, is a patch with fewer than ``min_pixels`` stained pixels or a
degenerate estimate (see :mod:`.density`, :mod:`.macenko`, :mod:`.reinhard`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from ..errors import HistotransferError
from .density import MIN_STAINED_PIXELS, stained_count
from .macenko import MACENKO_DEFAULTS, fit_macenko, macenko_estimate, normalise_macenko
from .reference import Reference, load_reference
from .reinhard import fit_reinhard, normalise_reinhard, reinhard_slide_estimate
from .source import SlideStain, thinned

METHODS = ("macenko", "reinhard")
SCOPES = ("slide", "patch")


def check_method(method: str) -> None:
    """Refuse a stain method other than :data:`METHODS`."""
    if method not in METHODS:
        raise HistotransferError(f"stain method {method!r} is unknown; use one of {', '.join(METHODS)}.")


def check_scope(scope: str) -> None:
    """Refuse a stain scope other than :data:`SCOPES`."""
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
    settings: dict[str, float] = field(default_factory=lambda: {**MACENKO_DEFAULTS, "min_pixels": MIN_STAINED_PIXELS})
    scope: str = "patch"

    def __post_init__(self) -> None:
        check_method(self.method)
        check_scope(self.scope)

    @classmethod
    def fit(
        cls,
        method: str,
        reference: Reference | Sequence[Reference],
        io: float = 240.0,
        alpha: float = 1.0,
        beta: float = 0.15,
        min_pixels: int = MIN_STAINED_PIXELS,
        scope: str = "patch",
    ) -> StainNormalizer:
        """Fit ``method`` ("macenko" | "reinhard") to a reference (see ``load_reference``)."""
        settings = {"io": float(io), "alpha": float(alpha), "beta": float(beta), "min_pixels": int(min_pixels)}
        check_method(method)
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
        return {
            "method": self.method,
            "target": self.target,
            "settings": self.settings,
            **({"scope": self.scope} if self.per_slide else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StainNormalizer:
        """The normaliser that ``to_dict`` described."""
        missing = {"method", "target", "settings"} - set(data)
        if missing:
            raise HistotransferError(
                f"stain normaliser description lacks {', '.join(sorted(missing))}; "
                "save it with StainNormalizer.to_dict()."
            )
        return cls(data["method"], data["target"], data["settings"], data.get("scope", "patch"))

    def tag(self) -> str:
        """``<method>-<8 hex>``: the method and a hash of target, settings and scope, for encoder ids and attrs."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return f"{self.method}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"

    def fit_source(self, patches: np.ndarray) -> SlideStain:
        """A slide's source stain, fitted on the pooled pixels of a sample of its patches (uint8 (B, H, W, 3), as
        the encoder gets them: :func:`source_sample`), thinned to about :data:`SOURCE_PIXELS`. Macenko: stain
        vectors and 99th-percentile concentrations, over all the pixels as for a target, by torchstain's
        arithmetic; Reinhard: Lab mean and spread of all of them (the background between the tissue of the
        patches included, as a target's), from the Lab values its application converts the pixels to
        (:func:`reinhard_slide_estimate`, torchstain's numbers to float32 rounding)."""
        if patches.dtype != np.uint8 or patches.ndim != 4 or patches.shape[-1] != 3:
            raise ValueError(f"expected a (B, H, W, 3) uint8 array, got {patches.dtype} {tuple(patches.shape)}")
        pixels = thinned(patches)
        s = self.settings
        n_stained = stained_count(pixels, s["io"], s["beta"])
        counts = {"n_patches": len(patches), "n_pixels": len(pixels), "n_stained": n_stained}
        need = max(int(s["min_pixels"]), 2)
        if n_stained < need:
            return SlideStain(
                None,
                **counts,
                reason=f"only {n_stained} stained pixels in the {len(patches)} patch(es) sampled (need {need})",
            )
        if self.method == "macenko":
            estimate, reason = macenko_estimate(pixels, s["io"], s["alpha"], s["beta"])
        else:
            estimate, reason = reinhard_slide_estimate(pixels)
        return SlideStain(None if reason else estimate, **counts, reason=reason)

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor, source: SlideStain | None = None) -> torch.Tensor:
        """Normalise a (B, H, W, 3) uint8 batch; returns uint8 (B, H, W, 3) on the same device. A per-slide
        normaliser takes the batch's slide's ``source`` estimate (a batch holds patches of one slide)."""
        if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise ValueError(f"expected a (B, H, W, 3) uint8 tensor, got {pixels.dtype} {tuple(pixels.shape)}")
        if self.per_slide != (source is not None):
            raise ValueError(
                "a per-slide normaliser takes the slide's source estimate (fit_source), a per-patch one none"
            )
        if pixels.numel() == 0 or (source is not None and source.estimate is None):
            return pixels.clone()
        flat = pixels.reshape(pixels.shape[0], -1, 3)
        s = self.settings
        estimate = None if source is None else source.estimate
        if self.method == "macenko":
            out, ok = normalise_macenko(
                flat, self.target, s["io"], s["alpha"], s["beta"], int(s["min_pixels"]), estimate
            )
        else:
            out, ok = normalise_reinhard(flat, self.target, s["io"], s["beta"], int(s["min_pixels"]), estimate)
        if not bool(ok.all()):
            out = torch.where(ok.view(-1, 1, 1), out, flat)
        return out.reshape(pixels.shape)


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
        raise HistotransferError(f"{source}: unreadable stain_target record ({exc}); re-extract the features.") from exc


def stain_tag(normalizer: StainNormalizer | None) -> str:
    """``normalizer.tag()``, or ``none``."""
    return "none" if normalizer is None else normalizer.tag()
