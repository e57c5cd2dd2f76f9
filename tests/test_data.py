"""Tests for scalselect_fast.data: readers, image-root confinement, errors, images, skip log, writers, demo."""
from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest
from conftest import png_file, write_parquet
from PIL import Image

from scalselect_fast.data import (IMAGE_TOKEN, DatasetError, ImageError, SkipLog, count_records,
                                  detect_format, load_image, read_dataset)


# --------------------------------------------------------------------------------------------------
# helpers: tiny datasets written by hand, read back by an obvious reference
# --------------------------------------------------------------------------------------------------
def _llava_records():
    return [
        {"id": "a1", "image": "img/a.png", "source": "caption",
         "conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                           {"from": "gpt", "value": "A red square."}]},
        {"id": 7, "image": ["img/a.png", "img/b.png"], "dataset": "vqa", "extra": {"k": [1, 2.5, None]},
         "conversations": [{"from": "system", "value": "Be brief."},
                           {"from": "human", "value": "<image> and <image>: same colour?"},
                           {"from": "gpt", "value": "No."},
                           {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes \u00e9\u4e2d"}]},
        {"id": "t3", "conversations": [{"from": "human", "value": "Text only question"},
                                       {"from": "gpt", "value": "Text only answer"}]},
        {"id": "noph", "image": "img/b.png", "task": "count",
         "conversations": [{"from": "human", "value": "How many?"}, {"from": "gpt", "value": "2"}]},
    ]


def _sharegpt_records():
    return [
        {"id": "s1", "images": ["img/a.png"], "source": "sg",
         "messages": [{"role": "user", "content": "<image>What is it?"},
                      {"role": "assistant", "content": "A square."}]},
        {"id": "s2", "images": ["img/b.png"],
         "messages": [{"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "image"},
                                                   {"type": "text", "text": " colour?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}]},
        {"id": "s3",
         "messages": [{"role": "user", "content": [{"type": "image", "image": "img/a.png"},
                                                   {"type": "text", "text": "and"},
                                                   {"type": "image_url", "image_url": {"url": "img/b.png"}}]},
                      {"role": "assistant", "content": "ok"}]},
    ]


@pytest.fixture
def root(tmp_path):
    png_file(tmp_path / "img" / "a.png")
    png_file(tmp_path / "img" / "b.png", colour=(10, 10, 240))
    return tmp_path


def _write_json(path, records, indent=2):
    path.write_text(json.dumps(records, indent=indent, ensure_ascii=False), encoding="utf-8")
    return path


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _expected_llava(root):
    a, b = str(root / "img" / "a.png"), str(root / "img" / "b.png")
    return [
        ("a1", [a], [("user", "<image>\nDescribe the image."), ("assistant", "A red square.")], "caption"),
        ("7", [a, b], [("system", "Be brief."), ("user", "<image> and <image>: same colour?"),
                       ("assistant", "No."), ("user", "Sure?"), ("assistant", "Yes \u00e9\u4e2d")], "vqa"),
        ("t3", [], [("user", "Text only question"), ("assistant", "Text only answer")], None),
        # no placeholder in the text: one is prepended to the first user turn (LLaVA convention)
        ("noph", [b], [("user", "<image>\nHow many?"), ("assistant", "2")], "count"),
    ]


def _expected_sharegpt(root):
    a, b = str(root / "img" / "a.png"), str(root / "img" / "b.png")
    return [
        ("s1", [a], [("user", "<image>What is it?"), ("assistant", "A square.")], "sg"),
        ("s2", [b], [("user", "Look: <image> colour?"), ("assistant", "Blue.")], None),
        ("s3", [a, b], [("user", "<image>and<image>"), ("assistant", "ok")], None),
    ]


def _summary(samples):
    return [(s.id, s.images, [(m["role"], m["content"]) for m in s.messages], s.source) for s in samples]


# --------------------------------------------------------------------------------------------------
# readers
# --------------------------------------------------------------------------------------------------
WRITERS = {"json": _write_json, "jsonl": _write_jsonl, "parquet": write_parquet}


@pytest.mark.parametrize("container", ["json", "jsonl", "parquet"])
@pytest.mark.parametrize("flavour", ["llava", "sharegpt"])
def test_readers_all_formats(root, container, flavour):
    records = _llava_records() if flavour == "llava" else _sharegpt_records()
    expected = _expected_llava(root) if flavour == "llava" else _expected_sharegpt(root)
    if container == "parquet" and flavour == "sharegpt":
        # Parquet needs one type per column: content as strings only for this flavour.
        records = [records[0], {**records[0], "id": "s1b"}]
        expected = [expected[0], ("s1b",) + expected[0][1:]]
    if container == "parquet" and flavour == "llava":
        records = [dict(r, id=str(r["id"]), image=r.get("image") if isinstance(r.get("image"), list) else
                        ([r["image"]] if r.get("image") else None)) for r in records]
        records = [{k: v for k, v in r.items() if k != "extra"} for r in records]
    path = WRITERS[container](root / f"data.{container}", records)
    assert detect_format(path) == container
    samples = list(read_dataset(path, image_root=root))
    assert _summary(samples) == expected
    assert [s.index for s in samples] == list(range(len(records)))
    assert count_records(path) == len(records)
    raws = pq.read_table(path).to_pylist() if container == "parquet" else records
    for s, r in zip(samples, raws):
        assert s.raw == r  # untouched original
        # placeholder rule: one <image> per image, in order
        assert sum(m["content"].count(IMAGE_TOKEN) for m in s.messages) == len(s.images)
        assert all(os.path.isabs(p) for p in s.images)
    if container == "json":
        text = path.read_text().splitlines()
        for s in samples:  # `line` points at the record's opening brace
            assert text[s.line - 1].strip() == "{"
    elif container == "jsonl":
        assert [s.line for s in samples] == list(range(1, len(records) + 1))
    else:
        assert all(s.line is None for s in samples)


def test_to_chat_parts(root):
    path = _write_json(root / "d.json", _llava_records())
    s = list(read_dataset(path, image_root=root))[1]
    chat = s.to_chat()
    assert chat[1] == {"role": "user", "content": [
        {"type": "image", "path": s.images[0]}, {"type": "text", "text": " and "},
        {"type": "image", "path": s.images[1]}, {"type": "text", "text": ": same colour?"}]}


def test_relative_paths_without_root_use_dataset_dir(root):
    sub = root / "sub"
    sub.mkdir()
    path = _write_jsonl(sub / "d.jsonl", [{"id": "x", "image": "../img/a.png",
                                          "conversations": [{"from": "human", "value": "<image>hi"}]}])
    (s,) = read_dataset(path)
    assert s.images == [str(root / "img" / "a.png")]


def test_format_sniffed_not_extension(root):
    path = _write_jsonl(root / "misnamed.json", _llava_records())
    assert detect_format(path) == "jsonl"
    assert len(list(read_dataset(path, image_root=root))) == 4


def test_jsonl_blank_lines_and_crlf(root):
    recs = _llava_records()[:2]
    body = json.dumps(recs[0]) + "\r\n\n   \n" + json.dumps(recs[1]) + "\r\n"
    path = root / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    samples = list(read_dataset(path, image_root=root))
    assert [(s.id, s.index, s.line) for s in samples] == [("a1", 0, 1), ("7", 1, 4)]
    assert count_records(path) == 2


def test_jsonl_is_streamed(root):
    # A malformed line far down does not stop the first samples from arriving.
    recs = [dict(_llava_records()[0], id=f"r{i}") for i in range(5)]
    path = root / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + "{not json\n")
    it = read_dataset(path, image_root=root)
    assert next(it).id == "r0"
    with pytest.raises(DatasetError, match=r"line 6"):
        list(it)


# --------------------------------------------------------------------------------------------------
# image-root confinement
# --------------------------------------------------------------------------------------------------
def _one(image):
    return [{"id": "x", "image": image, "conversations": [{"from": "human", "value": "<image>hi"}]}]


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_image_root_escape_refused(tmp_path, kind):
    root = tmp_path / "root"
    outside = png_file(tmp_path / "outside" / "secret.png")
    png_file(root / "ok.png")
    if kind == "dotdot":
        image = "../outside/secret.png"
    elif kind == "absolute":
        image = str(outside)
    else:
        os.symlink(outside, root / "link.png")
        image = "link.png"
    path = _write_json(tmp_path / "d.json", _one(image))
    with pytest.raises(DatasetError, match=r"outside --image-root") as ei:
        list(read_dataset(path, image_root=root))
    msg = str(ei.value)
    assert str(path) in msg and "record 0 (line 2)" in msg and "'x'" in msg
    assert ei.value.reason == "image_outside_root"
    # with a skip log: the sample is skipped and logged, the others still read
    path = _write_json(tmp_path / "d.json", _one(image) + [dict(_one("ok.png")[0], id="y")])
    with SkipLog(tmp_path / "skipped.jsonl") as log:
        assert [s.id for s in read_dataset(path, image_root=root, skip_log=log)] == ["y"]
    (entry,) = [json.loads(x) for x in (tmp_path / "skipped.jsonl").read_text().splitlines()]
    assert entry["id"] == "x" and entry["index"] == 0 and entry["reason"] == "image_outside_root"
    assert "outside --image-root" in entry["detail"]


def test_image_root_inside_paths_allowed(tmp_path):
    root = tmp_path / "root"
    png_file(root / "a" / "x.png")
    os.symlink(root / "a" / "x.png", root / "inner_link.png")
    recs = [dict(_one(p)[0], id=str(i)) for i, p in
            enumerate(["a/../a/x.png", str(root / "a" / "x.png"), "inner_link.png"])]
    path = _write_json(tmp_path / "d.json", recs)
    assert [s.images for s in read_dataset(path, image_root=root)] == [[str(root / "a" / "x.png")]] * 3


def test_image_root_must_exist(tmp_path):
    path = _write_json(tmp_path / "d.json", _one("a.png"))
    with pytest.raises(DatasetError, match="not an existing directory"):
        list(read_dataset(path, image_root=tmp_path / "nope"))


# --------------------------------------------------------------------------------------------------
# error cases
# --------------------------------------------------------------------------------------------------
def test_malformed_json_names_line(tmp_path):
    path = tmp_path / "d.json"
    good = json.dumps(_llava_records()[:2], indent=2)
    path.write_text(good[:-1].rstrip() + ",\n  {\"id\": \"b\", \"conversations\": [}\n]")
    bad_line = path.read_text().splitlines().index('  {"id": "b", "conversations": [}') + 1
    with pytest.raises(DatasetError) as ei:
        list(read_dataset(path))
    assert f"line {bad_line} " in str(ei.value) and str(path) in str(ei.value) and "record 2" in str(ei.value)
    assert ei.value.reason == "malformed" and ei.value.line == bad_line


def test_truncated_json_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(_llava_records(), indent=1)[:-30])
    with pytest.raises(DatasetError, match=r"malformed JSON at line \d+"):
        list(read_dataset(path))


def test_json_top_level_object(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": _llava_records()}, indent=2))
    # a .json file holding one object (not JSONL: its first line is not a whole value): the same error
    with pytest.raises(DatasetError, match=r"top level is a JSON object"):
        list(read_dataset(path))
    with pytest.raises(DatasetError, match=r"top level is a JSON object"):
        list(read_dataset(path, format="json"))


def test_malformed_jsonl_line(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(r) for r in _llava_records()]
    lines[2] = lines[2][:-5]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=rf"{path}: line 3: malformed JSON at column \d+") as ei:
        list(read_dataset(path))
    assert ei.value.line == 3


@pytest.mark.parametrize("field,record,needle", [
    ("id", {"conversations": [{"from": "human", "value": "hi"}]}, "missing required field 'id'"),
    ("conversations", {"id": "q"}, "missing required field 'conversations'"),
    ("value", {"id": "q", "conversations": [{"from": "human"}]}, "conversations[0] has no 'value'"),
    ("from", {"id": "q", "conversations": [{"value": "hi"}]}, "conversations[0] has no 'from'"),
    ("role", {"id": "q", "conversations": [{"from": "robot", "value": "hi"}]}, "unknown role 'robot'"),
    ("placeholder", {"id": "q", "image": "a.png",
                     "conversations": [{"from": "human", "value": "<image><image>x"}]}, "2 '<image>' placeholder"),
    ("url", {"id": "q", "image": "http://x/a.png",
             "conversations": [{"from": "human", "value": "<image>x"}]}, "is a URL"),
])
def test_missing_or_invalid_fields(tmp_path, field, record, needle):
    recs = [_llava_records()[2], record]
    path = _write_jsonl(tmp_path / "d.jsonl", recs)
    kw = {"id_field": "id"} if field == "id" else {}  # a named id field is required (else: the position)
    with pytest.raises(DatasetError) as ei:
        list(read_dataset(path, image_root=tmp_path, **kw))
    msg = str(ei.value)
    assert needle in msg and str(path) in msg and "record 1 (line 2)" in msg, msg
    # skip mode: logged with the same detail, other samples kept
    log = SkipLog(tmp_path / "skipped.jsonl")
    assert [s.id for s in read_dataset(path, image_root=tmp_path, skip_log=log, **kw)] == ["t3"]
    (entry,) = log.entries()
    assert entry["index"] == 1 and needle in entry["detail"] and entry["line"] == 2
    log.close()


def test_record_without_an_id_field_is_named_by_its_position(tmp_path):
    """No ``id`` key: ``<file>#<row in file>``; an ``id`` that is there but null is still refused."""
    recs = [_llava_records()[2], {"conversations": [{"from": "human", "value": "hi"}]},
            {"id": None, "conversations": [{"from": "human", "value": "hi"}]}]
    (tmp_path / "data" / "sub").mkdir(parents=True)
    path = _write_jsonl(tmp_path / "data" / "sub" / "d.jsonl", recs)
    log = SkipLog(tmp_path / "skipped.jsonl")
    assert [s.id for s in read_dataset(path, image_root=tmp_path, skip_log=log)] == ["t3", "d.jsonl#1"]
    assert [(e["index"], e["reason"]) for e in log.entries()] == [(2, "missing_field")]
    log.close()
    # the name is relative to the folder --data named, so a directory input keeps the subfolder
    assert [s.id for s in read_dataset(path.parent, image_root=tmp_path, skip_log=SkipLog(tmp_path / "s2"))] \
        == ["t3", "d.jsonl#1"]
    assert [s.id for s in read_dataset(tmp_path / "data", image_root=tmp_path, skip_log=SkipLog(tmp_path / "s3"))] \
        == ["t3", "sub/d.jsonl#1"]


def test_duplicate_ids_both_positions(tmp_path):
    recs = _llava_records()
    recs[3] = dict(recs[3], id="a1")
    for container in ("json", "jsonl", "parquet"):
        rr = recs if container != "parquet" else [
            {"id": str(r["id"]), "conversations": r["conversations"]} for r in recs]
        path = WRITERS[container](tmp_path / f"d.{container}", rr)
        with pytest.raises(DatasetError) as ei:
            list(read_dataset(path, image_root=tmp_path, skip_log=SkipLog(tmp_path / "s.jsonl")))
        msg = str(ei.value)
        assert "duplicate id 'a1'" in msg and "record 0" in msg and "record 3" in msg, msg
        if container == "jsonl":
            assert "record 0 (line 1) and record 3 (line 4)" in msg


def test_integer_and_string_id_collide(tmp_path):
    recs = [dict(_llava_records()[2], id=5), dict(_llava_records()[2], id="5")]
    with pytest.raises(DatasetError, match="duplicate id '5'"):
        list(read_dataset(_write_jsonl(tmp_path / "d.jsonl", recs)))


@pytest.mark.parametrize("content", ["", "[]", "\n\n"])
def test_empty_dataset(tmp_path, content):
    path = tmp_path / ("d.json" if content == "[]" else "d.jsonl")
    path.write_text(content)
    with pytest.raises(DatasetError, match="empty") as ei:
        list(read_dataset(path))
    assert ei.value.reason == "empty"
    assert count_records(path) == 0


def test_record_helpers_match_samples(root):
    from scalselect_fast.data import record_id_or_none, record_source

    path = _write_json(root / "d.json", _llava_records())
    samples = list(read_dataset(path, image_root=root))
    assert [record_id_or_none(s.raw) for s in samples] == [s.id for s in samples]
    assert [record_source(s.raw) for s in samples] == [s.source for s in samples]
    assert record_id_or_none({"id": 1.5}) is None and record_id_or_none({"x": 1}) is None
    assert record_source({"source": "", "dataset": 3}) == "3" and record_source([1]) is None


@pytest.mark.parametrize("record, folder", [
    ({"image": "coco/train2017/000000033471.jpg"}, "coco"),      # LLaVA-665K
    ({"image": "./ocr_vqa/images/1.jpg"}, "ocr_vqa"),
    ({"image": "/data/vg/VG_100K/2.jpg"}, "data"),              # as written: the first folder of the path
    ({"images": ["gqa/images/3.jpg", "coco/x.jpg"]}, "gqa"),    # the first image decides
    ({"images": None, "image": "textvqa/train_images/4.jpg"}, "textvqa"),
    ({"image": {"bytes": b"\x89PNG", "path": "vg/5.png"}}, "vg"),  # a Hugging Face Image struct
    ({"image": "6.jpg"}, None),                                 # no folder
    ({"image": {"bytes": b"\x89PNG", "path": None}}, None),     # embedded, unnamed
    ({"conversations": []}, None),                              # text-only
    ({"images": []}, None),
])
def test_record_source_image_folder(record, folder):
    from scalselect_fast.data.records import IMAGE_FOLDER, record_source

    assert record_source({"id": "r", "source": "ignored", **record}, IMAGE_FOLDER) == folder


def test_record_source_named_field():
    from scalselect_fast.data import record_source

    rec = {"source": "a", "data_source": "b", "split": 7, "flag": True}
    assert record_source(rec) == "a"  # the default: the first of SOURCE_FIELDS
    assert record_source(rec, "data_source") == "b" and record_source(rec, "split") == "7"
    assert record_source(rec, "flag") is None and record_source(rec, "absent") is None


def test_all_records_skipped_is_empty(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"id": "a"}, {"id": "b"}])
    log = SkipLog(tmp_path / "skipped.jsonl")
    # the message names the reasons and the first skipped record, not only where the log is
    with pytest.raises(DatasetError) as ei:
        list(read_dataset(path, skip_log=log))
    msg = str(ei.value)
    # the reason, how many, one example record, and where every one is listed
    assert msg.startswith(f"dataset {str(path)!r}: all 2 records were skipped, nothing to select: missing_field: 2 "
                          "(e.g. record 0 (line 1) of "), msg
    assert "id 'a': missing required field 'conversations'" in msg and msg.endswith(f"listed in {log.path}")
    assert "\n" not in msg and len(log) == 2


def test_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="cannot open dataset"):
        list(read_dataset(tmp_path / "nope.json"))


# --------------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------------
def test_load_image_ok_and_rgb(tmp_path):
    p = tmp_path / "p.png"
    Image.new("P", (5, 4), 3).save(p)
    im = load_image(p)
    assert im.mode == "RGB" and im.size == (5, 4)


def test_load_image_missing(tmp_path):
    with pytest.raises(ImageError, match="does not exist") as ei:
        load_image(tmp_path / "nope.png")
    assert ei.value.reason == "image_missing" and ei.value.path == str(tmp_path / "nope.png")


def test_load_image_corrupt(tmp_path):
    p = tmp_path / "c.png"
    p.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ImageError, match="corrupt") as ei:
        load_image(p)
    assert ei.value.reason == "image_corrupt" and str(p) in str(ei.value)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_load_image_truncated(tmp_path, fmt):
    import numpy as np

    p = tmp_path / f"t.{fmt.lower()}"
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(p, format=fmt)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    Image.open(p).close()  # the header still parses: only full decoding can tell
    with pytest.raises(ImageError) as ei:
        load_image(p)
    assert ei.value.reason == "image_truncated" and str(p) in str(ei.value)


def test_load_image_directory(tmp_path):
    with pytest.raises(ImageError) as ei:
        load_image(tmp_path)
    assert ei.value.reason == "image_unreadable"


# --------------------------------------------------------------------------------------------------
# skip log
# --------------------------------------------------------------------------------------------------
def test_skiplog_resume_no_duplicates(tmp_path):
    path = tmp_path / "out" / "skipped.jsonl"
    with SkipLog(path) as log:
        assert log.add("a", 0, "image_missing", "gone")
        assert log.add("b", 3, "text_only", "no image", stage="extract")
        assert not log.add("a", 0, "image_missing", "gone again")
    # a crash mid-write leaves a torn last line
    with open(path, "ab") as fh:
        fh.write(b'{"id": "c", "ind')
    log = SkipLog(path)
    assert [e["id"] for e in log.entries()] == ["a", "b"]
    assert ("a", 0, "image_missing") in log and ("b", 3) in log and ("c", 4) not in log
    assert not log.add("b", 3, "text_only", "no image")
    assert log.add("c", 4, "image_corrupt", "bad")
    assert log.counts() == {"image_missing": 1, "text_only": 1, "image_corrupt": 1}
    log.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(e["id"], e["index"], e["reason"]) for e in lines] == [
        ("a", 0, "image_missing"), ("b", 3, "text_only"), ("c", 4, "image_corrupt")]
    assert lines[1]["stage"] == "extract"


def test_skiplog_lines_visible_before_close(tmp_path):
    path = tmp_path / "skipped.jsonl"
    log = SkipLog(path)
    log.add("a", 0, "r", "d")
    assert json.loads(path.read_text())["id"] == "a"  # already on disk: nothing buffered
    log.close()


# --------------------------------------------------------------------------------------------------
# writers: read -> write subset -> read back == subset, fields and bytes preserved
# --------------------------------------------------------------------------------------------------
def _many(n=9):
    recs = []
    for i in range(n):
        r = {"id": f"r{i}", "image": "img/a.png" if i % 3 else "img/b.png", "score_hint": i * 0.1,
             "source": ["caption", "vqa"][i % 2],
             "conversations": [{"from": "human", "value": f"<image>\nq{i} \u00e9"},
                               {"from": "gpt", "value": f"a{i}"}]}
        recs.append(r)
    return recs


def _raw_json_spans(text):
    """Reference: each record's exact text, found by an independent bracket-depth scan."""
    spans, depth, start, in_str, esc = [], 0, None, False, False
    for i, ch in enumerate(text):
        if in_str:
            esc = (ch == "\\") and not esc
            if ch == '"' and not esc:
                in_str = False
            continue
        if ch == '"':
            in_str, esc = True, False
        elif ch == "{":
            if depth == 1:
                start = i
            depth += 1
        elif ch == "[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 1 and ch == "}":
                spans.append(text[start:i + 1])
    return spans


