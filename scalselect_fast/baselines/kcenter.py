"""k-center greedy coreset (farthest-point traversal; Gonzalez 1985, Sener & Savarese 2018).

Each step adds the row farthest (Euclidean) from the rows already chosen. Work is O(N·budget·d):
one streaming pass over the source per chosen row, which is what makes the method quadratic when
the budget is a fraction of N. Memory is O(N + block·d): the running distance-to-nearest-center
array and one block of rows; the matrix itself is never held.
"""
from __future__ import annotations

import numpy as np

from ._common import iter_float_blocks, prepare


def select(source, budget, seed: int = 0, l2_normalize: bool = False, start: int | None = None,
           block_rows: int = 2048) -> np.ndarray:
    """Greedy farthest-point selection.

    Parameters
    ----------
    source : ndarray, .npy path, store directory or MatrixSource, shape (N, d)
    budget : int, float or str
        Count, fraction or percentage of N.
    seed : int
        Chooses the first center uniformly at random when ``start`` is None.
    l2_normalize : bool
        Normalise rows first (distances then rank like cosine distances).
    start : int, optional
        Index of the first center (overrides ``seed``).
    block_rows : int
        Rows per streamed block (memory/speed trade-off only; the answer does not change).

    Returns
    -------
    (budget,) int64
        Row indices in the order chosen. Ties (equal distances) go to the lower row index; once
        every row is at distance 0 from a center (more centers than distinct rows), the remaining
        picks are the lowest unchosen indices.

    Notes
    -----
    Squared distances are summed from float32 differences block by block (memory bound: one read
    of the source per step) and kept in float64. The greedy 2-approximates the optimal covering
    radius.

    Examples
    --------
    >>> x = np.array([[0., 0.], [1., 0.], [10., 0.]], np.float32)
    >>> select(x, 2, start=0).tolist()
    [0, 2]
    """
    src, b = prepare(source, budget)
    n = src.n
    if start is None:
        start = int(np.random.default_rng(seed).integers(n))
    if not 0 <= start < n:
        raise ValueError(f"start={start} is not a row index of a source with N={n} rows")
    scale = None
    if l2_normalize:
        sq = np.empty(n, dtype=np.float64)
        for off, x in iter_float_blocks(src, block_rows):
            sq[off:off + x.shape[0]] = np.einsum("ij,ij->i", x, x, dtype=np.float64)
        # normalisation as a per-row scale applied while streaming (no normalised copy is kept);
        # all-zero rows stay zero
        scale = np.zeros(n, dtype=np.float32)
        scale[sq > 0] = 1.0 / np.sqrt(sq[sq > 0])
        del sq
    else:
        for off, x in iter_float_blocks(src, block_rows):  # one pass to reject NaN/inf rows up front
            pass
    # min squared distance of each row to the chosen centers; chosen rows are marked -1 so they
    # are never picked again (and argmax picks the lowest index among equal distances).
    mind = np.full(n, np.inf, dtype=np.float64)
    chosen = np.empty(b, dtype=np.int64)
    cur = start
    for t in range(b):
        chosen[t] = cur
        c = src.read_rows([cur])[0]
        if scale is not None:
            c = c * scale[cur]
        for off, x in iter_float_blocks(src, block_rows, check=False):
            m = x.shape[0]
            # |x - c|² from the difference, not |x|² - 2x·c + |c|²: exact 0 for duplicates and no
            # cancellation for near rows, and (block-sized, cache-resident) no slower than a GEMV
            diff = x * scale[off:off + m, None] - c if scale is not None else x - c
            d2 = np.einsum("ij,ij->i", diff, diff)
            np.minimum(mind[off:off + m], d2, out=mind[off:off + m])
        mind[cur] = -1.0  # stays -1 (below every distance) through later minimum updates
        if t + 1 < b:
            cur = int(np.argmax(mind))
    return chosen
