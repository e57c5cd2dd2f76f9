"""Leverage scores over a streamed source, and the deterministic top-k selection.

The hot loops dispatch to :mod:`scalselect_fast.native` (the C++ extension when built, numpy
otherwise); this module streams blocks, handles invalid rows and resolves budgets. It does not fit
subspaces (see :mod:`scalselect_fast.subspace`) and writes nothing: the selection job and its
outputs are :mod:`scalselect_fast.selection`.

Selection order is part of the contract: descending score, ties broken by the lower row index, so
the same scores always select the same rows whatever the block or shard layout. The scores are
*canonical*: computed with float64 products and rounded once to float32
(:func:`scalselect_fast.native.leverage_block` says why), so the same data and command give the same
scores, the same selection and the same ranks on every CPU, build (native or fallback), thread count
and executor (local or Dask); ``benchmarks/bench_reproducibility.py`` measures it.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from . import native
from .devices import array_device
from .store import DEFAULT_BLOCK_ROWS, DEFAULT_PREFETCH, open_source
from .subspace import InvalidRowsError, Subspace, SubspaceError, describe_rows

__all__ = ["leverage_scores", "top_k", "top_rows", "rows_ranked", "rank_scores", "score_order", "count_scored", "resolve_budget", "BudgetError", "TOPK_CHUNK",
           "RANK_BLOCK"]

#: scores per top_k_block call; each chunk's winners are merged into the running top (same result as one
#: global sort; memory: two budgets' winners and one chunk, not every chunk's winners)
TOPK_CHUNK = 1 << 20

#: about this many rows are ranked at once by :func:`rank_scores` (one range of score values per pass)
RANK_BLOCK = 1 << 19


class BudgetError(ValueError):
    """The budget cannot be met (≤ 0, more than the rows available, or unparsable)."""


def leverage_scores(source, sub: Subspace, block_rows: int = DEFAULT_BLOCK_ROWS,
                    drop_invalid: bool | None = None, device: str = "cpu") -> np.ndarray:
    """Leverage ‖U_k[i]‖² = ‖pre(x_i) V_k Σ_k⁻¹‖² of every row, streaming.

    Parameters
    ----------
    source : ndarray (n, d), memmap, ``.npy`` / store path or MatrixSource
    sub : Subspace
        From :func:`~scalselect_fast.subspace.fit_subspace` (same d).
    block_rows : int
        Rows per streamed block; one (block_rows,) float64 output slice is written per block.
    drop_invalid : bool, optional
        Rows with NaN/inf get score NaN instead of raising. Defaults to the setting the subspace was
        fitted with (``sub.info["drop_invalid"]``).
    device : {"cpu", "cuda", "auto"}
        Where the products run. ``cuda`` needs CuPy and a GPU (:class:`~scalselect_fast.gpu.DeviceError`
        otherwise); ``auto`` uses the GPU when one is usable. The top-k stays on the host.

    Returns
    -------
    ndarray, shape (n,), float64
        Non-negative canonical scores (float64 arithmetic rounded to float32 precision); over the
        rows the subspace was fitted on they sum to ``sub.k`` (to ~1e-7 relative).

    Raises
    ------
    InvalidRowsError
        A row has NaN/inf (listing the first few ids and the count) and ``drop_invalid`` is false.

    Examples
    --------
    >>> import numpy as np, scalselect_fast as ss
    >>> X = np.random.default_rng(0).standard_normal((300, 8))
    >>> sub = ss.fit_subspace(X, k=3)
    >>> round(float(ss.leverage_scores(X, sub).sum()), 6)
    3.0
    """
    if not isinstance(sub, Subspace):
        raise TypeError(f"leverage_scores: sub must be a Subspace (from fit_subspace or Subspace.load), "
                        f"got {type(sub).__name__}")
    src = open_source(source)
    if src.d != sub.d:
        raise SubspaceError(f"the subspace has d={sub.d} but the source has d={src.d}; score with a "
                            f"subspace fitted on representations from the same model and layer")
    if drop_invalid is None:
        drop_invalid = bool(sub.info.get("drop_invalid", False))
    W = sub._W()
    mean = np.ascontiguousarray(sub.mean, dtype=np.float64)
    inv_scale = sub.inv_scale
    if array_device(device) == "cuda":
        from .gpu import leverage_scores_cupy

        return check_scores(src, leverage_scores_cupy(src, sub, block_rows), 0, drop_invalid)
    out = np.empty(src.n, np.float64)
    # read-ahead: leverage_block consumes the raw block before the next one is requested
    for off, block in src.iter_blocks(block_rows, prefetch=DEFAULT_PREFETCH):
        m = block.shape[0]
        seg = out[off:off + m]
        native.leverage_block(block, mean, W, seg, inv_scale, sub.l2_normalize, src.is_bf16)
        check_scores(src, seg, off, drop_invalid)
    return out


def check_scores(src, seg: np.ndarray, off: int, drop_invalid: bool) -> np.ndarray:
    """Raise for (or NaN out) non-finite scores in ``seg`` = scores of rows ``off:off+len(seg)``.

    Non-finite input always yields a non-finite score, so one check of the scores finds it.
    """
    if np.isfinite(seg).all():
        return seg
    bad = np.flatnonzero(~np.isfinite(seg))
    rows = off + bad
    # Corrupt bytes show up here (a huge or NaN value) before their shard's checksum has been read to
    # the end: check those shards now, so corruption is reported as such and never dropped as "invalid".
    starts = np.array([s.offset for s in src.shards], dtype=np.int64)
    for si in np.unique(np.searchsorted(starts, rows, side="right") - 1).tolist():
        src.verify_shard(src.shards[si])
    if not drop_invalid:
        more = src.n - off - seg.size
        raise InvalidRowsError(
            f"{bad.size} row(s) with NaN/inf (or values too large) in the block at row {off}: "
            f"{describe_rows(src, rows)}" + (f" ({more} rows not checked yet)" if more else "")
            + ". Fix them at the source, or pass drop_invalid=True (CLI: --drop-invalid) so they "
            "get no score and are never selected.", rows)
    seg[bad] = np.nan
    return seg


def resolve_budget(budget, n: int) -> int:
    """Turn a budget into a row count.

    Parameters
    ----------
    budget : int, float or str
        A count, a fraction or a percentage. A whole number written without a decimal point
        (``100000``, ``"100000"``, ``1``, ``"1"``) is a count of rows. A number with a decimal point
        in (0, 1] (``0.16``, ``"0.16"``, ``1.0`` = every row, ``0.999`` = 99.9%) is a fraction;
        one above 1 must be whole (``100000.0`` = a count). ``"16%"`` is a percentage in (0, 100].
        Fractions round to the nearest row.
    n : int
        Rows available.

    Returns
    -------
    int
        ``1 ≤ count ≤ n``.

    Raises
    ------
    BudgetError
        Unparsable, ≤ 0, rounds to 0 rows, or more than n.
    """
    raw = budget
    if isinstance(budget, bool) or budget is None:
        raise BudgetError(f"budget {raw!r} is not a count, fraction or percentage (e.g. 100000, 0.16, '16%')")
    if isinstance(budget, str):
        s = budget.strip()
        try:  # only the parsing: the range checks below raise their own, specific BudgetError
            pct = float(s[:-1]) if s.endswith("%") else None
            if pct is None:
                budget = int(s) if s.lstrip("+-").isdigit() else float(s)
        except ValueError:
            raise BudgetError(f"budget {raw!r} is not a count, fraction or percentage "
                              f"(e.g. 100000, 0.16, '16%')") from None
        if pct is not None:
            if not (0 < pct <= 100):
                raise BudgetError(f"budget {raw!r}: a percentage must be in (0, 100]")
            return _count(pct / 100.0 * n, raw, n)
    if isinstance(budget, numbers.Integral):
        count = int(budget)
    elif isinstance(budget, numbers.Real):
        b = float(budget)
        if math.isnan(b) or math.isinf(b):
            raise BudgetError(f"budget {raw!r} is not a number")
        if 0 < b <= 1:  # a float 1.0 (or "1.0") is the whole set; the integer 1 is one row
            return _count(b * n, raw, n)
        if b != int(b):
            raise BudgetError(f"budget {raw!r}: use a whole count or a fraction in (0, 1)")
        count = int(b)
    else:
        raise BudgetError(f"budget {raw!r} is not a count, fraction or percentage (e.g. 100000, 0.16, '16%')")
    return _check_count(count, raw, n)


def check_budget(budget) -> None:
    """Raise :class:`BudgetError` if ``budget`` is not a count, fraction or percentage at all.

    The syntax check :func:`resolve_budget` makes, without knowing the number of rows: callers run
    it before any work, and resolve the count once the rows are known.
    """
    resolve_budget(budget, 1 << 62)


def _count(x: float, raw, n: int) -> int:
    count = int(math.floor(x + 0.5))
    if count < 1:
        raise BudgetError(f"budget {raw!r} of {n} rows rounds to 0 rows; give a larger fraction or a count")
    return _check_count(count, raw, n)


def _check_count(count: int, raw, n: int) -> int:
    if count <= 0:
        raise BudgetError(f"budget {raw!r} must select at least 1 row")
    if count > n:
        raise BudgetError(f"budget {raw!r} asks for {count} rows but only {n} are available; "
                          f"give at most {n} (or a fraction/percentage)")
    return count


def top_k(scores: np.ndarray, budget, chunk: int = TOPK_CHUNK) -> np.ndarray:
    """Indices of the top ``budget`` scores: descending score, ties → lower index.

    Parameters
    ----------
    scores : array_like, shape (n,), float (1-D; anything else is an error)
        NaN marks a row with no score (an invalid row); it is never selected.
    budget : int, float or str
        See :func:`resolve_budget` (fractions are of n, all rows).
    chunk : int
        Scores per native ``top_k_block`` call before the merge.

    Returns
    -------
    ndarray, shape (budget,), int64

    Raises
    ------
    BudgetError
        Budget ≤ 0, or more than the rows that have a score.
    ValueError, TypeError
        ``scores`` is not 1-D, or not numeric.
    """
    arr = np.asarray(scores)
    if arr.ndim != 1:
        raise ValueError(f"top_k: scores must be 1-D (one score per row), got shape {arr.shape}; "
                         f"pass the (n,) array leverage_scores returns")
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"top_k: scores must be a float array, got dtype {arr.dtype}")
    scores = np.ascontiguousarray(arr, dtype=np.float64)
    n = scores.size
    m = resolve_budget(budget, n)
    n_nan = n - count_scored(scores)
    if m > n - n_nan:
        raise BudgetError(f"budget {budget!r} asks for {m} rows but only {n - n_nan} of {n} rows have a "
                          f"score ({n_nan} invalid); lower the budget")
    idx = np.asarray(top_rows(scores, m, chunk)[0], dtype=np.int64)
    if n_nan and np.isnan(scores[idx]).any():
        # only possible when genuine -inf scores tie with the NaN placeholders
        keep = idx[~np.isnan(scores[idx])]
        raise BudgetError(f"budget {m} reaches rows scored -inf ({keep.size} rows have a larger score); "
                          f"lower the budget")
    return idx


def top_rows(scores: np.ndarray, m: int, chunk: int = TOPK_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, values)`` of the ``m`` largest scores, best first (ties → lower row; NaN counts as
    -inf, never ahead of a real score), with no budget checks (:func:`top_k` makes them).

    Each chunk's top (:func:`~scalselect_fast.native.top_k_block`) is merged into the running top as
    it comes: (score desc, row asc) is a total order, so this equals one merge of every chunk's
    winners without holding them all. Memory: two ``m``-long tops and one chunk.
    """
    best = None
    for a in range(0, scores.size, chunk):
        s = scores[a:a + chunk]
        if np.isnan(s).any():
            s = np.where(np.isnan(s), -np.inf, s)
        part = native.top_k_block(s, a, m)
        best = part if best is None else native.top_k_merge([best, part], m)
    return best


