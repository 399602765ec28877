"""Linear centred kernel alignment (CKA, Kornblith et al. 2019) between two representations.

For column-centred X (n, d1) and Y (n, d2)::

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F * ||Y^T Y||_F)

which equals the Gram-matrix (HSIC) form <K, L>_F / (||K||_F ||L||_F) with K = X X^T, L = Y Y^T. The
feature-space form costs O(n d^2) and holds d x d matrices, so many samples are cheap; the Gram form costs
O(n^2 d) and holds n x n matrices, so it is the cheaper one when d > n. :func:`linear_cka` picks the cheaper
one; both are computed in float64.

A side with zero variance (every sample the same vector, e.g. all columns constant) has no linear structure to
align, and CKA is 0/0 there; this module defines it as **0.0** rather than NaN. Constant columns next to
varying ones are fine: they centre to exact zeros and do not change the value.

The scikit-learn / SciPy stacks have no CKA; these few lines follow the paper's definition directly.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from ..errors import HistotransferError


def _as_matrix(a: Any, name: str) -> np.ndarray:
    """A float64 (n, d) copy of a numpy array or torch tensor (extra trailing axes are flattened)."""
    if hasattr(a, "detach"):  # torch.Tensor, without importing torch here
        a = a.detach().cpu().double().numpy()
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    elif a.ndim > 2:
        a = a.reshape(len(a), -1)
    if a.ndim != 2 or a.shape[1] == 0:
        raise HistotransferError(f"linear_cka: {name} must be an (n, d) matrix with d >= 1, got shape {a.shape}.")
    if not np.isfinite(a).all():
        raise HistotransferError(f"linear_cka: {name} contains NaN or inf values.")
    return a


def centre_columns(a: np.ndarray) -> np.ndarray:
    """Subtract each column's mean; constant columns become exact zeros.

    Subtracting the first row before the mean makes constant columns exactly 0 (a mean of n equal float64
    values need not round back to that value) and reduces cancellation for columns with a large offset.
    """
    a = a - a[:1]
    return a - a.mean(axis=0, keepdims=True)


def cka_from_products(cross_sq: float, norm_x: float, norm_y: float) -> float:
    """CKA from ||Y^T X||_F^2 and the two self-norms; 0.0 when either side has zero variance."""
    if norm_x <= 0.0 or norm_y <= 0.0:
        return 0.0
    # Cauchy-Schwarz bounds the ratio by 1; clip the last-bit rounding above it.
    return float(min(cross_sq / (norm_x * norm_y), 1.0))


def linear_cka(x: Any, y: Any) -> float:
    """Linear CKA between representations ``x`` (n, d1) and ``y`` (n, d2) of the same n samples.

    Accepts numpy arrays or torch tensors (any float dtype; computed in float64). Returns a value in [0, 1]:
    1 for representations equal up to an orthogonal transform and isotropic scaling, 0.0 by definition when
    either side has zero variance. Raises HistotransferError for mismatched n, fewer than 2 samples or
    non-finite values.
    """
    x = _as_matrix(x, "x")
    y = _as_matrix(y, "y")
    n = len(x)
    if len(y) != n:
        raise HistotransferError(f"linear_cka: x and y must have the same number of rows, got {n} and {len(y)}.")
    if n < 2:
        raise HistotransferError(f"linear_cka: needs at least 2 samples, got {n}.")
    x = centre_columns(x)
    y = centre_columns(y)
    d1, d2 = x.shape[1], y.shape[1]
    if n * (d1 + d2) <= d1 * d1 + d2 * d2 + d1 * d2:
        k, l_ = x @ x.T, y @ y.T
        return cka_from_products(float(np.vdot(k, l_)), float(np.linalg.norm(k)), float(np.linalg.norm(l_)))
    cross = y.T @ x
    return cka_from_products(
        float(np.vdot(cross, cross)), float(np.linalg.norm(x.T @ x)), float(np.linalg.norm(y.T @ y))
    )


class StreamingCKA:
    """Linear CKA between named representations whose rows arrive in batches, in feature-space form.

    For each name it keeps a float64 running sum and, for each pair that is compared (and each name with
    itself), the d_a x d_b cross-product, so memory is independent of the number of samples. Rows are shifted
    by each name's first row before accumulating (an exact constant shift that CKA ignores), which keeps
    constant columns exactly zero and limits cancellation when centring at the end.
    """

    def __init__(self, pairs: Iterable[tuple[str, str]]):
        self.pairs = list(dict.fromkeys(pairs))
        names = {n for p in self.pairs for n in p}
        self._products = {p: None for p in self.pairs}
        self._products.update({(n, n): None for n in names})
        self._shift: dict[str, np.ndarray] = {}
        self._sum: dict[str, np.ndarray] = {}
        self.n = 0

    def update(self, batch: dict[str, Any]) -> None:
        """Add one batch: ``batch[name]`` is the (b, d_name) matrix of that representation for the same b rows."""
        rows: dict[str, np.ndarray] = {}
        for name in {n for p in self._products for n in p}:
            a = _as_matrix(batch[name], name)
            if name not in self._shift:
                self._shift[name] = a[0].copy()
                self._sum[name] = np.zeros(a.shape[1])
            rows[name] = a - self._shift[name]
            self._sum[name] += rows[name].sum(axis=0)
        sizes = {len(a) for a in rows.values()}
        if len(sizes) != 1:
            raise HistotransferError(f"StreamingCKA.update: representations differ in batch size: {sorted(sizes)}.")
        for (a, b), acc in self._products.items():
            prod = rows[a].T @ rows[b]
            self._products[(a, b)] = prod if acc is None else acc + prod
        self.n += sizes.pop()

    def _centred(self, a: str, b: str) -> np.ndarray:
        mean_a, mean_b = self._sum[a] / self.n, self._sum[b] / self.n
        return self._products[(a, b)] - self.n * np.outer(mean_a, mean_b)

    def result(self) -> dict[tuple[str, str], float]:
        """CKA for each requested pair."""
        if self.n < 2:
            raise HistotransferError(f"StreamingCKA: needs at least 2 samples, got {self.n}.")
        norms = {a: float(np.linalg.norm(self._centred(a, a))) for (a, b) in self._products if a == b}
        out = {}
        for a, b in self.pairs:
            cross = self._centred(a, b)
            out[(a, b)] = cka_from_products(float(np.vdot(cross, cross)), norms[a], norms[b])
        return out


def gram_cka(grams: dict[str, np.ndarray], pairs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], float]:
    """CKA for each pair of named centred Gram matrices (n x n, float64): <K, L> / (||K|| ||L||)."""
    norms = {name: float(np.linalg.norm(k)) for name, k in grams.items()}
    return {(a, b): cka_from_products(float(np.vdot(grams[a], grams[b])), norms[a], norms[b]) for a, b in pairs}


def centred_gram(x: np.ndarray, chunk_bytes: int = 256 << 20) -> np.ndarray:
    """X_c X_c^T in float64 for an (n, d) array (possibly a disk memmap), reading column chunks.

    Only n x chunk values are in memory at a time, so d can be far larger than memory allows for X itself.
    """
    n, d = x.shape
    step = max(1, chunk_bytes // (8 * n))
    gram = np.zeros((n, n))
    for start in range(0, d, step):
        block = centre_columns(np.asarray(x[:, start:start + step], dtype=np.float64))
        gram += block @ block.T
    return gram