@pytest.mark.parametrize("container", ["json", "jsonl", "parquet"])
@pytest.mark.parametrize("order", ["original", "score"])
def test_write_selected_round_trip(root, container, order):
    from scalselect_fast.data import write_selected

    recs = _many()
    # odd spacing/escapes that a re-serialisation would change: must survive verbatim
    if container == "json":
        path = root / "d.json"
        path.write_text(json.dumps(recs, indent=4).replace('"a7"', '"\\u0061\\u0037"').replace("0.2", "2e-1"))
    else:
        path = WRITERS[container](root / f"d.{container}", recs)
    originals = {s.id: s for s in read_dataset(path, image_root=root)}
    ranked = ["r7", "r2", "r4", "r0"]
    keep = ranked if order == "score" else set(ranked)
    out = root / "out" / f"sel.{container}"
    before = path.read_bytes()
    assert write_selected(path, out, keep, order=order) == 4
    assert path.read_bytes() == before  # input untouched
    assert detect_format(out) == container
    back = list(read_dataset(out, image_root=root))
    want = ranked if order == "score" else ["r0", "r2", "r4", "r7"]
    assert [s.id for s in back] == want
    for s in back:
        o = originals[s.id]
        assert (s.raw, s.images, s.messages, s.source) == (o.raw, o.images, o.messages, o.source)
    if container == "json":
        src_spans = dict(zip([f"r{i}" for i in range(9)], _raw_json_spans(path.read_text())))
        assert _raw_json_spans(out.read_text()) == [src_spans[i] for i in want]
        assert out.read_text().startswith("[\n    {")  # the input's indentation
    elif container == "jsonl":
        src_lines = path.read_bytes().splitlines(keepends=True)
        assert out.read_bytes() == b"".join(src_lines[int(i[1:])] for i in want)
    else:
        assert pq.read_schema(out) == pq.read_schema(path)
        assert pq.read_schema(out).metadata == pq.read_schema(path).metadata
    assert os.listdir(out.parent) == [out.name]  # no temp files left


