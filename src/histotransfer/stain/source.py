"""A slide's source stain, the one its pixels are mapped from under per-slide normalisation: which patches it is
estimated on, the pixels taken from them, and the estimate as feature files record it.

The estimate is fitted on the pooled pixels of up to :data:`SOURCE_PATCHES` of the slide's patches, spread
evenly over the patch file's rows (all of them on a small slide), read and resized as the encoder gets them
(:func:`source_sample`); larger samples are thinned by a pixel stride to :data:`SOURCE_PIXELS`, which keeps the
distribution of pixel colours. The patches rather than the tiling's thumbnail: a thumbnail averages nuclei with
the stroma around them, which lowers the concentration percentiles Macenko scales by, so the slide's estimate
would not describe the pixels it is applied to.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import HistotransferError

SOURCE_PATCHES = 64  # patches a slide's source stain is estimated on (all of a slide with fewer)
SOURCE_PIXELS = 1 << 20  # pixels at most in that estimate; a larger sample is thinned by a pixel stride


def source_sample(coords: np.ndarray, n: int = SOURCE_PATCHES) -> np.ndarray:
    """The coords of the patches a slide's source stain is estimated on: ``n`` of them spread evenly over the
    patch file's rows (which follow the tissue row by row), or all of a slide with fewer."""
    if len(coords) <= n:
        return coords
    return coords[np.unique(np.linspace(0, len(coords) - 1, n).round().astype(np.int64))]


def thinned(patches: np.ndarray) -> np.ndarray:
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
            raise HistotransferError(
                f"slide stain estimate lacks {', '.join(sorted(missing))}; re-extract the features."
            )
        return cls(
            data["estimate"],
            int(data["n_patches"]),
            int(data["n_pixels"]),
            int(data["n_stained"]),
            str(data.get("reason", "")),
        )


def recorded_source(attrs: Mapping[str, Any], source: str | os.PathLike[str] = "") -> SlideStain:
    """The slide's source estimate a feature file of per-slide normalised features records in ``stain_source``
    (what a later stage applies to see the pixels extraction saw)."""
    value = attrs.get("stain_source")
    if not value:
        raise HistotransferError(
            f"{source}: per-slide stain-normalised features without the slide's stain_source "
            "record; re-extract the features."
        )
    try:
        return SlideStain.from_dict(json.loads(value))
    except (ValueError, TypeError) as exc:
        raise HistotransferError(f"{source}: unreadable stain_source record ({exc}); re-extract the features.") from exc
