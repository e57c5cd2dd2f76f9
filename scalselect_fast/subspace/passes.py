"""Streaming passes over a source: the reused compute buffer (:class:`StorePass`), the per-shard moment
and Gram passes combined by :func:`~.accumulators.tree_reduce`, and the BLAS threading that keeps
their bits independent of the thread count (shards side by side, chunks concurrently).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .. import native
from ..store import DEFAULT_PREFETCH, MatrixSource
from .accumulators import GRAM_CHUNK_ROWS, GramAccumulator, MomentAccumulator, TreeReducer, tree_reduce
from .result import SubspaceError
from .rows import bad_rows_in, InvalidTracker, source_name


@dataclasses.dataclass(frozen=True)
class PassOptions:
    """What a pass does to each block and with invalid rows.

    Attributes
    ----------
    record : bool
        Record invalid rows found in the tracker (the first pass over the data does).
    verify : bool
        Verify shard checksums while reading.
    shift : ndarray (d,) float64 or None
        Subtract this instead of the accumulator's shift (μ for the l2 pass, whose Gram is then
        unshifted).
    inv_scale : ndarray (d,) float64 or None
        Multiply the shifted rows by this (standardisation).
    l2 : bool
        Divide each transformed row by its L2 norm.
    known_bad : ndarray of int64 (sorted global rows) or None
        Rows found invalid on an earlier pass: zeroed without scanning.
    """

    record: bool = True
    verify: bool = True
    shift: np.ndarray | None = None
    inv_scale: np.ndarray | None = None
    l2: bool = False
    known_bad: np.ndarray | None = None

    def blocks(self, p: "StorePass", acc, shard):
        """``p.blocks`` over ``shard`` with these options (``acc.shift`` unless ``shift``)."""
        return p.blocks(acc.shift if self.shift is None else self.shift, verify=self.verify,
                        inv_scale=self.inv_scale, l2=self.l2, known_bad=self.known_bad, shard=shard)


#: the first pass: record invalid rows and verify checksums
FIRST_PASS = PassOptions()


def compute_dtype(src: MatrixSource):
    """float64 for every storage dtype: float32 products (2× faster) left ~1e-5 relative differences
    in the scores between CPUs' BLAS kernels and moved ranks; see :func:`native.leverage_block`."""
    return np.float64


def first_block_mean(src: MatrixSource, block_rows: int) -> np.ndarray:
    """Mean of the finite rows of the first block: the shift that keeps centring accurate."""
    for _, block in src.iter_blocks(min(block_rows, 4096)):
        b = block if not src.is_bf16 else native.decode_block(block, True)
        b = b.astype(np.float64)
        ok = np.isfinite(b).all(axis=1)
        if ok.any():
            return b[ok].mean(axis=0)
        return np.zeros(src.d)
    return np.zeros(src.d)


