"""The large public VLM corpora as they are published, through `scalselect run` (``cli.main``).

Fixtures are built with ``datasets`` in the exact Hub features (``/work/shared/HUB_SCHEMAS.md``):
LLaVA-OneVision-Data saved with ``save_to_disk`` (one and two shards, a ``DatasetDict``), the
Cauldron and FineVision as ``<subset>/train-0000k-of-0000n.parquet`` files with no id column. The
model is the tiny random-weight LLaVA (nothing downloaded). Expected values are computed here from
the rows that were written, never from the code under test.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import png_bytes

datasets = pytest.importorskip("datasets")
pytest.importorskip("scalselect_fast.extract.tiny")

from scalselect_fast import cli  # noqa: E402
from scalselect_fast.data import DatasetError, open_dataset, read_dataset  # noqa: E402
from scalselect_fast.run import make_config, run  # noqa: E402
from scalselect_fast.run.fingerprints import data_fingerprint  # noqa: E402

COMMON = ["--budget", "25%", "--shard-size", "8", "--batch-size", "4", "--quiet", "--no-plan-check"]
RATINGS = ("relevance", "image_correspondence", "visual_dependency", "formatting")


def _numbered_png(i: int, size=(12, 10)) -> bytes:
    """A PNG whose colour differs for each i (so each row's image has its own bytes)."""
    return png_bytes(((37 * i) % 256, (91 * i + 40) % 256, (13 * i + 200) % 256), size)


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
        rows["image"].append({"bytes": _numbered_png(i), "path": None} if img else None)
        rows["conversations"].append([{"from": "human", "value": ("<image>\n" if img else "") + f"Describe item {i}."},
                                      {"from": "gpt", "value": f"It is item {i}."}])
        rows["data_source"].append(f"src{i % 3}")
    return datasets.Dataset.from_dict(rows, features=feats)


def _cauldron_rows(n: int, subset: str, start: int, two_images=(), text_only=()):
    rows = {"images": [], "texts": []}
    for i in range(start, start + n):
        k = 0 if i in text_only else 2 if i in two_images else 1
        rows["images"].append([{"bytes": _numbered_png(i + 100 * j), "path": None} for j in range(k)])
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
            rows["images"].append([] if i in text_only else [{"bytes": _numbered_png(i), "path": None}])
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
def model(tiny_llava):
    return tiny_llava


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
    assert open_dataset(str(copy)).total_bytes() == sum(p.stat().st_size for p in copy.iterdir())
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


# --------------------------------------------------------------------------------------------------
# 2. the Cauldron and FineVision as published: no id column
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    base = tmp_path_factory.mktemp("corpora")
    c_root, f_root = base / "the_cauldron", base / "FineVision"
    c_files = cauldron(c_root, {"ai2d": 9, "chartqa": 7}, two_images=(2, 11), text_only=(5,))
    f_files = finevision(f_root, {"chart2text": 10, "ocrvqa": 10}, text_only=(4,), shards=2)
    return {"base": base, "cauldron": c_root, "finevision": f_root,
            "cauldron_files": [p for ps in c_files.values() for p in ps],
            "finevision_files": [p for ps in f_files.values() for p in ps]}


def _by_position(root: Path, files) -> dict[str, dict]:
    """Reference: every row of every file (pyarrow), keyed ``<file relative to root>#<row in file>``, in
    sorted path order."""
    out = {}
    for p in sorted(files):
        for i, r in enumerate(pq.read_table(p).to_pylist()):
            out[f"{p.relative_to(root).as_posix()}#{i}"] = r
    return out


def _selected_rows(out: Path) -> list[dict]:
    return [r for p in sorted((out / "selected").rglob("*.parquet")) for r in pq.read_table(p).to_pylist()]


def _same_rows(a, b) -> bool:
    return sorted(map(repr, a)) == sorted(map(repr, b))


def test_cauldron_runs_with_positional_ids_stable_across_spellings(model, corpora, tmp_path):
    root = corpora["cauldron"]
    ref = _by_position(root, corpora["cauldron_files"])
    out = tmp_path / "a"
    args = ["run", "--model", str(model), "--out", str(out), *COMMON]
    assert cli.main([*args, "--data", f"{root}/"]) == 0
    man = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [m["id"] for m in man] == list(ref)  # every row, named <subset>/<file>#<row>
    reasons = {m["id"]: m["skip_reason"] for m in man}
    assert reasons["ai2d/train-00000-of-00001.parquet#5"].startswith("text_only")
    two = ["ai2d/train-00000-of-00001.parquet#2", "chartqa/train-00000-of-00001.parquet#2"]
    assert [len(ref[k]["images"]) for k in two] == [2, 2]
    assert all(reasons[k] is None for k in two)  # multi-image rows are used, with no placeholder
    assert sum(r is None for r in reasons.values()) == 15
    kept = _kept(out)
    assert len(kept) == 4 and _same_rows(_selected_rows(out), [ref[k] for k in kept])  # rows as published
    # each kept row under its input file's path: the subset folders survive
    want: dict[str, list] = {}
    for k in ref:
        if k in kept:
            want.setdefault(k.split("#")[0], []).append(ref[k])
    sel = out / "selected"
    assert {p.relative_to(sel).as_posix(): pq.read_table(p).to_pylist() for p in sel.rglob("*.parquet")} == want
    manifest_bytes = (out / "manifest.parquet").read_bytes()
    # the same files, listed in another order or by a glob: the same ids and the same selection
    files = sorted(map(str, corpora["cauldron_files"]), reverse=True)
    for i, data in enumerate([files, [str(root / "*" / "train-*.parquet")]]):
        assert cli.main(["run", "--model", str(model), "--out", str(tmp_path / f"b{i}"), *COMMON, "--data", *data]) == 0
        assert [m["id"] for m in pq.read_table(tmp_path / f"b{i}" / "manifest.parquet").to_pylist()] == list(ref)
        assert _kept(tmp_path / f"b{i}") == kept
    # a rerun resumes from the checkpoints and writes the same manifest
    assert cli.main([*args, "--data", str(root)]) == 0
    assert (out / "manifest.parquet").read_bytes() == manifest_bytes


def test_positional_ids_follow_the_root_and_so_does_the_fingerprint(corpora, tmp_path):
    """The same one file named alone or through the folder above its subset folder: other ids, so the
    data fingerprint differs too (a resume never mixes the two namings). Files directly in the root
    are named, and fingerprinted, by their name alone, as before."""
    src = corpora["cauldron"] / "chartqa" / "train-00000-of-00001.parquet"
    (tmp_path / "tree" / "chartqa").mkdir(parents=True)
    shutil.copy2(src, tmp_path / "tree" / "chartqa" / src.name)
    nested, alone = str(tmp_path / "tree"), str(tmp_path / "tree" / "chartqa" / src.name)
    assert [s.id for s in read_dataset(nested)][:1] == ["chartqa/train-00000-of-00001.parquet#0"]
    assert [s.id for s in read_dataset(alone)][:1] == ["train-00000-of-00001.parquet#0"]
    assert data_fingerprint(nested, None) != data_fingerprint(alone, None)
    folder = str(tmp_path / "tree" / "chartqa")
    assert [s.id for s in read_dataset(folder)] == [s.id for s in read_dataset(alone)]
    assert data_fingerprint(folder, None) == data_fingerprint(alone, None)


def test_remote_copy_names_rows_as_the_local_one(corpora):
    """The Cauldron's files in an fsspec filesystem (``memory://``) get the ids the local copy gets."""
    fsspec = pytest.importorskip("fsspec")
    fs, root = fsspec.filesystem("memory"), "/scalselect-hub-corpora"
    if fs.exists(root):
        fs.rm(root, recursive=True)
    try:
        for p in corpora["cauldron_files"]:
            fs.pipe(f"{root}/{p.relative_to(corpora['cauldron']).as_posix()}", p.read_bytes())
        local = [s.id for s in read_dataset(corpora["cauldron"])]
        assert [s.id for s in read_dataset(f"memory://{root}/")] == local
        assert [s.id for s in read_dataset(f"memory://{root}/*/train-*.parquet")] == local
        assert local[0] == "ai2d/train-00000-of-00001.parquet#0"
    finally:
        fs.rm(root, recursive=True)


def test_finevision_columns_pass_through_and_quota_by_source(model, corpora, tmp_path):
    root = corpora["finevision"]
    ref = _by_position(root, corpora["finevision_files"])
    first = sorted(corpora["finevision_files"])[0]
    args = ["run", "--model", str(model), "--data", str(root), *COMMON]
    assert cli.main([*args, "--out", str(tmp_path / "plain")]) == 0
    kept = _kept(tmp_path / "plain")
    rows = _selected_rows(tmp_path / "plain")
    assert len(kept) == 5 and _same_rows(rows, [ref[k] for k in kept])  # ratings, *_min, source untouched
    for p in (tmp_path / "plain" / "selected").rglob("*.parquet"):
        assert pq.read_schema(p).equals(pq.read_schema(first), check_metadata=True)
    per = {s: sum(ref[k]["source"] == s for k in kept) for s in ("chart2text", "ocrvqa")}
    top = max(per, key=per.get)
    assert per[top] >= 3  # 5 kept in two sources: the cap below binds
    assert cli.main([*args, "--out", str(tmp_path / "q"), "--quota", f"source={top}<=20%"]) == 0
    kept_q = _kept(tmp_path / "q")
    assert len(kept_q) == 5 and sum(ref[k]["source"] == top for k in kept_q) == 1
    # a FineVision rating column as the quota field
    assert cli.main([*args, "--out", str(tmp_path / "r"), "--quota", "relevance_min=*<=40%"]) == 0
    kept_r = _kept(tmp_path / "r")
    counts = {}
    for k in kept_r:
        counts[ref[k]["relevance_min"]] = counts.get(ref[k]["relevance_min"], 0) + 1
    assert len(kept_r) == 5 and max(counts.values()) <= 2


def test_id_field_names_the_id_column(model, corpora, tmp_path):
    feats = datasets.Features({"uid": datasets.Value("string"), "images": datasets.Sequence(datasets.Image()),
                               "texts": [{"user": datasets.Value("string"), "assistant": datasets.Value("string"),
                                          "source": datasets.Value("string")}]})
    rows = _cauldron_rows(10, "vqa", 0)
    rows["uid"] = [f"u-{i:02d}" for i in range(10)]
    path = tmp_path / "data" / "train-00000-of-00001.parquet"
    path.parent.mkdir()
    datasets.Dataset.from_dict(rows, features=feats).to_parquet(str(path))
    want = [f"u-{i:02d}" for i in range(10)]
    from scalselect_fast.data import SkipLog

    assert [s.id for s in read_dataset(path, id_field="uid")] == want
    assert cli.main(["extract", "--model", str(model), "--data", str(path), "--out", str(tmp_path / "reps"),
                     "--id-field", "uid", "--quiet"]) == 0
    import scalselect_fast as ss

    assert ss.open_source(tmp_path / "reps").ids() == want
    # a named id column is required: a row without it is not named by its position
    log = SkipLog(tmp_path / "skips.jsonl")
    with pytest.raises(DatasetError, match="all 10 records were skipped"):
        list(read_dataset(path, id_field="nope", skip_log=log))
    assert {e["reason"] for e in log.entries()} == {"missing_field"}
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'model = "{model}"\ndata = "{path}"\nid-field = "uid"\n')
    for how in ("flag", "config", "api"):
        out = tmp_path / how
        if how == "flag":
            assert cli.main(["run", "--model", str(model), "--data", str(path), "--out", str(out),
                             "--id-field", "uid", *COMMON]) == 0
        elif how == "config":
            assert cli.main(["run", "--config", str(cfg), "--out", str(out), *COMMON]) == 0
        else:
            run(make_config(model=str(model), data=str(path), out=str(out), id_field="uid", budget="25%",
                            shard_size=8, batch_size=4, quiet=True, plan_check=False))
        assert [m["id"] for m in pq.read_table(out / "manifest.parquet").to_pylist()] == want, how
        kept = _kept(out)
        assert pq.read_table(out / "selected.parquet").column("uid").to_pylist() == sorted(kept), how


