"""Dataset layouts beyond one file: WebDataset tar shards (reader), selections written in kind
(WebDataset, Parquet shards, ``datasets.save_to_disk``), atomic directory commits, the demo layouts.

References are independent of the code under test: shards are built with ``tarfile`` / ``pyarrow``
/ ``datasets`` directly, expected selections are computed in plain Python from those inputs, and
"byte for byte" is checked on the raw file bytes at offsets ``tarfile`` reports.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import png_bytes

from scalselect_fast.atomic import atomic_dir
from scalselect_fast.data import DatasetError, EmbeddedImage, ImageError, SkipLog, load_image, open_dataset, read_dataset
from scalselect_fast.data.sample import UnusableRecord
from scalselect_fast.data.webdataset import REASON_MISSING_RECORD, iter_webdataset_records
from scalselect_fast.data.writers import input_layout, selected_name, write_selected


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _rec(sid=None, text="<image>\nWhat is it?", **extra) -> bytes:
    r = {} if sid is None else {"id": sid}
    r.update(extra)
    r["conversations"] = [{"from": "human", "value": text}, {"from": "gpt", "value": "A thing."}]
    return json.dumps(r).encode()


def _tar(path: Path, members, fmt=tarfile.GNU_FORMAT) -> Path:
    """Write ``members`` ((name, bytes) pairs) in order, with varied header fields."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=fmt) as tf:
        for i, (name, data) in enumerate(members):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.mode, ti.uname = len(data), 1_700_000_000 + i, 0o640, f"user{i % 3}"
            tf.addfile(ti, io.BytesIO(data))
    return path


def _shards(d: Path, n_shards=3, per=4, fmt=tarfile.GNU_FORMAT) -> list[Path]:
    """n_shards x per samples: k<s><j>.json + k<s><j>.png; every third sample has two images."""
    out = []
    for s in range(n_shards):
        members = []
        for j in range(per):
            key = f"k{s}{j}"
            if (s * per + j) % 3 == 2:
                members += [(f"{key}.json", _rec(f"id-{key}", text="<image> vs <image>")),
                            (f"{key}.0.png", png_bytes((s * 40, j * 50, 7))), (f"{key}.1.png", png_bytes((9, s, j)))]
            else:
                members += [(f"{key}.json", _rec(f"id-{key}", source="vqa")), (f"{key}.png", png_bytes((s, j, 99))),
                            (f"{key}.txt", f"caption {key}".encode())]
        out.append(_tar(d / f"shard-{s:06d}.tar", members, fmt))
    return out


