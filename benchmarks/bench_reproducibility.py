"""Same selection on every machine (issue 19): selected sets and manifest ranks across BLAS kernels.

Run from the repository root::

    python benchmarks/bench_reproducibility.py           # 4 core types x 2 builds x 2 thread counts x 2 executors
    python benchmarks/bench_reproducibility.py --quick   # Prescott and Haswell, local only

Each configuration runs in its own process: ``OPENBLAS_CORETYPE`` ∈ {Prescott, Sandybridge, Haswell,
Zen} (``OPENBLAS_L2_SIZE`` unset with it) makes OpenBLAS use that CPU's kernels -- the way to see
here what another machine computes --, ``SCALSELECT_FORCE_FALLBACK`` picks the build, the thread
count is given to BLAS and the native kernels, and the executor is the local job
(``selection.run_selection``) or a Dask ``LocalCluster`` with that many one-thread worker processes
(``distributed.run_selection``). Every configuration selects from the same three stores:

``demo``   the bundled demo representations (2000×64 fp16), 16%, in 500-row shards;
``bench``  the benchmarks' data (``_suite.embeddings``, 40960×256 fp16), 16%, in 4096-row shards;
``dup``    30000×192 fp16 in which every row appears twice, budget 4801 rows: an odd budget over
           pairs of equal scores always cuts a pair, so the tie rule decides the last row.

Printed per input: the distinct selected sets over all configurations (floor: 1), and the most
manifest rank positions (1..m, by ``selected.txt``) in which any configuration differs from the
first (goal 0). One CSV row per input in ``benchmarks/results/reproducibility.csv``.

The price (``--price``, also part of the full run): the float64 products cost more than float32
ones. Measured in CPU seconds of one thread (``time.process_time``, BLAS and native kernels pinned to
one thread), so a loaded machine does not distort it: fit+score of ``bench_core``'s 100k×768 fp32
matrix (k≈301) against the bare float64 and the bare float32 ``XᵀX + X·W`` of the same sizes, medians
of interleaved repeats. ``--price-root DIR`` times another checkout's fit+score the same way (e.g.
the commit before the change), for a before/after.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._suite import RESULTS, append_csv, embeddings, machine, now_utc, versions  # noqa: E402

CORETYPES = ["Prescott", "Sandybridge", "Haswell", "Zen"]
INPUTS = {"demo": "16%", "bench": "16%", "dup": "4801"}

CHILD = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
cfg = json.loads(sys.argv[2])
from scalselect_fast import native
client = None
if cfg["executor"] == "dask":
    from dask.distributed import Client, LocalCluster
    cluster = LocalCluster(n_workers=cfg["threads"], threads_per_worker=1, processes=True,
                           dashboard_address=None)
    client = Client(cluster)
out = {"backend": native.BACKEND}
for name, (store, budget) in cfg["inputs"].items():
    dest = Path(cfg["out"]) / name
    if client is None:
        from scalselect_fast.selection import run_selection
        run_selection(store, dest, budget, html=False)
    else:
        from scalselect_fast.distributed import run_selection
        run_selection(store, dest, budget, client, html=False)
    out[name] = (dest / "selected.txt").read_text().split()
if client is not None:
    client.close(); cluster.close()
print("RESULT " + json.dumps(out))
"""


PRICE_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2])
import numpy as np
import scalselect_fast as ss
from benchmarks.bench_core import generate
n, d, reps = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
X = generate(n, d)
sub = ss.fit_subspace(X)
W64 = np.ascontiguousarray(sub.projection()); W32 = W64.astype(np.float32); X64 = X.astype(np.float64)
def cpu(fn):
    t = time.process_time(); fn(); return time.process_time() - t
fns = {"fit+score": lambda: ss.leverage_scores(X, ss.fit_subspace(X)),
       "bare float64": lambda: (X64.T @ X64, X64 @ W64), "bare float32": lambda: (X.T @ X, X @ W32)}
times = {k: [] for k in fns}
for _ in range(reps):
    for k, f in fns.items():
        times[k].append(cpu(f))
print("RESULT " + json.dumps({"k": int(sub.k), **{k: float(np.median(v)) for k, v in times.items()}}))
"""


def price(root: str | None = None, n: int = 100_000, d: int = 768, repeats: int = 5) -> dict:
    """CPU seconds (one thread) of fit+score and of the bare float64 / float32 products."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", SCALSELECT_NUM_THREADS="1")
    here = str(Path(__file__).resolve().parents[1])
    p = subprocess.run([sys.executable, "-c", PRICE_CHILD, root or here, here, str(n), str(d), str(repeats)],
                       env=env, capture_output=True, text=True, timeout=3600)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode != 0 or not line:
        raise RuntimeError(f"price measurement failed:\n{p.stderr[-3000:]}")
    return json.loads(line[-1][len("RESULT "):])


def _duplicates() -> np.ndarray:
    rng = np.random.default_rng(3)
    base = rng.standard_normal((15000, 12)) @ (rng.standard_normal((12, 192)) / 3)
    base = (base + 0.2 * rng.standard_normal((15000, 192))).astype(np.float16)
    X = np.concatenate([base, base])
    return X[rng.permutation(X.shape[0])]  # the two copies of a row sit far apart


