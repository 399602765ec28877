"""Attention and CAM localisation: hand-made bags and maps against hand-computed values."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import shapely

from histotransfer.annotations import MaskAnnotation, PolygonAnnotation, load_annotation
from histotransfer.mil.evaluate import describe_localisation, localisation_summary
from histotransfer.mil.localisation import attention_localisation, cam_localisation, cohort_localisation


def test_attention_localisation_of_a_four_patch_bag():
    scores = np.array([1.0, 1.0, 0.0, 2.0])
    overlap = np.array([0.6, 0.1, 0.0, 0.5])  # lesion patches at threshold 0.5: 0 and 3
    got = attention_localisation(scores, overlap)
    e = math.e
    total = e + e + 1 + e**2
    assert got == {
        "top_patch_overlap": 0.5,
        "mean_overlap": pytest.approx(0.3),
        "attention_overlap": pytest.approx((0.6 * e + 0.1 * e + 0.5 * e**2) / total, abs=1e-15),
        "top_patch_touches": True,
        "touching_share": 0.75,
        "auc_touching": 1.0,  # touching {1, 1, 2} vs other {0}: all three above
        "top_patch_hit": True,
        "attention_mass": pytest.approx((e + e**2) / total, abs=1e-15),
        "lesion_patch_share": 0.5,
        "auc": 0.875,  # lesion {1, 2} vs other {1, 0}: pairs 0.5, 1, 1, 1
        "n_patches": 4,
        "n_touching": 3,
        "n_lesion_patches": 2,
    }


def test_any_overlap_threshold_and_top_patch_ties():
    scores = np.array([3.0, 3.0, -1.0, 0.0])
    overlap = np.array([0.0, 0.2, 0.0, 0.0])
    at_half = attention_localisation(scores, overlap)
    assert at_half["top_patch_hit"] is False and at_half["auc"] is None and at_half["attention_mass"] == 0.0
    any_overlap = attention_localisation(scores, overlap, threshold=1e-9)
    assert any_overlap["top_patch_hit"] is False  # the tie goes to the first patch, which is not lesion
    assert any_overlap["auc"] == pytest.approx(5 / 6)  # 3 beats 3 (half), -1 and 0
    assert any_overlap["attention_mass"] == pytest.approx(math.exp(3) / (2 * math.exp(3) + math.exp(-1) + 1))


def test_a_lesion_smaller_than_half_a_patch_is_scored_by_lesion_share(tmp_path):
    """A drawn lesion mask (downsample 4) under four 16 px patches: level-0 x [8, 20), y [8, 16) covers a
    quarter of patch (0, 0), an eighth of patch (16, 0) and nothing of the two below. No patch is half lesion, so
    the lesion-patch scores are 0 whatever the attention; the lesion-share scores still see it."""
    mask = np.zeros((8, 8), np.uint8)
    mask[2:4, 2:5] = 255
    cv2.imwrite(str(tmp_path / "s.png"), mask)
    (tmp_path / "s.png.json").write_text(json.dumps({"downsample": 4}))
    coords = np.array([[0, 0], [16, 0], [0, 16], [16, 16]])
    overlap = load_annotation(tmp_path / "s.png").patch_overlap(coords, 16)
    np.testing.assert_allclose(overlap, [0.25, 0.125, 0.0, 0.0], rtol=0, atol=1e-12)
    scores = np.array([0.0, 2.0, 1.0, 0.0])  # the top patch is the one an eighth lesion
    got = attention_localisation(scores, overlap)
    e = math.e
    assert got == {
        "top_patch_overlap": pytest.approx(0.125),
        "mean_overlap": pytest.approx(0.375 / 4),  # a random patch's expected lesion share
        "attention_overlap": pytest.approx((0.25 + 0.125 * e**2) / (2 + e + e**2)),
        "top_patch_touches": True,
        "touching_share": 0.5,  # a random patch touches the lesion half the time
        "auc_touching": 0.625,  # touching {0, 2} vs other {1, 0}: pairs 0, 0.5, 1, 1
        "top_patch_hit": False,
        "attention_mass": 0.0,
        "lesion_patch_share": 0.0,
        "auc": None,
        "n_patches": 4,
        "n_touching": 2,
        "n_lesion_patches": 0,
    }
    # the cohort view says how many slides have a lesion patch at all, and puts each score beside its chance
    summary = localisation_summary([{"slide_id": "s", **got}], ["s"])
    assert summary["n_with_lesion_patch"] == 0 and summary["cohort"]["top_patch_touches"] == {"mean": 1.0, "n": 1}
    line = describe_localisation(summary)
    assert "top patch touches the lesion 1.000 (random patch 0.500)" in line
    assert "its lesion share 0.125 (random patch 0.094)" in line
    assert "lesion patches (>= 0.5 lesion, on 0 slide(s)): top patch on one 0.000 (random patch 0.000)" in line


def test_attention_localisation_rejects_bad_input():
    with pytest.raises(ValueError):
        attention_localisation(np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError):
        attention_localisation(np.zeros(2), np.zeros(2), threshold=0)


def test_cam_localisation_pointing_game_and_mass():
    # Patches of side 4 at x = 0 and x = 10 with 2 x 2 CAMs (cells of side 2); lesion: level-0 [0, 3] x [0, 4].
    lesion = PolygonAnnotation(shapely.box(0, 0, 3, 4))
    maps = np.array([[[3.0, 1.0], [2.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]])
    got = cam_localisation(maps, np.array([[0, 0], [10, 0]]), 4, lesion)
    # cell lesion fractions: patch 0 [[1, 0.5], [1, 0.5]], patch 1 all 0
    assert got == {
        "pointing_game": 1.0,  # patch 0's peak cell centre (1, 1) is inside; patch 1 holds no lesion
        "pointing_chance": 0.5,  # patch 0's cell centres (1, 1), (3, 1), (1, 3), (3, 3): two inside x <= 3
        "n_pointing": 1,
        "cam_mass": pytest.approx((3 + 0.5 + 2) / 7),
        "lesion_area_share": pytest.approx(3 / 8),
        "n_patches": 2,
    }


def test_pointing_misses_and_maps_without_evidence():
    lesion = MaskAnnotation(np.array([[False, True], [False, False]]), 4)  # level-0 [4, 8) x [0, 4)
    maps = np.array(
        [
            [[5.0, 1.0], [0.0, 0.0]],  # peak at (2, 2): outside -> miss
            [[0.0, 0.0], [0.0, 0.0]],  # no positive cell: does not play
            [[1.0, 1.0], [0.0, 0.0]],
        ]
    )  # tie: first cell, (2, 2) again -> miss
    got = cam_localisation(maps, np.zeros((3, 2)), 8, lesion)
    assert got["pointing_game"] == 0.0 and got["n_pointing"] == 2
    assert got["pointing_chance"] == 0.25  # one cell of four centred in the lesion, in both playing patches
    assert got["cam_mass"] == pytest.approx(2 / 8)
    assert got["lesion_area_share"] == pytest.approx(0.25)
    hit = cam_localisation(np.array([[[0.0, 2.0], [0.0, 0.0]]]), np.zeros((1, 2)), 8, lesion)
    assert hit["pointing_game"] == 1.0 and hit["cam_mass"] == 1.0
    none = cam_localisation(np.zeros((1, 2, 2)), np.zeros((1, 2)), 8, lesion)
    assert none["pointing_game"] is None and none["pointing_chance"] is None and none["cam_mass"] is None


def test_cohort_means_skip_missing_values():
    slides = [
        {"top_patch_hit": True, "auc": 0.5, "attention_mass": 0.2, "n_patches": 4, "note": "x"},
        {"top_patch_hit": False, "auc": None, "attention_mass": 0.4, "n_patches": 8},
        {"top_patch_hit": True, "auc": 1.0, "attention_mass": 0.9, "n_patches": 6},
    ]
    got = cohort_localisation(slides)
    assert got == {
        "top_patch_hit": {"mean": pytest.approx(2 / 3), "n": 3},
        "auc": {"mean": 0.75, "n": 2},
        "attention_mass": {"mean": pytest.approx(0.5), "n": 3},
        "n_patches": {"mean": 6.0, "n": 3},
    }
    assert cohort_localisation([{"auc": None}]) == {"auc": {"mean": None, "n": 0}}
