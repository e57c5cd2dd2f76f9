"""Benchmark instruction_attended_pool against the eager full attention map.

Sections
--------
1. CPU peak memory at L=4096, H=32 (floor: the chunked torch op >= 20x below the eager map).
   Method: each variant runs in a FRESH subprocess; peak = ru_maxrss after the op minus ru_maxrss
   before it (inputs already built), i.e. the growth of the process's resident-set high-water mark.
   tracemalloc cannot see torch's allocator, hence RSS. The analytic size of the biggest live
   buffers is printed next to it.
2. CPU time, torch-chunked vs eager map at a moderate size (median of repeats, same run).
3. GPU (only with CUDA): B=8, L=2048, H=32, Dh=128, bf16, Triton vs eager softmax(QK^T) + column
   mean; floors >= 5x faster and >= 20x less memory (torch.cuda.max_memory_allocated). Prints
   "skipped: no CUDA" otherwise.

Every row is appended to benchmarks/results/instruction_attended_pool.csv. Run from the repo root:
``python benchmarks/bench_instruction_attended_pool.py`` (default: the floors' sizes, ~2 min on 2 cores, ~5 GiB RAM),
``--quick`` (memory at L=2048), ``--full`` (more repeats, larger CPU timing case), or
``--gpu-only`` (section 3 alone), ``--compile-check`` (TRITON_INTERPRET unset: offline sm_80/sm_90 compile of the autotune candidates).
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import tempfile
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from scalselect_fast.ops import instruction_attended_pool, instruction_column_attention  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _suite import median_time as _median_time  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "instruction_attended_pool.csv"
FIELDS = ["timestamp", "machine", "device", "python", "torch", "triton", "section", "case", "variant",
          "metric", "value", "baseline", "ratio", "floor", "verdict", "method"]


# ------------------------------------------------------------------------------------------------
# Inputs and the eager baseline
# ------------------------------------------------------------------------------------------------
def make_inputs(B, Hq, Hkv, L, Dh, D, dtype, device, seed=0):
    """LLaVA-like layout per sample: 32 system tokens | L/2 visual tokens | instruction text."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, Hq, L, Dh, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, Hkv, L, Dh, generator=g).to(device=device, dtype=dtype)
    hidden = torch.randn(B, L, D, generator=g).to(device=device, dtype=dtype)
    vis = torch.zeros(B, L, dtype=torch.bool)
    vis[:, 32:32 + L // 2] = True
    am = torch.ones(B, L, dtype=torch.bool)
    return q, k, hidden, (~vis).to(device), vis.to(device), am.to(device)


def eager_column_attention(q, k, query_mask, key_mask, attention_mask, scale=None):
    """What the reference recipe does: full [B, H, L, L] softmax (fp32, as transformers' eager
    attention), mean over heads, mean over instruction rows, normalised over visual tokens."""
    B, Hq, L, Dh = q.shape
    G = Hq // k.shape[1]
    scale = Dh ** -0.5 if scale is None else scale
    kk = k.repeat_interleave(G, dim=1) if G > 1 else k
    s = torch.matmul(q, kk.transpose(-1, -2)) * scale
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    s = s.masked_fill(~(causal[None, None] & attention_mask[:, None, None, :]), float("-inf"))
    p = torch.softmax(s, dim=-1, dtype=torch.float32)
    del s
    pm = p.mean(dim=1)
    del p
    rows = (query_mask & attention_mask).float()
    col = torch.einsum("bi,bij->bj", rows / rows.sum(1, keepdim=True), pm)
    col = col * (key_mask & attention_mask)
    return col / col.sum(dim=1, keepdim=True)


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def versions():
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "none"
    return dict(python=platform.python_version(), torch=torch.__version__, triton=tv)


def machine():
    return f"{platform.node()}|{platform.machine()}|{os.cpu_count()}cpu"


def append_rows(rows):
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    new = not RESULTS.exists()
    with open(RESULTS, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in FIELDS})


