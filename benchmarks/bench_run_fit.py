"""`scalselect run`'s fit stage vs `scalselect fit` on the same sharded store, side by side.

    python benchmarks/bench_run_fit.py                   # 163840 x 768 fp16 in 4096-row shards
    python benchmarks/bench_run_fit.py --quick           # 40960 x 384 (smoke size)
    python benchmarks/bench_run_fit.py --n 400000 --d 1024 --repeats 7

Both sides stream the same temporary store (the layout `scalselect run` writes: float16, one shard
per 4096 samples) in one process. Timed: ``scalselect fit STORE --out F.npz`` through the CLI's
``main`` (fit + save), and the run's fit stage (``run.stages._stage_fit``: fit with its Gram
checkpoint, written after the last shard at the default FIT_CHECKPOINT_SECONDS, + save) on a fresh
run directory each time. Runs alternate (fit, run, fit, run, ...) so both see the same page cache
and machine load; medians are compared, and the two subspaces must be bit-identical.

Floor (issue 13): run's fit stage ≤ 1.1 × `scalselect fit`.
CSV rows: benchmarks/results/run_fit.csv (machine, load average, versions, timestamp).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _suite import (RESULTS, alternating_times, append_csv, embeddings, load_average, machine,  # noqa: E402
                    now_utc, versions)

import scalselect_fast as ss  # noqa: E402
from scalselect_fast import cli  # noqa: E402
from scalselect_fast.run import make_config  # noqa: E402
from scalselect_fast.run.events import Events  # noqa: E402
from scalselect_fast.run.stages import _stage_fit  # noqa: E402
from scalselect_fast.run.state import RunState  # noqa: E402

FLOOR = 1.1
CSV = RESULTS / "run_fit.csv"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=163840)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--shard-rows", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="40960 x 384, 3 repeats")
    ap.add_argument("--full", action="store_true", help="the default size (for python -m benchmarks --full)")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.d, args.repeats = 40960, 384, 3
    tmp = Path(tempfile.mkdtemp(prefix="bench-run-fit-"))
    try:
        store = tmp / "reps"
        X = embeddings(args.n, args.d).astype(np.float16)
        w = ss.StoreWriter(store, d=args.d, dtype="float16")
        for a in range(0, args.n, args.shard_rows):
            w.write_shard(X[a:a + args.shard_rows], [f"s{i}" for i in range(a, min(a + args.shard_rows, args.n))])
        del X
        src = ss.open_source(store)
        print(f"store: {src.n} x {src.d} {src.dtype} in {len(src.shards)} shards of {args.shard_rows} rows")

        def fit_cli():
            with contextlib.redirect_stdout(io.StringIO()):
                rc = cli.main(["fit", str(store), "--out", str(tmp / "fit.npz")])
            assert rc == 0
            return ss.Subspace.load(tmp / "fit.npz")

        counter = iter(range(10**6))

        def run_stage():
            out = tmp / f"run{next(counter)}"
            cfg = make_config(model="model", data="data.json", out=str(out), quiet=True)
            fps = {"model": "m", "data": "d", "extract": "e", "fit": "f", "select": "s"}
            events = Events(quiet=True)
            sub = _stage_fit(cfg, RunState(out, fps, False, events), events, src)
            shutil.rmtree(out)
            return sub

        t_fit, t_run, a, b = alternating_times(fit_cli, run_stage, args.repeats)  # warm-up call of each first
        identical = bool(np.array_equal(a.components, b.components)
                         and np.array_equal(a.singular_values, b.singular_values))
        fit_s, run_s = float(np.median(t_fit)), float(np.median(t_run))
        ratio = run_s / fit_s
        status = "PASS" if ratio <= FLOOR and identical else "FAIL"
        print(f"{'side':<28}{'median s':>10}   all (s)")
        print(f"{'scalselect fit':<28}{fit_s:>10.3f}   {', '.join(f'{x:.3f}' for x in t_fit)}")
        print(f"{'scalselect run: fit stage':<28}{run_s:>10.3f}   {', '.join(f'{x:.3f}' for x in t_run)}")
        print(f"ratio run/fit = {ratio:.3f} (floor ≤ {FLOOR}); subspaces bit-identical: {identical} -> {status}")
        gb = src.n * src.d * 2 / 1e9
        print(f"throughput: fit {gb / fit_s:.2f} GB/s, run {gb / run_s:.2f} GB/s of fp16 rows; "
              f"Gram {2 * src.n * src.d ** 2 / fit_s / 1e9:.1f} GFLOP/s (n·d² multiply-adds, fit side)")
        append_csv(CSV, [{
            "run_id": now_utc(), "timestamp": now_utc(), "n": src.n, "d": src.d, "dtype": src.dtype,
            "shard_rows": args.shard_rows, "shards": len(src.shards), "repeats": args.repeats,
            "fit_s": round(fit_s, 4), "run_fit_s": round(run_s, 4), "ratio": round(ratio, 4), "floor": FLOOR,
            "identical": identical, "status": status, "k": b.k, "load": load_average(),
            "machine": json.dumps(machine(), sort_keys=True), "versions": json.dumps(versions(), sort_keys=True)}])
        print(f"row appended to {CSV}")
        return 0 if status == "PASS" else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
