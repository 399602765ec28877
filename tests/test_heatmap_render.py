"""Heatmap rendering with array operations: exact colours per patch square, overlaps, legend, patch side attrs."""

from __future__ import annotations

import h5py
import matplotlib
import numpy as np
import pytest
from matplotlib.colors import Normalize

from histotransfer.errors import HistotransferError
from histotransfer.mil.heatmap import (
    attention_overlay,
    h5_patch_attrs,
    heatmap_image,
    heatmap_values,
    patch_side_level0,
    tick_labels,
)

JET = matplotlib.colormaps["jet"]


def blended(thumb_value: np.ndarray | float, value: float, lo: float, hi: float) -> np.ndarray:
    """The expected pixel: half thumbnail, half the colormap's own colour of ``value`` on [lo, hi]."""
    colour = np.array(JET(Normalize(lo, hi)(value))[:3]) * 255
    return np.round(0.5 * np.asarray(thumb_value, np.float64) + 0.5 * colour)


def test_three_patches_on_white_have_their_exact_colours_and_the_rest_stays_white():
    thumb = np.full((60, 90, 3), 255, np.uint8)
    coords = np.array([[0, 0], [300, 100], [600, 400]])  # level 0 is 900 x 600: 10 level-0 px per thumb px
    values = np.array([-1.0, 0.3, 2.0])
    out = attention_overlay(thumb, (900, 600), coords, values, 200, (-1.0, 2.0), "jet", 0.5)
    expected = np.full((60, 90, 3), 255.0)
    for (r0, c0), v in zip([(0, 0), (10, 30), (40, 60)], values):
        expected[r0 : r0 + 20, c0 : c0 + 20] = blended(255, v, -1.0, 2.0)
    np.testing.assert_array_equal(out, expected.astype(np.uint8))
    assert len({tuple(out[r, c]) for r, c in ((5, 5), (15, 35), (45, 65))}) == 3


def test_blend_uses_each_thumbnail_pixel_and_channel():
    rng = np.random.default_rng(3)
    thumb = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    out = attention_overlay(thumb, (400, 400), np.array([[100, 100]]), np.array([0.7]), 200, (0.0, 1.0))
    np.testing.assert_array_equal(out[10:30, 10:30], blended(thumb[10:30, 10:30], 0.7, 0.0, 1.0))
    outside = np.ones((40, 40), bool)
    outside[10:30, 10:30] = False
    np.testing.assert_array_equal(out[outside], thumb[outside])


def test_overlapping_squares_average_their_values():
    thumb = np.full((50, 50, 3), 255, np.uint8)
    coords = np.array([[0, 0], [100, 100], [100, 0]])  # 200 px squares at 10 level-0 px per thumb px
    out = attention_overlay(thumb, (500, 500), coords, np.array([0.0, 1.0, 0.8]), 200, (0.0, 1.0))
    np.testing.assert_array_equal(out[2, 2], blended(255, 0.0, 0, 1))  # A only
    np.testing.assert_array_equal(out[2, 15], blended(255, 0.4, 0, 1))  # A and C
    np.testing.assert_array_equal(out[2, 25], blended(255, 0.8, 0, 1))  # C only
    np.testing.assert_array_equal(out[15, 15], blended(255, 0.6, 0, 1))  # A, B and C: (0 + 1 + 0.8) / 3
    np.testing.assert_array_equal(out[15, 25], blended(255, 0.9, 0, 1))  # B and C
    np.testing.assert_array_equal(out[25, 15], blended(255, 1.0, 0, 1))  # B only
    np.testing.assert_array_equal(out[25, 5], [255, 255, 255])  # none


def test_a_square_covers_every_thumbnail_pixel_it_touches():
    thumb = np.full((100, 100, 3), 255, np.uint8)
    out = attention_overlay(thumb, (1000, 1000), np.array([[55, 55]]), np.array([1.0]), 100, (0.0, 1.0))
    painted = (out != 255).any(axis=2)
    expected = np.zeros((100, 100), bool)
    expected[5:16, 5:16] = True  # level-0 55..155 touches thumb pixels 5.5..15.5
    np.testing.assert_array_equal(painted, expected)


