"""Extraction at real model size on a GPU: ours (early exit + fused pooling) vs the authors' way.

Models: the published shapes in ``benchmarks/configs`` (LLaVA-1.5-7B, Qwen2.5-VL-7B, Qwen3-VL-8B)
with random weights (no downloads), bf16. Data: synthetic 640x480 JPEGs with LLaVA-665K-like
instructions (:mod:`bench_loader`), written in one layout (``--layout``) and read back through the
real data path (``read_dataset`` -> ``load_image`` -> ``Encoder.encode``).

Contenders, on the same samples:

* authors: the whole model (every decoder layer, the LM head), ``attn_implementation="eager"``,
  ``output_attentions=True`` and ``output_hidden_states=True``, then the representation from layer
  ℓ's returned attention map (``bench_extract._baseline_pool``); batch 1 as in their run script, and
  the largest batch that fits (doubling until out of memory, up to ``--authors-max-batch``);
* ours: ``load_vlm`` (vision tower + projector + layers 0..ℓ only) and the extraction loop's batch
  step (``collate`` -> ``forward_layer`` -> ``instruction_attended_pool``), for each ``--batch-sizes``;
  best batch kept. Then end to end with the loader's worker pool (``extract_representations``,
  ``num_workers`` = the machine's cores), to see whether the CPU keeps the GPU busy.

Reported: samples/s, peak GPU memory, GPU utilisation (NVML sampled during the run) and the
time split per sample: decode, preprocess (one core), host->device, vision tower, projector,
embeddings/merge (the rest of the forward), decoder layers 0..ℓ, pooling. Floors (LLaVA-1.5-7B):
ours >= 20x the authors' batch 1; the loader on all cores >= 1.5x what ours consumes, else the
limiting stage is named. Rows go to ``<out>/extract_gpu.csv``.

    python benchmarks/bench_extract_gpu.py                      # GPU; ~4-5 min on one H200
    python benchmarks/bench_extract_gpu.py --cpu-smoke          # tiny shapes on CPU: proves the script runs
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _suite import RESULTS, append_csv, load_average, machine, now_utc  # noqa: E402
from bench_loader import CONFIGS, make_dataset, read_samples, shrunk_config, time_loader  # noqa: E402

FLOOR_SPEEDUP = 20.0   # ours / authors' batch 1, LLaVA-1.5-7B shape
FLOOR_LOADER = 1.5     # loader samples/s on all cores / ours' GPU samples/s


class Clock:
    """Paired start/stop marks: CUDA events on a GPU (no sync inside the timed region), else wall time."""

    def __init__(self, device: str):
        import torch

        self.cuda = device.startswith("cuda")
        self.torch = torch
        self.spans: dict[str, list] = {}
        self._open: dict[str, object] = {}

    def mark(self):
        if self.cuda:
            ev = self.torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def start(self, name):
        self._open[name] = self.mark()

    def stop(self, name):
        self.spans.setdefault(name, []).append((self._open.pop(name), self.mark()))

    def totals(self) -> dict[str, float]:
        """Seconds per name (synchronises first)."""
        if self.cuda:
            self.torch.cuda.synchronize()
            return {k: sum(a.elapsed_time(b) for a, b in v) / 1e3 for k, v in self.spans.items()}
        return {k: sum(b - a for a, b in v) for k, v in self.spans.items()}

    def hook(self, module, name):
        """Time every call of ``module`` under ``name``; returns the two hook handles."""
        h1 = module.register_forward_pre_hook(lambda *_: self.start(name))
        h2 = module.register_forward_hook(lambda *_: self.stop(name))
        return [h1, h2]


class UtilSampler:
    """Mean GPU utilisation (%) while the context is open: ``torch.cuda.utilization()`` (NVML) every
    50 ms in a thread, else ``nvidia-smi`` every 100 ms; ``None`` when neither answers."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.values: list[float] = []
        self._stop = threading.Event()
        self.proc = self.thread = None

    def __enter__(self):
        if not self.enabled:
            return self
        import torch

        try:
            torch.cuda.utilization()
            self.thread = threading.Thread(target=self._poll_nvml, daemon=True)
        except Exception:  # noqa: BLE001 - no NVML bindings: ask nvidia-smi
            if shutil.which("nvidia-smi") is None:
                return self
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-i", str(torch.cuda.current_device()), "-lms", "100"],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.thread = threading.Thread(target=self._read_smi, daemon=True)
        self.thread.start()
        return self

    def _poll_nvml(self):
        import torch

        while not self._stop.wait(0.05):
            self.values.append(float(torch.cuda.utilization()))

    def _read_smi(self):
        for line in self.proc.stdout:
            try:
                self.values.append(float(line.strip()))
            except ValueError:
                pass

    def __exit__(self, *exc):
        self._stop.set()
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=5)
        if self.thread is not None:
            self.thread.join(timeout=5)

    @property
    def mean(self):
        return round(float(np.mean(self.values)), 1) if self.values else None


