"""Shortcut checks on synthetic multi-centre cohorts, hand-computed tables, and multi-centre demo slides."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import PredefinedSplit

from histotransfer._io import file_sha256
from histotransfer.colour import COLOUR_STAT_NAMES, HED_FROM_RGB, optical_density, slide_colour_stats
from histotransfer.demo_slides import centre_stain_shift, make_demo_slides, render_tissue
from histotransfer.errors import HistotransferError
from histotransfer.mil.batches import infer_colour_batches
from histotransfer.mil.shortcut import (
    colour_shortcut_auc,
    group_shortcut_auc,
    judge,
    null_auc_sd,
    ordered_group_auc,
    run_shortcut,
)
from histotransfer.mil.verdict import shortcut_verdict, within_group_auc
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


def centre_only_auc(n_a: int, pos_a: int, n_b: int, pos_b: int) -> float:
    """AUC of scoring slides by their centre alone, centre A the more positive: P(a positive outscores a
    negative) + P(tie) / 2, with score 1 at A and 0 at B. Ties are pairs from one centre."""
    neg_a, neg_b = n_a - pos_a, n_b - pos_b
    return (pos_a * neg_b + 0.5 * (pos_a * neg_a + pos_b * neg_b)) / ((pos_a + pos_b) * (neg_a + neg_b))


def test_group_auc_is_the_centre_only_auc_without_leakage() -> None:
    """Two centres of 50 slides, 76% and 36% positive: scoring by the centre gives AUC 0.703. Out-of-fold target
    encoding returned 0.561 here (a positive's own fold lowers its centre's training share); the group
    indicator does not look at the slide's label. Over 200 cohorts drawn with these prevalences the mean is the
    analytic value of the expected counts within 0.02, and the exact counts give it exactly."""
    assert centre_only_auc(50, 38, 50, 18) == pytest.approx(0.7029, abs=1e-4)
    centres = np.repeat(["A", "B"], 50)
    exact = group_shortcut_auc(centres, np.r_[np.ones(38), np.zeros(12), np.ones(18), np.zeros(32)].astype(int))
    assert exact["auc"] == pytest.approx(centre_only_auc(50, 38, 50, 18), abs=1e-12)
    assert exact["p_value"] < 0.01 and exact["null_p95"] < 0.65 and exact["n_groups"] == 2
    assert exact["per_group"] == {"A": {"n": 50, "n_positive": 38}, "B": {"n": 50, "n_positive": 18}}
    rng = np.random.default_rng(0)
    for prevalence in ((0.76, 0.36), (0.5, 0.3), (0.2, 0.9)):
        draws = [
            group_shortcut_auc(
                centres,
                np.r_[rng.random(50) < prevalence[0], rng.random(50) < prevalence[1]].astype(int),
                permutations=1,
            )["auc"]
            for _ in range(200)
        ]
        high, low = max(prevalence), min(prevalence)
        assert np.mean(draws) == pytest.approx(centre_only_auc(50, round(50 * high), 50, round(50 * low)), abs=0.02)


def test_group_auc_of_three_groups_equals_a_hand_computed_value() -> None:
    """Groups A (1 positive, 1 negative), B (0, 2), C (2, 0), ordered by share of positives B < A < C.
    Pairs won (4 positives x 3 negatives... here 3 x 3): A's positive beats B's two negatives and ties A's
    negative (2.5), C's positives beat all three (3 each): 8.5 of 9."""
    result = group_shortcut_auc(["A", "A", "B", "B", "C", "C"], [1, 0, 0, 0, 1, 1], permutations=200)
    assert result["auc"] == pytest.approx(8.5 / 9)
    # Two groups: the indicator's AUC with the better sign, whichever group is the positive one.
    counts = np.array([[3, 1]]), np.array([[1, 3]])
    assert (
        ordered_group_auc(*counts)[0]
        == ordered_group_auc(counts[0][:, ::-1], counts[1][:, ::-1])[0]
        == pytest.approx(centre_only_auc(4, 3, 4, 1))
    )


