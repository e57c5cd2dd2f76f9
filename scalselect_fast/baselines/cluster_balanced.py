"""Cluster-balanced selection (COINCIDE-style budget allocation; Lee et al. 2024).

Cluster the rows with faiss spherical k-means, spread the budget as evenly as possible over the
clusters (water-filling: small clusters are taken whole, the rest share what is left), and inside a
cluster take rows by distance to the centroid. COINCIDE additionally weights clusters by
transferability and density from a reference model; that needs a model and is not reproduced here:
this is the plain balanced allocation.
"""
from __future__ import annotations

import numpy as np

from ._common import default_n_clusters, faiss_kmeans, prepare


def balanced_allocation(sizes: np.ndarray, budget: int) -> np.ndarray:
    """Split ``budget`` over clusters of the given ``sizes`` as evenly as the sizes allow.

    Every cluster gets ``min(size, q)`` for the largest q that fits; the remainder goes one each to
    the clusters that still have rows, largest first (ties: lower cluster id).

    Parameters
    ----------
    sizes : (K,) int
    budget : int, 0 <= budget <= sizes.sum()

    Returns
    -------
    (K,) int64, sums to ``budget``, elementwise <= sizes.

    Examples
    --------
    >>> balanced_allocation(np.array([1, 10, 10]), 9).tolist()
    [1, 4, 4]
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if not 0 <= budget <= int(sizes.sum()):
        raise ValueError(f"budget {budget} is outside [0, {int(sizes.sum())}]")
    lo, hi = 0, int(sizes.max(initial=0))
    while lo < hi:  # largest q with sum(min(sizes, q)) <= budget
        mid = (lo + hi + 1) // 2
        if int(np.minimum(sizes, mid).sum()) <= budget:
            lo = mid
        else:
            hi = mid - 1
    alloc = np.minimum(sizes, lo)
    rem = budget - int(alloc.sum())
    if rem:
        open_ = np.nonzero(sizes > lo)[0]
        open_ = open_[np.lexsort((open_, -sizes[open_]))]
        alloc[open_[:rem]] += 1
    return alloc


def select(source, budget, seed: int = 0, n_clusters: int | None = None, order: str = "nearest",
           niter: int = 20, nredo: int = 1, l2_normalize: bool = True, device: str = "cpu") -> np.ndarray:
    """Balanced per-cluster selection.

    Parameters
    ----------
    source : ndarray, .npy path, store directory or MatrixSource, shape (N, d)
    budget : int, float or str
        Count, fraction or percentage of N.
    seed : int
        Seeds faiss k-means (initialisation and training sample).
    n_clusters : int, optional
        Default round(sqrt(N)).
    order : {"nearest", "farthest"}
        Within a cluster, take rows nearest the centroid first (prototypical) or farthest first.
    niter, nredo : int
        k-means iterations and restarts (best of ``nredo`` initialisations).
    l2_normalize : bool
        Cluster on cosine geometry (spherical k-means on normalised rows), as COINCIDE does.
    device : {"cpu", "cuda", "auto"}
        Where faiss runs (``cuda`` needs faiss-gpu; ``auto`` falls back to the CPU).

    Returns
    -------
    (budget,) int64
        Row indices, round-robin over clusters (rank 0 of every cluster, then rank 1, ...).
    """
    if order not in ("nearest", "farthest"):
        raise ValueError(f"order must be 'nearest' or 'farthest', got {order!r}")
    src, b = prepare(source, budget)
    k = default_n_clusters(src.n) if n_clusters is None else int(n_clusters)
    _, assign, dist = faiss_kmeans(src, k, seed, niter=niter, nredo=nredo, l2_normalize=l2_normalize,
                                  device=device)
    return pick(assign, dist, b, order)


def pick(assign: np.ndarray, dist: np.ndarray, budget: int, order: str = "nearest") -> np.ndarray:
    """Balanced pick for a given clustering.

    Parameters
    ----------
    assign : (N,) int, cluster of each row.
    dist : (N,) float, distance of each row to its centroid.
    budget : int, 1 <= budget <= N.
    order : {"nearest", "farthest"}

    Returns
    -------
    (budget,) int64, round-robin over clusters by within-cluster rank.
    """
    assign = np.asarray(assign, dtype=np.int64)
    dist = np.asarray(dist, dtype=np.float64)
    n = assign.size
    key = dist if order == "nearest" else -dist
    # rows grouped by cluster, inside a cluster by distance key then row index
    idx = np.lexsort((np.arange(n), key, assign))
    sizes = np.bincount(assign)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    alloc = balanced_allocation(sizes, budget)
    # rank of each grouped row inside its cluster; keep the first alloc[c] of cluster c
    rank = np.arange(n) - np.repeat(starts, sizes)
    cl = assign[idx]
    take = rank < alloc[cl]
    chosen, rank, cl = idx[take], rank[take], cl[take]
    return chosen[np.lexsort((cl, rank))].astype(np.int64)
