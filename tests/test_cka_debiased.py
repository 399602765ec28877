"""Debiased linear CKA: every path against HSIC_1 written out from Song et al. (2012), and its behaviour at d >> n."""

from __future__ import annotations

from fractions import Fraction
from itertools import pairwise

import numpy as np
import pytest

from histotransfer.analysis.cka import (
    StreamingCKA,
    centred_gram,
    debiased_cka_from_hsic,
    gram_cka,
    linear_cka,
)
from histotransfer.errors import HistotransferError


def hsic1(k: np.ndarray, l_: np.ndarray):
    """HSIC_1 straight from the paper: K~, L~ are K, L with a zero diagonal. Works on float or Fraction arrays."""
    n = len(k)
    kt = k - np.diag(np.diag(k))
    lt = l_ - np.diag(np.diag(l_))
    kl = kt @ lt
    return (np.trace(kl) + kt.sum() * lt.sum() / ((n - 1) * (n - 2)) - 2 * kl.sum() / (n - 2)) / (n * (n - 3))


def reference_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Debiased CKA from the uncentred linear Gram matrices, n x n."""
    k, l_ = x @ x.T, y @ y.T
    return float(hsic1(k, l_) / np.sqrt(hsic1(k, k) * hsic1(l_, l_)))


def u_centre(k: np.ndarray) -> np.ndarray:
    """U-centring (Szekely & Rizzo 2014) of a Gram matrix, on Fraction arrays."""
    n = len(k)
    kt = k - np.diag(np.diag(k))
    rows = kt.sum(axis=1)
    u = kt - rows[:, None] / (n - 2) - rows[None, :] / (n - 2) + kt.sum() / ((n - 1) * (n - 2))
    return u - np.diag(np.diag(u))


def fractions(a: np.ndarray) -> np.ndarray:
    return np.vectorize(Fraction, otypes=[object])(a)


def random_orthogonal(d: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


def related_pair(n: int, d1: int, d2: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """x with uneven column scales and one constant column; y a noisy linear map of some of x's columns."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d1)) * rng.uniform(0.1, 10, size=d1)
    x[:, 0] = 0.0
    y = x[:, rng.integers(0, d1, size=d2)] @ rng.normal(size=(d2, d2)) + rng.normal(size=(n, d2))
    return x, y


def offsets(d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=d) * 1e4


def test_hsic1_ignores_row_shifts_and_is_a_u_centred_inner_product_exactly():
    rng = np.random.default_rng(0)
    x = fractions(rng.integers(-5, 6, size=(6, 3)))
    y = fractions(rng.integers(-5, 6, size=(6, 2)))
    t = np.array([Fraction(7, 3), Fraction(-11, 2), Fraction(5)], dtype=object)
    k, l_ = x @ x.T, y @ y.T
    value = hsic1(k, l_)
    assert value != 0
    assert hsic1((x + t) @ (x + t).T, l_) == value
    h = np.eye(6, dtype=int) - fractions(np.full((6, 6), 1)) / 6
    assert hsic1(h @ k @ h, l_) == value
    assert np.vdot(u_centre(k), u_centre(l_)) / (6 * 3) == value


# (5, 3, 2), (300, 8, 5), (200, 30, 30) take the feature-space path; (6, 3, 7), (12, 50, 3), (40, 4, 200) the Gram path.
@pytest.mark.parametrize("n,d1,d2", [(5, 3, 2), (300, 8, 5), (200, 30, 30), (6, 3, 7), (12, 50, 3), (40, 4, 200)])
def test_linear_cka_matches_reference(n, d1, d2):
    x, y = related_pair(n, d1, d2, seed=n + d1 + d2)
    ref = reference_cka(x, y)
    # Offsets of 1e4 would cost the n x n reference its precision; the exact test above shows HSIC_1 ignores them.
    got = linear_cka(x + offsets(d1, 1), y + offsets(d2, 2), debiased=True)
    assert got == pytest.approx(ref, rel=1e-6)
    assert linear_cka(y, x, debiased=True) == pytest.approx(got, rel=1e-12)


@pytest.mark.parametrize("batch", [1, 7, 64, None])
def test_streaming_matches_reference_over_batch_splits(batch):
    x, y = related_pair(150, 12, 6, seed=3)
    z = np.tanh(x[:, :5]) + 0.3 * np.random.default_rng(4).normal(size=(150, 5))
    data = {"x": x + offsets(12, 5), "y": y + offsets(6, 6), "z": z + offsets(5, 7)}
    # None: uneven splits with single rows among them
    cuts = [0, 1, 2, 5, 6, 40, 41, 149, 150] if batch is None else [*range(0, 150, batch), 150]
    acc = StreamingCKA([("x", "y"), ("z", "y"), ("x", "z")], debiased=True)
    for start, stop in pairwise(cuts):
        acc.update({name: a[start:stop] for name, a in data.items()})
    out = acc.result()
    assert acc.n == 150
    assert out[("x", "y")] == pytest.approx(reference_cka(x, y), rel=1e-6)
    assert out[("z", "y")] == pytest.approx(reference_cka(z, y), rel=1e-6)
    assert out[("x", "z")] == pytest.approx(reference_cka(x, z), rel=1e-6)


