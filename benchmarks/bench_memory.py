"""Peak memory of ``scalselect run`` outside extraction, at 2M vs 20M records (issue 23 item 4).

    python benchmarks/bench_memory.py                       # 2M and 20M records, d=16
    python benchmarks/bench_memory.py --sizes 200000 2000000 --d 8   # a quicker pair

What runs: a synthetic dataset in the shape of an ids-and-text one (LLaVA-OneVision-style Parquet:
``id``, ``image`` path, ``conversations`` [{from, value}], ``data_source``; one record in 1000 is
text-only, with no image), and the representation store its extraction would have produced, written
directly with :class:`scalselect_fast.store.StoreWriter` (float16 rows of width ``--d``, the
text-only records absent and listed in ``reps/skipped.jsonl`` with reason ``text_only``, as the
extraction engine lists them). Both are generated vectorised with pyarrow/numpy and cached under
``--work`` (reused when the same size and width already exist).

Each size is measured in its own child process, which calls the run's own post-extraction stages in
order on a fresh ``--out`` (``_stage_fit``, ``_stage_score``, ``_stage_select`` of
:mod:`scalselect_fast.run.stages`, with a :class:`RunState` whose extraction is already marked
done): the record table, the id checks, the fit, the scores, the top-k, the manifest, the selected
dataset in the input's format and the report are the real run code. The extraction stage itself is
not run (no model); its memory is not what this benchmark measures.

Peak RSS is the kernel's ``VmHWM``; it is reset (``/proc/self/clear_refs`` = 5) before each stage,
so each stage's peak is its own. ``base`` is the RSS after the imports.

Pass (issue 23 item 4): peak(largest) / peak(smallest) <= 1.3 and peak(largest) <= 2 GiB.
CSV rows: benchmarks/results/memory.csv.

Last measured (2-core machine, 2026-12-08, select stage's peak): 2M 0.39 GiB, 20M 0.93 GiB, ratio 2.38
(FAIL; 4.28 before the ranks, the spilled ids, the narrow codes and the blockwise top-k/cut-off/report).
About 32 bytes per added record remain (scores, ranks, record index, codes, kept mask, the kept ids);
the 2M peak is mostly work per 1M-row shard / row group, which does not grow with N.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _suite import RESULTS, append_csv, load_average, machine, now_utc, versions  # noqa: E402

CSV = RESULTS / "memory.csv"
RATIO_MAX = 1.3
PEAK_MAX_GIB = 2.0
#: one record in TEXT_ONLY_EVERY has no image (and so no stored row)
TEXT_ONLY_EVERY = 1000
#: records per generated chunk / Parquet row group, and rows per store shard
CHUNK = 1 << 20
SOURCES = ("coco", "gqa", "ocr_vqa", "textvqa", "vg", "sharegpt4v", "chartqa", "docvqa")


def _vm(key: str) -> int:
    """``VmHWM`` / ``VmRSS`` of this process in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


# --------------------------------------------------------------------------------------------------
# synthetic dataset + store
# --------------------------------------------------------------------------------------------------
def make_inputs(root: Path, n: int, d: int) -> tuple[Path, Path]:
    """``(data.parquet, store dir)`` for ``n`` records (cached: reused when complete)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from scalselect_fast.store import StoreWriter

    data, store, done = root / "data.parquet", root / "reps", root / "complete"
    if done.exists():
        return data, store
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    conv_type = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))
    schema = pa.schema([("id", pa.string()), ("image", pa.string()), ("conversations", conv_type),
                        ("data_source", pa.string())])
    writer = StoreWriter(store, d=d, dtype="float16")
    skips = []
    with pq.ParquetWriter(data, schema, compression="zstd") as pw:
        for ci, start in enumerate(range(0, n, CHUNK)):
            m = min(CHUNK, n - start)
            idx = pa.array(np.arange(start, start + m, dtype=np.int64))
            num = pc.utf8_lpad(pc.cast(idx, pa.string()), 9, "0")
            ids = pc.binary_join_element_wise("s", num, "")
            src_code = (np.arange(start, start + m) * 7919 // 13) % len(SOURCES)
            source = pa.DictionaryArray.from_arrays(pa.array(src_code.astype(np.int32)),
                                                    pa.array(SOURCES)).cast(pa.string())
            text_only = (np.arange(start, start + m) % TEXT_ONLY_EVERY) == TEXT_ONLY_EVERY - 1
            image = pc.binary_join_element_wise(source, pc.binary_join_element_wise("img", num, ".jpg", ""), "/")
            image = pc.if_else(pa.array(text_only), pa.scalar(None, pa.string()), image)
            human = pc.binary_join_element_wise("<image>\nDescribe sample", num, " ")
            gpt = pc.binary_join_element_wise("A synthetic answer for", num, "of", source, " ")
            values = pc.make_struct(
                pa.array(np.tile(np.array(["human", "gpt"], object), m), pa.string()),
                pa.chunked_array([human, gpt]).combine_chunks().take(
                    pa.array(np.stack([np.arange(m), np.arange(m) + m], 1).ravel())),
                field_names=["from", "value"])
            conv = pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * m + 1, 2, dtype=np.int32)), values)
            pw.write_table(pa.table([ids, image, conv, source], schema=schema), row_group_size=CHUNK)
            rng = np.random.default_rng([7, ci])
            keep = np.flatnonzero(~text_only)
            rows = (rng.standard_normal((keep.size, d), dtype=np.float32)
                    * np.linspace(3.0, 0.1, d, dtype=np.float32))
            writer.write_shard(rows, ids.take(pa.array(keep)).to_pylist(), index=ci)
            for j in np.flatnonzero(text_only).tolist():
                skips.append(json.dumps({"index": start + j, "id": f"s{start + j:09d}", "reason": "text_only",
                                         "detail": "no image"}) + "\n")
    (store / "skipped.jsonl").write_text("".join(skips))
    done.write_text("ok")
    return data, store


# --------------------------------------------------------------------------------------------------
# the measured child
# --------------------------------------------------------------------------------------------------
def child(root: Path, out: Path, budget: str, quota: list[str]) -> dict:
    """Run the post-extraction stages of ``scalselect run`` on ``root``'s inputs; peak RSS per stage."""
    from scalselect_fast.run import make_config
    from scalselect_fast.run import stages
    from scalselect_fast.run.events import Events
    from scalselect_fast.run.fingerprints import stage_fingerprints
    from scalselect_fast.run.state import RunState
    from scalselect_fast.store import StoreSource

    base = _vm("VmRSS")
    data = root / "data.parquet"
    shutil.rmtree(out, ignore_errors=True)
    cfg = make_config(model="synthetic-bench-model", data=str(data), out=str(out), budget=budget,
                      quota=quota, html=False, quiet=True, format="parquet")
    events = Events(True, False)
    fps = stage_fingerprints(cfg, "synthetic-bench-model", "synthetic-bench-data")
    state = RunState(out, fps, False, events)
    store = stages._store_dir(state)
    store.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(root / "reps", store)  # the "extracted" store, not copied
    state.mark("extract", n=0)
    peaks, secs = {}, {}
    _reset_peak()
    t = time.perf_counter()
    src = StoreSource(store)
    stages._publish_skips(state)
    peaks["open"], secs["open"] = _vm("VmHWM"), time.perf_counter() - t
    _reset_peak()
    t = time.perf_counter()
    sub = stages._stage_fit(cfg, state, events, src)
    peaks["fit"], secs["fit"] = _vm("VmHWM"), time.perf_counter() - t
    _reset_peak()
    t = time.perf_counter()
    scores = stages._stage_score(cfg, state, events, src, sub)
    peaks["score"], secs["score"] = _vm("VmHWM"), time.perf_counter() - t
    _reset_peak()
    t = time.perf_counter()
    result = stages._stage_select(cfg, state, events, src, sub, scores, out, out / "skipped.jsonl")
    peaks["select"], secs["select"] = _vm("VmHWM"), time.perf_counter() - t
    return {"base": base, "peaks": peaks, "seconds": secs, "n_rows": int(src.n), "n_selected": result.n_selected,
            "cpu_s": time.process_time()}


