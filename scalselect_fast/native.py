"""The one loader for the C++ extension ``scalselect_fast._native``, with a pure numpy fallback.

Every hot block operation the engine needs is defined here twice: the compiled version (when the
extension imports) and a plain numpy version that gives the same answers. Callers import the
functions from this module and never from ``_native`` directly.

Set ``SCALSELECT_FORCE_FALLBACK=1`` to use the numpy versions even when the extension is built
(the test suite runs both ways).
"""
from __future__ import annotations

import logging
import os

import numpy as np

__all__ = ["BACKEND", "HAVE_NATIVE", "center_block", "leverage_block", "top_k_block", "top_k_merge"]

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
if not HAVE_NATIVE:
    log.info("scalselect_fast: using the numpy fallback: %s", _why)


def _decode(block: np.ndarray, bf16: bool) -> np.ndarray:
    if bf16:
        return (block.astype(np.uint32) << 16).view(np.float32)
    return block


# ------------------------------------------------------------------------------------------------
# numpy fallbacks (the reference semantics)
# ------------------------------------------------------------------------------------------------
def _center_block_py(block, shift, out, bf16=False):
    np.subtract(_decode(block, bf16), shift, out=out, casting="unsafe")
    return out


def _leverage_block_py(block, mean, W, out, inv_scale=None, l2_normalize=False, bf16=False):
    z = _decode(block, bf16).astype(np.float64) - mean
    if inv_scale is not None:
        z *= inv_scale
    if l2_normalize:
        norms = np.sqrt(np.einsum("ij,ij->i", z, z))
        np.divide(z, norms[:, None], out=z, where=norms[:, None] > 0)
        z[norms == 0] = 0.0
    p = z @ W.astype(np.float64, copy=False)
    np.einsum("ij,ij->i", p, p, out=out)
    return out


def _top_k_block_py(scores, offset, budget):
    scores = np.asarray(scores, dtype=np.float64)
    idx = np.arange(offset, offset + scores.size, dtype=np.int64)
    m = min(int(budget), scores.size)
    if m == 0:
        return np.empty(0, np.int64), np.empty(0, np.float64)
    # lexsort: last key is primary -> sort by -score, then index
    order = np.lexsort((idx, -scores))[:m]
    return idx[order], scores[order]


def _top_k_merge_py(parts, budget):
    if not parts:
        return np.empty(0, np.int64), np.empty(0, np.float64)
    idx = np.concatenate([p[0] for p in parts]).astype(np.int64, copy=False)
    val = np.concatenate([p[1] for p in parts]).astype(np.float64, copy=False)
    order = np.lexsort((idx, -val))[: int(budget)]
    return idx[order], val[order]


# ------------------------------------------------------------------------------------------------
# public dispatchers
# ------------------------------------------------------------------------------------------------
def center_block(block: np.ndarray, shift: np.ndarray, out: np.ndarray, bf16: bool = False) -> np.ndarray:
    """``out = float32(block - shift)``: decode + shift in one pass.

    Parameters
    ----------
    block : ndarray, shape (m, d), float16 | float32 | float64 | uint16 (bfloat16 bits), C-contiguous
    shift : ndarray, shape (d,), float64
    out : ndarray, shape (m, d), float32, C-contiguous; written in place and returned
    bf16 : bool
        Interpret a uint16 ``block`` as bfloat16 bit patterns.
    """
    if _native is not None and hasattr(_native, "center_block"):
        _native.center_block(block, shift, out, bf16)
        return out
    return _center_block_py(block, shift, out, bf16)


def leverage_block(block: np.ndarray, mean: np.ndarray, W: np.ndarray, out: np.ndarray,
                   inv_scale: np.ndarray | None = None, l2_normalize: bool = False,
                   bf16: bool = False) -> np.ndarray:
    """Leverage of each row: ``out[i] = || pre(block[i]) @ W ||²`` accumulated in float64.

    ``pre(x) = (x - mean) * inv_scale``, then divided by its L2 norm when ``l2_normalize`` (a zero
    row stays zero). With ``W = V_k / sigma_k`` this is ``||U_k[i]||²``.

    Parameters
    ----------
    block : ndarray, shape (m, d), float16 | float32 | float64 | uint16 (bfloat16 bits)
    mean : ndarray, shape (d,), float64
    W : ndarray, shape (d, k), float64
    out : ndarray, shape (m,), float64; written in place and returned
    inv_scale : ndarray, shape (d,), float64, optional
    l2_normalize : bool
    bf16 : bool
    """
    if _native is not None and hasattr(_native, "leverage_block"):
        _native.leverage_block(block, mean, W, out, inv_scale, l2_normalize, bf16)
        return out
    return _leverage_block_py(block, mean, W, out, inv_scale, l2_normalize, bf16)


def top_k_block(scores: np.ndarray, offset: int, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``budget`` of one block of scores: ``(global_indices int64, scores float64)``.

    Order: descending score, ties to the lower global index (``offset + position``). NaN scores
    must be rejected by the caller.
    """
    if _native is not None and hasattr(_native, "top_k_block"):
        return _native.top_k_block(np.ascontiguousarray(scores, dtype=np.float64), int(offset), int(budget))
    return _top_k_block_py(scores, offset, budget)


def top_k_merge(parts: list[tuple[np.ndarray, np.ndarray]], budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-block/per-shard top-k lists into the global top ``budget``, same order rule.

    The result does not depend on the order of ``parts`` (indices are unique across parts).
    """
    if _native is not None and hasattr(_native, "top_k_merge"):
        return _native.top_k_merge(parts, int(budget))
    return _top_k_merge_py(parts, budget)
