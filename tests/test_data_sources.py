"""Dataset inputs as they ship at scale: embedded images, the Cauldron flavour, sharded inputs (dir, glob,
list), fsspec URLs, the streaming JSON reader, Hugging Face ``datasets``, and the bad inputs of each.

References are slow and obvious: whole-file ``json.loads``, each shard read on its own and concatenated,
``pyarrow.parquet.read_table``. Remote reads use fsspec's real ``memory://`` filesystem.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import png_bytes, write_parquet

from scalselect_fast.data import (DatasetError, EmbeddedImage, ImageError, SkipLog, count_records, input_files,
                                  iter_records, load_image, open_dataset, read_dataset)
from scalselect_fast.data import json_list
from scalselect_fast.run.fingerprints import data_fingerprint


RED, BLUE = png_bytes(), png_bytes((10, 10, 240), (5, 7))


def _conv(q="What is this?", a="A thing."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------------------------------
# embedded images and flavours
# --------------------------------------------------------------------------------------------------
def test_parquet_image_struct_list_binary_and_path_only(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "p.png").write_bytes(BLUE)
    rows = [
        {"id": "one", "image": {"bytes": RED, "path": "red.png"}, "conversations": _conv()},
        {"id": "nameless", "image": {"bytes": BLUE, "path": None}, "conversations": _conv()},
        {"id": "pathonly", "image": {"bytes": None, "path": "img/p.png"}, "conversations": _conv()},
    ]
    p1 = write_parquet(tmp_path / "structs.parquet", rows)
    s = list(read_dataset(p1))
    assert [x.id for x in s] == ["one", "nameless", "pathonly"]
    assert s[0].images == [EmbeddedImage(RED, "red.png")]
    assert s[1].images == [EmbeddedImage(BLUE, "structs.parquet#1/image0")]
    assert s[2].images == [str((tmp_path / "img" / "p.png").resolve())]  # a struct with a path only is a path
    assert s[0].messages[0]["content"] == "<image>\nWhat is this?"
    assert load_image(s[0].images[0]).getpixel((0, 0)) == (200, 30, 30)
    assert load_image(s[2].images[0]).size == (5, 7)

    # list of structs (multi-image), placeholders map to the images in list order
    multi = [{"id": "m", "images": [{"bytes": RED, "path": None}, {"bytes": BLUE, "path": None}],
              "conversations": [{"from": "human", "value": "first <image> then <image>?"},
                                {"from": "gpt", "value": "ok"}]}]
    (m,) = read_dataset(write_parquet(tmp_path / "multi.parquet", multi))
    assert [load_image(i).size for i in m.images] == [(8, 6), (5, 7)]
    assert m.to_chat()[0]["content"][1]["path"] is m.images[0]

    # a plain binary column
    schema = pa.schema([("id", pa.string()), ("image", pa.binary()),
                        ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())])))])
    (b,) = read_dataset(write_parquet(tmp_path / "bin.parquet", [{"id": "b", "image": BLUE,
                                                                    "conversations": _conv()}], schema))
    assert isinstance(b.images[0], EmbeddedImage) and b.images[0].data == BLUE


def test_cauldron_flavour(tmp_path):
    rows = [{"images": [{"bytes": RED, "path": None}, {"bytes": BLUE, "path": None}], "id": 7,
             "texts": [{"user": "Describe.", "assistant": "Red and blue.", "source": "vqav2"},
                       {"user": "Sure?", "assistant": "Yes."}]}]
    (s,) = read_dataset(write_parquet(tmp_path / "c.parquet", rows))
    assert s.id == "7" and s.source == "vqav2" and len(s.images) == 2
    assert s.messages == [{"role": "user", "content": "<image>\n<image>\nDescribe."},
                          {"role": "assistant", "content": "Red and blue."},
                          {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]


def test_embedded_bad_images_skip_with_reason(tmp_path):
    rows = [{"id": "ok", "image": {"bytes": RED, "path": None}, "conversations": _conv()},
            {"id": "null", "image": {"bytes": None, "path": None}, "conversations": _conv()},
            {"id": "bad", "image": {"bytes": b"not an image at all", "path": None}, "conversations": _conv()},
            {"id": "cut", "image": {"bytes": png_bytes(size=(64, 64), fmt="JPEG")[:200], "path": None},
             "conversations": _conv()}]
    p = write_parquet(tmp_path / "d.parquet", rows)
    with pytest.raises(DatasetError, match=r"record 1 \(id 'null'\).*neither bytes nor a path") as ei:
        list(read_dataset(p))
    assert ei.value.reason == "image_empty" and "\n" not in str(ei.value)
    with SkipLog(tmp_path / "skipped.jsonl") as log:
        samples = list(read_dataset(p, skip_log=log))
    assert [s.id for s in samples] == ["ok", "bad", "cut"]
    (entry,) = log.entries()
    assert entry["reason"] == "image_empty" and entry["id"] == "null" and entry["index"] == 1
    # undecodable bytes fail when the pixels are needed, with the same reasons as files
    with pytest.raises(ImageError) as e1:
        load_image(samples[1].images[0])
    assert e1.value.reason == "image_corrupt" and e1.value.path == "d.parquet#2/image0"
    with pytest.raises(ImageError) as e2:
        load_image(samples[2].images[0])
    assert e2.value.reason in ("image_truncated", "image_corrupt")


# --------------------------------------------------------------------------------------------------
# sharded inputs
# --------------------------------------------------------------------------------------------------
def _shards(tmp_path, sizes=(3, 1, 4)):
    """Parquet shards train-00000..; returns the paths and every row in global order."""
    paths, rows, k = [], [], 0
    for j, n in enumerate(sizes):
        part = [{"id": f"s{k + i}", "image": {"bytes": RED if (k + i) % 2 else BLUE, "path": None},
                 "conversations": _conv(f"q{k + i}")} for i in range(n)]
        k += n
        paths.append(write_parquet(tmp_path / "data" / f"train-{j:05d}-of-{len(sizes):05d}.parquet", part))
        rows += part
    (tmp_path / "data" / "README.md").write_text("# not data\n")
    return paths, rows


def _reference(paths):
    """Each shard read on its own (pyarrow), concatenated: (global index, id, text of the question)."""
    out = []
    for p in sorted(map(str, paths)):
        for r in pq.read_table(p).to_pylist():
            out.append((len(out), r["id"], r["conversations"][0]["value"], r["image"]["bytes"]))
    return out


@pytest.mark.parametrize("how", ["dir", "glob", "list", "list-reversed"])
def test_sharded_inputs_global_order(tmp_path, how):
    paths, _ = _shards(tmp_path)
    data = {"dir": str(tmp_path / "data"), "glob": str(tmp_path / "data" / "train-*.parquet"),
            "list": [str(p) for p in paths], "list-reversed": [str(p) for p in paths[::-1]]}[how]
    got = [(s.index, s.id, s.messages[0]["content"].split("\n", 1)[1], s.images[0].data)
           for s in read_dataset(data)]
    assert got == _reference(paths)
    assert count_records(data) == 8 and [i for i, _l, _r in iter_records(data)] == list(range(8))
    assert input_files(data) == sorted(str(p) for p in paths)
    src = open_dataset(data)
    assert src.locate(3) == (src.files[1], 0) and src.locate(7) == (src.files[2], 3)


def _as_rows(samples):
    return [(s.index, s.id, s.line, s.messages, [i.data if isinstance(i, EmbeddedImage) else i for i in s.images])
            for s in samples]


@pytest.mark.parametrize("layout", ["parquet", "jsonl", "json", "hf-dataset"])
def test_reading_from_a_start_record_equals_the_whole_read_from_there_and_skips_earlier_files(tmp_path, layout):
    """read_dataset(start=k) is the whole read's samples with index >= k (a rank's range, a resumed
    extraction), and the files wholly before record k are not read: they are made unreadable after
    the counts are taken, and reading from k still works."""
    if layout == "hf-dataset":
        data = _hf_dataset()
        spec, files = data, []
    else:
        paths, rows = _shards(tmp_path)  # 3 + 1 + 4 records; the third has no image: a skip to log
        rows[2] = {k: v for k, v in rows[2].items() if k != "image"} | {"conversations": "not a list"}
        if layout == "parquet":
            files = paths
        else:
            files, k = [], 0
            for j, n in enumerate((3, 1, 4)):
                part = [{**r, "image": None} if isinstance(r.get("image"), dict) else r for r in rows[k:k + n]]
                k += n
                f = tmp_path / f"part{j}.{layout}"
                if layout == "jsonl":
                    _write_jsonl(f, part)
                else:
                    f.write_text(json.dumps(part))
                files.append(f)
        spec = [str(f) for f in files]
    with SkipLog(tmp_path / "whole.jsonl") as log:
        whole = _as_rows(read_dataset(spec, skip_log=log))
    for start in range(0, len(whole) + 2):
        with SkipLog(tmp_path / f"from{start}.jsonl") as log:
            got = _as_rows(read_dataset(spec, skip_log=log, start=start))
        assert got == [r for r in whole if r[0] >= start], start
    if len(files) > 1:
        src = open_dataset(spec)
        src.counts()  # taken: the files are still readable
        for f in files[:2]:
            os.chmod(f, 0)
        try:
            if os.access(files[0], os.R_OK):  # root reads anything: make them unparseable instead
                for f in files[:2]:
                    os.chmod(f, 0o644)
                    f.write_bytes(b"garbage")
            with SkipLog(tmp_path / "tail.jsonl") as log:
                got = _as_rows(read_dataset(src, skip_log=log, start=4))
            assert got == [r for r in whole if r[0] >= 4] and got
            with pytest.raises(DatasetError):
                list(read_dataset(src, skip_log=SkipLog(tmp_path / "head.jsonl"), start=3))
        finally:
            for f in files[:2]:
                os.chmod(f, 0o644)
    with pytest.raises(TypeError, match="start must be a record index"):
        list(read_dataset(spec, start=-1))


def test_reading_from_a_start_record_inside_multi_batch_parquet_files(tmp_path, monkeypatch):
    """Files read in several Arrow batches: ``start`` anywhere (first batch, inside a later one, on a
    batch or file boundary) gives the whole read's tail, and a read from 0 still checks the whole."""
    from scalselect_fast.data import parquet

    monkeypatch.setattr(parquet, "PARQUET_BATCH_ROWS", 4)
    paths = []
    for j, n in enumerate((11, 6)):
        rows = [{"id": f"f{j}-{i}", "image": {"bytes": RED, "path": None}, "conversations": _conv(f"q{j}.{i}")}
                for i in range(n)]
        rows[5]["conversations"] = None  # a skip inside the second batch of each file
        paths.append(write_parquet(tmp_path / "d" / f"train-{j:05d}.parquet", rows))
    spec = [str(p) for p in paths]
    with SkipLog(tmp_path / "w.jsonl") as log:
        whole = _as_rows(read_dataset(spec, skip_log=log))
        assert [e["index"] for e in log.entries()] == [5, 16]
    assert [r[0] for r in whole] == [i for i in range(17) if i not in (5, 16)]
    for start in (0, 1, 3, 4, 5, 6, 8, 10, 11, 12, 15, 16, 17):
        with SkipLog(tmp_path / f"s{start}.jsonl") as log:
            assert _as_rows(read_dataset(spec, skip_log=log, start=start)) == [r for r in whole if r[0] >= start]
    bad = write_parquet(tmp_path / "bad" / "x.parquet", [{"id": f"b{i}", "conversations": None, "image": {"bytes": RED, "path": None}}
                                                                  for i in range(9)])
    with pytest.raises(DatasetError, match="all 9 records were skipped"):
        list(read_dataset(str(bad), skip_log=SkipLog(tmp_path / "bad.jsonl")))