def measure(root: Path, out: Path, budget: str, quota: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", str(root), "--out", str(out), "--budget", budget]
    for q in quota:
        cmd += ["--quota", q]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"child for {root} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs=2, default=[2_000_000, 20_000_000], metavar=("SMALL", "LARGE"))
    ap.add_argument("--d", type=int, default=16)
    ap.add_argument("--budget", default="0.1")
    ap.add_argument("--quota", action="append", default=[], help="e.g. source=*:0.3 (a run --quota)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/scalselect-bench-memory"))
    ap.add_argument("--keep", action="store_true", help="keep the generated inputs (default: kept; outputs removed)")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child is not None:
        print(json.dumps(child(a.child, a.out, a.budget, a.quota)))
        return 0
    gib = float(1 << 30)
    rows, results = [], {}
    stamp = now_utc()
    for n in a.sizes:
        root = a.work / f"n{n}-d{a.d}"
        t = time.perf_counter()
        make_inputs(root, n, a.d)
        gen = time.perf_counter() - t
        r = measure(root, a.work / f"out-n{n}", a.budget, a.quota)
        shutil.rmtree(a.work / f"out-n{n}", ignore_errors=True)
        r["peak"] = max(r["peaks"].values())
        results[n] = r
        print(f"n={n:>10} d={a.d} | base {r['base'] / gib:.3f} GiB | peak {r['peak'] / gib:.3f} GiB | "
              + " ".join(f"{k} {v / gib:.3f} GiB/{r['seconds'][k]:.1f}s" for k, v in r["peaks"].items())
              + f" | cpu {r['cpu_s']:.1f}s | inputs {gen:.0f}s", flush=True)
        rows.append({"run_id": stamp, "timestamp": stamp, **machine(), "load_average": load_average(),
                     **versions(), "n_records": n, "d": a.d, "budget": a.budget, "quota": ";".join(a.quota),
                     "base_bytes": r["base"], "peak_bytes": r["peak"],
                     **{f"peak_{k}_bytes": v for k, v in r["peaks"].items()},
                     **{f"{k}_s": round(v, 3) for k, v in r["seconds"].items()}, "cpu_s": round(r["cpu_s"], 2)})
    small, large = (results[n] for n in a.sizes)
    ratio = large["peak"] / small["peak"]
    ok_ratio, ok_abs = ratio <= RATIO_MAX, large["peak"] <= PEAK_MAX_GIB * gib
    for row in rows:
        row.update(ratio=round(ratio, 4), passed=ok_ratio and ok_abs)
    append_csv(CSV, rows)
    print(f"{'PASS' if ok_ratio else 'FAIL'}: peak RSS {a.sizes[1]} / {a.sizes[0]} records = {ratio:.3f} "
          f"(<= {RATIO_MAX})")
    print(f"{'PASS' if ok_abs else 'FAIL'}: peak RSS at {a.sizes[1]} records = {large['peak'] / gib:.3f} GiB "
          f"(<= {PEAK_MAX_GIB} GiB)")
    return 0 if ok_ratio and ok_abs else 1


if __name__ == "__main__":
    sys.exit(main())
