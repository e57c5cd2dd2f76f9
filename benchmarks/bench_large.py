"""One node, out of core: end-to-end fit + score + select over a representation store on disk.

    python benchmarks/bench_large.py                       # quick: 500k x 1024 fp16 (1 GB) temp store
    python benchmarks/bench_large.py --store /data/reps10m  # an existing store (the issue-7 run:
        # make it with benchmarks/make_large_store.py --n 10000000 --d 1024 --dtype float16)

Measured in one run, in this order, and printed side by side:

1. BLAS throughput of this machine: float32 ``XᵀX`` (syrk, one 8192-row Gram chunk, counted as
   2·m·d² flops like the fit) and ``X·W`` (d×k), medians of 5.
2. Raw sequential read speed of the store's shard files (16 MiB ``readinto``): "evicted" after
   ``posix_fadvise(POSIX_FADV_DONTNEED)`` on every file (drops this guest's page cache; dropping
   all caches needs root, and a hypervisor may still cache, so this is an upper bound on a truly
   cold disk), then "cached" right after.
3. The share of the store resident in the page cache (``mincore``) when the end-to-end run starts;
   ``--evict`` evicts first so the run streams from the disk.
4. End to end, in a child process so that its memory is its own: ``fit_subspace`` (one pass),
   ``leverage_scores`` (one pass), ``top_k``. Per pass: rows/s and effective GB/s of storage read,
   next to the raw read speed and the BLAS-bound time of the same flops. Peak anonymous memory is
   ``RssAnon`` from /proc/self/status sampled every 10 ms (memory-mapped and page-cache pages are
   file-backed and not counted; the fp32 work buffers, the Gram and the N scores are).

Floors (issue 7, for 10M x 1024 fp16 on the 2-core 24 GiB machine): end to end ≤ 180 s and peak
anonymous memory ≤ 2 GiB; printed as PASS/FAIL only for a store of that size. CSV rows go to
benchmarks/results/large.csv with the machine, load average, versions and timestamp: the machine is
shared, so the load average is part of the result.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import datetime as _dt
import json
import mmap
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import scalselect_fast as ss  # noqa: E402
from scalselect_fast import native  # noqa: E402
from scalselect_fast.store import open_source  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _suite import cpu_model, memory_gib  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "large.csv"
FLOOR_S, FLOOR_ANON = 180.0, 2 * 2 ** 30


# --------------------------------------------------------------------------------------------------
# machine measurements
# --------------------------------------------------------------------------------------------------
def blas_throughput(d: int, k: int, m: int = 8192, repeats: int = 5) -> dict:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, d), dtype=np.float32)
    w = rng.standard_normal((d, k), dtype=np.float32)
    g = np.empty((d, d), np.float32)
    p = np.empty((m, k), np.float32)

    def med(fn):
        fn()
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return float(np.median(ts))

    t_gram = med(lambda: np.matmul(x.T, x, out=g))
    t_proj = med(lambda: np.matmul(x, w, out=p))
    return {"gram_gflops": 2 * m * d * d / t_gram / 1e9, "proj_gflops": 2 * m * d * k / t_proj / 1e9}


def evict(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sequential_read(paths, chunk: int = 16 << 20) -> tuple[float, int]:
    buf = bytearray(chunk)
    mv = memoryview(buf)
    total = 0
    t = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while True:
                got = fh.readinto(mv)
                if not got:
                    break
                total += got
    return time.perf_counter() - t, total


def cached_fraction(paths) -> float:
    """Share of the files' pages resident in the page cache (``mincore`` on a read-only mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    page = mmap.PAGESIZE
    resident = pages = 0
    for p in paths:
        size = os.path.getsize(p)
        if size == 0:
            continue
        n = (size + page - 1) // page
        vec = (ctypes.c_ubyte * n)()
        with open(p, "rb") as fh:
            mm = mmap.mmap(fh.fileno(), size, prot=mmap.PROT_READ)
            view = np.frombuffer(mm, dtype=np.uint8)  # only to learn the mapping's address
            rc = libc.mincore(ctypes.c_void_p(view.ctypes.data), size, vec)
            del view
            mm.close()
        if rc != 0:
            return float("nan")
        resident += int((np.frombuffer(vec, dtype=np.uint8) & 1).sum())
        pages += n
    return resident / max(pages, 1)


