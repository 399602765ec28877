"""Load the feature files of labelled slides into memory as bags for MIL training and inference."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import HistotransferError, one_line
from ..features import FeatureBag, NonFiniteFeatures, encoder_attrs, read_feature_file


@dataclass
class BagSet:
    """Bags of several slides: contiguous float32 (N_i, D) tensors, their coords and feature-file attrs."""

    slide_ids: list[str]
    features: list[torch.Tensor]
    coords: list[np.ndarray]
    attrs: list[dict[str, Any]]
    fingerprints: list[str]

    @property
    def dim(self) -> int:
        return int(self.features[0].shape[1])

    def subset(self, slide_ids: list[str]) -> BagSet:
        pos = {s: i for i, s in enumerate(self.slide_ids)}
        idx = [pos[s] for s in slide_ids]
        return BagSet(
            [self.slide_ids[i] for i in idx],
            [self.features[i] for i in idx],
            [self.coords[i] for i in idx],
            [self.attrs[i] for i in idx],
            [self.fingerprints[i] for i in idx],
        )


def load_bags(
    files: dict[str, Path], expect_dim: int | None = None, expect_encoder: dict[str, Any] | None = None
) -> tuple[BagSet, dict[str, str]]:
    """Read the feature files ``slide_id -> path``; an unreadable file is skipped and returned in the
    second value (``slide_id -> reason``) with a warning. A file holding NaN or inf features is an error (it
    names the slide and its first bad row), as is a mismatch of the feature dimension or of the encoder attrs
    (those of ``expect_*`` when given, else of the first file). Nothing is written here, so a refused input
    leaves no partial output behind."""
    bags = BagSet([], [], [], [], [])
    broken: dict[str, str] = {}
    first: tuple[Path, str] | None = None  # the first file and its tiling, which every other file must share
    for slide_id, path in tqdm(sorted(files.items()), desc="loading features", unit="slide", dynamic_ncols=True):
        try:
            bag = read_feature_file(path)
        except NonFiniteFeatures:
            raise
        except (HistotransferError, OSError, KeyError, ValueError) as exc:
            reason = one_line(exc)
            broken[slide_id] = reason if str(path) in reason else f"{path}: {reason}"
            warnings.warn(f"skipping unreadable feature file {broken[slide_id]}", stacklevel=2)
            continue
        if expect_dim is None:
            expect_dim = bag.features.shape[1]
        if expect_encoder is None:
            expect_encoder = encoder_attrs(bag.attrs)
        check_bag(path, bag, expect_dim, expect_encoder)
        first = first or (path, tiling_of(bag.attrs))
        if tiling_of(bag.attrs) != first[1]:
            raise HistotransferError(
                f"{path}: features of tiling {tiling_of(bag.attrs)}, but {first[0]} of tiling {first[1]}; one "
                "feature folder must hold one tiling: extract each tiling into its own folder and pass one."
            )
        bags.slide_ids.append(slide_id)
        bags.features.append(torch.from_numpy(np.ascontiguousarray(bag.features, dtype=np.float32)))
        bags.coords.append(bag.coords)
        bags.attrs.append(bag.attrs)
        bags.fingerprints.append(bag.fingerprint)
    return bags, broken


def tiling_of(attrs: dict[str, Any]) -> str:
    """The tiling a feature file's patches come from: its name (magnification, patch size, overlap), or for
    files of bare CLAM/TRIDENT patch folders, which have none, the patch size."""
    if attrs.get("tiling"):
        return repr(str(attrs["tiling"]))
    return f"unnamed ({attrs['patch_size']} px patches)" if "patch_size" in attrs else "unknown"


def check_bag(path: Path, bag: FeatureBag, expect_dim: int, expect_encoder: dict[str, Any]) -> None:
    """Refuse a feature file whose dimension, stain normalisation or encoder attrs are not the expected ones
    (a run's, or the other slides')."""
    enc = encoder_attrs(bag.attrs)
    if bag.features.shape[1] != expect_dim:
        raise HistotransferError(
            f"{path}: features have dimension {bag.features.shape[1]}, expected {expect_dim}; all slides "
            "must come from the same encoder (pass one features/<encoder_id> folder)."
        )
    mine, theirs = enc.get("stain_tag", "none"), expect_encoder.get("stain_tag", "none")
    if mine != theirs:
        raise HistotransferError(
            f"{path}: features made with stain normalisation {mine}, but these slides' (or the run's) with "
            f"{theirs}; extract them with the same --stain-norm and --stain-ref (or the run's stain target) "
            "into one features/<encoder_id> folder."
        )
    if enc != expect_encoder:
        raise HistotransferError(
            f"{path}: made by encoder {enc or 'unknown'}, expected {expect_encoder or 'unknown'}; all "
            "slides must come from the same encoder (pass one features/<encoder_id> folder)."
        )


def feature_stats(bags: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and (population) std over all patches of ``bags``, in float64.

    Per-bag moments are merged with Chan et al.'s pairwise update, which stays accurate for large means and
    never concatenates the bags."""
    n, mean, m2 = _moments(bags[0])
    for bag in bags[1:]:
        nb, mb, m2b = _moments(bag)
        delta = mb - mean
        total = n + nb
        mean = mean + delta * (nb / total)
        m2 = m2 + m2b + delta**2 * (n * nb / total)
        n = total
    return mean.numpy(), (m2 / n).sqrt().numpy()


def _moments(bag: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Count, float64 mean and sum of squared deviations of one bag's patches."""
    x = bag.double()
    mean = x.mean(0)
    return x.shape[0], mean, ((x - mean) ** 2).sum(0)


def patch_size_level0(attrs: dict[str, Any]) -> int | None:
    """The patch side in level-0 pixels, from a feature file's attrs or the patch file they name."""
    if attrs.get("patch_size_level0") is not None:
        return int(attrs["patch_size_level0"])
    patch_file = attrs.get("patch_file")
    if patch_file and Path(patch_file).is_file():
        try:
            with h5py.File(patch_file, "r") as f:
                value = f.attrs.get("patch_size_level0")
        except OSError:
            return None
        return None if value is None else int(value)
    return None
