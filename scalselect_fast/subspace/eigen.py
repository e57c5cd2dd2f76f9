"""From a d×d Gram to the subspace's fields: the eigensolve (tridiagonal reduction, top-k vectors),
the choice of k (energy target or fixed k), standardisation scales and the sanity checks on n and
the total variance. No data passes here.
"""
from __future__ import annotations

import math

import numpy as np

from ..store import MatrixSource
from .backends import NumpyBackend
from .result import SubspaceError
from .rows import source_name

#: a column whose variance is below this fraction of the largest column variance is "constant"
ZERO_VARIANCE_RTOL = 1e-10
# --------------------------------------------------------------------------------------------------
# shared pieces of the solvers
# --------------------------------------------------------------------------------------------------
def check_energy_k(energy, k):
    if k is None:
        if energy is None or not (0.0 < float(energy) <= 1.0) or math.isnan(float(energy)):
            raise SubspaceError(f"energy must be in (0, 1], got {energy!r} (e.g. 0.9 keeps 90% of the energy)")
    else:
        if int(k) != k or int(k) < 1:
            raise SubspaceError(f"k must be a positive integer, got {k!r}")


def scale_from_moments(var: np.ndarray) -> tuple[np.ndarray, int]:
    """Standard deviations with constant columns mapped to 1; returns (scale, n_constant)."""
    vmax = float(var.max(initial=0.0))
    const = var <= ZERO_VARIANCE_RTOL * vmax
    scale = np.sqrt(np.where(const, 1.0, var))
    return scale, int(const.sum())


def check_rows_and_variance(src: MatrixSource | str, n: int, total: float, mean: np.ndarray, n_invalid: int = 0):
    """Refuse fewer than 2 valid rows or zero total variance; ``src`` is a source or its name.

    ``total`` is the total energy of whichever matrix is about to be decomposed (raw centred, or
    standardised / L2-normalised); ``n_invalid`` rows dropped before the count are named in the message.
    """
    name = src if isinstance(src, str) else source_name(src)
    if n < 2:
        extra = f" ({n_invalid} invalid rows were dropped)" if n_invalid else ""
        raise SubspaceError(f"{name}: need at least 2 valid rows to fit a subspace, got {n}{extra}; "
                            f"pass more samples")
    ref = n * float(mean @ mean) + total
    if not total > 1e-24 * max(ref, 1e-300):  # also refuses NaN and total <= 0
        raise SubspaceError(f"{name}: zero total variance (all {n} rows are identical after "
                            f"centring), so there is no subspace to select by; check the extraction "
                            f"(e.g. a model layer that outputs constants)")


def pick_k(lam: np.ndarray, total: float, energy, k, rank: int, n: int, d: int, src_name: str):
    """k from the energy target (or the override) given eigenvalues ``lam`` sorted descending."""
    if k is not None:
        k = int(k)
        limit = min(n - 1, d)
        if k > limit or k > rank:
            raise SubspaceError(f"{src_name}: k={k} exceeds the rank of the centred matrix "
                                f"(numerical rank {rank}, at most min(n-1, d) = {limit}); choose k ≤ "
                                f"{min(rank, limit)} or use an energy target instead")
        return k
    cum = np.cumsum(lam)
    # a hair of slack so energy=1.0 is reached despite float rounding of Σλ vs trace
    target = float(energy) * total * (1.0 - 1e-9)
    hit = np.flatnonzero(cum >= target)
    if hit.size == 0:
        return None
    return int(min(hit[0] + 1, max(rank, 1)))


def canonical_signs(V: np.ndarray) -> np.ndarray:
    """Deterministic sign: the largest-magnitude entry of each column is positive."""
    idx = np.argmax(np.abs(V), axis=0)
    s = np.sign(V[idx, np.arange(V.shape[1])])
    s[s == 0] = 1.0
    return V * s


def eps_for(dtype) -> float:
    return float(np.finfo(dtype).eps)


