"""Picklable, mergeable float64 partial sums (moments, shifted Gram, sketch) and the fixed-shape
:func:`tree_reduce` that combines per-shard partials identically on one node and on Dask.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np

from .backends import device_gram_product, device_syrk, array_namespace, xp_module, array_module_name
from .result import SubspaceError

#: rows per BLAS product inside a block; bounds the rounding of each partial Gram (its error grows
#: with the inner dimension) while keeping the product large enough to run at speed.
GRAM_CHUNK_ROWS = 8192
#: ``auto`` (and the randomized solver's early hand-over) use the exact solver only while its d×d
#: float64 Gram takes at most this many bytes
EXACT_GRAM_MAX_BYTES = 2 * 2**30
# --------------------------------------------------------------------------------------------------
# accumulators (picklable, mergeable)
# --------------------------------------------------------------------------------------------------
def tree_reduce(items: Iterable[Any], combine: Callable[[Any, Any], Any]):
    """Combine ``items`` pairwise in a fixed tree whose shape depends only on ``len(items)``.

    A binary counter over the items in order: two partials of equal height are combined as soon as
    both exist (left = earlier rows), and what remains is folded right to left at the end. It
    streams (at most log2(n)+1 partials are alive), and ``combine`` may return a Dask future just
    as well as a value, so the single-node fit and the cluster build the identical tree.

    Parameters
    ----------
    items : iterable
        Non-empty; element i covers rows before those of element i+1.
    combine : callable(left, right) -> combined

    Returns
    -------
    The combination of all items.

    Examples
    --------
    >>> tree_reduce(list("abcde"), lambda a, b: f"({a}{b})")
    '(((ab)(cd))e)'
    """
    reducer = TreeReducer(combine)
    for item in items:
        reducer.push(item)
    return reducer.result()


class TreeReducer:
    """The state of :func:`tree_reduce` between items, so a long reduction can be checkpointed.

    ``stack`` holds ``(height, partial)`` pairs, earliest rows first; a reducer rebuilt from a saved
    stack and fed the remaining items builds the same tree as one that never stopped.

    Parameters
    ----------
    combine : callable(left, right) -> combined
    stack : list of (int, partial), optional
        A saved :attr:`stack` to resume from.
    """

    def __init__(self, combine: Callable[[Any, Any], Any], stack: list[tuple[int, Any]] | None = None):
        self.combine = combine
        self.stack: list[tuple[int, Any]] = list(stack or [])

    def push(self, item) -> None:
        """Add the partial of the next rows (a binary counter: equal heights combine at once)."""
        height = 0
        while self.stack and self.stack[-1][0] == height:
            _, left = self.stack.pop()
            item = self.combine(left, item)
            height += 1
        self.stack.append((height, item))

    def result(self):
        """Fold what remains right to left and return the combination (empties the reducer)."""
        if not self.stack:
            raise ValueError("tree_reduce needs at least one item")
        _, out = self.stack.pop()
        while self.stack:
            _, left = self.stack.pop()
            out = self.combine(left, out)
        return out


class MomentAccumulator:
    """Row count, shifted column sums and shifted column sums of squares, in float64.

    Parameters
    ----------
    d : int
    shift : ndarray, shape (d,), float64
        Subtracted from every row before summing (choose something close to the mean, e.g. the
        first block's mean, so the centred second moments do not cancel catastrophically).
    xp : {"numpy", "cupy"} or the module, optional
        Array namespace of the sums (and of the blocks passed to ``update``); default numpy.
        Stored by name so the accumulator pickles.
    """

    def __init__(self, d: int, shift, xp=None):
        self._xp_name = array_module_name(xp)
        xp = self.xp
        self.d = int(d)
        self.shift = xp.asarray(shift, dtype=xp.float64).reshape(self.d).copy()
        self.n = 0
        self.colsum = xp.zeros(self.d)
        self.sumsq = xp.zeros(self.d)

    @property
    def xp(self):
        return xp_module(self._xp_name)

    def empty_like(self) -> "MomentAccumulator":
        """A new, empty accumulator with this one's width, shift and array namespace (a per-shard
        partial to :meth:`merge` back)."""
        return MomentAccumulator(self.d, self.shift, xp=self._xp_name)

    def update(self, buf: np.ndarray, n_rows: int | None = None) -> "MomentAccumulator":
        """Add a block already shifted (``buf = block - shift``); ``n_rows`` excludes zeroed rows."""
        xp = self.xp
        buf = xp.asarray(buf)
        self.n += int(buf.shape[0] if n_rows is None else n_rows)
        ones = xp.ones(buf.shape[0], dtype=buf.dtype)
        self.colsum += ones @ buf
        self.sumsq += xp.einsum("ij,ij->j", buf, buf)
        return self

    def update_block(self, block: np.ndarray, bf16: bool = False) -> "MomentAccumulator":
        """Convenience for distributed callers: shift a raw storage-dtype block and add it."""
        be = array_namespace(self._xp_name)
        buf = be.xp.empty(block.shape, np.float64)
        be.shift_block(np.ascontiguousarray(block), self.shift, buf, bf16)
        return self.update(buf)

    def _reshifted(self, new_shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Σ(x-t) = c + n(s-t);  Σ(x-t)² = q + 2(s-t)c + n(s-t)²
        e = self.shift - self.xp.asarray(new_shift)
        return self.colsum + self.n * e, self.sumsq + 2 * e * self.colsum + self.n * e * e

    def merge(self, other: "MomentAccumulator") -> "MomentAccumulator":
        """Add ``other`` into ``self`` (re-shifting it to ``self.shift`` if needed) and return self."""
        if other.d != self.d:
            raise SubspaceError(f"cannot merge moments of width {other.d} into width {self.d}")
        c, q = other._reshifted(self.shift)
        self.n += other.n
        self.colsum += c
        self.sumsq += q
        return self

    @property
    def mean(self) -> np.ndarray:
        return self.shift + self.colsum / max(self.n, 1)

    @property
    def centred_sumsq(self) -> np.ndarray:
        """Σ (x_j − μ_j)² per column (≥ 0)."""
        return self.xp.maximum(self.sumsq - self.colsum ** 2 / max(self.n, 1), 0.0)


class GramAccumulator(MomentAccumulator):
    """:class:`MomentAccumulator` plus the shifted Gram ``Σ (x−s)(x−s)ᵀ`` (d×d float64).

    Each chunk of at most ``GRAM_CHUNK_ROWS`` rows is multiplied by BLAS in the buffer's dtype
    (float64 in every fit: float32 products, 2× faster on AVX2, left ~1e-5 relative differences in
    the scores between CPUs' BLAS kernels) and added into the float64 accumulator, so the rounding
    error does not grow with N.
    """

    def __init__(self, d: int, shift, matmul=None, xp=None):
        super().__init__(d, shift, xp=xp)
        self.gram = self.xp.zeros((self.d, self.d))
        self._matmul = matmul
        self._g32: np.ndarray | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_g32"] = None
        state["_matmul"] = None
        return state

    def empty_like(self) -> "GramAccumulator":
        """A new, empty accumulator with this one's width, shift, array namespace and product."""
        return GramAccumulator(self.d, self.shift, matmul=self._matmul, xp=self._xp_name)

    @property
    def default_matmul(self) -> bool:
        """True when the chunk products are the array namespace's own ``matmul`` (no custom one)."""
        return self._matmul in (None, self.xp.matmul)

    def chunk_gram(self, chunk: np.ndarray) -> np.ndarray:
        """``chunkᵀ chunk`` in the chunk's dtype into a reused buffer (not yet accumulated)."""
        if self._g32 is None or self._g32.dtype != chunk.dtype:
            self._g32 = self.xp.empty((self.d, self.d), dtype=chunk.dtype)
        if self.xp is not np and self._matmul in (None, self.xp.matmul) and device_gram_product() == "syrk":
            return device_syrk(self.xp, chunk, self._g32)
        mm = self._matmul or self.xp.matmul
        mm(chunk.T, chunk, out=self._g32)  # numpy routes aᵀa to BLAS syrk
        return self._g32

    def add_chunk(self, chunk: np.ndarray, g: np.ndarray, n_rows: int) -> None:
        """Accumulate a chunk whose Gram ``g`` was checked finite."""
        self.n += int(n_rows)
        self.colsum += self.xp.ones(chunk.shape[0], dtype=chunk.dtype) @ chunk
        self.sumsq += self.xp.diagonal(g)
        self.gram += g

    def update(self, buf: np.ndarray, n_rows: int | None = None) -> "GramAccumulator":
        """Add a shifted block (``buf = block - shift``; rows to exclude must be zero)."""
        buf = self.xp.asarray(buf)
        m = buf.shape[0]
        for a in range(0, m, GRAM_CHUNK_ROWS):
            chunk = buf[a:a + GRAM_CHUNK_ROWS]
            g = self.chunk_gram(chunk)
            self.add_chunk(chunk, g, chunk.shape[0])
        if n_rows is not None:
            self.n += int(n_rows) - m
        return self

    def merge(self, other: "GramAccumulator") -> "GramAccumulator":
        if other.d != self.d:
            raise SubspaceError(f"cannot merge a Gram of width {other.d} into width {self.d}")
        # Σ(x-t)(x-t)ᵀ = G + e cᵀ + c eᵀ + n e eᵀ with e = s - t
        xp = self.xp
        e = xp.asarray(other.shift) - self.shift
        oc = xp.asarray(other.colsum)
        g = xp.asarray(other.gram) + xp.outer(e, oc) + xp.outer(oc, e) + other.n * xp.outer(e, e)
        super().merge(other)
        self.gram += g
        return self

    def centred_gram(self) -> np.ndarray:
        """``Σ (x−μ)(x−μ)ᵀ`` (d×d float64, symmetric)."""
        delta = self.colsum / max(self.n, 1)
        g = self.gram - self.n * self.xp.outer(delta, delta)
        return (g + g.T) * 0.5


class SketchAccumulator(MomentAccumulator):
    """``Z = Σ Bᵀ (B Q)`` for shifted blocks ``B = X − s`` and a fixed d×ℓ ``Q`` (float64 sum).

    With ``moments=True`` it also accumulates the column sums/squares (the randomized solver's
    first pass). ``centred_product()`` applies the centring correction ``− n δ (δᵀ Q)``.
    """

    def __init__(self, d: int, shift, Q, moments: bool = True, matmul=None, dtype=np.float64, xp=None):
        super().__init__(d, shift, xp=xp)
        self.Q = self.xp.asarray(Q, dtype=np.float64)
        self.Qc = self.Q.astype(dtype)
        self.Z = self.xp.zeros((self.d, self.Q.shape[1]))
        self.moments = moments
        self._matmul = matmul
        self._t: np.ndarray | None = None
        self._z: np.ndarray | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_t=None, _z=None, _matmul=None)
        return state

    def products(self, buf: np.ndarray) -> np.ndarray:
        """``bufᵀ (buf Q)`` in the buffer's dtype, into reused buffers (not yet accumulated)."""
        m, ell = buf.shape[0], self.Q.shape[1]
        if self._t is None or self._t.shape[0] < m or self._t.dtype != buf.dtype:
            self._t = self.xp.empty((m, ell), buf.dtype)
            self._z = self.xp.empty((self.d, ell), buf.dtype)
        mm = self._matmul or self.xp.matmul
        t = self._t[:m]
        mm(buf, self.Qc if self.Qc.dtype == buf.dtype else self.Q.astype(buf.dtype), out=t)
        mm(buf.T, t, out=self._z)
        return self._z

    def add(self, buf: np.ndarray, z: np.ndarray, n_rows: int) -> None:
        self.Z += z
        if self.moments:
            super().update(buf, n_rows)
        else:
            self.n += int(n_rows)

    def update(self, buf, n_rows=None):
        buf = self.xp.asarray(buf)
        self.add(buf, self.products(buf), buf.shape[0] if n_rows is None else n_rows)
        return self

    def merge(self, other: "SketchAccumulator") -> "SketchAccumulator":
        if other.Z.shape != self.Z.shape:
            raise SubspaceError("cannot merge sketches of different shapes")
        if not bool(self.xp.array_equal(self.xp.asarray(other.shift), self.shift)):
            raise SubspaceError("sketch partials must share one shift (use the same shift for every shard)")
        self.Z += self.xp.asarray(other.Z)
        if self.moments:
            super().merge(other)
        else:
            self.n += other.n
        return self

    def centred_product(self, delta: np.ndarray, n: int) -> np.ndarray:
        """``AᵀA Q`` for the centred operator: ``Z − n δ (δᵀ Q)``."""
        delta = self.xp.asarray(delta)
        return self.Z - n * self.xp.outer(delta, delta @ self.Q)