def test_sharded_jsonl_lines_are_per_file_and_skips_name_the_file(tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", [{"id": "a0", "conversations": _conv()}, {"id": "a1"}])
    b = _write_jsonl(tmp_path / "b.jsonl", [{"id": "b0", "conversations": _conv()}, {"id": "b1"}])
    with SkipLog(tmp_path / "s.jsonl") as log:
        got = [(s.id, s.index, s.line) for s in read_dataset([str(b), str(a)], skip_log=log)]
    assert got == [("a0", 0, 1), ("b0", 2, 1)]
    assert [(e["id"], e["index"], e["line"], e["file"]) for e in log.entries()] == [
        ("a1", 1, 2, str(a)), ("b1", 3, 2, str(b))]
    with pytest.raises(DatasetError, match=r"a\.jsonl: record 1 \(line 2\) \(id 'a1'\)"):
        list(read_dataset(tmp_path / "*.jsonl"))


def test_duplicate_ids_across_shards(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", [{"id": "x", "conversations": _conv()}, {"id": "dup", "conversations": _conv()}])
    _write_jsonl(tmp_path / "b.jsonl", [{"id": "y", "conversations": _conv()}, {"id": "dup", "conversations": _conv()}])
    with pytest.raises(DatasetError) as ei:
        list(read_dataset(str(tmp_path / "*.jsonl")))
    msg = str(ei.value)
    assert ei.value.reason == "duplicate_id" and "\n" not in msg
    assert "record 1 (line 2) of " + str(tmp_path / "a.jsonl") in msg and "b.jsonl" in msg


def test_bad_sharded_inputs_one_line_errors(tmp_path):
    with pytest.raises(DatasetError, match="glob matches no dataset file") as ei:
        list(read_dataset(str(tmp_path / "nothing-*.parquet")))
    assert ei.value.reason == "io"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="directory matches no dataset file"):
        count_records(tmp_path / "empty")
    # mixed containers
    _write_jsonl(tmp_path / "mix" / "a.jsonl", [{"id": "a", "conversations": _conv()}])
    write_parquet(tmp_path / "mix" / "b.parquet", [{"id": "b", "conversations": _conv()}])
    with pytest.raises(DatasetError, match="mixes containers") as ei:
        count_records(tmp_path / "mix")
    assert ei.value.reason == "format"
    # shards with different schemas
    write_parquet(tmp_path / "sch" / "a.parquet", [{"id": "a", "conversations": _conv()}])
    write_parquet(tmp_path / "sch" / "b.parquet", [{"id": 1, "conversations": _conv(), "extra": 1.5}])
    for call in (lambda: count_records(tmp_path / "sch"), lambda: list(read_dataset(tmp_path / "sch"))):
        with pytest.raises(DatasetError, match="different schemas") as ei:
            call()
        msg = str(ei.value)
        assert "columns only in the second: ['extra']" in msg and "column 'id' is string vs int64" in msg
        assert "\n" not in msg


def test_fingerprint_covers_every_file(tmp_path):
    paths, _ = _shards(tmp_path)
    glob = str(tmp_path / "data" / "train-*.parquet")
    fp = data_fingerprint(glob, None)
    assert fp == data_fingerprint([str(p) for p in paths[::-1]], None) == data_fingerprint(tmp_path / "data", None)
    rows = pq.read_table(paths[1]).to_pylist()
    rows[0]["conversations"][0]["value"] = "changed"
    write_parquet(paths[1], rows)  # the middle shard only
    assert data_fingerprint(glob, None) != fp
    write_parquet(tmp_path / "data" / "train-00003-of-00003.parquet", rows)
    assert data_fingerprint(glob, None) != data_fingerprint([str(p) for p in paths], None)



def test_fingerprint_sees_a_same_size_edit_in_the_middle_of_a_big_file(tmp_path):
    """Files over 4 MiB are hashed by head and tail only: an embedded image swapped in place for one of
    the same size must still change the fingerprint (the per-shard image check trusts it)."""
    rng = np.random.default_rng(0)
    blobs = [rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes() for _ in range(6)]  # incompressible
    rows = [{"id": f"b{i}", "image": {"bytes": b, "path": None}, "conversations": _conv()}
            for i, b in enumerate(blobs)]
    path = tmp_path / "big.parquet"
    write_parquet(path, rows)
    size = path.stat().st_size
    assert size > 5 << 20
    fp = data_fingerprint(path, None)
    data = bytearray(path.read_bytes())
    at = data.find(blobs[3][:64])
    assert (1 << 20) < at < size - (2 << 20)  # inside the unhashed middle
    data[at + 1000] ^= 0xFF
    st = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a rewrite a moment later
    assert path.stat().st_size == size
    assert data_fingerprint(path, None) != fp

# --------------------------------------------------------------------------------------------------
# streaming JSON: identical to the whole-text parser at every chunk size
# --------------------------------------------------------------------------------------------------
def _stream(path):
    with open(path, "rb") as fh:
        return list(json_list.iter_json_stream(fh, str(path)))


def _whole(path):
    text = json_list._read_text(str(path))
    return [(i, ln, obj) for i, ln, _s, _e, obj in json_list._iter_json_list(text, str(path))]


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 1 << 20])
def test_json_stream_matches_whole_parse(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(json_list._JsonStream, "CHUNK", chunk)
    recs = [{"id": f"r{i}", "n": 12345678 * i, "t": "é\u00e9 \\\" x" * (i % 3), "conversations": _conv()}
            for i in range(9)]
    p = tmp_path / "d.json"
    for text in (json.dumps(recs, indent=2), json.dumps(recs), "\ufeff" + json.dumps(recs, indent=1) + "\n\n",
                 "[]", " [ 1 , 22 ,333]"):
        p.write_text(text, encoding="utf-8")
        assert _stream(p) == _whole(p)


@pytest.mark.parametrize("chunk", [1, 5, 1 << 20])
@pytest.mark.parametrize("text", [
    '[\n  {"id": "a"},\n  {"id": "b",, "x": 1}\n]',      # malformed inside a record
    '[\n  {"id": "a"},\n  {"id": "b"}\n',                # truncated: no closing bracket
    '[\n  {"id": "a"},\n  {"id": "b", "t": "open\n',     # truncated inside a string
    '[{"id": "a"} {"id": "b"}]',                         # missing comma
    '[{"id": "a"}] trailing',                            # extra data
    '{"id": "a"}',                                       # a JSON object, not a list
])
def test_json_stream_errors_match_whole_parse(tmp_path, monkeypatch, chunk, text):
    monkeypatch.setattr(json_list._JsonStream, "CHUNK", chunk)
    p = tmp_path / "d.json"
    p.write_text(text)
    with pytest.raises(DatasetError) as whole:
        _whole(p)
    with pytest.raises(DatasetError) as streamed:
        _stream(p)
    assert str(streamed.value) == str(whole.value)
    assert (streamed.value.index, streamed.value.line) == (whole.value.index, whole.value.line)


# --------------------------------------------------------------------------------------------------
# remote (fsspec memory://)
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def memfs():
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    root = "/scalselect-test"
    if fs.exists(root):
        fs.rm(root, recursive=True)
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_remote_parquet_jsonl_json(tmp_path, memfs):
    fs, root = memfs
    paths, _ = _shards(tmp_path)
    for p in paths:
        fs.pipe(f"{root}/pq/{p.name}", p.read_bytes())
    local = [(s.index, s.id, s.images[0].data) for s in read_dataset(tmp_path / "data")]
    for data in (f"memory://{root}/pq/train-*.parquet", f"memory://{root}/pq",
                 [f"memory://{root}/pq/{p.name}" for p in paths]):
        assert [(s.index, s.id, s.images[0].data) for s in read_dataset(data)] == local
        assert count_records(data) == 8
    assert data_fingerprint(f"memory://{root}/pq", None) == data_fingerprint(tmp_path / "data", None)
    recs = [{"id": f"j{i}", "image": {"bytes": RED, "path": None}, "conversations": _conv()} for i in range(3)]
    texts = {"d.jsonl": "".join(json.dumps({**r, "image": None}) + "\n" for r in recs),
             "d.json": json.dumps([{**r, "image": None} for r in recs], indent=2)}
    for name, text in texts.items():
        fs.pipe(f"{root}/{name}", text.encode())
        (tmp_path / name).write_text(text)
        got = [(s.index, s.id, s.line, s.messages) for s in read_dataset(f"memory://{root}/{name}")]
        assert got == [(s.index, s.id, s.line, s.messages) for s in read_dataset(tmp_path / name)]
        assert len(got) == 3


def test_remote_paths_need_image_root_and_bad_urls_are_one_line(memfs):
    fs, root = memfs
    fs.pipe(f"{root}/p.jsonl", (json.dumps({"id": "a", "image": "x.png", "conversations": _conv()}) + "\n").encode())
    with pytest.raises(DatasetError, match="is remote; pass --image-root"):
        list(read_dataset(f"memory://{root}/p.jsonl"))
    for url, needle in ((f"memory://{root}/missing.json", "no such file"),
                        (f"memory://{root}/nothing-*.json", "glob matches no dataset file"),
                        ("nosuchproto://bucket/x.parquet", "cannot open this URL")):
        with pytest.raises(DatasetError, match=needle) as ei:
            list(read_dataset(url))
        assert "\n" not in str(ei.value) and ei.value.reason == "io"


# --------------------------------------------------------------------------------------------------
# Hugging Face datasets
# --------------------------------------------------------------------------------------------------
def _hf_dataset():
    datasets = pytest.importorskip("datasets")
    rows = {"id": ["h0", "h1", "h2"],
            "image": [{"bytes": RED, "path": None}, {"bytes": BLUE, "path": "blue.png"}, {"bytes": RED, "path": None}],
            "conversations": [_conv(f"q{i}") for i in range(3)]}
    return datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())


