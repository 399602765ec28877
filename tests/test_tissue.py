"""Tissue detection: Otsu on saturation (or a given threshold), blur, morphology, area limits and pen ink, on
synthetic thumbnails and slides."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from histotransfer.demo_slides import render_tissue, write_pyramidal_tiff
from histotransfer.patches.settings import TileSettings
from histotransfer.patches.tiling import slide_segmentation
from histotransfer.patches.tissue import (
    MIN_AREA_UM2,
    filter_by_area,
    segment_tissue,
    tissue_mask,
)
from histotransfer.slide import open_slide


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_detects_a_known_region_on_glass() -> None:
    truth = np.zeros((400, 500), np.uint8)
    cv2.ellipse(truth, (230, 200), (150, 110), 20, 0, 360, 1, -1)
    cv2.rectangle(truth, (380, 60), (470, 340), 1, -1)
    rgb = render_tissue(truth.astype(bool), None, np.random.default_rng(0))
    mask = tissue_mask(rgb, mpp=8.0)
    assert mask.dtype == bool and mask.shape == truth.shape
    assert _iou(mask, truth.astype(bool)) > 0.97


def test_blank_glass_and_black_border_are_not_tissue() -> None:
    rng = np.random.default_rng(1)
    glass = np.clip(rng.normal(240, 4, (300, 300, 3)), 0, 255).astype(np.uint8)
    assert not tissue_mask(glass).any()
    glass[:, :40] = 0  # a black scanner border
    glass[:60, 100:200] = (90, 90, 90)  # a grey smudge
    assert not tissue_mask(glass).any()


def test_specks_removed_small_holes_filled_large_holes_kept() -> None:
    mpp = 8.0
    truth = np.zeros((400, 400), np.uint8)
    cv2.rectangle(truth, (50, 50), (350, 350), 1, -1)
    cv2.circle(truth, (130, 130), 4, 0, -1)  # small gap inside tissue: ~0.003 mm^2
    cv2.circle(truth, (250, 250), 45, 0, -1)  # a lumen: ~0.4 mm^2
    specks = np.zeros_like(truth)
    cv2.circle(specks, (20, 380), 3, 1, -1)  # dust far from the tissue
    rgb = render_tissue((truth | specks).astype(bool), None, np.random.default_rng(2))
    mask = tissue_mask(rgb, mpp=mpp)
    assert (np.pi * 4**2) * mpp**2 < MIN_AREA_UM2 < (np.pi * 45**2) * mpp**2
    assert mask[130, 130]  # small hole filled
    assert not mask[250, 250]  # lumen stays background
    assert not mask[375:385, 15:25].any()  # speck dropped
    assert _iou(mask, truth.astype(bool) | (np.hypot(*np.mgrid[-130:270, -130:270]) <= 4)) > 0.95


def test_independent_of_scan_brightness() -> None:
    """Saturation, unlike gray level, separates tissue from glass however bright the scan."""
    truth = np.zeros((300, 300), np.uint8)
    cv2.circle(truth, (150, 150), 100, 1, -1)
    rgb = render_tissue(truth.astype(bool), None, np.random.default_rng(5))
    dim = (rgb.astype(np.float32) * 0.7).astype(np.uint8)  # glass at ~170 grey: darker than bright tissue
    assert _iou(tissue_mask(rgb), truth.astype(bool)) > 0.97
    assert _iou(tissue_mask(dim), truth.astype(bool)) > 0.97


def test_default_area_limits_are_todays_single_limit() -> None:
    settings = TileSettings()
    assert settings.min_region_um2 == settings.min_hole_um2 == MIN_AREA_UM2 == 0.02e6


def test_speck_and_hole_limits_on_a_hand_made_mask() -> None:
    mask = np.zeros((100, 100), np.uint8)
    mask[10:70, 10:70] = 1  # a block; outline area 59 * 59 = 3481 px
    mask[30:39, 30:39] = 0  # a 9 x 9 hole: its outline runs through the block pixels around it, a 10 x 10
    # square through their centres less the four corner half-pixels it cuts diagonally: 100 - 4 * 0.5 = 98 px
    mask[80:91, 80:91] = 1  # an 11 x 11 speck: outline through its boundary pixel centres, 10 * 10 = 100 px
    hole, speck = (slice(30, 39), slice(30, 39)), (slice(80, 91), slice(80, 91))

    def kept(min_region: float, min_hole: float) -> tuple[bool, bool]:
        out = filter_by_area(mask, min_region, min_hole)
        np.testing.assert_array_equal(out[10:70, 10:40][:, :20], mask[10:70, 10:40][:, :20])  # block untouched
        return bool(out[speck].all()), not out[hole].any()

    assert kept(100, 98) == (True, True)  # neither is smaller than its limit
    assert kept(100.01, 98) == (False, True)  # speck just under the limit: dropped
    assert kept(100, 98.01) == (True, False)  # hole just under the limit: filled
    assert kept(0, 0) == (True, True)
    assert not filter_by_area(mask, 3481.01, 0).any()  # the block goes too (with its hole)


def _components(mask: np.ndarray) -> tuple[list[float], list[float]]:
    """Outline areas (px) of a mask's regions and of its holes."""
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    parents = hierarchy[0][:, 3] if contours else []
    return (
        [cv2.contourArea(c) for c, p in zip(contours, parents, strict=True) if p < 0],
        [cv2.contourArea(c) for c, p in zip(contours, parents, strict=True) if p >= 0],
    )