def test_write_selected_compact_json_and_empty_and_single(root):
    from scalselect_fast.data import write_selected

    recs = _many(3)
    path = root / "c.json"
    path.write_text(json.dumps(recs))  # compact: ", " separators, no newlines
    write_selected(path, root / "o.json", ["r2", "r0"], order="score")
    assert (root / "o.json").read_text() == "[" + ", ".join(json.dumps(recs[i]) for i in (2, 0)) + "]"
    # a ranked list with order="original" keeps the input order
    write_selected(path, root / "orig.json", ["r2", "r0"], order="original")
    assert (root / "orig.json").read_text() == "[" + ", ".join(json.dumps(recs[i]) for i in (0, 2)) + "]"
    write_selected(path, root / "e.json", set())
    assert json.loads((root / "e.json").read_text()) == []
    one = root / "one.json"
    one.write_text(json.dumps(recs[:1], indent=2) + "\n")
    write_selected(one, root / "o1.json", {"r0"})
    assert (root / "o1.json").read_text() == one.read_text()


def test_write_selected_json_jsonl_conversion(root):
    from scalselect_fast.data import write_selected

    recs = _many(5)
    path = _write_json(root / "d.json", recs)
    write_selected(path, root / "o.jsonl", {"r1", "r3"}, format="jsonl")
    assert [json.loads(x) for x in (root / "o.jsonl").read_text().splitlines()] == [recs[1], recs[3]]
    path2 = _write_jsonl(root / "d.jsonl", recs)
    write_selected(path2, root / "o.json", ["r3", "r1"], order="score", format="json")
    assert json.loads((root / "o.json").read_text()) == [recs[3], recs[1]]
    with pytest.raises(ValueError, match="Parquet stays Parquet"):
        write_selected(path, root / "o.parquet", {"r1"}, format="parquet")


