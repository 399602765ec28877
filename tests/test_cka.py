"""Linear CKA: exact agreement with an independent HSIC implementation and the invariances of the paper."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histotransfer.analysis.cka import StreamingCKA, centred_gram, gram_cka, linear_cka
from histotransfer.errors import HistotransferError


def hsic_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Reference: Gram matrices centred with H = I - 11^T/n, CKA = HSIC(K,L) / sqrt(HSIC(K,K) HSIC(L,L))."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k = h @ (x @ x.T) @ h
    l_ = h @ (y @ y.T) @ h
    return float(np.trace(k @ l_) / np.sqrt(np.trace(k @ k) * np.trace(l_ @ l_)))


def random_orthogonal(d: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


@pytest.mark.parametrize(
    "n,d1,d2", [(2, 1, 1), (5, 3, 7), (10, 10, 10), (50, 4, 200), (200, 30, 5), (300, 64, 128), (17, 100, 1)]
)
def test_matches_gram_matrix_reference(n, d1, d2):
    rng = np.random.default_rng(n * 1000 + d1 * 10 + d2)
    x = rng.normal(size=(n, d1)) * rng.uniform(0.1, 10, size=d1) + rng.normal(size=d1) * 5
    y = x[:, rng.integers(0, d1, size=d2)] @ rng.normal(size=(d2, d2)) + rng.normal(size=(n, d2))
    assert linear_cka(x, y) == pytest.approx(hsic_cka(x, y), abs=1e-6)
    assert linear_cka(y, x) == pytest.approx(linear_cka(x, y), abs=1e-12)


def test_identity_is_one_and_unrelated_is_small():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 20))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, rng.normal(size=(500, 20))) < 0.1


def test_invariant_to_orthogonal_transform_and_isotropic_scaling():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(100, 12))
    y = np.tanh(x @ rng.normal(size=(12, 8)))
    ref = linear_cka(x, y)
    assert 0.05 < ref < 0.99
    q = random_orthogonal(12, rng)
    assert linear_cka(x @ q, y) == pytest.approx(ref, abs=1e-10)
    assert linear_cka(x, y @ random_orthogonal(8, rng)) == pytest.approx(ref, abs=1e-10)
    assert linear_cka(3.7 * x, y) == pytest.approx(ref, abs=1e-10)
    assert linear_cka(x, 1e-3 * y) == pytest.approx(ref, abs=1e-10)
    assert linear_cka(x + 42.0, y) == pytest.approx(ref, abs=1e-10)


def test_changes_under_general_invertible_linear_map():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 6))
    y = x.copy()
    a = np.diag([1.0, 1.0, 1.0, 1.0, 1.0, 30.0]) @ random_orthogonal(6, rng)
    assert abs(np.linalg.det(a)) > 1e-6
    assert linear_cka(x, y) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x @ a, y) < 0.5


def test_n_smaller_than_d_and_constant_columns_give_no_nan():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 1000))
    y = rng.normal(size=(4, 300))
    value = linear_cka(x, y)
    assert np.isfinite(value) and value == pytest.approx(hsic_cka(x, y), abs=1e-6)
    x[:, :500] = 7.3  # constant columns: ignored by centring
    ref = linear_cka(x[:, 500:], y)
    assert linear_cka(x, y) == pytest.approx(ref, abs=1e-12)
    assert linear_cka(np.full((10, 5), 0.1), rng.normal(size=(10, 3))) == 0.0  # zero variance side: defined as 0
    assert linear_cka(np.full((10, 5), 0.1), np.full((10, 2), 3.0)) == 0.0


def test_accepts_torch_tensors_of_any_float_dtype():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(64, 16)).astype(np.float32)
    y = (x @ rng.normal(size=(16, 16))).astype(np.float32)
    ref = hsic_cka(x, y)
    assert linear_cka(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(ref, abs=1e-6)
    assert linear_cka(torch.from_numpy(x).half(), y) == pytest.approx(ref, abs=1e-2)


def test_bad_input_is_refused():
    with pytest.raises(HistotransferError, match="same number of rows"):
        linear_cka(np.ones((5, 2)), np.ones((6, 2)))
    with pytest.raises(HistotransferError, match="at least 2 samples"):
        linear_cka(np.ones((1, 2)), np.ones((1, 2)))
    with pytest.raises(HistotransferError, match="NaN"):
        linear_cka(np.array([[1.0], [np.nan]]), np.ones((2, 1)))


def test_streaming_equals_in_memory_over_batches():
    rng = np.random.default_rng(5)
    a1 = rng.normal(size=(230, 8)) + 1e3  # large offset: the shift keeps the centring exact enough
    a2 = np.c_[a1 @ rng.normal(size=(8, 5)), np.full(230, 2.5)]
    b1 = a1 + 0.5 * rng.normal(size=a1.shape)
    acc = StreamingCKA([("a1", "b1"), ("a2", "b1"), ("a1", "a2")])
    for s in range(0, 230, 32):
        acc.update({"a1": a1[s : s + 32], "a2": a2[s : s + 32], "b1": b1[s : s + 32]})
    out = acc.result()
    assert acc.n == 230
    assert out[("a1", "b1")] == pytest.approx(hsic_cka(a1, b1), abs=1e-6)
    assert out[("a2", "b1")] == pytest.approx(hsic_cka(a2, b1), abs=1e-6)
    assert out[("a1", "a2")] == pytest.approx(hsic_cka(a1, a2), abs=1e-6)


def test_streaming_identical_inputs_give_exactly_one():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(50, 7)).astype(np.float32)
    acc = StreamingCKA([("x", "y")])
    for s in range(0, 50, 16):
        acc.update({"x": x[s : s + 16], "y": x[s : s + 16].copy()})
    assert acc.result()[("x", "y")] == pytest.approx(1.0, abs=1e-12)


def test_gram_form_from_column_chunks_matches_reference():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(30, 500))
    y = np.maximum(x[:, :300], 0) + 0.1 * rng.normal(size=(30, 300))
    grams = {"x": centred_gram(x, chunk_bytes=30 * 8 * 37), "y": centred_gram(y, chunk_bytes=1)}
    out = gram_cka(grams, [("x", "y"), ("x", "x")])
    assert out[("x", "y")] == pytest.approx(hsic_cka(x, y), abs=1e-6)
    assert out[("x", "x")] == pytest.approx(1.0, abs=1e-12)