def _members(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    raw = path.read_bytes()
    with tarfile.open(path) as tf:
        infos = tf.getmembers()
    # the exact bytes of each member: its header blocks through its data (tarfile's offsets)
    return [(ti, raw[ti.offset:ti.offset_data + ti.size]) for ti in infos]


def _sha_tree(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------
# reader
# --------------------------------------------------------------------------------------------------
def test_reads_keys_images_and_ids_across_brace_shards(tmp_path):
    paths = _shards(tmp_path)
    got = list(iter_webdataset_records(str(tmp_path / "shard-{000000..000002}.tar")))
    assert [i for i, _l, _r in got] == list(range(12)) and all(line is None for _i, line, _r in got)
    # reference: the same tars walked with tarfile
    for (index, _line, rec), (s, j) in zip(got, [(s, j) for s in range(3) for j in range(4)]):
        key = f"k{s}{j}"
        with tarfile.open(paths[s]) as tf:
            want = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.name.startswith(key + ".")}
        assert rec["id"] == f"id-{key}"
        imgs = sorted(n for n in want if n.endswith(".png"))
        assert [im.data for im in rec["images"]] == [want[n] for n in imgs]
        assert [im.name for im in rec["images"]] == [f"{paths[s]}#{n}" for n in imgs]
        assert "image" not in rec and rec["conversations"][0]["from"] == "human"
    # a list, a directory and a glob name the same shards, sorted, recognised as tar shards

    def files(spec):
        source = open_dataset(spec)
        assert source.container == "webdataset"
        return [f.path for f in source.files]

    assert files([paths[2], paths[0], paths[1]]) == files(tmp_path) == files(str(tmp_path / "shard-*.tar")) \
        == [str(p) for p in paths]
    assert input_layout(str(tmp_path / "shard-{000000..000002}.tar")) == "webdataset"
    assert selected_name(paths[0]) == "selected"


def test_image_matching_rules(tmp_path):
    a, b, c = png_bytes((1, 2, 3)), png_bytes((4, 5, 6)), png_bytes((7, 8, 9))
    shard = _tar(tmp_path / "s.tar", [
        # numeric order, not tar or string order: .2 before .10
        ("multi.json", _rec(text="<image><image><image>")), ("multi.10.jpg", c), ("multi.0.png", a),
        ("multi.2.webp", b),
        # the record names its images by extension
        ("named.json", _rec(images=["second.png", "first.png"], text="<image> <image>")),
        ("named.first.png", a), ("named.second.png", b),
        # paths kept from the source LLaVA JSON: as many as the key has, taken in order
        ("orig.json", _rec("o-1", image="coco/train2017/000000123.jpg")), ("orig.jpg", c),
        # a text-only record (no image field, no image member); its id defaults to the key
        ("text.json", _rec(text="Hello?")),
        # a key without a record, and a record naming an image that is not there
        ("lonely.png", a),
        ("missing.json", _rec(images=["x.png", "y.png"], text="<image><image>")), ("missing.png", a),
        ("dir/sub.json", _rec(text="<image>q")), ("dir/sub.PNG", b),  # directory in the key, upper case
    ])
    recs = {(r.sample_id if isinstance(r, UnusableRecord) else r["id"]): r
            for _i, _l, r in iter_webdataset_records(shard)}
    assert [im.data for im in recs["multi"]["images"]] == [a, b, c]
    assert [im.data for im in recs["named"]["images"]] == [b, a]
    assert [im.data for im in recs["o-1"]["images"]] == [c] and "image" not in recs["o-1"]
    assert recs["text"]["images"] == [] and recs["text"]["id"] == "text"
    assert isinstance(recs["lonely"], UnusableRecord) and recs["lonely"].reason == REASON_MISSING_RECORD
    assert "lonely.json" in recs["lonely"].detail and str(shard) in recs["lonely"].detail
    miss = recs["missing"]
    assert isinstance(miss, UnusableRecord) and miss.reason == "image_missing" and "x.png" in miss.detail
    assert [im.data for im in recs["dir/sub"]["images"]] == [b]


def test_member_that_is_not_an_image_fails_at_decode_with_its_name(tmp_path):
    shard = _tar(tmp_path / "s.tar", [("a.json", _rec("a")), ("a.jpg", b"this is not a jpeg")])
    (_i, _l, rec), = iter_webdataset_records(shard)
    with pytest.raises(ImageError) as e:
        load_image(rec["images"][0])
    assert e.value.reason == "image_corrupt" and f"{shard}#a.jpg" in str(e.value)
    # and a real one decodes from memory
    good = EmbeddedImage(png_bytes((10, 20, 30)), "x")
    assert load_image(good).getpixel((0, 0)) == (10, 20, 30)


@pytest.mark.parametrize("cut", ["mid_data", "member_boundary", "mid_header", "garbage_header"])
def test_truncated_or_corrupt_tar_is_one_clear_error(tmp_path, cut):
    members = [("a.json", _rec("a")), ("a.png", png_bytes()), ("b.json", _rec("b")), ("b.png", png_bytes((1, 1, 1)))]
    src = _tar(tmp_path / "ok.tar", members)
    infos = [ti for ti, _ in _members(src)]
    raw = src.read_bytes()
    b_png = infos[3]
    end_b_json = infos[2].offset_data + 512  # b.json's data is under one block
    bad = {"mid_data": raw[:b_png.offset_data + 10],
           "member_boundary": raw[:end_b_json],  # cut right before b.png: tarfile alone stops quietly
           "mid_header": raw[:b_png.offset + 100],
           "garbage_header": raw[:b_png.offset] + b"\x07" * 512 + raw[b_png.offset + 512:]}[cut]
    path = tmp_path / "bad.tar"
    path.write_bytes(bad)
    with pytest.raises(DatasetError) as e:
        list(iter_webdataset_records(path))
    msg = str(e.value)
    assert e.value.reason == "malformed" and str(path) in msg and "\n" not in msg
    assert "truncated or corrupt" in msg and ("'b.json'" in msg or "'b.png'" in msg)


def test_duplicate_keys_and_missing_shards(tmp_path):
    _tar(tmp_path / "a" / "s-0.tar", [("k1.json", _rec()), ("k1.png", png_bytes())])
    _tar(tmp_path / "a" / "s-1.tar", [("k2.json", _rec()), ("k1.json", _rec())])
    one = _tar(tmp_path / "b.tar", [("k.json", _rec()), ("j.json", _rec()), ("k.png", png_bytes())])
    with pytest.raises(DatasetError, match="occurs twice"):
        list(iter_webdataset_records(one))
    two = _tar(tmp_path / "c.tar", [("k.json", _rec()), ("k.json", _rec())])
    with pytest.raises(DatasetError, match="two members with extension 'json'"):
        list(iter_webdataset_records(two))
    with pytest.raises(DatasetError, match=r"s-2\.tar.*no such file"):
        list(iter_webdataset_records(str(tmp_path / "a" / "s-{0..2}.tar")))
    with pytest.raises(DatasetError, match="matches no dataset file"):
        list(iter_webdataset_records(str(tmp_path / "nothing-*.tar")))
    # across shards: k1 has no id field, so its key is its id, and ids are unique across shards
    with pytest.raises(DatasetError) as e:
        list(read_dataset(str(tmp_path / "a" / "s-{0..1}.tar"), skip_log=SkipLog(tmp_path / "skip.jsonl")))
    assert e.value.reason == "duplicate_id" and "s-0.tar" in str(e.value) and "s-1.tar" in str(e.value)
    # the pass before a run finds it too, reading the .json members only (ids from the key)
    from scalselect_fast.data.readers import check_unique_ids
    from scalselect_fast.data.sources import containers

    assert containers()["webdataset"].ids is not None
    with pytest.raises(DatasetError) as e:
        check_unique_ids(str(tmp_path / "a" / "s-{0..1}.tar"))
    assert e.value.reason == "duplicate_id" and "'id-k1'" not in str(e.value) and "'k1'" in str(e.value)
    assert check_unique_ids(str(tmp_path / "a" / "s-0.tar")) == 1
    bad_json = _tar(tmp_path / "d.tar", [("k.json", b"{not json")])
    with pytest.raises(DatasetError, match=r"'k\.json' is not valid JSON"):
        list(iter_webdataset_records(bad_json))


# --------------------------------------------------------------------------------------------------
# writers: WebDataset
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("order", ["original", "score"])
def test_webdataset_selection_copies_members_byte_for_byte(tmp_path, order, fmt):
    paths = _shards(tmp_path / "in", fmt=fmt)
    if fmt == tarfile.PAX_FORMAT:  # a long non-ASCII name needs pax header blocks before the member
        long = "x" * 120 + "\u00e9"
        paths.append(_tar(tmp_path / "in" / "shard-000003.tar",
                          [(f"{long}.json", _rec("long")), (f"{long}.png", png_bytes())], fmt))
    before = _sha_tree(tmp_path / "in")
    keep = ["id-k21", "id-k02", "id-k13", "id-k00", "id-k22"] + (["long"] if fmt == tarfile.PAX_FORMAT else [])
    out = tmp_path / "out" / "selected"
    n = write_selected(tmp_path / "in", out, keep if order == "score" else set(keep), order=order)
    assert n == len(keep) and _sha_tree(tmp_path / "in") == before  # the input is only read
    # reference: every member of a kept key, raw bytes from the input at tarfile's offsets
    src = {}
    for p in paths:
        for ti, raw in _members(p):
            key = ti.name.split(".", 1)[0]
            src.setdefault(key, []).append((ti.name, raw))
    key_of = {f"id-{k}": k for k in src} | {"long": "x" * 120 + "\u00e9"}
    want_keys = [key_of[k] for k in keep]
    if order == "original":
        want_keys = [k for k in src if k in set(want_keys)]
    shards = sorted(out.iterdir())
    assert [s.name for s in shards] == [f"shard-{i:06d}.tar" for i in range(len(shards))]
    got = [(ti.name, raw) for s in shards for ti, raw in _members(s)]
    assert got == [m for k in want_keys for m in src[k]]
    # at most as many samples per output shard as the largest input shard; a valid tar end
    for s in shards:
        with tarfile.open(s) as tf:
            assert len({m.name.split(".", 1)[0] for m in tf.getmembers()}) <= 4
        assert s.stat().st_size % tarfile.RECORDSIZE == 0 and s.read_bytes()[-1024:] == bytes(1024)
    assert [r["id"] for _i, _l, r in iter_webdataset_records(out)] == (
        keep if order == "score" else [k for k in key_of if k in set(keep)])


def test_webdataset_selection_errors_and_atomic_replace(tmp_path):
    _shards(tmp_path / "in", n_shards=2)
    out = tmp_path / "sel"
    write_selected(tmp_path / "in", out, {"id-k00"})
    first = _sha_tree(out)
    with pytest.raises(DatasetError, match="not in"):
        write_selected(tmp_path / "in", out, {"id-k00", "nope"})
    assert _sha_tree(out) == first  # a failed write leaves the previous complete output
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left
    write_selected(tmp_path / "in", out, {"id-k11", "id-k01"})
    assert [r["id"] for _i, _l, r in iter_webdataset_records(out)] == ["id-k01", "id-k11"]
    assert write_selected(tmp_path / "in", tmp_path / "empty", set()) == 0
    (empty,) = (tmp_path / "empty").iterdir()
    with tarfile.open(empty) as tf:
        assert tf.getmembers() == []
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        write_selected(tmp_path / "in", tmp_path / "afile", {"id-k00"})
    # --format names the input's own container (what `run` passes on): the same as "auto"
    write_selected(tmp_path / "in", tmp_path / "f", {"id-k01", "id-k11"}, format="webdataset")
    assert _sha_tree(tmp_path / "f") == _sha_tree(out)
    with pytest.raises(ValueError, match="written in kind"):
        write_selected(tmp_path / "in", tmp_path / "g", {"id-k00"}, format="jsonl")


def test_atomic_dir_commits_as_a_set(tmp_path):
    target = tmp_path / "d"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a").write_text("2")
            (tmp / "b").write_text("2")
            raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"] and (target / "a").read_text() == "1"
    with atomic_dir(target) as tmp:
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"] and [p.name for p in target.iterdir()] == ["b"]


# --------------------------------------------------------------------------------------------------
# writers: Parquet shards and save_to_disk
# --------------------------------------------------------------------------------------------------
_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _parquet_shards(d: Path, sizes=(5, 7, 3)) -> list[Path]:
    schema = pa.schema([("id", pa.string()), ("images", pa.list_(_IMAGE)), ("n", pa.int64())],
                       metadata={"huggingface": '{"info": {"features": {}}}'})
    d.mkdir(parents=True, exist_ok=True)
    out, k = [], 0
    for s, size in enumerate(sizes):
        rows = [{"id": f"r{k + i:03d}", "n": k + i,
                 "images": [{"bytes": png_bytes((k + i, 3, 5)), "path": None}] * (1 + (k + i) % 2)}
                for i in range(size)]
        k += size
        p = d / f"train-{s:05d}-of-{len(sizes):05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), p, row_group_size=2)
        out.append(p)
    return out


@pytest.mark.parametrize("order", ["original", "score"])
def test_parquet_shards_selection_keeps_schema_and_bytes(tmp_path, order):
    files = _parquet_shards(tmp_path / "in")
    before = _sha_tree(tmp_path / "in")
    keep = ["r014", "r002", "r007", "r000", "r011", "r005", "r013", "r009"]
    out = tmp_path / "selected"
    assert input_layout(str(tmp_path / "in" / "train-*.parquet")) == "parquet_shards"
    n = write_selected(str(tmp_path / "in" / "train-*.parquet"), out, keep if order == "score" else set(keep),
                       order=order)
    assert n == len(keep) and _sha_tree(tmp_path / "in") == before
    parts = sorted(out.iterdir())
    assert [p.name for p in parts] == [f.name for f in files]  # each input's kept rows under its own name
    for f, p in zip(files, parts):
        want = [r for r in pq.read_table(f).to_pylist() if r["id"] in keep]
        if order == "score":  # best first within the file
            want = sorted(want, key=lambda r: keep.index(r["id"]))
        assert pq.read_table(p).to_pylist() == want  # image bytes included
        assert pq.read_schema(p).equals(pq.read_schema(files[0]), check_metadata=True)


def test_parquet_row_groups_are_sized_by_bytes(tmp_path, monkeypatch):
    from scalselect_fast.data import writers

    files = _parquet_shards(tmp_path / "in", sizes=(40,))
    pf = pq.ParquetFile(files[0])
    row_bytes = sum(pf.metadata.row_group(g).total_byte_size for g in range(pf.num_row_groups)) / 40
    monkeypatch.setattr(writers, "ROW_GROUP_BYTES", int(row_bytes * 6))
    write_selected(files[0], tmp_path / "o.parquet", {f"r{i:03d}" for i in range(0, 40, 2)})
    meta = pq.ParquetFile(tmp_path / "o.parquet").metadata
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [6, 6, 6, 2]


def test_parquet_shards_with_different_schemas_are_refused(tmp_path):
    _parquet_shards(tmp_path / "in", sizes=(2,))
    pq.write_table(pa.table({"id": ["z"], "other": [1.5]}), tmp_path / "in" / "train-00009.parquet")
    with pytest.raises(DatasetError, match="different schemas"):
        write_selected(tmp_path / "in", tmp_path / "out", {"z"})
    assert not (tmp_path / "out").exists()


def test_save_to_disk_in_save_to_disk_out(tmp_path):
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                               "conversations": [{"from": datasets.Value("string"),
                                                  "value": datasets.Value("string")}]})
    rows = {"id": [f"d{i}" for i in range(9)],
            "image": [{"bytes": png_bytes((i, i, i)), "path": None} for i in range(9)],
            "conversations": [[{"from": "human", "value": f"q{i}"}] for i in range(9)]}
    src = tmp_path / "ds"
    datasets.Dataset.from_dict(rows, features=feats).save_to_disk(str(src))
    before = _sha_tree(src)
    assert input_layout(src) == "save_to_disk" and selected_name(src) == "selected"
    out = tmp_path / "selected"
    assert write_selected(src, out, ["d7", "d1", "d4"], order="score") == 3
    got = datasets.load_from_disk(str(out))
    assert got.features == feats and got["id"] == ["d7", "d1", "d4"]
    raw = got.cast_column("image", datasets.Image(decode=False))
    assert [r["bytes"] for r in raw["image"]] == [rows["image"][i]["bytes"] for i in (7, 1, 4)]
    assert _sha_tree(src) == before  # nothing (no cache file) written into the input
    with pytest.raises(DatasetError, match="not in"):
        write_selected(src, tmp_path / "x", {"nope"})
    # Python objects: a Dataset, a select() view of one (positions are the view's), an IterableDataset
    ds = datasets.Dataset.from_dict(rows, features=feats)
    view = ds.select([8, 1, 4, 7])
    for obj, name in ((ds, "obj"), (view, "view"), (ds.to_iterable_dataset(num_shards=3), "iter")):
        assert write_selected(obj, tmp_path / name, ["d7", "d1", "d4"], order="score") == 3
        got = datasets.load_from_disk(str(tmp_path / name))
        assert got.features == feats and got["id"] == ["d7", "d1", "d4"], name
        assert [r["bytes"] for r in got.cast_column("image", datasets.Image(decode=False))["image"]] == \
            [rows["image"][i]["bytes"] for i in (7, 1, 4)], name
    write_selected(view, tmp_path / "view2", {"d4", "d8"})
    assert datasets.load_from_disk(str(tmp_path / "view2"))["id"] == ["d8", "d4"]  # the view's order