def test_write_selected_errors(root):
    from scalselect_fast.data import write_selected

    path = _write_jsonl(root / "d.jsonl", _many(4))
    out = root / "sel.jsonl"
    with pytest.raises(DatasetError, match=r"1 selected id\(s\) are not in .*'nope'"):
        write_selected(path, out, {"r1", "nope"})
    assert not out.exists() and sorted(os.listdir(root)) == ["d.jsonl", "img"]  # nothing half-written
    with pytest.raises(ValueError, match="refusing to overwrite the input"):
        write_selected(path, path, {"r1"})
    with pytest.raises(ValueError, match="not a set"):
        write_selected(path, out, {"r1"}, order="score")
    with pytest.raises(ValueError, match="twice"):
        write_selected(path, out, ["r1", "r1"])
    dup = _write_jsonl(root / "dup.jsonl", _many(2) + [_many(2)[1]])
    with pytest.raises(DatasetError, match="duplicate id 'r1'"):
        write_selected(dup, out, {"r0"})
    assert not out.exists()


def test_write_selected_parquet_integer_ids(root):
    from scalselect_fast.data import write_selected

    recs = [{"id": i, "image": ["img/a.png"],
             "conversations": [{"from": "human", "value": "<image>x"}]} for i in range(6)]
    path = write_parquet(root / "d.parquet", recs)
    write_selected(path, root / "o.parquet", ["4", "1"], order="score")
    t = pq.read_table(root / "o.parquet")
    assert t.column("id").to_pylist() == [4, 1] and t.schema == pq.read_schema(path)