def _summary(samples):
    return [(s.index, s.id, s.messages, [i.data for i in s.images]) for s in samples]


def test_hf_dataset_object_disk_and_iterable(tmp_path):
    ds = _hf_dataset()
    want = _summary(read_dataset(write_parquet(tmp_path / "ref.parquet", [
        {"id": f"h{i}", "image": {"bytes": b, "path": None}, "conversations": _conv(f"q{i}")}
        for i, b in enumerate((RED, BLUE, RED))])))
    assert _summary(read_dataset(ds)) == want
    assert count_records(ds) == 3
    ds.save_to_disk(str(tmp_path / "saved"))
    assert open_dataset(tmp_path / "saved").container == "datasets"
    assert _summary(read_dataset(tmp_path / "saved")) == want and count_records(tmp_path / "saved") == 3
    it = ds.to_iterable_dataset()
    assert _summary(read_dataset(it)) == want and count_records(it) == 3
    assert data_fingerprint(ds, None) == data_fingerprint(ds, None)
    from datasets import DatasetDict

    DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))  # one split: that split is read
    assert _summary(read_dataset(tmp_path / "dd")) == want and count_records(tmp_path / "dd") == 3
    DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd2"))
    with pytest.raises(DatasetError, match=r"DatasetDict with splits \['train', 'test'\]; select from one split"):
        count_records(tmp_path / "dd2")


