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

**Debiased CKA** (``debiased=True``). The form above uses the biased HSIC estimator, which is inflated when n is
not much larger than d: two independent Gaussian representations score about d / (n + d) (0.34 at n = 2,000,
d = 1,024; 0.89 at n = 500, d = 4,096). The debiased form replaces each HSIC with the unbiased estimator HSIC_1
of Song et al. (2012), as Nguyen, Raghu & Kornblith (2021) do. With K~, L~ the Gram matrices with a zero
diagonal::

    HSIC_1(K, L) = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n(n-3))

    CKA_1(X, Y) = HSIC_1(K, L) / sqrt(HSIC_1(K, K) HSIC_1(L, L))

It needs n >= 4. Unrelated representations then score near 0, on either side of it.

* HSIC_1 ignores a constant shift of the rows, so centring (or shifting by the first row) is exact for it too:
  the shift adds g_i + g_j + c to every off-diagonal K_ij, and substituting that into the formula, the terms in
  g cancel and those in c add up to c (1^T L~ 1)(1 + n/(n-2) - 2(n-1)/(n-2)) = 0. Centring a Gram matrix,
  H K H, is a change of the same form, so centred and uncentred Grams give the same HSIC_1.
* HSIC_1(K, L) = <U(K), U(L)>_F / (n(n-3)), U the U-centring (Szekely & Rizzo 2014), so HSIC_1(K, K) >= 0 and
  Cauchy-Schwarz bounds CKA_1 by [-1, 1]. HSIC_1(K, K) is 0 when U(K) = 0: constant rows (exact zeros here,
  through the shift), but also, e.g., rows that all equal one vector but one. A side whose HSIC_1 with itself is
  <= 0 gets CKA_1 = 0.0, the module's 0/0 convention; where rounding leaves that exact 0 as a tiny positive
  number instead, the cross term is rounding too and CKA_1 comes out tiny (~1e-10).
* **Negative values are returned as they are**: they are estimation noise around 0 for unrelated
  representations, and clipping them to 0 would bring back a positive bias. A value past +-1 by rounding (at
  most 1e-9) is set to +-1; one past it by more cannot come from exact arithmetic, so it raises instead of
  being clipped out of sight.

The scikit-learn / SciPy stacks have no CKA; these few lines follow the papers' definitions directly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Self

import numpy as np

from ..errors import HistotransferError

DEBIASED_MIN_SAMPLES = 4
# How far past +-1 a debiased CKA may be from float64 rounding alone before it is treated as an error.
_ROUNDING = 1e-9


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


def _check_samples(n: int, debiased: bool, where: str) -> None:
    """Refuse too few samples: 2 for the biased estimator, 4 for the debiased one (its n(n-3) denominator)."""
    need = DEBIASED_MIN_SAMPLES if debiased else 2
    if n < need:
        kind = " for the debiased estimator" if debiased else ""
        raise HistotransferError(f"{where}: needs at least {need} samples{kind}, got {n}.")


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


def debiased_cka_from_hsic(cross: float, self_x: float, self_y: float) -> float:
    """Debiased CKA from HSIC_1(K, L), HSIC_1(K, K) and HSIC_1(L, L); see the module notes on its range.

    0.0 when a self term is <= 0; negative values are kept; rounding past +-1 is clipped and anything further
    raises HistotransferError, since exact arithmetic bounds the value by [-1, 1].
    """
    if self_x <= 0.0 or self_y <= 0.0:
        return 0.0
    value = cross / (np.sqrt(self_x) * np.sqrt(self_y))
    if abs(value) > 1.0 + _ROUNDING:
        raise HistotransferError(
            f"debiased CKA came out as {value!r}, outside the [-1, 1] that exact arithmetic allows: float64 lost "
            "the precision; centre the inputs (e.g. pass centred_gram matrices) or remove large offsets first."
        )
    return float(np.clip(value, -1.0, 1.0))


def _hsic1(tr_kl: float, sum_k: float, sum_l: float, sum_kl: float, n: int) -> float:
    """HSIC_1 of Song et al. (2012) from tr(K~ L~), 1^T K~ 1, 1^T L~ 1 and 1^T K~ L~ 1 (K~, L~ zero-diagonal)."""
    return (tr_kl + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 * sum_kl / (n - 2)) / (n * (n - 3))


