"""Streaming fit of the dominant subspace of a centred N×d representation matrix.

This module turns a :class:`~scalselect_fast.store.MatrixSource` (ndarray, memmap, ``.npy`` or
store directory) into a :class:`Subspace`: the column mean, the top-k right singular vectors V_k,
the singular values, and how they were computed. Memory is O(d² + block) for the exact solver and
O(d·ℓ + block) for the randomized one; the N×d matrix is never materialised, centred or not.
Scoring (leverage) and top-k live in :mod:`scalselect_fast.scoring`; this module does not select.

The matrix the method defines (ScalSelect, arXiv 2602.11636) is ``A = norm(scale(X - 1μᵀ))``:
centred, optionally divided by the column standard deviation (``standardize``), optionally with each
row divided by its L2 norm (``l2_normalize``), in that order. k is the smallest number of singular
values of A whose σ² sum reaches ``energy`` × ‖A‖_F² (the *total* energy, not the energy of the
computed components).

Solvers
-------
exact
    One pass: column sums and the d×d Gram of the shifted rows ``x - s`` (s = mean of the first
    block, so centring by a later correction stays accurate), then ``eigh``. Each row chunk's
    product ``Bᵀ B`` is formed by BLAS in the block's compute dtype (float32 for fp16/bf16/fp32
    input, float64 for float64 input) and *accumulated in float64* across chunks; see
    :class:`GramAccumulator`. With ``l2_normalize`` the row norms need μ (and the scale) first, so
    a cheap moments pass comes before the Gram pass (2 passes).
randomized
    Subspace iteration with Rayleigh-Ritz on the centred operator, never forming it:
    ``AᵀA Q = BᵀB Q − n δ (δᵀQ)`` with ``B = X − 1sᵀ`` and ``δ = μ − s``. Each pass streams the
    data once (``T = B Q``, ``Z += Bᵀ T``). The first pass also collects the moments (μ, scale,
    the exact total energy). The sketch width ℓ starts at ``k + oversample`` (or 64 for an
    energy target) and grows, keeping the current basis, until the Ritz energy in the sketch
    reaches ``energy`` × total with ``oversample`` spare columns (growing 1.5× at a time); then ``n_iter`` further power
    iterations (QR re-orthonormalisation each time) refine it. Deterministic for a fixed ``seed``.
    It stops when k is stable and the top-k Ritz values moved < 1e-6 (relative) in the last pass.
    When the sketch would need more than d/2 columns (d > 256), or the Ritz spectrum extrapolated
    after a pass says the remaining passes at the width the target needs would cost more than one
    Gram pass, or it has not converged in 10 passes, the exact solver finishes the fit; ``info``
    records ``randomized_gave_up`` with the reason and the passes spent.
    Reference: Halko, Martinsson & Tropp (2011), Alg. 4.4 / 5.1, applied to ``AᵀA``.
auto
    Exact when d ≤ 4096 (the Gram is small and one pass is cheapest) or when the flop model
    ``N·d² (Gram)`` beats ``4·N·d·ℓ·passes`` (sketch); randomized otherwise and whenever the d×d
    float64 Gram would exceed 2 GiB. The choice and the reason are recorded in ``Subspace.info``.

Accumulators for distributed fits
---------------------------------
:class:`MomentAccumulator` (n, shifted column sums and sums of squares), :class:`GramAccumulator`
(the same plus the shifted Gram) and :class:`SketchAccumulator` (``Σ Bᵀ(B Q)``) are plain, picklable
objects with ``update(block)``, ``merge(other)`` and a finaliser. ``merge`` is associative and
commutative up to float64 rounding (partials with different shifts are re-shifted exactly), so a
tree reduction of per-shard partials equals one sequential pass to ~1e-12 relative. Recipe for a
Dask fit (exact, no l2)::

    shift = first_block_mean                       # any shift close to μ (merge re-shifts exactly)
    parts = [GramAccumulator(d, shift).update_shard(src, shard) for shard in src.shards]
    acc = tree_reduce(parts, GramAccumulator.merge)  # fixed tree: bit-identical to fit_subspace
    fields = subspace_from_gram(acc.centred_gram(), n=acc.n, mean=acc.mean, scale=None,
                                l2_normalize=False, energy=0.9, k=None)
    sub = Subspace(solver="exact", passes=1, **fields)

Array namespace
---------------
Both solvers are written against a small backend object (:func:`_namespace`) holding the array
module ``xp`` (numpy here; CuPy for the GPU issue), a pluggable ``matmul``, ``eigh`` and the
decode+shift of a host block into a reused device buffer. The accumulators take ``xp=`` and create
every array through it; the per-block work (shift, products, finiteness checks, row norms) stays in
``xp``; only d-sized results (mean, scale, the d×ℓ sketch for its QR) come back to the host. The
d×d Gram stays in ``xp`` for the eigensolver. The CuPy backend (:class:`_CupyBackend`) is run by
``tests/test_gpu.py`` on a GPU node (``benchmarks/gpu_check.sh``; those tests skip on CPU).
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from . import native
from .atomic import atomic_write_bytes
from .store import DEFAULT_BLOCK_ROWS, DEFAULT_PREFETCH, MatrixSource, StoreError, open_source

__all__ = [
    "Subspace",
    "fit_subspace",
    "subspace_from_gram",
    "SubspaceError",
    "InvalidRowsError",
    "MomentAccumulator",
    "GramAccumulator",
    "SketchAccumulator",
    "choose_solver",
    "tree_reduce",
]

SUBSPACE_FORMAT = "scalselect-subspace"
SUBSPACE_VERSION = 1
#: rows per BLAS product inside a block; bounds the float32 rounding of each partial Gram (its
#: error grows with the inner dimension) while keeping the product large enough to run at speed.
GRAM_CHUNK_ROWS = 8192
#: above this width the randomized solver hands over to the exact one once its sketch needs > d/2
SKETCH_SWITCH_MIN_D = 256
#: ``auto`` (and the randomized solver's early hand-over) use the exact solver only while its d×d
#: float64 Gram takes at most this many bytes
EXACT_GRAM_MAX_BYTES = 2 * 2**30
#: a column whose variance is below this fraction of the largest column variance is "constant"
ZERO_VARIANCE_RTOL = 1e-10


class SubspaceError(ValueError):
    """Bad input to the fit (too few rows, zero variance, bad energy/k, ...). Says what to do."""


class InvalidRowsError(SubspaceError):
    """Rows with NaN/inf (or values too large for the compute dtype).

    Attributes
    ----------
    rows : ndarray of int64
        Global indices of the offending rows found (all of them when raised at the end of a pass).
    """

    def __init__(self, message: str, rows: np.ndarray):
        super().__init__(message)
        self.rows = rows


# --------------------------------------------------------------------------------------------------
# array namespace
# --------------------------------------------------------------------------------------------------
class _NumpyBackend:
    """Host backend: numpy arrays, OpenBLAS products, the native decode+shift kernel."""

    name = "numpy"

    def __init__(self, matmul=None):
        self.xp = np
        self.matmul = matmul or np.matmul

    def to_host(self, a) -> np.ndarray:
        return np.asarray(a)

    def asarray(self, a, dtype=None):
        return np.asarray(a, dtype=dtype)

    def shift_block(self, block: np.ndarray, shift64: np.ndarray, out: np.ndarray, bf16: bool) -> np.ndarray:
        """``out[:m] = block - shift`` in ``out``'s dtype (decode fp16/bf16 on the fly)."""
        if out.dtype == np.float32:
            return native.center_block(block, shift64, out, bf16)
        # float64 input keeps float64 products: the user stored that precision on purpose.
        np.subtract(block, shift64, out=out)
        return out

    def eigh(self, a):
        return np.linalg.eigh(a)

    def qr(self, a):
        return np.linalg.qr(a)[0]