# --------------------------------------------------------------------------------------------------
# end to end: `scalselect run` on an embedded-image Parquet selects what it selects on the LLaVA JSON
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tiny_llava):
    return tiny_llava


def test_plan_names_the_sharded_input(tmp_path, tiny_model, capsys):
    from scalselect_fast import cli

    paths, _ = _shards(tmp_path)
    assert cli.main(["run", "--model", str(tiny_model), "--data", *map(str, paths), "--out", str(tmp_path / "o"),
                     "--plan"]) == 0
    out = capsys.readouterr().out
    assert "N=8 samples" in out and "input=parquet, 3 file(s)" in out
    assert cli.main(["run", "--model", str(tiny_model), "--data", str(tmp_path / "nothing-*.parquet"),
                     "--out", str(tmp_path / "o"), "--plan"]) != 0
    err = capsys.readouterr().err.strip()
    assert "glob matches no dataset file" in err and "\n" not in err and "Traceback" not in err


def test_run_on_embedded_parquet_matches_json(tmp_path, tiny_model):
    import hashlib

    from scalselect_fast import cli
    from scalselect_fast.data.demo import make_demo_dataset

    data_dir = tmp_path / "demo"
    make_demo_dataset(data_dir, n=24, seed=5)
    model = tiny_model
    records = json.loads((data_dir / "demo.json").read_text())
    rows = [{"id": r["id"], "conversations": r["conversations"],
             "image": {"bytes": (data_dir / r["image"]).read_bytes(), "path": None} if r.get("image") else None}
            for r in records]
    rows += [{"id": "null-struct", "conversations": _conv(), "image": {"bytes": None, "path": None}},
             {"id": "corrupt", "conversations": _conv(), "image": {"bytes": b"\x89PNG garbage", "path": None}}]
    emb = write_parquet(tmp_path / "emb" / "train.parquet", rows)
    emb_sha = hashlib.sha256(emb.read_bytes()).hexdigest()

    common = ["--model", str(model), "--budget", "6", "--shard-size", "8", "--batch-size", "4", "--quiet",
              "--no-plan-check"]
    assert cli.main(["run", "--data", str(data_dir / "demo.json"), "--image-root", str(data_dir),
                     "--out", str(tmp_path / "a"), *common]) == 0
    assert cli.main(["run", "--data", str(emb), "--out", str(tmp_path / "b"), *common]) == 0

    want = [r["id"] for r in json.loads((tmp_path / "a" / "selected.json").read_text())]
    got = pq.read_table(tmp_path / "b" / "selected.parquet").column("id").to_pylist()
    assert len(want) == 6 and got == want
    kept = pq.read_table(tmp_path / "b" / "selected.parquet").to_pylist()
    by_id = {r["id"]: r for r in rows}
    assert all(k["image"] == by_id[k["id"]]["image"] for k in kept)  # image bytes kept as they were
    skipped = {json.loads(x)["id"]: json.loads(x)["reason"]
               for x in (tmp_path / "b" / "skipped.jsonl").read_text().splitlines()}
    assert skipped["null-struct"] == "image_empty" and skipped["corrupt"] == "image_corrupt"
    assert hashlib.sha256(emb.read_bytes()).hexdigest() == emb_sha  # the input is never written

    # the Python API on a datasets.Dataset of the same rows: same selection, written as save_to_disk
    datasets = pytest.importorskip("datasets")
    from scalselect_fast.run import make_config, run

    ds = datasets.Dataset.from_parquet(str(emb), cache_dir=str(tmp_path / "hf-cache"))
    run(make_config(model=str(model), data=ds, out=str(tmp_path / "c"), budget="6", shard_size=8, batch_size=4,
                    quiet=True, plan_check=False))
    assert datasets.load_from_disk(str(tmp_path / "c" / "selected"))["id"] == want