def machine() -> dict:
    return {"host": platform.node(), "cpu": cpu_model(), "cores": os.cpu_count(), "mem_gib": memory_gib(),
            "numpy": np.__version__, "native": native.BACKEND, "python": platform.python_version(),
            "scalselect_fast": ss.__version__}


# --------------------------------------------------------------------------------------------------
# the end-to-end run (child process)
# --------------------------------------------------------------------------------------------------
CHILD = r"""
import json, sys, threading, time
sys.path.insert(0, sys.argv[1])
def rss_anon():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0
peak = [rss_anon()]
base = peak[0]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], rss_anon())
        time.sleep(0.01)
th = threading.Thread(target=sample, daemon=True)
th.start()
import scalselect_fast as ss
from scalselect_fast import native
t0 = time.perf_counter()
sub = ss.fit_subspace(sys.argv[2], block_rows=int(sys.argv[4]))
t1 = time.perf_counter()
scores = ss.leverage_scores(sys.argv[2], sub, block_rows=int(sys.argv[4]))
t2 = time.perf_counter()
idx = ss.top_k(scores, sys.argv[3])
t3 = time.perf_counter()
stop.set(); th.join()
peak[0] = max(peak[0], rss_anon())
print(json.dumps({"peak_anon": peak[0], "base_anon": base, "fit_s": t1 - t0, "score_s": t2 - t1,
                  "topk_s": t3 - t2, "k": sub.k, "solver": sub.solver, "passes": sub.passes,
                  "fit_detail": sub.info.get("timings", {}), "selected": int(idx.size),
                  "native": native.BACKEND, "captured": sub.captured_energy / sub.total_energy}))
"""


