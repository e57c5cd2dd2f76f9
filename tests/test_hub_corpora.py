"""The large public VLM corpora as they are published, through `scalselect run` (``cli.main``).

Fixtures are built with ``datasets`` in the exact Hub features (``/work/shared/HUB_SCHEMAS.md``):
LLaVA-OneVision-Data saved with ``save_to_disk`` (one and two shards, a ``DatasetDict``), the
Cauldron and FineVision as ``<subset>/train-0000k-of-0000n.parquet`` files with no id column. The
model is the tiny random-weight LLaVA (nothing downloaded). Expected values are computed here from
the rows that were written, never from the code under test.
"""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

datasets = pytest.importorskip("datasets")
pytest.importorskip("scalselect_fast.extract.tiny")

from scalselect_fast import cli  # noqa: E402
from scalselect_fast.data import DatasetError, open_source, read_dataset  # noqa: E402
from scalselect_fast.run import make_config, run  # noqa: E402
from scalselect_fast.run.fingerprints import data_fingerprint  # noqa: E402

COMMON = ["--budget", "25%", "--shard-size", "8", "--batch-size", "4", "--quiet", "--no-plan-check"]
RATINGS = ("relevance", "image_correspondence", "visual_dependency", "formatting")


def _png(i: int, size=(12, 10)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, ((37 * i) % 256, (91 * i + 40) % 256, (13 * i + 200) % 256)).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# builders, in the Hub features
# --------------------------------------------------------------------------------------------------
def llava_onevision(n: int, text_only=(), start: int = 0):
    """LLaVA-OneVision-Data: ``id``, ``image: Image()`` (None for text-only), ``conversations``,
    ``data_source``; ``<image>`` in the first human turn."""
    feats = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                               "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}],
                               "data_source": datasets.Value("string")})
    rows = {"id": [], "image": [], "conversations": [], "data_source": []}
    for i in range(start, start + n):
        img = i not in text_only
        rows["id"].append(f"ov-{i}")
        rows["image"].append({"bytes": _png(i), "path": None} if img else None)
        rows["conversations"].append([{"from": "human", "value": ("<image>\n" if img else "") + f"Describe item {i}."},
                                      {"from": "gpt", "value": f"It is item {i}."}])
        rows["data_source"].append(f"src{i % 3}")
    return datasets.Dataset.from_dict(rows, features=feats)


def _cauldron_rows(n: int, subset: str, start: int, two_images=(), text_only=()):
    rows = {"images": [], "texts": []}
    for i in range(start, start + n):
        k = 0 if i in text_only else 2 if i in two_images else 1
        rows["images"].append([{"bytes": _png(i + 100 * j), "path": None} for j in range(k)])
        rows["texts"].append([{"user": f"What is in picture {i}?", "assistant": f"Thing {i}.", "source": subset}])
    return rows


def cauldron(root: Path, subsets: dict[str, int], two_images=(), text_only=()) -> dict[str, list[Path]]:
    """The Cauldron: ``<subset>/train-00000-of-00001.parquet`` with ``images: List(Image())``,
    ``texts: List({user, assistant, source})``, no id column, no ``<image>`` placeholder."""
    feats = datasets.Features({"images": datasets.Sequence(datasets.Image()),
                               "texts": [{"user": datasets.Value("string"), "assistant": datasets.Value("string"),
                                          "source": datasets.Value("string")}]})
    out, start = {}, 0
    for subset, n in subsets.items():
        ds = datasets.Dataset.from_dict(_cauldron_rows(n, subset, start, two_images, text_only), features=feats)
        path = root / subset / "train-00000-of-00001.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(path))
        out[subset] = [path]
        start += n
    return out