# --------------------------------------------------------------------------------------------------
# duplicate ids in constant memory
# --------------------------------------------------------------------------------------------------
def _dups_reference(ids):
    """Slow and obvious: (first index, later index) for every repeat, by later index."""
    first, out = {}, []
    for i, s in enumerate(ids):
        if s in first:
            out.append((first[s], i))
        else:
            first[s] = i
    return out


@pytest.mark.parametrize("buffer", [3, 64, 1 << 16])
def test_id_registry_matches_dict_reference(monkeypatch, buffer):
    import random

    from scalselect_fast.data import ids as ids_mod

    monkeypatch.setattr(ids_mod, "BUFFER", buffer)
    rng = random.Random(buffer)
    seq = [f"id{rng.randrange(10**9)}" for _ in range(5000)]
    for j in (17, 2500, 4999):
        seq[j] = seq[rng.randrange(j)]  # planted repeats, far apart across spills
    with ids_mod.IdRegistry() as reg:
        for i, s in enumerate(seq):
            reg.add(s, i)
        spilled = reg._dir is not None
        assert reg.duplicates(limit=100) == _dups_reference(seq)
        d = reg._dir
    assert spilled == (buffer < 5000) and (d is None or not os.path.exists(d))  # temp files removed
    with ids_mod.IdRegistry() as reg:
        for i in range(1000):
            reg.add(f"u{i}", i)
        assert reg.duplicates() == []


