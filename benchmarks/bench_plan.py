"""Is ``scalselect run --plan`` honest? Its estimate against the run it plans, on every input layout.

For each layout users feed the tool (LLaVA JSON + image folder, ShareGPT JSONL, OneVision-style
Parquet shards with embedded image bytes, Cauldron-style Parquet without ids, a ``datasets``
``save_to_disk`` folder, WebDataset tars), built with the test suite's own builders
(``tests/test_hub_corpora.py``, :mod:`scalselect_fast.data.demo`), a few hundred samples and the tiny
random-weight LLaVA:

1. ``scalselect run --plan --log-json`` in a fresh process (the plan calibrates on the data and model);
2. ``scalselect run --log-json`` in a fresh process, into an empty ``--out``.

Compared: the extraction stage (``stage_start``..``stage_done`` events of the run) against the plan's
``extract`` seconds, the run's whole wall time (process start to exit) against the plan's total, and
the bytes the run left (``du --apparent-size`` of ``--out``, which holds the default cache, and the
allocated blocks) against the plan's disk total. Floor: every ratio estimate / measured within
[0.5, 2] (PASS/FAIL per layout). Rows go to ``benchmarks/results/plan.csv``.

    python benchmarks/bench_plan.py [--n 300] [--layouts json,jsonl,...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from _suite import RESULTS, append_csv, load_average, machine, now_utc, versions  # noqa: E402

#: every estimate must be within this factor of what the run measured
FLOOR = 2.0
LAYOUTS = ("llava-json", "sharegpt-jsonl", "onevision-parquet", "cauldron-parquet", "save_to_disk", "webdataset")


def _demo(base: Path, n: int, layout: str) -> Path:
    from scalselect_fast.data.demo import make_demo_dataset

    truth = make_demo_dataset(base, n=n, seed=5, layout=layout, shard_size=max(8, n // 3))
    return base / truth["data"]


def _sharegpt_jsonl(base: Path, n: int) -> Path:
    """The demo's records as ShareGPT JSONL: ``images`` list and ``messages: [{role, content}]``."""
    src = _demo(base, n, "json")
    roles = {"human": "user", "gpt": "assistant"}
    out = base / "sharegpt.jsonl"
    with open(out, "w") as fh:
        for r in json.loads(src.read_text()):
            rec = {"id": r["id"], "messages": [{"role": roles[t["from"]], "content": t["value"]}
                                               for t in r["conversations"]]}
            if "image" in r:
                rec["images"] = [r["image"]]
            fh.write(json.dumps(rec) + "\n")
    return out


