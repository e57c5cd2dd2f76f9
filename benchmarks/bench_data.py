"""Dataset reading and writing throughput: what the validating readers cost over bare parsing.

For each container (JSON list, JSONL, Parquet) a synthetic LLaVA dataset of N records is written to
a temp folder, then timed (median of repeats, all in this run):

* baseline: bare parsing (``json.load`` / ``json.loads`` per line / ``pyarrow`` ``to_pylist``);
* ``read_dataset`` with ``--image-root`` (validation, placeholder rules, path confinement);
* ``write_selected`` of a 16% subset (original order).

Prints a table and appends rows to ``benchmarks/results/data.csv``. Quick by default (20k records);
``--full`` uses 1M, ``--n`` sets any size.

    python benchmarks/bench_data.py [--n 20000 | --full] [--repeats 3]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from scalselect_fast.data import read_dataset, write_selected  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _suite import median_time  # noqa: E402


def _records(n: int):
    for i in range(n):
        yield {"id": f"s{i:09d}", "image": f"images/{i % 997:04d}/{i}.jpg", "source": ("vqa", "caption")[i % 2],
               "conversations": [
                   {"from": "human", "value": "<image>\nWhat is shown in this picture? Answer in one sentence."},
                   {"from": "gpt", "value": f"A photo of object number {i} on a table, seen from above."},
                   {"from": "human", "value": "What colour is it?"}, {"from": "gpt", "value": "Red."}]}


def _write_inputs(d: Path, n: int) -> dict[str, Path]:
    paths = {"jsonl": d / "data.jsonl", "json": d / "data.json", "parquet": d / "data.parquet"}
    with open(paths["jsonl"], "w") as fh:
        for r in _records(n):
            fh.write(json.dumps(r) + "\n")
    with open(paths["json"], "w") as fh:
        json.dump(list(_records(n)), fh, indent=2)
    writer = None
    batch = []
    for r in _records(n):
        batch.append(r)
        if len(batch) == 50_000:
            t = pa.Table.from_pylist(batch)
            writer = writer or pq.ParquetWriter(paths["parquet"], t.schema)
            writer.write_table(t)
            batch = []
    if batch:
        t = pa.Table.from_pylist(batch)
        writer = writer or pq.ParquetWriter(paths["parquet"], t.schema)
        writer.write_table(t)
    writer.close()
    return paths


def _baseline(container: str, path: Path) -> int:
    if container == "json":
        with open(path) as fh:
            return len(json.load(fh))
    if container == "jsonl":
        n = 0
        with open(path, "rb") as fh:
            for line in fh:
                json.loads(line)
                n += 1
        return n
    n = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        n += len(batch.to_pylist())
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--full", action="store_true", help="1M records")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    n = 1_000_000 if args.full else args.n
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "images").mkdir()
        paths = _write_inputs(d, n)
        keep = {f"s{i:09d}" for i in range(0, n, 6)}  # ~16%
        for container, path in paths.items():
            t_base = median_time(lambda: _baseline(container, path), args.repeats)[0]
            t_read = median_time(lambda: sum(1 for _ in read_dataset(path, image_root=d)), args.repeats)[0]
            out = d / f"out.{container}"
            t_write = median_time(lambda: write_selected(path, out, keep), args.repeats)[0]
            rows.append({"container": container, "n": n, "size_mb": round(path.stat().st_size / 1e6, 1),
                         "baseline_s": t_base, "read_s": t_read, "write_s": t_write,
                         "read_per_s": n / t_read, "read_vs_baseline": t_read / t_base})
    print(f"{'container':<9} {'N':>9} {'MB':>7} {'parse s':>8} {'read s':>8} {'read/s':>10} {'x parse':>8} "
          f"{'write16% s':>10}")
    for r in rows:
        print(f"{r['container']:<9} {r['n']:>9} {r['size_mb']:>7} {r['baseline_s']:>8.2f} {r['read_s']:>8.2f} "
              f"{r['read_per_s']:>10,.0f} {r['read_vs_baseline']:>8.2f} {r['write_s']:>10.2f}")
    out_csv = Path(__file__).resolve().parent / "results" / "data.csv"
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    meta = {"timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.node()} {platform.machine()} cpus={os.cpu_count()}",
            "python": platform.python_version(), "pyarrow": pa.__version__,
            "load1": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else ""}
    new = not out_csv.exists()
    with open(out_csv, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(meta) + list(rows[0]))
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**meta, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}})
    print(f"appended {len(rows)} rows to {out_csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