def test_duplicates_found_after_spills_and_before_a_run(tmp_path, monkeypatch):
    from scalselect_fast.data import ids as ids_mod
    from scalselect_fast.data.readers import check_unique_ids

    monkeypatch.setattr(ids_mod, "BUFFER", 4)
    rows = [{"id": f"r{i}", "conversations": _conv()} for i in range(30)]
    rows[27]["id"] = "r3"
    for j, part in enumerate((rows[:10], rows[10:20], rows[20:])):
        write_parquet(tmp_path / "d" / f"p{j}.parquet", part)
        _write_jsonl(tmp_path / "j" / f"p{j}.jsonl", part)
    for data in (tmp_path / "d", tmp_path / "j"):
        for call in (lambda: list(read_dataset(data)), lambda: check_unique_ids(data)):
            with pytest.raises(DatasetError, match=r"p2\.\w+: duplicate id 'r3': record 3 (\(line 4\) )?of "
                                                   r".*p0\.\w+ and record 7") as ei:
                call()
            assert ei.value.index == 27 and ei.value.reason == "duplicate_id"
    rows[27]["id"] = "r27"
    write_parquet(tmp_path / "d" / "p2.parquet", rows[20:])
    _write_jsonl(tmp_path / "j" / "p2.jsonl", rows[20:])
    assert check_unique_ids(tmp_path / "d") == 30 and len(list(read_dataset(tmp_path / "d"))) == 30
    # the id pass also counts every record (ids or not), as the containers' own counters do
    _write_jsonl(tmp_path / "j" / "p3.jsonl", [{"conversations": _conv()}, {"id": None}, {"id": "z"}])
    write_parquet(tmp_path / "n" / "noid.parquet", [{"conversations": _conv()}] * 4)
    for data in (tmp_path / "j", tmp_path / "n"):
        src = open_dataset(data)
        check_unique_ids(src)
        assert src.counts() == open_dataset(data).counts() == ([10, 10, 10, 3] if data.name == "j" else [4])