def _sync(device):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_reset(device):
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device):
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None


def _is_oom(exc) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _vision_modules(vlm):
    """(vision tower, projector) modules of a loaded VLM; the projector may sit inside the tower."""
    m = vlm.model
    if vlm.family == "llava":
        return m.vision_tower, m.multi_modal_projector
    return m.visual, m.visual.merger


def encode_all(vlm, samples, workers: int):
    """Encode every sample with the extraction loop's worker pool; returns (results, seconds)."""
    from scalselect_fast.data import load_image
    from scalselect_fast.extract.batch import EncodePool

    pool = EncodePool(vlm.encoder, load_image, workers)
    try:
        t0 = time.perf_counter()
        results = pool.results(pool.submit(samples))
        return results, time.perf_counter() - t0
    finally:
        pool.close()


def run_ours(vlm, samples, results, batch_sizes, device, backend):
    """samples/s of the loop's batch step (collate, forward to layer ℓ, pool) per batch size."""
    from scalselect_fast.extract.batch import _pool_encoded
    from scalselect_fast.extract.options import ExtractOptions

    opts = ExtractOptions(threshold=0.9, instruction="all", padding_side="right", pool_impl=backend)
    out = {}
    for bs in batch_sizes:
        chunks = [(samples[i:i + bs], results[i:i + bs]) for i in range(0, len(samples), bs)]
        try:
            _peak_reset(device)
            _pool_encoded(vlm, *chunks[0], opts)  # warm-up (kernels, allocator)
            _sync(device)
            with UtilSampler(device.startswith("cuda")) as util:
                t0 = time.perf_counter()
                vecs = [_pool_encoded(vlm, s, r, opts) for s, r in chunks]
                _sync(device)
                dt = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - out of memory ends the batch-size sweep
            if not _is_oom(exc):
                raise
            out[bs] = {"error": "out of memory"}
            break
        n = sum(len(v.ids) for v in vecs)
        out[bs] = {"samples_s": n / dt, "peak_gib": _peak_gib(device), "gpu_util": util.mean,
                   "vectors": {i: v for res in vecs for i, v in zip(res.ids, res.vectors)}}
    return out


