"""The bundled demo dataset: small generated images + LLaVA conversations with known structure.

Built so that a selection can be *checked*, not just run: besides ordinary samples from three task
sources it plants

* **near-duplicates**: a copy of an existing sample with the same conversation and the image
  jittered by a few grey levels (visually identical), recorded as ``duplicates[copy] = original``;
* a **rare mode**: a small group of bar-chart images with their own task (``source="chart"``),
  visually and textually unlike everything else, recorded under ``rare``;
* a couple of **text-only** samples (no image), which extraction must skip with a reason.

``demo_truth.json`` holds this ground truth so reports and benchmarks can measure, e.g., how many
duplicates a method keeps or whether the rare mode survives a 16% budget. Everything is a pure
function of ``seed`` (NumPy ``default_rng``), so the dataset regenerates identically; PNG bytes can
differ across zlib builds but the decoded pixels do not.

It is a smoke-and-sanity dataset for the README demo and tests, not a benchmark of real data.

The same samples can be written in three layouts (``--layout``), so a selection can be compared
across them: ``json`` (``demo.json`` + ``images/*.png``, the default and the bundled copy),
``parquet`` (``data/train-00000-of-0000N.parquet`` shards whose ``images`` column holds the Hugging
Face ``Image`` struct ``{"bytes", "path"}``) and ``webdataset`` (``shards/demo-000000.tar`` ... with
``<id>.json`` + ``<id>.png`` per sample). The PNG bytes are the same in every layout.

Regenerate the bundled copy with ``python -m scalselect_fast.data.demo scalselect_fast/assets/demo``.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np

#: Folder of the bundled default copy (``demo.json``, ``images/``, ``demo_truth.json``).
DEMO_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo"
DEMO_DATA = "demo.json"
DEMO_TRUTH = "demo_truth.json"
DEFAULT_N = 240
#: ``--layout`` choices: where the samples go (see the module notes).
LAYOUTS = ("json", "parquet", "webdataset")
DEFAULT_SHARD_SIZE = 100

_COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 215, 40),
    "purple": (140, 50, 170), "orange": (240, 140, 30), "cyan": (40, 200, 210), "white": (245, 245, 245),
}
_BACKGROUNDS = {"grey": (128, 128, 128), "black": (20, 20, 20), "beige": (225, 210, 180), "navy": (25, 30, 80)}
_SHAPES = ("circle", "square", "triangle", "diamond", "cross")
_SUPERSAMPLE = 4  # draw large, then downsample: smooth edges at 32 px


def _finish(big, size: int, rng: np.random.Generator, noise: float):
    from PIL import Image

    im = Image.fromarray(big).resize((size, size), Image.Resampling.LANCZOS)
    arr = np.asarray(im).astype(np.int16)
    if noise:
        # Per-pixel texture: keeps images from being flat colour fields (and PNGs honest in size).
        arr = arr + rng.normal(0.0, noise, arr.shape).round().astype(np.int16)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _draw_shape(size: int, shape: str, colour: tuple, bg: tuple, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image, ImageDraw

    s = size * _SUPERSAMPLE
    im = Image.new("RGB", (s, s), bg)
    d = ImageDraw.Draw(im)
    r = s * rng.uniform(0.22, 0.34)
    cx, cy = s * rng.uniform(0.38, 0.62), s * rng.uniform(0.38, 0.62)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    else:  # cross
        w = r * 0.35
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
    return _finish(np.asarray(im), size, rng, noise=6.0)


def _draw_dots(size: int, k: int, colour: tuple, bg: tuple, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image, ImageDraw

    s = size * _SUPERSAMPLE
    im = Image.new("RGB", (s, s), bg)
    d = ImageDraw.Draw(im)
    cells = rng.permutation(9)[:k]  # 3x3 grid cells so dots never overlap and stay countable
    r = s / 10
    for c in cells:
        cx = (c % 3 + 0.5) * s / 3 + rng.uniform(-r / 2, r / 2)
        cy = (c // 3 + 0.5) * s / 3 + rng.uniform(-r / 2, r / 2)
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    return _finish(np.asarray(im), size, rng, noise=6.0)


def _draw_chart(size: int, heights: list[int], colour: tuple) -> np.ndarray:
    from PIL import Image, ImageDraw

    s = size * _SUPERSAMPLE
    im = Image.new("RGB", (s, s), (255, 255, 255))
    d = ImageDraw.Draw(im)
    n = len(heights)
    left, bottom, top = s * 0.12, s * 0.9, s * 0.1
    width = (s * 0.85) / n
    for i, h in enumerate(heights):
        x0 = left + i * width + width * 0.15
        y0 = bottom - (bottom - top) * h / 10
        d.rectangle([x0, y0, x0 + width * 0.7, bottom], fill=colour, outline=(0, 0, 0), width=_SUPERSAMPLE)
    d.line([(left, top), (left, bottom), (s * 0.97, bottom)], fill=(0, 0, 0), width=_SUPERSAMPLE)
    return _finish(np.asarray(im), size, np.random.default_rng(0), noise=0.0)


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _ordinary(rng: np.random.Generator, size: int):
    """One ordinary sample: (pixels, source, conversation turns)."""
    source = _pick(rng, ("caption", "vqa", "count"))
    colour = _pick(rng, tuple(_COLOURS))
    bg = _pick(rng, tuple(b for b in _BACKGROUNDS if not (b == "black" and colour == "navy")))
    if source == "count":
        k = int(rng.integers(1, 6))
        pixels = _draw_dots(size, k, _COLOURS[colour], _BACKGROUNDS[bg], rng)
        q = _pick(rng, (f"How many {colour} dots are there?", "Count the dots in the picture."))
        return pixels, source, [(q, str(k))]
    shape = _pick(rng, _SHAPES)
    pixels = _draw_shape(size, shape, _COLOURS[colour], _BACKGROUNDS[bg], rng)
    if source == "caption":
        q = _pick(rng, ("Describe the image.", "Write a short caption for this picture.", "What do you see?"))
        return pixels, source, [(q, f"A {colour} {shape} on a {bg} background.")]
    turns = [(_pick(rng, (f"What colour is the {shape}?", "What colour is the shape?")), f"{colour.capitalize()}.")]
    if rng.random() < 0.4:
        turns.append(("And what shape is it?", f"It is a {shape}."))
    return pixels, source, turns


def _conversation(turns, with_image: bool) -> list[dict]:
    conv = []
    for t, (q, a) in enumerate(turns):
        conv.append({"from": "human", "value": ("<image>\n" if with_image and t == 0 else "") + q})
        conv.append({"from": "gpt", "value": a})
    return conv


def make_demo_dataset(out_dir: str | os.PathLike, n: int = DEFAULT_N, seed: int = 0, image_size: int = 32,
                      dup_fraction: float = 0.1, n_rare: int = 8, n_text_only: int = 2, layout: str = "json",
                      shard_size: int = DEFAULT_SHARD_SIZE) -> dict:
    """Generate the demo dataset into ``out_dir``.

    Parameters
    ----------
    out_dir : str or path-like
        Created if missing; receives the dataset (see ``layout``) and ``demo_truth.json``, whose
        ``"data"`` names what to pass as ``--data`` (relative to ``out_dir``).
    n : int
        Total number of records (ordinary + duplicates + rare + text-only).
    seed : int
        Everything is a deterministic function of it.
    image_size : int
        Side of the square RGB images in pixels.
    dup_fraction : float
        Share of ``n`` that are planted near-duplicates of ordinary samples.
    n_rare : int
        Size of the rare bar-chart group.
    n_text_only : int
        Number of samples without an image.
    layout : {"json", "parquet", "webdataset"}
        ``"json"``: ``demo.json`` (LLaVA list, image paths relative to ``out_dir``, the
        ``--image-root``) + ``images/<id>.png``. ``"parquet"``: ``data/train-<i>-of-<n>.parquet``
        with the images embedded as Hugging Face ``Image`` structs (``images`` column, a list per
        sample, empty for text-only). ``"webdataset"``: ``shards/demo-<i>.tar`` with ``<id>.json``
        (the LLaVA record without its ``image`` field) and ``<id>.png``.
    shard_size : int
        Samples per Parquet / tar shard.

    Returns
    -------
    dict
        The ground truth written to ``demo_truth.json``.

    Examples
    --------
    >>> truth = make_demo_dataset("/tmp/demo", n=60, seed=1)      # doctest: +SKIP
    >>> sorted(truth)[:3]                                          # doctest: +SKIP
    ['counts', 'duplicate_groups', 'duplicates']
    """
    from PIL import Image

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    n_dup = int(round(n * dup_fraction))
    n_base = n - n_dup - n_rare - n_text_only
    if n_base < max(1, n_dup // 2):
        raise ValueError(f"n={n} is too small for {n_dup} duplicates, {n_rare} rare and {n_text_only} "
                         "text-only samples")
    rng = np.random.default_rng(seed)
    items = []  # dicts: pixels, source, turns, kind, of (index into items for duplicates)
    for _ in range(n_base):
        pixels, source, turns = _ordinary(rng, image_size)
        items.append({"pixels": pixels, "source": source, "turns": turns, "kind": "base"})
    # Originals are drawn without replacement, then a few get a second copy (groups of three).
    n_orig = max(1, n_dup - n_dup // 4)
    originals = [int(i) for i in rng.choice(n_base, size=min(n_orig, n_base), replace=False)]
    dup_of = originals + [originals[int(rng.integers(len(originals)))] for _ in range(n_dup - len(originals))]
    for o in dup_of:
        jitter = rng.integers(-3, 4, items[o]["pixels"].shape)
        pixels = np.clip(items[o]["pixels"].astype(np.int16) + jitter, 0, 255).astype(np.uint8)
        items.append({"pixels": pixels, "source": items[o]["source"], "turns": items[o]["turns"],
                      "kind": "dup", "of": o})
    for _ in range(n_rare):
        k = int(rng.integers(3, 6))
        heights = [int(h) for h in rng.permutation(np.arange(2, 10))[:k]]
        colour = _pick(rng, ("blue", "orange", "green"))
        tallest = int(np.argmax(heights)) + 1
        turns = [("Which bar in this chart is the tallest? Count bars from the left.", f"Bar {tallest}."),
                 ("How many bars are there?", str(k))]
        items.append({"pixels": _draw_chart(image_size, heights, _COLOURS[colour]), "source": "chart",
                      "turns": turns, "kind": "rare"})
    text_only_q = [("What is the capital of France?", "Paris."),
                   ("Name a primary colour.", "Red."),
                   ("What is two plus three?", "Five.")]
    for t in range(n_text_only):
        items.append({"pixels": None, "source": "text", "turns": [text_only_q[t % len(text_only_q)]],
                      "kind": "text"})

    order = rng.permutation(len(items))  # interleave so duplicates are not next to their originals
    ids = {}
    for pos, item_i in enumerate(order):
        ids[int(item_i)] = f"demo-{pos:04d}"

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records, duplicates, rare, text_only = [], {}, [], []
    pngs: dict[str, bytes] = {}
    for item_i in order:
        item = items[int(item_i)]
        sid = ids[int(item_i)]
        rec = {"id": sid}
        if item["pixels"] is not None:
            buf = io.BytesIO()
            Image.fromarray(item["pixels"]).save(buf, format="PNG")
            pngs[sid] = buf.getvalue()
            rec["image"] = f"images/{sid}.png"
        rec["source"] = item["source"]
        rec["conversations"] = _conversation(item["turns"], item["pixels"] is not None)
        records.append(rec)
        if item["kind"] == "dup":
            duplicates[sid] = ids[item["of"]]
        elif item["kind"] == "rare":
            rare.append(sid)
        elif item["kind"] == "text":
            text_only.append(sid)
    groups: dict[str, list[str]] = {}
    for dup, orig in sorted(duplicates.items()):
        groups.setdefault(orig, []).append(dup)
    counts: dict[str, int] = {}
    for r in records:
        counts[r["source"]] = counts.get(r["source"], 0) + 1
    from ..atomic import atomic_write_bytes

    data = _WRITERS[layout](out, records, pngs, shard_size)
    truth = {
        "generator": "scalselect_fast.data.demo.make_demo_dataset",
        "params": {"n": n, "seed": seed, "image_size": image_size, "dup_fraction": dup_fraction,
                   "n_rare": n_rare, "n_text_only": n_text_only},
        "data": data,
        "counts": dict(sorted(counts.items())),
        "duplicates": dict(sorted(duplicates.items())),
        "duplicate_groups": [[o] + d for o, d in sorted(groups.items())],
        "rare": sorted(rare),
        "rare_mode": "bar charts on a white background with chart questions (source 'chart')",
        "text_only": sorted(text_only),
    }
    if layout != "json":
        truth["layout"] = layout
    atomic_write_bytes(out / DEMO_TRUTH, (json.dumps(truth, indent=2) + "\n").encode())
    return truth


def _write_json(out: Path, records: list[dict], pngs: dict[str, bytes], shard_size: int) -> str:
    from ..atomic import atomic_write_bytes

    (out / "images").mkdir(parents=True, exist_ok=True)
    for sid, data in pngs.items():
        atomic_write_bytes(out / "images" / f"{sid}.png", data)
    atomic_write_bytes(out / DEMO_DATA, (json.dumps(records, indent=2, ensure_ascii=False) + "\n").encode())
    return DEMO_DATA


#: The ``datasets`` features of the Parquet layout, stored in the schema metadata as ``datasets``
#: does, so ``datasets.load_dataset("parquet", ...)`` decodes the ``images`` column as images.
_HF_FEATURES = {
    "id": {"dtype": "string", "_type": "Value"},
    "images": {"feature": {"_type": "Image"}, "_type": "Sequence"},
    "source": {"dtype": "string", "_type": "Value"},
    "conversations": [{"from": {"dtype": "string", "_type": "Value"},
                       "value": {"dtype": "string", "_type": "Value"}}],
}


def _write_parquet(out: Path, records: list[dict], pngs: dict[str, bytes], shard_size: int) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..atomic import atomic_path

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    turn = pa.struct([("from", pa.string()), ("value", pa.string())])
    schema = pa.schema([("id", pa.string()), ("images", pa.list_(image)), ("source", pa.string()),
                        ("conversations", pa.list_(turn))],
                       metadata={"huggingface": json.dumps({"info": {"features": _HF_FEATURES}})})
    rows = [{"id": r["id"], "source": r["source"], "conversations": r["conversations"],
             "images": [{"bytes": pngs[r["id"]], "path": f"{r['id']}.png"}] if r["id"] in pngs else []}
            for r in records]
    n_shards = -(-len(rows) // shard_size)
    (out / "data").mkdir(parents=True, exist_ok=True)
    for i in range(n_shards):
        table = pa.Table.from_pylist(rows[i * shard_size:(i + 1) * shard_size], schema=schema)
        with atomic_path(out / "data" / f"train-{i:05d}-of-{n_shards:05d}.parquet") as tmp:
            pq.write_table(table, tmp, row_group_size=64)
    return "data"


def _write_webdataset(out: Path, records: list[dict], pngs: dict[str, bytes], shard_size: int) -> str:
    from ..atomic import atomic_path

    n_shards = -(-len(records) // shard_size)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    for i in range(n_shards):
        with atomic_path(out / "shards" / f"demo-{i:06d}.tar") as tmp, \
                tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
            for r in records[i * shard_size:(i + 1) * shard_size]:
                members = [(f"{r['id']}.json", json.dumps({k: v for k, v in r.items() if k != "image"},
                                                           ensure_ascii=False).encode())]
                if r["id"] in pngs:
                    members.append((f"{r['id']}.png", pngs[r["id"]]))
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), 0, 0o644  # mtime 0: same bytes every run
                    tf.addfile(info, io.BytesIO(data))
    return f"shards/demo-{{{0:06d}..{n_shards - 1:06d}}}.tar" if n_shards > 1 else "shards/demo-000000.tar"


_WRITERS = {"json": _write_json, "parquet": _write_parquet, "webdataset": _write_webdataset}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Generate the scalselect demo dataset.")
    p.add_argument("out_dir")
    p.add_argument("--n", type=int, default=DEFAULT_N)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--layout", choices=LAYOUTS, default="json",
                   help="json: demo.json + images/ (default); parquet: Parquet shards with the image bytes "
                        "embedded (HF Image structs); webdataset: tar shards of <id>.json + <id>.png")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                   help=f"samples per Parquet / tar shard (default {DEFAULT_SHARD_SIZE})")
    args = p.parse_args(argv)
    truth = make_demo_dataset(args.out_dir, n=args.n, seed=args.seed, image_size=args.image_size,
                              layout=args.layout, shard_size=args.shard_size)
    print(f"wrote {sum(truth['counts'].values())} samples to {Path(args.out_dir) / truth['data']} "
          f"({len(truth['duplicates'])} near-duplicates, {len(truth['rare'])} rare, "
          f"{len(truth['text_only'])} text-only)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