@dataclass
class _RowSums:
    """Sums over the rows x_i, y_i of two representations from which linear CKA follows, biased or debiased.

    With a_i = ||x_i||^2 and b_i = ||y_i||^2: ``xty`` = sum x_i y_i^T, ``sx``/``sy`` = sum x_i / sum y_i,
    ``sa``/``sb`` = sum a_i / sum b_i, ``ay`` = sum a_i y_i, ``bx`` = sum b_i x_i, ``ab`` = sum a_i b_i. They add
    up over batches of rows, and nothing in them grows with n.
    """

    xty: np.ndarray
    sx: np.ndarray
    sy: np.ndarray
    sa: float
    sb: float
    ay: np.ndarray
    bx: np.ndarray
    ab: float
    n: int

    @classmethod
    def of(cls, x: np.ndarray, y: np.ndarray) -> _RowSums:
        """The sums of one block of rows of x (b, d1) and y (b, d2)."""
        a = np.einsum("ij,ij->i", x, x)
        b = np.einsum("ij,ij->i", y, y)
        return cls(
            x.T @ y, x.sum(axis=0), y.sum(axis=0), float(a.sum()), float(b.sum()), a @ y, b @ x, float(a @ b), len(x)
        )

    def __iadd__(self, other: _RowSums) -> Self:
        self.xty += other.xty
        self.sx += other.sx
        self.sy += other.sy
        self.ay += other.ay
        self.bx += other.bx
        self.sa += other.sa
        self.sb += other.sb
        self.ab += other.ab
        self.n += other.n
        return self

    def debiased_hsic(self) -> float:
        """HSIC_1 of the linear kernels, each Gram-matrix term written with the row sums (K~ = X X^T - diag(a)).

        tr(K~ L~) = ||X^T Y||^2 - sum a_i b_i;  1^T K~ 1 = ||sum x_i||^2 - sum a_i;
        1^T K~ L~ 1 = sum_i (x_i . sx - a_i)(y_i . sy - b_i) = sx^T X^T Y sy - ay . sy - bx . sx + sum a_i b_i.
        """
        tr_kl = float(np.vdot(self.xty, self.xty)) - self.ab
        sum_k = float(self.sx @ self.sx) - self.sa
        sum_l = float(self.sy @ self.sy) - self.sb
        sum_kl = float(self.sx @ self.xty @ self.sy - self.ay @ self.sy - self.bx @ self.sx) + self.ab
        return _hsic1(tr_kl, sum_k, sum_l, sum_kl, self.n)


@dataclass(frozen=True)
class _HollowGram:
    """A symmetric Gram matrix K with what HSIC_1 needs of K~ (K with a zero diagonal), without copying K."""

    k: np.ndarray
    diag: np.ndarray
    row_sums: np.ndarray  # K~ 1

    @classmethod
    def of(cls, k: np.ndarray) -> _HollowGram:
        diag = np.diag(k).copy()
        return cls(k, diag, k.sum(axis=1) - diag)

    def debiased_hsic(self, other: _HollowGram) -> float:
        """HSIC_1(K, L): tr(K~ L~) = <K, L> - diag(K) . diag(L) and 1^T K~ L~ 1 = (K~ 1) . (L~ 1) by symmetry."""
        tr_kl = float(np.vdot(self.k, other.k) - self.diag @ other.diag)
        return _hsic1(
            tr_kl,
            float(self.row_sums.sum()),
            float(other.row_sums.sum()),
            float(self.row_sums @ other.row_sums),
            len(self.k),
        )


def _debiased_cka_grams(k: np.ndarray, l_: np.ndarray) -> float:
    hk, hl = _HollowGram.of(k), _HollowGram.of(l_)
    return debiased_cka_from_hsic(hk.debiased_hsic(hl), hk.debiased_hsic(hk), hl.debiased_hsic(hl))


def _debiased_cka_features(x: np.ndarray, y: np.ndarray) -> float:
    return debiased_cka_from_hsic(
        _RowSums.of(x, y).debiased_hsic(), _RowSums.of(x, x).debiased_hsic(), _RowSums.of(y, y).debiased_hsic()
    )


def linear_cka(x: Any, y: Any, debiased: bool = False) -> float:
    """Linear CKA between representations ``x`` (n, d1) and ``y`` (n, d2) of the same n samples.

    Accepts numpy arrays or torch tensors (any float dtype; computed in float64). Returns a value in [0, 1]:
    1 for representations equal up to an orthogonal transform and isotropic scaling, 0.0 by definition when
    either side has zero variance. ``debiased=True`` uses the unbiased HSIC estimator (module notes): near 0
    for unrelated representations even when d >> n, in [-1, 1], and needs n >= 4. Raises HistotransferError for
    mismatched n, too few samples or non-finite values.
    """
    x = _as_matrix(x, "x")
    y = _as_matrix(y, "y")
    n = len(x)
    if len(y) != n:
        raise HistotransferError(f"linear_cka: x and y must have the same number of rows, got {n} and {len(y)}.")
    _check_samples(n, debiased, "linear_cka")
    x = centre_columns(x)
    y = centre_columns(y)
    d1, d2 = x.shape[1], y.shape[1]
    if n * (d1 + d2) <= d1 * d1 + d2 * d2 + d1 * d2:
        k, l_ = x @ x.T, y @ y.T
        if debiased:
            return _debiased_cka_grams(k, l_)
        return cka_from_products(float(np.vdot(k, l_)), float(np.linalg.norm(k)), float(np.linalg.norm(l_)))
    if debiased:
        return _debiased_cka_features(x, y)
    cross = y.T @ x
    return cka_from_products(
        float(np.vdot(cross, cross)), float(np.linalg.norm(x.T @ x)), float(np.linalg.norm(y.T @ y))
    )