def split_ours(vlm, samples, results, bs, device, backend, max_batches=4):
    """Seconds per sample of each step of our forward, timed one step at a time (a separate pass)."""
    import torch

    from scalselect_fast.extract import roles as R
    from scalselect_fast.ops import instruction_attended_pool

    clock = Clock(device)
    vision, projector = _vision_modules(vlm)
    handles = clock.hook(vision, "vision+projector") + clock.hook(projector, "projector") \
        + clock.hook(vlm.decoder_layer, "decoder layer ℓ")
    if vlm.layer > 0:
        handles += clock.hook(vlm.language_model.layers[0], "decoder layers <ℓ (first)")
    n = 0
    try:
        for i in range(0, min(len(samples), bs * max_batches), bs):
            batch = vlm.collate(results[i:i + bs], "right")
            clock.start("host->device")
            inputs = {k: (v.to(device, non_blocking=False) if isinstance(v, torch.Tensor) else v)
                      for k, v in batch["inputs"].items()}
            clock.stop("host->device")
            clock.start("forward")
            cap = vlm.forward_layer(inputs)
            clock.stop("forward")
            clock.start("pooling")
            roles = batch["roles"].to(device)
            qmask = torch.from_numpy(R.instruction_mask(batch["roles"].numpy(), "all")).to(device)
            with torch.inference_mode():
                pooled = instruction_attended_pool(cap.query, cap.key, cap.hidden, qmask, roles == R.VISUAL,
                                                   batch["mask"].to(device), threshold=0.9, scale=cap.scaling,
                                                   pool_impl=backend)
            pooled.float().cpu()
            clock.stop("pooling")
            n += len(results[i:i + bs])
    finally:
        for h in handles:
            h.remove()
    t = clock.totals()
    vision_only = t.get("vision+projector", 0.0) - (t.get("projector", 0.0) if vlm.family != "llava" else 0.0)
    vp = t.get("vision+projector", 0.0) + (t.get("projector", 0.0) if vlm.family == "llava" else 0.0)
    rest = t["forward"] - vp - t.get("decoder layer ℓ", 0.0)
    split = {"host->device": t["host->device"], "vision tower": vision_only, "projector": t.get("projector", 0.0),
             "embed+merge+layers<ℓ": rest, "decoder layer ℓ": t.get("decoder layer ℓ", 0.0), "pooling": t["pooling"]}
    return {k: v / n for k, v in split.items()}


def build_authors(shaped_dir, device, dtype, ours):
    """The whole model, eager attention; the parts ours also has get ours' weights (so both compute
    the same vectors), the rest (layers > ℓ, LM head) random, drawn where the model lives."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(shaped_dir)
    try:
        with torch.device(device):
            model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="eager")
    except (ValueError, ImportError, RuntimeError) as exc:  # some versions refuse a device context
        print(f"  (authors' model built on the host then moved: {str(exc).splitlines()[0][:100]})")
        from scalselect_fast.extract.model import _fast_random_init

        with _fast_random_init():
            model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="eager")
        model = model.to(device)
    missing, _ = model.model.load_state_dict(ours.model.state_dict(), strict=False)
    shared = len(ours.model.state_dict())
    assert len(model.model.state_dict()) - len(missing) == shared, "ours' weights do not all map onto the full model"
    return model.eval()


def collate_chunks(vlm, samples, results, bs):
    """``[(ids, collated batch)]`` of ``bs`` samples each (on the host; needs no model weights)."""
    return [([str(x.id) for x in samples[i:i + bs]], vlm.collate(results[i:i + bs], "right"))
            for i in range(0, len(samples), bs)]


def run_authors(full, chunks, device, layer):
    """samples/s of the authors' way over pre-collated ``chunks`` (same encoded samples as ours)."""
    import torch

    from bench_extract import _baseline_pool

    vecs = {}
    _peak_reset(device)

    def one(ids, b):
        inputs = {k: v.to(device) for k, v in b["inputs"].items()}
        for k, v in inputs.items():
            if v.is_floating_point():
                inputs[k] = v.to(full.dtype)
        with torch.no_grad():
            out = full(**inputs, output_attentions=True, output_hidden_states=True, use_cache=False)
        for sid, v in zip(ids, _baseline_pool(out, inputs, b["roles"], layer, 0.9)):
            vecs[sid] = v
        del out

    one(*chunks[0])  # warm-up
    _sync(device)
    with UtilSampler(device.startswith("cuda")) as util:
        t0 = time.perf_counter()
        for c in chunks:
            one(*c)
        _sync(device)
        dt = time.perf_counter() - t0
    return {"samples_s": sum(len(c[0]) for c in chunks) / dt, "peak_gib": _peak_gib(device), "gpu_util": util.mean,
            "vectors": vecs}