# --------------------------------------------------------------------------------------------------
# 3. text-only rows
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def with_text_only(tmp_path_factory):
    """LLaVA-OneVision rows (``image`` None for text-only) as one Parquet file: 24 rows, 4 text-only."""
    base = tmp_path_factory.mktemp("textonly")
    text_only = (0, 7, 8, 19)
    path = base / "train-00000-of-00001.parquet"
    llava_onevision(24, text_only=text_only).to_parquet(str(path))
    return {"path": path, "text_only": [f"ov-{i}" for i in text_only],
            "rows": {r["id"]: r for r in pq.read_table(path).to_pylist()}}


def test_text_only_keep_passes_them_through_outside_the_budget(model, with_text_only, tmp_path, capsys):
    out = tmp_path / "keep"
    capsys.readouterr()
    assert cli.main(["run", "--model", str(model), "--data", str(with_text_only["path"]), "--out", str(out),
                     "--budget", "25%", "--text-only", "keep", "--order", "score", "--shard-size", "8",
                     "--batch-size", "4", "--no-plan-check"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("selected "))
    assert line.startswith("selected 5 of 24 samples (25.0% of the 20 that are not text-only; 20 usable; "
                           "4 text-only rows kept outside the budget)"), line
    man = pq.read_table(out / "manifest.parquet").to_pylist()
    ranked = sorted((m for m in man if m["rank"] is not None and m["kept"]), key=lambda m: m["rank"])
    assert len(ranked) == 5  # the budget: 25% of the 20 rows that are not text-only
    passed = [m for m in man if m["id"] in with_text_only["text_only"]]
    assert all(m["kept"] and m["rank"] is None and m["skip_reason"].startswith("text_only") for m in passed)
    want = [m["id"] for m in ranked] + with_text_only["text_only"]  # best first, then the text-only rows
    got = pq.read_table(out / "selected.parquet").to_pylist()
    assert [r["id"] for r in got] == want and (out / "selected.txt").read_text().split() == want
    assert all(r == with_text_only["rows"][r["id"]] for r in got)
    report = json.loads((out / "report.json").read_text())
    assert {k: report["text_only"][k] for k in ("n", "action", "in_output")} == {"n": 4, "action": "kept",
                                                                                  "in_output": 4}
    assert report["budget_base"]["n"] == 20 and report["budget_base"]["of"] == "records that are not text-only"
    assert report["n_selected"] == 5


def test_text_only_drop_and_a_whole_budget(model, with_text_only, tmp_path, capsys):
    """The default drops text-only rows; ``--budget 1.0`` then selects every row with a representation
    (it used to fail: 1.0 was taken of every record, text-only ones included)."""
    out = tmp_path / "all"
    capsys.readouterr()
    assert cli.main(["run", "--model", str(model), "--data", str(with_text_only["path"]), "--out", str(out),
                     "--budget", "1.0", "--shard-size", "8", "--batch-size", "4", "--no-plan-check"]) == 0
    assert "(100.0% of the 20 that are not text-only; 20 usable; 4 text-only rows dropped)" in capsys.readouterr().out
    got = [r["id"] for r in pq.read_table(out / "selected.parquet").to_pylist()]
    assert got == [i for i in with_text_only["rows"] if i not in with_text_only["text_only"]]
    report = json.loads((out / "report.json").read_text())
    assert [report["text_only"][k] for k in ("n", "action", "in_output")] == [4, "dropped", 0]
    # the Python API and config files take the option too
    res = run(make_config(model=str(model), data=str(with_text_only["path"]), out=str(tmp_path / "api"),
                          budget="1.0", text_only="keep", shard_size=8, batch_size=4, quiet=True, plan_check=False))
    assert pq.read_table(res.selected_path).num_rows == 24
    cfg = tmp_path / "run.toml"
    cfg.write_text('text-only = "kept"\n')
    with pytest.raises(Exception, match="--text-only 'kept': use 'drop'"):
        make_config(cfg, model=str(model), data=str(with_text_only["path"]), out=str(out)).validate()


# --------------------------------------------------------------------------------------------------
# 4. when every record is skipped, say why, and keep the skip log at <out>/skipped.jsonl
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["reading", "extraction"])
def test_all_skipped_names_the_reasons_an_example_and_the_log(model, corpora, tmp_path, capsys, case):
    out = tmp_path / "out"
    if case == "reading":  # the Cauldron with a named id column it does not have: refused while reading
        data, extra, n = str(corpora["cauldron"]), ["--id-field", "id"], 16
        want = [f"all {n} records were skipped, nothing to select: missing_field: {n} (e.g. record 0 of "
                f"{corpora['cauldron'] / 'ai2d' / 'train-00000-of-00001.parquet'}: missing required field 'id'",
                "--id-field"]
    else:  # every image path missing: refused at extraction
        n = 6
        data = tmp_path / "d.json"
        data.write_text(json.dumps([{"id": f"m{i}", "image": f"img/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A."}]} for i in range(n)]))
        (tmp_path / "img").mkdir()
        extra = ["--image-root", str(tmp_path)]
        want = [f"no sample of {data} produced a representation (skipped: image_missing: {n} (e.g. record 0 "
                f"(line 1), id 'm0': sample m0: image '{tmp_path / 'img' / '0.png'}' does not exist)",
                "check --image-root"]
    capsys.readouterr()
    assert cli.main(["run", "--model", str(model), "--data", str(data), "--out", str(out), *extra, *COMMON]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in want) and ".scalselect" not in err, err
    assert err.endswith(f"every one is listed in {out / 'skipped.jsonl'}") or \
        f"every one is listed in {out / 'skipped.jsonl'})" in err, err
    entries = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert len(entries) == n and len({e["index"] for e in entries}) == n


