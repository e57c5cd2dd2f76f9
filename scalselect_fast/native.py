"""The one loader for the C++ extension ``scalselect_fast._native``, with a pure numpy fallback.

Every hot block operation the engine needs is defined here twice: the compiled version (when the
extension imports) and a plain numpy version that gives the same answers (the ``_*_py`` functions,
which are also the reference the tests compare against). Callers import the functions from this
module and never from ``_native`` directly. One exception: :func:`arrow_samples` (the readers'
Arrow front end) has no twin here; its plain counterpart is the readers' own record path.

Set ``SCALSELECT_FORCE_FALLBACK=1`` to use the numpy versions even when the extension is built
(the test suite runs both ways). ``SCALSELECT_NUM_THREADS`` caps the native kernels' threads.

What this module is not: it does no I/O and keeps no state between calls; streaming, read-ahead
and accumulation live in :mod:`scalselect_fast.subspace` and :mod:`scalselect_fast.scoring`.
"""
from __future__ import annotations

import logging
import os

import numpy as np

__all__ = ["BACKEND", "FALLBACK_REASON", "HAVE_NATIVE", "center_block", "leverage_block", "top_k_block",
           "top_k_merge"]

log = logging.getLogger(__name__)

_native = None
_why = ""
if os.environ.get("SCALSELECT_FORCE_FALLBACK", "") not in ("", "0"):
    _why = "SCALSELECT_FORCE_FALLBACK is set"
else:
    try:
        from . import _native  # type: ignore[attr-defined, no-redef]
    except ImportError as exc:  # pragma: no cover - depends on the build
        _why = f"extension not importable ({exc}); rebuild with `pip install -e .`"
        _native = None

HAVE_NATIVE = _native is not None
BACKEND = "native" if HAVE_NATIVE else "python"
#: Why the numpy fallback is in use ("" when the extension is).
FALLBACK_REASON = _why
if not HAVE_NATIVE:
    # Logged once, at import. A forced fallback is a choice; a missing build is worth a warning.
    (log.info if "FORCE" in _why else log.warning)("scalselect_fast: using the numpy fallback: %s", _why)


def decode_block(block: np.ndarray, bf16: bool) -> np.ndarray:
    if bf16:
        return (block.astype(np.uint32) << 16).view(np.float32)
    return block


# ------------------------------------------------------------------------------------------------
# argument checks of the fallback (the extension raises the same exception types with its own text)
# ------------------------------------------------------------------------------------------------
def _check_block(fn: str, block: np.ndarray, bf16: bool) -> None:
    if not isinstance(block, np.ndarray):
        raise TypeError(f"{fn}: block must be a numpy array, got {type(block).__name__}")
    dt = block.dtype
    if bf16:
        if dt != np.uint16:
            raise TypeError(f"{fn}: block has dtype {dt} but bf16=True expects uint16 bfloat16 bit patterns")
    elif dt == np.uint16:
        raise TypeError(f"{fn}: block is uint16; if it holds bfloat16 bit patterns pass bf16=True")
    elif dt not in (np.float16, np.float32, np.float64):
        raise TypeError(f"{fn}: block has dtype {dt}; expected float16, float32, float64 or uint16 bf16 bits")
    if block.ndim != 2:
        raise ValueError(f"{fn}: block must be 2-D (m, d), got shape {block.shape}")
    if not block.flags.c_contiguous:
        raise ValueError(f"{fn}: block must be C-contiguous; pass np.ascontiguousarray(block)")