def bench_model(name, args, tmp: Path, device, dtype, rows, deadline):
    import torch

    from scalselect_fast.extract import build_shaped_model, extract_representations, load_vlm

    t_start = time.perf_counter()
    cfg = shrunk_config(name) if args.cpu_smoke else str(CONFIGS / f"{name}.json")
    shaped = build_shaped_model(cfg, tmp / f"model-{name}")
    data = make_dataset(tmp / f"data-{name}", args.n, args.layout)
    samples = read_samples(data)
    t0 = time.perf_counter()
    vlm = load_vlm(shaped, layer=args.layer, dtype=dtype, device=device, random_weights=True)
    print(f"\n== {name}: ours loaded in {time.perf_counter() - t0:.1f} s "
          f"({sum(p.numel() for p in vlm.model.parameters()) / 1e9:.2f} B parameters, "
          f"{len(vlm.language_model.layers)} decoder layers; image processor "
          f"{type(vlm.encoder.image_processor).__name__})")

    # the loader: one core (split) and all cores (the loop's worker pool)
    vlm_processor = vlm.encoder.image_processor
    one_core = time_loader(vlm.encoder, samples[:min(len(samples), 48)], repeats=1)
    results, t_enc = encode_all(vlm, samples, args.workers)
    skipped = [r for r in results if not hasattr(r, "input_ids")]
    if skipped:
        raise SystemExit(f"{name}: {len(skipped)} synthetic samples were skipped: {skipped[0]}")
    loader_rate = len(samples) / t_enc
    tokens = float(np.mean([len(r.input_ids) for r in results]))
    print(f"  loader: {1e3 * one_core['decode_s']:.2f} ms decode + {1e3 * one_core['preprocess_s']:.2f} ms preprocess "
          f"({1e3 * one_core['image_processor_s']:.2f} ms in the image processor) per sample on one core "
          f"({one_core['samples_s_core']:.1f}/s/core); {loader_rate:.1f} samples/s with "
          f"{args.workers} workers; {tokens:.0f} tokens/sample")

    backend = "auto"
    ours = run_ours(vlm, samples, results, args.batch_sizes, device, backend)
    fits = {bs: r for bs, r in ours.items() if "samples_s" in r}
    best_bs = max(fits, key=lambda b: fits[b]["samples_s"])
    best = fits[best_bs]
    for bs, r in ours.items():
        print(f"  ours batch {bs:>4}: " + (r["error"] if "error" in r else
              f"{r['samples_s']:8.1f} samples/s  peak {r['peak_gib']} GiB  GPU util {r['gpu_util']}%"))
    split = split_ours(vlm, samples, results, best_bs, device, backend)
    split = {"decode": one_core["decode_s"], "preprocess": one_core["preprocess_s"], **split}

    # end to end: reader + worker pool + GPU, as `scalselect extract` runs it
    with UtilSampler(device.startswith("cuda")) as util_e2e:
        t0 = time.perf_counter()
        n_e2e = sum(len(ids) for ids, _ in extract_representations(
            vlm, read_samples(data), batch_size=best_bs, num_workers=args.workers, pool_impl=backend))
        e2e = n_e2e / (time.perf_counter() - t0)
    print(f"  ours end to end (reader + {args.workers} workers + GPU, batch {best_bs}): {e2e:.1f} samples/s, "
          f"GPU util {util_e2e.mean}%")
    sizes = [1] + [2 ** k for k in range(1, 16) if 2 ** k <= args.authors_max_batch]
    authors_chunks = {bs: collate_chunks(vlm, samples[:args.n_authors if bs == 1 else 2 * bs],
                                         results[:args.n_authors if bs == 1 else 2 * bs], bs) for bs in sizes}
    full = None
    if time.perf_counter() < deadline:
        t0 = time.perf_counter()
        full = build_authors(shaped, device, dtype, vlm)
        print(f"  authors' model built in {time.perf_counter() - t0:.1f} s "
              f"({sum(p.numel() for p in full.parameters()) / 1e9:.2f} B parameters, ours' weights copied in)")
    del vlm
    gc.collect()
    _peak_reset(device)

    authors = {}
    if full is not None:
        authors[1] = run_authors(full, authors_chunks[1], device, args.layer)
        oom = False
        for bs in sizes[1:]:
            if time.perf_counter() > deadline:
                print(f"  authors batch {bs}: not tried, time budget spent")
                break
            try:
                authors[bs] = run_authors(full, authors_chunks[bs], device, args.layer)
            except Exception as exc:  # noqa: BLE001 - out of memory ends the sweep: the previous size is the largest
                if not _is_oom(exc):
                    raise
                print(f"  authors batch {bs}: out of memory")
                oom = True
                break
        if not oom and max(authors) == sizes[-1]:
            print(f"  authors: batch {sizes[-1]} (the cap, --authors-max-batch) still fit")
        del full
        gc.collect()
        _peak_reset(device)
    else:
        print("  authors' way skipped: time budget spent")
    for b, r in authors.items():
        print(f"  authors batch {b:>3}: {r['samples_s']:8.2f} samples/s  peak {r['peak_gib']} GiB  "
              f"GPU util {r['gpu_util']}%")

    # agreement on the shared samples (random bf16 weights: close, not equal)
    agree = None
    if authors:
        ids = [i for i in authors[1]["vectors"] if i in best["vectors"]]
        a = np.stack([authors[1]["vectors"][i] for i in ids]).astype(np.float64)
        b = np.stack([best["vectors"][i] for i in ids]).astype(np.float64)
        agree = float(np.min(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))
        print(f"  min cosine(ours, authors) over {len(ids)} samples: {agree:.4f}")

    total = sum(split.values())
    print(f"  time split per sample at batch {best_bs} (decode/preprocess: one core):")
    for k, v in split.items():
        print(f"    {k:<22} {1e3 * v:9.3f} ms  {100 * v / total:5.1f}%")
    verdicts = []
    speedup = best["samples_s"] / authors[1]["samples_s"] if authors else None
    best_authors = max((r["samples_s"] for r in authors.values()), default=None)
    if speedup is not None and name.startswith("llava"):
        verdicts.append(("ours / authors batch 1", speedup, FLOOR_SPEEDUP))
    feed = loader_rate / best["samples_s"]
    verdicts.append(("loader all cores / GPU", feed, FLOOR_LOADER))
    for label, value, floor in verdicts:
        tag = "SMOKE (not a measurement)" if args.cpu_smoke else ("PASS" if value >= floor else "FAIL")
        print(f"  floor {label}: {value:.2f}x (>= {floor}x) {tag}")
    if feed < FLOOR_LOADER:
        per_core = one_core["samples_s_core"]
        need = FLOOR_LOADER * best["samples_s"] / per_core
        text_s = one_core["preprocess_s"] - one_core["image_processor_s"]
        limit = max((("JPEG decoding", one_core["decode_s"]), ("the image processor", one_core["image_processor_s"]),
                     ("chat template + tokenisation + roles", text_s)), key=lambda kv: kv[1])[0]
        print(f"  loader limit: {limit} ({1e3 * one_core['decode_s']:.1f} ms decode, "
              f"{1e3 * one_core['preprocess_s']:.1f} ms preprocess of which {1e3 * one_core['image_processor_s']:.1f} ms "
              f"image processor, per sample per core); feeding {FLOOR_LOADER}x the GPU needs ~{need:.1f} cores at "
              f"{per_core:.1f} samples/s/core (have {args.workers} workers)")
    rows.append({
        "run_id": args.run_id, "timestamp": now_utc(), "host": machine()["host"], "device": _device_name(device),
        "mode": "cpu-smoke" if args.cpu_smoke else "gpu", "model": name, "layout": args.layout, "layer": args.layer,
        "dtype": str(dtype).replace("torch.", ""), "n": len(samples), "mean_tokens": round(tokens, 1),
        "ours_batch": best_bs, "ours_samples_s": round(best["samples_s"], 2), "ours_peak_gib": best["peak_gib"],
        "ours_gpu_util": best["gpu_util"], "ours_e2e_samples_s": round(e2e, 2), "e2e_gpu_util": util_e2e.mean,
        "authors_b1_samples_s": round(authors[1]["samples_s"], 3) if authors else None,
        "authors_b1_peak_gib": authors[1]["peak_gib"] if authors else None,
        "authors_max_batch": max(authors) if authors else None,
        "authors_best_samples_s": round(best_authors, 3) if best_authors else None,
        "speedup_vs_b1": round(speedup, 2) if speedup else None, "min_cosine": agree,
        "image_processor": type(vlm_processor).__name__, "loader_workers": args.workers,
        "loader_samples_s": round(loader_rate, 2),
        "loader_samples_s_core": round(one_core["samples_s_core"], 2),
        "ms_image_processor": round(1e3 * one_core["image_processor_s"], 4), "loader_over_gpu": round(feed, 2),
        **{f"ms_{k.replace('->', '_to_').replace(' ', '_').replace('+', '_').replace('<', 'lt').replace('ℓ', 'l')}":
           round(1e3 * v, 4) for k, v in split.items()},
        "seconds": round(time.perf_counter() - t_start, 1), "load": load_average()})