# --------------------------------------------------------------------------------------------------
# streaming passes
# --------------------------------------------------------------------------------------------------
class StorePass:
    """One streaming pass over the source with a reused compute buffer and invalid-row handling."""

    def __init__(self, src: MatrixSource, block_rows: int, be, tracker: InvalidTracker):
        self.src, self.block_rows, self.be, self.tracker = src, block_rows, be, tracker
        self.dtype = compute_dtype(src)
        m = max(1, min(block_rows, max(s.count for s in src.shards) if src.shards else 1))
        self.buf = be.xp.empty((m, src.d), dtype=self.dtype)
        self._norms = be.xp.empty(m, dtype=self.dtype)

    def blocks(self, shift: np.ndarray, verify: bool | None = None, inv_scale=None, l2: bool = False,
               known_bad: np.ndarray | None = None, shard=None):
        """Yield ``(offset, buf, n_valid)``: buf = transformed rows, invalid rows zeroed.

        With ``inv_scale``/``l2`` the buffer holds fully transformed rows (shift must be μ). Rows in
        ``known_bad`` (found on the first pass) are zeroed without scanning. ``shard`` limits the
        pass to one shard. Blocks come from the read-ahead reader (the raw block is only read by
        ``shift_block``, before the next one is requested, so its buffer may be reused).
        """
        it = (self.src.iter_blocks(self.block_rows, verify=verify, prefetch=DEFAULT_PREFETCH) if shard is None
              else self.src.iter_shard_blocks(shard, self.block_rows, verify=verify, prefetch=DEFAULT_PREFETCH))
        for off, block in it:
            m = block.shape[0]
            b = self.be.shift_block(block, shift, self.buf[:m], self.src.is_bf16)
            n_valid = m
            if known_bad is not None and known_bad.size:
                lo, hi = np.searchsorted(known_bad, [off, off + m])
                if hi > lo:
                    b[self.be.asarray(known_bad[lo:hi] - off)] = 0
                    n_valid -= int(hi - lo)
            if inv_scale is not None:
                b *= self.be.asarray(inv_scale, dtype=self.dtype)
            if l2:
                norms = self._norms[:m]
                xp = self.be.xp
                xp.sqrt(xp.einsum("ij,ij->i", b, b), out=norms)
                xp.divide(b, xp.where(norms > 0, norms, 1)[:, None], out=b)
            yield off, b, n_valid

    def fix(self, off: int, b: np.ndarray, record: bool) -> int:
        """A partial sum was non-finite: find the rows, raise or zero them; returns rows zeroed."""
        bad = bad_rows_in(b)
        if bad.size == 0:
            raise SubspaceError(f"{source_name(self.src)}: values too large: a product overflowed in the "
                                f"block at row {off} although every value is finite; rescale the "
                                f"representations (e.g. divide by their max norm)")
        self.tracker.found(off, bad, record)
        b[self.be.asarray(bad)] = 0
        return int(bad.size)


# --------------------------------------------------------------------------------------------------
# exact solver
# --------------------------------------------------------------------------------------------------
class _SingleThreadedBlas:
    """Run the pass's BLAS calls single-threaded, and the chunk Gram products side by side in threads.

    Why: OpenBLAS gives different bits for the same product with a different thread count (it
    splits the work differently), so a node with 2 cores, a Dask worker with 1 thread and a node
    with 64 would all disagree in the last bits, and leverage ranks can flip at near-ties. With one
    thread per product the bits depend only on the chunk; the cores are kept busy by computing the
    chunks of a block concurrently (as many threads as BLAS had), which also avoids OpenBLAS's
    thread synchronisation on a loaded machine. Needs threadpoolctl; without it the products run
    as before (correct, but the bits then depend on the BLAS thread count).
    """

    def __init__(self):
        self.threads = 1
        self._limit = None
        self._pool = None
        self._bufs: list[np.ndarray] = []

    def __enter__(self):
        try:
            from threadpoolctl import threadpool_info, threadpool_limits
        except ImportError:  # pragma: no cover - threadpoolctl is a dependency
            return self
        blas = [i.get("num_threads", 1) for i in threadpool_info() if i.get("user_api") == "blas"]
        self.threads = max(blas, default=1)
        self._limit = threadpool_limits(limits=1, user_api="blas")
        if self.threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="scalselect-gram")
        return self

    def __exit__(self, *exc):
        if self._pool is not None:
            self._pool.shutdown()
        if self._limit is not None:
            self._limit.unregister()
        return False

    def grams(self, acc: GramAccumulator, chunks: list):
        """``cᵀc`` of each chunk (buffers reused across calls; not yet accumulated), in
        chunk order; each must be accumulated before the next is taken."""
        if self._pool is None or len(chunks) < 2 or acc.xp is not np or not acc.default_matmul:
            return _SequentialGrams.grams(acc, chunks)
        while len(self._bufs) < len(chunks):
            self._bufs.append(np.empty((acc.d, acc.d), dtype=chunks[0].dtype))
        outs = [b if b.dtype == c.dtype else np.empty((acc.d, acc.d), c.dtype) for b, c in zip(self._bufs, chunks)]
        list(self._pool.map(lambda i: np.matmul(chunks[i].T, chunks[i], out=outs[i]), range(len(chunks))))
        return outs