class _CupyBackend(_NumpyBackend):  # pragma: no cover - needs CUDA + CuPy
    """Device backend: the same solver code over ``cupy`` (cuBLAS products, float64 accumulators).

    Raw storage-dtype blocks (fp16/bf16 are half the bytes of fp32) go through two pinned host
    buffers to the device on a separate copy stream, and are decoded and shifted there; the copy of
    block i+1 overlaps the products of block i, which were queued asynchronously on the compute
    stream. See :class:`scalselect_fast.gpu.DeviceStaging`.
    """

    name = "cupy"

    def __init__(self, matmul=None):
        import cupy  # noqa: F401  (ImportError -> clear message in _namespace)

        from .gpu import DeviceStaging

        self.xp = cupy
        self.matmul = matmul or cupy.matmul
        self._staging = DeviceStaging()

    def to_host(self, a) -> np.ndarray:
        return self.xp.asnumpy(a)

    def asarray(self, a, dtype=None):
        return self.xp.asarray(a, dtype=dtype)

    def shift_block(self, block, shift64, out, bf16):
        return self._staging.shift_block(block, shift64, out, bf16)

    def eigh(self, a):
        return self.xp.linalg.eigh(a)

    def qr(self, a):
        return self.xp.linalg.qr(a)[0]


def _namespace(name: str = "numpy", matmul=None):
    """Backend for ``name`` in {"numpy", "cupy"} (``matmul`` overrides the product)."""
    if name in ("numpy", "cpu", None):
        return _NumpyBackend(matmul)
    if name in ("cupy", "cuda"):
        try:
            return _CupyBackend(matmul)
        except ImportError as exc:
            raise SubspaceError(f"the CuPy backend needs cupy ({exc}); install scalselect-fast[gpu] "
                                f"or use device='cpu'") from exc
    raise SubspaceError(f"unknown array backend {name!r}; use 'numpy' or 'cupy'")


def _xp_name(xp) -> str:
    if xp is None:
        return "numpy"
    if isinstance(xp, str):
        return {"cpu": "numpy", "cuda": "cupy"}.get(xp, xp)
    return xp.__name__.split(".")[0]


def _xp_module(name: str):
    if name == "numpy":
        return np
    import importlib

    return importlib.import_module(name)


# --------------------------------------------------------------------------------------------------
# bad rows
# --------------------------------------------------------------------------------------------------
def describe_rows(src: MatrixSource, rows, limit: int = 5) -> str:
    """Human description of global rows: ``row 12 (id 'a', shard 'shard-00000'), ...``."""
    rows = np.asarray(rows, dtype=np.int64)
    parts = []
    ids_cache: dict[str, list[str]] = {}
    for r in rows[:limit]:
        shard = next(s for s in src.shards if s.offset <= r < s.offset + s.count)
        sid = str(r)
        try:
            if hasattr(src, "_ids") and getattr(src, "_ids") is not None:
                sid = src._ids[r]
            elif shard.ids_path is not None:
                if shard.name not in ids_cache:
                    from .store import _read_ids

                    ids_cache[shard.name] = _read_ids(shard)
                sid = ids_cache[shard.name][r - shard.offset]
        except (OSError, StoreError):  # an id lookup must not hide the real error
            pass
        parts.append(f"row {int(r)} (id {sid!r}, shard {shard.name!r})")
    more = f" and {rows.size - limit} more" if rows.size > limit else ""
    return ", ".join(parts) + more


def _bad_rows_in(buf: np.ndarray) -> np.ndarray:
    """Local indices of rows of ``buf`` with a non-finite value (only called when a sum was)."""
    if isinstance(buf, np.ndarray):
        return np.flatnonzero(~np.isfinite(buf).all(axis=1))
    xp = _xp_module(type(buf).__module__.split(".")[0])  # device array: scan there, indices to host
    return np.asarray(xp.asnumpy(xp.flatnonzero(~xp.isfinite(buf).all(axis=1))), dtype=np.int64)


class _InvalidTracker:
    """Collects invalid rows during the first pass; raises or drops per ``drop_invalid``."""

    def __init__(self, src: MatrixSource, drop: bool):
        self.src, self.drop = src, drop
        self.rows: list[np.ndarray] = []

    def found(self, offset: int, local: np.ndarray, record: bool) -> None:
        if record:
            self.rows.append(offset + local.astype(np.int64))
        if not self.drop:
            rows = offset + local.astype(np.int64)
            raise InvalidRowsError(
                f"{local.size} row(s) with NaN/inf (or values too large for float32) in this block: "
                f"{describe_rows(self.src, rows)}. Fix or remove them at the source, or pass "
                f"drop_invalid=True (CLI: --drop-invalid) to exclude them from the fit and the "
                f"selection (they are then listed in the report).", rows)

    def all_rows(self) -> np.ndarray:
        """Every recorded row, sorted (shards may be scanned side by side)."""
        return np.sort(np.concatenate(self.rows)) if self.rows else np.empty(0, np.int64)


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
    stack: list[tuple[int, Any]] = []
    for item in items:
        height = 0
        while stack and stack[-1][0] == height:
            _, left = stack.pop()
            item = combine(left, item)
            height += 1
        stack.append((height, item))
    if not stack:
        raise ValueError("tree_reduce needs at least one item")
    _, out = stack.pop()
    while stack:
        _, left = stack.pop()
        out = combine(left, out)
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
        self._xp_name = _xp_name(xp)
        xp = self.xp
        self.d = int(d)
        self.shift = xp.asarray(shift, dtype=xp.float64).reshape(self.d).copy()
        self.n = 0
        self.colsum = xp.zeros(self.d)
        self.sumsq = xp.zeros(self.d)

    @property
    def xp(self):
        return _xp_module(self._xp_name)

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
        be = _namespace(self._xp_name)
        buf = be.xp.empty(block.shape, np.float64 if block.dtype == np.float64 else np.float32)
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


def _device_gram_product() -> str:
    """How a device backend forms a chunk's ``cᵀc``: ``gemm`` (default) or ``syrk`` (one triangle,
    half the flops, then mirrored), chosen by ``SCALSELECT_GPU_GRAM``.

    Measured on an H100 (benchmarks/bench_gpu.py, 8192x4096 fp32 chunks, device-resident blocks):
    the accumulator ran at 75.8 TFLOP/s aᵀa-equivalent with syrk vs 50.8 with gemm. gemm stays the
    default until a GPU run of tests/test_gpu.py confirms syrk against numpy inside the fit
    (``benchmarks/gpu_check.sh`` runs those tests both ways).
    """
    mode = os.environ.get("SCALSELECT_GPU_GRAM", "gemm").lower()
    if mode not in ("gemm", "syrk"):
        raise SubspaceError(f"SCALSELECT_GPU_GRAM={mode!r}: use 'gemm' or 'syrk'")
    return mode


