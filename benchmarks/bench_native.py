"""Native kernels vs the numpy fallback, side by side in one run.

    python benchmarks/bench_native.py            # quick: 50k x 768 rows, k = 200
    python benchmarks/bench_native.py --full     # 200k rows, more repeats
    python benchmarks/bench_native.py --n 100000 --d 1024 --k 64

Measures (median of interleaved repeats; ratios are per-round, so machine load cancels out):
* ``center_block``: GB/s of input (fp16, fp32) for native vs the numpy fallback; floor (the native
  engineer's brief): fp16 >= 5 GB/s.
* ``leverage_block``: GB/s of input and GFLOP/s (2·n·d·k) for native (default: one worker per core,
  float64 GEMM, scores rounded to float32) vs the fallback, each as a ratio to a bare float64
  ``X @ W`` of the same size timed in the same rounds; target <= 1.3x (issue 2's floor for fit+score
  vs bare BLAS products applies to the projection too). The bare float32 product and the native
  ``gemm="float32"`` knob are timed beside them: the price of the float64 products that make the
  scores the same on every CPU (issue 19). Also the accuracy of float32 vs float64 tiles.
* ``top_k_block`` / ``top_k_merge``: rows/s for a 16% budget, native vs fallback.

Appends one CSV row per measurement to ``benchmarks/results/native.csv``.
"""
from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _suite import RESULTS, append_csv, load_average, machine, now_utc, versions  # noqa: E402

from scalselect_fast import native  # noqa: E402

N = native._native


CPU_TIMES: dict = {}


def interleaved(variants: dict, repeats: int, baseline: str | None = None) -> dict:
    """Run every variant once per round; return {name: (median_s, median time ratio to baseline)}.

    Also records the median process CPU seconds per variant in CPU_TIMES (all threads): on a
    shared, oversubscribed machine wall time mostly measures the share of CPU we were given.
    """
    times = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    out = {}
    for name, ts in times.items():
        ts = np.asarray(ts)
        ratio = float(np.median(ts / np.asarray(times[baseline]))) if baseline else float("nan")
        out[name] = (float(np.median(ts)), ratio)
        CPU_TIMES[name] = float(np.median(cpu[name]))
    return out


