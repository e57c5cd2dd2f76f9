"""Cost of the output-time record check (issue 22 item 4) and of the content keys it needs, on the demo.

``scalselect run`` re-reads the input's records and re-hashes the selected records' images before it
writes them (:mod:`scalselect_fast.output_check`). Measured here, in CPU seconds (``time.process_time``,
one process; medians of alternating repeats):

1. the check itself (``first_changed`` over the selected rows), and the bare reader pass it contains,
   so the hashing share per selected record shows;
2. the content key at extraction (``sample_key`` of every record), against the extraction's own CPU per
   record with ``cache=None`` (keys are computed there too: this is what that choice costs);
3. the file-level digest of the data files the run makes before it commits (one per run).

Correctness lines (PASS/FAIL): the unchanged demo has no changed record; a selected image re-encoded
(same pixels, new bytes) in a copy of the demo is found and named. Cost line: the check's CPU is at
most ``CHECK_FLOOR`` of the extraction's CPU (PASS/FAIL).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _suite import RESULTS, append_csv, machine, now_utc, versions  # noqa: E402

#: the check may cost at most this share of the extraction's CPU (the demo's tiny model is the worst
#: case: a real VLM's forward pass is thousands of times dearer per record)
CHECK_FLOOR = 0.05


def _cpu(fn, repeats: int) -> tuple[list[float], object]:
    out, res = [], None
    for _ in range(repeats):
        t = time.process_time()
        res = fn()
        out.append(time.process_time() - t)
    return out, res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget", default="16%")
    args = p.parse_args(argv)

    from scalselect_fast.data import read_dataset
    from scalselect_fast.data.demo import DEMO_DATA, DEMO_DIR
    from scalselect_fast.data.sources import open_dataset
    from scalselect_fast.extract import extract_to_store
    from scalselect_fast.extract.cache import sample_key
    from scalselect_fast.extract.loop import STORE_KEY_CONTEXT
    from scalselect_fast.extract.tiny import build_tiny_model
    from scalselect_fast.output_check import first_changed
    from scalselect_fast.run import Events, make_config, run
    from scalselect_fast.store import StoreSource

    checks, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_model("llava", tmp / "llava", seed=0)
        data = DEMO_DIR / DEMO_DATA
        cfg = make_config(model=str(model), data=str(data), image_root=str(DEMO_DIR), out=str(tmp / "out"),
                          budget=args.budget, batch_size=16, shard_size=64, quiet=True)
        res = run(cfg, events=Events(quiet=True))
        src = StoreSource(tmp / "out" / ".scalselect" / "reps")
        ids = src.ids()
        at = {sid: r for r, sid in enumerate(ids)}
        kept = [at[sid] for sid in (tmp / "out" / "selected.txt").read_text().split()]
        m = len(kept)
        samples = list(read_dataset(data, image_root=DEMO_DIR))
        img_bytes = sum(Path(i).stat().st_size for s in samples for i in s.images)

        def reader():
            return sum(1 for _ in read_dataset(data, image_root=DEMO_DIR))

        def check():
            return first_changed(src, kept, data, image_root=DEMO_DIR)

        def keys():
            return [sample_key(STORE_KEY_CONTEXT, s) for s in samples]

        def digest():
            return open_dataset(str(data)).file_digests()

        t_read, t_check, t_keys, t_digest = [], [], [], []
        for _ in range(args.repeats):  # alternating: load on the shared machine drifts into all alike
            for fn, acc in ((reader, t_read), (check, t_check), (keys, t_keys), (digest, t_digest)):
                acc.extend(_cpu(fn, 1)[0])
        changed, checked, unkeyed = check()
        checks.append((changed is None and checked == m and unkeyed == 0,
                       f"unchanged demo: {'none' if changed is None else changed.id} changed, {checked} checked, "
                       f"{unkeyed} unkeyed of {m} selected"))
        t0 = time.process_time()
        extract_to_store(str(model), data, tmp / "nocache", image_root=DEMO_DIR, batch_size=16, shard_size=64,
                         cache=None, progress=False)
        t_extract = time.process_time() - t0

        # a copy of the demo with one selected record's image re-encoded (same pixels, new bytes)
        copy = tmp / "copy"
        shutil.copytree(DEMO_DIR, copy)
        src_copy = StoreSource(tmp / "nocache")
        at_copy = {sid: r for r, sid in enumerate(src_copy.ids())}
        victim = ids[kept[0]]
        from PIL import Image
        from PIL.PngImagePlugin import PngInfo

        img = copy / next(s for s in samples if s.id == victim).images[0].split(str(DEMO_DIR) + "/", 1)[1]
        with Image.open(img) as im:
            im.load()
            info = PngInfo()
            info.add_text("edited", "yes")
            im.save(img, format="PNG", pnginfo=info)
        changed, _, _ = first_changed(src_copy, [at_copy[ids[r]] for r in kept], copy / DEMO_DATA, image_root=copy)
        got = None if changed is None else changed.id
        checks.append((got == victim and str(img) in (changed.file or ""),
                       f"one selected image re-encoded: found {got!r} ({None if changed is None else changed.file}), "
                       f"expected {victim!r} ({img})"))

        n = len(samples)
        med = statistics.median
        hash_us = (med(t_check) - med(t_read)) / m * 1e6
        row = {"records": n, "selected": m, "kb_per_image": round(img_bytes / n / 1024, 1),
               "check_cpu_s": round(med(t_check), 5), "reader_cpu_s": round(med(t_read), 5),
               "check_us_per_selected": round(med(t_check) / m * 1e6, 1),
               "hash_us_per_selected": round(hash_us, 1),
               "key_us_per_record": round(med(t_keys) / n * 1e6, 1),
               "key_mb_s": round(img_bytes / med(t_keys) / 1e6, 1),
               "extract_cpu_us_per_record": round(t_extract / n * 1e6, 1),
               "digest_cpu_s": round(med(t_digest), 5), "check_vs_extract": round(med(t_check) / t_extract, 4),
               "keys_vs_extract": round(med(t_keys) / t_extract, 4), "run_n_selected": res.n_selected}
        rows.append(row)
    print(f"{'metric':<28}value")
    for k, v in row.items():
        print(f"{k:<28}{v}")
    checks.append((row["check_vs_extract"] <= CHECK_FLOOR,
                   f"output check CPU {row['check_vs_extract']:.4f} of the extraction's (floor {CHECK_FLOOR})"))
    meta = {"time": now_utc(), **machine(), **versions()}
    for ok, what in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {what}")
    append_csv(RESULTS / "output_check.csv", [{**meta, **row, "status": "PASS" if all(c[0] for c in checks)
                                               else "FAIL"}])
    return 0 if all(c[0] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