def _device_syrk(xp, chunk, g):  # pragma: no cover - needs CUDA + CuPy
    """``chunkᵀ chunk`` through cuBLAS syrk into ``g`` (one triangle), returned as the full matrix."""
    from cupy import cublas

    g.fill(0)
    cublas.syrk("T", xp.ascontiguousarray(chunk), out=g, lower=False)
    full = g + g.T  # whichever triangle syrk filled, the other is zero
    full -= xp.diag(xp.diagonal(g))
    return full


class GramAccumulator(MomentAccumulator):
    """:class:`MomentAccumulator` plus the shifted Gram ``Σ (x−s)(x−s)ᵀ`` (d×d float64).

    Each chunk of at most ``GRAM_CHUNK_ROWS`` rows is multiplied by BLAS in the buffer's dtype and
    added into the float64 accumulator: float32 products of shifted data lose ~1e-7·√chunk relative
    per chunk, while float64 accumulation keeps the error from growing with N (measured: same k and
    Spearman > 0.99999 against a float64 dense SVD; see tests/test_subspace.py), at float32 BLAS
    speed (float64 products are ~2× slower on AVX2).
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

    def chunk_gram(self, chunk: np.ndarray) -> np.ndarray:
        """``chunkᵀ chunk`` in the chunk's dtype into a reused buffer (not yet accumulated)."""
        if self._g32 is None or self._g32.dtype != chunk.dtype:
            self._g32 = self.xp.empty((self.d, self.d), dtype=chunk.dtype)
        if self.xp is not np and self._matmul in (None, self.xp.matmul) and _device_gram_product() == "syrk":
            return _device_syrk(self.xp, chunk, self._g32)
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

    def update_shard(self, src: MatrixSource, shard, block_rows: int = DEFAULT_BLOCK_ROWS,
                     verify: bool = False) -> "GramAccumulator":
        """Stream one shard of ``src`` into this accumulator (the per-shard map of a tree reduction).

        Non-finite rows raise :class:`InvalidRowsError`.
        """
        be = _namespace(self._xp_name)
        buf = be.xp.empty((min(block_rows, max(shard.count, 1)), self.d),
                          np.float64 if src.dtype == "float64" else np.float32)
        for off, block in src.iter_shard_blocks(shard, block_rows, verify, prefetch=DEFAULT_PREFETCH):
            b = be.shift_block(block, self.shift, buf[:block.shape[0]], src.is_bf16)
            for a in range(0, b.shape[0], GRAM_CHUNK_ROWS):
                chunk = b[a:a + GRAM_CHUNK_ROWS]
                g = self.chunk_gram(chunk)
                if not bool(self.xp.isfinite(self.xp.diagonal(g)).all()):
                    rows = off + a + _bad_rows_in(chunk)
                    raise InvalidRowsError(f"{rows.size} row(s) with NaN/inf: {describe_rows(src, rows)}; "
                                           f"fix them or fit with drop_invalid=True", rows)
                self.add_chunk(chunk, g, chunk.shape[0])
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

    def __init__(self, d: int, shift, Q, moments: bool = True, matmul=None, dtype=np.float32, xp=None):
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