def gram_pass(p: StorePass, acc: GramAccumulator, opts: PassOptions = FIRST_PASS, *, shards=None,
               reducer: TreeReducer | None = None, after_shard=None) -> None:
    """Stream ``p`` into ``acc`` (blocks transformed as ``opts`` says).

    Each shard is summed into its own partial, and the partials are combined by
    :func:`tree_reduce`: the same arithmetic, in the same order, as the per-shard tasks of
    :mod:`scalselect_fast.distributed`; with single-threaded products (:class:`_SingleThreadedBlas`)
    a cluster fit is bit-identical to this one whatever the thread counts.

    ``shards`` (default: all of ``p.src``'s) with a ``reducer`` holding the partials of the shards
    before them resumes a checkpointed pass; ``after_shard(shard, reducer)`` is called in shard
    order once each shard's partial is in the reducer (for checkpoints and progress).
    """
    reducer = reducer or TreeReducer(GramAccumulator.merge)
    shards = p.src.shards if shards is None else list(shards)
    with _SingleThreadedBlas() as blas:
        def partial(q: StorePass, shard, products):
            part = acc.empty_like()
            _gram_shard(q, part, shard, opts, products)
            return part

        workers = _shards_side_by_side(blas, acc, shards, p.block_rows)
        if workers:
            parts = _ordered_parallel(blas, workers, shards, lambda q, shard: partial(q, shard, _SEQUENTIAL_GRAMS),
                                      lambda: StorePass(p.src, p.block_rows, p.be, p.tracker))
        else:
            parts = (partial(p, shard, blas) for shard in shards)
        for shard, part in zip(shards, parts):
            reducer.push(part)
            if after_shard is not None:
                after_shard(shard, reducer)
        acc.merge(reducer.result())


class _SequentialGrams:
    """``grams`` of :class:`_SingleThreadedBlas` without its pool: for a thread that is itself one
    of the pool's workers (shards side by side), or no pool at all."""

    @staticmethod
    def grams(acc: GramAccumulator, chunks: list):
        """One chunk's product at a time, lazily, in the accumulator's reused buffer: the caller
        adds each before asking for the next (no d×d copy per chunk)."""
        return (acc.chunk_gram(c) for c in chunks)


_SEQUENTIAL_GRAMS = _SequentialGrams()


