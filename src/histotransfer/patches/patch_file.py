"""Read and write per-slide patch files (``patches/<slide_id>.h5``), the contract tiling hands to extraction.

Layout (``formats.PATCHES``): dataset ``coords`` (N, 2) int64 level-0 (x, y) of each patch's top-left corner,
dataset ``tissue_fraction`` (N,) float32, and the ``PatchSpec`` fields as attrs on the root and on ``coords``
(where CLAM reads ``patch_size`` and ``patch_level``), the identity of the slide they were cut from
(``slide_identity``, JSON), the tiling's name and settings (``tiling``, ``tiling_settings``) and the colour
statistics of the slide's tissue (``colour_stats``, see ``mil.shortcut``). Readers also accept CLAM files
(``coords`` attrs ``patch_size`` at ``patch_level``) and TRIDENT files (``coords`` attrs ``patch_size`` at the target
magnification and ``patch_size_level0``); their missing fields are filled from the slide when it is opened.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .._io import atomic_path, ensure_space
from ..errors import FormatError
from ..formats import PATCHES, open_h5, stamp
from ..provenance import array_fingerprint, canonical_json
from ..slide import parse_identity


@dataclass(frozen=True)
class PatchSpec:
    """How the patches of one slide are cut.

    ``patch_size`` is the patch side in pixels at the target magnification; ``patch_size_level0`` its
    footprint in level-0 pixels; ``patch_level`` the pyramid level read; ``downsample`` level-0 pixels per
    target pixel; ``mpp`` the slide's level-0 microns per pixel; ``stride`` the grid step in target pixels.
    Fields a CLAM or TRIDENT file lacks are None until ``geometry.resolve_spec`` fills them from the slide.
    """

    patch_size: int
    patch_size_level0: int | None = None
    patch_level: int | None = None
    downsample: float | None = None
    target_magnification: float | None = None
    mpp: float | None = None
    min_tissue: float | None = None
    stride: int | None = None
    slide_path: str | None = None

    def attrs(self) -> dict[str, Any]:
        """The non-None fields, as HDF5 attrs."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class PatchSet:
    """The patches of one slide: ``tissue_fraction`` is NaN where the file has none (CLAM/TRIDENT).

    ``identity`` is the slide's identity at tiling (None for CLAM/TRIDENT files), ``tiling`` the name of the
    tiling (its folder), ``tiling_settings`` its settings and ``colour_stats`` the colour statistics of the
    slide's tissue on its thumbnail (``mil.shortcut.COLOUR_STAT_NAMES``; None where not recorded).
    """

    slide_id: str
    coords: np.ndarray  # (N, 2) int64 level-0 (x, y)
    tissue_fraction: np.ndarray  # (N,) float32
    spec: PatchSpec
    identity: dict[str, Any] | None = None
    tiling: str | None = None
    tiling_settings: dict[str, Any] | None = None
    colour_stats: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.coords)

    @property
    def fingerprint(self) -> str:
        """What extraction records to tell whether its features still belong to these patches: the coords,
        the geometry (without the slide's path, which may move) and the slide's identity."""
        geometry = {k: v for k, v in self.spec.attrs().items() if k != "slide_path"}
        return array_fingerprint(self.coords, meta={"spec": geometry, "identity": self.identity})


def write_patch_file(
    path: str | os.PathLike[str],
    coords: np.ndarray,
    tissue_fraction: np.ndarray,
    spec: PatchSpec,
    identity: dict[str, Any] | None = None,
    tiling: str | None = None,
    tiling_settings: dict[str, Any] | None = None,
    colour_stats: np.ndarray | None = None,
) -> None:
    """Write one slide's patch file atomically (temporary name, renamed when complete)."""
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    tissue_fraction = np.asarray(tissue_fraction, dtype=np.float32).reshape(-1)
    if len(coords) != len(tissue_fraction):
        raise ValueError(f"{len(coords)} coords but {len(tissue_fraction)} tissue fractions")
    ensure_space(path, 20 * len(coords))
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        stamp(f, PATCHES)
        dset = f.create_dataset("coords", data=coords)
        f.create_dataset("tissue_fraction", data=tissue_fraction)
        for key, value in spec.attrs().items():
            f.attrs[key] = value
            dset.attrs[key] = value
        if identity is not None:
            f.attrs["slide_identity"] = canonical_json(identity)
        if tiling is not None:
            f.attrs["tiling"] = tiling
            f.attrs["tiling_settings"] = canonical_json(tiling_settings or {})
        if colour_stats is not None:
            f.attrs["colour_stats"] = np.asarray(colour_stats, dtype=np.float64)


def read_colour_stats(path: str | os.PathLike[str]) -> np.ndarray | None:
    """The ``colour_stats`` attr of a patch file (float64), None when the file records none (CLAM/TRIDENT
    files, tilings made before it existed) or cannot be read."""
    try:
        with h5py.File(path, "r") as f:
            value = f.attrs.get("colour_stats")
    except OSError:
        return None
    return None if value is None else np.asarray(value, dtype=np.float64).reshape(-1)


