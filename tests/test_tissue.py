"""Tissue detection: Otsu on saturation, with blur and morphology, on synthetic thumbnails."""

from __future__ import annotations

import cv2
import numpy as np

from histotransfer.demo_slides import render_tissue
from histotransfer.patches.tissue import MIN_AREA_UM2, tissue_mask


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