# --------------------------------------------------------------------------------------------------
# the result
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Subspace:
    """The fitted dominant subspace and everything needed to score a row.

    Attributes
    ----------
    mean : ndarray, shape (d,), float64
        Column mean μ.
    scale : ndarray, shape (d,), float64, or None
        Column standard deviations (population, ddof=0) when ``standardize``; constant columns have
        scale 1 (they are all zero after centring and contribute nothing).
    l2_normalize : bool
        Rows were divided by their L2 norm after centring/scaling.
    components : ndarray, shape (d, k), float64
        V_k: orthonormal right singular vectors as **columns**, by decreasing σ.
    singular_values : ndarray, shape (k,), float64
        σ_1 ≥ … ≥ σ_k of the transformed matrix A.
    energy_curve : ndarray, float64
        All σ² known: d values for the exact solver, the sketch's ℓ Ritz values for randomized.
    k : int
    energy : float or None
        The energy target (None when ``k`` was given).
    captured_energy, total_energy : float
        Σ_{i≤k} σ_i² and ‖A‖_F².
    n, d : int
        Rows used in the fit (invalid rows excluded) and width.
    solver : str
        ``"exact"`` or ``"randomized"``.
    passes : int
        Passes over the data the fit made.
    info : dict
        How it was computed (solver choice and reason, sketch width, timings, invalid rows, ...).
    provenance : dict
        The source's provenance (model, layer, ...).
    """

    mean: np.ndarray
    scale: np.ndarray | None
    l2_normalize: bool
    components: np.ndarray
    singular_values: np.ndarray
    energy_curve: np.ndarray
    k: int
    energy: float | None
    captured_energy: float
    total_energy: float
    n: int
    d: int
    solver: str
    passes: int
    info: dict = dataclasses.field(default_factory=dict)
    provenance: dict = dataclasses.field(default_factory=dict)

    # -------------------------------------------------------------- scoring helpers
    def projection(self) -> np.ndarray:
        """``W = V_k / σ_k``, shape (d, k) float64, so that leverage = ‖pre(x) W‖²."""
        return self.components / self.singular_values[None, :]

    @property
    def inv_scale(self) -> np.ndarray | None:
        return None if self.scale is None else 1.0 / self.scale

    def score(self, X: np.ndarray, bf16: bool = False) -> np.ndarray:
        """Leverage ‖U_k[i]‖² of each row of ``X`` under this subspace.

        Parameters
        ----------
        X : ndarray, shape (m, d), float16 | float32 | float64 (or uint16 bfloat16 bits with bf16)
        bf16 : bool

        Returns
        -------
        ndarray, shape (m,), float64
            For the rows the subspace was fitted on, the scores sum to k.
        """
        X = np.ascontiguousarray(X)
        if X.ndim != 2 or X.shape[1] != self.d:
            raise SubspaceError(f"score(): expected rows of width {self.d}, got shape {X.shape}")
        out = np.empty(X.shape[0], np.float64)
        return native.leverage_block(X, self.mean, self._W(), out, self.inv_scale, self.l2_normalize, bf16)

    def _W(self) -> np.ndarray:
        w = self.__dict__.get("_w_cache")
        if w is None:
            w = np.ascontiguousarray(self.projection())
            self.__dict__["_w_cache"] = w
        return w

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_w_cache", None)
        return state

    # -------------------------------------------------------------- persistence
    def _meta(self) -> dict:
        return {"format": SUBSPACE_FORMAT, "version": SUBSPACE_VERSION, "k": self.k, "energy": self.energy,
                "captured_energy": self.captured_energy, "total_energy": self.total_energy, "n": self.n,
                "d": self.d, "solver": self.solver, "passes": self.passes, "l2_normalize": self.l2_normalize,
                "info": _jsonable(self.info), "provenance": _jsonable(self.provenance)}

    def save(self, path) -> Path:
        """Write an ``.npz`` (arrays + a JSON metadata string) atomically; returns the path."""
        path = Path(path)
        arrays = {"mean": self.mean, "components": self.components, "singular_values": self.singular_values,
                  "energy_curve": self.energy_curve, "meta_json": np.array(json.dumps(self._meta()))}
        if self.scale is not None:
            arrays["scale"] = self.scale
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(path, buf.getvalue())
        return path

    @classmethod
    def load(cls, path) -> "Subspace":
        """Read a file written by :meth:`save` (clear error if it is not one)."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {name: z[name] for name in z.files}
        except (OSError, ValueError) as exc:
            raise SubspaceError(f"{path}: cannot read a subspace file ({exc}); pass a file written by "
                                f"`scalselect fit` or Subspace.save") from exc
        if "meta_json" not in arrays:
            raise SubspaceError(f"{path}: not a scalselect subspace file (no metadata)")
        meta = json.loads(str(arrays["meta_json"]))
        if meta.get("format") != SUBSPACE_FORMAT:
            raise SubspaceError(f"{path}: not a scalselect subspace file")
        return cls(mean=arrays["mean"], scale=arrays.get("scale"), l2_normalize=bool(meta["l2_normalize"]),
                   components=arrays["components"], singular_values=arrays["singular_values"],
                   energy_curve=arrays["energy_curve"], k=int(meta["k"]), energy=meta["energy"],
                   captured_energy=float(meta["captured_energy"]), total_energy=float(meta["total_energy"]),
                   n=int(meta["n"]), d=int(meta["d"]), solver=meta["solver"], passes=int(meta["passes"]),
                   info=meta.get("info", {}), provenance=meta.get("provenance", {}))

    def summary(self) -> str:
        return (f"k={self.k} of d={self.d} capture {self.captured_energy / self.total_energy:.4f} of the "
                f"energy (n={self.n}, solver={self.solver}, passes={self.passes})")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


# --------------------------------------------------------------------------------------------------
# shared pieces of the solvers
# --------------------------------------------------------------------------------------------------
def _check_energy_k(energy, k):
    if k is None:
        if energy is None or not (0.0 < float(energy) <= 1.0) or math.isnan(float(energy)):
            raise SubspaceError(f"energy must be in (0, 1], got {energy!r} (e.g. 0.9 keeps 90% of the energy)")
    else:
        if int(k) != k or int(k) < 1:
            raise SubspaceError(f"k must be a positive integer, got {k!r}")


def _compute_dtype(src: MatrixSource):
    return np.float64 if src.dtype == "float64" else np.float32


def _first_block_mean(src: MatrixSource, block_rows: int) -> np.ndarray:
    """Mean of the finite rows of the first block: the shift that keeps centring accurate."""
    for _, block in src.iter_blocks(min(block_rows, 4096)):
        b = block if not src.is_bf16 else native._decode(block, True)
        b = b.astype(np.float64)
        ok = np.isfinite(b).all(axis=1)
        if ok.any():
            return b[ok].mean(axis=0)
        return np.zeros(src.d)
    return np.zeros(src.d)


def _scale_from_moments(var: np.ndarray) -> tuple[np.ndarray, int]:
    """Standard deviations with constant columns mapped to 1; returns (scale, n_constant)."""
    vmax = float(var.max(initial=0.0))
    const = var <= ZERO_VARIANCE_RTOL * vmax
    scale = np.sqrt(np.where(const, 1.0, var))
    return scale, int(const.sum())


def _check_rows_and_variance(src: MatrixSource, n: int, total: float, mean: np.ndarray, n_invalid: int):
    if n < 2:
        extra = f" ({n_invalid} invalid rows were dropped)" if n_invalid else ""
        raise SubspaceError(f"{_name(src)}: need at least 2 valid rows to fit a subspace, got {n}{extra}; "
                            f"pass more samples")
    ref = n * float(mean @ mean) + total
    if not total > 1e-24 * max(ref, 1e-300) or total <= 0:
        raise SubspaceError(f"{_name(src)}: zero total variance (all {n} rows are identical after "
                            f"centring), so there is no subspace to select by; check the extraction "
                            f"(e.g. a model layer that outputs constants)")


def _name(src: MatrixSource) -> str:
    p = getattr(src, "path", None)
    if p is not None:
        return str(p)
    return src.shards[0].path or src.shards[0].name if src.shards else "source"


def _pick_k(lam: np.ndarray, total: float, energy, k, rank: int, n: int, d: int, src_name: str):
    """k from the energy target (or the override) given eigenvalues ``lam`` sorted descending."""
    if k is not None:
        k = int(k)
        limit = min(n - 1, d)
        if k > limit or k > rank:
            raise SubspaceError(f"{src_name}: k={k} exceeds the rank of the centred matrix "
                                f"(numerical rank {rank}, at most min(n-1, d) = {limit}); choose k ≤ "
                                f"{min(rank, limit)} or use an energy target instead")
        return k
    cum = np.cumsum(lam)
    # a hair of slack so energy=1.0 is reached despite float rounding of Σλ vs trace
    target = float(energy) * total * (1.0 - 1e-9)
    hit = np.flatnonzero(cum >= target)
    if hit.size == 0:
        return None
    return int(min(hit[0] + 1, max(rank, 1)))


def _signs(V: np.ndarray) -> np.ndarray:
    """Deterministic sign: the largest-magnitude entry of each column is positive."""
    idx = np.argmax(np.abs(V), axis=0)
    s = np.sign(V[idx, np.arange(V.shape[1])])
    s[s == 0] = 1.0
    return V * s


def _eps_for(dtype) -> float:
    return float(np.finfo(dtype).eps)


# --------------------------------------------------------------------------------------------------
# streaming passes
# --------------------------------------------------------------------------------------------------
class _Pass:
    """One streaming pass over the source with a reused compute buffer and invalid-row handling."""

    def __init__(self, src: MatrixSource, block_rows: int, be, tracker: _InvalidTracker):
        self.src, self.block_rows, self.be, self.tracker = src, block_rows, be, tracker
        self.dtype = _compute_dtype(src)
        m = max(1, min(block_rows, max(s.count for s in src.shards) if src.shards else 1))
        self.buf = be.xp.empty((m, src.d), dtype=self.dtype)
        self._norms = be.xp.empty(m, dtype=self.dtype)

    def blocks(self, shift: np.ndarray, verify: bool = False, inv_scale=None, l2: bool = False,
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
        bad = _bad_rows_in(b)
        if bad.size == 0:
            raise SubspaceError(f"{_name(self.src)}: values too large: a float32 product overflowed in the "
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
        """``cᵀc`` of each chunk (float32 buffers reused across calls; not yet accumulated), in
        chunk order; each must be accumulated before the next is taken."""
        if self._pool is None or len(chunks) < 2 or acc._matmul not in (None, np.matmul) or acc.xp is not np:
            return _SequentialGrams.grams(acc, chunks)
        while len(self._bufs) < len(chunks):
            self._bufs.append(np.empty((acc.d, acc.d), dtype=chunks[0].dtype))
        outs = [b if b.dtype == c.dtype else np.empty((acc.d, acc.d), c.dtype) for b, c in zip(self._bufs, chunks)]
        list(self._pool.map(lambda i: np.matmul(chunks[i].T, chunks[i], out=outs[i]), range(len(chunks))))
        return outs


def _gram_pass(p: _Pass, acc: GramAccumulator, record: bool, verify: bool, inv_scale=None, l2=False,
               known_bad=None, shift=None) -> None:
    """Stream ``p`` into ``acc``; ``shift`` (default ``acc.shift``) is what the rows are shifted by
    before the optional scale/normalisation (μ for the l2 pass, whose Gram is then unshifted).

    Each shard is summed into its own partial, and the partials are combined by
    :func:`tree_reduce`: the same arithmetic, in the same order, as the per-shard tasks of
    :mod:`scalselect_fast.distributed`; with single-threaded products (:class:`_SingleThreadedBlas`)
    a cluster fit is bit-identical to this one whatever the thread counts.
    """
    with _SingleThreadedBlas() as blas:
        def partial(q: _Pass, shard, products):
            part = GramAccumulator(acc.d, acc.shift, matmul=acc._matmul, xp=acc._xp_name)
            _gram_shard(q, part, shard, record, verify, inv_scale, l2, known_bad, shift, products)
            return part

        shards = p.src.shards
        workers = _shards_side_by_side(blas, acc, shards, p.block_rows)
        if workers:
            parts = _ordered_parallel(blas, workers, shards, lambda q, shard: partial(q, shard, _SEQUENTIAL_GRAMS),
                                      lambda: _Pass(p.src, p.block_rows, p.be, p.tracker))
        else:
            parts = (partial(p, shard, blas) for shard in shards)
        acc.merge(tree_reduce(parts, GramAccumulator.merge))


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
    chunk order, so the bits do not change. Each concurrent shard holds its own float32 block
    buffer, read-ahead buffers and d×d float64 partial, so their number is capped to keep that
    extra memory under :data:`SIDE_BY_SIDE_MAX_BYTES`.
    """
    if blas._pool is None or acc.xp is not np or acc._matmul not in (None, np.matmul) or len(shards) < 2:
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
    each worker thread with its own :class:`_Pass` (buffers)."""
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


def _gram_shard(p, acc, shard, record, verify, inv_scale, l2, known_bad, shift, blas) -> None:
    if acc.xp is not np and _gram_shard_unchecked(p, acc, shard, verify, inv_scale, l2, known_bad, shift):
        return
    for off, b, n_valid in p.blocks(acc.shift if shift is None else shift, verify=verify, inv_scale=inv_scale,
                                    l2=l2, known_bad=known_bad, shard=shard):
        m = b.shape[0]
        zeroed_total = m - n_valid
        starts = list(range(0, m, GRAM_CHUNK_ROWS))
        chunks = [b[a:a + GRAM_CHUNK_ROWS] for a in starts]
        for a, chunk, g in zip(starts, chunks, blas.grams(acc, chunks)):
            # Non-finite input shows on the diagonal (a sum of squares cannot cancel to finite).
            zeroed = 0
            if not bool(acc.xp.isfinite(acc.xp.diagonal(g)).all()):
                zeroed = p.fix(off + a, chunk, record)
                g = acc.chunk_gram(chunk)
            acc.add_chunk(chunk, g, chunk.shape[0] - zeroed)
        acc.n -= zeroed_total


def _gram_shard_unchecked(p, acc, shard, verify, inv_scale, l2, known_bad, shift) -> bool:
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
    for off, b, n_valid in p.blocks(acc.shift if shift is None else shift, verify=verify, inv_scale=inv_scale,
                                    l2=l2, known_bad=known_bad, shard=shard):
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


def _moment_pass(p: _Pass, acc: MomentAccumulator, record: bool, verify: bool) -> None:
    """Moments of ``p`` into ``acc``, per-shard partials combined by :func:`tree_reduce`."""
    def shard_partials():
        for shard in p.src.shards:
            part = MomentAccumulator(acc.d, acc.shift, xp=acc._xp_name)
            _moment_shard(p, part, shard, record, verify)
            yield part

    with _SingleThreadedBlas():  # same bits on one node and on 1-thread Dask workers
        acc.merge(tree_reduce(shard_partials(), MomentAccumulator.merge))


def _moment_shard(p, acc, shard, record, verify) -> None:
    for off, b, n_valid in p.blocks(acc.shift, verify=verify, shard=shard):
        m = b.shape[0]
        xp = acc.xp
        ones = xp.ones(m, dtype=b.dtype)
        cs = ones @ b
        sq = xp.einsum("ij,ij->j", b, b)
        if not (bool(xp.isfinite(cs).all()) and bool(xp.isfinite(sq).all())):
            n_valid -= p.fix(off, b, record)
            cs = ones @ b
            sq = xp.einsum("ij,ij->j", b, b)
        acc.n += n_valid
        acc.colsum += cs
        acc.sumsq += sq


class _Tridiagonal:
    """``G = Q T Qᵀ`` (LAPACK dsytrd) reused for all eigenvalues and the top-k eigenvectors.

    A full ``eigh`` forms all d eigenvectors (divide & conquer + a d³ back-transform); the fit needs
    every eigenvalue (energy curve, k) but only k vectors. One tridiagonal reduction, ``dsterf`` for
    the values, ``dstemr`` for k vectors of T and ``dormqr`` to map them back costs ~2× less at
    d=768 and agrees with ``eigh`` to ~1e-14 (tests/test_subspace.py compares with dense SVD).
    """

    def __init__(self, G: np.ndarray):
        from scipy.linalg import lapack

        self.lapack = lapack
        self.d = G.shape[0]
        lwork = int(lapack.dsytrd_lwork(self.d, lower=1)[0])
        self.c, self.diag, self.off, self.tau, info = lapack.dsytrd(G, lower=1, lwork=max(lwork, 1))
        if info != 0:
            raise np.linalg.LinAlgError(f"dsytrd info={info}")

    def eigenvalues(self) -> np.ndarray:
        w, info = self.lapack.dsterf(self.diag.copy(), self.off.copy())
        if info != 0:
            raise np.linalg.LinAlgError(f"dsterf info={info}")
        return w  # ascending

    def top_vectors(self, k: int) -> np.ndarray | None:
        """Eigenvectors of the k largest eigenvalues, descending order, or None if LAPACK declines."""
        d, lp = self.d, self.lapack
        if d == 1:
            return np.ones((1, 1))
        e = np.concatenate([self.off, [0.0]])
        m, w, z, info = lp.dstemr(self.diag.copy(), e, 3, 0.0, 0.0, d - k + 1, d)
        if info != 0 or m != k:
            return None
        z = np.asfortranarray(z[:, :k])
        rest = np.asfortranarray(z[1:])
        a = self.c[1:, :d - 1]
        lwork = int(lp.dormqr(side="L", trans="N", a=a, tau=self.tau, c=rest, lwork=-1)[1][0])
        out, _, info = lp.dormqr(side="L", trans="N", a=a, tau=self.tau, c=rest, lwork=max(lwork, 1))
        if info != 0:
            return None
        V = np.vstack([z[:1], out])
        order = np.argsort(w[:k])[::-1]
        return V[:, order]


def _blas_threads(n: int):
    """Context limiting BLAS threads (no-op without threadpoolctl).

    The d×d eigensolve is dominated by BLAS-2 (memory-bound) calls, one per column of the
    tridiagonal reduction; with 2 threads each call pays a thread hand-off, and when other
    processes share the cores the spinning threads slow it down 3-15× (measured on the 2-core dev
    machine under load: 0.38 s with 1 thread vs 1.3-6.5 s with 2 at d=768).
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=n, user_api="blas")


