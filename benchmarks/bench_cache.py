"""The representation cache (issue 22): a changed mixture extracts only what is new, and what that costs.

On the demo dataset (tiny random LLaVA, generated 32 px images), cut into three LLaVA JSON files A, B, C,
with one ``--out`` (so the default cache inside it), all in this run:

1. ``run`` on A ∪ B, then on B ∪ C (C new), then on A ∪ B ∪ C with the files listed in another order
   and every id renamed. Model work is counted by wrapping ``VLM.forward_layer`` (samples that reached
   the model), not inferred from timing: PASS when the second run forwards exactly C's new samples and
   the third none.
2. The third run's store rows against the rows runs 1 and 2 extracted (bit-identical: PASS), and its
   selection against a run with no cache (``--cache none``: every vector extracted in that run's own
   batches): same kept set, largest score difference and largest vector difference printed (batch
   composition changes padding, so vectors may differ in their last bits; the store keeps float16).
3. Overhead of a fully cached extraction (``extract_to_store`` of A ∪ B ∪ C with every sample in the
   cache, model already loaded) against a bare read of the same dataset (``json.load`` of each file +
   every image file's bytes, the least any content-addressed reuse must read), timed alternately
   (medians of wall time; the CPU-time ratio is printed beside it). Floor 1.5x on wall time: PASS/FAIL. The validating reader alone (``read_dataset``) is timed too, to
   show how much of the distance is the reader's and how much the cache's. The full ``run`` wall times
   are printed too (they include torch start-up work, the fit, the report: fixed costs that dominate at
   demo size).
3b. The garbage collector on a long cached extraction: the loop keeps the objects loaded before it
   (torch, transformers, the model) out of full collections (``gc.freeze``, see ``scalselect_fast/gcfreeze.py``);
   a fully cached extraction of a 10x larger demo with and without it, alternately (CPU time, medians
   of ``--gc-rounds``), and how many full collections each met.
4. Cost of the key (sha256 over messages + image bytes): CPU time per sample and MB/s, on the demo's
   images and on ``bench_data``'s 256 px JPEGs (~32 KB), with what a 10M-image rerun costs at that rate.
5. Disk cost per cached sample (``cache info``: bytes / entries; vectors are float32, 4·d bytes + 37).

Rows go to ``benchmarks/results/cache.csv``.

    python benchmarks/bench_cache.py [--n 600] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _suite import RESULTS, alternating_times, append_csv, machine, now_utc, versions  # noqa: E402

#: a fully cached extraction may cost at most this multiple of a bare read of the dataset
OVERHEAD_FLOOR = 1.5


class _Forwards:
    """Counts samples reaching the model: every batch goes through ``VLM.forward_layer``."""

    def __init__(self):
        from scalselect_fast.extract.model import VLM

        self.samples = self.calls = 0
        orig = VLM.forward_layer

        def counting(vlm, inputs):
            self.calls += 1
            self.samples += int(inputs["input_ids"].shape[0])
            return orig(vlm, inputs)

        VLM.forward_layer = counting

    def take(self) -> int:
        n, self.samples, self.calls = self.samples, 0, 0
        return n


class _FullCollections:
    """Number and wall time of the garbage collector's full (generation 2) collections until ``stop``."""

    def __init__(self):
        import gc

        self.n, self.seconds, self._t0 = 0, 0.0, 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.n += 1
            self.seconds += time.perf_counter() - self._t0

    def stop(self) -> None:
        import gc

        gc.callbacks.remove(self._callback)


