"""Synthetic demo slides: small, deterministic, real pyramidal tiled TIFFs with known tissue and lesions.

Each slide is H&E-like tissue (pink stroma with purple nuclei) on a white background, written as a tiled
JPEG TIFF whose levels halve in size down to a few hundred pixels, with its resolution in the TIFF
``XResolution``/``YResolution`` tags (pixels per centimetre): OpenSlide's generic-tiff reader and tiffslide
both read microns per pixel from these. "Positive" slides carry small lesions inside the tissue: denser,
larger, darker nuclei on purple-tinged stroma. The true lesion masks are saved as PNGs, each with the sidecar
``<slide_id>.png.json`` (``{"downsample": 16}``) that lets them load as lesion annotations directly.

Optionally the slides come from several centres (``centres > 1``): each centre stains differently (more
haematoxylin and less eosin, or the reverse, ``stain_shift``) and can hold a different share of positive
patients (``prevalence_shift``), which gives a cohort in which colour predicts the label without any lesion:
the shortcut that multi-centre studies must rule out.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import tifffile

from ._io import atomic_path, write_csv, write_json
from .colour import HED_FROM_RGB, RGB_FROM_HED, optical_density
from .errors import HistotransferError

BACKGROUND = (243, 243, 241)
STROMA = (226, 160, 196)
LESION_STROMA = (196, 134, 198)
NUCLEUS = (112, 62, 150)
LESION_NUCLEUS = (72, 38, 124)
LESION_MASK_DOWNSAMPLE = 16
DEMO_LAYOUT_VERSION = 1
CENTRE_STREAM = 7_000_001  # seeds the centre assignment apart from the slides' own random draws
LESION_RADIUS = 0.14  # a lesion's largest semi-axis, as a fraction of the slide's side


@dataclass
class DemoSlides:
    """The generated demo set: slide files, ``labels.csv`` and each slide's true lesion mask PNG.

    A lesion mask is 1/``LESION_MASK_DOWNSAMPLE`` of level 0 per side (255 = lesion); negatives' are empty.
    Beside each mask, ``<slide_id>.png.json`` records that downsample (``lesion_mask_sidecar``), so the
    ``lesion_masks`` folder is an annotations folder (``--annotations``) as it is.
    ``centres_csv`` (slide_id, patient_id, centre) exists for a multi-centre set only.
    """

    slides: list[Path]
    labels_csv: Path
    lesion_masks: dict[str, Path]
    centres_csv: Path | None = None


def write_pyramidal_tiff(
    path: str | os.PathLike[str],
    rgb: np.ndarray,
    mpp: float | None,
    tile: int = 256,
    min_side: int = 256,
    quality: int = 90,
) -> Path:
    """Write ``rgb`` as a tiled JPEG TIFF pyramid (each level half the previous) atomically.

    Levels are successive top-level pages (the layout OpenSlide's generic-tiff reader expects), the reduced
    ones marked as such. ``mpp`` goes into the resolution tags; None writes a slide without one.
    """
    path = Path(path)
    levels = [rgb]
    while min(levels[-1].shape[:2]) // 2 >= min_side:
        prev = levels[-1]
        levels.append(cv2.resize(prev, (prev.shape[1] // 2, prev.shape[0] // 2), interpolation=cv2.INTER_AREA))
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=False) as tw:
        for i, level in enumerate(levels):
            extra: dict[str, Any] = {}
            if mpp is not None:
                ppcm = 1e4 / (mpp * rgb.shape[1] / level.shape[1])
                extra = {"resolution": (ppcm, ppcm), "resolutionunit": "CENTIMETER"}
            tw.write(
                level,
                tile=(tile, tile),
                compression="jpeg",
                compressionargs={"level": quality},
                photometric="rgb",
                subfiletype=1 if i else 0,
                metadata=None,
                **extra,
            )
    return path


def render_tissue(tissue: np.ndarray, lesion: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """An H&E-like RGB image: stroma and nuclei where ``tissue`` is set, lesion texture where ``lesion`` is.

    Pixels outside ``tissue`` are background exactly (plus faint noise), so the tissue region stays known.
    Drawn in place with masked OpenCV operations: full-size temporaries would dominate the cost.
    """
    h, w = tissue.shape
    img = _smooth_colour(STROMA, (h, w), rng)
    _draw_nuclei(img, tissue, rng, spacing=58, radius=(6, 11), colour=NUCLEUS)
    if lesion is not None and lesion.any():
        lesion8 = lesion.view(np.uint8)
        tint = np.subtract(STROMA, LESION_STROMA)
        # A float64 array of four values is OpenCV's per-channel scalar operand, typed as an array in every
        # release's stubs (a tuple is typed as a scalar only in some).
        cv2.subtract(img, _scalar(np.maximum(tint, 0)), dst=img, mask=lesion8)
        cv2.add(img, _scalar(np.maximum(-tint, 0)), dst=img, mask=lesion8)
        _draw_nuclei(img, lesion, rng, spacing=26, radius=(9, 16), colour=LESION_NUCLEUS)
    # Background is painted last, so nuclei near the edge cannot spill over it: the tissue edge stays exact.
    img[~tissue] = BACKGROUND
    grain = rng.integers(0, 10, (256, w, 3), dtype=np.uint8)
    for y in range(0, h, 256):
        band = img[y : y + 256]
        cv2.subtract(band, grain[: len(band)], dst=band)
    return img


def _scalar(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Per-channel values as OpenCV's scalar operand: four float64s, the fourth unused by RGB images."""
    out = np.zeros(4)
    out[:3] = values
    return out


def _smooth_colour(colour: tuple[int, int, int], shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A full-size image of ``colour`` varying smoothly: a coarse random field upsampled (cheap)."""
    h, w = shape
    coarse = np.asarray(colour, np.float32) + rng.normal(0.0, 9.0, (h // 64 + 2, w // 64 + 2, 3))
    return cv2.resize(np.clip(coarse, 0, 255).astype(np.uint8), (w, h), interpolation=cv2.INTER_LINEAR)


def _draw_nuclei(
    img: np.ndarray,
    region: np.ndarray,
    rng: np.random.Generator,
    spacing: int,
    radius: tuple[int, int],
    colour: tuple[int, int, int],
) -> None:
    h, w = region.shape
    n = int(h * w / spacing**2)
    xs, ys = rng.integers(0, w, n), rng.integers(0, h, n)
    keep = region[ys, xs]
    radii = rng.integers(radius[0], radius[1] + 1, n)
    colours = np.clip(np.asarray(colour) + rng.integers(-18, 19, (n, 3)), 0, 255)
    for x, y, r, c in zip(
        xs[keep].tolist(), ys[keep].tolist(), radii[keep].tolist(), colours[keep].tolist(), strict=True
    ):
        cv2.circle(img, (x, y), r, c, -1, cv2.LINE_AA)


def lesion_mask_sidecar(mask: Path) -> Path:
    """The sidecar of a lesion mask, ``<mask>.json``, that gives its downsample to annotation readers."""
    return mask.with_name(mask.name + ".json")


def _write_sidecars(masks: dict[str, Path]) -> None:
    """Write each mask's sidecar where it is missing (a set generated before sidecars existed gains them)."""
    for mask in masks.values():
        sidecar = lesion_mask_sidecar(mask)
        if not sidecar.is_file():
            write_json({"downsample": LESION_MASK_DOWNSAMPLE}, sidecar)


def _tissue_shape(size: int, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(2, 5)):
        center = tuple(int(v) for v in rng.uniform(0.35, 0.65, 2) * size)
        axes = tuple(int(v) for v in rng.uniform(0.17, 0.32, 2) * size)
        cv2.ellipse(mask, center, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return mask.astype(bool)


def _lesion_shape(tissue: np.ndarray, rng: np.random.Generator, n: int, radius: float) -> np.ndarray:
    """``n`` small ellipses centred well inside the tissue (picked on a coarse distance map)."""
    ds = LESION_MASK_DOWNSAMPLE
    small = cv2.resize(
        tissue.astype(np.uint8), (tissue.shape[1] // ds, tissue.shape[0] // ds), interpolation=cv2.INTER_NEAREST
    )
    dist = cv2.distanceTransform(small, cv2.DIST_L2, 5) * ds
    ys, xs = np.nonzero(dist > radius * 1.1)
    if len(ys) == 0:
        ys, xs = np.nonzero(dist >= dist.max())
    mask = np.zeros(tissue.shape, np.uint8)
    for i in rng.choice(len(ys), size=n, replace=len(ys) < n):
        axes = tuple(int(v) for v in radius * rng.uniform(0.7, 1.0, 2))
        cv2.ellipse(
            mask,
            (int(xs[i] * ds + ds // 2), int(ys[i] * ds + ds // 2)),
            axes,
            float(rng.uniform(0, 180)),
            0,
            360,
            1,
            -1,
        )
    return mask.astype(bool) & tissue


def _assign(n_slides: int, rng: np.random.Generator) -> list[tuple[str, str, int]]:
    """Balanced labels; in each class about a quarter of the patients have two slides."""
    rows: list[tuple[str, int]] = []
    patient = 0
    for label, count in ((1, n_slides // 2), (0, n_slides - n_slides // 2)):
        left, pairs = count, count // 4
        while left > 0:
            take = 2 if pairs > 0 and left >= 2 else 1
            pairs -= take == 2
            rows += [(f"patient_{patient:02d}", label)] * take
            patient += 1
            left -= take
    order = rng.permutation(len(rows))
    return [(f"demo_{i + 1:02d}", rows[j][0], rows[j][1]) for i, j in enumerate(order)]


def centre_stain_shift(rgb: np.ndarray, centre: int, centres: int, strength: float) -> np.ndarray:
    """``rgb`` (uint8) as stained at ``centre`` of ``centres``: haematoxylin optical density scaled by
    ``1 + strength * t`` and eosin by ``1 - strength * t``, with ``t`` running from -1 (first centre) to 1
    (last); one centre (``t = 0``) or ``strength = 0`` gives back ``rgb``. Done in bands of rows to bound
    memory."""
    t = 2 * centre / (centres - 1) - 1 if centres > 1 else 0.0
    mix = HED_FROM_RGB @ np.diag([1 + strength * t, 1 - strength * t, 1.0]) @ RGB_FROM_HED
    lut = optical_density(np.arange(256, dtype=np.uint8))
    out = np.empty_like(rgb)
    for y in range(0, rgb.shape[0], 512):
        od = cv2.transform(lut[rgb[y : y + 512]], mix.T.astype(np.float32))  # each pixel's OD row times mix
        out[y : y + 512] = np.clip(np.rint(256 * np.exp(-od) - 1), 0, 255)
    return out


def _centre_of_patients(
    assignment: list[tuple[str, str, int]], centres: int, prevalence_shift: float, seed: int
) -> dict[str, int]:
    """Deal each class's patients (shuffled) to centres in proportion to ``1 -/+ prevalence_shift * t``:
    positives lean to the first centres, negatives to the last."""
    rng = np.random.default_rng([seed, CENTRE_STREAM])
    t = np.linspace(-1, 1, centres)
    centre_of: dict[str, int] = {}
    for label, sign in ((1, -1.0), (0, 1.0)):
        patients = sorted({p for _, p, y in assignment if y == label})
        weights = 1 + sign * prevalence_shift * t
        bounds = np.cumsum(weights) / weights.sum()
        for rank, i in enumerate(rng.permutation(len(patients))):
            centre_of[patients[i]] = int(np.searchsorted(bounds, (rank + 0.5) / len(patients)))
    return centre_of


def _check_options(centres: int, stain_shift: float, prevalence_shift: float, lesion_radius: float) -> None:
    if centres < 1:
        raise HistotransferError(f"centres={centres}: give at least 1 centre.")
    if not 0 <= stain_shift < 1:
        raise HistotransferError(f"stain_shift={stain_shift}: use a value in [0, 1) (0.3 is clearly visible).")
    if not 0 <= prevalence_shift <= 1:
        raise HistotransferError(f"prevalence_shift={prevalence_shift}: use a value in [0, 1].")
    if not 0 < lesion_radius <= 0.25:
        raise HistotransferError(
            f"lesion_radius={lesion_radius}: use a value in (0, 0.25] (a fraction of the "
            f"slide's side; the default is {LESION_RADIUS})."
        )


def make_demo_slides(
    out_dir: str | os.PathLike[str],
    n_slides: int = 16,
    seed: int = 0,
    size: int = 4096,
    mpp: float = 0.25,
    centres: int = 1,
    stain_shift: float = 0.3,
    prevalence_shift: float = 0.0,
    lesion_radius: float = LESION_RADIUS,
) -> DemoSlides:
    """Generate ``n_slides`` demo slides (``size`` px square at ``mpp``, 40x by default) under ``out_dir``.

    Writes ``slides/<slide_id>.tif``, ``labels.csv`` (slide_id, patient_id, label) and
    ``lesion_masks/<slide_id>.png`` with its sidecar ``<slide_id>.png.json``. The same arguments give the same
    files; an existing complete set made with the same arguments is reused. With ``centres > 1`` each patient
    belongs to a centre (written to ``centres.csv``), whose slides get ``centre_stain_shift(..., stain_shift)``;
    ``prevalence_shift`` (0: none, 1: the most) moves positive patients towards the first centres. With one centre
    the files are the same as without these options. ``lesion_radius`` is a lesion's largest semi-axis as a
    fraction of ``size`` (smaller: lesions that fill less of a patch, a weaker signal to learn).
    """
    _check_options(centres, stain_shift, prevalence_shift, lesion_radius)
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    assignment = _assign(n_slides, rng)
    slides = [out / "slides" / f"{sid}.tif" for sid, _, _ in assignment]
    masks = {sid: out / "lesion_masks" / f"{sid}.png" for sid, _, _ in assignment}
    labels_csv = out / "labels.csv"
    manifest = out / "demo_slides.json"
    params = {"layout": DEMO_LAYOUT_VERSION, "n_slides": n_slides, "seed": seed, "size": size, "mpp": mpp}
    centre_of: dict[str, int] = {}
    centres_csv = None
    if centres > 1:
        params.update(centres=centres, stain_shift=stain_shift, prevalence_shift=prevalence_shift)
        centre_of = _centre_of_patients(assignment, centres, prevalence_shift, seed)
        centres_csv = out / "centres.csv"
    if lesion_radius != LESION_RADIUS:  # recorded only when changed, so existing sets stay valid
        params["lesion_radius"] = lesion_radius
    outputs = [*slides, *masks.values(), labels_csv, *([centres_csv] if centres_csv else [])]
    result = DemoSlides(slides, labels_csv, masks, centres_csv)
    if manifest.exists() and json.loads(manifest.read_text()) == params and all(p.exists() for p in outputs):
        _write_sidecars(masks)
        return result
    manifest.unlink(missing_ok=True)  # written again last, once the new set is complete
    for folder, keep in ((out / "slides", set(slides)), (out / "lesion_masks", set(masks.values()))):
        for stale in folder.glob("demo_*") if folder.is_dir() else ():
            if stale not in keep:
                stale.unlink()
    if centres_csv is None:
        (out / "centres.csv").unlink(missing_ok=True)
    for (sid, patient, label), slide_path in zip(assignment, slides, strict=True):
        slide_rng = np.random.default_rng([seed, int(sid.split("_")[1])])
        tissue = _tissue_shape(size, slide_rng)
        lesion = None
        if label:
            lesion = _lesion_shape(tissue, slide_rng, n=int(slide_rng.integers(1, 3)), radius=lesion_radius * size)
        rgb = render_tissue(tissue, lesion, slide_rng)
        if centres > 1:
            rgb = centre_stain_shift(rgb, centre_of[patient], centres, stain_shift)
        write_pyramidal_tiff(slide_path, rgb, mpp)
        small: np.ndarray = np.zeros((size // LESION_MASK_DOWNSAMPLE, size // LESION_MASK_DOWNSAMPLE), np.uint8)
        if lesion is not None:
            small = cv2.resize(lesion.astype(np.uint8) * 255, small.shape[::-1], interpolation=cv2.INTER_AREA)
            small = np.where(small >= 128, 255, 0).astype(np.uint8)
        with atomic_path(masks[sid]) as tmp:
            cv2.imwrite(str(tmp), small)
    _write_sidecars(masks)
    write_csv(pd.DataFrame(assignment, columns=["slide_id", "patient_id", "label"]), labels_csv)
    if centres_csv is not None:
        rows = [(sid, patient, f"centre_{centre_of[patient] + 1}") for sid, patient, _ in assignment]
        write_csv(pd.DataFrame(rows, columns=["slide_id", "patient_id", "centre"]), centres_csv)
    write_json(params, manifest)
    return result
