"""``info`` of single files: a slide, a patch file (with ``check``, against its slide), a feature file (NaN/inf
rows, stale or not) and an attention file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import HistotransferError
from ..features import first_non_finite
from ..patches import read_patch_file
from ..slide import identity_differences, open_slide, slide_identity
from .records import h5_attrs, layout_of, n_rows, open_h5_file

ROWS_PER_READ = 16384  # feature rows read at a time by the finite check: bounded memory for any slide


def _objective_power(path: Path, backend: str) -> float | None:
    """The objective power the slide's metadata records (``Slide.magnification`` falls back to 10 / mpp, so it
    cannot say whether the slide records one)."""
    if backend == "openslide":
        import openslide

        with openslide.OpenSlide(str(path)) as osr:
            value = osr.properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)
    elif backend == "tiffslide":
        import tiffslide

        with tiffslide.TiffSlide(str(path)) as ts:
            value = ts.properties.get("tiffslide.objective-power")
    else:
        return None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def describe_slide(path: Path) -> dict[str, Any]:
    """Reader backend, vendor, pyramid, native mpp, objective power, file size and identity of a slide file."""
    try:
        slide = open_slide(path)
    except HistotransferError as first:
        # A slide without microns per pixel is still worth describing: a stand-in mpp opens it (native_mpp
        # stays None, and the identity records only the native value).
        try:
            slide = open_slide(path, mpp=1.0)
        except HistotransferError:
            raise first from None
    with slide:
        levels = [
            {"level": i, "dimensions": list(d), "downsample": round(ds, 6)}
            for i, (d, ds) in enumerate(zip(slide.level_dimensions, slide.level_downsamples))
        ]
        return {
            "kind": "slide",
            "path": str(path),
            "backend": slide.backend,
            "vendor": slide.vendor,
            "dimensions": list(slide.dimensions),
            "levels": levels,
            "mpp": slide.native_mpp,
            "objective_power": _objective_power(path, slide.backend),
            "file_size": path.stat().st_size,
            "identity": slide_identity(slide),
        }


def _slide_check(slide_path: str | None, mpp: float | None, recorded: dict[str, Any] | None) -> dict[str, Any]:
    """Whether the slide file at ``slide_path`` is still the one whose identity a patch file recorded."""
    if not recorded:
        return {"slide_matches": None, "slide_differences": ["no slide identity recorded (CLAM/TRIDENT file)"]}
    if not slide_path or not Path(slide_path).is_file():
        return {"slide_matches": None, "slide_differences": [f"no slide file at {slide_path}"]}
    with open_slide(slide_path, mpp=mpp) as slide:
        differences = identity_differences(recorded, slide_identity(slide))
    return {"slide_matches": not differences, "slide_differences": differences}


def describe_patch_file(path: Path, check: bool = False) -> dict[str, Any]:
    """Layout, slide, patch count, geometry, tiling, recorded slide (and, with ``check``, whether it still
    matches) and fingerprint of a patch file."""
    with open_h5_file(path) as f:
        layout = layout_of(h5_attrs(f), h5_attrs(f["coords"]) if "coords" in f else {})
    patches = read_patch_file(path)
    spec = patches.spec
    slide_path = spec.slide_path or ""
    out: dict[str, Any] = {
        "kind": "patch file",
        "path": str(path),
        "layout": layout,
        "slide_id": patches.slide_id,
        "patches": len(patches),
        "spec": {
            "patch_size": spec.patch_size,
            "patch_size_level0": spec.patch_size_level0,
            "patch_level": spec.patch_level,
            "magnification": spec.target_magnification,
            "mpp": spec.mpp,
            "stride": spec.stride,
            "min_tissue": spec.min_tissue,
        },
        "tiling": patches.tiling,
        "tiling_settings": patches.tiling_settings,
        "slide_path": spec.slide_path,
        "slide_exists": bool(slide_path) and Path(slide_path).is_file(),
        "slide_identity": patches.identity,
    }
    if check:
        out.update(_slide_check(spec.slide_path, spec.mpp, patches.identity))
    out["fingerprint"] = patches.fingerprint
    return out


def _scan_features(f: h5py.File) -> tuple[int, int | None, str]:
    """(rows holding NaN/inf, first such row, sha256 of coords and rows) of a feature file, read in blocks.

    The digest is the one ``feature_file.rows_fingerprint`` computes over the whole arrays (coords as int64,
    then the rows as stored), here fed block by block so that a large slide never sits in memory whole.
    """
    dset = f["features"]
    coords = np.asarray(f["coords"][()], dtype=np.int64).reshape(-1, 2)
    digest = hashlib.sha256(np.ascontiguousarray(coords).tobytes())
    n, bad, first = n_rows(dset), 0, None
    for start in range(0, n, ROWS_PER_READ):
        rows = dset[0, start : start + ROWS_PER_READ] if dset.ndim == 3 else dset[start : start + ROWS_PER_READ]
        digest.update(np.ascontiguousarray(rows).tobytes())
        finite = np.isfinite(rows).all(axis=1)
        bad += int((~finite).sum())
        if first is None and (row := first_non_finite(rows)) is not None:
            first = start + row
    return bad, first, digest.hexdigest()


def _patch_file_of(path: Path, recorded: str | None) -> Path | None:
    """The patch file a feature file was made from: where it recorded it, else its tiling's ``patches`` folder
    (features live in ``<tiling>/features/<encoder_id>/``, so the two move together)."""
    for candidate in (Path(recorded) if recorded else None, path.parent.parent.parent / "patches" / path.name):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def describe_feature_file(path: Path) -> dict[str, Any]:
    """Encoder, weights, settings, shape, finite check, source patch file (stale or not) and fingerprint of a
    feature file."""
    with open_h5_file(path) as f:
        attrs = h5_attrs(f)
        layout = layout_of(attrs, h5_attrs(f["coords"]))
        rows, dim = n_rows(f["features"]), int(f["features"].shape[-1])
        dtype = str(f["features"].dtype)
        bad, first, digest = _scan_features(f)
    recorded = attrs.get("fingerprint")
    patch_file = _patch_file_of(path, attrs.get("patch_file"))
    stale = None
    if patch_file is not None and attrs.get("patches_fingerprint"):
        stale = read_patch_file(patch_file).fingerprint != attrs["patches_fingerprint"]
    sha = attrs.get("weights_sha256")
    return {
        "kind": "feature file",
        "path": str(path),
        "layout": layout,
        "slide_id": path.stem,
        "encoder": attrs.get("encoder"),
        "encoder_id": attrs.get("encoder_id"),
        "stage": attrs.get("stage"),
        "truncate": attrs.get("truncate"),
        **({"blocks": attrs["blocks"]} if "blocks" in attrs else {}),
        "weights": {"label": attrs.get("weights_label", attrs.get("weights")), "sha256": sha[:12] if sha else None},
        "input_size": attrs.get("input_size"),
        "precision": attrs.get("precision"),
        "dtype": dtype,
        "feature_dim": dim,
        "patches": rows,
        "non_finite": {"rows": bad, "first_row": first},
        "patch_file": str(patch_file) if patch_file else attrs.get("patch_file"),
        "patch_file_exists": patch_file is not None,
        "stale": stale,
        "fingerprint": recorded or digest,
        "fingerprint_matches_contents": (recorded == digest) if recorded else None,
    }


def describe_attention_file(path: Path) -> dict[str, Any]:
    """Slide, patch count, predicted probability and feature file fingerprint of a run's attention file."""
    with open_h5_file(path) as f:
        attrs = h5_attrs(f)
        score = np.asarray(f["score"][()], dtype=np.float64)
    return {
        "kind": "attention file",
        "path": str(path),
        "layout": layout_of(attrs, {}),
        "slide_id": attrs.get("slide_id", path.stem),
        "patches": len(score),
        "probability": attrs.get("probability"),
        "score_range": [float(score.min()), float(score.max())] if len(score) else None,
        "patch_size_level0": attrs.get("patch_size_level0"),
        "features_fingerprint": attrs.get("features_fingerprint"),
    }