def _tridiagonal(G: np.ndarray):
    if G.shape[0] < 2:  # LAPACK's wrappers reject empty off-diagonals; eigh handles d=1
        return None
    try:
        return _Tridiagonal(np.asarray(G, dtype=np.float64))
    except (ImportError, np.linalg.LinAlgError, AttributeError, ValueError):
        return None


def subspace_from_gram(G: np.ndarray, *, n: int, mean: np.ndarray, scale, l2_normalize: bool,
                       energy, k, src_name: str = "source", compute_dtype=np.float32,
                       backend=None) -> dict:
    """Eigendecompose the d×d Gram of the transformed matrix and choose k.

    Parameters
    ----------
    G : ndarray, shape (d, d), float64
        ``AᵀA`` of the (centred, scaled, normalised) matrix.
    n : int
        Rows in A.
    compute_dtype : dtype
        Dtype the Gram's products were formed in (sets the rank tolerance).

    Returns
    -------
    dict
        Keyword arguments for :class:`Subspace` (without ``solver``, ``passes``, ``info``).
    """
    be = backend or _NumpyBackend()
    d = G.shape[0]
    total = float(G.trace())
    _check_rows_and_variance_simple(n, total, mean, src_name)
    with _blas_threads(1):
        return _eig_fields(G, be, d, total, n=n, mean=mean, scale=scale, l2_normalize=l2_normalize,
                           energy=energy, k=k, src_name=src_name, compute_dtype=compute_dtype)