def test_values_outside_the_range_take_the_end_colours_and_an_empty_range_the_middle():
    thumb = np.full((10, 20, 3), 255, np.uint8)
    coords = np.array([[0, 0], [100, 0]])
    out = attention_overlay(thumb, (200, 100), coords, np.array([-5.0, 9.0]), 100, (0.0, 1.0))
    np.testing.assert_array_equal(out[5, 5], blended(255, 0.0, 0, 1))
    np.testing.assert_array_equal(out[5, 15], blended(255, 1.0, 0, 1))
    flat = attention_overlay(thumb, (200, 100), coords, np.array([2.0, 2.0]), 100, (2.0, 2.0))
    np.testing.assert_array_equal(flat[5, 5], blended(255, 0.5, 0, 1))


def test_legend_is_appended_without_touching_the_overlay():
    rng = np.random.default_rng(0)
    overlay = rng.integers(0, 256, (400, 300, 3), dtype=np.uint8)
    image = heatmap_image(overlay, (-2.0, 2.0), "jet", ["s1: 3 patches", "attention score, cohort scale"])
    assert image.shape[0] == 400 and image.shape[1] > 300
    np.testing.assert_array_equal(image[:, :300], overlay)
    strip = image[:, 300:].reshape(-1, 3)
    for end in (0.0, 1.0):  # both ends of the colour bar are drawn
        colour = np.round(np.array(JET(end)[:3]) * 255).astype(np.uint8)
        assert (strip == colour).all(axis=1).any()
    for height in (1, 7, 40):  # a very flat thumbnail still gets its (tiny) legend
        flat = rng.integers(0, 256, (height, 500, 3), dtype=np.uint8)
        np.testing.assert_array_equal(heatmap_image(flat, (0.0, 1.0), "jet", ["a", "b"])[:, :500], flat)


def test_tick_labels_are_rounded_to_the_span():
    assert tick_labels((-2.0, 2.0)) == ["-2", "-1", "0", "1", "2"]
    assert tick_labels((0.0, 0.01)) == ["0", "0.0025", "0.005", "0.0075", "0.01"]
    assert tick_labels((-1.0000003, 3.0000004)) == ["-1", "0", "1", "2", "3"]


def test_weight_is_relative_to_uniform():
    np.testing.assert_allclose(heatmap_values(np.zeros(3), np.array([0.5, 0.25, 0.25]), "weight"), [1.5, 0.75, 0.75])
    for n in (4, 1000):  # uniform attention reads 1 whatever the number of patches
        np.testing.assert_allclose(heatmap_values(np.zeros(n), np.full(n, 1 / n), "weight"), np.ones(n))
    np.testing.assert_array_equal(heatmap_values(np.array([-1.0, 2.5]), np.array([0.1, 0.9]), "score"), [-1, 2.5])


def test_patch_side_from_clam_and_trident_attrs(tmp_path):
    with h5py.File(tmp_path / "clam.h5", "w") as f:  # CLAM: patch_size at patch_level, on coords only
        d = f.create_dataset("coords", data=np.zeros((2, 2), np.int64))
        d.attrs["patch_size"], d.attrs["patch_level"] = 256, 1
    with h5py.File(tmp_path / "trident.h5", "w") as f:  # TRIDENT: target-magnification size and level-0 side
        d = f.create_dataset("coords", data=np.zeros((2, 2), np.int64))
        d.attrs["patch_size"], d.attrs["patch_size_level0"] = 256, 1024
    downsamples = [1.0, 4.000395, 16.0]
    assert patch_side_level0(h5_patch_attrs(tmp_path / "clam.h5"), downsamples) == 1024  # 256 * 4.0004
    assert patch_side_level0(h5_patch_attrs(tmp_path / "trident.h5"), downsamples) == 1024
    assert patch_side_level0({"patch_size": 256}, downsamples) is None
    assert h5_patch_attrs(tmp_path / "gone.h5") == {}
    with pytest.raises(HistotransferError, match="level 5"):
        patch_side_level0({"patch_size": 256, "patch_level": 5}, downsamples)