def write_inputs(root: Path) -> dict[str, tuple[str, str]]:
    """The three stores (see the module docstring); returns ``{name: (store path, budget)}``."""
    from scalselect_fast.store import StoreWriter

    demo = np.load(Path(__file__).resolve().parents[1] / "scalselect_fast" / "assets" / "demo_reps.npy")
    data = {"demo": (demo.astype(np.float16), 500), "bench": (embeddings(40960, 256).astype(np.float16), 4096),
            "dup": (_duplicates(), 7000)}
    out = {}
    for name, (X, shard) in data.items():
        w = StoreWriter(root / name, d=X.shape[1], dtype="float16")
        for a in range(0, X.shape[0], shard):
            w.write_shard(X[a:a + shard], [f"r{i}" for i in range(a, min(a + shard, X.shape[0]))])
        out[name] = (str(root / name), INPUTS[name])
    return out


def run_config(inputs: dict, out: Path, coretype: str, fallback: bool, threads: int, executor: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_L2_SIZE"}
    env.update(OPENBLAS_CORETYPE=coretype, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               SCALSELECT_NUM_THREADS=str(threads), SCALSELECT_FORCE_FALLBACK="1" if fallback else "0")
    if not fallback:
        env.pop("SCALSELECT_FORCE_FALLBACK")
    cfg = {"inputs": inputs, "out": str(out), "threads": threads, "executor": executor}
    root = str(Path(__file__).resolve().parents[1])
    p = subprocess.run([sys.executable, "-c", CHILD, root, json.dumps(cfg)], env=env, capture_output=True,
                       text=True, timeout=1800)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode != 0 or not line:
        raise RuntimeError(f"{coretype}/{'fallback' if fallback else 'native'}/{threads}/{executor} failed:\n"
                           f"{p.stderr[-3000:]}")
    return json.loads(line[-1][len("RESULT "):])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="Prescott and Haswell, local only, 1 thread")
    ap.add_argument("--price", action="store_true", help="only the price of the float64 products (CPU time)")
    ap.add_argument("--price-root", default=None, help="also time fit+score of the checkout in this folder")
    args = ap.parse_args(argv)
    if args.price or not args.quick:
        p = price()
        print(f"price (CPU s, one thread, 100000x768 fp32, k={p['k']}): fit+score {p['fit+score']:.2f}; bare float64 "
              f"XtX+XW {p['bare float64']:.2f} ({p['fit+score'] / p['bare float64']:.2f}x, floor <= 1.3); bare float32 "
              f"{p['bare float32']:.2f} ({p['fit+score'] / p['bare float32']:.2f}x)")
        row = {"timestamp": now_utc(), "mode": "price", "input": "bench_core 100000x768", "budget": "",
               "configurations": 1, "selected_sets": "", "max_rank_positions_differing": "",
               "rows_selected": "", "floor_one_set": "",
               "machine": json.dumps(machine()), "versions": json.dumps({**versions(), **p})}
        if args.price_root:
            old = price(args.price_root)
            print(f"  {args.price_root}: fit+score {old['fit+score']:.2f} CPU s (k={old['k']}); "
                  f"this checkout / that one = {p['fit+score'] / old['fit+score']:.2f}x")
            row["versions"] = json.dumps({**versions(), **p, "other_root": args.price_root,
                                          "other_fit+score": old["fit+score"]})
        append_csv(RESULTS / "reproducibility.csv", [row])
        if args.price:
            return 0
    cores = ["Prescott", "Haswell"] if args.quick else CORETYPES
    executors = ["local"] if args.quick else ["local", "dask"]
    threads = [1] if args.quick else [1, 2]
    configs = list(itertools.product(cores, [False, True], threads, executors))
    results = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ss-repro-") as tmp:
        inputs = write_inputs(Path(tmp) / "in")
        for i, (ct, fb, th, ex) in enumerate(configs):
            tag = f"{ct}/{'fallback' if fb else 'native'}/t{th}/{ex}"
            r = run_config(inputs, Path(tmp) / f"out{i}", ct, fb, th, ex)
            if r["backend"] != ("python" if fb else "native"):
                raise RuntimeError(f"{tag}: ran the {r['backend']} build")
            results[tag] = r
            print(f"  {tag:32s} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = []
    print(f"\n{len(configs)} configurations: {len(cores)} core types x 2 builds x {len(threads)} thread "
          f"counts x {len(executors)} executors")
    print(f"{'input':7s} {'budget':>7s} {'selected sets':>14s} {'max rank positions differing':>30s}  floor")
    first = next(iter(results))
    for name, budget in INPUTS.items():
        sets = {frozenset(r[name]) for r in results.values()}
        ref = results[first][name]
        diffs = {tag: sum(a != b for a, b in zip(r[name], ref)) for tag, r in results.items()}
        worst = max(diffs.values())
        ok = len(sets) == 1
        print(f"{name:7s} {budget:>7s} {len(sets):>14d} {worst:>30d}  {'PASS' if ok else 'FAIL'}"
              + ("" if worst == 0 else f"  (worst: {max(diffs, key=diffs.get)})"))
        rows.append({"timestamp": now_utc(), "mode": "quick" if args.quick else "full", "input": name,
                     "budget": budget, "configurations": len(configs), "selected_sets": len(sets),
                     "max_rank_positions_differing": worst, "rows_selected": len(ref),
                     "floor_one_set": ok, "machine": json.dumps(machine()), "versions": json.dumps(versions())})
    append_csv(RESULTS / "reproducibility.csv", rows)
    return 0 if all(r["floor_one_set"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
