"""Dataset reading and writing throughput: what the validating readers cost over bare parsing.

For each container (JSON list, JSONL, Parquet) a synthetic LLaVA dataset of N records is written to
a temp folder, then timed (median of repeats, all in this run):

* baseline: bare parsing (``json.load`` / ``json.loads`` per line / ``pyarrow`` ``to_pylist``);
* ``read_dataset`` with ``--image-root`` (validation, placeholder rules, path confinement);
* ``write_selected`` of a 16% subset (original order).

Prints a table and appends rows to ``benchmarks/results/data.csv``. Quick by default (20k records);
``--full`` uses 1M, ``--n`` sets any size.

Layouts with embedded images (``--layouts``, on by default; ``--no-layouts`` skips them): WebDataset
tar shards, Parquet shards whose ``images`` column holds Hugging Face ``Image`` structs, and a
``datasets.save_to_disk`` folder, each at two image sizes (256 px JPEG, ~32 KB, a distinct image per
sample; 32 px, ~1 KB: the per-sample overhead's worst case). For each, in the same run:

* read rate of ``read_dataset`` (samples/s and MB/s of input) against the bare library read of the
  same files, the two timed alternately (medians) so machine load hits both alike: a plain ``tarfile`` stream reading every member's bytes; pyarrow ``iter_batches`` +
  ``to_pylist`` (rows as Python records, which any record reader needs); the Arrow table of
  ``datasets.load_from_disk`` via ``to_batches`` + ``to_pylist``. Floor: rate >= 0.8x the bare
  read, printed PASS/FAIL;
* ``write_selected`` of a 16% subset in kind (tar members copied byte for byte, Parquet shards,
  ``save_to_disk``);
* the last of 8 ranks reaching its range: ``read_dataset(start=7N/8)`` (the files before it passed
  over) against the whole read filtered by index, both yielding the same last eighth;
* image decode rate per core: ``load_image`` of the embedded bytes on one thread (images/s, MB/s of
  encoded bytes, megapixels/s), against Pillow's own ``open`` + ``convert("RGB")``.

Rows go to ``benchmarks/results/data_layouts.csv``.

    python benchmarks/bench_data.py [--n 20000 | --full] [--repeats 3] [--layout-n 2000]

``--rss`` measures instead the peak memory (``ru_maxrss``) of a fresh process that reads a LLaVA
JSON list of 200k and of 2M records with ``read_dataset`` (the streaming JSON reader plus the
constant-memory duplicate-id check) and prints the ratio, PASS when <= 1.2 (issue 15); rows go to
``benchmarks/results/data_rss.csv``. Takes a few minutes (writing and reading 2M records).

    python benchmarks/bench_data.py --rss [--rss-n 200000 2000000]
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
from _suite import RESULTS, alternating_times, append_csv, machine, median_time, now_utc, versions  # noqa: E402

#: the read-rate floor against the bare library read, for the embedded-image layouts
LAYOUT_FLOOR = 0.8


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


# --------------------------------------------------------------------------------------------------
# layouts with embedded images
# --------------------------------------------------------------------------------------------------
def _jpegs(side: int, k: int) -> list[bytes]:
    """k distinct noisy JPEGs: distinct so Parquet cannot dictionary-encode repeats away, noisy so
    they do not compress to nothing (real photos do not)."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(side)
    out = []
    for _ in range(k):
        base = rng.integers(0, 255, (side // 8 + 1, side // 8 + 1, 3), dtype=np.uint8)
        img = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:side, :side]
        img = np.clip(img.astype(np.int16) + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _layout_record(i: int) -> dict:
    return {"id": f"s{i:09d}", "source": ("vqa", "caption")[i % 2],
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is shown in this picture? Answer in one sentence."},
                {"from": "gpt", "value": f"A photo of object number {i} on a table, seen from above."}]}


def _write_layouts(d: Path, n: int, jpegs: list[bytes], shards: int = 4) -> dict[str, Path]:
    import io
    import tarfile

    per = -(-n // shards)
    (d / "wds").mkdir(parents=True)
    for s in range(shards):
        with tarfile.open(d / "wds" / f"shard-{s:06d}.tar", "w") as tf:
            for i in range(s * per, min(n, (s + 1) * per)):
                rec = _layout_record(i)
                for name, data in ((f"{rec['id']}.json", json.dumps(rec).encode()),
                                   (f"{rec['id']}.jpg", jpegs[i % len(jpegs)])):
                    ti = tarfile.TarInfo(name)
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    turn = pa.struct([("from", pa.string()), ("value", pa.string())])
    schema = pa.schema([("id", pa.string()), ("images", pa.list_(image)), ("source", pa.string()),
                        ("conversations", pa.list_(turn))])
    (d / "pq").mkdir()
    for s in range(shards):
        rows = [{**_layout_record(i), "images": [{"bytes": jpegs[i % len(jpegs)], "path": None}]}
                for i in range(s * per, min(n, (s + 1) * per))]
        # row groups of ~100 rows, as `datasets` writes image datasets
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), d / "pq" / f"train-{s:05d}-of-{shards:05d}.parquet",
                       row_group_size=100)
    out = {"webdataset": d / "wds" / f"shard-{{000000..{shards - 1:06d}}}.tar", "parquet_shards": d / "pq"}
    try:
        import datasets
    except ImportError:
        return out
    ds = datasets.Dataset.from_parquet([str(p) for p in sorted((d / "pq").iterdir())],
                                       cache_dir=str(d / "hf-cache"))
    ds.save_to_disk(str(d / "hf"))
    out["save_to_disk"] = d / "hf"
    return out