def _freeze_ab(vlm, d: Path, n: int, rounds: int) -> dict:
    """CPU time of a fully cached ``extract_to_store`` of an ``n``-record demo with the loop's
    ``gc.freeze`` (as shipped) and with it replaced by a no-op, alternately; medians and the number of
    full collections each variant met."""
    import contextlib

    import scalselect_fast.extract.loop as loop
    from scalselect_fast.data.demo import make_demo_dataset
    from scalselect_fast.extract import extract_to_store

    make_demo_dataset(d / "data", n=n, seed=11)
    kw = dict(image_root=d / "data", batch_size=8, dtype="fp32", device="cpu", progress=False, cache=d / "cache")
    data = str(d / "data" / "demo.json")
    extract_to_store(vlm, data, d / "first", **kw)  # fills the cache
    shipped, times, collections = loop.loaded_objects_frozen, {"on": [], "off": []}, {"on": 0, "off": 0}
    try:
        for r in range(rounds):
            for mode in ("off", "on"):
                loop.loaded_objects_frozen = shipped if mode == "on" else contextlib.nullcontext
                full_gc = _FullCollections()
                t0 = time.process_time()
                extract_to_store(vlm, data, d / f"{mode}{r}", **kw)
                times[mode].append(time.process_time() - t0)
                full_gc.stop()
                collections[mode] += full_gc.n
    finally:
        loop.loaded_objects_frozen = shipped
    return {"n": n, "on_s": float(np.median(times["on"])), "off_s": float(np.median(times["off"])),
            "on_gc": collections["on"], "off_gc": collections["off"]}


def _store_rows(out: Path) -> dict:
    from scalselect_fast.store import StoreSource

    src = StoreSource(out / ".scalselect" / "reps")
    rows = np.concatenate([b.copy() for _, b in src.iter_blocks()])
    return dict(zip(src.ids(), rows))


def _bare_read(files: list[Path], root: Path) -> int:
    n = 0
    for f in files:
        with open(f) as fh:
            for rec in json.load(fh):
                if rec.get("image"):
                    with open(root / rec["image"], "rb") as im:
                        n += len(im.read())
    return n


def _cpu_timed(fn, into: list):
    """``fn`` that appends the CPU time (``time.process_time``) of each call to ``into``."""
    def timed():
        t0 = time.process_time()
        out = fn()
        into.append(time.process_time() - t0)
        return out
    return timed


def _key_cost(samples: list, context: bytes, repeats: int) -> dict:
    from scalselect_fast.data import EmbeddedImage
    from scalselect_fast.extract.cache import sample_key

    nbytes = sum(len(im.data) if isinstance(im, EmbeddedImage) else os.path.getsize(im)
                 for s in samples for im in s.images)
    times = []  # CPU time: a per-core rate, less moved by a shared machine's load than wall time
    for _ in range(repeats):
        t0 = time.process_time()
        for s in samples:
            sample_key(context, s)
        times.append(time.process_time() - t0)
    t = float(np.median(times))
    us = t / len(samples) * 1e6
    return {"n": len(samples), "kb_per_image": round(nbytes / max(len(samples), 1) / 1024, 1),
            "us_per_sample": round(us, 1), "mb_s": round(nbytes / t / 1e6, 1),
            "10M_images_min": round(us * 10_000_000 / 1e6 / 60, 1)}