def rows_ranked(rank: np.ndarray, lo: int, hi: int, block: int = TOPK_CHUNK) -> np.ndarray:
    """The rows ranked ``lo <= rank < hi`` (ranks as :func:`rank_scores` gives them), best first.

    Found a block of ``rank`` at a time: memory is the rows found, not an (n,) order.

    Returns
    -------
    ndarray, shape (k,), int64
    """
    rows = [np.flatnonzero((rank[a:a + block] >= lo) & (rank[a:a + block] < hi)) + a
            for a in range(0, rank.size, block)]
    rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    return rows[np.argsort(rank[rows], kind="stable")].astype(np.int64, copy=False)


def score_order(scores: np.ndarray) -> np.ndarray:
    """The scored rows best first: descending score, ties → lower row; NaN rows (no score) left out.

    Parameters
    ----------
    scores : ndarray, shape (n,), float64

    Returns
    -------
    ndarray, shape (n_scored,), int64

    Notes
    -----
    A stable sort of the negated scores keeps equal ones in row order and puts the NaN rows last,
    where they are cut off. Memory: two (n,) 8-byte arrays and the sort's buffer; where only each
    row's rank is needed, :func:`rank_scores` gives it without them.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n_scored = count_scored(scores)
    return np.argsort(np.negative(scores), kind="stable")[:n_scored]


def count_scored(scores: np.ndarray, block: int = TOPK_CHUNK) -> int:
    """Rows with a score (not NaN), counted a block at a time (no (n,) temporaries)."""
    return sum(int(block - np.count_nonzero(np.isnan(scores[a:a + block])))
               if a + block <= scores.size else int(np.count_nonzero(~np.isnan(scores[a:])))
               for a in range(0, scores.size, block))


def rank_scores(scores: np.ndarray, base: int = 1, block: int = RANK_BLOCK) -> np.ndarray:
    """Rank of every row in the order of :func:`score_order`: ``base`` for the best row, 0 for a NaN row.

    Parameters
    ----------
    scores : ndarray, shape (n,), float64
        NaN marks a row with no score (it gets rank 0).
    base : int
        Rank of the best row (the manifest's ``RANK_BASE``).
    block : int, > 0
        About how many rows are sorted at once.

    Returns
    -------
    ndarray, shape (n,), int32 (int64 from 2**31 - base rows on)
        ``rank[score_order(scores)] == arange(base, base + n_scored)``, every other entry 0.

    Notes
    -----
    Exact, without the (n,) int64 order: the scored values are cut into ranges of about ``block``
    rows at quantiles of a strided sample; the ranges are walked from the highest values down, each
    range's rows found by one pass over the scores (in row order) and sorted stably by descending
    score, so ties keep row order within a range, and equal values never straddle two ranges (a range
    is ``lo <= s < hi``). A range holding many equal values is larger than ``block``, never wrong.
    Memory: the (n,) ranks and one range's rows; time: one pass over the scores per range.

    Examples
    --------
    >>> rank_scores(np.array([0.5, 2.0, np.nan, 0.5]))
    array([2, 1, 0, 3], dtype=int32)
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"rank_scores: scores must be 1-D, got shape {s.shape}")
    block = int(block)
    if block < 1:
        raise ValueError(f"rank_scores: block must be >= 1, got {block}")
    n = s.size
    rank = np.zeros(n, np.int32 if n < 2**31 - base else np.int64)
    n_scored = count_scored(s)
    n_ranges = -(-n_scored // block)
    edges = np.zeros(0)
    if n_ranges > 1:
        sample = s[::max(1, n // (64 * n_ranges))]
        sample = np.sort(sample[~np.isnan(sample)])
        edges = np.unique(sample[(np.arange(1, n_ranges) * sample.size) // n_ranges])[::-1]  # descending
    done, hi = 0, None
    for lo in [*edges.tolist(), None]:  # ranges lo <= s < hi, highest first; the last is s < hi
        rows = []
        for a in range(0, n, TOPK_CHUNK):
            c = s[a:a + TOPK_CHUNK]
            m = ~np.isnan(c) if lo is None else c >= lo
            if hi is not None:
                m &= c < hi
            rows.append(np.flatnonzero(m) + a)
        rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        rows = rows[np.argsort(np.negative(s[rows]), kind="stable")]
        rank[rows] = np.arange(base + done, base + done + rows.size, dtype=rank.dtype)
        done += rows.size
        hi = lo
    return rank