def _check_out(fn: str, out: np.ndarray, dtype, shape: tuple) -> None:
    if not isinstance(out, np.ndarray) or out.dtype != dtype:
        raise TypeError(f"{fn}: out must be a {np.dtype(dtype)} ndarray, got "
                        f"{getattr(out, 'dtype', type(out).__name__)}")
    if out.shape != shape:
        raise ValueError(f"{fn}: out has shape {out.shape}, expected {shape}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"{fn}: out must be C-contiguous and writeable")


def _check_vec(fn: str, name: str, v: np.ndarray, d: int) -> None:
    if v.ndim != 1 or v.shape[0] != d:
        raise ValueError(f"{fn}: {name} has shape {v.shape} but block has d={d} columns")


def _f64(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float64)


# ------------------------------------------------------------------------------------------------
# numpy fallbacks (the reference semantics)
# ------------------------------------------------------------------------------------------------
def _center_block_py(block, shift, out, bf16=False):
    _check_block("center_block", block, bf16)
    _check_vec("center_block", "shift", np.asarray(shift), block.shape[1])
    _check_out("center_block", out, np.float32 if getattr(out, "dtype", None) == np.float32 else np.float64,
               block.shape)
    np.subtract(decode_block(block, bf16), shift, out=out, casting="unsafe")
    return out


def _leverage_block_py(block, mean, W, out, inv_scale=None, l2_normalize=False, bf16=False):
    _check_block("leverage_block", block, bf16)
    d = block.shape[1]
    _check_vec("leverage_block", "mean", np.asarray(mean), d)
    if np.ndim(W) != 2 or np.shape(W)[0] != d:
        raise ValueError(f"leverage_block: W has shape {np.shape(W)}, expected (d={d}, k)")
    if inv_scale is not None:
        _check_vec("leverage_block", "inv_scale", np.asarray(inv_scale), d)
    _check_out("leverage_block", out, np.float64, (block.shape[0],))
    z = decode_block(block, bf16).astype(np.float64) - mean
    if inv_scale is not None:
        z *= inv_scale
    if l2_normalize:
        norms = np.sqrt(np.einsum("ij,ij->i", z, z))
        with np.errstate(invalid="ignore"):  # NaN/inf rows stay non-finite; the caller reports them
            np.divide(z, norms[:, None], out=z, where=norms[:, None] > 0)
        z[norms == 0] = 0.0
    p = z @ W.astype(np.float64, copy=False)
    np.einsum("ij,ij->i", p, p, out=out)
    return _canonical(out)


def _canonical(scores: np.ndarray) -> np.ndarray:
    """Round float64 scores in place to the nearest float32 (ties to even): the canonical score."""
    with np.errstate(over="ignore"):  # above float32's range -> inf, reported as too large upstream
        scores[...] = scores.astype(np.float32)
    return scores


def _check_budget(fn: str, budget) -> int:
    b = int(budget)
    if b < 0:
        raise ValueError(f"{fn}: budget must be >= 0, got {b}")
    return b


def _top_k_block_py(scores, offset, budget):
    budget = _check_budget("top_k_block", budget)
    scores = np.asarray(scores, dtype=np.float64)
    nan = np.flatnonzero(np.isnan(scores))
    if nan.size:
        raise ValueError(f"top_k_block: scores[{nan[0]}] (global row {offset + int(nan[0])}) is NaN; "
                         f"leverage scores must be finite: check that row of the input for NaN/inf values")
    idx = np.arange(offset, offset + scores.size, dtype=np.int64)
    m = min(budget, scores.size)
    if m == 0:
        return np.empty(0, np.int64), np.empty(0, np.float64)
    # lexsort: last key is primary -> sort by -score, then index
    order = np.lexsort((idx, -scores))[:m]
    return idx[order], scores[order]


def _top_k_merge_py(parts, budget):
    budget = _check_budget("top_k_merge", budget)
    if not parts:
        return np.empty(0, np.int64), np.empty(0, np.float64)
    for p, (i, s) in enumerate(parts):
        if np.shape(i) != np.shape(s) or np.ndim(i) != 1:
            raise ValueError(f"top_k_merge: parts[{p}]: indices and scores must be 1-D of equal length")
        nan = np.flatnonzero(np.isnan(np.asarray(s, dtype=np.float64)))
        if nan.size:
            raise ValueError(f"top_k_merge: parts[{p}] has a NaN score at position {nan[0]} (global row "
                             f"{int(np.asarray(i)[nan[0]])}); leverage scores must be finite")
    idx = np.concatenate([p[0] for p in parts]).astype(np.int64, copy=False)
    val = np.concatenate([p[1] for p in parts]).astype(np.float64, copy=False)
    order = np.lexsort((idx, -val))[:budget]
    return idx[order], val[order]


# ------------------------------------------------------------------------------------------------
# public dispatchers
# ------------------------------------------------------------------------------------------------
def center_block(block: np.ndarray, shift: np.ndarray, out: np.ndarray, bf16: bool = False) -> np.ndarray:
    """``out = block - shift`` in ``out``'s dtype (float64 or float32): decode + shift in one pass.

    Parameters
    ----------
    block : ndarray, shape (m, d), float16 | float32 | float64 | uint16 (bfloat16 bits), C-contiguous
    shift : array_like, shape (d,), float64 (other float arrays are converted; d is small)
    out : ndarray, shape (m, d), float64 or float32, C-contiguous, writeable; written in place and
        returned. The solvers use float64 (see :func:`leverage_block` for why).
    bf16 : bool
        Interpret a uint16 ``block`` as bfloat16 bit patterns (uint16 without it is a TypeError).

    Returns
    -------
    out : ndarray, shape (m, d), float64 or float32

    Raises
    ------
    TypeError
        Wrong dtype of ``block`` or ``out``.
    ValueError
        Non-contiguous ``block``/``out``, or shapes that do not match.

    Notes
    -----
    Each element is widened exactly to float64, ``shift`` is subtracted in float64 and the result is
    stored (float64) or rounded once (float32), so the output equals numpy's ``np.subtract(x, shift, out=out,
    casting="unsafe")`` bit for bit, and a large shift (a mean far from zero) loses nothing beyond
    that one rounding. The native kernel decodes fp16 with F16C and bf16 with an integer shift
    (AVX2, chosen at run time) and splits rows over threads with the GIL released.

    Examples
    --------
    >>> x = np.array([[1.5, 2.0]], np.float16)
    >>> center_block(x, np.array([1.0, 1.0]), np.empty((1, 2), np.float32))
    array([[0.5, 1. ]], dtype=float32)
    """
    shift = _f64(shift)
    if _native is not None:
        _native.center_block(block, shift, out, bf16)
        return out
    return _center_block_py(block, shift, out, bf16)


def leverage_block(block: np.ndarray, mean: np.ndarray, W: np.ndarray, out: np.ndarray,
                   inv_scale: np.ndarray | None = None, l2_normalize: bool = False,
                   bf16: bool = False) -> np.ndarray:
    """Canonical leverage of each row: ``out[i] = float32(|| pre(block[i]) @ W ||²)``, as float64.

    ``pre(x) = (x - mean) * inv_scale``, then divided by its L2 norm when ``l2_normalize`` (a zero
    row stays zero). With ``W = V_k / sigma_k`` this is ``||U_k[i]||²``, computed in float64 and
    rounded to the nearest float32 (ties to even): the *canonical score* every ranking uses.

    Parameters
    ----------
    block : ndarray, shape (m, d), float16 | float32 | float64 | uint16 (bfloat16 bits), C-contiguous
    mean : array_like, shape (d,), float64
    W : array_like, shape (d, k), float64 (converted to a contiguous float64 array if needed)
    out : ndarray, shape (m,), float64, C-contiguous, writeable; written in place and returned
    inv_scale : array_like, shape (d,), float64, optional
        Per-column factor applied after centring (standardisation); None = 1.
    l2_normalize : bool
        Normalise each (centred, scaled) row to unit L2 norm before projecting.
    bf16 : bool
        Interpret a uint16 ``block`` as bfloat16 bit patterns.

    Returns
    -------
    out : ndarray, shape (m,), float64
        Values representable in float32. NaN/inf in a row gives a non-finite score for that row;
        so does a score above float32's range (about 3.4e38).

    Raises
    ------
    TypeError, ValueError
        Wrong dtypes, non-contiguous ``block``/``out``, or mismatched d/k/m.

    Notes
    -----
    The native kernel works in row tiles of about 1 MiB that stay in cache: it decodes a tile and
    centres (and scales) it in float64 -- *before* the product, so a mean much larger than the
    spread does not cancel the significant digits --, multiplies the tile by ``W`` with BLAS
    ``dgemm``, sums the squares of each projected row in float64, and rounds the sum once to
    float32. Row L2-normalisation is applied exactly to the result (``||zW||² / ||z||²``).

    Why float64 and then float32: the same product gives different low bits on different CPUs'
    BLAS kernels (and thread counts). With float32 products (``sgemm``) two machines' scores
    differed by up to 1e-6 relative and dozens of rank positions in a 16% selection moved; with
    float64 products (and a float64 fit) they differ by ~1e-14, and rounding to 24 bits puts six
    orders of magnitude between that noise and the rounding step, so the canonical scores -- and
    the order "descending score, ties to the lower row" -- are the same everywhere except when a
    score sits within ~1e-14 of a rounding midpoint. Exact duplicate rows always tie. fp16/bf16
    representations carry 11/8 significant bits, so nothing meaningful is lost. The float64
    product costs ~2× the float32 one (``benchmarks/bench_reproducibility.py`` prices it).

    Threads: by default one worker per core, each running its own tiles with a single-threaded
    GEMM (scipy's OpenBLAS is pinned to one thread for the duration of the call and restored
    after), so tiles never wait on a BLAS thread barrier; the GIL is released throughout.

    Examples
    --------
    >>> X = np.array([[1.0, 0.0], [0.0, 2.0]])
    >>> leverage_block(X, np.zeros(2), np.eye(2), np.empty(2))
    array([1., 4.])
    """
    mean, W = _f64(mean), _f64(W)
    if inv_scale is not None:
        inv_scale = _f64(inv_scale)
    if _native is not None:
        _native.leverage_block(block, mean, W, out, inv_scale, bool(l2_normalize), bool(bf16))
        return out
    return _leverage_block_py(block, mean, W, out, inv_scale, l2_normalize, bf16)


def top_k_block(scores: np.ndarray, offset: int, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``budget`` of one block of scores.

    Parameters
    ----------
    scores : array_like, shape (n,), float (converted to contiguous float64)
    offset : int
        Global row index of ``scores[0]``.
    budget : int, >= 0
        Entries to keep; ``budget >= n`` keeps all (sorted).

    Returns
    -------
    indices : ndarray, shape (min(budget, n),), int64 -- global row indices
    values : ndarray, shape (min(budget, n),), float64 -- their scores

    Raises
    ------
    ValueError
        A NaN score (the message names its position and global row), or budget < 0. Callers that
        mark invalid rows with NaN replace them with ``-inf`` first.

    Notes
    -----
    Order: descending score, ties to the lower global index. That order is total on (score, index),
    so partial selection (``nth_element``, O(n + budget·log budget)) plus a sort of the kept prefix
    returns one answer whatever the input order.

    Examples
    --------
    >>> top_k_block(np.array([0.5, 2.0, 0.5]), 10, 2)
    (array([11, 10]), array([2. , 0.5]))
    """
    if _native is not None:
        return _native.top_k_block(np.ascontiguousarray(scores, dtype=np.float64), int(offset), int(budget))
    return _top_k_block_py(scores, offset, budget)


def top_k_merge(parts: list[tuple[np.ndarray, np.ndarray]], budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-block/per-shard top-k lists into the global top ``budget``, same order rule.

    Parameters
    ----------
    parts : list of (indices int64 (n_p,), scores float64 (n_p,))
        As returned by :func:`top_k_block`; indices unique across parts.
    budget : int, >= 0

    Returns
    -------
    indices : ndarray, int64 ; values : ndarray, float64 -- the best ``min(budget, Σ n_p)`` entries

    Raises
    ------
    ValueError
        A NaN score (names the part, position and global row), mismatched lengths, budget < 0.

    Notes
    -----
    The result does not depend on the order of ``parts`` (the (score, index) order is total), so
    per-shard lists can be merged in any tree shape.
    """
    if _native is not None:
        return _native.top_k_merge(list(parts), int(budget))
    return _top_k_merge_py(parts, budget)


# ------------------------------------------------------------------------------------------------
# the dataset readers' Arrow front end (data/arrow.py)
# ------------------------------------------------------------------------------------------------
def arrow_samples(spec: dict, start: int, stop: int) -> tuple[list, list[int], np.ndarray]:
    """The plain rows ``start:stop`` of one Arrow record batch as ``Sample`` objects, built in native code.

    Native only: its pure-Python counterpart is the readers' record path
    (:func:`scalselect_fast.data.records.parse_record` on each row dict), which the readers use
    instead when the extension is not built (:data:`HAVE_NATIVE`), and which the tests compare
    this against row by row. The caller, :class:`scalselect_fast.data.arrow.ArrowPlan`, prepares
    ``spec``; see ``csrc/arrow_rows.cpp`` for what a plain row is.

    Parameters
    ----------
    spec : dict
        ``n`` (rows in the batch), ``index`` / ``local`` (record number of its first row in the
        dataset / in its file), ``where`` (the file's name), ``token`` (the image placeholder),
        ``user`` (the role images go before), ``aliases`` (role spelling -> role),
        ``sample_cls``/``sample_slots`` and ``image_cls``/``image_slots`` (the classes and their
        ``__slots__`` descriptors, filled without ``__init__``), ``raw`` (``Sample.raw`` of every
        row); the columns as Arrow buffers: ``ids`` (a string array as ``(validity, offsets, data,
        offset, length, large)``; or ``id_list``, a list of str), ``turns`` (the list array as
        ``(validity, offsets, offset, length, large)``), ``turn_valid`` (``(validity, offset,
        length)`` of its structs), ``roles``, ``texts``; optionally ``image_kind`` (``"struct_list"``
        / ``"struct"`` / ``"bytes"``) with ``image_bytes``, ``image_paths`` (or None),
        ``image_valid`` and ``image_rows``; ``source`` (a string array) or ``source_list``.
    start, stop : int
        The rows to build, ``0 <= start <= stop <= n``. Building a batch a slice at a time lets
        the consumer drop samples before the garbage collector promotes them (a 1024-row batch
        built at once was 5x slower, nearly all of it in full collections).

    Returns
    -------
    samples : list of Sample or None, length stop - start
    others : list of int
        Rows (of the batch) left to the record path (``None`` in ``samples``), ascending.
    digests : ndarray of int64, shape (stop - start,)
        ``hash(id)`` of each plain row (0 elsewhere), for the duplicate-id registry.
    """
    if _native is None:
        raise RuntimeError("arrow_samples needs the native extension; read through the record path instead")
    return _native.arrow_samples(spec, int(start), int(stop))