def blocks(n: int, block: int):
    return [(i, min(block, n - i)) for i in range(0, n, block)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=None, help="rows (default 50k; 200k with --full)")
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--block", type=int, default=8192, help="rows per kernel call (like the streaming passes)")
    ap.add_argument("--repeats", type=int, default=None, help="rounds (default 5; 9 with --full)")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)
    n = args.n or (200_000 if args.full else 50_000)
    reps = args.repeats or (9 if args.full else 5)
    d, k, B = args.d, args.k, args.block
    if N is None:
        print(f"native extension not in use ({native.FALLBACK_REASON}); build it with "
              f"`python setup.py build_ext --inplace`", file=sys.stderr)
        return 2

    rng = np.random.default_rng(0)
    X32 = (rng.standard_normal((n, d), dtype=np.float32) + 5.0).astype(np.float32)
    X = {"float16": X32.astype(np.float16), "float32": X32}
    X64 = X32.astype(np.float64)
    shift = X32[:1000].astype(np.float64).mean(0)
    W = rng.standard_normal((d, k)) / np.sqrt(d)
    W32 = W.astype(np.float32)
    run_id, ts, load0 = uuid.uuid4().hex[:8], now_utc(), load_average()
    info = {**machine(), **versions()}
    rows, table, verdict = [], [], True

    def row(op, dtype, impl, sec, *, gbps=None, gflops=None, rows_s=None, ratio=None, baseline="",
            floor="", status="", cpu_s=None, nbytes=None):
        gb_cpu = nbytes / cpu_s / 1e9 if (cpu_s and nbytes) else None
        rows.append({"run_id": run_id, "timestamp": ts, "host": info["host"], "cpu": info["cpu"],
                     "cores": info["cores"], "python": info["python"], "numpy": info["numpy"],
                     "scipy": info["scipy"], "blas": info["blas"], "native_backend": info["native_backend"],
                     "native_threads": N.num_threads(), "simd": N.simd_active(), "load_avg": load0,
                     "op": op, "dtype": dtype, "impl": impl, "n": n, "d": d, "k": k, "block_rows": B,
                     "repeats": reps, "median_s": f"{sec:.6f}",
                     "gb_per_s": "" if gbps is None else f"{gbps:.3f}",
                     "gflop_per_s": "" if gflops is None else f"{gflops:.2f}",
                     "rows_per_s": "" if rows_s is None else f"{rows_s:.4g}",
                     "cpu_s": "" if cpu_s is None else f"{cpu_s:.6f}",
                     "gb_per_cpu_s": "" if gb_cpu is None else f"{gb_cpu:.3f}",
                     "ratio": "" if ratio is None else f"{ratio:.4g}", "ratio_vs": baseline,
                     "floor": floor, "status": status})
        table.append((op, dtype, impl, f"{sec * 1e3:9.1f}", "" if gbps is None else f"{gbps:6.2f}",
                      "" if gb_cpu is None else f"{gb_cpu:6.2f}",
                      "" if gflops is None else f"{gflops:6.1f}", "" if rows_s is None else f"{rows_s:9.3g}",
                      "" if ratio is None else f"{ratio:.3g} {baseline}", status))

    # -------------------------------------------------------------------- center_block
    out32 = np.empty((n, d), np.float32)
    out32.fill(0.0)  # first-touch page faults are not the kernel's cost
    for dt, x in X.items():
        def nat(x=x):
            for i, m in blocks(n, B):
                native.center_block(x[i:i + m], shift, out32[i:i + m])

        def fb(x=x):
            for i, m in blocks(n, B):
                native._center_block_py(x[i:i + m], shift, out32[i:i + m])

        res = interleaved({"native": nat, "numpy": fb}, reps, baseline="numpy")
        for impl, (sec, ratio) in res.items():
            gbps = x.nbytes / sec / 1e9
            floor = status = ""
            if impl == "native" and dt == "float16":
                floor, status = ">= 5 GB/s", "PASS" if gbps >= 5 else "FAIL"
                verdict &= gbps >= 5
            row("center_block", dt, impl, sec, gbps=gbps, ratio=1 / ratio if impl == "native" else None,
                baseline="x faster than numpy" if impl == "native" else "", floor=floor, status=status,
                cpu_s=CPU_TIMES[impl], nbytes=x.nbytes)

    # -------------------------------------------------------------------- leverage_block
    lev = np.zeros(n)
    flops = 2.0 * n * d * k
    for dt, x in X.items():
        def bare():
            for i, m in blocks(n, B):
                X64[i:i + m] @ W

        def bare32():
            for i, m in blocks(n, B):
                X32[i:i + m] @ W32

        def lev_native(x=x, **kw):
            for i, m in blocks(n, B):
                N.leverage_block(x[i:i + m], shift, W, lev[i:i + m], None, False, False, **kw)

        variants = {
            "bare fp64 X@W": bare,
            "bare fp32 X@W": bare32,
            "native": lev_native,
            "native threads=1 (BLAS-threaded tiles)": lambda: lev_native(threads=1),
            "native gemm=float32": lambda: lev_native(gemm="float32"),
        }
        res = interleaved(variants, reps, baseline="bare fp64 X@W")

        def fb(x=x):
            for i, m in blocks(n, B):
                native._leverage_block_py(x[i:i + m], shift, W, lev[i:i + m])

        # the float64 numpy fallback is slow: fewer rounds, still interleaved with the baseline
        res_fb = interleaved({"bare fp64 X@W": bare, "numpy fallback": fb}, max(2, reps // 2),
                             baseline="bare fp64 X@W")
        res["numpy fallback"] = res_fb["numpy fallback"]
        for impl, (sec, ratio) in res.items():
            floor = status = ""
            if impl == "native" and dt == "float32":
                floor, status = "<= 1.3x bare", "PASS" if ratio <= 1.3 else "FAIL"
                verdict &= ratio <= 1.3
            bare_row = impl.startswith("bare")
            row("leverage_block", dt, impl, sec, gbps=x.nbytes / sec / 1e9 if not bare_row else
                (X64 if "fp64" in impl else X32).nbytes / sec / 1e9, gflops=flops / sec / 1e9,
                ratio=None if impl == "bare fp64 X@W" else ratio,
                baseline="" if impl == "bare fp64 X@W" else "x bare fp64 time", floor=floor, status=status)

    # accuracy of the float32 tiles vs float64 tiles, against the float64 reference
    sub = X["float16"][: min(n, 20_000)]
    ref = native._leverage_block_py(sub, shift, W, np.empty(len(sub)))
    acc = {}
    for g in ("float32", "float64"):
        o = np.empty(len(sub))
        N.leverage_block(sub, shift, W, o, None, False, False, gemm=g)
        acc[g] = float(np.max(np.abs(o - ref) / ref))
        row("leverage_accuracy", "float16", f"gemm={g}", 0.0, ratio=acc[g], baseline="max rel err vs float64")

    # -------------------------------------------------------------------- top-k
    nt = max(n * 20, 1_000_000)
    scores = np.round(rng.standard_normal(nt), 4)
    budget = int(0.16 * nt)
    res = interleaved({"native": lambda: native.top_k_block(scores, 0, budget),
                       "numpy": lambda: native._top_k_block_py(scores, 0, budget)}, reps, baseline="numpy")
    for impl, (sec, ratio) in res.items():
        row("top_k_block", "float64", impl, sec, rows_s=nt / sec, ratio=1 / ratio if impl == "native" else None,
            baseline="x faster than numpy" if impl == "native" else "")
    cuts = np.linspace(0, nt, 9).astype(int)
    parts = [native.top_k_block(scores[a:b], a, budget) for a, b in zip(cuts[:-1], cuts[1:])]
    total = sum(len(p[0]) for p in parts)
    res = interleaved({"native": lambda: native.top_k_merge(parts, budget),
                       "numpy": lambda: native._top_k_merge_py(parts, budget)}, reps, baseline="numpy")
    for impl, (sec, ratio) in res.items():
        row("top_k_merge(8 parts)", "float64", impl, sec, rows_s=total / sec,
            ratio=1 / ratio if impl == "native" else None, baseline="x faster than numpy" if impl == "native" else "")

    # -------------------------------------------------------------------- report
    print(f"bench_native  n={n} d={d} k={k} block={B} repeats={reps}  threads={N.num_threads()} "
          f"simd={N.simd_active()}  load avg {load0}")
    print(f"{info['cpu']} ({info['cores']} cores); numpy {info['numpy']}, scipy {info['scipy']}; {info['blas']}")
    hdr = ("op", "dtype", "impl", "median ms", "GB/s", "GB/cpu-s", "GFLOP/s", "rows/s", "ratio (median per round)",
           "floor")
    widths = [max(len(str(r[i])) for r in [hdr, *table]) for i in range(len(hdr))]
    for r in [hdr, *table]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print(f"leverage accuracy (fp16 rows, max rel err vs float64): sgemm tiles {acc['float32']:.2e}, "
          f"dgemm tiles {acc['float64']:.2e}")
    if not args.no_csv:
        append_csv(RESULTS / "native.csv", rows)
        print(f"appended {len(rows)} rows to {RESULTS / 'native.csv'}")
    print("GB/cpu-s = input bytes per CPU-second of this process (all threads): a load-robust view of the\n"
          "kernel's cost on a shared machine; the floors use wall-clock GB/s and per-round time ratios.")
    print("floors:", "PASS" if verdict else "FAIL", f"(load average at start: {load0})")
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