class StreamingCKA:
    """Linear CKA between named representations whose rows arrive in batches, in feature-space form.

    For each pair that is compared (and each name with itself) it keeps float64 running sums over rows
    (:class:`_RowSums`: the d_a x d_b cross-product, the row sums and the few sums of squared row norms that
    ``debiased=True`` needs), so memory is independent of the number of samples. Rows are shifted by each name's
    first row before accumulating (an exact constant shift that both estimators ignore, see the module notes),
    which keeps constant columns exactly zero and limits cancellation in the final formulas.
    """

    def __init__(self, pairs: Iterable[tuple[str, str]], debiased: bool = False):
        self.pairs = list(dict.fromkeys(pairs))
        self.debiased = debiased
        names = sorted({n for p in self.pairs for n in p})
        self._keys = list(dict.fromkeys(self.pairs + [(n, n) for n in names]))
        self._sums: dict[tuple[str, str], _RowSums] = {}
        self._shift: dict[str, np.ndarray] = {}
        self.n = 0

    def update(self, batch: dict[str, Any]) -> None:
        """Add one batch: ``batch[name]`` is the (b, d_name) matrix of that representation for the same b rows."""
        rows: dict[str, np.ndarray] = {}
        for name in {n for p in self._keys for n in p}:
            mat = _as_matrix(batch[name], name)
            if name not in self._shift:
                self._shift[name] = mat[0].copy()
            rows[name] = mat - self._shift[name]
        sizes = {len(r) for r in rows.values()}
        if len(sizes) != 1:
            raise HistotransferError(f"StreamingCKA.update: representations differ in batch size: {sorted(sizes)}.")
        for a, b in self._keys:
            part = _RowSums.of(rows[a], rows[b])
            if (a, b) in self._sums:
                self._sums[(a, b)] += part
            else:
                self._sums[(a, b)] = part
        self.n += sizes.pop()

    def _centred(self, a: str, b: str) -> np.ndarray:
        sums = self._sums[(a, b)]
        mean_a, mean_b = sums.sx / self.n, sums.sy / self.n
        return sums.xty - self.n * np.outer(mean_a, mean_b)

    def result(self) -> dict[tuple[str, str], float]:
        """CKA for each requested pair."""
        _check_samples(self.n, self.debiased, "StreamingCKA")
        if self.debiased:
            selfs = {a: self._sums[(a, b)].debiased_hsic() for (a, b) in self._sums if a == b}
            return {
                (a, b): debiased_cka_from_hsic(self._sums[(a, b)].debiased_hsic(), selfs[a], selfs[b])
                for a, b in self.pairs
            }
        norms = {a: float(np.linalg.norm(self._centred(a, a))) for (a, b) in self._sums if a == b}
        out = {}
        for a, b in self.pairs:
            cross = self._centred(a, b)
            out[(a, b)] = cka_from_products(float(np.vdot(cross, cross)), norms[a], norms[b])
        return out


def gram_cka(
    grams: dict[str, np.ndarray], pairs: Iterable[tuple[str, str]], debiased: bool = False
) -> dict[tuple[str, str], float]:
    """CKA for each pair of named n x n float64 Gram matrices.

    Biased: ``grams`` must be centred (:func:`centred_gram`), CKA = <K, L> / (||K|| ||L||). Debiased: centred or
    uncentred Grams give the same value (HSIC_1 ignores centring, module notes), but pass :func:`centred_gram`
    ones all the same: an uncentred Gram of features with large offsets has lost its precision when it was
    formed. Needs n >= 4.
    """
    if not debiased:
        norms = {name: float(np.linalg.norm(k)) for name, k in grams.items()}
        return {(a, b): cka_from_products(float(np.vdot(grams[a], grams[b])), norms[a], norms[b]) for a, b in pairs}
    for k in grams.values():
        _check_samples(len(k), True, "gram_cka")
    hollow = {name: _HollowGram.of(k) for name, k in grams.items()}
    selfs = {name: h.debiased_hsic(h) for name, h in hollow.items()}
    return {(a, b): debiased_cka_from_hsic(hollow[a].debiased_hsic(hollow[b]), selfs[a], selfs[b]) for a, b in pairs}


def centred_gram(x: np.ndarray, chunk_bytes: int = 256 << 20) -> np.ndarray:
    """X_c X_c^T in float64 for an (n, d) array (possibly a disk memmap), reading column chunks.

    Only n x chunk values are in memory at a time, so d can be far larger than memory allows for X itself.
    """
    n, d = x.shape
    step = max(1, chunk_bytes // (8 * n))
    gram = np.zeros((n, n))
    for start in range(0, d, step):
        block = centre_columns(np.asarray(x[:, start : start + step], dtype=np.float64))
        gram += block @ block.T
    return gram