def _shards_side_by_side(blas: _SingleThreadedBlas, acc: GramAccumulator, shards, block_rows: int) -> int:
    """How many shards to sum concurrently instead of a block's chunks (0: none).

    A shard's chunks are what the cores share out; shards smaller than ``threads`` chunks (the
    pipeline writes 4096-row shards, one chunk each), or blocks of fewer chunks than a many-core
    node has cores, would leave cores idle. Each shard's partial is still summed by one thread in
    chunk order, so the bits do not change. Each concurrent shard holds its own float64 block
    buffer, read-ahead buffers and d×d float64 partial, so their number is capped to keep that
    extra memory under :data:`SIDE_BY_SIDE_MAX_BYTES`.
    """
    if blas._pool is None or acc.xp is not np or not acc.default_matmul or len(shards) < 2:
        return 0
    per_block = min(block_rows, max(s.count for s in shards))
    if -(-per_block // GRAM_CHUNK_ROWS) >= blas.threads:
        return 0
    per_shard = 8 * acc.d * acc.d + per_block * acc.d * (4 + 4 * (DEFAULT_PREFETCH + 1))
    workers = min(blas.threads, len(shards), SIDE_BY_SIDE_MAX_BYTES // max(per_shard, 1))
    return workers if workers >= 2 else 0


#: extra memory the exact fit may spend summing shards side by side (see _shards_side_by_side)
SIDE_BY_SIDE_MAX_BYTES = 2 * 2**30


def _ordered_parallel(blas: _SingleThreadedBlas, workers: int, shards, work, make_pass):
    """Yield ``work(pass, shard)`` for each shard in order, at most ``workers`` shards in flight,
    each worker thread with its own :class:`StorePass` (buffers)."""
    import threading

    local = threading.local()

    def run(shard):
        if not hasattr(local, "p"):
            local.p = make_pass()
        return work(local.p, shard)

    pending = []
    for shard in shards:
        pending.append(blas._pool.submit(run, shard))
        if len(pending) >= workers:
            yield pending.pop(0).result()
    for fut in pending:
        yield fut.result()


def _gram_shard(p: StorePass, acc: GramAccumulator, shard, opts: PassOptions, blas) -> None:
    """One shard into ``acc``, chunk products from ``blas.grams``; invalid rows raise or are zeroed."""
    if acc.xp is not np and _gram_shard_unchecked(p, acc, shard, opts):
        return
    for off, b, n_valid in opts.blocks(p, acc, shard):
        m = b.shape[0]
        zeroed_total = m - n_valid
        starts = list(range(0, m, GRAM_CHUNK_ROWS))
        chunks = [b[a:a + GRAM_CHUNK_ROWS] for a in starts]
        for a, chunk, g in zip(starts, chunks, blas.grams(acc, chunks)):
            # Non-finite input shows on the diagonal (a sum of squares cannot cancel to finite).
            zeroed = 0
            if not bool(acc.xp.isfinite(acc.xp.diagonal(g)).all()):
                zeroed = p.fix(off + a, chunk, opts.record)
                g = acc.chunk_gram(chunk)
            acc.add_chunk(chunk, g, chunk.shape[0] - zeroed)
        acc.n -= zeroed_total


def _gram_shard_unchecked(p: StorePass, acc: GramAccumulator, shard, opts: PassOptions) -> bool:
    """Device fast path: accumulate the whole shard without reading anything back, then check once.

    On a GPU, asking per chunk whether the Gram's diagonal is finite would make the host wait for
    every product, so the copy of the next block could never overlap them. Here the finiteness of
    every chunk's diagonal is folded into a device flag and read once, at the end of the shard.
    Returns False (and leaves ``acc`` as it was) when the shard holds a non-finite value; the
    caller then streams the shard again through the checked path, which finds and reports the rows.
    """
    xp = acc.xp
    saved = (acc.n, acc.colsum.copy(), acc.sumsq.copy(), acc.gram.copy())
    finite = xp.ones((), dtype=bool)
    for off, b, n_valid in opts.blocks(p, acc, shard):
        for a in range(0, b.shape[0], GRAM_CHUNK_ROWS):
            chunk = b[a:a + GRAM_CHUNK_ROWS]
            g = acc.chunk_gram(chunk)
            finite &= xp.isfinite(xp.diagonal(g)).all()
            acc.add_chunk(chunk, g, chunk.shape[0])
        acc.n -= b.shape[0] - n_valid
    if bool(finite):
        return True
    acc.n, acc.colsum, acc.sumsq, acc.gram = saved
    return False


def moment_pass(p: StorePass, acc: MomentAccumulator, opts: PassOptions = FIRST_PASS) -> None:
    """Moments of ``p`` into ``acc`` (rows shifted only), per-shard partials combined by
    :func:`tree_reduce`; ``opts.record``/``opts.verify`` as in :class:`PassOptions`."""
    def shard_partials():
        for shard in p.src.shards:
            part = MomentAccumulator.empty_like(acc)  # moments only, whatever acc also sums
            _moment_shard(p, part, shard, opts)
            yield part

    with _SingleThreadedBlas():  # same bits on one node and on 1-thread Dask workers
        acc.merge(tree_reduce(shard_partials(), MomentAccumulator.merge))


def _moment_shard(p: StorePass, acc: MomentAccumulator, shard, opts: PassOptions) -> None:
    for off, b, n_valid in p.blocks(acc.shift, verify=opts.verify, shard=shard):
        m = b.shape[0]
        xp = acc.xp
        ones = xp.ones(m, dtype=b.dtype)
        cs = ones @ b
        sq = xp.einsum("ij,ij->j", b, b)
        if not (bool(xp.isfinite(cs).all()) and bool(xp.isfinite(sq).all())):
            n_valid -= p.fix(off, b, opts.record)
            cs = ones @ b
            sq = xp.einsum("ij,ij->j", b, b)
        acc.n += n_valid
        acc.colsum += cs
        acc.sumsq += sq