# --------------------------------------------------------------------------------------------------
# demo layouts
# --------------------------------------------------------------------------------------------------
def test_demo_webdataset_layout_holds_the_json_layouts_samples(tmp_path):
    from scalselect_fast.data.demo import main, make_demo_dataset

    t_json = make_demo_dataset(tmp_path / "j", n=30, seed=2)
    assert main([str(tmp_path / "w"), "--n", "30", "--seed", "2", "--layout", "webdataset",
                 "--shard-size", "8"]) == 0
    t_wds = json.loads((tmp_path / "w" / "demo_truth.json").read_text())
    assert t_wds["data"] == "shards/demo-{000000..000003}.tar" and t_wds.pop("layout") == "webdataset"
    assert {k: v for k, v in t_wds.items() if k != "data"} == {k: v for k, v in t_json.items() if k != "data"}
    records = json.loads((tmp_path / "j" / "demo.json").read_text())
    got = [r for _i, _l, r in iter_webdataset_records(str(tmp_path / "w" / t_wds["data"]))]
    assert [r["id"] for r in got] == [r["id"] for r in records]
    for r, g in zip(records, got):
        assert g["conversations"] == r["conversations"] and g["source"] == r["source"]
        want = [(tmp_path / "j" / r["image"]).read_bytes()] if "image" in r else []
        assert [im.data for im in g["images"]] == want