def median_time(fn, repeats, sync=None):
    """Median seconds after one warm-up call (allocator, Triton compile/autotune)."""
    return _median_time(fn, repeats, sync=sync, warmup=True)[0]


def verdict(ok):
    return "PASS" if ok else "FAIL"


# ------------------------------------------------------------------------------------------------
# 1. CPU memory, one fresh subprocess per variant
# ------------------------------------------------------------------------------------------------
def _child(variant, out_npy, B, Hq, Hkv, L, Dh, D):
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    q, k, hidden, qm, km, am = make_inputs(B, Hq, Hkv, L, Dh, D, torch.float32, "cpu")
    # Touch the code paths once on a tiny case so lazy imports/allocator setup are not counted.
    t = make_inputs(1, 2, 2, 8, 8, 4, torch.float32, "cpu")
    instruction_attended_pool(*t, pool_impl="torch")
    eager_column_attention(t[0], t[1], t[3], t[4], t[5])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    if variant == "eager":
        a = eager_column_attention(q, k, qm, km, am)
    else:
        a, _ = instruction_column_attention(q, k, qm, km, am, pool_impl="torch")
    secs = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    np.save(out_npy, a.numpy())  # (B, L) attention: the parent checks the variants agree
    print(json.dumps(dict(peak_delta=after - before, secs=secs)))


