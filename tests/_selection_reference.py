"""An independent float64 reference for the selection, and the comparison the selection pins use.

The reference shares no code with the package: the centred (standardised, L2-normalised) matrix is
formed densely in float64, its thin SVD taken with ``numpy.linalg.svd``, k read off the energy
curve and the leverage ``||U_k[i]||²`` summed directly. The package's scores are float64 arithmetic
rounded to float32 (the canonical score), so they sit within ~2⁻²⁴ relative of these.

:func:`assert_selection_matches` is what replaced the old hash pins (a hash of a float-derived
order changes with the CPU's BLAS kernels): rows whose reference score is farther than ``band``
from the cut-off must be selected (or not) exactly as the reference says, the rows inside the band
are counted and bounded, and the package's ranked order must never put a row ahead of one the
reference scores higher by more than the band. A change that moves the selection by more than
the rounding still fails.
"""
from __future__ import annotations

import numpy as np

#: relative distance below which two scores may be ordered either way: the float32 rounding of the
#: canonical score (2⁻²⁴ ≈ 6e-8) plus the difference between a Gram+eigh fit and a dense SVD.
BAND = 2e-7


def reference_scores(X, *, energy: float = 0.9, k: int | None = None, standardize: bool = False,
                     l2_normalize: bool = False) -> tuple[np.ndarray, int]:
    """Leverage of every row of ``X`` (n, d) by a dense float64 SVD; returns ``(scores, k)``."""
    A = np.asarray(X, dtype=np.float64)
    A = A - A.mean(axis=0)
    if standardize:
        sd = np.sqrt((A * A).mean(axis=0))
        A = A / np.where(sd > 0, sd, 1.0)
    if l2_normalize:
        nrm = np.sqrt((A * A).sum(axis=1))
        A = A / np.where(nrm > 0, nrm, 1.0)[:, None]
    U, s, _ = np.linalg.svd(A, full_matrices=False)
    if k is None:
        e = np.cumsum(s ** 2) / np.sum(s ** 2)
        k = int(np.flatnonzero(e >= energy * (1 - 1e-12))[0]) + 1
    return np.sum(U[:, :k] ** 2, axis=1), k


def reference_top(ref: np.ndarray, m: int) -> np.ndarray:
    """The top ``m`` rows of ``ref``: descending score, ties to the lower row."""
    return np.lexsort((np.arange(ref.size), -ref))[:m]


def assert_selection_matches(idx, ref: np.ndarray, m: int | None = None, band: float = BAND,
                             max_in_band: int = 2) -> int:
    """Check a ranked selection ``idx`` against reference scores ``ref``; returns the rows that
    differ from the reference's selection (all of them inside the noise band of the cut-off).

    ``max_in_band`` bounds how many rows may sit within ``band`` of the cut-off (more means the
    test data has a near-tie at the cut-off and cannot pin the selection).
    """
    idx = np.asarray(idx, dtype=np.int64)
    m = idx.size if m is None else m
    assert idx.size == m and np.unique(idx).size == m, "selection has duplicates or the wrong size"
    ref_top = reference_top(ref, m)
    cut = ref[ref_top[-1]]
    tol = band * max(abs(cut), np.finfo(float).tiny)
    near = np.abs(ref - cut) <= tol
    assert int(near.sum()) <= max_in_band + 1, f"{int(near.sum())} rows within {band:g} of the cut-off"
    sel = np.zeros(ref.size, bool)
    sel[idx] = True
    want = np.zeros(ref.size, bool)
    want[ref_top] = True
    wrong = np.flatnonzero(sel != want)
    outside = wrong[~near[wrong]]
    assert outside.size == 0, (f"{outside.size} rows selected differently from the reference away from "
                               f"the cut-off, e.g. rows {outside[:5].tolist()}")
    # ranked order: never a row ahead of one the reference scores higher by more than the band
    s = ref[idx]
    later_max = np.maximum.accumulate(s[::-1])[::-1]
    worst = later_max[1:] - s[:-1]
    bad = np.flatnonzero(worst > band * np.maximum(np.abs(s[:-1]), np.finfo(float).tiny))
    assert bad.size == 0, f"rank {int(bad[0]) + 1} is out of order by more than {band:g} relative"
    return int(wrong.size)
