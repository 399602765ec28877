"""Slide-level metrics: exact values, the bootstrap against scikit-learn, order independence."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from histotransfer.mil.metrics import METRIC_KEYS, bootstrap_aucs, slide_metrics


def test_known_values():
    m = slide_metrics([0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9])
    assert set(m) == set(METRIC_KEYS)
    assert m["auc"] == 0.75 and m["n_slides"] == 4
    assert m["accuracy"] == 0.5 and m["balanced_accuracy"] == 0.5 and m["f1"] == 0.5
    assert 0 <= m["auc_ci_low"] <= m["auc"] <= m["auc_ci_high"] <= 1


def test_bootstrap_equals_roc_auc_score_per_resample_with_ties():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 40)
    probs = np.round(rng.random(40), 1)  # many ties
    boot = bootstrap_aucs(labels, probs, n_boot=200, seed=11)
    idx = np.random.default_rng(11).integers(0, 40, size=(200, 40))
    expected = [roc_auc_score(labels[i], probs[i]) for i in idx if len(set(labels[i])) == 2]
    np.testing.assert_allclose(boot, expected, rtol=0, atol=1e-12)


def test_metrics_do_not_depend_on_slide_order_and_are_seeded():
    rng = np.random.default_rng(0)
    labels, probs = rng.integers(0, 2, 30), rng.random(30)
    perm = rng.permutation(30)
    assert slide_metrics(labels, probs, seed=3) == slide_metrics(labels[perm], probs[perm], seed=3)
    assert slide_metrics(labels, probs, seed=3)["auc_ci_low"] != slide_metrics(labels, probs, seed=4)["auc_ci_low"]


def test_one_class_split_has_no_auc():
    m = slide_metrics([1, 1, 1], [0.2, 0.7, 0.9])
    assert m["auc"] is None and m["auc_ci_low"] is None and m["auc_ci_high"] is None
    assert m["accuracy"] == pytest.approx(2 / 3) and m["n_slides"] == 3


def test_empty_split():
    m = slide_metrics([], [])
    assert m["n_slides"] == 0 and m["auc"] is None and m["accuracy"] is None
