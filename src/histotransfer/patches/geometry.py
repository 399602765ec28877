"""Patch geometry: from a target magnification to the level read, the level-0 footprint and the resize."""

from __future__ import annotations

from dataclasses import replace

from ..errors import HistotransferError
from ..slide import Slide, magnification_to_mpp
from .patch_file import PatchSpec

# Relative tolerance under which two resolutions count as equal (0.499 vs 0.5 um/px; 0.2525 vs 0.25):
# a level that close to the target is read natively, without resampling.
MPP_TOLERANCE = 0.05


def choose_level(level_downsamples: list[float], downsample: float) -> int:
    """The level closest above the target resolution: the largest downsample not coarser than ``downsample``."""
    best = 0
    for i, ds in enumerate(level_downsamples):
        if ds <= downsample * (1 + MPP_TOLERANCE) and ds >= level_downsamples[best]:
            best = i
    return best


def tiling_spec(
    slide: Slide, magnification: float, patch_size: int, stride: int | None = None, min_tissue: float = 0.5
) -> PatchSpec:
    """The PatchSpec for tiling ``slide`` at ``magnification`` with ``patch_size`` pixel patches.

    The footprint is ``patch_size * target_mpp / slide_mpp`` level-0 pixels, read from the level closest above
    the target resolution and resized. When that level's resolution matches the target within
    ``MPP_TOLERANCE`` it is read natively and the footprint is ``patch_size`` level pixels exactly.
    Refuses a target magnification higher than the slide's, and a patch larger than the slide.
    """
    if magnification <= 0:
        raise HistotransferError(f"--magnification must be positive, got {magnification}.")
    if patch_size <= 0 or (stride is not None and stride <= 0):
        raise HistotransferError(f"--patch-size and --stride must be positive, got {patch_size} and {stride}.")
    target_mpp = magnification_to_mpp(magnification)
    if target_mpp < slide.mpp * (1 - MPP_TOLERANCE):
        raise HistotransferError(
            f"{slide.path}: target magnification {magnification:g}x ({target_mpp:g} um/px) is higher than the "
            f"slide's ({10 / slide.mpp:.3g}x, {slide.mpp:g} um/px); choose --magnification "
            f"{10 / slide.mpp:.3g} or lower."
        )
    downsample = target_mpp / slide.mpp
    level = choose_level(slide.level_downsamples, downsample)
    level_ds = slide.level_downsamples[level]
    if abs(level_ds / downsample - 1) <= MPP_TOLERANCE:
        downsample = level_ds
    footprint = round(patch_size * downsample)
    if footprint > min(slide.dimensions):
        w, h = slide.dimensions
        raise HistotransferError(
            f"{slide.path}: a {patch_size} px patch at {magnification:g}x covers {footprint} level-0 pixels, more "
            f"than the slide's {w} x {h}; choose a smaller --patch-size or a lower --magnification."
        )
    return PatchSpec(
        patch_size=int(patch_size),
        patch_size_level0=footprint,
        patch_level=level,
        downsample=float(downsample),
        target_magnification=float(magnification),
        mpp=float(slide.mpp),
        min_tissue=float(min_tissue),
        stride=int(stride if stride is not None else patch_size),
        slide_path=str(slide.path.resolve()),
    )


def resolve_spec(spec: PatchSpec, slide: Slide) -> PatchSpec:
    """Fill the fields a CLAM or TRIDENT patch file lacks from the slide it was cut from.

    CLAM gives ``patch_size`` at ``patch_level`` (no resize); TRIDENT gives ``patch_size`` at the target
    magnification and ``patch_size_level0``, from which the level to read is chosen as for tiling.
    """
    level = spec.patch_level
    ps0 = spec.patch_size_level0
    if level is not None and not 0 <= level < slide.level_count:
        raise HistotransferError(
            f"{slide.path}: the patch file reads level {level} but the slide has "
            f"{slide.level_count} level(s); check that it belongs to this slide."
        )
    if ps0 is None:
        ps0 = round(spec.patch_size * slide.level_downsamples[level])
    downsample = spec.downsample if spec.downsample is not None else ps0 / spec.patch_size
    if level is None:
        level = choose_level(slide.level_downsamples, downsample)
    mpp = spec.mpp if spec.mpp is not None else slide.mpp
    magnification = spec.target_magnification if spec.target_magnification is not None else 10.0 / (mpp * downsample)
    return replace(
        spec,
        patch_size_level0=ps0,
        patch_level=level,
        downsample=float(downsample),
        mpp=mpp,
        target_magnification=float(magnification),
        slide_path=spec.slide_path if spec.slide_path is not None else str(slide.path.resolve()),
    )