def build(layout: str, base: Path, n: int) -> tuple[Path, list[str]]:
    """(``--data``, extra arguments) of ``layout`` with ``n`` samples under ``base``."""
    base.mkdir(parents=True, exist_ok=True)
    if layout == "llava-json":
        return _demo(base, n, "json"), ["--image-root", str(base)]
    if layout == "sharegpt-jsonl":
        return _sharegpt_jsonl(base, n), ["--image-root", str(base)]
    if layout == "webdataset":
        return _demo(base, n, "webdataset"), []
    from test_hub_corpora import cauldron, llava_onevision

    if layout == "onevision-parquet":
        ds = llava_onevision(n, text_only=(3,))
        (base / "data").mkdir()
        for k in range(3):
            ds.shard(3, k, contiguous=True).to_parquet(str(base / "data" / f"train-{k:05d}-of-00003.parquet"))
        return base / "data", []
    if layout == "cauldron-parquet":
        cauldron(base / "cauldron", {"vqav2": n // 2, "ocrvqa": n - n // 2}, two_images=(5,))
        return base / "cauldron", []
    if layout == "save_to_disk":
        llava_onevision(n, text_only=(3,)).save_to_disk(str(base / "saved"), num_shards=2)
        return base / "saved", []
    raise ValueError(layout)


def _scalselect(args: list[str]) -> tuple[float, list[dict], str]:
    """Run the CLI in a fresh process: (wall seconds, JSON events on stdout, stderr)."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "scalselect_fast", *args], capture_output=True, text=True,
                       cwd=ROOT)
    wall = time.perf_counter() - t0
    events = []
    for line in p.stdout.splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    if p.returncode not in (0, 3):
        raise RuntimeError(f"scalselect {' '.join(args)} exited {p.returncode}: {p.stderr[-2000:]}")
    return wall, events, p.stderr


def _du(path: Path) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of every file under ``path``."""
    apparent = blocks = 0
    for p in path.rglob("*"):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            apparent += st.st_size
            blocks += st.st_blocks * 512
    return apparent, blocks


def measure(layout: str, base: Path, model: Path, n: int) -> dict:
    data, extra = build(layout, base / layout, n)
    out = base / f"out-{layout}"
    args = ["run", "--model", str(model), "--data", str(data), "--out", str(out), "--budget", "20%",
            "--batch-size", "8", "--log-json", *extra]
    plan_wall, events, _ = _scalselect([*args, "--plan"])
    plan = next(e for e in events if e.get("event") == "plan")
    run_wall, events, _ = _scalselect(args)
    stage = {e["stage"]: e["time"] for e in events if e.get("event") == "stage_start"}
    done = {e["stage"]: e["time"] for e in events if e.get("event") == "stage_done"}
    apparent, blocks = _du(out)
    est = {"extract": plan["seconds"].get("extract", 0.0), "wall": plan["total_seconds"],
           "disk": plan["total_disk_bytes"]}
    got = {"extract": done["extract"] - stage["extract"], "wall": run_wall, "disk": apparent}
    ratios = {k: est[k] / got[k] if got[k] else float("inf") for k in est}
    ok = plan["ok"] and all(1 / FLOOR <= r <= FLOOR for r in ratios.values())
    return {"layout": layout, "n": n, "plan_ok": plan["ok"], "plan_wall_s": round(plan_wall, 2),
            **{f"est_{k}": round(v, 3) for k, v in est.items()}, **{f"got_{k}": round(v, 3) for k, v in got.items()},
            "got_disk_blocks": blocks, **{f"ratio_{k}": round(v, 3) for k, v in ratios.items()},
            "calibrated": plan["assumptions"].get("calibrated", ""), "problems": "; ".join(plan["problems"]),
            "status": "PASS" if ok else "FAIL"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    a = ap.parse_args(argv)
    from scalselect_fast.extract.tiny import build_tiny_model

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_plan-") as tmp:
        base = Path(tmp)
        model = build_tiny_model("llava", base / "tiny-llava", seed=0)
        for layout in a.layouts.split(","):
            rows.append(measure(layout, base, Path(model), a.n))
            r = rows[-1]
            print(f"{layout}: extract {r['est_extract']:.1f}/{r['got_extract']:.1f} s, wall {r['est_wall']:.1f}/"
                  f"{r['got_wall']:.1f} s, disk {r['est_disk']}/{r['got_disk']} B  {r['status']}", flush=True)
    head = (f"{'layout':<18} {'extract est/got s':>18} {'ratio':>6} {'wall est/got s':>16} {'ratio':>6} "
            f"{'disk est/got KiB':>18} {'ratio':>6}  status")
    print(f"\n--plan vs the run (n={a.n}, tiny LLaVA, batch 8, load {load_average()}); floor: every ratio in "
          f"[{1 / FLOOR:.1f}, {FLOOR:.0f}]")
    print(head)
    for r in rows:
        print(f"{r['layout']:<18} {r['est_extract']:>8.2f}/{r['got_extract']:<9.2f} {r['ratio_extract']:>6.2f} "
              f"{r['est_wall']:>7.1f}/{r['got_wall']:<8.1f} {r['ratio_wall']:>6.2f} "
              f"{r['est_disk'] / 1024:>8.0f}/{r['got_disk'] / 1024:<9.0f} {r['ratio_disk']:>6.2f}  {r['status']}"
              + (f"  ({r['problems']})" if r["problems"] else ""))
    meta = {"timestamp": now_utc(), **{f"m_{k}": v for k, v in machine().items()},
            **{f"v_{k}": v for k, v in versions().items() if k in ("python", "scalselect_fast", "torch")},
            "load1": os.getloadavg()[0]}
    append_csv(RESULTS / "plan.csv", [{**meta, **r} for r in rows])
    return 0 if all(r["status"] == "PASS" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
