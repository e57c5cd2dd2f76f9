"""SemDedup (Abbas et al. 2023): semantic de-duplication by clustering, then pairwise cosine.

1. faiss spherical k-means on the L2-normalised rows.
2. Inside each cluster, order the rows by distance to the centroid (``keep="hard"``: farthest
   first, SemDedup's default; ``"easy"``: nearest first) and drop a row when its cosine similarity
   to any row *earlier in that order* exceeds ``1 - eps``. So every group of near-duplicates keeps
   its first member. (As in the paper's reference procedure, "earlier" includes rows that were
   themselves dropped; a chain a~b~c with a≁c keeps a only when b precedes c.)
3. Fill the budget with the surviving rows by the same distance-to-centroid order over all
   clusters. If fewer survive than the budget, the dropped rows follow, least redundant first
   (ascending similarity to their nearest earlier row): exactly what raising ``eps`` until the
   budget is met would keep, so the budget is always met and the closest copies come last.

Pairwise work is O(Σ_c m_c² · d) over cluster sizes m_c, about O(N^1.5·d) with the default
sqrt(N) clusters; memory is one cluster's rows and a (block × cluster) similarity tile.
"""
from __future__ import annotations

import numpy as np

from ._common import default_n_clusters, faiss_kmeans, normalize_rows, prepare


def max_prior_similarity(x: np.ndarray, block_rows: int = 2048) -> np.ndarray:
    """For rows already in priority order: m[j] = max_{i<j} cos(x_i, x_j) (m[0] = -inf).

    Parameters
    ----------
    x : (m, d) float32, rows L2-normalised.
    block_rows : int
        Rows per similarity tile; memory is block_rows × m float32.

    Returns
    -------
    (m,) float32
    """
    m = x.shape[0]
    out = np.full(m, -np.inf, dtype=np.float32)
    for p in range(0, m, block_rows):
        q = min(m, p + block_rows)
        if q <= 1:
            continue
        sims = x[p:q] @ x[:q].T                      # (q-p, q)
        # keep only earlier rows: column i < row position p + r
        col = np.arange(q)[None, :]
        sims[col >= np.arange(p, q)[:, None]] = -np.inf
        out[p:q] = sims.max(axis=1)
    return out


def select(source, budget, seed: int = 0, n_clusters: int | None = None, eps: float = 0.05,
           keep: str = "hard", niter: int = 20, nredo: int = 1, block_rows: int = 2048,
           device: str = "cpu") -> np.ndarray:
    """De-duplicate semantically, then fill the budget by distance to the cluster centroid.

    Parameters
    ----------
    source : ndarray, .npy path, store directory or MatrixSource, shape (N, d)
    budget : int, float or str
        Count, fraction or percentage of N.
    seed : int
        Seeds faiss k-means.
    n_clusters : int, optional
        Default round(sqrt(N)).
    eps : float in [0, 2)
        Rows with cosine similarity > 1 - eps to an earlier row of their cluster are duplicates.
    keep : {"hard", "easy"}
        Which member of a duplicate group survives and which survivors fill the budget first:
        farthest from the centroid ("hard") or nearest ("easy").
    niter, nredo, block_rows : int
        k-means iterations, restarts (best of ``nredo``), rows per similarity tile.
    device : {"cpu", "cuda", "auto"}
        Where faiss k-means runs (``cuda`` needs faiss-gpu; ``auto`` falls back to the CPU).

    Returns
    -------
    (budget,) int64
        Survivors in fill order, then (only if needed) dropped duplicates.
    """
    if keep not in ("hard", "easy"):
        raise ValueError(f"keep must be 'hard' or 'easy', got {keep!r}")
    if not 0.0 <= eps < 2.0:
        raise ValueError(f"eps must be in [0, 2), got {eps}")
    src, b = prepare(source, budget)
    k = default_n_clusters(src.n) if n_clusters is None else int(n_clusters)
    _, assign, dist = faiss_kmeans(src, k, seed, niter=niter, nredo=nredo, l2_normalize=True, device=device)
    order, _ = fill_order(src, assign, dist, eps, keep, block_rows)
    return order[:b]


def fill_order(src, assign: np.ndarray, dist: np.ndarray, eps: float = 0.05, keep: str = "hard",
               block_rows: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Steps 2-3 for a given clustering: duplicate flags and the order the budget is filled in.

    Parameters
    ----------
    src : MatrixSource, shape (N, d)
    assign : (N,) int, cluster of each row (any labelling).
    dist : (N,) float, distance of each row to its cluster centroid.

    Returns
    -------
    order : (N,) int64, survivors by the keep order, then the duplicates in the same order.
    dup : (N,) bool, True for rows dropped as near-duplicates.
    """
    n = src.n
    assign = np.asarray(assign, dtype=np.int64)
    key = -np.asarray(dist, dtype=np.float64) if keep == "hard" else np.asarray(dist, dtype=np.float64)
    idx = np.lexsort((np.arange(n), key, assign))          # grouped by cluster, priority order
    sizes = np.bincount(assign)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    prior = np.full(n, -np.inf, dtype=np.float32)    # max cosine to an earlier row of the cluster
    for c in range(sizes.size):
        members = idx[bounds[c]:bounds[c + 1]]
        if members.size < 2:
            continue
        # rows were checked for NaN/inf while being assigned to clusters
        prior[members] = max_prior_similarity(normalize_rows(src.read_rows(members)), block_rows)
    dup = prior > 1.0 - eps
    # survivors first by key; then duplicates by similarity (least redundant first), then key
    redundancy = np.where(dup, prior, -np.inf)
    order = np.lexsort((np.arange(n), key, redundancy, dup)).astype(np.int64)
    return order, dup