def test_demo_parquet_layout_is_hf_image_shards(tmp_path):
    from scalselect_fast.data.demo import make_demo_dataset

    make_demo_dataset(tmp_path / "j", n=30, seed=2)
    truth = make_demo_dataset(tmp_path / "p", n=30, seed=2, layout="parquet", shard_size=12)
    files = sorted((tmp_path / "p" / truth["data"]).iterdir())
    assert [f.name for f in files] == [f"train-{i:05d}-of-00003.parquet" for i in range(3)]
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    records = json.loads((tmp_path / "j" / "demo.json").read_text())
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    for r, row in zip(records, rows):
        assert row["conversations"] == r["conversations"]
        want = [(tmp_path / "j" / r["image"]).read_bytes()] if "image" in r else []
        assert [im["bytes"] for im in row["images"]] == want
    features = json.loads(pq.read_schema(files[0]).metadata[b"huggingface"])["info"]["features"]
    assert features["images"]["feature"]["_type"] == "Image"
    with pytest.raises(ValueError, match="layout"):
        make_demo_dataset(tmp_path / "x", n=30, layout="csv")


# --------------------------------------------------------------------------------------------------
# `scalselect run` end to end on every layout of the same samples
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def layouts(tmp_path_factory, tiny_llava):
    from scalselect_fast.data.demo import LAYOUTS, make_demo_dataset

    base = tmp_path_factory.mktemp("layouts")
    data = {}
    for layout in LAYOUTS:
        truth = make_demo_dataset(base / layout, n=40, seed=3, layout=layout, shard_size=16)
        data[layout] = base / layout / truth["data"]
    return {"base": base, "data": data, "model": tiny_llava}