# --------------------------------------------------------------------------------------------------
# demo dataset
# --------------------------------------------------------------------------------------------------
def _tree_bytes(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_demo_deterministic_and_seed_sensitive(tmp_path):
    from scalselect_fast.data.demo import make_demo_dataset

    t1 = make_demo_dataset(tmp_path / "a", n=60, seed=3)
    t2 = make_demo_dataset(tmp_path / "b", n=60, seed=3)
    assert t1 == t2 and _tree_bytes(tmp_path / "a") == _tree_bytes(tmp_path / "b")
    make_demo_dataset(tmp_path / "c", n=60, seed=4)
    assert _tree_bytes(tmp_path / "a") != _tree_bytes(tmp_path / "c")


def test_demo_structure_matches_truth(tmp_path):
    import numpy as np

    from scalselect_fast.data.demo import DEMO_DATA, make_demo_dataset

    truth = make_demo_dataset(tmp_path, n=80, seed=1)
    log = SkipLog(tmp_path / "skipped.jsonl")
    samples = {s.id: s for s in read_dataset(tmp_path / DEMO_DATA, image_root=tmp_path, skip_log=log)}
    assert len(samples) == 80 and len(log) == 0
    assert sum(truth["counts"].values()) == 80 and len(truth["duplicates"]) == 8
    pixels = {i: np.asarray(load_image(s.images[0]), dtype=np.int16) for i, s in samples.items() if s.images}
    for dup, orig in truth["duplicates"].items():
        assert dup != orig
        assert samples[dup].messages == samples[orig].messages
        diff = np.abs(pixels[dup] - pixels[orig])
        assert 0 < diff.max() <= 3  # near-, not exact, duplicates
    # non-duplicates are not near-identical: the planted pairs are the only ones
    others = [i for i in pixels if i not in truth["duplicates"]]
    for a_i, a in enumerate(others):
        for b in others[a_i + 1:]:
            assert np.abs(pixels[a] - pixels[b]).max() > 3, (a, b)
    assert {samples[i].source for i in truth["rare"]} == {"chart"} and len(truth["rare"]) == 8
    assert sum(s.source == "chart" for s in samples.values()) == 8
    assert all(not samples[i].images for i in truth["text_only"]) and len(truth["text_only"]) == 2
    assert sum(not s.images for s in samples.values()) == 2
    flat = [i for g in truth["duplicate_groups"] for i in g[1:]]
    assert sorted(flat) == sorted(truth["duplicates"])


def test_bundled_demo_is_the_default_generation(tmp_path):
    import numpy as np

    from scalselect_fast.data.demo import DEMO_DATA, DEMO_DIR, DEMO_TRUTH, make_demo_dataset

    make_demo_dataset(tmp_path)
    assert (tmp_path / DEMO_DATA).read_text() == (DEMO_DIR / DEMO_DATA).read_text()
    assert (tmp_path / DEMO_TRUTH).read_text() == (DEMO_DIR / DEMO_TRUTH).read_text()
    fresh = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert fresh == sorted(p.name for p in (DEMO_DIR / "images").iterdir())
    for name in fresh:  # pixels, not PNG bytes: zlib builds may encode differently
        assert np.array_equal(np.asarray(Image.open(tmp_path / "images" / name)),
                              np.asarray(Image.open(DEMO_DIR / "images" / name))), name
    total = sum(p.stat().st_size for p in DEMO_DIR.rglob("*") if p.is_file())
    assert total < 2_000_000


@pytest.mark.parametrize("container", ["json", "jsonl", "parquet"])
def test_write_selected_disk_full_leaves_no_partial_output(root, container):
    """A write that runs out of space (file-size limit in a child process) keeps the old output."""
    import subprocess
    import sys

    recs = _many(300)
    path = WRITERS[container](root / f"d.{container}", recs)
    out = root / "out" / f"sel.{container}"
    out.parent.mkdir()
    out.write_bytes(b"previous complete output")
    script = (
        "import resource, signal, sys\n"
        "from scalselect_fast.data import write_selected\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"  # get EFBIG instead of being killed
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "try:\n"
        f"    write_selected({str(path)!r}, {str(out)!r}, {{f'r{{i}}' for i in range(0, 300, 2)}})\n"
        "except OSError as e:\n"
        "    print('OSError', e.errno); sys.exit(0)\n"
        "sys.exit('write unexpectedly succeeded')\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0 and "OSError" in res.stdout, res.stdout + res.stderr
    assert out.read_bytes() == b"previous complete output"
    assert os.listdir(out.parent) == [out.name]  # temp file removed


def test_write_selected_output_folder_is_a_file(root):
    from scalselect_fast.data import write_selected

    path = _write_jsonl(root / "d.jsonl", _many(3))
    (root / "blocker").write_text("x")
    with pytest.raises(ValueError, match=r"'.*blocker' is a file, not a folder"):
        write_selected(path, root / "blocker" / "sub" / "sel.jsonl", {"r1"})
    with pytest.raises(ValueError, match="is a directory"):
        write_selected(path, root, {"r1"})


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores folder permissions")
def test_write_selected_output_folder_not_writable(root):
    from scalselect_fast.data import write_selected

    path = _write_jsonl(root / "d.jsonl", _many(3))
    ro = root / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="not writable"):
            write_selected(path, ro / "sel.jsonl", {"r1"})
    finally:
        ro.chmod(0o700)


def test_image_resolver_matches_realpath_reference(tmp_path):
    """The cached resolver agrees with plain os.path.realpath on a tree full of links and dots."""
    from scalselect_fast.data.images import ImageResolver

    root = tmp_path / "root"
    png_file(root / "a" / "x.png")
    png_file(tmp_path / "elsewhere" / "y.png")
    os.symlink(root / "a", root / "dirlink")
    os.symlink(tmp_path / "elsewhere", root / "outdir")
    os.symlink(root / "a" / "x.png", root / "a" / "filelink.png")
    os.symlink("../a/x.png", root / "a" / "rel_link.png")
    os.symlink(tmp_path / "elsewhere" / "y.png", root / "a" / "outlink.png")
    paths = ["a/x.png", "dirlink/x.png", "dirlink/filelink.png", "a/rel_link.png", "a/./x.png", "a//x.png",
             "a/../a/x.png", "a/missing.png", "dirlink/../a/x.png", "outdir/y.png", "a/outlink.png",
             "../elsewhere/y.png", str(root / "a" / "x.png"), "a/x.png/..", "a/", "."]
    res = ImageResolver(None, str(root))
    for _ in range(2):  # second pass: served from the directory cache
        for p in paths:
            assert res(p) == os.path.realpath(os.path.join(root, p)), p
    confined = ImageResolver(os.path.realpath(root), "/unused")
    for p in paths:
        ref = os.path.realpath(os.path.join(root, p))
        inside = ref == os.path.realpath(root) or ref.startswith(os.path.realpath(root) + os.sep)
        if inside:
            assert confined(p) == ref, p
        else:
            with pytest.raises(ValueError, match="outside --image-root"):
                confined(p)
