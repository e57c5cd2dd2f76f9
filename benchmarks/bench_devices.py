"""``--devices cpu:2`` against one process: the extraction stage on a few thousand demo-like samples.

Three ways to extract the same generated demo-like dataset with the tiny LLaVA, each a real
``scalselect extract`` command in its own process (so every variant pays its interpreter, torch and
model start-up, as a user's command does), into a fresh store with no cache:

* ``single-1t``:  one process, one torch thread (``OMP_NUM_THREADS=1``)
* ``single-def``: one process, torch's default thread count
* ``cpu2``:       ``--devices cpu:2``: two processes, one thread each (cores // 2)

The three run in turn, ``--repeats`` rounds (alternating, so load on a shared machine drifts into
all alike). Printed: median wall seconds, CPU seconds of the processes (``RUSAGE_CHILDREN``), the
ratio of ``cpu2`` to each single-process baseline, PASS/FAIL for ``cpu2 <= 0.65 x single-1t`` (issue
23's floor on a 2-core machine), and PASS/FAIL for an identical selection: ``scalselect select`` on
the ``single-1t`` and ``cpu2`` stores picks the same sample ids (the vectors are also compared:
max |difference| printed). Rows go to ``benchmarks/results/devices.csv``.

    python benchmarks/bench_devices.py              # n=12000, 2 rounds
    python benchmarks/bench_devices.py --n 300 --repeats 1

Why 12000 by default: every process pays ~7.5 s of CPU to start (import torch 2.2 s, transformers and
the tiny model 4.9 s, measured on the 2-core box), while the tiny model extracts a demo sample in
~3 ms of CPU. Two processes start side by side, so ``cpu2`` takes about ``start + W/2`` against
``start + W`` for one process: below 0.65x only once the extraction work W is ~3x the start-up, that
is from ~8000 samples. At n=3000 the ratio is ~0.8 at best on an idle 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _suite import RESULTS, append_csv, load_average, machine, now_utc, versions  # noqa: E402

FLOOR = 0.65


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _extract(model: Path, data: Path, root: Path, out: Path, devices: str, threads: int | None,
             batch_size: int, shard_size: int) -> tuple[float, float]:
    """Wall and CPU seconds of one ``scalselect extract`` into a fresh store ``out``."""
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("OMP_NUM_THREADS", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "scalselect_fast", "extract", "--model", str(model), "--data", str(data),
           "--image-root", str(root), "--out", str(out), "--batch-size", str(batch_size), "--shard-size",
           str(shard_size), "--dtype", "fp32", "--device", "cpu", "--devices", devices, "--quiet"]
    c0, t0 = _children_cpu(), time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - c0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return wall, cpu


def _selected(store: Path, out: Path, budget: str) -> list[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "scalselect_fast", "select", str(store), "--out", str(out),
                        "--budget", budget, "--no-html"], cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"select on {store} failed:\n{p.stderr[-3000:]}")
    import pyarrow.parquet as pq

    man = pq.read_table(out / "manifest.parquet").to_pylist()
    return sorted(r["id"] for r in man if r["kept"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=12000, help="demo-like records [12000]")
    p.add_argument("--repeats", type=int, default=2, help="alternating rounds [2]")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shard-size", type=int, default=512)
    p.add_argument("--budget", default="16%")
    a = p.parse_args(argv)

    from scalselect_fast.data.demo import make_demo_dataset
    from scalselect_fast.extract.tiny import build_tiny_model
    from scalselect_fast.store import StoreSource

    variants = {"single-1t": ("cpu:1", 1), "single-def": ("cpu:1", None), "cpu2": ("cpu:2", None)}
    walls: dict[str, list[float]] = {k: [] for k in variants}
    cpus: dict[str, list[float]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        root = d / "data"
        make_demo_dataset(root, n=a.n, seed=7)
        data = root / "demo.json"
        model = build_tiny_model("llava", d / "tiny-llava", seed=0)
        for _ in range(a.repeats):
            for name, (devices, threads) in variants.items():
                w, c = _extract(model, data, root, d / f"store-{name}", devices, threads, a.batch_size, a.shard_size)
                walls[name].append(w)
                cpus[name].append(c)
                print(f"  {name:<10} wall {w:7.2f} s   cpu {c:7.2f} s", flush=True)
        one, two = StoreSource(d / "store-single-1t"), StoreSource(d / "store-cpu2")
        same_rows = one.ids() == two.ids()
        diff = float(np.abs(one.to_array(np.float32) - two.to_array(np.float32)).max()) if same_rows else float("nan")
        sel_one = _selected(d / "store-single-1t", d / "sel-1", a.budget)
        sel_two = _selected(d / "store-cpu2", d / "sel-2", a.budget)
        n_rows = one.n

    med = {k: float(np.median(v)) for k, v in walls.items()}
    cpu = {k: float(np.median(v)) for k, v in cpus.items()}
    r1, rdef = med["cpu2"] / med["single-1t"], med["cpu2"] / med["single-def"]
    ok_time = r1 <= FLOOR
    ok_sel = same_rows and len(sel_one) > 0 and sel_one == sel_two
    print(f"\n--devices cpu:2 vs one process: n={a.n} demo-like records ({n_rows} with a representation), tiny "
          f"LLaVA, batch {a.batch_size}, {a.repeats} alternating round(s), load {load_average()}, "
          f"{os.cpu_count()} cores")
    print(f"{'variant':<11}{'wall s (median)':>17}{'cpu s':>9}{'samples/s':>11}")
    for k in variants:
        print(f"{k:<11}{med[k]:>17.2f}{cpu[k]:>9.2f}{a.n / med[k]:>11.1f}")
    print(f"cpu2 / single-1t = {r1:.3f}   cpu2 / single-def = {rdef:.3f}")
    print(f"{'PASS' if ok_time else 'FAIL'}: extraction with --devices cpu:2 takes {r1:.3f}x the one-process, "
          f"one-thread time (floor <= {FLOOR})")
    print(f"{'PASS' if ok_sel else 'FAIL'}: identical selection ({len(sel_one)} of {n_rows} ids, same rows in the "
          f"same order: {same_rows}; max |vector difference| {diff:.3g} in float16 storage)")
    meta = {"timestamp": now_utc(), "load": load_average(), **{f"m_{k}": v for k, v in machine().items()},
            **{f"v_{k}": v for k, v in versions().items() if k in ("python", "scalselect_fast", "torch")},
            "n": a.n, "batch_size": a.batch_size, "repeats": a.repeats}
    rows = [{**meta, "variant": k, "wall_s": round(med[k], 3), "cpu_s": round(cpu[k], 3),
             "walls": " ".join(f"{x:.2f}" for x in walls[k])} for k in variants]
    rows.append({**meta, "variant": "ratio", "cpu2_over_single_1t": round(r1, 4),
                 "cpu2_over_single_default": round(rdef, 4), "floor": FLOOR, "status": "PASS" if ok_time else "FAIL",
                 "same_selection": ok_sel, "max_abs_diff": diff})
    append_csv(RESULTS / "devices.csv", rows)
    return 0 if ok_time and ok_sel else 1


if __name__ == "__main__":
    sys.exit(main())