def _input_bytes(layout: str, path: Path) -> int:
    if layout == "webdataset":
        return sum(p.stat().st_size for p in path.parent.glob("*.tar"))
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _bare_read(layout: str, path: Path) -> int:
    """The library's own read of every record / member, nothing else."""
    import tarfile

    n = 0
    if layout == "webdataset":
        for shard in sorted(path.parent.glob("*.tar")):
            with tarfile.open(shard, "r|") as tf:
                for ti in tf:
                    if ti.isreg():
                        tf.extractfile(ti).read()
                        n += 1
        return n // 2  # two members per sample
    if layout == "parquet_shards":
        for f in sorted(path.glob("*.parquet")):
            for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
                n += len(batch.to_pylist())
        return n
    import datasets

    for batch in datasets.load_from_disk(str(path)).data.to_batches(max_chunksize=1024):
        n += len(batch.to_pylist())
    return n


def _alternating(fa, fb, repeats: int) -> tuple[float, float, object, object]:
    """Median times of ``fa`` and ``fb`` run alternately (:func:`_suite.alternating_times`); returns
    (t_a, t_b, last result a, last result b)."""
    ta, tb, ra, rb = alternating_times(fa, fb, repeats)
    return sorted(ta)[len(ta) // 2], sorted(tb)[len(tb) // 2], ra, rb


def _decode_rate(jpegs: list[bytes], repeats: int) -> dict:
    import io

    from PIL import Image

    from scalselect_fast.data import EmbeddedImage, load_image

    imgs = [EmbeddedImage(b, f"bench/{i}.jpg") for i, b in enumerate(jpegs[:256])]

    def ours():
        for im in imgs:
            load_image(im)

    def pil():
        for im in imgs:
            with Image.open(io.BytesIO(im.data)) as x:
                x.convert("RGB")

    t_ours, t_pil, _, _ = _alternating(ours, pil, repeats)
    with Image.open(io.BytesIO(jpegs[0])) as x:
        mpix = x.width * x.height / 1e6
    mb = sum(len(im.data) for im in imgs) / 1e6
    return {"decode_img_s_core": len(imgs) / t_ours, "decode_mb_s_core": mb / t_ours,
            "decode_mpix_s_core": len(imgs) * mpix / t_ours, "decode_vs_pillow": t_pil / t_ours}


def bench_layouts(n: int, repeats: int) -> list[dict]:
    from scalselect_fast.data import read_dataset, write_selected

    rows = []
    for side, n_side in ((256, n), (32, n * 10)):
        jpegs = _jpegs(side, n_side)
        decode = _decode_rate(jpegs, repeats)
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            inputs = _write_layouts(d, n_side, jpegs)
            keep = {f"s{i:09d}" for i in range(0, n_side, 6)}
            for layout, path in inputs.items():
                spec = str(path)
                mb = _input_bytes(layout, path) / 1e6
                t_base, t_read, n_base, n_read = _alternating(lambda: _bare_read(layout, path),
                                                              lambda: sum(1 for _ in read_dataset(spec)), repeats)
                assert n_base == n_read == n_side, (layout, n_base, n_read)
                t_write = median_time(lambda: write_selected(spec, d / f"sel-{layout}", keep), repeats)[0]
                # the last of 8 ranks reaching its range: read_dataset(start=) passes over the files before it
                last = n_side - n_side // 8
                t_skip, t_filter, n_skip, n_filter = _alternating(
                    lambda: sum(1 for _ in read_dataset(spec, start=last)),
                    lambda: sum(1 for s in read_dataset(spec) if s.index >= last), repeats)
                assert n_skip == n_filter == n_side - last, (layout, n_skip, n_filter)
                ratio = t_base / t_read
                rows.append({"layout": layout, "image_px": side, "image_kb": round(len(jpegs[0]) / 1e3, 1),
                             "n": n_side, "size_mb": round(mb, 1), "bare_read_s": round(t_base, 4),
                             "read_s": round(t_read, 4), "read_samples_s": round(n_side / t_read),
                             "read_mb_s": round(mb / t_read, 1), "bare_samples_s": round(n_side / t_base),
                             "rate_vs_bare": round(ratio, 3), "floor": LAYOUT_FLOOR,
                             "verdict": "PASS" if ratio >= LAYOUT_FLOOR else "FAIL",
                             "write16_s": round(t_write, 4), "rank7of8_start_s": round(t_skip, 4),
                             "rank7of8_filter_s": round(t_filter, 4),
                             **{k: round(v, 2) for k, v in decode.items()}})
    return rows


def _print_layouts(rows: list[dict]) -> None:
    print(f"\n{'layout':<15} {'px':>4} {'KB/img':>6} {'N':>7} {'MB':>7} {'bare/s':>9} {'read/s':>9} {'MB/s':>7} "
          f"{'x bare':>7} {'floor':>5} {'':>4} {'write16% s':>10} {'decode img/s/core':>17} {'MB/s':>6} "
          f"{'x PIL':>6} {'rank 7/8: start= vs filter s':>28}")
    for r in rows:
        print(f"{r['layout']:<15} {r['image_px']:>4} {r['image_kb']:>6} {r['n']:>7} {r['size_mb']:>7} "
              f"{r['bare_samples_s']:>9,} {r['read_samples_s']:>9,} {r['read_mb_s']:>7} {r['rate_vs_bare']:>7.2f} "
              f"{r['floor']:>5} {r['verdict']:>4} {r['write16_s']:>10.2f} {r['decode_img_s_core']:>17,.0f} "
              f"{r['decode_mb_s_core']:>6.1f} {r['decode_vs_pillow']:>6.2f} "
              f"{r['rank7of8_start_s']:>13.3f} vs {r['rank7of8_filter_s']:<10.3f}")


_RSS_CHILD = """
import resource, sys, time
from scalselect_fast.data import read_dataset
t = time.perf_counter()
n = sum(1 for _ in read_dataset(sys.argv[1], image_root=sys.argv[2]))
print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, time.perf_counter() - t)
"""


def _rss_json(d: Path, n: int) -> Path:
    """A compact LLaVA JSON list of ``n`` records (~300 bytes each), written streaming."""
    path = d / f"rss-{n}.json"
    with open(path, "w") as fh:
        fh.write("[\n")
        for i, r in enumerate(_records(n)):
            fh.write(("," if i else "") + json.dumps(r) + "\n")
        fh.write("]\n")
    return path


def rss_main(sizes: list[int]) -> int:
    """Peak RSS of reading each size in a fresh process; ratio largest/smallest, PASS when <= 1.2."""
    import subprocess

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for n in sizes:
            path = _rss_json(d, n)
            env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
            out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(path), str(d)], env=env, check=True,
                                 capture_output=True, text=True).stdout.split()
            got, rss, secs = int(out[0]), int(out[1]), float(out[2])
            assert got == n, (got, n)
            rows.append({"n": n, "size_mb": round(path.stat().st_size / 1e6, 1), "peak_rss_mb": round(rss / 2**20, 1),
                         "read_s": round(secs, 2), "read_per_s": round(n / secs)})
            path.unlink()
    ratio = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    print(f"{'N':>9} {'JSON MB':>8} {'peak RSS MB':>12} {'read s':>7} {'read/s':>9}")
    for r in rows:
        print(f"{r['n']:>9} {r['size_mb']:>8} {r['peak_rss_mb']:>12} {r['read_s']:>7} {r['read_per_s']:>9,}")
    verdict = "PASS" if ratio <= 1.2 else "FAIL"
    print(f"peak RSS ratio {rows[-1]['n']:,} / {rows[0]['n']:,} records: {ratio:.3f} (floor <= 1.2): {verdict}")
    meta = {"timestamp": now_utc(), **{f"m_{k}": v for k, v in machine().items()},
            **{f"v_{k}": v for k, v in versions().items() if k in ("python", "scalselect_fast")},
            "load1": round(os.getloadavg()[0], 2)}
    append_csv(RESULTS / "data_rss.csv", [{**meta, **r, "ratio": round(ratio, 4), "verdict": verdict} for r in rows])
    print(f"appended {len(rows)} rows to {RESULTS / 'data_rss.csv'}")
    return 0 if verdict == "PASS" else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--full", action="store_true", help="1M records (and 20k / 200k embedded-image samples)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layout-n", type=int, default=2000,
                   help="samples per embedded-image layout at 256 px (10x as many at 32 px)")
    p.add_argument("--layouts", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the embedded-image layouts (WebDataset, Parquet shards, save_to_disk)")
    p.add_argument("--only-layouts", action="store_true", help="skip the JSON/JSONL/Parquet path rows")
    p.add_argument("--rss", action="store_true", help="peak memory of reading a 200k vs a 2M record JSON")
    p.add_argument("--rss-n", type=int, nargs="+", default=[200_000, 2_000_000])
    args = p.parse_args(argv)
    if args.rss:
        return rss_main(sorted(args.rss_n))
    n = 1_000_000 if args.full else args.n
    if args.layouts:
        layout_rows = bench_layouts(20_000 if args.full else args.layout_n, args.repeats)
        _print_layouts(layout_rows)
        meta = {"timestamp": now_utc(), **{f"m_{k}": v for k, v in machine().items()},
                **{f"v_{k}": v for k, v in versions().items() if k in ("python", "scalselect_fast")},
                "pyarrow": pa.__version__, "load1": round(os.getloadavg()[0], 2)}
        append_csv(RESULTS / "data_layouts.csv", [{**meta, **r} for r in layout_rows])
        print(f"appended {len(layout_rows)} rows to {RESULTS / 'data_layouts.csv'}")
        if args.only_layouts:
            return 0
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
