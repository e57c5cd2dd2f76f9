"""Greedy facility-location maximisation on cosine similarity: the quadratic classic.

Objective (Cornuéjols et al. 1977; as a data-selection baseline e.g. CRAIG, Mirzasoleiman 2020)::

    F(S) = Σ_i max_{j ∈ S} s(i, j),     s(i, j) = (1 + cos(x_i, x_j)) / 2  ∈ [0, 1]

The shift makes s non-negative, so F is monotone submodular and greedy gives a (1 - 1/e)
approximation; it does not change which row greedy picks at any step (gains are halved).

Greedy is run lazily (Minoux 1978): stale marginal gains are upper bounds, so only the heap top is
re-evaluated. Ties go to the lower row index, exactly as a naive greedy that scans every row.

Modes
-----
``dense`` (default)
    The exact N×N float32 similarity matrix, computed in row blocks. Refused up front, with the
    memory and time it would need, when it does not fit ``max_bytes``.
``knn=K``
    A sparse graph: each row is a client of its K nearest neighbours by cosine (faiss, exact
    inner-product search); memory O(N·K). The neighbour search is still O(N²·d) time.
``max_n=M``
    Run the dense method on a seeded random subset of M rows (indices map back to the source).
"""
from __future__ import annotations

import heapq
import time

import numpy as np

from ._common import load_float32, prepare


class TooLargeError(MemoryError):
    """The dense similarity matrix would not fit; the message carries the estimate and the options."""


def _gemm_gflops() -> float:
    """Measured float32 GEMM rate here (a few ms), to turn an N² size into a time estimate."""
    m = 768
    a = np.random.default_rng(0).standard_normal((m, m), dtype=np.float32)
    a @ a
    t = time.perf_counter()
    for _ in range(3):
        a @ a
    dt = (time.perf_counter() - t) / 3
    return 2 * m ** 3 / max(dt, 1e-9) / 1e9


def _available_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        import os

        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _default_max_bytes() -> int:
    return _available_bytes() // 2


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if b < 1024 or unit == "TiB":
            return f"{b:.1f} {unit}"
        b /= 1024


def _fmt_seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def estimate(n: int, d: int) -> dict:
    """Memory (bytes) and time (s) the dense mode needs for an (n, d) source on this machine."""
    gflops = _gemm_gflops()
    return {"bytes": 4 * n * n, "seconds": 2.0 * n * n * d / (gflops * 1e9), "gflops": gflops}


def select(source, budget, seed: int = 0, max_n: int | None = None, knn: int | None = None,
           max_bytes: int | None = None, block_rows: int = 2048, device: str = "cpu") -> np.ndarray:
    """Greedy facility-location selection.

    Parameters
    ----------
    source : ndarray, .npy path, store directory or MatrixSource, shape (N, d)
    budget : int, float or str
        Count, fraction or percentage of N (of the whole source, also with ``max_n``).
    seed : int
        Seeds the subset drawn by ``max_n``; the greedy itself is deterministic.
    max_n : int, optional
        Select within a seeded random subset of this many rows (must hold at least ``budget``).
    knn : int, optional
        Use a sparse K-nearest-neighbour similarity graph (faiss) instead of the dense matrix.
    max_bytes : int, optional
        Memory the dense matrix may take; default half of the currently available memory.
    block_rows : int
        Rows per block when computing similarities.
    device : {"cpu", "cuda", "auto"}
        Where faiss runs the ``knn`` search (``cuda`` needs faiss-gpu; ``auto`` falls back).

    Returns
    -------
    (budget,) int64
        Row indices in greedy order.

    Raises
    ------
    TooLargeError
        Dense mode whose N×N float32 matrix exceeds ``max_bytes``; the message gives the estimated
        bytes and time and suggests ``max_n`` / ``knn``.
    """
    src, b = prepare(source, budget)
    n, d = src.n, src.d
    if max_n is not None and knn is not None:
        raise ValueError("choose one of max_n (dense on a subset) and knn (sparse graph), not both")
    rows = None
    if max_n is not None:
        max_n = int(max_n)
        if not b <= max_n:
            raise ValueError(f"max_n={max_n} is smaller than the budget {b}; raise max_n")
        if max_n < n:
            rows = np.sort(np.random.default_rng(seed).choice(n, max_n, replace=False))
            n = max_n
    if knn is None:
        limit = _default_max_bytes() if max_bytes is None else int(max_bytes)
        if 4 * n * n > limit:
            est = estimate(n, d)
            raise TooLargeError(
                f"facility location (dense) on N={n} rows needs a {n}x{n} float32 similarity matrix: "
                f"{_fmt_bytes(est['bytes'])} (limit {_fmt_bytes(limit)}) and about "
                f"{_fmt_seconds(est['seconds'])} of GEMM at the {est['gflops']:.0f} GFLOP/s measured "
                f"here, plus the greedy. Pass max_n=M (dense on a random subset of M rows, "
                f"M <= {int((limit / 4) ** 0.5)} fits) or knn=K (sparse K-nearest-neighbour graph, "
                f"O(N*K) memory), or raise max_bytes.")
    x = load_float32(src, l2_normalize=True) if rows is None else _normalized_rows(src, rows)
    if knn is None:
        order = _greedy_dense(_dense_similarity(x, block_rows), b)
    else:
        order = _greedy_sparse(*_knn_graph(x, int(knn), device), b)
    return order if rows is None else rows[order]