def _attr(value: Any) -> Any:
    """An HDF5 attr as a plain value; an array of equal values (CLAM stores ``downsample`` as (d, d)) is one."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.size >= 1 and np.all(value == value.flat[0]):
        value = value.flat[0]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _spec_from_attrs(attrs: dict[str, Any], path: Path) -> PatchSpec:
    types = {
        "patch_size": int,
        "patch_size_level0": int,
        "patch_level": int,
        "downsample": float,
        "target_magnification": float,
        "mpp": float,
        "min_tissue": float,
        "stride": int,
        "slide_path": str,
    }
    values: dict[str, Any] = {}
    for field in fields(PatchSpec):
        if field.name in attrs:
            try:
                values[field.name] = types[field.name](attrs[field.name])
            except (TypeError, ValueError) as exc:
                raise FormatError(
                    f"{path}: attribute {field.name}={attrs[field.name]!r} is not a "
                    f"{types[field.name].__name__}; re-tile the slide."
                ) from exc
    if "patch_size" not in values or values["patch_size"] <= 0:
        raise FormatError(
            f"{path}: no positive patch_size attribute on 'coords' (CLAM and TRIDENT files "
            "carry one); re-tile the slide with `histotransfer tile`."
        )
    if "patch_level" not in values and "patch_size_level0" not in values:
        raise FormatError(
            f"{path}: cannot tell the patches' scale: neither patch_level (CLAM) nor "
            "patch_size_level0 (TRIDENT) is set; re-tile the slide with `histotransfer tile`."
        )
    return PatchSpec(**values)


def _check_inside(path: Path, coords: np.ndarray, dimensions: Any, slide_path: Any) -> None:
    """Refuse patches whose top-left corner lies off the slide: negative, or (where the file records the slide's
    level-0 dimensions) at or beyond its width or height. Read, they would be blank padding taken for tissue."""
    outside = (coords < 0).any(axis=1)
    size = ""
    if isinstance(dimensions, list | tuple) and len(dimensions) == 2:
        width, height = int(dimensions[0]), int(dimensions[1])
        outside |= (coords[:, 0] >= width) | (coords[:, 1] >= height)
        size = f" ({width} x {height} level-0 pixels)"
    if outside.any():
        rows = np.flatnonzero(outside)
        x, y = (int(v) for v in coords[rows[0]])
        more = f" and {len(rows) - 1} more" if len(rows) > 1 else ""
        raise FormatError(
            f"{path}: patch row {rows[0]} at ({x}, {y}){more} lies outside slide "
            f"{slide_path or path.stem}{size}; re-tile the slide with `histotransfer tile`."
        )


def read_patch_file(path: str | os.PathLike[str]) -> PatchSet:
    """Load one patch file (ours, CLAM's or TRIDENT's), validating its layout."""
    path = Path(path)
    with open_h5(path, PATCHES, ("coords",), "re-tile this slide") as f:
        coords = np.asarray(f["coords"][()])
        colour = f.attrs.get("colour_stats")
        attrs = {k: _attr(v) for k, v in f.attrs.items() if k != "colour_stats"}
        attrs.update({k: _attr(v) for k, v in f["coords"].attrs.items()})
        fraction = np.asarray(f["tissue_fraction"][()], dtype=np.float32) if "tissue_fraction" in f else None
    if coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise FormatError(f"{path}: 'coords' must be (N, 2) level-0 (x, y), got shape {coords.shape}.")
    integral = np.issubdtype(coords.dtype, np.floating) and bool(np.all(np.mod(coords, 1) == 0))
    if not (np.issubdtype(coords.dtype, np.integer) or integral):
        raise FormatError(f"{path}: 'coords' must hold whole pixel coordinates, got {coords.dtype}.")
    coords = coords.astype(np.int64)
    if fraction is None:
        fraction = np.full(len(coords), np.nan, np.float32)
    elif fraction.shape != (len(coords),):
        raise FormatError(f"{path}: 'tissue_fraction' has shape {fraction.shape}, expected ({len(coords)},).")
    try:
        identity = parse_identity(attrs.get("slide_identity"))
        settings = json.loads(attrs["tiling_settings"]) if attrs.get("tiling_settings") else None
    except ValueError as exc:
        raise FormatError(
            f"{path}: unreadable slide_identity or tiling_settings attribute ({exc}); re-tile the slide."
        ) from exc
    _check_inside(path, coords, (identity or {}).get("dimensions"), attrs.get("slide_path"))
    return PatchSet(
        path.stem,
        coords,
        fraction,
        _spec_from_attrs(attrs, path),
        identity,
        attrs.get("tiling"),
        settings,
        None if colour is None else np.asarray(colour, dtype=np.float64).reshape(-1),
    )
