"""GPU support: device resolution, overlapped host→device streaming, and leverage scoring on CuPy.

What this module is for: probing CuPy and a CUDA device (:func:`cuda_available`, which
:func:`scalselect_fast.devices.array_device` asks when it resolves a fit device), and moving
representation blocks to the GPU so that the PCIe copy of block i+1 overlaps the products of
block i. The solvers themselves live in :mod:`scalselect_fast.subspace` (written over an array
namespace) and :mod:`scalselect_fast.scoring`; this module only supplies the device plumbing and
the scoring loop on the device.

What it is not: a CUDA kernel library. Products are cuBLAS GEMMs through CuPy; fp16/bf16 decoding
happens on the device after the (half-size) copy.

Nothing here runs without CUDA; the tests in ``tests/test_gpu.py`` skip cleanly on CPU machines,
and ``benchmarks/gpu_check.sh`` runs them on a GPU node.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .devices import DeviceError

__all__ = ["DeviceError", "cuda_available", "DeviceStaging", "leverage_scores_cupy"]

log = logging.getLogger(__name__)

def _cupy():
    try:
        import cupy  # noqa: F401
    except ImportError as exc:
        raise DeviceError(f"device 'cuda' needs CuPy ({exc}); install it with "
                          f"`pip install scalselect-fast[gpu]` (CUDA 12) or use --device cpu") from exc
    return cupy


def cuda_available() -> tuple[bool, str]:
    """Whether CuPy can see a CUDA device: ``(ok, reason)`` (reason explains a False)."""
    try:
        cp = _cupy()
    except DeviceError as exc:
        return False, str(exc)
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError without a driver
        return False, f"CuPy is installed but no CUDA device/driver is usable ({exc})"
    if n < 1:
        return False, "CuPy is installed but reports no CUDA device"
    return True, f"{n} CUDA device(s)"


def copy_rows(dst: np.ndarray, src: np.ndarray, pool=None, parts: int = 1) -> None:
    """``dst[...] = src`` (same shape and dtype), split by rows into ``parts`` copies run on ``pool``.

    numpy releases the GIL while it copies, so the parts run in parallel.
    """
    if dst.shape != src.shape or dst.dtype != src.dtype:
        raise ValueError(f"copy_rows: {src.shape} {src.dtype} into {dst.shape} {dst.dtype}")
    parts = min(parts, src.shape[0]) if src.ndim else 1
    if pool is None or parts < 2:
        np.copyto(dst, src, casting="no")
        return
    bounds = np.linspace(0, src.shape[0], parts + 1).astype(np.int64)
    list(pool.map(lambda i: np.copyto(dst[bounds[i]:bounds[i + 1]], src[bounds[i]:bounds[i + 1]], casting="no"),
                  range(parts)))


class DeviceStaging:
    """Pinned, double-buffered host→device staging of raw storage-dtype blocks, decoded on device.

    ``shift_block(block, shift, out, bf16)`` copies the host block into one of two page-locked
    buffers, sends it to the device on a dedicated copy stream, makes the compute stream wait for
    that copy, and decodes + shifts it into ``out`` on the compute stream. Since the caller's
    products for the previous block were queued asynchronously, the copy of this block overlaps
    them; a slot is only refilled once the compute stream has finished decoding from it.
    The bytes cross PCIe in their storage dtype (fp16/bf16: half of fp32).

    The host copy into the pinned buffer is split over ``copy_threads`` threads (numpy releases the
    GIL for it): one thread moves roughly 5-10 GB/s, below a PCIe 5 link, so a single-threaded
    copy would cap the stream.
    """

    #: blocks smaller than this are copied on the calling thread
    PARALLEL_COPY_BYTES = 8 << 20

    def __init__(self, copy_threads: int | None = None):
        cp = _cupy()
        self.cp = cp
        self.copy_threads = max(1, copy_threads or min(8, os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(self.copy_threads, thread_name_prefix="scalselect-h2d") \
            if self.copy_threads > 1 else None
        self.copy_stream = cp.cuda.Stream(non_blocking=True)
        self._slots: list[dict] = [{}, {}]
        self._next = 0
        self._shift_host = None
        self._shift_dev = None

    def _slot(self, shape, dtype) -> dict:
        import cupyx

        cp = self.cp
        s = self._slots[self._next]
        self._next ^= 1
        if s.get("pinned") is None or s["pinned"].dtype != dtype or s["pinned"].shape[0] < shape[0] \
                or s["pinned"].shape[1] != shape[1]:
            if s.get("done") is not None:
                s["done"].synchronize()
            s["pinned"] = cupyx.empty_pinned(shape, dtype=dtype)
            s["dev"] = cp.empty(shape, dtype=dtype)
            s["copied"] = cp.cuda.Event(disable_timing=True)
            s["done"] = None
        return s

    def _host_copy(self, dst: np.ndarray, src: np.ndarray) -> None:
        if src.nbytes < self.PARALLEL_COPY_BYTES:
            np.copyto(dst, src, casting="no")
        else:
            copy_rows(dst, src, self._pool, self.copy_threads)

    def close(self) -> None:
        """Stop the copy threads (the pinned buffers are freed with the object)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def shift_block(self, block: np.ndarray, shift64, out, bf16: bool):
        """``out[...] = float(block) - shift`` on the device; ``block`` is a host array."""
        cp = self.cp
        m = block.shape[0]
        s = self._slot(block.shape, block.dtype)
        if s["done"] is not None:
            s["done"].synchronize()  # the last decode from this slot (and so its copy) has finished
        self._host_copy(s["pinned"][:m], block)
        dev = s["dev"][:m]
        dev.set(s["pinned"][:m], stream=self.copy_stream)
        s["copied"].record(self.copy_stream)
        compute = cp.cuda.get_current_stream()
        compute.wait_event(s["copied"])
        if self._shift_host is not shift64:
            self._shift_host = shift64
            self._shift_dev = cp.asarray(shift64, dtype=cp.float64)
        x = cp.left_shift(dev.astype(cp.uint32), 16).view(cp.float32) if bf16 else dev
        # the subtraction in float64, rounded once to out's dtype, as the CPU kernel does
        out[...] = x.astype(cp.float64) - self._shift_dev
        done = cp.cuda.Event(disable_timing=True)
        done.record(compute)
        s["done"] = done
        return out


