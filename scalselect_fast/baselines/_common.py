"""Helpers shared by the baseline methods: budget handling, row preprocessing, faiss k-means.

Not a public API: each baseline module exposes ``select`` and nothing else is promised.
"""
from __future__ import annotations

import math

import numpy as np

from ..store import MatrixSource, open_source, to_float32

#: rows per block when a baseline streams its source
BLOCK_ROWS = 8192


def prepare(source, budget) -> tuple[MatrixSource, int]:
    """Open ``source`` and resolve ``budget`` against its row count (the core's rules).

    Raises
    ------
    ValueError
        If the source has no rows or the budget is not in (0, N].
    """
    from ..scoring import resolve_budget

    src = open_source(source)
    if src.n < 1:
        raise ValueError(f"{src!r} has no rows; nothing to select from")
    return src, int(resolve_budget(budget, src.n))


def iter_float_blocks(src: MatrixSource, block_rows: int = BLOCK_ROWS, l2_normalize: bool = False,
                      check: bool = True):
    """Yield ``(offset, float32 block)``, decoded from the storage dtype, optionally row-normalised.

    ``check`` raises on NaN/inf rows; methods that stream the source many times check only once.
    """
    for off, block in src.iter_blocks(block_rows):
        x = to_float32(block, src.is_bf16)
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        if l2_normalize:
            x = normalize_rows(x)
        if check:
            check_finite(x, off)
        yield off, x


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation in float32; all-zero rows stay zero (cosine similarity 0 to all)."""
    x = np.array(x, dtype=np.float32, copy=True)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64)).astype(np.float32)
    np.divide(x, norms[:, None], out=x, where=norms[:, None] > 0)
    return x


def check_finite(x: np.ndarray, offset: int) -> None:
    """Raise naming the first rows with NaN/inf: a baseline must never silently rank garbage."""
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        rows = (np.nonzero(bad)[0][:10] + offset).tolist()
        raise ValueError(f"rows {rows} (of {int(bad.sum())} in this block) contain NaN or inf; "
                         f"clean or drop them before selecting")


def load_float32(src: MatrixSource, l2_normalize: bool = False) -> np.ndarray:
    """The whole (n, d) matrix as float32 (for methods that are O(N·d) in memory by nature)."""
    out = np.empty((src.n, src.d), dtype=np.float32)
    for off, x in iter_float_blocks(src, l2_normalize=l2_normalize):
        out[off:off + x.shape[0]] = x
    return out


def default_n_clusters(n: int) -> int:
    """sqrt(N) clusters: clusters of ~sqrt(N) rows keep within-cluster work O(N^1.5) in total."""
    return max(1, min(n, int(round(math.sqrt(n)))))


def faiss_kmeans(src: MatrixSource, n_clusters: int, seed: int, niter: int = 20,
                 l2_normalize: bool = True, max_points_per_centroid: int = 256,
                 nredo: int = 1, device: str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cluster the rows of ``src`` with faiss k-means; assign every row to its nearest centroid.

    Training uses a seeded random sample of at most ``n_clusters * max_points_per_centroid`` rows
    (faiss' own default cap), so memory stays O(sample·d + N). ``nredo`` > 1 keeps the best of
    that many seeded initialisations (faiss initialises from random rows, so a small cluster can
    go unseeded and be merged into a neighbour). ``device`` ("cpu", "cuda", "auto") runs the
    training and the assignment on faiss-gpu (see :mod:`scalselect_fast.baselines._faiss`).

    Returns
    -------
    centroids : (n_clusters, d) float32
    assign : (N,) int64, cluster of each row
    dist : (N,) float32, squared L2 distance of each row to its centroid (after normalisation
        when ``l2_normalize``; then cosine distance = dist / 2)
    """
    import faiss

    from ._faiss import flat_index, resolve_faiss_device

    dev = resolve_faiss_device(device)
    n, d = src.n, src.d
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters must be in [1, N={n}], got {n_clusters}")
    cap = n_clusters * max_points_per_centroid
    if n > cap:
        rows = np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))
        train = src.read_rows(rows)
    else:
        train = src.to_array()
    check_finite(train, 0)
    if l2_normalize:
        train = normalize_rows(train)
    km = faiss.Kmeans(d, n_clusters, niter=niter, nredo=int(nredo), seed=int(seed) & 0x7FFFFFFF, verbose=False,
                      spherical=l2_normalize, max_points_per_centroid=max_points_per_centroid,
                      min_points_per_centroid=1, gpu=dev == "cuda")
    km.train(np.ascontiguousarray(train, dtype=np.float32))
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
    index = flat_index(d, "l2", dev)
    index.add(centroids)
    assign = np.empty(n, dtype=np.int64)
    dist = np.empty(n, dtype=np.float32)
    for off, x in iter_float_blocks(src, l2_normalize=l2_normalize):
        dd, ii = index.search(np.ascontiguousarray(x), 1)
        assign[off:off + x.shape[0]] = ii[:, 0]
        dist[off:off + x.shape[0]] = dd[:, 0]
    return centroids, assign, dist