def test_gram_cka_matches_reference_from_centred_and_uncentred_grams():
    x, y = related_pair(30, 500, 40, seed=8)
    ref = reference_cka(x, y)
    centred = {"x": centred_gram(x + offsets(500, 9), chunk_bytes=30 * 8 * 37), "y": centred_gram(y, chunk_bytes=1)}
    assert gram_cka(centred, [("x", "y")], debiased=True)[("x", "y")] == pytest.approx(ref, rel=1e-6)
    uncentred = {"x": (x + 3.0) @ (x + 3.0).T, "y": (y - 2.0) @ (y - 2.0).T}
    assert gram_cka(uncentred, [("x", "y")], debiased=True)[("x", "y")] == pytest.approx(ref, rel=1e-6)


def test_negative_values_are_kept_and_match_reference():
    rng = np.random.default_rng(10)
    values = []
    for _ in range(8):
        x, y = rng.normal(size=(20, 3)), rng.normal(size=(20, 4))
        values.append(linear_cka(x, y, debiased=True))
        assert values[-1] == pytest.approx(reference_cka(x, y), rel=1e-6)
    assert min(values) < -0.01


def test_debiased_is_near_zero_where_biased_is_inflated_d_much_larger_than_n():
    rng = np.random.default_rng(11)
    x, y = rng.normal(size=(500, 4096)), rng.normal(size=(500, 4096))
    assert linear_cka(x, y) > 0.8
    assert abs(linear_cka(x, y, debiased=True)) < 0.05


def test_debiased_is_near_zero_where_biased_is_inflated_n_twice_d():
    rng = np.random.default_rng(12)
    x, y = rng.normal(size=(2000, 1024)), rng.normal(size=(2000, 1024))
    assert linear_cka(x, y) == pytest.approx(1024 / (2000 + 1024), abs=0.02)  # E ~ d / (n + d)
    assert abs(linear_cka(x, y, debiased=True)) < 0.05


@pytest.mark.parametrize("n,d", [(60, 20), (20, 100)])  # feature-space and Gram paths
def test_identity_and_rotated_scaled_copy_give_one(n, d):
    rng = np.random.default_rng(n + d)
    x = rng.normal(size=(n, d)) + 5.0
    copy = 2.5 * x @ random_orthogonal(d, rng) - 40.0
    assert linear_cka(x, x, debiased=True) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, copy, debiased=True) == pytest.approx(1.0, abs=1e-9)
    acc = StreamingCKA([("x", "c")], debiased=True)
    for s in range(0, n, 7):
        acc.update({"x": x[s : s + 7], "c": copy[s : s + 7]})
    assert acc.result()[("x", "c")] == pytest.approx(1.0, abs=1e-9)
    grams = {"x": centred_gram(x), "c": centred_gram(copy)}
    assert gram_cka(grams, [("x", "c"), ("x", "x")], debiased=True) == pytest.approx(
        {("x", "c"): 1.0, ("x", "x"): 1.0}, abs=1e-9
    )


def test_side_without_structure_gives_zero_on_every_path():
    rng = np.random.default_rng(14)
    const, y = np.full((10, 5), 0.1), rng.normal(size=(10, 3))
    assert linear_cka(const, y, debiased=True) == 0.0
    assert linear_cka(np.full((10, 50), 0.1), y, debiased=True) == 0.0
    acc = StreamingCKA([("c", "y")], debiased=True)
    acc.update({"c": const, "y": y})
    assert acc.result()[("c", "y")] == 0.0
    assert gram_cka({"c": centred_gram(const), "y": centred_gram(y)}, [("c", "y")], debiased=True)[("c", "y")] == 0.0
    spike = np.zeros((50, 8))
    spike[17] = rng.normal(size=8) * 30  # one row apart from the rest: U(K) = 0, only rounding is left
    assert abs(linear_cka(spike + 2.0, rng.normal(size=(50, 5)), debiased=True)) < 1e-6


def test_range_rules_of_the_ratio():
    assert debiased_cka_from_hsic(-0.3, 1.0, 1.0) == pytest.approx(-0.3)
    assert debiased_cka_from_hsic(2.0, 4.0, 9.0) == pytest.approx(2.0 / 6.0)
    assert debiased_cka_from_hsic(1.0 + 1e-12, 1.0, 1.0) == 1.0
    assert debiased_cka_from_hsic(-1.0 - 1e-12, 1.0, 1.0) == -1.0
    assert debiased_cka_from_hsic(0.5, 0.0, 1.0) == 0.0
    assert debiased_cka_from_hsic(0.5, 1.0, -1e-20) == 0.0
    with pytest.raises(HistotransferError, match="outside"):
        debiased_cka_from_hsic(1.01, 1.0, 1.0)
    with pytest.raises(HistotransferError, match="outside"):
        debiased_cka_from_hsic(-1.5, 1.0, 1.0)


def test_fewer_than_four_samples_are_refused():
    x = np.random.default_rng(13).normal(size=(3, 2))
    assert 0.0 <= linear_cka(x, x[:, ::-1]) <= 1.0  # the biased estimator still takes 3
    with pytest.raises(HistotransferError, match="at least 4 samples"):
        linear_cka(x, x, debiased=True)
    acc = StreamingCKA([("a", "b")], debiased=True)
    acc.update({"a": x, "b": x})
    with pytest.raises(HistotransferError, match="at least 4 samples"):
        acc.result()
    with pytest.raises(HistotransferError, match="at least 4 samples"):
        gram_cka({"a": x @ x.T, "b": x @ x.T}, [("a", "b")], debiased=True)
