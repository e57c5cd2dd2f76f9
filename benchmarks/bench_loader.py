"""Loader throughput on the CPU: image decoding + sample preprocessing, samples/s per core, per layout.

What feeds the GPU during extraction: read a record (``read_dataset``), decode its image
(``load_image``: file or bytes embedded in the dataset), then preprocess it for the model
(``Encoder.encode``: chat template, tokenisation, token roles, the image processor's resize /
crop / normalise). Measured on synthetic 640x480 JPEG photos-like images with LLaVA-665K-like
instructions (1-3 turns, 5-20-word questions, 1-3-sentence answers), for each dataset layout the
readers support:

* ``files``: LLaVA JSON + one ``.jpg`` file per sample;
* ``parquet``: the JPEG bytes embedded in Parquet shards (Hugging Face ``Image`` structs);
* ``webdataset``: tar shards of ``<id>.json`` + ``<id>.jpg``.

and for each model's preprocessing (the encoder of a shaped checkpoint from ``benchmarks/configs``:
the same tokenizer, chat template and image-processor geometry as the real-size model, built with
tiny widths so no weights are allocated). Single process on one core (``decode`` and ``preprocess``
timed separately, median of repeats), so ``samples/s/core`` times the cores a machine gives the
loader bounds what it can feed; :mod:`bench_extract_gpu` measures the all-core rate with the real
worker pool on the GPU machine.

Prints a table; appends rows (machine, versions, timestamp) to ``benchmarks/results/loader.csv``.

    python benchmarks/bench_loader.py                 # llava-1.5-7b + qwen2.5-vl-7b, 3 layouts, 48 samples
    python benchmarks/bench_loader.py --n 200 --models llava-1.5-7b --layouts files,parquet
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _suite import RESULTS, ROOT, append_csv, load_average, machine, now_utc, versions  # noqa: E402

CONFIGS = ROOT / "benchmarks" / "configs"
LAYOUTS = ("files", "parquet", "webdataset")
MODELS = ("llava-1.5-7b", "qwen2.5-vl-7b", "qwen3-vl-8b")

_WORDS = ("the a of in on with and to is are this that image picture photo person man woman child dog cat "
          "car street table room window tree sky water building sign text red blue green white black small "
          "large left right top bottom front behind near two three several many holding wearing standing "
          "sitting looking shows appears visible background foreground scene color shape object people "
          "bright dark wooden metal open closed old new").split()


def _sentence(rng: np.random.Generator, lo: int, hi: int, question: bool = False) -> str:
    words = rng.choice(_WORDS, size=int(rng.integers(lo, hi + 1)))
    s = " ".join(words)
    return s[0].upper() + s[1:] + ("?" if question else ".")


def conversation(rng: np.random.Generator) -> list[dict]:
    """LLaVA-665K-like turns: the image first, 1-3 question/answer pairs of realistic length."""
    turns = []
    for t in range(int(rng.choice([1, 1, 2, 3]))):
        q = _sentence(rng, 5, 20, question=True)
        a = " ".join(_sentence(rng, 6, 18) for _ in range(int(rng.integers(1, 4))))
        turns += [{"from": "human", "value": ("<image>\n" if t == 0 else "") + q}, {"from": "gpt", "value": a}]
    return turns


def photo_jpeg(rng: np.random.Generator, size=(640, 480), quality: int = 90) -> bytes:
    """A photo-like JPEG: smooth colour gradients, a few shapes and sensor-like noise (~50-90 KB)."""
    from PIL import Image

    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    for c in range(3):
        fx, fy, ph = rng.uniform(0.002, 0.02, 2).tolist() + [rng.uniform(0, 6.28)]
        img[..., c] = 128 + 90 * np.sin(fx * x + fy * y + ph)
    for _ in range(int(rng.integers(3, 8))):
        cx, cy, r = rng.integers(0, w), rng.integers(0, h), rng.integers(20, 120)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.integers(0, 256, 3)
    img += rng.normal(0, 12, img.shape).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_dataset(root: Path, n: int, layout: str, seed: int = 0, n_images: int = 16,
                 shard_size: int = 64) -> Path:
    """Write ``n`` samples in ``layout`` under ``root``; return the path to give ``read_dataset``.

    ``n_images`` distinct JPEGs are drawn and reused round-robin (drawing them dominates otherwise);
    every sample still decodes its own copy.
    """
    rng = np.random.default_rng(seed)
    jpegs = [photo_jpeg(rng) for _ in range(min(n, n_images))]
    recs = [{"id": f"s{i:07d}", "conversations": conversation(rng)} for i in range(n)]
    root.mkdir(parents=True, exist_ok=True)
    if layout == "files":
        (root / "images").mkdir(exist_ok=True)
        for i, r in enumerate(recs):
            (root / "images" / f"{r['id']}.jpg").write_bytes(jpegs[i % len(jpegs)])
            r["image"] = f"images/{r['id']}.jpg"
        (root / "data.json").write_text(json.dumps(recs))
        return root / "data.json"
    if layout == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        turn = pa.struct([("from", pa.string()), ("value", pa.string())])
        schema = pa.schema([("id", pa.string()), ("images", pa.list_(image)), ("conversations", pa.list_(turn))])
        (root / "data").mkdir(exist_ok=True)
        for s in range(0, n, shard_size):
            rows = [{"id": r["id"], "conversations": r["conversations"],
                     "images": [{"bytes": jpegs[(s + j) % len(jpegs)], "path": f"{r['id']}.jpg"}]}
                    for j, r in enumerate(recs[s:s + shard_size])]
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / "data" / f"train-{s // shard_size:05d}.parquet",
                           row_group_size=64)
        return root / "data"
    if layout == "webdataset":
        (root / "shards").mkdir(exist_ok=True)
        for s in range(0, n, shard_size):
            with tarfile.open(root / "shards" / f"shard-{s // shard_size:06d}.tar", "w") as tf:
                for j, r in enumerate(recs[s:s + shard_size]):
                    for name, data in ((f"{r['id']}.json", json.dumps(r).encode()),
                                       (f"{r['id']}.jpg", jpegs[(s + j) % len(jpegs)])):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tf.addfile(info, io.BytesIO(data))
        last = (n - 1) // shard_size
        return str(root / "shards" / (f"shard-{{000000..{last:06d}}}.tar" if last else "shard-000000.tar"))
    raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")


def shrunk_config(name: str) -> dict:
    """The shaped config of ``name`` with tiny widths and depths but the same image geometry, image
    processor settings, tokenizer and chat template: the same preprocessing, almost no weights."""
    cfg = json.loads((CONFIGS / f"{name}.json").read_text())
    v, t = cfg["vision_config"], cfg["text_config"]
    if cfg["model_type"] == "llava":
        v.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
    else:
        v.update(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64)
        if "fullatt_block_indexes" in v:
            v["fullatt_block_indexes"] = [1]
        if "deepstack_visual_indexes" in v:
            v["deepstack_visual_indexes"] = [0]
    t.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    if "head_dim" in t:
        t["head_dim"] = 16
    rope = t.get("rope_parameters") or {}
    if "mrope_section" in rope:
        rope["mrope_section"] = [2, 3, 3]  # sums to head_dim / 2
    return cfg


def shrunk_vlm(name: str, root: Path, layer: int = 0):
    """``load_vlm`` of the shrunken shaped model (fp32, CPU): its ``encoder`` is the real-size one's."""
    from scalselect_fast.extract import build_shaped_model, load_vlm

    path = build_shaped_model(shrunk_config(name), root / f"shrunk-{name}")
    return load_vlm(path, layer=layer, dtype="fp32", device="cpu", random_weights=True)