def test_a_group_that_is_the_patient_is_not_beyond_chance() -> None:
    """Grouped by the patient, each group is pure: AUC 1. Dealing the groups over the patients at random keeps
    every group pure, so the null reaches 1 too and the permutation p-value says this explains nothing."""
    patients = np.repeat([f"p{i}" for i in range(10)], 2)
    labels = np.repeat([0, 1] * 5, 2)
    result = group_shortcut_auc(patients, labels, seed=1, patients=patients)
    assert result["auc"] == 1.0 and result["p_value"] == 1.0 and result["null_mean"] == 1.0
    by_centre = group_shortcut_auc(np.repeat(["A", "B"], [8, 12]), labels, patients=patients)
    assert by_centre["auc"] == 0.5 and by_centre["p_value"] > 0.5  # both centres hold half of each class
    stats = np.random.default_rng(0).normal(size=(20, 4))
    assert colour_shortcut_auc(stats, labels, patients=patients, repeats=2)["repeats"] == 2
    with pytest.raises(HistotransferError, match=r"1 patient.*smaller class"):
        colour_shortcut_auc(stats[:4], [0, 0, 1, 1], patients=patients[:4])


def test_repeats_and_folds_follow_the_cohort() -> None:
    rng = np.random.default_rng(0)
    stats, labels = rng.normal(size=(12, 3)), np.r_[np.zeros(9), np.ones(3)].astype(int)
    result = colour_shortcut_auc(stats, labels, folds=5)
    assert (result["folds"], result["repeats"]) == (3, 17)  # 3 positives -> 3 folds; ceil(200 / 12) repeats
    once = colour_shortcut_auc(stats, labels, seed=4, repeats=1)
    assert once["repeats"] == 1 and once == colour_shortcut_auc(stats, labels, seed=4, repeats=1)
    assert colour_shortcut_auc(stats, labels, folds=np.int64(2), repeats=1)["folds"] == 2
    assert colour_shortcut_auc(stats, labels, folds=PredefinedSplit([0, 1] * 6))["folds"] == 2


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: colour_shortcut_auc(np.zeros((4, 2)), [0, 1, 1, 1]), "1 slide.*smaller class"),
        (lambda: colour_shortcut_auc(np.zeros((4, 2)), [0, 0, 0, 0]), "both classes"),
        (lambda: colour_shortcut_auc(np.zeros((4, 2)), [0, 1, 2, 1]), "0/1"),
        (lambda: colour_shortcut_auc(np.full((4, 2), np.nan), [0, 1, 0, 1]), "must be finite"),
        (lambda: colour_shortcut_auc(np.zeros((3, 2)), [0, 1, 0, 1]), "one row per label"),
        (lambda: group_shortcut_auc(["a", None, "b", "b"], [0, 1, 0, 1]), "missing group"),
    ],
)
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
            [half, half, 0, half, 2 * half], rel=1e-6
        )
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


def confounded_cohort(seed: int, n: int = 50) -> tuple[np.ndarray, np.ndarray, np.random.Generator]:
    """Two centres of ``n`` slides, 76% and 36% positive (drawn), as in a two-centre study."""
    rng = np.random.default_rng(seed)
    labels = np.r_[rng.random(n) < 0.76, rng.random(n) < 0.36].astype(int)
    return labels, np.repeat(["A", "B"], n), rng


def judged(labels: np.ndarray, centres: np.ndarray, scores: np.ndarray, test: np.ndarray | None = None) -> dict:
    """The verdict on ``scores`` from the centre-only and within-centre evidence, on the ``test`` slides and
    with the centre-only AUC of that split when given (else on all slides, pooled)."""
    split = None if test is None else group_shortcut_auc(centres[test], labels[test], permutations=200)
    test = np.ones(len(labels), bool) if test is None else test
    group = group_shortcut_auc(centres, labels, permutations=200)
    within = within_group_auc(labels[test], scores[test], centres[test])
    model_auc = float(roc_auc_score(labels[test], scores[test]))
    return shortcut_verdict(model_auc, group, within, None, split, "centre")