def finevision(root: Path, subsets: dict[str, int], text_only=(), shards: int = 1) -> dict[str, list[Path]]:
    """FineVision: ``images``, ``texts: List({user, assistant})``, ``source``, four ``*_ratings:
    List(int64)`` and their ``*_min: int64``; no id column; ``<subset>/train-0000k-of-0000n.parquet``."""
    spec = {"images": datasets.Sequence(datasets.Image()),
            "texts": [{"user": datasets.Value("string"), "assistant": datasets.Value("string")}],
            "source": datasets.Value("string")}
    for r in RATINGS:
        spec[f"{r}_ratings"] = datasets.Sequence(datasets.Value("int64"))
        spec[f"{r}_min"] = datasets.Value("int64")
    feats = datasets.Features(spec)
    out, start = {}, 0
    for subset, n in subsets.items():
        rows = {k: [] for k in spec}
        for i in range(start, start + n):
            rows["images"].append([] if i in text_only else [{"bytes": _png(i), "path": None}])
            rows["texts"].append([{"user": f"Question {i}?", "assistant": f"Answer {i}."},
                                  {"user": "And then?", "assistant": "Done."}])
            rows["source"].append(subset)
            for j, r in enumerate(RATINGS):
                rows[f"{r}_ratings"].append([1 + (i + j) % 5, 1 + (i * 3 + j) % 5])
                rows[f"{r}_min"].append(min(rows[f"{r}_ratings"][-1]))
        ds = datasets.Dataset.from_dict(rows, features=feats)
        per = -(-n // shards)
        out[subset] = []
        for k in range(shards):
            path = root / subset / f"train-{k:05d}-of-{shards:05d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.select(range(k * per, min(n, (k + 1) * per))).to_parquet(str(path))
            out[subset].append(path)
        start += n
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from scalselect_fast.extract.tiny import build_tiny_model

    return build_tiny_model("llava", tmp_path_factory.mktemp("tiny") / "llava", seed=0)


def _kept(out: Path) -> list[str]:
    return [m["id"] for m in pq.read_table(out / "manifest.parquet").to_pylist() if m["kept"]]


def _tree(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------
# 1. save_to_disk folders from the command line
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    base = tmp_path_factory.mktemp("saved")
    ds = llava_onevision(20, text_only=(3,))
    ds.save_to_disk(str(base / "one"))
    ds.save_to_disk(str(base / "two"), num_shards=2)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(base / "dict1"))
    datasets.DatasetDict({"train": ds, "test": llava_onevision(4, start=50)}).save_to_disk(str(base / "dict2"))
    return {"base": base, "ds": ds}


@pytest.mark.parametrize("how", ["plain", "slash", "format", "two_shards", "config", "api", "dict_one_split"])
def test_save_to_disk_folder_runs_from_the_command_line(model, saved, tmp_path, monkeypatch, how):
    base = saved["base"]
    folder = {"two_shards": "two", "dict_one_split": "dict1"}.get(how, "one")
    assert len(list((base / folder).rglob("data-*.arrow"))) == (2 if how == "two_shards" else 1)
    monkeypatch.chdir(base)  # the folder named relatively, as typed
    data = folder + ("/" if how == "slash" else "")
    out = tmp_path / "out"
    before = _tree(base / folder)
    if how == "config":
        cfg = tmp_path / "run.toml"
        cfg.write_text(f'model = "{model}"\ndata = "{base / folder}"\nout = "{out}"\nformat = "datasets"\n')
        assert cli.main(["run", "--config", str(cfg), *COMMON]) == 0
    elif how == "api":
        run(make_config(model=str(model), data=data, out=str(out), budget="25%", shard_size=8, batch_size=4,
                        quiet=True, plan_check=False))
    else:
        extra = ["--format", "datasets"] if how == "format" else []
        assert cli.main(["run", "--model", str(model), "--data", data, "--out", str(out), *extra, *COMMON]) == 0
    assert _tree(base / folder) == before  # the input folder is only read
    kept = _kept(out)
    assert len(kept) == 5 and "ov-3" not in kept
    got = datasets.load_from_disk(str(out / "selected"))
    assert got.features == saved["ds"].features and sorted(got["id"]) == sorted(kept)
    want = {r["id"]: r for r in saved["ds"].cast_column("image", datasets.Image(decode=False)).to_list()}
    raw = got.cast_column("image", datasets.Image(decode=False)).to_list()
    assert all(r == want[r["id"]] for r in raw)  # rows (image bytes included) as they were


def test_extract_command_reads_a_save_to_disk_folder(model, saved, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(saved["base"])
    for i, data in enumerate(["one", "one/", "two"]):
        out = tmp_path / f"reps{i}"
        assert cli.main(["extract", "--model", str(model), "--data", data, "--out", str(out), "--quiet"]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["rows"] == 19 and summary["skipped"] == 1, data


def test_folder_fingerprint_covers_its_data_files(saved, tmp_path):
    src = saved["base"] / "two"
    copy = tmp_path / "two"
    shutil.copytree(src, copy)
    fp = data_fingerprint(str(copy), None)
    assert fp == data_fingerprint(str(copy) + "/", None)  # one folder, however it is spelled
    assert open_source(str(copy)).total_bytes() == sum(p.stat().st_size for p in copy.iterdir())
    arrow = sorted(copy.glob("data-*.arrow"))[1]
    blob = bytearray(arrow.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one byte of the second shard (hashed whole: it is small)
    arrow.write_bytes(bytes(blob))
    changed = data_fingerprint(str(copy), None)
    assert changed != fp
    (copy / "cache-0123.arrow").write_bytes(b"a map() cache, not data")  # not one of state.json's files
    assert data_fingerprint(str(copy), None) == changed


def test_dataset_dict_with_several_splits_names_them(model, saved, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["run", "--model", str(model), "--data", str(saved["base"] / "dict2"), "--out", str(out),
                     *COMMON]) == 2
    err = capsys.readouterr().err.strip()
    assert "DatasetDict with splits ['train', 'test']" in err and len(err.splitlines()) == 1
    assert f"--data {saved['base'] / 'dict2' / 'train'}" in err and f"--data {saved['base'] / 'dict2' / 'test'}" in err
    # the spelling the message suggests works
    assert cli.main(["run", "--model", str(model), "--data", str(saved["base"] / "dict2" / "train"),
                     "--out", str(out), *COMMON]) == 0
    assert len(_kept(out)) == 5
