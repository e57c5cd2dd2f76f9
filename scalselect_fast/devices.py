"""Where work runs and on what: the one place device and implementation choices are resolved.

Three settings used to share the word "backend"; each has its own name now:

================  ===========================  ==================================================
name              values                       chooses
================  ===========================  ==================================================
``kernels``       ``"native"``, ``"python"``   the compiled C++ kernels or their pure-Python
                                               fallback (:mod:`scalselect_fast.native`; forced
                                               with ``SCALSELECT_FORCE_FALLBACK=1``)
``array_backend`` ``"numpy"``, ``"cupy"``      the array namespace of the subspace fit and the
                                               scores (host or GPU), from a *fit device*
``pool_impl``     ``"auto"``, ``"torch"``,     the implementation of the instruction-attended
                  ``"triton"``                 pooling kernel (:mod:`scalselect_fast.ops`)
================  ===========================  ==================================================

The ``kernels`` in use are read, not chosen, in this module's sense: ``scalselect_fast.native.BACKEND``
(recorded as ``"native"`` in ``Subspace.info``; the module and the report keep that older name).
``Subspace.info["backend"]`` records the ``array_backend``, under the key saved subspaces have.

Two settings name a device:

* the **model device** (``--device``, :func:`model_device`): where extraction runs the model, any
  torch device (``cpu``, ``cuda``, ``cuda:N``, ``mps``, ``xpu``). ``"auto"``: CUDA when torch sees a
  GPU, else the CPU.
* the **fit device** (``--fit-device``, :func:`array_device`): where the fit and the scores run,
  ``cpu`` (numpy) or ``cuda`` (CuPy). ``"auto"``: CUDA when CuPy and a GPU are usable, else the CPU
  with a logged warning; ``cuda`` without them is an error, never a silent fallback.

``None`` means "not set" everywhere, that is the setting's default: ``"auto"`` for the model device
(extraction has always used the GPU it finds) and ``"cpu"`` for the fit device (the fit and the scores
are reproduced bit for bit on the host; a GPU fit is asked for). For ``pool_impl``, ``"auto"`` is
Triton on CUDA tensors when Triton is installed, torch otherwise.

What this module is not: the GPU plumbing itself (:mod:`scalselect_fast.gpu`), nor the array
namespace objects (:mod:`scalselect_fast.subspace.backends`). It imports torch, CuPy and Triton only
inside the functions that need them.
"""
from __future__ import annotations

import logging
import os

__all__ = ["DeviceError", "model_device", "array_device", "array_backend", "resolve_pool_impl", "POOL_IMPLS"]

log = logging.getLogger(__name__)

#: the values of ``pool_impl``
POOL_IMPLS = ("auto", "torch", "triton")
_ARRAY_BACKENDS = {"numpy": "numpy", "cpu": "numpy", "cupy": "cupy", "cuda": "cupy", "gpu": "cupy"}


class DeviceError(RuntimeError):
    """The requested device (or the library it needs) is not available; the message says what to do."""


def model_device(device: str | None) -> str:
    """The model device: ``"auto"`` (or None), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` -> a torch device string.

    Raises
    ------
    DeviceError
        A name torch does not know, or CUDA (or a CUDA index) this machine does not have, before
        anything is loaded.
    """
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(str(device))
    except (RuntimeError, ValueError, TypeError):
        raise DeviceError(f"--device {device!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device} requested but CUDA is not available on this machine; "
                              f"use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA "
                              f"device(s); choose cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise DeviceError(f"--device {device!r}: use cpu, cuda, cuda:N or auto")
    return str(device)


def array_device(device: str | None) -> str:
    """The fit device: ``"cpu" | "cuda" | "auto"`` (or None = ``"cpu"``) -> ``"cpu"`` or ``"cuda"``.

    ``"numpy"``/``"cupy"`` and ``"gpu"`` are read as ``cpu``/``cuda``.

    Raises
    ------
    DeviceError
        An unknown name, or ``cuda`` without CuPy or a CUDA device; only ``auto`` falls back to the
        CPU (logging why).
    """
    from .gpu import cuda_available

    d = (device or "cpu").lower()
    if d in ("cpu", "numpy"):
        return "cpu"
    if d not in ("cuda", "gpu", "auto", "cupy"):
        raise DeviceError(f"unknown device {device!r}; use cpu, cuda or auto")
    ok, why = cuda_available()
    if ok:
        return "cuda"
    if d == "auto":
        log.warning("scalselect_fast: --device auto falls back to the CPU: %s", why)
        return "cpu"
    raise DeviceError(f"--device {device} was requested but {why}. Use --device cpu, or --device auto "
                      f"to fall back to the CPU when no GPU is usable.")


def array_backend(device: str | None, *, check: bool = True) -> str:
    """The ``array_backend`` (``"numpy"`` or ``"cupy"``) for a fit device or an array-backend name.

    With ``check`` (default) the device is resolved by :func:`array_device` (``auto`` looks for a
    GPU; ``cuda`` without one raises :class:`DeviceError`). Without it the name is only translated
    (``None``/``cpu``/``numpy`` -> numpy, ``cuda``/``gpu``/``cupy`` -> cupy), for callers that have
    already chosen and will fail on their own when CuPy is missing.
    """
    if check:
        return "cupy" if array_device(device) == "cuda" else "numpy"
    name = _ARRAY_BACKENDS.get("numpy" if device is None else str(device).lower())
    if name is None:
        raise DeviceError(f"unknown array backend {device!r}; use 'numpy' or 'cupy'")
    return name


def resolve_pool_impl(pool_impl: str, device_type: str, triton_available: bool) -> str:
    """The pooling kernel implementation for tensors on ``device_type``: ``"torch"`` or ``"triton"``.

    Parameters
    ----------
    pool_impl : {"auto", "torch", "triton"}
        ``auto``: Triton on CUDA when ``triton_available``, torch otherwise.
    device_type : str
        ``torch.device.type`` of the inputs (``"cpu"``, ``"cuda"``, ...).
    triton_available : bool
        Whether the Triton package imported.

    Raises
    ------
    ValueError
        An unknown ``pool_impl``.
    RuntimeError
        ``triton`` on CPU tensors without ``TRITON_INTERPRET=1``, or on another device type.
    """
    if pool_impl not in POOL_IMPLS:
        raise ValueError(f"pool_impl (formerly backend) must be one of {POOL_IMPLS}, got {pool_impl!r}")
    if pool_impl == "auto":
        return "triton" if device_type == "cuda" and triton_available else "torch"
    if pool_impl == "triton":
        if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "pool_impl='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                "before importing scalselect_fast.ops (or use pool_impl='torch')"
            )
        if device_type not in ("cpu", "cuda"):
            raise RuntimeError(f"pool_impl='triton' supports CUDA (or CPU under TRITON_INTERPRET=1), "
                               f"got {device_type}")
    return pool_impl