@pytest.mark.parametrize("seed", range(5))
def test_verdict_warns_when_the_model_scores_the_centre(seed) -> None:
    """Score = centre + noise: pooled AUC about 0.65, within-centre AUC about 0.5."""
    labels, centres, rng = confounded_cohort(seed)
    scores = (centres == "A") + rng.normal(0, 0.5, len(labels))
    verdict = judged(labels, centres, scores)
    assert verdict["warning"] and verdict["verdict"].startswith("Warning: the model's AUC")
    assert any("within-centre AUC" in r and "near chance" in r for r in verdict["reasons"])
    assert "Next: check the within-centre AUC" in verdict["verdict"] and "--stain-norm macenko" in verdict["verdict"]


@pytest.mark.parametrize("seed", range(5))
def test_verdict_stays_quiet_when_the_model_reads_the_tissue(seed) -> None:
    """Score = label + noise in both centres of the same confounded cohort: within-centre AUC about 0.8."""
    labels, centres, rng = confounded_cohort(seed)
    verdict = judged(labels, centres, labels + rng.normal(0, 0.7, len(labels)))
    assert not verdict["warning"] and verdict["reasons"] == []
    assert verdict["verdict"].startswith("The model ranks slides within each centre: the model's mean within-centre")


@pytest.mark.parametrize("seed", range(10))
def test_verdict_stays_quiet_for_a_weak_model_that_reads_the_tissue(seed) -> None:
    """Score = label + more noise: pooled AUC about 0.71, as close to the centre-only 0.70 as a tissue model gets,
    and the within-centre AUC about the same. The pooled AUC is no higher than the within-centre ranking supports,
    so the centre does not explain it (comparing the pooled AUC with the centre's alone warned on 17 of 20 seeds)."""
    labels, centres, rng = confounded_cohort(seed)
    verdict = judged(labels, centres, labels + rng.normal(0, 1.3, len(labels)))
    assert not verdict["warning"], verdict["reasons"]


def test_verdict_names_a_test_split_the_centre_separates() -> None:
    """A 22-slide test split whose positives are all at centre A: the centre alone reaches AUC 1 on it."""
    labels, centres, rng = confounded_cohort(0)
    test = np.zeros(len(labels), bool)
    test[np.flatnonzero((centres == "A") & (labels == 1))[:11]] = True
    test[np.flatnonzero((centres == "B") & (labels == 0))[:11]] = True
    scores = labels + rng.normal(0, 0.3, len(labels))
    verdict = judged(labels, centres, scores, test)
    assert verdict["warning"]
    assert any(r.startswith("on the test split alone centre reaches AUC 1.000") for r in verdict["reasons"])
    assert "re-split stratified by centre" in verdict["verdict"]


def test_verdict_from_colour_alone_and_with_no_evidence() -> None:
    close = shortcut_verdict(0.875, colour_auc=0.75, margin=0.125)  # exactly at the margin counts as close
    assert close["warning"] and "colour alone reaches AUC 0.750, within 0.12 of the model's 0.875" in close["verdict"]
    far = shortcut_verdict(0.9, colour_auc=0.6)
    assert not far["warning"] and far["verdict"].startswith("No within-group AUC to judge by: colour alone reaches")
    assert "pass --group-column" in far["verdict"]
    assert shortcut_verdict(0.9)["verdict"] is None
    # The cohort of the false all-clear: colour 0.606, model 0.688, centre alone 0.703, within 0.54 and 0.41.
    group = {"auc": 0.703, "p_value": 0.001}
    within = {"mean": 0.475, "ci_low": 0.31, "ci_high": 0.64}
    case = shortcut_verdict(0.688, group, within, 0.606, group_name="centre")
    assert case["warning"] and len(case["reasons"]) == 2 and "centre alone reaches AUC 0.703" in case["verdict"]


def test_within_group_auc_and_its_interval() -> None:
    labels = np.array([1, 0, 1, 0, 0, 1, 1, 0])
    scores = np.array([0.9, 0.1, 0.4, 0.4, 0.2, 0.3, 0.8, 0.5])
    centres = np.array(["A"] * 4 + ["B"] * 4)
    result = within_group_auc(labels, scores, centres, seed=3)
    # A: 0.9 beats 0.1 and 0.4; 0.4 beats 0.1, ties 0.4 -> 3.5 / 4. B: 0.3 beats 0.2; 0.8 beats both -> 3 / 4.
    assert result["per_group"] == {"A": 0.875, "B": 0.75} and result["mean"] == pytest.approx(0.8125)
    assert result["ci_low"] <= result["mean"] <= result["ci_high"] and result["n_groups"] == 2
    assert result == within_group_auc(labels, scores, centres, seed=3)
    one_class = within_group_auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4], ["A", "A", "B", "B"])
    assert one_class["mean"] is None and one_class["per_group"] == {"A": None, "B": None}


