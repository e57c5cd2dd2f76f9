"""Pre-flight estimate for ``scalselect run --plan``: time, disk and peak memory before anything runs.

The estimate is a cost model, not a measurement of the job: FLOPs of the part of the model that
extraction actually runs (vision tower, projector, embeddings and decoder layers 0..ℓ) and of the
fit/score passes, divided by a matmul rate measured on the chosen device in a fraction of a second;
bytes of the representation store, checkpoints and outputs; resident weights, activations and the
d×d Gram matrix. It is meant to be right within a small factor, which is enough to refuse a run that
cannot fit (disk or memory) and say what to change. Constants and assumptions are listed in
:attr:`PlanEstimate.assumptions` and printed with the table.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

__all__ = ["PlanEstimate", "PlanError", "estimate_run", "model_cost", "count_samples", "measure_flops"]

GiB = 1024 ** 3
_DTYPE_BYTES = {"float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2, "float32": 4, "fp32": 4}
#: fraction of the measured matmul rate a transformer forward reaches (layer norms, softmax, gathers)
FORWARD_EFFICIENCY = 0.35
#: Python interpreter + torch/transformers import, resident before any data
BASE_PROCESS_BYTES = int(0.6 * GiB)


class PlanError(RuntimeError):
    """The run cannot fit on this machine; the message lists what to change."""


@dataclass
class PlanEstimate:
    """What a run will need. Times in seconds, sizes in bytes."""

    n: int
    d: int
    device: str
    seconds: dict[str, float] = field(default_factory=dict)
    disk_bytes: dict[str, int] = field(default_factory=dict)
    memory_bytes: dict[str, int] = field(default_factory=dict)
    available: dict[str, int | None] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    assumptions: dict[str, Any] = field(default_factory=dict)

    @property
    def total_seconds(self) -> float:
        return float(sum(self.seconds.values()))

    @property
    def total_disk(self) -> int:
        return int(sum(self.disk_bytes.values()))

    @property
    def peak_memory(self) -> int:
        return int(max(self.memory_bytes.values(), default=0))

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"n": self.n, "d": self.d, "device": self.device, "seconds": self.seconds,
                "total_seconds": self.total_seconds, "disk_bytes": self.disk_bytes,
                "total_disk_bytes": self.total_disk, "memory_bytes": self.memory_bytes,
                "peak_memory_bytes": self.peak_memory, "available": self.available,
                "problems": self.problems, "ok": self.ok, "assumptions": self.assumptions}

    def format(self) -> str:
        gib = _size

        def dur(s):
            return f"{s:.1f} s" if s < 120 else (f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h")

        lines = [f"Plan for N={self.n:,} samples, d={self.d}, device={self.device}"]
        lines.append("  time (estimate):")
        lines += [f"    {k:<14} {dur(v):>12}" for k, v in self.seconds.items()]
        lines.append(f"    {'total':<14} {dur(self.total_seconds):>12}")
        lines.append(f"  disk (needed / free on output): {gib(self.total_disk)} / {gib(self.available.get('disk_free'))}")
        lines += [f"    {k:<24} {gib(v):>12}" for k, v in self.disk_bytes.items()]
        mem_avail = self.available.get("memory_available")
        lines.append(f"  peak memory (needed / available): {gib(self.peak_memory)} / {gib(mem_avail)}")
        lines += [f"    {k:<24} {gib(v):>12}" for k, v in self.memory_bytes.items()]
        if self.available.get("gpu_memory") is not None:
            lines.append(f"  GPU memory free: {gib(self.available['gpu_memory'])}")
        lines.append("  assumptions: " + ", ".join(f"{k}={v}" for k, v in self.assumptions.items()))
        if self.problems:
            lines.append("  CANNOT RUN AS CONFIGURED:")
            lines += [f"    - {p}" for p in self.problems]
        else:
            lines.append("  fits: yes")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# model cost from a config.json
# --------------------------------------------------------------------------------------------------
def _load_config(model: str | os.PathLike | Mapping | None) -> dict:
    if model is None:
        return {}
    if isinstance(model, Mapping):
        return dict(model)
    p = Path(model)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise PlanError(f"{model}: no config.json; pass a Hugging Face model directory")
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PlanError(f"{p}: unreadable model config ({exc})") from exc


def model_cost(config: Mapping, layer: int = 0, text_tokens: int = 96) -> dict:
    """Parameter counts and per-sample FLOPs of what extraction runs, from a VLM ``config.json``.

    Parameters
    ----------
    config : mapping
        The model's config (LLaVA-style ``text_config``/``vision_config``, Qwen2-VL-style top-level
        text fields with ``vision_config``).
    layer : int
        Decoder layer ℓ; layers 0..ℓ run (early exit).
    text_tokens : int
        Assumed non-visual tokens per sample.

    Returns
    -------
    dict
        ``d`` (decoder hidden size), ``full_params``, ``run_params``, ``image_tokens``,
        ``flops_per_sample``.
    """
    text = dict(config.get("text_config") or {})
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size"):
        if key not in text and key in config:
            text[key] = config[key]
    h = int(text.get("hidden_size", 4096))
    inter = int(text.get("intermediate_size", 4 * h))
    n_layers = int(text.get("num_hidden_layers", 32))
    heads = int(text.get("num_attention_heads", max(1, h // 128)))
    kv = int(text.get("num_key_value_heads", heads) or heads)
    vocab = int(text.get("vocab_size", 32000))
    head_dim = h // heads
    layer_params = h * h * 2 + 2 * h * kv * head_dim + 3 * h * inter
    vis = dict(config.get("vision_config") or {})
    # Qwen2-VL's vision "hidden_size" is the merger's output width; its transformer width is embed_dim
    vh = int(vis.get("embed_dim", vis.get("hidden_size", 1024)))
    v_inter = int(vis.get("intermediate_size", int(vis.get("mlp_ratio", 4) * vh)))
    v_layers = int(vis.get("num_hidden_layers", vis.get("depth", 24)))
    patch = int(vis.get("patch_size", 14))
    image_size = int(vis.get("image_size", 336))
    v_tokens = (image_size // patch) ** 2
    merge = int(vis.get("spatial_merge_size", 1))
    image_tokens = max(1, v_tokens // (merge * merge))
    v_params = v_layers * (4 * vh * vh + 2 * vh * v_inter)
    proj_params = vh * merge * merge * h + h * h
    ell = min(int(layer), n_layers - 1)
    run_layers = ell + 1
    seq = image_tokens + text_tokens
    flops = (2 * v_params * v_tokens + 4 * v_layers * v_tokens * v_tokens * vh
             + 2 * proj_params * image_tokens
             + 2 * layer_params * run_layers * seq + 4 * run_layers * seq * seq * h)
    return {"d": h, "full_params": int(vocab * h * 2 + n_layers * layer_params + v_params + proj_params),
            "run_params": int(vocab * h + run_layers * layer_params + v_params + proj_params),
            "image_tokens": image_tokens, "seq_tokens": seq, "flops_per_sample": float(flops),
            "hidden_size": h, "intermediate_size": inter}


def measure_flops(device: str = "cpu", seconds: float = 0.3) -> float:
    """Float32 matmul rate on ``device`` in FLOP/s: the best of short timed repeats.

    The best repeat (not the mean) is the machine's rate when it is not busy with something else;
    torch is used when importable (it is what extraction runs), numpy otherwise.
    """
    n = 768
    try:
        import torch

        dev = torch.device(device)
        a = torch.randn(n, n, device=dev)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

        def once():
            a @ a
            sync()
    except ImportError:
        import numpy as np

        a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)

        def once():
            a @ a
    once()
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        once()
        best = max(best, 2 * n ** 3 / max(time.perf_counter() - t0, 1e-9))
    return best


def count_samples(path) -> tuple[int, int]:
    """(number of samples, bytes) of a dataset (file, directory, glob, URL or list), cheaply.

    The data layer's :func:`~scalselect_fast.data.count_records` counts (Parquet reads footers).
    """
    from .data import count_records
    from .data.sources import open_source

    source = open_source(path)
    return count_records(source), source.total_bytes()


# --------------------------------------------------------------------------------------------------
# the estimate
# --------------------------------------------------------------------------------------------------
def _mem_available() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # pragma: no cover
        return None


def _gpu_free(device: str) -> int | None:
    if not str(device).startswith("cuda"):
        return None
    try:
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    except Exception:
        return None


def estimate_run(n: int, *, model: str | os.PathLike | Mapping | None = None, d: int | None = None,
                 device: str = "cpu", dtype: str = "float16", store_dtype: str = "float16",
                 batch_size: int = 8, layer: int = 0, out_dir: str | os.PathLike = ".",
                 data_bytes: int = 0, budget_fraction: float = 0.16, solver: str = "auto",
                 flops_per_s: float | None = None, text_tokens: int = 96, avg_id_bytes: int = 24,
                 memory_available: int | None = None, disk_free: int | None = None) -> PlanEstimate:
    """Estimate time, disk and peak memory of ``scalselect run`` and list what would not fit.

    Parameters
    ----------
    n : int
        Number of samples.
    model : path or mapping, optional
        Model directory (its ``config.json`` is read) or the config dict. Without it only the
        selection stages are estimated and ``d`` is required.
    d : int, optional
        Representation width (defaults to the model's hidden size).
    device, dtype : str
        Extraction device and model dtype.
    store_dtype : str
        Representation store dtype.
    flops_per_s : float, optional
        Device matmul rate; measured (~0.2 s) when omitted.
    memory_available, disk_free : int, optional
        Override the machine's free memory / free disk on ``out_dir`` (for tests and remote planning).

    Returns
    -------
    PlanEstimate
        With ``problems`` non-empty when the run cannot fit; each problem names what to change.
    """
    n = int(n)
    cost = model_cost(_load_config(model), layer, text_tokens) if model is not None else None
    if d is None:
        if cost is None:
            raise PlanError("estimate_run needs a model config or d")
        d = cost["d"]
    d = int(d)
    rate = float(flops_per_s) if flops_per_s else measure_flops(device)
    wbytes = _DTYPE_BYTES.get(str(dtype).lower(), 4)
    sbytes = _DTYPE_BYTES.get(str(store_dtype).lower(), 2)
    est = PlanEstimate(n=n, d=d, device=str(device))
    from .subspace import choose_solver  # the fit's own auto rule, so the plan budgets the solver it runs

    exact = solver == "exact" or (solver == "auto" and choose_solver(n, d)[0] == "exact")
    k_guess = max(1, d // 4)
    if cost is not None:
        est.seconds["extract"] = n * cost["flops_per_sample"] / (rate * FORWARD_EFFICIENCY)
    fit_flops = 2.0 * n * d * d + 10.0 * d ** 3 if exact else 2 * 2.0 * n * d * (2 * k_guess) * 3
    est.seconds["fit"] = fit_flops / rate
    est.seconds["score"] = (2.0 * n * d * k_guess) / rate
    est.seconds["select+write"] = n * 4e-6 + data_bytes / 200e6
    # disk
    est.disk_bytes["representation store"] = n * d * sbytes + n * (avg_id_bytes + 1)
    est.disk_bytes["fit checkpoint"] = 2 * (d * d * 8 + d * 8) if exact else 2 * d * 2 * k_guess * 8
    est.disk_bytes["scores"] = n * 8
    est.disk_bytes["manifest.parquet"] = n * (avg_id_bytes + 40)
    est.disk_bytes["selected dataset"] = int(data_bytes * min(1.0, max(0.0, budget_fraction)))
    est.disk_bytes["margin (10%)"] = int(0.1 * sum(est.disk_bytes.values()))
    # memory per stage (peak = max over stages)
    block = 16384 * d * 4 * 2
    if cost is not None:
        act = batch_size * cost["seq_tokens"] * (cost["hidden_size"] * 8 + cost["intermediate_size"] * 3) * 4
        # extraction loads only the layers it runs (vision tower, projector, embeddings, layers 0..ℓ)
        est.memory_bytes["extract"] = BASE_PROCESS_BYTES + cost["run_params"] * wbytes + act \
            if not str(device).startswith("cuda") else BASE_PROCESS_BYTES + act // 8
        if str(device).startswith("cuda"):
            est.assumptions["gpu_weights_bytes"] = cost["run_params"] * wbytes + act
    est.memory_bytes["fit"] = BASE_PROCESS_BYTES + (3 * d * d * 8 if exact else 3 * d * 2 * k_guess * 8) + block
    est.memory_bytes["score+select"] = BASE_PROCESS_BYTES + n * (8 + 8 + 8 + avg_id_bytes + 56) + block
    est.available = {"disk_free": disk_free if disk_free is not None else _disk_free(out_dir),
                     "memory_available": memory_available if memory_available is not None else _mem_available(),
                     "gpu_memory": _gpu_free(device)}
    est.assumptions.update({"matmul_flops_per_s": f"{rate:.3g}", "forward_efficiency": FORWARD_EFFICIENCY,
                            "solver": "exact" if exact else "randomized", "k_guess": k_guess,
                            "store_dtype": store_dtype, "model_dtype": dtype})
    if cost is not None:
        est.assumptions.update({"model_params_loaded": cost["run_params"], "image_tokens": cost["image_tokens"],
                                "text_tokens": text_tokens})
    # problems, each with the fix
    if out_dir is not None:
        where = _existing_ancestor(out_dir)
        if not (where.is_dir() and os.access(where, os.W_OK | os.X_OK)):
            est.problems.append(f"output: cannot write under {out_dir} ({where} is not a writable folder); "
                                f"choose an --out you can write to")
    free = est.available["disk_free"]
    if free is not None and est.total_disk > free:
        est.problems.append(
            f"disk: needs ~{_size(est.total_disk)} under {out_dir} but only {_size(free)} is "
            f"free; choose another --out on a larger disk, or store representations as "
            f"--store-dtype float16/bfloat16 (now {store_dtype})")
    mem = est.available["memory_available"]
    fix = {"extract": "use --device cuda, a smaller --dtype (bf16) or a lower --batch-size",
           "fit": "use --solver randomized (memory O(d·k) instead of O(d²))",
           "score+select": "split the dataset and select per part, or run on a machine with more RAM"}
    for stage, need in est.memory_bytes.items():
        if mem is not None and need > mem:
            est.problems.append(f"memory: stage '{stage}' needs ~{_size(need)} but {_size(mem)} "
                                f"is available; {fix.get(stage, 'free memory')}")
    gpu = est.available.get("gpu_memory")
    need_gpu = est.assumptions.get("gpu_weights_bytes")
    if gpu is not None and need_gpu and need_gpu > gpu:
        est.problems.append(f"GPU memory: the model needs ~{_size(need_gpu)} but {_size(gpu)} is "
                            f"free; use --dtype bfloat16, a lower --batch-size, or device_map over more GPUs")
    return est


def _disk_free(path: str | os.PathLike) -> int | None:
    """Free bytes for writing under ``path``, counting what is already there as free.

    A rerun or a resume overwrites or reuses what an earlier run left under ``path`` (store shards,
    checkpoints, outputs), so those bytes are available to it too; without them a run that stopped
    on a full disk would be refused again after the user freed space.
    """
    free = _fs_free(path)
    if free is None:
        return None
    p = Path(path)
    held = sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink()) if p.is_dir() else 0
    return free + held


def _size(b: int | None) -> str:
    """Bytes in the unit that shows them (a plan of a few MiB must not read "0.00 GiB")."""
    if b is None:
        return "?"
    for unit, scale in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{int(b)} B"


def _existing_ancestor(path: str | os.PathLike) -> Path:
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _fs_free(path: str | os.PathLike) -> int | None:
    p = _existing_ancestor(path)
    try:
        return int(shutil.disk_usage(p).free)
    except OSError:  # pragma: no cover
        return None
