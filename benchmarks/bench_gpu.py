"""GPU floors of the subspace fit and scoring (issue 4), measured side by side in one run.

1. Gram pass throughput of the library's own accumulator (``GramAccumulator.update``: chunked
   float32 products added into the float64 Gram, plus the column sums) on device-resident blocks,
   vs the GPU's measured throughput of one bare float32 ``aᵀa`` of the same chunk shape
   (floor: ≥ 60%). CuPy's default GEMM precision is used for both (TF32 only if CUPY_TF32=1).
2. fit+score of an N×d fp16 matrix streamed from host memory (default 10M × 4096): wall time and
   effective GB/s against the pinned host→device copy bandwidth measured in the same run.
   To keep host memory and generation time bounded, the N rows are ``reps`` shards that all view
   one host buffer of ``N / reps`` rows (stated in the output); the bytes still cross PCIe N times.

Prints a table, appends CSV rows to ``benchmarks/results/gpu.csv``. Without CUDA it says so and
exits 0 (nothing is measured).

Usage: ``python benchmarks/bench_gpu.py [--n 10000000] [--d 4096] [--reps 10]``
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scalselect_fast.gpu import cuda_available  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "gpu.csv"


def _sync(cp):
    cp.cuda.get_current_stream().synchronize()


def _time(cp, fn, repeats=5):
    ts = []
    for _ in range(repeats):
        _sync(cp)
        t = time.perf_counter()
        fn()
        _sync(cp)
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


class RepeatedSource:
    """Factory for an N-row source of ``reps`` shards that all view one host buffer."""

    def __new__(cls, base: np.ndarray, reps: int):
        from scalselect_fast.store import MatrixSource, ShardInfo

        class _Repeated(MatrixSource):
            def _shard_array(self, shard):
                return base

        src = _Repeated()
        m = base.shape[0]
        src.n, src.d, src.dtype, src.provenance = m * reps, base.shape[1], "float16", {}
        src.shards = [ShardInfo(name=f"rep{r}", offset=r * m, count=m) for r in range(reps)]
        return src


def _probe_products(cp, chunk, d, rows):
    """How fast the chunk product can run on this GPU (informational, no floor): the bare fp32
    ``aᵀa``, cuBLAS ``syrk`` (one triangle, half the flops), and TF32 ``aᵀa`` through torch."""
    a = cp.random.standard_normal((chunk, d), dtype=cp.float32)
    flop = 2 * chunk * d * d
    g = cp.empty((d, d), cp.float32)
    probes = {"matmul(a.T, a, out=g)": lambda: cp.matmul(a.T, a, out=g)}
    try:
        from cupy import cublas

        probes["cublas.syrk (upper)"] = lambda: cublas.syrk("T", a, out=g, lower=False)
    except Exception as exc:  # an older CuPy: say so
        print(f"probe: cupy.cublas.syrk unavailable ({exc})")
    try:
        import torch

        ta = torch.from_dlpack(a)

        def tf32():
            torch.backends.cuda.matmul.allow_tf32 = True
            ta.T @ ta
            torch.backends.cuda.matmul.allow_tf32 = False
        probes["torch TF32 a.T @ a"] = tf32
    except Exception as exc:
        print(f"probe: torch TF32 unavailable ({exc})")
    for name, fn in probes.items():
        try:
            t = _time(cp, fn)
        except Exception as exc:
            print(f"probe {name}: failed ({type(exc).__name__}: {exc})")
            continue
        print(f"probe {name:24} {chunk}x{d}: {t * 1e3:7.2f} ms = {flop / t / 1e12:6.1f} TFLOP/s (aTa-equivalent)")
        rows.append(dict(measure="probe_product", what=f"{name} {chunk}x{d}", value=f"{t * 1e3:.2f} ms",
                         ratio=f"{flop / t / 1e12:.1f} TFLOP/s", verdict="", note="informational"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=10, help="shards viewing one host buffer of n/reps rows")
    ap.add_argument("--block-rows", type=int, default=65536)
    ap.add_argument("--gram-modes", default="gemm,syrk",
                    help="device Gram products to measure in part 1 (SCALSELECT_GPU_GRAM values)")
    args = ap.parse_args(argv)
    ok, why = cuda_available()
    if not ok:
        print(f"bench_gpu: skipped, no CUDA ({why}); nothing measured")
        return 0
    import cupy as cp
    import cupyx

    import scalselect_fast as ss
    from scalselect_fast.gpu import DeviceStaging
    from scalselect_fast.subspace import GRAM_CHUNK_ROWS, GramAccumulator

    rows: list[dict] = []
    dev_name = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"device: {dev_name}; cupy {cp.__version__}")
    d, chunk = args.d, min(GRAM_CHUNK_ROWS, args.block_rows)

    # 1. the library's Gram accumulator on device blocks vs a bare GEMM of the same chunk shape
    a = cp.random.standard_normal((chunk, d), dtype=cp.float32)
    gemm_s = _time(cp, lambda: a.T @ a)
    gemm_tflops = 2 * chunk * d * d / gemm_s / 1e12
    n_blocks = 4
    blocks = [cp.random.standard_normal((args.block_rows, d), dtype=cp.float32) for _ in range(n_blocks)]
    default_mode = os.environ.get("SCALSELECT_GPU_GRAM", "gemm")
    for mode in args.gram_modes.split(","):
        os.environ["SCALSELECT_GPU_GRAM"] = mode
        acc = GramAccumulator(d, np.zeros(d), xp=cp)
        pass_s = _time(cp, lambda: [acc.update(b) for b in blocks], repeats=3)
        pass_tflops = 2 * n_blocks * args.block_rows * d * d / pass_s / 1e12
        frac = pass_tflops / gemm_tflops
        rows.append(dict(measure=f"gram_pass_vs_gemm[{mode}]",
                         what=f"GramAccumulator {n_blocks}x{args.block_rows}x{d} fp32 vs aTa {chunk}x{d}",
                         value=f"{pass_tflops:.1f} vs {gemm_tflops:.1f} TFLOP/s", ratio=f"{frac:.2f}",
                         verdict="PASS" if frac >= 0.6 else "FAIL", note="floor >= 0.60 (aTa-equivalent flops)"))
        print(f"Gram accumulator [{mode}]: {pass_tflops:.1f} TFLOP/s vs bare aTa {gemm_tflops:.1f} ({frac:.2f})")
    os.environ["SCALSELECT_GPU_GRAM"] = default_mode
    _probe_products(cp, chunk, d, rows)

    # 2. H2D bandwidth (pinned), the staging path alone, and fit+score streamed from host
    host = cupyx.empty_pinned((args.block_rows, d), np.float16)
    host[...] = 1
    dbuf = cp.empty((args.block_rows, d), cp.float16)
    h2d_s = _time(cp, lambda: dbuf.set(host))
    h2d_gbs = host.nbytes / h2d_s / 1e9
    rows.append(dict(measure="h2d_pinned", what=f"{args.block_rows}x{d} fp16 pinned -> device",
                     value=f"{h2d_s * 1e3:.1f} ms", ratio=f"{h2d_gbs:.1f} GB/s", verdict="", note="reference"))
    m = args.n // args.reps
    r = 64
    # rank-r structure with a decaying spectrum plus isotropic noise, generated on the device
    cp.random.seed(0)
    basis = cp.random.standard_normal((r, d), dtype=cp.float32) / (1 + cp.arange(r, dtype=cp.float32))[:, None]
    base = np.empty((m, d), np.float16)  # pageable, like data read from disk: the staging copy is part of the cost
    t = time.perf_counter()
    for s0 in range(0, m, args.block_rows):
        e = min(m, s0 + args.block_rows)
        x = cp.random.standard_normal((e - s0, r), dtype=cp.float32) @ basis \
            + 0.005 * cp.random.standard_normal((e - s0, d), dtype=cp.float32)
        base[s0:e] = x.astype(cp.float16).get()
    print(f"generated the {m}x{d} fp16 host buffer in {time.perf_counter() - t:.1f}s")
    src = RepeatedSource(base, args.reps)

    staging = DeviceStaging()
    out = cp.empty((args.block_rows, d), cp.float32)
    shift = np.zeros(d)
    _sync(cp)
    t = time.perf_counter()
    for _, block in src.iter_blocks(args.block_rows):
        staging.shift_block(block, shift, out[:block.shape[0]], False)
    _sync(cp)
    t_stage = time.perf_counter() - t
    staging.close()
    stage_gbs = src.n * d * 2 / t_stage / 1e9
    rows.append(dict(measure="staging_pass", what=f"{src.n}x{d} fp16 host -> device fp32 (copy+decode only)",
                     value=f"{t_stage:.1f}s", ratio=f"{stage_gbs:.1f} GB/s", verdict="",
                     note=f"{stage_gbs / h2d_gbs:.2f} of pinned H2D; {staging.copy_threads} copy threads"))

    t = time.perf_counter()
    sub = ss.fit_subspace(src, solver="exact", array_backend="cupy", block_rows=args.block_rows)
    t_fit = time.perf_counter() - t
    t = time.perf_counter()
    scores = ss.leverage_scores(src, sub, device="cuda", block_rows=args.block_rows)
    t_score = time.perf_counter() - t
    ss.top_k(scores, "16%")
    total = t_fit + t_score
    gb = 2 * src.n * d * 2 / 1e9  # two passes of fp16 bytes
    fit_t = {k: round(v, 2) for k, v in sub.info.get("timings", {}).items()}
    gram_tflops = 2 * src.n * d * d / fit_t.get("gram_pass_s", t_fit) / 1e12
    print(f"fit [{default_mode}] {t_fit:.1f}s {fit_t} (Gram pass {gram_tflops:.1f} TFLOP/s); score {t_score:.1f}s; k={sub.k}")
    rows.append(dict(measure="fit+score_streamed",
                     what=f"{src.n}x{d} fp16 ({args.reps} shards over one {m}-row buffer)",
                     value=f"{total:.1f}s", ratio=f"{gb / total:.1f} GB/s", verdict="",
                     note=f"{gb / total / h2d_gbs:.2f} of pinned H2D {h2d_gbs:.1f} GB/s; fit {t_fit:.1f}s "
                          f"(Gram [{default_mode}] {gram_tflops:.1f} TFLOP/s), score {t_score:.1f}s; k={sub.k}"))

    print(f"{'measure':20} {'what':64} {'value':>24} {'ratio/rate':>14} verdict  note")
    for row in rows:
        print(f"{row['measure']:20} {row['what']:64} {row['value']:>24} {row['ratio']:>14} {row['verdict']:7}  "
              f"{row['note']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    new = not RESULTS.exists()
    with open(RESULTS, "a", newline="") as fh:
        w = csv.writer(fh)
        if new:
            w.writerow(["timestamp", "machine", "device", "cupy", "measure", "what", "value", "ratio", "verdict",
                        "note"])
        for row in rows:
            w.writerow([dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), platform.node(),
                        dev_name, cp.__version__, *row.values()])
    return 1 if any(row["verdict"] == "FAIL" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
