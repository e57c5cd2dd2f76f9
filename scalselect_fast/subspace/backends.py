"""Backend lookup: the array namespace the solvers run on (numpy on the host, CuPy on a GPU).

Which one is the ``array_backend`` (see :mod:`scalselect_fast.devices` for its names and how a fit
device resolves to it); this module builds the object the solvers hold.

A backend holds ``xp``, a pluggable ``matmul``, ``eigh``/``qr`` and the decode+shift of a raw
storage-dtype block into a reused compute buffer; the device Gram product choice lives here too.
"""
from __future__ import annotations

import os

import numpy as np

from .. import native
from ..devices import DeviceError, array_backend
from .result import SubspaceError

# --------------------------------------------------------------------------------------------------
# array namespace
# --------------------------------------------------------------------------------------------------
class NumpyBackend:
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
        return native.center_block(block, shift64, out, bf16)

    def eigh(self, a):
        return np.linalg.eigh(a)

    def qr(self, a):
        return np.linalg.qr(a)[0]


class _CupyBackend(NumpyBackend):  # pragma: no cover - needs CUDA + CuPy
    """Device backend: the same solver code over ``cupy`` (cuBLAS products, float64 accumulators).

    Raw storage-dtype blocks (fp16/bf16 are half the bytes of fp32) go through two pinned host
    buffers to the device on a separate copy stream, and are decoded and shifted there; the copy of
    block i+1 overlaps the products of block i, which were queued asynchronously on the compute
    stream. See :class:`scalselect_fast.gpu.DeviceStaging`.
    """

    name = "cupy"

    def __init__(self, matmul=None):
        import cupy  # noqa: F401  (ImportError -> clear message in array_namespace)

        from ..gpu import DeviceStaging

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


def array_namespace(name: str | None = "numpy", matmul=None):
    """Backend object for the array backend ``name`` ("numpy" or "cupy"; a fit device name "cpu" or
    "cuda" is read as its backend, None as numpy). ``matmul`` overrides the product."""
    try:
        name = array_backend(name, check=False)
    except DeviceError as exc:
        raise SubspaceError(str(exc)) from None
    if name == "numpy":
        return NumpyBackend(matmul)
    try:
        return _CupyBackend(matmul)
    except ImportError as exc:
        raise SubspaceError(f"the CuPy backend needs cupy ({exc}); install scalselect-fast[gpu] "
                            f"or use device='cpu'") from exc


def array_module_name(xp) -> str:
    """The array backend's name of ``xp``: a module, a name, or None (numpy)."""
    if xp is None or isinstance(xp, str):
        return array_backend(xp, check=False)
    return xp.__name__.split(".")[0]


def xp_module(name: str):
    if name == "numpy":
        return np
    import importlib

    return importlib.import_module(name)


def device_gram_product() -> str:
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


def device_syrk(xp, chunk, g):  # pragma: no cover - needs CUDA + CuPy
    """``chunkᵀ chunk`` through cuBLAS syrk into ``g`` (one triangle), returned as the full matrix."""
    from cupy import cublas

    g.fill(0)
    cublas.syrk("T", xp.ascontiguousarray(chunk), out=g, lower=False)
    full = g + g.T  # whichever triangle syrk filled, the other is zero
    full -= xp.diag(xp.diagonal(g))
    return full