def test_config_file_data_list_and_url(tmp_path):
    from scalselect_fast.run import RunError, load_config_file, make_config

    (tmp_path / "run.toml").write_text('data = ["a/one.parquet", "/abs/two.parquet", "s3://bucket/x-*.parquet"]\n'
                                       'model = "m"\nout = "o"\n')
    got = load_config_file(tmp_path / "run.toml")["data"]
    assert got == [str(tmp_path / "a/one.parquet"), "/abs/two.parquet", "s3://bucket/x-*.parquet"]
    (tmp_path / "r2.toml").write_text('data = "memory://b/train-*.parquet"\n')
    assert load_config_file(tmp_path / "r2.toml")["data"] == "memory://b/train-*.parquet"
    with pytest.raises(RunError, match="setting data.*is not a path"):
        make_config(model="m", out="o", data=3)


def test_run_record_table_reads_only_the_columns_it_needs(tmp_path):
    """The select stage's pass over the records (ids, sources, quota fields) projects Arrow inputs
    to those columns, and gives what the full records give."""
    from scalselect_fast.data import iter_records, record_source
    from scalselect_fast.run import make_config
    from scalselect_fast.run.stages import _raw_records, _record_table

    rows = [{"id": f"r{i}" if i != 3 else None, "images": [{"bytes": b"\x89PNG" * 50, "path": None}],
             "dataset": ["a", "b", None][i % 3], "lang": ["en", None][i % 2], "conversations": _conv()}
            for i in range(9)]
    for j, part in enumerate((rows[:4], rows[4:])):
        write_parquet(tmp_path / "d" / f"p{j}.parquet", part)
    cfg = make_config(data=str(tmp_path / "d"), model="m", out=str(tmp_path / "out"))
    got = _record_table(cfg, ["lang", "source"])
    full = [r for _i, _l, r in iter_records(str(tmp_path / "d"))]
    assert list(got["ids"]) == [None if r["id"] is None else str(r["id"]) for r in full]
    assert list(got["sources"]) == [record_source(r) for r in full] == ["a", "b", None] * 3
    assert list(got["fields"]["lang"]) == [r["lang"] for r in full]
    assert list(got["fields"]["source"]) == list(got["sources"])
    assert all("images" not in r and "conversations" not in r for r in _raw_records(cfg, ["lang"]))