def test_run_selects_the_same_samples_in_every_layout(layouts):
    from scalselect_fast import cli

    kept, outs = {}, {}
    for layout, data in layouts["data"].items():
        out = layouts["base"] / f"out-{layout}"
        before = _sha_tree(layouts["base"] / layout)
        args = ["run", "--model", str(layouts["model"]), "--data", str(data), "--out", str(out),
                "--budget", "25%", "--shard-size", "8", "--batch-size", "4", "--quiet"]
        if layout == "json":
            args += ["--image-root", str(layouts["base"] / layout)]
        assert cli.main(args) == 0, layout
        assert _sha_tree(layouts["base"] / layout) == before  # inputs are only read
        manifest = pq.read_table(out / "manifest.parquet").to_pylist()
        kept[layout] = [m["id"] for m in manifest if m["kept"]]
        outs[layout] = out
        skipped = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
        assert sorted(e["reason"] for e in skipped) == ["text_only", "text_only"]
    assert len(kept["json"]) == 10 and kept["parquet"] == kept["json"] and kept["webdataset"] == kept["json"]
    # the selection, in kind, holds exactly the kept samples
    sel_json = [r["id"] for r in json.loads((outs["json"] / "selected.json").read_text())]
    parts = sorted((outs["parquet"] / "selected").glob("*.parquet"))
    sel_pq = [r["id"] for p in parts for r in pq.read_table(p, columns=["id"]).to_pylist()]
    sel_wds = [r["id"] for _i, _l, r in iter_webdataset_records(outs["webdataset"] / "selected")]
    assert sel_json == sel_pq == sel_wds == sorted(kept["json"])


