"""Uniform random selection: the floor every method has to beat.

Returns a seeded permutation prefix, so the selection at a smaller budget is a prefix of the one at
a larger budget (same seed).
"""
from __future__ import annotations

import numpy as np

from ._common import prepare


def select(source, budget, seed: int = 0) -> np.ndarray:
    """Pick ``budget`` rows uniformly at random without replacement.

    Parameters
    ----------
    source : ndarray, .npy path, store directory or MatrixSource, shape (N, d)
        Only N is used; rows are not read.
    budget : int, float or str
        Count, fraction or percentage of N (see :func:`scalselect_fast.resolve_budget`).
    seed : int
        Seed of ``numpy.random.default_rng``.

    Returns
    -------
    (budget,) int64
        Distinct row indices in draw order.

    Examples
    --------
    >>> select(np.zeros((10, 3), np.float32), 3, seed=0).shape
    (3,)
    """
    src, b = prepare(source, budget)
    return np.random.default_rng(seed).permutation(src.n)[:b].astype(np.int64)
