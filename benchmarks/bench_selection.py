"""`scalselect select` with its default stability entry vs `--stability-seeds none`, side by side.

    python benchmarks/bench_selection.py                 # 262144 x 512 fp16 .npy
    python benchmarks/bench_selection.py --quick         # 65536 x 256 (smoke size)
    python benchmarks/bench_selection.py --n 1000000 --d 512   # the size issue 13 measured

The default report carries the cut-off margin and a perturbation bound computed from the fitted
spectrum (no pass over the data); re-fits under other seeds run only with ``--stability-seeds``.
Timed: ``scalselect select X.npy --budget 16% --out DIR`` through the CLI's ``main`` (fit, score,
top-k, stability, every output written and committed, report.html included) with the default
options and with ``--stability-seeds none``, alternating (default, none, default, none, ...) in one
process so both see the same page cache and load; medians are compared, and the selections must be
identical. One extra run with ``--stability-seeds 0,1,2`` shows what the re-fits cost when asked
(or that they are reported as not applicable, when the randomized solver would hand over to exact).

Floor (issue 13): default ``select`` ≤ 1.25 × ``--stability-seeds none``.
CSV rows: benchmarks/results/selection.csv (machine, load average, versions, timestamp).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _suite import RESULTS, append_csv, embeddings, load_average, machine, now_utc, versions  # noqa: E402

from scalselect_fast import cli  # noqa: E402

FLOOR = 1.25
CSV = RESULTS / "selection.csv"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=262144)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="65536 x 256, 3 repeats")
    ap.add_argument("--full", action="store_true", help="the default size (for python -m benchmarks --full)")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.d, args.repeats = 65536, 256, 3
    tmp = Path(tempfile.mkdtemp(prefix="bench-selection-"))
    try:
        path = tmp / "x.npy"
        np.save(path, embeddings(args.n, args.d).astype(np.float16))
        print(f"input: {args.n} x {args.d} float16 ({path.stat().st_size / 2**20:.0f} MiB .npy, memory-mapped)")
        counter = iter(range(10**6))

        def select(*extra):
            out = tmp / f"sel{next(counter)}"
            with contextlib.redirect_stdout(io.StringIO()):
                rc = cli.main(["select", str(path), "--budget", "16%", "--out", str(out), *extra])
            assert rc == 0
            rep = json.loads((out / "report.json").read_text())
            sel = (out / "selected.txt").read_text()
            shutil.rmtree(out)
            return rep, sel

        select(), select("--stability-seeds", "none")  # warm-up: page cache, BLAS, imports
        t_def, t_none, sels = [], [], set()
        for _ in range(args.repeats):
            t = time.perf_counter()
            rep, sel = select()
            t_def.append(time.perf_counter() - t)
            sels.add(sel)
            t = time.perf_counter()
            _, sel = select("--stability-seeds", "none")
            t_none.append(time.perf_counter() - t)
            sels.add(sel)
        t = time.perf_counter()
        rep3, sel3 = select("--stability-seeds", "0,1,2")
        t_seeds = time.perf_counter() - t
        identical = len(sels) == 1 and sel3 in sels
        def_s, none_s = float(np.median(t_def)), float(np.median(t_none))
        ratio = def_s / none_s
        status = "PASS" if ratio <= FLOOR and identical else "FAIL"
        st, st3 = rep["stability"], rep3["stability"]
        print(f"k={rep['subspace']['k']} of d={args.d}, {rep['subspace']['solver']} solver; "
              f"stability entry itself: {rep['timings']['stability']:.4f} s")
        print(f"{'select':<34}{'median s':>10}   all (s)")
        print(f"{'default (margin + bound)':<34}{def_s:>10.3f}   {', '.join(f'{x:.3f}' for x in t_def)}")
        print(f"{'--stability-seeds none':<34}{none_s:>10.3f}   {', '.join(f'{x:.3f}' for x in t_none)}")
        print(f"{'--stability-seeds 0,1,2 (once)':<34}{t_seeds:>10.3f}   re-fits: {st3['refits']}")
        print(f"ratio default/none = {ratio:.3f} (floor ≤ {FLOOR}); ratio of the fastest runs "
              f"{min(t_def) / min(t_none):.3f}; selections identical: {identical} -> {status}")
        print(f"default entry: relative margin {st['margin']['relative_margin']}, tolerated relative Gram "
              f"change {st['bound']['tolerated_relative']}, certified={st['certified']}")
        append_csv(CSV, [{
            "run_id": now_utc(), "timestamp": now_utc(), "n": args.n, "d": args.d, "dtype": "float16",
            "repeats": args.repeats, "default_s": round(def_s, 4), "none_s": round(none_s, 4),
            "ratio": round(ratio, 4), "ratio_min": round(min(t_def) / min(t_none), 4), "floor": FLOOR, "seeds_012_s": round(t_seeds, 4),
            "seeds_012_refits": st3["refits"][:80], "identical": identical, "status": status,
            "k": rep["subspace"]["k"], "solver": rep["subspace"]["solver"], "load": load_average(),
            "machine": json.dumps(machine(), sort_keys=True), "versions": json.dumps(versions(), sort_keys=True)}])
        print(f"row appended to {CSV}")
        return 0 if status == "PASS" else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