def test_rerun_of_embedded_image_runs_reads_no_images_to_check_them(layouts, monkeypatch):
    """Rerunning a finished run checks each shard's images against the data; a shard whose images
    are all embedded has that answered by the data fingerprint, so the dataset (all its image bytes)
    is not read again for it. Image files (the JSON layout) are still checked."""
    import inspect

    import scalselect_fast.data as data_mod
    from scalselect_fast import cli

    real = data_mod.read_dataset
    calls = []

    def spy(*a, **k):
        calls.append(inspect.stack()[1].function)
        return real(*a, **k)

    monkeypatch.setattr(data_mod, "read_dataset", spy)
    for layout, data in layouts["data"].items():
        out = layouts["base"] / f"out-{layout}"
        args = ["run", "--model", str(layouts["model"]), "--data", str(data), "--out", str(out),
                "--budget", "25%", "--shard-size", "8", "--batch-size", "4", "--quiet"]
        if layout == "json":
            args += ["--image-root", str(layouts["base"] / layout)]
        if not (out / "report.json").exists():
            assert cli.main(args) == 0, layout
        before = (out / "manifest.parquet").read_bytes()
        calls.clear()
        assert cli.main(args) == 0, layout
        assert (out / "manifest.parquet").read_bytes() == before
        assert ("_stale_shards" in calls) == (layout == "json"), (layout, calls)