def _eig_fields(G, be, d, total, *, n, mean, scale, l2_normalize, energy, k, src_name, compute_dtype):
    tri = _tridiagonal(G) if be.name == "numpy" else None
    if tri is not None:
        lam = tri.eigenvalues()[::-1].copy()
    else:
        lam_all, V_all = be.eigh(be.asarray(G))
        lam = be.to_host(lam_all)[::-1].copy()
    lam = np.maximum(lam, 0.0)
    lam_max = float(lam[0]) if lam.size else 0.0
    # eigenvalues below this are indistinguishable from the rounding of the products
    tol = lam_max * d * _eps_for(compute_dtype) * 4
    rank = int((lam > tol).sum())
    kk = _pick_k(lam, total, energy, k, rank, n, d, src_name)
    if kk is None:  # cannot happen with the full spectrum, kept for safety
        kk = rank
    kk = max(1, min(kk, d))
    V = tri.top_vectors(kk) if tri is not None else None
    if V is None:
        if tri is not None:
            lam_all, V_all = np.linalg.eigh(G)
        V = be.to_host(V_all)[:, ::-1]
    comps = _signs(np.ascontiguousarray(V[:, :kk]))
    sv = np.sqrt(lam[:kk])
    if not (sv > 0).all():
        raise SubspaceError(f"{src_name}: k={kk} includes a zero singular value; choose a smaller k")
    return dict(mean=mean, scale=scale, l2_normalize=l2_normalize, components=comps, singular_values=sv,
                energy_curve=lam, k=kk, energy=None if k is not None else float(energy),
                captured_energy=float(lam[:kk].sum()), total_energy=total, n=n, d=d)


def _check_rows_and_variance_simple(n, total, mean, src_name):
    if n < 2:
        raise SubspaceError(f"{src_name}: need at least 2 valid rows to fit a subspace, got {n}")
    ref = n * float(mean @ mean) + total
    if not (total > 1e-24 * max(ref, 1e-300)):
        raise SubspaceError(f"{src_name}: zero total variance (all {n} rows are identical after "
                            f"centring), so there is no subspace to select by; check the extraction")


def _fit_exact(src, energy, k, standardize, l2_normalize, block_rows, be, tracker, timings):
    d = src.d
    p = _Pass(src, block_rows, be, tracker)
    shift = _first_block_mean(src, block_rows)
    t0 = time.perf_counter()
    if not l2_normalize:
        acc = GramAccumulator(d, shift, matmul=be.matmul, xp=be.xp)
        _gram_pass(p, acc, record=True, verify=True)
        timings["gram_pass_s"] = time.perf_counter() - t0
        n, mean, csq = acc.n, be.to_host(acc.mean), be.to_host(acc.centred_sumsq)
        _check_rows_and_variance(src, n, float(csq.sum()), mean, tracker.all_rows().size)
        G = acc.centred_gram()  # stays in the backend's memory for the eigensolver
        scale, n_const = None, 0
        if standardize:
            scale, n_const = _scale_from_moments(csq / n)
            sc = be.asarray(scale)  # same arithmetic as scalselect_fast.distributed (bit-identical fits)
            G = G / sc[:, None] / sc[None, :]
        passes = 1
    else:
        mom = MomentAccumulator(d, shift, xp=be.xp)
        _moment_pass(p, mom, record=True, verify=True)
        timings["moments_pass_s"] = time.perf_counter() - t0
        n, mean, csq = mom.n, be.to_host(mom.mean), be.to_host(mom.centred_sumsq)
        _check_rows_and_variance(src, n, float(csq.sum()), mean, tracker.all_rows().size)
        scale, n_const = (None, 0)
        if standardize:
            scale, n_const = _scale_from_moments(csq / n)
        t1 = time.perf_counter()
        acc = GramAccumulator(d, np.zeros(d), matmul=be.matmul, xp=be.xp)
        _gram_pass(p, acc, record=False, verify=False, inv_scale=None if scale is None else 1.0 / scale,
                   l2=True, known_bad=np.sort(tracker.all_rows()), shift=mean)
        timings["gram_pass_s"] = time.perf_counter() - t1
        G = (acc.gram + acc.gram.T) * 0.5
        passes = 2
    t2 = time.perf_counter()
    fields = subspace_from_gram(G, n=n, mean=mean, scale=scale, l2_normalize=l2_normalize, energy=energy,
                                k=k, src_name=_name(src), compute_dtype=p.dtype, backend=be)
    timings["eigh_s"] = time.perf_counter() - t2
    return fields, passes, {"constant_columns": n_const}


# --------------------------------------------------------------------------------------------------
# randomized solver
# --------------------------------------------------------------------------------------------------
class _SwitchToExact(Exception):
    """The randomized solver gave up for a cost or convergence reason; the exact solver takes over."""

    def __init__(self, reason: str, passes: int, history: list):
        super().__init__(reason)
        self.reason, self.passes, self.history = reason, passes, history