def cpu_memory(rows, base, L=4096):
    B, Hq, Hkv, Dh, D = 1, 32, 32, 128, 4096
    case = f"B{B}_H{Hq}_Hkv{Hkv}_L{L}_Dh{Dh}_D{D}_fp32"
    eager_bytes = B * Hq * L * L * 4
    import psutil

    avail = psutil.virtual_memory().available
    print(f"\n[1] CPU peak memory, {case} (fresh subprocess per variant; ru_maxrss growth)")
    if avail < 3.5 * eager_bytes:
        print(f"skipped measured eager: {avail / 2**30:.1f} GiB free < {3.5 * eager_bytes / 2**30:.1f} GiB needed")
        return
    res, att = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("torch_chunked", "eager"):
            npy = str(Path(tmp) / f"{variant}.npy")
            out = subprocess.run([sys.executable, __file__, "--_child", variant, npy,
                                  *map(str, (B, Hq, Hkv, L, Dh, D))], capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                print(f"  {variant}: child failed:\n{out.stderr[-2000:]}")
                return
            res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
            att[variant] = np.load(npy)
    from scalselect_fast.ops.instruction_attended_pool import _TORCH_CHUNK_ELEMS

    chunk = max(1, _TORCH_CHUNK_ELEMS // (Hq * L))
    analytic_chunked = Hq * chunk * L * 4  # the one fp32 logits buffer of a chunk (softmax in place)
    analytic_eager = 2 * eager_bytes  # logits + fp32 softmax alive together
    e, c = res["eager"]["peak_delta"], res["torch_chunked"]["peak_delta"]
    ratio = e / max(c, 1)
    agree = float(np.nanmax(np.abs(att["eager"] - att["torch_chunked"])))
    ok = ratio >= 20 and agree <= 1e-5  # a memory win only counts with the same attention
    print(f"  {'variant':<15}{'peak RSS growth':>18}{'analytic':>14}{'time s':>10}")
    print(f"  {'eager map':<15}{e / 2**20:>15.1f} MiB{analytic_eager / 2**20:>10.0f} MiB{res['eager']['secs']:>10.2f}")
    print(f"  {'torch chunked':<15}{c / 2**20:>15.1f} MiB{analytic_chunked / 2**20:>10.0f} MiB"
          f"{res['torch_chunked']['secs']:>10.2f}")
    print(f"  ratio eager/chunked = {ratio:.1f}x (floor 20x) with max |a diff| {agree:.2e} (<= 1e-5): "
          f"{verdict(ok)}")
    method = "ru_maxrss growth in a fresh subprocess (inputs prebuilt)"
    rows.append(dict(base, section="cpu_memory", case=case, variant="torch_chunked", metric="peak_bytes", value=c,
                     baseline=e, ratio=f"{ratio:.2f}", floor=20, verdict=verdict(ok), method=method))
    rows.append(dict(base, section="cpu_memory", case=case, variant="eager", metric="peak_bytes", value=e,
                     method=method))
    rows.append(dict(base, section="cpu_memory", case=case, variant="torch_chunked", metric="analytic_bytes",
                     value=analytic_chunked, baseline=analytic_eager,
                     ratio=f"{analytic_eager / analytic_chunked:.2f}", method="largest live buffers, formula"))


# ------------------------------------------------------------------------------------------------
# 2. CPU time
# ------------------------------------------------------------------------------------------------
def cpu_time(rows, base, full):
    B, Hq, Hkv, L, Dh, D = (2, 16, 4, 2048, 64, 1024) if full else (2, 16, 4, 1024, 64, 1024)
    repeats = 5 if full else 3
    case = f"B{B}_Hq{Hq}_Hkv{Hkv}_L{L}_Dh{Dh}_D{D}_fp32"
    q, k, hidden, qm, km, am = make_inputs(B, Hq, Hkv, L, Dh, D, torch.float32, "cpu")
    t_e = median_time(lambda: eager_column_attention(q, k, qm, km, am), repeats)
    t_c = median_time(lambda: instruction_column_attention(q, k, qm, km, am, pool_impl="torch"), repeats)
    t_p = median_time(lambda: instruction_attended_pool(q, k, hidden, qm, km, am, pool_impl="torch"), repeats)
    a_e = eager_column_attention(q, k, qm, km, am)
    a_c, _ = instruction_column_attention(q, k, qm, km, am, pool_impl="torch")
    err = (a_e - a_c).abs().max().item()
    # Useful FLOPs of the chunked path: logits of instruction rows against their visible keys.
    n_rows = int(qm.sum())
    gflop = 2 * Hq * Dh * n_rows * L / 2 / 1e9  # about half the keys are visible on average
    print(f"\n[2] CPU time, {case}, median of {repeats} (torch threads: {torch.get_num_threads()})")
    print(f"  eager map            {t_e * 1e3:9.1f} ms")
    print(f"  torch chunked (a_j)  {t_c * 1e3:9.1f} ms   speed-up {t_e / t_c:.2f}x   ~{gflop / t_c:.1f} GFLOP/s")
    print(f"  torch chunked + pool {t_p * 1e3:9.1f} ms   max |a diff| vs eager {err:.2e}")
    rows.append(dict(base, section="cpu_time", case=case, variant="torch_chunked", metric="seconds", value=t_c,
                     baseline=t_e, ratio=f"{t_e / t_c:.2f}", method=f"median of {repeats}"))
    rows.append(dict(base, section="cpu_time", case=case, variant="torch_chunked+pool", metric="seconds", value=t_p,
                     baseline=t_e, ratio=f"{t_e / t_p:.2f}", method=f"median of {repeats}"))


# ------------------------------------------------------------------------------------------------
# 3. GPU
# ------------------------------------------------------------------------------------------------
def gpu(rows, base, full, dims=(8, 32, 32, 2048, 128, 4096), repeats=None):
    print("\n[3] GPU, B=8 L=2048 H=32 Dh=128 bf16: Triton vs eager softmax(QK^T) + column mean")
    if not torch.cuda.is_available():
        print("  skipped: no CUDA")
        rows.append(dict(base, section="gpu", case="B8_H32_L2048_Dh128_bf16", variant="triton", metric="skipped",
                         value="no CUDA"))
        return
    B, Hq, Hkv, L, Dh, D = dims
    case = f"B{B}_Hq{Hq}_Hkv{Hkv}_L{L}_Dh{Dh}_D{D}_bf16"
    dev = "cuda"
    base = dict(base, device=torch.cuda.get_device_name())
    q, k, hidden, qm, km, am = make_inputs(B, Hq, Hkv, L, Dh, D, torch.bfloat16, dev)
    sync = torch.cuda.synchronize
    repeats = repeats or (20 if full else 10)

    def peak(fn):
        fn()
        sync()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        sync()
        return torch.cuda.max_memory_allocated() - start

    variants = {
        "eager": lambda: eager_column_attention(q, k, qm, km, am),
        "triton": lambda: instruction_column_attention(q, k, qm, km, am, pool_impl="triton"),
        "torch_chunked": lambda: instruction_column_attention(q, k, qm, km, am, pool_impl="torch"),
        "triton+pool": lambda: instruction_attended_pool(q, k, hidden, qm, km, am, pool_impl="triton"),
    }
    res = {}
    for name, fn in variants.items():
        t = median_time(fn, repeats, sync)
        m = peak(fn)
        res[name] = (t, m)
    a_e = eager_column_attention(q, k, qm, km, am)
    a_t, _ = instruction_column_attention(q, k, qm, km, am, pool_impl="triton")
    err = (a_e - a_t).abs().max().item()
    t_e, m_e = res["eager"]
    n_rows = int(qm.sum()) // B
    tflop = 2 * B * Hq * Dh * n_rows * L / 2 * 2 / 1e12  # two passes, about half the keys visible
    print(f"  {'variant':<15}{'ms':>10}{'peak MiB':>12}{'speed-up':>10}{'mem ratio':>11}")
    for name, (t, m) in res.items():
        print(f"  {name:<15}{t * 1e3:>10.2f}{m / 2**20:>12.1f}{t_e / t:>9.2f}x{m_e / max(m, 1):>10.1f}x")
    t_t, m_t = res["triton"]
    sp, mr = t_e / t_t, m_e / max(m_t, 1)
    same = err <= 1e-4  # bf16 inputs, fp32 accumulation on both sides (2e-7 measured on an H100)
    print(f"  triton speed-up {sp:.2f}x (floor 5x): {verdict(sp >= 5 and same)}; memory {mr:.1f}x less (floor 20x): "
          f"{verdict(mr >= 20 and same)}; ~{tflop / t_t:.1f} TFLOP/s; max |a diff| vs eager {err:.2e} (<= 1e-4)")
    for name, (t, m) in res.items():
        rows.append(dict(base, section="gpu", case=case, variant=name, metric="seconds", value=t, baseline=t_e,
                         ratio=f"{t_e / t:.2f}", floor=5 if name == "triton" else "",
                         verdict=verdict(sp >= 5 and same) if name == "triton" else "",
                         method=f"median of {repeats}"))
        rows.append(dict(base, section="gpu", case=case, variant=name, metric="peak_bytes", value=m, baseline=m_e,
                         ratio=f"{m_e / max(m, 1):.2f}", floor=20 if name == "triton" else "",
                         verdict=verdict(mr >= 20 and same) if name == "triton" else "",
                         method="cuda max_memory_allocated"))


# ------------------------------------------------------------------------------------------------
# 4. Offline compile check (no GPU needed): resources of every autotune candidate on sm_80 / sm_90
# ------------------------------------------------------------------------------------------------
def compile_check(rows, base, archs=(80, 90), dtype=torch.bfloat16, head_dim=128):
    """Compile each autotune candidate of both kernels to a cubin with the triton wheel's ptxas and
    read registers / spill (local memory) / shared memory with cuobjdump. Needs TRITON_INTERPRET
    unset (the kernels must be JIT functions)."""
    import importlib
    import re
    import tempfile

    import triton

    mod = importlib.import_module("scalselect_fast.ops.instruction_attended_pool")
    if mod._is_interpreted():
        print("\n[4] compile check skipped: TRITON_INTERPRET=1 is set (run with it unset)")
        return
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    print(f"\n[4] offline compile of the autotune candidates ({dtype}, head_dim={head_dim}); "
          "regs/local (spill) from cuobjdump")
    print(f"  {'arch':<6}{'kernel':<24}{'BM':>5}{'BN':>5}{'warps':>6}{'stages':>7}{'regs':>6}{'spill B':>8}"
          f"{'smem KiB':>9}{'mma':>7}{'s':>6}")
    for arch in archs:
        for kernel in (mod._row_lse_kernel, mod._visual_colsum_kernel):
            for cfg in mod._autotune_configs():
                bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
                t0 = time.perf_counter()
                try:
                    ck = mod._compile_offline(kernel, dtype, bm, bn, head_dim=head_dim, arch=arch,
                                              num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                except Exception as exc:  # report and go on: a failing candidate is a finding
                    print(f"  sm_{arch:<3}{kernel.__name__:<24}{bm:>5}{bn:>5}{cfg.num_warps:>6}{cfg.num_stages:>7}"
                          f"  FAILED: {type(exc).__name__}: {str(exc)[:80]}")
                    rows.append(dict(base, section="compile_check", case=f"sm_{arch}", variant=kernel.__name__,
                                     metric=f"BM{bm}_BN{bn}_w{cfg.num_warps}_s{cfg.num_stages}", value="FAILED"))
                    continue
                secs = time.perf_counter() - t0
                with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                    f.write(ck.asm["cubin"])
                    f.flush()
                    usage = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True,
                                           text=True).stdout
                regs = int(re.search(r"REG:(\d+)", usage).group(1))
                local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
                ptx = ck.asm["ptx"]
                mma = "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else "fma")
                smem = ck.metadata.shared
                print(f"  sm_{arch:<3}{kernel.__name__:<24}{bm:>5}{bn:>5}{cfg.num_warps:>6}{cfg.num_stages:>7}"
                      f"{regs:>6}{local:>8}{smem / 1024:>9.1f}{mma:>7}{secs:>6.1f}")
                rows.append(dict(base, section="compile_check", case=f"sm_{arch}_{str(dtype)[6:]}_d{head_dim}",
                                 variant=kernel.__name__, metric=f"BM{bm}_BN{bn}_w{cfg.num_warps}_s{cfg.num_stages}",
                                 value=f"regs={regs};spill={local};smem={smem};{mma}",
                                 method="triton.compile offline + cuobjdump -res-usage"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="more repeats and a larger CPU timing case")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: the memory section at L=2048 (the issue's floor is stated at L=4096)")
    ap.add_argument("--skip-memory", action="store_true", help="skip the L=4096 CPU memory section (~5 GiB RAM)")
    ap.add_argument("--compile-check", action="store_true",
                    help="only compile every autotune candidate offline for sm_80/sm_90 and report resources "
                         "(no GPU needed; run with TRITON_INTERPRET unset)")
    ap.add_argument("--gpu-only", action="store_true", help="only the GPU section (what gpu_check.sh runs)")
    ap.add_argument("--_child", nargs=8, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        variant, out_npy, *dims = args._child
        _child(variant, out_npy, *map(int, dims))
        return
    torch.manual_seed(0)
    base = dict(timestamp=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), machine=machine(),
                device="cpu", **versions())
    rows = []
    if args.compile_check:
        compile_check(rows, base)
        append_rows(rows)
        print(f"\nappended {len(rows)} rows to {RESULTS.relative_to(ROOT)}")
        return
    if not args.gpu_only:
        if not args.skip_memory:
            cpu_memory(rows, base, L=2048 if args.quick else 4096)
        cpu_time(rows, base, args.full)
    gpu(rows, base, args.full)
    append_rows(rows)
    print(f"\nappended {len(rows)} rows to {RESULTS.relative_to(ROOT)}")
    return 1 if any(r.get("verdict") == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