def test_datasets_rows_fast_path_and_select_views_agree(tmp_path):
    """hf.iter_dataset_rows reads a plain Dataset's Arrow batches directly and a select() view through
    datasets' own iteration; both must give the rows datasets itself gives (to_list, images undecoded)."""
    datasets = pytest.importorskip("datasets")
    from scalselect_fast.data.hf import iter_dataset_rows

    feats = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image()})
    ds = datasets.Dataset.from_dict({"id": [f"d{i}" for i in range(2500)],
                                     "image": [{"bytes": bytes([i % 251]) * 3, "path": None} for i in range(2500)]},
                                    features=feats)
    raw = ds.cast_column("image", datasets.Image(decode=False))
    assert list(iter_dataset_rows(ds, "ds")) == raw.to_list()
    view = ds.select([2400, 7, 1500, 7])
    assert list(iter_dataset_rows(view, "view")) == raw.select([2400, 7, 1500, 7]).to_list()


def test_remote_webdataset_reads_and_selects_like_local(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    root = "/scalselect-wds-test"
    if fs.exists(root):
        fs.rm(root, recursive=True)
    try:
        paths = _shards(tmp_path / "in", n_shards=2)
        for p in paths:
            fs.pipe(f"{root}/{p.name}", p.read_bytes())
        local = [(s.index, s.id, [im.data for im in s.images]) for s in read_dataset(tmp_path / "in")]
        remote = f"memory://{root}/shard-{{000000..000001}}.tar"
        assert [(s.index, s.id, [im.data for im in s.images]) for s in read_dataset(remote)] == local
        keep = ["id-k12", "id-k01"]
        write_selected(remote, tmp_path / "r", keep, order="score")
        write_selected(tmp_path / "in", tmp_path / "l", keep, order="score")
        assert _sha_tree(tmp_path / "r") == _sha_tree(tmp_path / "l")
    finally:
        fs.rm(root, recursive=True)


def test_run_on_bad_webdataset_input(layouts, tmp_path, capsys):
    """Through `scalselect run`: a member that is not an image and a record naming a missing image are
    skipped with their reasons (and never selected); a truncated shard stops the run with one line."""
    from scalselect_fast import cli

    src = sorted(layouts["data"]["webdataset"].parent.glob("*.tar"))
    members = [(ti.name, raw[ti.offset_data - ti.offset:]) for p in src for ti, raw in _members(p)]
    bad = []
    for name, data in members:
        if name == "demo-0003.png":
            data = b"not a png at all"
        elif name == "demo-0005.json":
            rec = json.loads(data)
            rec["images"] = ["demo-0005.png", "demo-0005.extra.png"]
            rec["conversations"][0]["value"] = "<image><image>" + rec["conversations"][0]["value"]
            data = json.dumps(rec).encode()
        bad.append((name, data))
    shard = _tar(tmp_path / "bad" / "one.tar", bad)
    out = tmp_path / "out"
    args = ["run", "--model", str(layouts["model"]), "--out", str(out), "--budget", "25%", "--shard-size", "8",
            "--batch-size", "4", "--quiet"]
    assert cli.main(args + ["--data", str(shard)]) == 0
    skipped = {e["id"]: e for e in map(json.loads, (out / "skipped.jsonl").read_text().splitlines())}
    assert skipped["demo-0003"]["reason"] == "image_corrupt" and f"{shard}#demo-0003.png" in skipped["demo-0003"]["detail"]
    assert skipped["demo-0005"]["reason"] == "image_missing"
    kept = [m["id"] for m in pq.read_table(out / "manifest.parquet").to_pylist() if m["kept"]]
    assert len(kept) == 10 and not {"demo-0003", "demo-0005"} & set(kept)
    assert [r["id"] for _i, _l, r in iter_webdataset_records(out / "selected")] == sorted(kept)
    capsys.readouterr()
    cut = tmp_path / "bad" / "cut.tar"
    cut.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2 + 100])
    assert cli.main(args + ["--data", str(cut), "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip()
    assert "truncated or corrupt" in err and str(cut) in err and len(err.splitlines()) == 1


def test_key_grouping_agrees_with_the_webdataset_package(tmp_path):
    """The reader's walk (tarfile, own grouping) against webdataset's own tar expander + group_by_keys
    on the same shards: same keys in the same order, same members and bytes per key."""
    wds = pytest.importorskip("webdataset.tariterators")
    from scalselect_fast.data.webdataset import iter_key_groups

    paths = _shards(tmp_path, n_shards=2, per=5)
    paths.append(_tar(tmp_path / "shard-000002.tar", [("d/a.b.JSON", _rec()), ("d/a.b.0.PNG", png_bytes()),
                                                      ("d/c.json", _rec()), ("noext", b"x")]))
    for p in paths:
        with open(p, "rb") as fh:
            theirs = [{k: v for k, v in s.items() if not k.startswith("__")} | {"__key__": s["__key__"]}
                      for s in wds.group_by_keys(wds.tar_file_expander([{"url": str(p), "stream": fh}]))]
        ours = [{m.ext: m.data for m in g.members} | {"__key__": g.key} for g in iter_key_groups(str(p))]
        assert ours == theirs and len(ours) >= 2


def test_save_to_disk_ids_are_checked_from_the_id_column(tmp_path):
    """The duplicate-id pass before a run reads a ``save_to_disk`` folder's id column only, and
    names both records; integer ids count as their decimal strings, as the reader gives them."""
    datasets = pytest.importorskip("datasets")
    from scalselect_fast.data.readers import check_unique_ids

    conv = [[{"from": "human", "value": "q"}]] * 4
    datasets.Dataset.from_dict({"id": ["a", "b", "c", "b"], "conversations": conv}).save_to_disk(str(tmp_path / "s"))
    with pytest.raises(DatasetError) as e:
        check_unique_ids(tmp_path / "s")
    assert e.value.reason == "duplicate_id" and e.value.index == 3 and "'b'" in str(e.value)
    datasets.Dataset.from_dict({"id": [5, 6, 7, 8], "conversations": conv}).save_to_disk(str(tmp_path / "i"))
    src = open_dataset(tmp_path / "i")
    assert check_unique_ids(src) == 4 and src.counts() == [4]
    assert [s.id for s in read_dataset(tmp_path / "i")] == ["5", "6", "7", "8"]


def test_select_stage_record_pass_reads_only_the_json_members(tmp_path):
    """The select stage's pass over a WebDataset (ids, sources, quota values) reads the .json members
    only and gives what the full records give; a key without a record has no id there, as before."""
    from scalselect_fast.run import make_config
    from scalselect_fast.run.stages import _raw_records, _record_table

    paths = _shards(tmp_path / "in", n_shards=2)
    _tar(tmp_path / "in" / "shard-000009.tar", [("lonely.png", png_bytes()), ("k9.json", _rec(None, source="s9")),
                                                 ("k9.png", png_bytes())])
    cfg = make_config(data=str(tmp_path / "in"), model="m", out=str(tmp_path / "out"))
    full = [r for _i, _l, r in iter_webdataset_records(tmp_path / "in")]
    got = _record_table(cfg, ["source"])
    want_ids = [str(r["id"]) if isinstance(r, dict) else None for r in full]
    assert list(got["ids"]) == want_ids and want_ids[-2:] == [None, "k9"] and len(paths) == 2
    assert got["sources"][-1] == "s9"
    assert all("images" not in r for r in _raw_records(cfg, []))