def test_area_options_are_square_microns_at_the_masks_resolution() -> None:
    mpp = 8.0
    truth = np.zeros((300, 300), np.uint8)
    cv2.rectangle(truth, (40, 40), (260, 260), 1, -1)
    truth[120:150, 100:140] = 0  # a hole that survives the closing
    truth[10:25, 280:296] = 1  # a speck that survives the opening
    rgb = render_tissue(truth.astype(bool), None, np.random.default_rng(3))
    plain = tissue_mask(rgb, mpp=mpp, min_region_um2=0, min_hole_um2=0)
    regions, holes = _components(plain)
    speck, hole = min(regions) * mpp**2, holes[0] * mpp**2  # um^2
    assert len(regions) == 2 and len(holes) == 1 and 150 * 64 < speck < 300 * 64 < 1000 * 64 < hole
    for delta, speck_kept, hole_kept in ((-1, True, True), (1, False, False)):
        mask = tissue_mask(rgb, mpp=mpp, min_region_um2=speck + delta, min_hole_um2=hole + delta)
        assert mask[10:25, 280:296].any() == speck_kept
        assert (not mask[125:145, 105:135].all()) == hole_kept
        np.testing.assert_array_equal(mask[60:100], plain[60:100])  # the rest of the tissue is untouched


def _saturation_ramp() -> tuple[np.ndarray, np.ndarray]:
    """A pink image whose saturation rises from left to right, and each column's HSV saturation computed by
    hand: S = 255 * (max - min) / max, rounded (OpenCV's 8-bit definition)."""
    drop = np.arange(400) * 200 // 400  # 0..199
    rgb = np.empty((40, 400, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 230, 230 - drop, 230 - drop // 2
    return rgb, np.floor(255 * drop / 230 + 0.5)


@pytest.mark.parametrize("threshold", [5, 40, 100, 180])
def test_threshold_cuts_a_saturation_ramp_where_told(threshold: int) -> None:
    rgb, saturation = _saturation_ramp()
    mask = tissue_mask(rgb, mpp=8.0, threshold=threshold, min_region_um2=0, min_hole_um2=0)
    expected = np.broadcast_to(saturation > threshold, mask.shape)
    np.testing.assert_array_equal(mask, expected)  # the median of a monotone ramp is the ramp: an exact cut


def test_given_threshold_is_used_as_given_and_otsu_is_floored() -> None:
    rgb, saturation = _saturation_ramp()
    assert (saturation[tissue_mask(rgb, threshold=5)[0]] <= 20).any()  # below the floor under Otsu's
    assert not tissue_mask(rgb, threshold=255).any()
    otsu = tissue_mask(rgb)[0]
    assert 20 < saturation[otsu].min() < saturation.max()  # Otsu splits the ramp somewhere above the floor
    glass = np.full((100, 100, 3), 240, np.uint8)
    glass[:, :50] = (240, 236, 238)  # a faint pink cast: saturation 4, well under the floor
    assert not tissue_mask(glass).any() and tissue_mask(glass, threshold=2)[:, 10:40].all()


PEN_MPP, PEN_SIZE, MASK_MPP = 4.0, 1536, 8.0
INK = {
    "blue": ((40, 80, 170), 0.85, 60, [(100, 150), (450, 450), (750, 550)]),
    "green": ((40, 140, 80), 0.85, 60, [(1450, 1450), (1200, 1150), (1000, 1050)]),
    "black": ((25, 22, 30), 0.9, 25, [(150, 1350), (600, 950), (1000, 750)]),
}


@pytest.fixture(scope="module")
def pen_slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, dict[str, np.ndarray]]:
    """A 6 mm slide (4 um/px) of tissue crossed by a blue and a green marker stroke and a black line, each
    partly over tissue and partly on glass; returns its path, the tissue and each stroke's mask (level 0)."""
    tissue = np.zeros((PEN_SIZE, PEN_SIZE), np.uint8)
    cv2.ellipse(tissue, (750, 775), (500, 400), 15, 0, 360, 1, -1)
    rgb = render_tissue(tissue.astype(bool), None, np.random.default_rng(0))
    strokes = {}
    for name, (colour, opacity, width, points) in INK.items():
        stroke = np.zeros_like(tissue)
        cv2.polylines(stroke, [np.array(points, np.int32)], False, 1, width)
        strokes[name] = stroke.astype(bool)
        under = rgb[strokes[name]].astype(np.float32)
        rgb[strokes[name]] = (opacity * np.array(colour) + (1 - opacity) * under).astype(np.uint8)
    path = write_pyramidal_tiff(tmp_path_factory.mktemp("pen") / "pen.tif", rgb, PEN_MPP)
    return path, tissue.astype(bool), strokes


def _at_mask(level0: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return cv2.resize(level0.astype(np.uint8), shape[::-1], interpolation=cv2.INTER_NEAREST).astype(bool)


def _grow(mask: np.ndarray, px: int) -> np.ndarray:
    """``mask`` dilated (``px`` > 0) or eroded (``px`` < 0) by a disk of radius ``px`` mask pixels."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * abs(px) + 1,) * 2)
    op = cv2.dilate if px > 0 else cv2.erode
    return op(mask.astype(np.uint8), kernel).astype(bool)


def test_pen_ink_is_out_of_the_mask_only_with_exclude_pen(pen_slide) -> None:
    path, tissue, strokes = pen_slide
    tol = 2  # mask pixels (16 um) of edge tolerance: JPEG, blur and resampling move edges a little
    with open_slide(path) as slide:
        plain = slide_segmentation(slide, MASK_MPP, TileSettings())
        pen = slide_segmentation(slide, MASK_MPP, TileSettings(exclude_pen=True))
    shape = plain.tissue.shape
    truth = _at_mask(tissue, shape)
    ink = {name: _at_mask(stroke, shape) for name, stroke in strokes.items()}
    any_ink = np.logical_or.reduce(list(ink.values()))
    assert not plain.excluded.any()
    for name, stroke in ink.items():
        core = _grow(stroke, -tol)
        on_tissue = core & _grow(truth, -tol)
        assert on_tissue.sum() > 150, name
        assert plain.tissue[on_tissue].all(), f"{name} ink on tissue counts as tissue without exclude_pen"
        assert not pen.tissue[_grow(stroke, 3)].any(), f"{name} ink, or the first 24 um of its 50 um halo, kept"
        assert pen.excluded[on_tissue].all(), f"{name} ink on tissue is not shown as excluded"
    for name in ("blue", "green"):  # saturated ink on glass is 'tissue' for saturation alone
        on_glass = _grow(ink[name], -tol) & ~_grow(truth, tol)
        assert on_glass.sum() > 150 and plain.tissue[on_glass].all() and pen.excluded[on_glass].all(), name
    clean = _grow(truth, -tol) & ~_grow(any_ink, 8)  # tissue beyond the ink's halo (50 um ~ 6 px) and a margin
    assert pen.tissue[clean].mean() > 0.995
    assert not (pen.tissue & pen.excluded).any()
    assert not (pen.tissue & ~plain.tissue).any()  # excluding ink only takes away


def test_exclude_pen_keeps_stained_tissue(cmu_svs: Path) -> None:
    """The real H&E sample has no ink, but has dark keratin and purple epidermis: none of it is excluded."""
    with open_slide(cmu_svs) as slide:
        for mask_mpp in (8.0, 2.0):
            plain = slide_segmentation(slide, mask_mpp, TileSettings())
            pen = slide_segmentation(slide, mask_mpp, TileSettings(exclude_pen=True))
            assert not pen.excluded.any()
            np.testing.assert_array_equal(pen.tissue, plain.tissue)


def test_segment_tissue_without_options_is_tissue_mask() -> None:
    truth = np.zeros((200, 200), np.uint8)
    cv2.circle(truth, (100, 100), 60, 1, -1)
    rgb = render_tissue(truth.astype(bool), None, np.random.default_rng(4))
    seg = segment_tissue(rgb)
    np.testing.assert_array_equal(seg.tissue, tissue_mask(rgb))
    assert seg.tissue.dtype == seg.excluded.dtype == bool and not seg.excluded.any()