def _jpeg_samples(d: Path, n: int) -> list:
    """``n`` samples whose images are bench_data's 256 px noisy JPEGs (one file each)."""
    from bench_data import _jpegs
    from scalselect_fast.data import read_dataset

    (d / "images").mkdir(parents=True, exist_ok=True)
    jpegs = _jpegs(256, 64)
    recs = []
    for i in range(n):
        (d / "images" / f"{i}.jpg").write_bytes(jpegs[i % len(jpegs)][:-2] + i.to_bytes(4, "little") + b"\xff\xd9")
        recs.append({"id": f"j{i}", "image": f"images/{i}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": f"Object {i}."}]})
    (d / "j.json").write_text(json.dumps(recs))
    return list(read_dataset(d / "j.json", image_root=d))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=600, help="demo records (split into thirds A, B, C)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--gc-rounds", type=int, default=3, help="rounds of the freeze on/off comparison (10x --n records)")
    args = p.parse_args(argv)

    from scalselect_fast.data import read_dataset
    from scalselect_fast.data.demo import make_demo_dataset
    from scalselect_fast.extract import extract_to_store, load_vlm
    from scalselect_fast.extract.cache import cache_info
    from scalselect_fast.extract.cache_lookup import open_cache
    from scalselect_fast.extract.tiny import build_tiny_model
    import pyarrow.parquet as pq

    from scalselect_fast.run import make_config, run

    fw = _Forwards()
    checks, row = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        root = d / "data"
        make_demo_dataset(root, n=args.n, seed=7)
        recs = json.loads((root / "demo.json").read_text())
        k = len(recs) // 3
        parts = {"A": recs[:k], "B": recs[k:2 * k], "C": recs[2 * k:]}
        files = {}
        for name, rs in parts.items():
            files[name] = root / f"{name}.json"
            files[name].write_text(json.dumps(rs))
            files[name + "'"] = root / f"{name}-renamed.json"
            files[name + "'"].write_text(json.dumps([{**r, "id": f"renamed-{r['id']}"} for r in rs]))
        model = build_tiny_model("llava", d / "tiny-llava", seed=0)
        out = d / "out"

        def cfg(data, o=out, **kw):
            return make_config(model=str(model), data=[str(files[x]) for x in data], image_root=str(root),
                               out=str(o), budget="16%", quiet=True, batch_size=8, shard_size=256, **kw)

        def content(r):
            return None if not r.get("image") else (json.dumps(r["conversations"], sort_keys=True),
                                                    (root / r["image"]).read_bytes())

        with_img = {n: [content(r) for r in rs if r.get("image")] for n, rs in parts.items()}
        seen = set(with_img["A"]) | set(with_img["B"])
        new_c = sum(1 for c in with_img["C"] if c not in seen)

        t0 = time.perf_counter()
        r1 = run(cfg(["A", "B"]))
        w1, f1 = time.perf_counter() - t0, fw.take()
        rows = _store_rows(out)
        t0 = time.perf_counter()
        r2 = run(cfg(["B", "C"]))
        w2, f2 = time.perf_counter() - t0, fw.take()
        rows.update(_store_rows(out))
        t0 = time.perf_counter()
        r3 = run(cfg(["C'", "A'", "B'"]))
        w3, f3 = time.perf_counter() - t0, fw.take()
        rows3 = _store_rows(out)
        t0 = time.perf_counter()
        fresh = run(cfg(["C'", "A'", "B'"], o=d / "fresh", cache="none"))
        w4, f4 = time.perf_counter() - t0, fw.take()
        rows_fresh = _store_rows(d / "fresh")

        print(f"demo N={len(recs)} (A {len(parts['A'])}, B {len(parts['B'])}, C {len(parts['C'])}; "
              f"C new with an image: {new_c})")
        print(f"{'run':<34} {'forwarded':>9} {'reused':>7} {'extracted':>9} {'wall s':>7}")
        for name, r, f, w in (("1 A+B", r1, f1, w1), ("2 B+C", r2, f2, w2),
                              ("3 C'+A'+B' (reordered, renamed)", r3, f3, w3), ("4 same, --cache none", fresh, f4, w4)):
            c = r.report.get("cache") or {"reused": "-", "extracted": "-"}
            print(f"{name:<34} {f:>9} {c['reused']:>7} {c['extracted']:>9} {w:>7.2f}")
        checks.append(("second run forwards exactly C's new samples", f2 == new_c))
        checks.append(("third run forwards none", f3 == 0))
        identical = all(v.tobytes() == rows[i.removeprefix("renamed-")].tobytes() for i, v in rows3.items())
        checks.append(("reused store rows bit-identical to the extracted ones", identical))
        m3 = {m["id"]: m for m in pq.read_table(r3.manifest_path).to_pylist()}
        mf = {m["id"]: m for m in pq.read_table(fresh.manifest_path).to_pylist()}
        same_sel = {i for i, m in m3.items() if m["kept"]} == {i for i, m in mf.items() if m["kept"]}
        checks.append(("selection equals a run with no cache", same_sel))
        ids = [i for i in m3 if m3[i]["score"] is not None]
        s3 = np.array([m3[i]["score"] for i in ids])
        sf = np.array([mf[i]["score"] for i in ids])
        score_rel = float(np.max(np.abs(s3 - sf) / np.maximum(np.abs(sf), 1e-30)))
        vec_abs = float(max(np.max(np.abs(rows3[i].astype(np.float32) - rows_fresh[i].astype(np.float32)))
                            for i in rows3))
        print(f"cached vs no-cache run: max |vector diff| {vec_abs:.3g} (float16 store), max relative score diff "
              f"{score_rel:.3g}")

        # 3. overhead of a fully cached extraction vs a bare read
        all_files = [files["C'"], files["A'"], files["B'"]]
        vlm = load_vlm(str(model), dtype="fp32", device="cpu")
        cache_dir = out / ".scalselect" / "cache"
        counter = iter(range(1_000_000))

        def cached_extract(fs=all_files):
            s = extract_to_store(vlm, [str(f) for f in fs], d / "x" / str(next(counter)), image_root=root,
                                 batch_size=8, shard_size=256, dtype="fp32", device="cpu", progress=False,
                                 cache=cache_dir)
            return s["cache"]

        cpu = {"bare": [], "cached": []}
        full_gc = _FullCollections()
        tb, tc, _, last = alternating_times(_cpu_timed(lambda: _bare_read(all_files, root), cpu["bare"]),
                                            _cpu_timed(cached_extract, cpu["cached"]), args.repeats)
        fw.take()
        full_gc.stop()
        t_bare, t_cached = float(np.median(tb)), float(np.median(tc))
        ratio = t_cached / t_bare
        # CPU time of this process too: on a shared machine it moves less with the neighbours' load
        c_bare, c_cached = (float(np.median(cpu[k][1:])) for k in ("bare", "cached"))  # [0]: the untimed warm-up
        cpu_ratio = c_cached / c_bare
        print(f"fully cached extraction {t_cached * 1e3:.1f} ms vs bare read {t_bare * 1e3:.1f} ms: {ratio:.2f}x "
              f"(floor {OVERHEAD_FLOOR}x) {'PASS' if ratio <= OVERHEAD_FLOOR else 'FAIL'}; CPU time {c_cached * 1e3:.1f} "
              f"vs {c_bare * 1e3:.1f} ms = {cpu_ratio:.2f}x; cache {last}")
        print(f"  full garbage collections (generation 2) during these runs: {full_gc.n}, {full_gc.seconds * 1e3:.0f} ms "
              f"(the extraction keeps the objects loaded before it out of them: scalselect_fast/gcfreeze.py)")
        checks.append((f"cached extraction <= {OVERHEAD_FLOOR}x bare read", ratio <= OVERHEAD_FLOOR))
        # where the distance to the floor comes from: the validating reader every run uses anyway
        t_reader = float(np.median(alternating_times(
            lambda: sum(1 for f in all_files for _ in read_dataset(f, image_root=root)), lambda: None,
            args.repeats)[0]))
        print(f"  of which: read_dataset alone (validating reader, no cache) {t_reader * 1e3:.1f} ms = "
              f"{t_reader / t_bare:.2f}x the bare read; cached extraction = {t_cached / t_reader:.2f}x read_dataset "
              f"(the rest: the key, the lookups, the store's fsync'd shard commits)")

        # the same on a third of the data: the slope between the two sizes is the per-sample cost a large
        # rerun converges to (fixed costs -- store commits' fsync, model digest, counting pass -- drop out)
        one = [files["A'"]]
        tb1, tc1, _, _ = alternating_times(lambda: _bare_read(one, root), lambda: cached_extract(one), args.repeats)
        fw.take()
        n_all, n_one = sum(len(parts[x]) for x in "ABC"), len(parts["A"])
        per_bare = (t_bare - float(np.median(tb1))) / (n_all - n_one)
        per_cached = (t_cached - float(np.median(tc1))) / (n_all - n_one)
        fixed = t_cached - per_cached * n_all
        marginal = per_cached / per_bare if per_bare > 0 else float("nan")
        print(f"  per sample (slope {n_one} -> {n_all} records): cached extraction {per_cached * 1e6:.0f} us, bare read "
              f"{per_bare * 1e6:.0f} us = {marginal:.2f}x; fixed cost of a cached extraction {fixed * 1e3:.0f} ms")

        # 3b. a long cached extraction meets full garbage collections (each walks every object torch and
        # transformers loaded) unless those objects are frozen out of them (extract/loop.py): the same
        # extraction of a 10x larger demo with the freeze and without it, alternately, CPU time
        gc_ab = _freeze_ab(vlm, d / "big", args.n * 10, args.gc_rounds)
        print(f"  {gc_ab['n']} records, fully cached, CPU time (median of {args.gc_rounds}): objects frozen "
              f"{gc_ab['on_s'] * 1e3:.0f} ms ({gc_ab['on_gc']} full collections) vs not frozen {gc_ab['off_s'] * 1e3:.0f} ms "
              f"({gc_ab['off_gc']} full collections): {gc_ab['off_s'] / gc_ab['on_s']:.2f}x")

        # 4. the key's cost
        rc = open_cache(cache_dir, vlm, threshold=0.9, instruction="all")
        demo_samples = [s for f in all_files for s in read_dataset(f, image_root=root)]
        kc_demo = _key_cost(demo_samples, rc.context_bytes, args.repeats)
        kc_jpeg = _key_cost(_jpeg_samples(d / "jpeg", 2000), rc.context_bytes, args.repeats)
        for label, kc in (("demo 32 px PNG", kc_demo), ("bench_data 256 px JPEG", kc_jpeg)):
            print(f"key cost, {label}: {kc['us_per_sample']} us/sample, {kc['mb_s']} MB/s of image bytes "
                  f"({kc['kb_per_image']} KB/image, page cache warm) -> 10M images: {kc['10M_images_min']} min "
                  f"on one core")
        info = cache_info(cache_dir)
        print(f"cache on disk: {info['bytes']} bytes for {info['entries']} entries = {info['bytes_per_entry']} "
              f"bytes/sample (d={vlm.hidden_size}: float32 vectors {4 * vlm.hidden_size} + key/crc/flag 37 "
              f"+ file headers)")
        row = {"n": len(recs), "new_c": new_c, "forwarded_1": f1, "forwarded_2": f2, "forwarded_3": f3,
               "wall_1_s": round(w1, 3), "wall_2_s": round(w2, 3), "wall_3_s": round(w3, 3),
               "wall_nocache_s": round(w4, 3), "bit_identical": identical, "same_selection": same_sel,
               "max_vec_diff": vec_abs, "max_score_rel_diff": score_rel, "bare_read_s": round(t_bare, 4),
               "cached_extract_s": round(t_cached, 4), "overhead_x": round(ratio, 3),
               "bare_read_cpu_s": round(c_bare, 4), "cached_extract_cpu_s": round(c_cached, 4),
               "overhead_cpu_x": round(cpu_ratio, 3),
               "read_dataset_s": round(t_reader, 4), "cached_us_per_sample": round(per_cached * 1e6, 1),
               "bare_us_per_sample": round(per_bare * 1e6, 1), "marginal_x": round(marginal, 3),
               "cached_fixed_s": round(fixed, 4), "full_gc_n": full_gc.n, "full_gc_s": round(full_gc.seconds, 4),
               "gc_ab_n": gc_ab["n"], "gc_frozen_cpu_s": round(gc_ab["on_s"], 4), "gc_unfrozen_cpu_s": round(gc_ab["off_s"], 4),
               "gc_frozen_full": gc_ab["on_gc"], "gc_unfrozen_full": gc_ab["off_gc"],
               "key_us_demo": kc_demo["us_per_sample"], "key_mb_s_demo": kc_demo["mb_s"],
               "key_us_jpeg256": kc_jpeg["us_per_sample"], "key_mb_s_jpeg256": kc_jpeg["mb_s"],
               "key_10M_min_jpeg256": kc_jpeg["10M_images_min"], "bytes_per_entry": info["bytes_per_entry"],
               "d": vlm.hidden_size}
    for what, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {what}")
    meta = {"timestamp": now_utc(), **{f"m_{k}": v for k, v in machine().items()},
            **{f"v_{k}": v for k, v in versions().items() if k in ("python", "scalselect_fast", "torch")},
            "load1": round(os.getloadavg()[0], 2)}
    # one row per check (metric + status, read by `python -m benchmarks`), each with every measurement
    append_csv(RESULTS / "cache.csv", [{**meta, "metric": what, "status": "PASS" if ok else "FAIL", **row}
                                       for what, ok in checks])
    print(f"appended {len(checks)} rows to {RESULTS / 'cache.csv'}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
