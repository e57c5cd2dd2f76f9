"""faiss on the CPU or the GPU for the baselines that cluster or search neighbours.

``pip install scalselect-fast[baselines]`` brings faiss-cpu; ``scalselect-fast[gpu]`` brings
faiss-gpu (both provide the ``faiss`` module). The baselines take ``device="cpu" | "cuda" |
"auto"``: ``cuda`` needs a faiss build with GPU support and a visible GPU and otherwise raises
:class:`~scalselect_fast.gpu.DeviceError` saying what to install; only ``auto`` falls back to the
CPU (logging why). Exact flat indexes give the same neighbours on both (up to float ties); k-means
on the GPU follows the same seeded algorithm but its float32 sums are ordered differently, so
centroids agree to rounding, not bit for bit.
"""
from __future__ import annotations

import logging

from ..gpu import DeviceError

log = logging.getLogger(__name__)

_RESOURCES = None


def _gpu_count(faiss) -> int:
    try:
        return int(faiss.get_num_gpus())
    except AttributeError:  # a build without the GPU module
        return 0


def resolve_faiss_device(device: str | None) -> str:
    """``"cpu"`` or ``"cuda"`` for faiss, from ``"cpu" | "cuda" | "auto"`` (None = ``"cpu"``)."""
    d = (device or "cpu").lower()
    if d == "cpu":
        return "cpu"
    if d not in ("cuda", "gpu", "auto"):
        raise DeviceError(f"unknown device {device!r} for the baselines; use cpu, cuda or auto")
    import faiss

    if _gpu_count(faiss) > 0:
        return "cuda"
    if not hasattr(faiss, "StandardGpuResources"):
        why = ("the installed faiss has no GPU support (faiss-cpu); install faiss-gpu: "
               "`pip uninstall -y faiss-cpu && pip install scalselect-fast[gpu]`")
    else:
        why = "faiss-gpu is installed but sees no CUDA device"
    if d == "auto":
        log.warning("scalselect_fast baselines: --device auto runs faiss on the CPU: %s", why)
        return "cpu"
    raise DeviceError(f"--device {device} was requested for faiss but {why}. Use --device cpu, or "
                      f"--device auto to fall back to the CPU.")


def _resources():
    global _RESOURCES
    if _RESOURCES is None:
        import faiss

        _RESOURCES = faiss.StandardGpuResources()
    return _RESOURCES


def flat_index(d: int, metric: str, device: str):
    """An exact flat index (``metric`` "l2" or "ip") on ``device`` ("cpu" or "cuda", resolved)."""
    import faiss

    index = faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)
    if device == "cuda":  # pragma: no cover - needs faiss-gpu and a GPU
        index = faiss.index_cpu_to_gpu(_resources(), 0, index)
    return index
