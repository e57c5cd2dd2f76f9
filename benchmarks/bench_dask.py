"""Dask overhead: fit + score + select on a 2-worker LocalCluster vs the same job on one process.

    python benchmarks/bench_dask.py                    # 2M x 512 fp16 (2 GB) temp store, 8 shards
    python benchmarks/bench_dask.py --n 4000000 --d 1024 --repeats 3

Both sides get the same two cores: the single-process run uses 2 BLAS threads, the cluster 2 worker
processes with 1 thread each (Dask sets OPENBLAS/OMP_NUM_THREADS=1 in its workers). Timed:
``fit_subspace`` + ``leverage_scores`` + ``top_k`` on one node, and ``distributed.fit_subspace`` +
``distributed.select`` (per-shard scores and top-k lists on the workers, merged pairwise) on the
cluster; cluster start-up is reported separately, not counted. The runs alternate (one, dask, one,
dask, ...) so both see the same page-cache state; medians are compared.

Floor (issue 7): Dask time ≤ 1.5 x single-node time for N ≥ 2M, and the selected ids identical.
CSV rows: benchmarks/results/dask.csv (machine, load average, versions, timestamp).
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import scalselect_fast as ss  # noqa: E402
from scalselect_fast import distributed as sd  # noqa: E402
from scalselect_fast import native  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "dask.csv"
FLOOR = 1.5


def single(store, budget, block_rows):
    t = time.perf_counter()
    sub = ss.fit_subspace(store, block_rows=block_rows)
    t_fit = time.perf_counter() - t
    scores = ss.leverage_scores(store, sub, block_rows=block_rows)
    idx = ss.top_k(scores, budget)
    return time.perf_counter() - t, t_fit, sub, idx


def dask(store, budget, block_rows, client):
    t = time.perf_counter()
    sub = sd.fit_subspace(store, client, block_rows=block_rows)
    t_fit = time.perf_counter() - t
    idx, _ = sd.select(store, sub, budget, client, block_rows=block_rows)
    return time.perf_counter() - t, t_fit, sub, idx


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", default=None, help="existing store (default: generate a temp one)")
    ap.add_argument("--n", type=int, default=2_000_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--shard-rows", type=int, default=262_144)
    ap.add_argument("--budget", default="16%")
    ap.add_argument("--block-rows", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)

    from dask.distributed import Client, LocalCluster
    from make_large_store import make_store
    from bench_large import machine

    tmp = None
    if a.store is None:
        tmp = Path(tempfile.mkdtemp(prefix="bench_dask-"))
        store = str(tmp / "reps")
        print(f"generating a {a.n:,} x {a.d} fp16 store ({a.shard_rows:,} rows per shard) ...", flush=True)
        make_store(store, a.n, a.d, "float16", shard_rows=a.shard_rows, verbose=False)
    else:
        store = a.store
    try:
        src = ss.open_source(store)
        load0 = os.getloadavg()[0]
        print(f"store: {src.n:,} x {src.d} {src.dtype}, {len(src.shards)} shards; native={native.BACKEND}; "
              f"load average {load0:.2f}", flush=True)
        t = time.perf_counter()
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                          silence_logs=40) as cluster, Client(cluster) as client:
            startup = time.perf_counter() - t
            ones, dasks, same = [], [], True
            for r in range(a.repeats):
                t1, f1, sub1, idx1 = single(store, a.budget, a.block_rows)
                t2, f2, sub2, idx2 = dask(store, a.budget, a.block_rows, client)
                same &= bool(np.array_equal(idx1, idx2)) and bool(np.array_equal(sub1.components, sub2.components))
                ones.append(t1)
                dasks.append(t2)
                print(f"  repeat {r + 1}: single {t1:.2f}s (fit {f1:.2f}s) | dask {t2:.2f}s (fit {f2:.2f}s) | "
                      f"k={sub1.k} ids identical: {np.array_equal(idx1, idx2)}", flush=True)
        load1 = os.getloadavg()[0]
        one, dk = float(np.median(ones)), float(np.median(dasks))
        ratio = dk / one
        big = src.n >= 2_000_000
        ok = ratio <= FLOOR and same
        print(f"\n  {'single-node (2 BLAS threads)':<36} {one:8.2f} s   {src.n / one:,.0f} rows/s")
        print(f"  {'Dask LocalCluster 2x1 thread':<36} {dk:8.2f} s   {src.n / dk:,.0f} rows/s")
        print(f"  {'cluster start-up (not counted)':<36} {startup:8.2f} s")
        print(f"  {'ratio dask / single':<36} {ratio:8.3f} x   floor <= {FLOOR} (N >= 2M)")
        print(f"  {'identical ids and subspace':<36} {str(same):>8}")
        print(f"  load average {load0:.2f} -> {load1:.2f} on {os.cpu_count()} cores")
        verdict = ("PASS" if ok else "FAIL") if big else "n/a (floor is for N >= 2M)"
        print(verdict)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        new = not RESULTS.exists()
        with open(RESULTS, "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["timestamp", "n", "d", "dtype", "shards", "repeats", "single_s",
                                               "dask_s", "ratio", "startup_s", "identical", "floor", "status",
                                               "load_start", "load_end", "machine"])
            if new:
                w.writeheader()
            w.writerow({"timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                        "n": src.n, "d": src.d, "dtype": src.dtype, "shards": len(src.shards),
                        "repeats": a.repeats, "single_s": round(one, 3), "dask_s": round(dk, 3),
                        "ratio": round(ratio, 4), "startup_s": round(startup, 2), "identical": same,
                        "floor": f"<= {FLOOR}", "status": verdict, "load_start": round(load0, 2),
                        "load_end": round(load1, 2), "machine": json.dumps(machine(), sort_keys=True)})
        print(f"appended a row to {RESULTS.relative_to(ROOT)}")
        return 1 if verdict == "FAIL" else 0
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