def read_samples(data: Path, n: int | None = None) -> list:
    from scalselect_fast.data import read_dataset

    out = []
    for s in read_dataset(data):
        out.append(s)
        if n is not None and len(out) == n:
            break
    return out


def time_loader(encoder, samples: list, repeats: int = 3) -> dict:
    """Median per-sample seconds of decoding and of preprocessing, in this process (one core).

    Returns ``{"decode_s", "preprocess_s", "image_processor_s", "samples_s_core", "tokens"}``;
    ``image_processor_s`` is the part of preprocessing spent in the image processor (the same call
    ``Encoder.encode`` makes, timed again on its own), the rest being chat template, tokenisation
    and token roles; ``tokens`` is the mean encoded length (visual tokens included).
    """
    from scalselect_fast.data import load_image

    dec, pre, img, tokens = [], [], [], []
    for _ in range(repeats):
        td = tp = ti = 0.0
        for s in samples:
            t0 = time.perf_counter()
            imgs = [load_image(p) for p in s.images]
            t1 = time.perf_counter()
            enc = encoder.encode(s.id, s.messages, imgs)
            t2 = time.perf_counter()
            encoder.image_processor(images=imgs, return_tensors="pt")
            ti += time.perf_counter() - t2
            tp += t2 - t1
            td += t1 - t0
            tokens.append(len(enc.input_ids))
        dec.append(td / len(samples))
        pre.append(tp / len(samples))
        img.append(ti / len(samples))
    d, p = float(np.median(dec)), float(np.median(pre))
    return {"decode_s": d, "preprocess_s": p, "image_processor_s": min(float(np.median(img)), p),
            "samples_s_core": 1.0 / (d + p), "tokens": float(np.mean(tokens))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=48, help="samples per layout [48]")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="llava-1.5-7b,qwen2.5-vl-7b", help=f"comma list of {MODELS}")
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--csv", default=str(RESULTS / "loader.csv"))
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # one core: the rate per core is what the table reports
    rows = []
    stamp, mach, vers = now_utc(), machine(), versions()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = {lay: make_dataset(tmp / lay, args.n, lay) for lay in args.layouts.split(",")}
        for name in args.models.split(","):
            vlm = shrunk_vlm(name, tmp)
            for lay, path in data.items():
                samples = read_samples(path)
                r = time_loader(vlm.encoder, samples, args.repeats)
                rows.append({"run_id": stamp, "timestamp": stamp, "host": mach["host"], "cpu": mach["cpu"],
                             "cores": mach["cores"], "load": load_average(), "torch": vers["torch"],
                             "transformers": __import__("transformers").__version__, "model": name, "layout": lay,
                             "n": len(samples), "image": "640x480 jpeg",
                             "image_processor": type(vlm.encoder.image_processor).__name__, "mean_tokens": round(r["tokens"], 1),
                             "decode_ms": round(1e3 * r["decode_s"], 3), "preprocess_ms": round(1e3 * r["preprocess_s"], 3),
                             "image_processor_ms": round(1e3 * r["image_processor_s"], 3),
                             "samples_s_core": round(r["samples_s_core"], 2)})
    print(f"{'model':<15} {'layout':<11} {'N':>4} {'tokens':>7} {'decode ms':>10} {'preproc ms':>11} "
          f"{'(image proc)':>13} {'samples/s/core':>15}")
    for r in rows:
        print(f"{r['model']:<15} {r['layout']:<11} {r['n']:>4} {r['mean_tokens']:>7} {r['decode_ms']:>10.2f} "
              f"{r['preprocess_ms']:>11.2f} {r['image_processor_ms']:>13.2f} {r['samples_s_core']:>15.1f}")
    print(f"image processors: {sorted({r['image_processor'] for r in rows})}")
    print(f"machine: {mach['cpu']}, {mach['cores']} cores, load {load_average()}")
    append_csv(Path(args.csv), rows)
    print(f"appended {len(rows)} rows to {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