@pytest.mark.parametrize("collide", [False, True])
def test_locate_ids_matches_a_dict(monkeypatch, collide):
    """locate_ids answers what a dict of every id answers; with every id given the same few digests
    (forced collisions) it still confirms each match by the id itself."""
    from scalselect_fast.data import ids as ids_mod

    if collide:
        monkeypatch.setattr(ids_mod, "_hashes", lambda seq, n: np.array([len(s or "") % 3 for s in seq], np.int64))
    ids = [f"id{i}" if i % 7 else None for i in range(500)]
    wanted = [f"id{i}" for i in range(0, 520, 3)] + ["nope", ""]
    index_of = {sid: i for i, sid in enumerate(ids) if sid is not None}
    got = ids_mod.locate_ids(ids, wanted)
    assert got.tolist() == [index_of.get(w, -1) for w in wanted]
    assert ids_mod.locate_ids([], ["a"]).tolist() == [-1] and ids_mod.locate_ids(["a"], []).tolist() == []


# --------------------------------------------------------------------------------------------------
# the --format values come from the container registry
# --------------------------------------------------------------------------------------------------
def test_formats_list_every_registered_container(monkeypatch):
    from scalselect_fast import data
    from scalselect_fast.data import sources

    assert data.FORMATS == ("auto", "json", "jsonl", "parquet", "datasets", "webdataset")
    extra = sources.Container("toy", iter_records=lambda f: iter(()), count=lambda f: 0)
    monkeypatch.setitem(sources._CONTAINERS, "toy", extra)  # a container registered later is listed too
    assert data.FORMATS[-1] == "toy" and sources.formats() == data.FORMATS
    from scalselect_fast.cli import build_parser

    args = build_parser().parse_args(["run", "--format", "toy"])
    assert args.format == "toy"