def _normalized_rows(src, rows: np.ndarray) -> np.ndarray:
    from ._common import check_finite, normalize_rows

    x = src.read_rows(rows)
    check_finite(x, 0)
    return normalize_rows(x)


def _dense_similarity(x: np.ndarray, block_rows: int) -> np.ndarray:
    """s = (1 + x xᵀ) / 2 for row-normalised x, (n, n) float32, computed in row blocks in place."""
    n = x.shape[0]
    s = np.empty((n, n), dtype=np.float32)
    for i in range(0, n, block_rows):
        blk = s[i:i + block_rows]
        np.matmul(x[i:i + block_rows], x.T, out=blk)
        blk += 1.0
        blk *= 0.5
    # clip rounding outside [0, 1] so the objective stays monotone
    np.clip(s, 0.0, 1.0, out=s)
    return s


def _greedy_dense(s: np.ndarray, budget: int) -> np.ndarray:
    """Lazy greedy on a dense symmetric similarity matrix; column j == row j."""
    n = s.shape[0]
    cover = np.zeros(n, dtype=np.float32)
    buf = np.empty(n, dtype=np.float32)

    def gain(j: int) -> float:
        # float32 pairwise sum of non-negative terms: monotone under rounding (see _lazy_greedy)
        np.subtract(s[j], cover, out=buf)
        np.maximum(buf, 0.0, out=buf)
        return float(np.add.reduce(buf))

    # first-round gains through gain() itself, so every gain is summed the same way
    gains = np.array([gain(j) for j in range(n)], dtype=np.float64)
    return _lazy_greedy(gains, gain, lambda j: np.maximum(cover, s[j], out=cover), budget)


def _knn_graph(x: np.ndarray, k: int, device: str = "cpu"):
    """Clients of each candidate in a K-nearest-neighbour cosine graph (faiss exact IP search).

    Returns CSR-by-candidate arrays (indptr, clients, sims) with sims = (1 + cos) / 2.
    """
    from ._faiss import flat_index, resolve_faiss_device

    n, d = x.shape
    if not 1 <= k:
        raise ValueError(f"knn must be >= 1, got {k}")
    k = min(k, n)
    index = flat_index(d, "ip", resolve_faiss_device(device))
    index.add(x)
    sims, nbrs = index.search(x, k)
    clients = np.repeat(np.arange(n, dtype=np.int64), k)
    cand = nbrs.reshape(-1).astype(np.int64)
    val = np.clip((1.0 + sims.reshape(-1)) * 0.5, 0.0, 1.0).astype(np.float32)
    keep = cand >= 0
    clients, cand, val = clients[keep], cand[keep], val[keep]
    # every row must be a candidate of itself so a chosen row covers itself (similarity 1): faiss
    # may return a duplicate row instead of the row itself among equal neighbours
    selfrow = np.arange(n, dtype=np.int64)
    clients = np.concatenate([clients, selfrow])
    cand = np.concatenate([cand, selfrow])
    val = np.concatenate([val, np.ones(n, dtype=np.float32)])
    # sort by (candidate, client, -similarity) and keep one entry per pair, the largest
    order = np.lexsort((-val, clients, cand))
    cand, clients, val = cand[order], clients[order], val[order]
    first = np.ones(cand.size, dtype=bool)
    first[1:] = (cand[1:] != cand[:-1]) | (clients[1:] != clients[:-1])
    cand, clients, val = cand[first], clients[first], val[first]
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(cand, minlength=n), out=indptr[1:])
    return indptr, clients, val


def _greedy_sparse(indptr, clients, val, budget: int) -> np.ndarray:
    n = indptr.size - 1
    cover = np.zeros(n, dtype=np.float32)

    def gain(j: int) -> float:
        c, v = clients[indptr[j]:indptr[j + 1]], val[indptr[j]:indptr[j + 1]]
        return float(np.add.reduce(np.maximum(v - cover[c], 0.0)))

    def update(j: int) -> None:
        c, v = clients[indptr[j]:indptr[j + 1]], val[indptr[j]:indptr[j + 1]]
        cover[c] = np.maximum(cover[c], v)  # clients are unique per candidate

    # first-round gains (cover = 0); same float64 pairwise sums as gain() would give
    gains = np.array([gain(j) for j in range(n)], dtype=np.float64)
    return _lazy_greedy(gains, gain, update, budget)


def _lazy_greedy(gains: np.ndarray, gain, update, budget: int) -> np.ndarray:
    """Minoux's lazy greedy. Heap keys (-gain, index) so ties go to the lower index.

    Marginal gains only shrink as the selection grows (submodularity, and exactly so in floating
    point: each term max(s - cover, 0) is non-increasing in cover, and a fixed-order sum of
    non-negative terms is monotone under rounding), so a stale gain is an upper bound and a fresh
    heap top is the true argmax.
    """
    heap = [(-g, j, 0) for j, g in enumerate(gains.tolist())]
    heapq.heapify(heap)
    out = np.empty(budget, dtype=np.int64)
    for t in range(budget):
        while True:
            neg, j, stamp = heapq.heappop(heap)
            if stamp == t:
                break
            heapq.heappush(heap, (-gain(j), j, t))
        out[t] = j
        update(j)
    return out