def leverage_scores_cupy(src, sub, block_rows: int = 65536) -> np.ndarray:
    """Leverage scores on the GPU, with the semantics of :func:`scalselect_fast.native.leverage_block`.

    Parameters
    ----------
    src : MatrixSource
    sub : Subspace

    Returns
    -------
    ndarray, shape (n,), float64, on the host. Non-finite rows give non-finite scores (as on CPU;
    the caller raises or drops them).

    Notes
    -----
    Blocks are staged through :class:`DeviceStaging` (raw dtype over PCIe, decoded and centred on
    the device with the subtraction in float64), optionally standardised / L2-normalised, projected
    with a float64 cuBLAS GEMM against ``W = V_k / σ_k``, their squared norms summed in float64 and
    rounded to float32 precision (the canonical score)
    — the CPU kernel's numerics.
    """
    cp = _cupy()
    W = cp.asarray(sub._W(), dtype=cp.float64)
    inv_scale = None if sub.inv_scale is None else cp.asarray(sub.inv_scale, dtype=cp.float64)
    mean = np.ascontiguousarray(sub.mean, dtype=np.float64)
    rows = max(1, min(block_rows, max((s.count for s in src.shards), default=1)))
    staging = DeviceStaging()
    buf = cp.empty((rows, src.d), dtype=cp.float64)
    out = cp.empty(src.n, dtype=cp.float64)
    for off, block in src.iter_blocks(rows):
        m = block.shape[0]
        z = staging.shift_block(block, mean, buf[:m], src.is_bf16)
        if inv_scale is not None:
            z *= inv_scale
        if sub.l2_normalize:
            nrm = cp.sqrt((z.astype(cp.float64) ** 2).sum(axis=1, keepdims=True))
            z[...] = cp.where(nrm > 0, z / cp.where(nrm > 0, nrm, 1.0), 0.0)
        p = z @ W
        out[off:off + m] = (p * p).sum(axis=1).astype(cp.float32)  # the canonical score
    staging.close()
    return cp.asnumpy(out)