def end_to_end(store: str, budget: str, block_rows: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), store, budget, str(block_rows)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"end-to-end child failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", default=None, help="existing store (default: generate a temp one)")
    ap.add_argument("--n", type=int, default=500_000, help="rows of the generated store (no --store)")
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--budget", default="16%")
    ap.add_argument("--block-rows", type=int, default=16384)
    ap.add_argument("--evict", action="store_true", help="evict the store from the page cache before the run")
    ap.add_argument("--skip-read", action="store_true", help="skip the raw read measurement")
    ap.add_argument("--read-shards", type=int, default=0,
                    help="measure the raw read speed on the first N shard files only (0 = all)")
    a = ap.parse_args(argv)

    tmp = None
    if a.store is None:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from make_large_store import make_store

        tmp = Path(tempfile.mkdtemp(prefix="bench_large-"))
        store = str(tmp / "reps")
        print(f"generating a {a.n:,} x {a.d} fp16 store in {store} ...", flush=True)
        info = make_store(store, a.n, a.d, "float16", verbose=False)
        print(f"  {info['bytes'] / 1e9:.2f} GB in {info['wall_s']:.1f}s ({info['write_GBps']:.2f} GB/s)")
    else:
        store = a.store
    try:
        return run(a, store)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def run(a, store: str) -> int:
    src = open_source(store)
    paths = [s.path for s in src.shards]
    nbytes = src.nbytes
    mach = machine()
    load0 = os.getloadavg()
    print(f"store {store}: {src.n:,} x {src.d} {src.dtype}, {len(src.shards)} shards, {nbytes / 1e9:.2f} GB; "
          f"native={native.BACKEND}; load average {load0[0]:.2f} (cores {mach['cores']})", flush=True)

    read = {}
    if not a.skip_read:
        rpaths = paths[:a.read_shards] if a.read_shards > 0 else paths
        evict(rpaths)
        t, total = sequential_read(rpaths)
        read["evicted_GBps"] = total / t / 1e9
        t, total = sequential_read(rpaths)
        read["cached_GBps"] = total / t / 1e9
        print(f"raw sequential read of {len(rpaths)} shard file(s), {total / 1e9:.2f} GB: "
              f"{read['evicted_GBps']:.2f} GB/s after fadvise(DONTNEED) eviction, "
              f"{read['cached_GBps']:.2f} GB/s from the page cache", flush=True)
    if a.evict:
        evict(paths)
    resident = cached_fraction(paths)
    print(f"page cache holds {resident:.0%} of the store at the start of the run", flush=True)

    blas_before = blas_throughput(src.d, 128)
    r = end_to_end(store, a.budget, a.block_rows)
    blas_after = blas_throughput(src.d, max(r["k"], 1))
    load1 = os.getloadavg()
    total = r["fit_s"] + r["score_s"] + r["topk_s"]
    gram_gf = float(np.median([blas_before["gram_gflops"], blas_after["gram_gflops"]]))
    proj_gf = blas_after["proj_gflops"]
    d, n, k = src.d, src.n, r["k"]
    fit_pass = r["fit_detail"].get("gram_pass_s", r["fit_s"])
    blas_fit = 2 * n * d * d / (gram_gf * 1e9)
    blas_score = 2 * n * d * k / (proj_gf * 1e9)

    rows = []

    def row(metric, value, unit, floor="", ok=None, notes=""):
        status = "" if ok is None else ("PASS" if ok else "FAIL")
        rows.append({"metric": metric, "value": value, "unit": unit, "floor": floor, "status": status,
                     "notes": notes})
        print(f"  {metric:<34} {value:>12.4g} {unit:<7} {floor:<9} {status:<5} {notes}")

    big = n >= 10_000_000 and d == 1024 and src.dtype == "float16"
    print(f"\nend to end: k={k} ({r['captured']:.3f} of the energy, {r['solver']} solver, {r['passes']} fit pass(es)),"
          f" selected {r['selected']:,}")
    row("total_s", total, "s", "<= 180" if big else "", (total <= FLOOR_S) if big else None,
        "fit + score + top-k" + ("" if big else " (floor is for 10M x 1024 fp16)"))
    row("peak_anon_GiB", r["peak_anon"] / 2 ** 30, "GiB", "<= 2" if big else "",
        (r["peak_anon"] <= FLOOR_ANON) if big else None, f"RssAnon sampled 10 ms; interpreter+imports "
        f"{r['base_anon'] / 2 ** 20:.0f} MiB")
    row("fit_s", r["fit_s"], "s", notes=f"gram pass {fit_pass:.1f}s, eigh {r['fit_detail'].get('eigh_s', 0):.2f}s")
    row("fit_rows_per_s", n / fit_pass, "rows/s")
    row("fit_GBps", nbytes / fit_pass / 1e9, "GB/s", notes="storage bytes per second of the Gram pass")
    row("fit_vs_blas", fit_pass / blas_fit, "x", notes=f"bare float32 XᵀX at {gram_gf:.0f} GF/s would take {blas_fit:.1f}s")
    row("score_s", r["score_s"], "s")
    row("score_rows_per_s", n / r["score_s"], "rows/s")
    row("score_GBps", nbytes / r["score_s"] / 1e9, "GB/s")
    row("score_vs_blas", r["score_s"] / blas_score, "x", notes=f"bare float32 X·W (k={k}) at {proj_gf:.0f} GF/s: {blas_score:.1f}s")
    row("topk_s", r["topk_s"], "s")
    if read:
        row("raw_read_evicted_GBps", read["evicted_GBps"], "GB/s", notes="after fadvise(DONTNEED); host may cache")
        row("raw_read_cached_GBps", read["cached_GBps"], "GB/s", notes="page cache")
    row("blas_gram_GFps", gram_gf, "GF/s", notes="float32 XᵀX 8192 x d, median before/after")
    row("blas_proj_GFps", proj_gf, "GF/s", notes=f"float32 X·W 8192 x d x {k}")
    row("page_cache_resident", resident, "frac", notes="of the store, at the start (mincore)")
    row("load_avg_1min", (load0[0] + load1[0]) / 2, "", notes=f"start {load0[0]:.2f}, end {load1[0]:.2f}; "
        f"{mach['cores']} cores shared")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    new = not RESULTS.exists()
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    with open(RESULTS, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["timestamp", "n", "d", "dtype", "k", "metric", "value", "unit", "floor",
                                           "status", "notes", "machine"])
        if new:
            w.writeheader()
        for rr in rows:
            w.writerow({"timestamp": stamp, "n": n, "d": d, "dtype": src.dtype, "k": k, **rr,
                        "machine": json.dumps(mach, sort_keys=True)})
    print(f"\nappended {len(rows)} rows to {RESULTS.relative_to(ROOT)}")
    if big:
        ok = total <= FLOOR_S and r["peak_anon"] <= FLOOR_ANON
        print("PASS" if ok else "FAIL", "(10M x 1024 fp16: <= 180 s and <= 2 GiB anonymous memory)")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