def test_datasets_object_without_ids_is_named_by_row(tmp_path):
    """In Python, a ``datasets.Dataset`` (or iterable one) of the Cauldron's features: ``#<row>``."""
    from scalselect_fast.data import write_selected
    from scalselect_fast.data.readers import check_unique_ids

    feats = datasets.Features({"images": datasets.Sequence(datasets.Image()),
                               "texts": [{"user": datasets.Value("string"), "assistant": datasets.Value("string"),
                                          "source": datasets.Value("string")}]})
    rows = _cauldron_rows(6, "vqa", 0, two_images=(4,))
    ds = datasets.Dataset.from_dict(rows, features=feats)
    for obj in (ds, ds.to_iterable_dataset()):
        assert [s.id for s in read_dataset(obj)] == [f"#{i}" for i in range(6)]
        assert [len(s.images) for s in read_dataset(obj)] == [1, 1, 1, 1, 2, 1]
    assert check_unique_ids(ds) == 6
    write_selected(ds, tmp_path / "sel", ["#4", "#1"], order="score")
    got = datasets.load_from_disk(str(tmp_path / "sel"))
    assert [t[0]["user"] for t in got["texts"]] == [rows["texts"][4][0]["user"], rows["texts"][1][0]["user"]]


# --------------------------------------------------------------------------------------------------
# 5. LLaVA-665K: no source field; the image folders are the sources (--source-field image_folder)
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llava665k(tmp_path_factory):
    """``llava_v1_5_mix665k.json`` in its shape: one JSON list, ``image`` relative to an image root
    (10 under ``coco/train2017/``, 6 under ``gqa/images/``), one text-only record (no ``image`` key),
    one integer id; no source field anywhere."""
    from PIL import Image

    base = tmp_path_factory.mktemp("llava665k")
    root = base / "images"
    records, folder_of = [], {}
    for i in range(16):
        rel = f"coco/train2017/{i:012d}.jpg" if i < 10 else f"gqa/images/{2354786 + i}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 10), ((37 * i) % 256, (91 * i + 40) % 256, (13 * i + 200) % 256)).save(root / rel)
        sid = 1000 + i if i == 4 else f"{i:09d}"
        folder_of[str(sid)] = rel.split("/")[0]
        records.append({"id": sid, "image": rel, "conversations": [
            {"from": "human", "value": f"<image>\nWhat is shown in picture {i}?"},
            {"from": "gpt", "value": f"Picture {i}."}]})
    records.insert(7, {"id": "text-0", "conversations": [{"from": "human", "value": "Say hi."},
                                                          {"from": "gpt", "value": "Hi."}]})
    path = base / "llava_v1_5_mix665k.json"
    path.write_text(json.dumps(records, indent=1))
    return {"path": path, "root": root, "folder_of": folder_of}


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def test_llava665k_image_folders_as_sources_for_counts_and_quota(model, llava665k, tmp_path):
    out = tmp_path / "out"
    args = ["run", "--model", str(model), "--data", str(llava665k["path"]), "--image-root", str(llava665k["root"]),
            "--out", str(out), *COMMON]
    folder_of = llava665k["folder_of"]
    # the default reads the source fields, which LLaVA-665K does not have: one group
    assert cli.main(args) == 0
    assert {s: v["total"] for s, v in _report(out)["per_source"].items()} == {"<none>": 17}
    # opted in: the first folder of each image path; the text-only record names no folder
    assert cli.main([*args, "--source-field", "image_folder"]) == 0
    per = _report(out)["per_source"]
    kept = _kept(out)
    assert len(kept) == 4  # 25% of the 16 records with an image
    assert {s: (v["total"], v["valid"]) for s, v in per.items()} == {"coco": (10, 10), "gqa": (6, 6),
                                                                     "<none>": (1, 0)}
    assert {s: v["kept"] for s, v in per.items()} == {
        s: sum(folder_of[k] == s for k in kept) for s in ("coco", "gqa")} | {"<none>": 0}
    top = max(("coco", "gqa"), key=lambda s: per[s]["kept"])
    assert per[top]["kept"] >= 2  # 4 kept in two folders: the cap below binds
    # the same through a config file, with a quota on the folders: at most 25% of 4 from the top one
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"source_field": "image_folder", "quota": [f"source={top}<=25%"]}))
    assert cli.main([*args, "--config", str(cfg)]) == 0
    kept_q = _kept(out)
    per_q = _report(out)["per_source"]
    assert len(kept_q) == 4 and sum(folder_of[k] == top for k in kept_q) == 1 == per_q[top]["kept"]
    assert _report(out)["config"]["source_field"] == "image_folder"