def _fit_randomized(src, energy, k, standardize, l2_normalize, block_rows, be, tracker, timings, seed,
                    oversample=10, n_iter=2, max_passes=10, init_width=64, ritz_rtol=1e-6):
    d = src.d
    xp = be.xp
    rng = np.random.default_rng(seed)
    p = _Pass(src, block_rows, be, tracker)
    shift = _first_block_mean(src, block_rows)
    ell = min(d, (int(k) + oversample) if k is not None else max(init_width, oversample + 1))

    # pass 1: moments (+ the first sketch product when rows need no μ before transforming)
    t0 = time.perf_counter()
    omega = rng.standard_normal((d, ell))
    passes = 1
    if not l2_normalize:
        acc = SketchAccumulator(d, shift, omega, moments=True, matmul=be.matmul, dtype=p.dtype, xp=xp)
        for off, b, n_valid in p.blocks(shift, verify=True):
            z = acc.products(b)
            cs_ok = bool(xp.isfinite(z).all())
            if not cs_ok:
                n_valid -= p.fix(off, b, True)
                z = acc.products(b)
            acc.add(b, z, n_valid)
            if not (bool(xp.isfinite(acc.colsum).all()) and bool(xp.isfinite(acc.sumsq).all())):
                raise SubspaceError(f"{_name(src)}: values too large near row {off}; rescale the data")
        mom = acc
    else:
        mom = MomentAccumulator(d, shift, xp=xp)
        _moment_pass(p, mom, record=True, verify=True)
        acc = None
    timings["pass1_s"] = time.perf_counter() - t0
    n, mean = mom.n, be.to_host(mom.mean)
    bad = np.sort(tracker.all_rows())
    csq = be.to_host(mom.centred_sumsq)
    scale, n_const = (None, 0)
    if standardize:
        scale, n_const = _scale_from_moments(csq / max(n, 1))
    inv = None if scale is None else 1.0 / scale
    total = float(csq.sum()) if scale is None else float((csq * inv * inv).sum())
    _check_rows_and_variance(src, n, float(csq.sum()), mean, bad.size)
    if l2_normalize:
        # every valid non-zero row has norm exactly 1 after normalisation
        total = None  # computed on the first sketch pass below

    delta = be.to_host(mom.colsum) / n  # μ - shift

    def apply(Q):
        """AᵀA Q for the transformed centred operator, one streaming pass."""
        if l2_normalize:
            sk = SketchAccumulator(d, mean, Q, moments=False, matmul=be.matmul, dtype=p.dtype, xp=xp)
            row_energy = 0.0
            for off, b, n_valid in p.blocks(mean, inv_scale=inv, l2=True, known_bad=bad):
                sk.add(b, sk.products(b), n_valid)
                row_energy += float(xp.einsum("ij,ij->", b, b).astype(np.float64))
            return be.to_host(sk.Z), row_energy
        Qin = Q if inv is None else Q * inv[:, None]
        sk = SketchAccumulator(d, shift, Qin, moments=False, matmul=be.matmul, dtype=p.dtype, xp=xp)
        for off, b, n_valid in p.blocks(shift, known_bad=bad):
            sk.add(b, sk.products(b), n_valid)
        Z = be.to_host(sk.centred_product(delta, n))
        return (Z if inv is None else Z * inv[:, None]), None

    if acc is not None:
        Z = be.to_host(acc.centred_product(delta, n))
        if inv is not None:
            Z = Z * inv[:, None]  # = AᵀA (D Ω): a random start with scaled columns, still generic
    else:
        Z, total = apply(omega)
        passes += 1
    _check_rows_and_variance_simple(n, total, mean, _name(src))

    growths = 0
    iters_after_fit = 0
    prev = None
    history = []
    while True:
        Q = np.linalg.qr(Z)[0]  # d×ℓ: small, on the host
        t1 = time.perf_counter()
        Z, _ = apply(Q)
        passes += 1
        timings[f"pass{passes}_s"] = time.perf_counter() - t1
        M = Q.T @ Z
        lam, U = np.linalg.eigh((M + M.T) * 0.5)
        lam, U = np.maximum(lam[::-1], 0.0), U[:, ::-1]
        kk = _pick_k(lam, total, energy, k, rank=ell, n=n, d=d, src_name=_name(src))
        captured = float(lam[:kk].sum()) if kk is not None else float(lam.sum())
        history.append({"ell": ell, "k": kk, "captured": captured / total})
        enough = kk is not None and (kk + oversample <= ell or ell == d)
        if not enough and ell < d and passes < max_passes:
            if SKETCH_SWITCH_MIN_D < d and 8 * d * d <= EXACT_GRAM_MAX_BYTES:
                need = _predict_sketch_width(lam, total, energy, k, oversample, d)
                # finishing needs at least one pass at that width plus n_iter refinements, each
                # 4·N·d·ℓ flops; the exact solver's one Gram pass costs N·d² (and its Gram fits)
                if (n_iter + 1) * 4 * need > d:
                    raise _SwitchToExact(
                        f"the sketch would need ℓ≈{need} columns (Ritz spectrum extrapolated after "
                        f"{passes} passes), and {n_iter + 1} more passes at that width cost more than "
                        f"one exact Gram pass (flat spectrum; ℓ > d/2={d // 2} would exceed it per pass)",
                        passes, history)
            # 1.5× keeps the overshoot (extra flops in every later pass) moderate
            new = min(d, max(ell + ell // 2, (kk or 0) + oversample))
            if 2 * new > d > SKETCH_SWITCH_MIN_D:
                # A pass with ℓ > d/2 columns costs 4·N·d·ℓ > 2·N·d² flops, more than the exact
                # solver's whole Gram pass: finish exactly instead (the user gets the exact answer).
                # Small d keeps sketching (up to ℓ = d, where one Rayleigh-Ritz pass is exact).
                raise _SwitchToExact(f"the sketch needed ℓ={new} > d/2={d // 2} columns (spectrum too "
                                     f"flat for a low-rank sketch)", passes, history)
            extra = rng.standard_normal((d, new - ell))
            # keep what was learnt: next basis = [current AᵀA Q | fresh random columns]
            Z = np.concatenate([Z, extra * np.linalg.norm(Z) / math.sqrt(Z.size)], axis=1)
            ell = new
            growths += 1
            iters_after_fit = 0
            prev = None
            continue
        iters_after_fit += 1
        # converged when k is stable and the top-k Ritz values stopped moving (they converge about
        # twice as fast as the vectors, hence the tight tolerance)
        converged = prev is not None and prev.size >= kk and \
            float(np.max(np.abs(lam[:kk] - prev[:kk]) / np.maximum(lam[:kk], 1e-300))) <= ritz_rtol
        prev = lam.copy()
        if iters_after_fit >= n_iter and converged:
            break
        if passes >= max_passes:
            raise _SwitchToExact(f"the sketch did not converge within {max_passes} passes", passes, history)
    if kk is None:
        raise SubspaceError(f"{_name(src)}: the randomized sketch (ℓ={ell}) did not reach energy {energy} "
                            f"within {max_passes} passes; use solver='exact'")
    if k is not None and kk > int((lam > lam[0] * d * _eps_for(p.dtype) * 4).sum()):
        raise SubspaceError(f"{_name(src)}: k={k} exceeds the numerical rank of the centred matrix; "
                            f"choose a smaller k")
    V = _signs(np.ascontiguousarray(Q @ U[:, :kk]))
    sv = np.sqrt(lam[:kk])
    fields = dict(mean=mean, scale=scale, l2_normalize=l2_normalize, components=V, singular_values=sv,
                  energy_curve=lam, k=int(kk), energy=None if k is not None else float(energy),
                  captured_energy=float(lam[:kk].sum()), total_energy=float(total), n=n, d=d)
    return fields, passes, {"sketch_width": ell, "growths": growths, "oversample": oversample,
                            "power_iterations": n_iter, "history": history, "constant_columns": n_const}


def _predict_sketch_width(lam: np.ndarray, total: float, energy, k, oversample: int, d: int) -> int:
    """Sketch width the energy target will need, extrapolated from the current Ritz values.

    ``lam`` (descending) are Ritz values of a sketch that does not yet hold ``energy`` × ``total``.
    Fits a power law ``λ_i ≈ C·i^-a`` to the middle of the Ritz spectrum (its top is accurate, its
    last values underestimate) and adds extrapolated eigenvalues until the target is met; a tail
    that does not decay is extrapolated as flat. Only used to decide, early, that the exact solver
    is cheaper: a wrong guess costs time, never accuracy (both solvers give the same answer).
    """
    ell = lam.size
    if k is not None:
        return min(d, int(k) + oversample)
    pos = lam[lam > 0]
    if pos.size < 8:
        return d
    i = np.arange(1, pos.size + 1, dtype=np.float64)
    lo, hi = pos.size // 4, (3 * pos.size) // 4
    slope, icpt = np.polyfit(np.log(i[lo:hi]), np.log(pos[lo:hi]), 1)
    a = max(-slope, 0.0)
    j = np.arange(ell + 1, d + 1, dtype=np.float64)
    tail = np.exp(icpt) * j ** -a if a > 0 else np.full(j.size, pos[-1])
    tail = np.minimum(tail, pos[-1])
    missing = energy * total - float(lam.sum())
    reached = np.flatnonzero(np.cumsum(tail) >= missing)
    need = (ell + 1 + int(reached[0])) if reached.size else d
    return int(min(d, need + oversample))


# --------------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------------
def choose_solver(n: int, d: int, k: int | None = None, oversample: int = 10, passes: int = 4) -> tuple[str, str]:
    """The ``auto`` cost model: returns ``(solver, reason)``.

    Exact costs one pass of ``N·d²`` flops (syrk) plus ``~10·d³`` for ``eigh`` and ``8·d²`` bytes;
    randomized costs ``passes`` × ``4·N·d·ℓ`` flops with ``ℓ = k + oversample`` (``d/8`` guessed for
    an energy target, the sketch then grows as needed).
    """
    gram_bytes = 8 * d * d
    if gram_bytes > EXACT_GRAM_MAX_BYTES:
        return "randomized", f"the d×d float64 Gram would take {gram_bytes / 2**30:.1f} GiB (> 2 GiB)"
    if d <= 4096:
        return "exact", f"d={d} ≤ 4096: one Gram pass (N·d² flops) and a small eigh are cheapest and exact"
    ell = (k + oversample) if k is not None else max(64, d // 8)
    exact = n * d * d + 10 * d ** 3
    rand = passes * 4 * n * d * ell
    if rand < exact:
        return "randomized", f"sketch cost {rand:.3g} flops (ℓ≈{ell}, {passes} passes) < exact {exact:.3g}"
    return "exact", f"exact cost {exact:.3g} flops ≤ sketch {rand:.3g} (ℓ≈{ell}, {passes} passes)"


def fit_subspace(source, energy: float = 0.9, k: int | None = None, solver: str = "auto",
                 center: bool = True, standardize: bool = False, l2_normalize: bool = False,
                 seed: int = 0, *, block_rows: int = DEFAULT_BLOCK_ROWS, drop_invalid: bool = False,
                 backend: str = "numpy", matmul=None, oversample: int = 10, n_iter: int = 2) -> Subspace:
    """Fit the dominant subspace of the centred representation matrix, streaming.

    Parameters
    ----------
    source : ndarray (n, d), np.memmap, str/PathLike (``.npy`` or store directory) or MatrixSource
        float16, bfloat16 (stores only), float32 or float64 rows.
    energy : float in (0, 1], default 0.9
        k = smallest k with Σ_{i≤k} σ_i² ≥ energy · ‖A‖_F² (the total energy).
    k : int, optional
        Use exactly k components (1 ≤ k ≤ rank); overrides ``energy``.
    solver : {"auto", "exact", "randomized"}
    center : bool, default True
        Must be True: the method is defined on the centred matrix (kept for API stability).
    standardize : bool
        Divide centred columns by their standard deviation (ddof=0; constant columns keep scale 1).
    l2_normalize : bool
        Divide each transformed row by its L2 norm (zero rows stay zero); costs one extra pass.
    seed : int
        Seed of the randomized solver's test matrices (results are deterministic for a seed).
    block_rows : int
        Rows per streamed block (memory ≈ block_rows · d · 4 bytes plus the d×d Gram).
    drop_invalid : bool
        Exclude rows with NaN/inf from the fit instead of raising; they are listed in
        ``info["invalid_rows"]`` (and get no score and are never selected downstream).
    backend : {"numpy", "cupy"}
        Array namespace (see the module docstring).
    matmul : callable, optional
        Replacement for ``xp.matmul`` (signature ``matmul(a, b, out=...)``).
    oversample, n_iter : int
        Randomized solver: spare sketch columns and power iterations after the sketch is wide enough.

    Returns
    -------
    Subspace

    Raises
    ------
    SubspaceError
        energy outside (0, 1], k > rank, fewer than 2 rows, zero total variance.
    InvalidRowsError
        NaN/inf rows without ``drop_invalid``.
    StoreError
        Unreadable paths, mismatched shards, checksum mismatch.

    Notes
    -----
    Leverage of row i is ``‖U_k[i]‖² = ‖pre(x_i) V_k Σ_k⁻¹‖²`` (:meth:`Subspace.projection`); over the
    fitted rows the scores sum to k. See the module docstring for the algorithms.

    Examples
    --------
    >>> import numpy as np, scalselect_fast as ss
    >>> X = np.random.default_rng(0).standard_normal((500, 16)).astype(np.float32)
    >>> sub = ss.fit_subspace(X, energy=0.5)
    >>> sub.components.shape == (16, sub.k)
    True
    """
    if not center:
        raise SubspaceError("center=False is not supported: ScalSelect's subspace is that of the centred "
                            "matrix (leverage of uncentred data mostly measures the distance to the mean)")
    _check_energy_k(energy, k)
    if block_rows < 1:
        raise SubspaceError(f"block_rows must be ≥ 1, got {block_rows}")
    t_start = time.perf_counter()
    src = open_source(source)
    be = _namespace(backend, matmul)
    if src.n < 2:
        raise SubspaceError(f"{_name(src)}: need at least 2 rows to fit a subspace, got {src.n}")
    if k is not None and int(k) > min(src.n - 1, src.d):
        raise SubspaceError(f"{_name(src)}: k={k} exceeds min(n-1, d) = {min(src.n - 1, src.d)}, the largest "
                            f"possible rank of the centred matrix; choose a smaller k")
    if solver == "auto":
        chosen, reason = choose_solver(src.n, src.d, k, oversample)
    elif solver in ("exact", "randomized"):
        chosen, reason = solver, "requested"
    else:
        raise SubspaceError(f"unknown solver {solver!r}; use 'auto', 'exact' or 'randomized'")
    tracker = _InvalidTracker(src, drop_invalid)
    timings: dict[str, float] = {}
    if chosen == "exact":
        fields, passes, extra = _fit_exact(src, energy, k, standardize, l2_normalize, block_rows, be,
                                           tracker, timings)
    else:
        try:
            fields, passes, extra = _fit_randomized(src, energy, k, standardize, l2_normalize, block_rows, be,
                                                    tracker, timings, seed, oversample=oversample,
                                                    n_iter=n_iter)
        except _SwitchToExact as sw:
            tracker = _InvalidTracker(src, drop_invalid)  # the exact pass records the rows again
            fields, passes, extra = _fit_exact(src, energy, k, standardize, l2_normalize, block_rows, be,
                                               tracker, timings)
            passes += sw.passes
            extra.update(randomized_gave_up=sw.reason, randomized_passes=sw.passes, history=sw.history)
            chosen = "exact"
            reason += f"; randomized switched to exact: {sw.reason}"
    timings["fit_s"] = time.perf_counter() - t_start
    invalid = np.sort(tracker.all_rows())
    info = {"solver_requested": solver, "solver_reason": reason, "backend": be.name,
            "native": native.BACKEND, "block_rows": int(block_rows), "seed": int(seed),
            "source_dtype": src.dtype, "source_rows": int(src.n), "drop_invalid": bool(drop_invalid),
            "invalid_rows": invalid.tolist(), "standardize": bool(standardize), "timings": timings, **extra}
    return Subspace(solver=chosen, passes=passes, info=info, provenance=dict(src.provenance), **fields)