def test_staining_batches_are_inferred_from_colour() -> None:
    """Two staining batches of 40 slides (eosin-heavy and haematoxylin-heavy statistics, with slide-to-slide
    spread) are found; their prevalences (80% and 20%) differ beyond chance. One batch stays one batch."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0.05, 0.5, len(COLOUR_STAT_NAMES))  # optical densities
    shift = np.where([n.startswith(("eosin", "od_g")) for n in COLOUR_STAT_NAMES], 0.1, 0.0)
    # Slides vary along three shared directions (tissue composition), the statistics moving together.
    spread = rng.normal(0, 0.01, (80, 3)) @ rng.normal(0, 1, (3, len(base))) + rng.normal(0, 0.005, (80, len(base)))
    stats = base + spread + np.r_[np.zeros((40, len(base))), np.tile(shift, (40, 1))]
    labels = np.r_[rng.permutation(np.r_[np.ones(32), np.zeros(8)]), rng.permutation(np.r_[np.ones(8), np.zeros(32)])]
    ids = [f"s{i:02d}" for i in range(80)]
    found = infer_colour_batches(stats, labels, ids)
    assert found["n_batches"] == 2 and found["silhouette"] >= 0.5
    batch = np.array([found["batch_of"][s] for s in ids])
    assert len(set(batch[:40])) == 1 and len(set(batch[40:])) == 1 and batch[0] != batch[40]
    assert all(b["differs"] and b["fisher_p"] < 1e-4 for b in found["batches"].values())
    assert sorted(b["prevalence"] for b in found["batches"].values()) == [0.2, 0.8]
    single = infer_colour_batches(stats[:40], labels[:40], ids[:40])
    assert single["n_batches"] == 1 and set(single["batch_of"].values()) == {"batch_1"}
    assert infer_colour_batches(stats[:8], labels[:8], ids[:8])["silhouette"] is None  # too few slides to try


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


def test_run_shortcut_judges_a_runs_predictions_by_their_groups() -> None:
    """A run's predictions (score = centre + noise) with colour statistics that give the centre away: by the
    centre column, or, without it, by the staining batches inferred from colour. Both warn, and judging the
    same check on other (pooled) predictions that read the tissue does not."""
    labels, centres, rng = confounded_cohort(1)
    ids = [f"s{i:03d}" for i in range(len(labels))]
    predictions = pd.DataFrame(
        {
            "slide_id": ids,
            "patient_id": ids,
            "label": labels,
            "centre": centres,
            "split": rng.choice(["train", "val", "test"], len(ids), p=[0.5, 0.2, 0.3]),
            "probability": (centres == "A") * 0.5 + rng.uniform(0, 0.5, len(ids)),
        }
    )
    base = rng.uniform(0.05, 0.5, len(COLOUR_STAT_NAMES))
    stats = {s: base + 0.1 * (c == "A") + rng.normal(0, 0.003, len(base)) for s, c in zip(ids, centres)}
    test = predictions[predictions["split"] == "test"]
    model_auc = float(roc_auc_score(test["label"], test["probability"]))
    for column, name in (("centre", "centre"), (None, "colour batch")):
        check = run_shortcut(predictions, stats, model_auc, column, seed=0)
        assert check["group_name"] == name and check["group_auc"] == pytest.approx(
            group_shortcut_auc(centres, labels)["auc"]
        )
        assert set(check["splits"]) == {"train", "val", "test"} and check["within"]["n_groups"] == 2
        assert check["warning"] and f"within-{name} AUC" in check["verdict"]
        reading = predictions.assign(probability=labels + rng.normal(0, 0.5, len(ids)))
        pooled = judge(check, reading, float(roc_auc_score(labels, reading["probability"])))
        assert not pooled["warning"] and pooled["within"]["mean"] > 0.75
    assert check["batches"]["n_batches"] == 2 and check["group_source"] == "colour batches"