def _device_name(device):
    import torch

    return torch.cuda.get_device_name(0) if device.startswith("cuda") else f"cpu ({machine()['cpu']})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, few samples, on the CPU")
    ap.add_argument("--models", default="llava-1.5-7b,qwen2.5-vl-7b")
    ap.add_argument("--layout", default="parquet", choices=("files", "parquet", "webdataset"))
    ap.add_argument("--n", type=int, default=None, help="samples for ours and the loader [256; smoke 8]")
    ap.add_argument("--n-authors", type=int, default=None, help="samples for the authors' batch 1 [24; smoke 4]")
    ap.add_argument("--batch-sizes", default=None, help="ours, comma list [16,32,64,128; smoke 2,4]")
    ap.add_argument("--authors-max-batch", type=int, default=None, help="[32; smoke 2]")
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None, help="loader processes [all cores; smoke 2]")
    ap.add_argument("--budget-s", type=float, default=300, help="no authors' run starts after this many seconds")
    ap.add_argument("--out", default=None, help="results folder [benchmarks/results or $OUT]")
    args = ap.parse_args(argv)

    import torch

    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("bench_extract_gpu: no CUDA device here; nothing measured. Run it on a GPU machine "
              "(benchmarks/gpu_check.sh), or use --cpu-smoke to check the script end to end on the CPU.")
        return 0
    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    args.n = args.n or (8 if smoke else 256)
    args.n_authors = args.n_authors or (4 if smoke else 24)
    args.batch_sizes = [int(b) for b in (args.batch_sizes or ("2,4" if smoke else "16,32,64,128")).split(",")]
    args.authors_max_batch = args.authors_max_batch or (2 if smoke else 32)
    args.workers = args.workers or (2 if smoke else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                                        else os.cpu_count()))
    args.run_id = now_utc()
    out = Path(args.out or os.environ.get("OUT") or RESULTS)
    deadline = time.perf_counter() + args.budget_s
    if not smoke:
        torch.backends.cuda.matmul.allow_tf32 = True
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if rows and time.perf_counter() > deadline:
                print(f"\n== {name}: skipped, time budget ({args.budget_s:.0f} s) spent")
                continue
            bench_model(name, args, Path(tmp), device, dtype, rows, deadline)
    print(f"\ntotal {time.perf_counter() - deadline + args.budget_s:.0f} s")
    append_csv(out / "extract_gpu.csv", rows)
    print(f"\nappended {len(rows)} rows to {out / 'extract_gpu.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
