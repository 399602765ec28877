"""Shortcut checks on synthetic multi-centre cohorts, hand-computed tables, and multi-centre demo slides."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import PredefinedSplit

from histotransfer._io import file_sha256
from histotransfer.colour import COLOUR_STAT_NAMES, HED_FROM_RGB, optical_density, slide_colour_stats
from histotransfer.demo_slides import centre_stain_shift, make_demo_slides, render_tissue
from histotransfer.errors import HistotransferError
from histotransfer.mil.shortcut import colour_shortcut_auc, group_shortcut_auc, null_auc_sd, shortcut_verdict
from histotransfer.patches.tissue import tissue_mask


def thumbnails(n: int, seed: int, size: int = 160) -> list[np.ndarray]:
    """Lesion-free demo tissue (one random ellipse each): slides that differ only by chance."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tissue = np.zeros((size, size), np.uint8)
        axes = tuple(int(v) for v in rng.uniform(0.25, 0.4, 2) * size)
        cv2.ellipse(tissue, (size // 2, size // 2), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        out.append(render_tissue(tissue.astype(bool), None, rng))
    return out


def cohort_stats(images: list[np.ndarray], centres: np.ndarray, shift: float) -> np.ndarray:
    """Colour statistics of each thumbnail as stained at its centre, over its detected tissue."""
    stats = []
    for rgb, centre in zip(images, centres, strict=True):
        stained = centre_stain_shift(rgb, int(centre), 2, shift)
        stats.append(slide_colour_stats(stained, tissue_mask(stained, mpp=8.0)))
    return np.array(stats)


def test_colour_predicts_the_label_only_when_centres_differ_in_stain() -> None:
    """Two centres of 60 slides, 58 positives in the first and 2 in the second. The same tissue: with a
    centre stain shift colour alone nearly reaches the centre's ceiling (0.967); without one it is chance."""
    images = thumbnails(120, seed=100)
    centres = np.repeat([0, 1], 60)
    labels = np.r_[np.ones(58), np.zeros(4), np.ones(2), np.zeros(56)].astype(int)
    shifted = colour_shortcut_auc(cohort_stats(images, centres, 0.3), labels, seed=0)
    same = colour_shortcut_auc(cohort_stats(images, centres, 0.0), labels, seed=0)
    assert shifted["auc"] > 0.9
    assert same["n"] == 120 and same["n_positive"] == 60 and same["folds"] == 5 and same["repeats"] == 2
    assert same["null_sd"] == pytest.approx(null_auc_sd(60, 60)) == pytest.approx(0.0530, abs=1e-4)
    # Cross-validated AUC on uninformative data spreads a little more than Mann-Whitney's null: 3 sd.
    assert abs(same["auc"] - 0.5) < 3 * same["null_sd"]
    assert group_shortcut_auc(centres, labels, seed=0)["auc"] > 0.9


def test_group_auc_equals_a_hand_computed_value() -> None:
    """Folds given: fold 0 tests slides 0, 2, 4, 6 and fold 1 slides 1, 3, 5.

    fold 0 trains on 1 (A, 1), 3 (B, 0), 5 (B, 1): A -> 1, B -> 1/2, C (unseen) -> overall 2/3.
    fold 1 trains on 0 (A, 1), 2 (A, 0), 4 (B, 0), 6 (C, 1): A -> 1/2, B -> 0.
    Scores: positives 0: 1, 1: 1/2, 5: 0, 6: 2/3; negatives 2: 1, 3: 0, 4: 1/2.
    Pairs won (ties count half): 2.5 + 1.5 + 0.5 + 2 = 6.5 of 12 -> AUC 13/24.
    """
    groups = ["A", "A", "A", "B", "B", "B", "C"]
    labels = [1, 1, 0, 0, 0, 1, 1]
    result = group_shortcut_auc(groups, labels, folds=PredefinedSplit([0, 1, 0, 1, 0, 1, 0]))
    assert result["auc"] == pytest.approx(13 / 24)
    assert (result["n"], result["n_positive"], result["folds"], result["repeats"]) == (7, 4, 2, 1)


def test_repeats_and_folds_follow_the_cohort() -> None:
    rng = np.random.default_rng(0)
    stats, labels = rng.normal(size=(12, 3)), np.r_[np.zeros(9), np.ones(3)].astype(int)
    result = colour_shortcut_auc(stats, labels, folds=5)
    assert (result["folds"], result["repeats"]) == (3, 17)  # 3 positives -> 3 folds; ceil(200 / 12) repeats
    once = colour_shortcut_auc(stats, labels, seed=4, repeats=1)
    assert once["repeats"] == 1 and once == colour_shortcut_auc(stats, labels, seed=4, repeats=1)
    assert colour_shortcut_auc(stats, labels, folds=np.int64(2), repeats=1)["folds"] == 2


def test_patient_folds_keep_a_patients_slides_out_of_its_own_training() -> None:
    """Scored by the patient alone: with slide-level folds a patient's other slide in training tells the label
    (AUC near 1); with patient-level folds the patient is never in training, so every slide gets the training
    share of positives, a constant: AUC exactly 0.5."""
    patients = np.repeat([f"p{i}" for i in range(10)], 2)
    labels = np.repeat([0, 1] * 5, 2)
    leaky = group_shortcut_auc(patients, labels, seed=1)
    kept = group_shortcut_auc(patients, labels, seed=1, patients=patients)
    assert leaky["auc"] > 0.9 and kept["auc"] == 0.5 and kept["folds"] == 5
    stats = np.random.default_rng(0).normal(size=(20, 4))
    assert colour_shortcut_auc(stats, labels, patients=patients, repeats=2)["repeats"] == 2
    with pytest.raises(HistotransferError, match=r"1 patient.*smaller class"):
        group_shortcut_auc(patients[:4], [0, 0, 1, 1], patients=patients[:4])


@pytest.mark.parametrize(("call", "message"), [
    (lambda: colour_shortcut_auc(np.zeros((4, 2)), [0, 1, 1, 1]), "1 slide.*smaller class"),
    (lambda: colour_shortcut_auc(np.zeros((4, 2)), [0, 0, 0, 0]), "both classes"),
    (lambda: colour_shortcut_auc(np.zeros((4, 2)), [0, 1, 2, 1]), "0/1"),
    (lambda: colour_shortcut_auc(np.full((4, 2), np.nan), [0, 1, 0, 1]), "must be finite"),
    (lambda: colour_shortcut_auc(np.zeros((3, 2)), [0, 1, 0, 1]), "one row per label"),
    (lambda: group_shortcut_auc(["a", None, "b", "b"], [0, 1, 0, 1]), "missing group"),
])
def test_bad_inputs_are_refused(call, message) -> None:
    with pytest.raises(HistotransferError, match=message):
        call()


def test_colour_stats_of_a_two_tone_tissue_region() -> None:
    """Tissue = 50 grey (63) and 50 white pixels: OD ln 4 and 0 in every channel. Pixels outside the mask
    (pure red) do not count."""
    rgb = np.zeros((10, 12, 3), np.uint8)
    rgb[:, :12] = (255, 0, 0)
    rgb[:5, :10] = 63
    rgb[5:, :10] = 255
    mask = np.zeros((10, 12), bool)
    mask[:, :10] = True
    stats = dict(zip(COLOUR_STAT_NAMES, slide_colour_stats(rgb, mask), strict=True))
    half = np.log(4) / 2
    for channel in ("od_r", "od_g", "od_b"):
        assert [stats[f"{channel}_{s}"] for s in ("mean", "std", "p10", "p50", "p90")] == pytest.approx(
            [half, half, 0, half, 2 * half], rel=1e-6)
    haematoxylin = np.log(4) * HED_FROM_RGB[:, 0].sum()  # grey's OD (ln 4, ln 4, ln 4) unmixed
    assert stats["haematoxylin_mean"] == pytest.approx(haematoxylin / 2, rel=1e-6)
    assert stats["haematoxylin_p90"] == pytest.approx(haematoxylin, rel=1e-6)
    assert len(COLOUR_STAT_NAMES) == 30


def test_colour_stats_refuse_an_empty_mask_or_a_mismatched_one() -> None:
    rgb = np.full((8, 8, 3), 200, np.uint8)
    with pytest.raises(HistotransferError, match="tissue mask is empty"):
        slide_colour_stats(rgb, np.zeros((8, 8), bool))
    with pytest.raises(HistotransferError, match="does not match the thumbnail"):
        slide_colour_stats(rgb, np.ones((4, 8), bool))


def test_verdict_names_colour_close_to_the_model() -> None:
    close = shortcut_verdict(0.875, 0.75, margin=0.125)  # exactly at the margin counts as close
    assert close.startswith("Warning: colour alone reaches AUC 0.750, within 0.12 of the model's 0.875")
    far = shortcut_verdict(0.9, 0.6)
    assert far == ("Colour alone reaches AUC 0.600, more than 0.05 below the model's 0.900: colour does not "
                   "explain the model's score.")
    assert shortcut_verdict(0.7, 0.8).startswith("Warning")
    with pytest.raises(HistotransferError, match=r"colour AUC 1\.2 is not between 0 and 1"):
        shortcut_verdict(0.8, 1.2)


def test_centre_stain_shift_scales_haematoxylin_and_eosin() -> None:
    tissue = np.ones((128, 128), bool)
    rgb = render_tissue(tissue, None, np.random.default_rng(3))
    assert np.array_equal(centre_stain_shift(rgb, 0, 1, 0.3), rgb)
    assert np.array_equal(centre_stain_shift(rgb, 1, 3, 0.3), rgb)  # the middle of three centres: t = 0
    hed = optical_density(rgb).reshape(-1, 3) @ HED_FROM_RGB
    last = optical_density(centre_stain_shift(rgb, 2, 3, 0.2)).reshape(-1, 3) @ HED_FROM_RGB
    first = optical_density(centre_stain_shift(rgb, 0, 3, 0.2)).reshape(-1, 3) @ HED_FROM_RGB
    # Mean haematoxylin and eosin scaled by 1 +/- 0.2 (uint8 rounding aside).
    np.testing.assert_allclose(last.mean(0)[:2] / hed.mean(0)[:2], [1.2, 0.8], atol=0.01)
    np.testing.assert_allclose(first.mean(0)[:2] / hed.mean(0)[:2], [0.8, 1.2], atol=0.01)


def test_multi_centre_demo_slides(tmp_path) -> None:
    plain = make_demo_slides(tmp_path / "plain", n_slides=8, seed=2, size=512)
    assert plain.centres_csv is None and not (tmp_path / "plain" / "centres.csv").exists()
    three = make_demo_slides(tmp_path / "three", n_slides=8, seed=2, size=512, centres=3, prevalence_shift=0.5)
    centres = pd.read_csv(three.centres_csv)
    assert list(centres.columns) == ["slide_id", "patient_id", "centre"]
    assert (centres.groupby("patient_id")["centre"].nunique() == 1).all()
    assert three.labels_csv.read_text() == plain.labels_csv.read_text()  # labels.csv keeps its columns
    for slide_a, slide_b, centre in zip(plain.slides, three.slides, centres["centre"], strict=True):
        # The middle centre is stained as without centres: the same bytes; the others differ.
        assert (file_sha256(slide_a) == file_sha256(slide_b)) == (centre == "centre_2")
    assert set(centres["centre"]) == {"centre_1", "centre_2", "centre_3"}


def test_prevalence_shift_deals_positives_to_the_first_centre(tmp_path) -> None:
    demo = make_demo_slides(tmp_path, n_slides=12, seed=1, size=256, centres=2, prevalence_shift=1.0)
    table = pd.read_csv(demo.labels_csv).merge(pd.read_csv(demo.centres_csv), on=["slide_id", "patient_id"])
    assert set(table.loc[table["label"] == 1, "centre"]) == {"centre_1"}
    assert set(table.loc[table["label"] == 0, "centre"]) == {"centre_2"}
    with pytest.raises(HistotransferError, match=r"stain_shift=1\.5"):
        make_demo_slides(tmp_path / "bad", centres=2, stain_shift=1.5)