class _Tridiagonal:
    """``G = Q T Qᵀ`` (LAPACK dsytrd) reused for all eigenvalues and the top-k eigenvectors.

    A full ``eigh`` forms all d eigenvectors (divide & conquer + a d³ back-transform); the fit needs
    every eigenvalue (energy curve, k) but only k vectors. One tridiagonal reduction, ``dsterf`` for
    the values, ``dstemr`` for k vectors of T and ``dormqr`` to map them back costs ~2× less at
    d=768 and agrees with ``eigh`` to ~1e-14 (tests/test_subspace.py compares with dense SVD).
    """

    def __init__(self, G: np.ndarray):
        from scipy.linalg import lapack

        self.lapack = lapack
        self.d = G.shape[0]
        lwork = int(lapack.dsytrd_lwork(self.d, lower=1)[0])
        self.c, self.diag, self.off, self.tau, info = lapack.dsytrd(G, lower=1, lwork=max(lwork, 1))
        if info != 0:
            raise np.linalg.LinAlgError(f"dsytrd info={info}")

    def eigenvalues(self) -> np.ndarray:
        w, info = self.lapack.dsterf(self.diag.copy(), self.off.copy())
        if info != 0:
            raise np.linalg.LinAlgError(f"dsterf info={info}")
        return w  # ascending

    def top_vectors(self, k: int) -> np.ndarray | None:
        """Eigenvectors of the k largest eigenvalues, descending order, or None if LAPACK declines."""
        d, lp = self.d, self.lapack
        if d == 1:
            return np.ones((1, 1))
        e = np.concatenate([self.off, [0.0]])
        m, w, z, info = lp.dstemr(self.diag.copy(), e, 3, 0.0, 0.0, d - k + 1, d)
        if info != 0 or m != k:
            return None
        z = np.asfortranarray(z[:, :k])
        rest = np.asfortranarray(z[1:])
        a = self.c[1:, :d - 1]
        lwork = int(lp.dormqr(side="L", trans="N", a=a, tau=self.tau, c=rest, lwork=-1)[1][0])
        out, _, info = lp.dormqr(side="L", trans="N", a=a, tau=self.tau, c=rest, lwork=max(lwork, 1))
        if info != 0:
            return None
        V = np.vstack([z[:1], out])
        order = np.argsort(w[:k])[::-1]
        return V[:, order]


def _blas_threads(n: int):
    """Context limiting BLAS threads (no-op without threadpoolctl).

    The d×d eigensolve is dominated by BLAS-2 (memory-bound) calls, one per column of the
    tridiagonal reduction; with 2 threads each call pays a thread hand-off, and when other
    processes share the cores the spinning threads slow it down 3-15× (measured on the 2-core dev
    machine under load: 0.38 s with 1 thread vs 1.3-6.5 s with 2 at d=768).
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=n, user_api="blas")


def _tridiagonal(G: np.ndarray):
    if G.shape[0] < 2:  # LAPACK's wrappers reject empty off-diagonals; eigh handles d=1
        return None
    try:
        return _Tridiagonal(np.asarray(G, dtype=np.float64))
    except (ImportError, np.linalg.LinAlgError, AttributeError, ValueError):
        return None


def subspace_from_gram(G: np.ndarray, *, n: int, mean: np.ndarray, scale, l2_normalize: bool,
                       energy, k, src_name: str = "source", compute_dtype=np.float64,
                       backend=None) -> dict:
    """Eigendecompose the d×d Gram of the transformed matrix and choose k.

    Parameters
    ----------
    G : ndarray, shape (d, d), float64
        ``AᵀA`` of the (centred, scaled, normalised) matrix.
    n : int
        Rows in A.
    compute_dtype : dtype
        Dtype the Gram's products were formed in (sets the rank tolerance).

    Returns
    -------
    dict
        Keyword arguments for :class:`Subspace` (without ``solver``, ``passes``, ``info``).
    """
    be = backend or NumpyBackend()
    d = G.shape[0]
    total = float(G.trace())
    check_rows_and_variance(src_name, n, total, mean)
    with _blas_threads(1):
        return _eig_fields(G, be, d, total, n=n, mean=mean, scale=scale, l2_normalize=l2_normalize,
                           energy=energy, k=k, src_name=src_name, compute_dtype=compute_dtype)


def _eig_fields(G, be, d, total, *, n, mean, scale, l2_normalize, energy, k, src_name, compute_dtype):
    tri = _tridiagonal(G) if be.name == "numpy" else None
    if tri is not None:
        lam = tri.eigenvalues()[::-1].copy()
    else:
        lam_all, V_all = be.eigh(be.asarray(G))
        lam = be.to_host(lam_all)[::-1].copy()
    lam = np.maximum(lam, 0.0)
    lam_max = float(lam[0]) if lam.size else 0.0
    # eigenvalues below this are indistinguishable from the rounding of the products
    tol = lam_max * d * eps_for(compute_dtype) * 4
    rank = int((lam > tol).sum())
    kk = pick_k(lam, total, energy, k, rank, n, d, src_name)
    if kk is None:  # cannot happen with the full spectrum, kept for safety
        kk = rank
    kk = max(1, min(kk, d))
    V = tri.top_vectors(kk) if tri is not None else None
    if V is None:
        if tri is not None:
            lam_all, V_all = np.linalg.eigh(G)
        V = be.to_host(V_all)[:, ::-1]
    comps = canonical_signs(np.ascontiguousarray(V[:, :kk]))
    sv = np.sqrt(lam[:kk])
    if not (sv > 0).all():
        raise SubspaceError(f"{src_name}: k={kk} includes a zero singular value; choose a smaller k")
    return dict(mean=mean, scale=scale, l2_normalize=l2_normalize, components=comps, singular_values=sv,
                energy_curve=lam, k=kk, energy=None if k is not None else float(energy),
                captured_energy=float(lam[:kk].sum()), total_energy=total, n=n, d=d)

