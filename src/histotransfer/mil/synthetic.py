"""Synthetic feature bags with a planted signal, to check and benchmark MIL without slides.

A positive bag hides a few "lesion" instances whose features are shifted along a fixed direction; every other
instance (and every instance of a negative bag) is Gaussian noise. A working attention MIL separates the
bags and attends to the planted instances.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .._io import atomic_path


@dataclass
class SyntheticBag:
    slide_id: str
    label: int
    features: np.ndarray  # (N, D) float32
    coords: np.ndarray  # (N, 2) int64, a grid of patch_size squares
    planted: np.ndarray  # indices of the planted instances (empty for negatives)


def planted_bags(
    n_slides: int,
    n_patches: tuple[int, int] = (20, 40),
    dim: int = 16,
    n_planted: int = 3,
    shift: float = 3.0,
    scale: float = 1.0,
    positive_fraction: float = 0.5,
    patch_size: int = 256,
    seed: int = 0,
) -> list[SyntheticBag]:
    """``n_slides`` bags named ``slide_000``..., the first ``positive_fraction`` of them positive (label 1).

    Features are ``scale * (noise + shift * direction)`` for planted instances, ``scale * noise`` otherwise.
    """
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(dim)
    direction /= np.linalg.norm(direction)
    n_pos = round(n_slides * positive_fraction)
    bags = []
    for i in range(n_slides):
        n = int(rng.integers(n_patches[0], n_patches[1] + 1))
        x = rng.standard_normal((n, dim))
        label = int(i < n_pos)
        planted = np.sort(rng.choice(n, size=min(n_planted, n), replace=False)) if label else np.zeros(0, int)
        x[planted] += shift * direction
        side = int(np.ceil(np.sqrt(n)))
        grid = np.stack([np.arange(n) % side, np.arange(n) // side], axis=1) * patch_size
        bags.append(
            SyntheticBag(f"slide_{i:03d}", label, (scale * x).astype(np.float32), grid.astype(np.int64), planted)
        )
    return bags


def write_feature_folder(folder: str | Path, bags: list[SyntheticBag], **attrs) -> list[Path]:
    """Write one ``<slide_id>.h5`` (``features``, ``coords``, root ``attrs``) per bag, as CLAM does."""
    paths = []
    for bag in bags:
        path = Path(folder) / f"{bag.slide_id}.h5"
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=bag.features)
            f.create_dataset("coords", data=bag.coords)
            f.attrs.update(attrs)
        paths.append(path)
    return paths
