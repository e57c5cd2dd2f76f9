"""The Arrow batch front end of the readers (Parquet, ``save_to_disk``, ``datasets.Dataset``).

``read_dataset`` takes the columns a sample needs straight from each Arrow record batch
(``arrow.ArrowPlan``). The slow, obvious reference here is the per-record path: every row of the
same file as ``pyarrow``'s ``to_pylist`` dict, through ``parse_record`` one at a time. Both must give
identical samples (id, images, messages, source, index, line, raw) and skip the same records for the
same reasons, on inputs chosen to hit every branch: multi-image rows, null structs, path-only
structs, empty structs, binary and single-struct image columns, integer and bad ids, unusual role
spellings, null and empty turns, the Cauldron ``texts`` flavour, ShareGPT, LLaVA.
"""
from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import png_bytes

from scalselect_fast.data import EmbeddedImage, read_dataset
from scalselect_fast.data.images import ImageResolver
from scalselect_fast.data.arrow import CHUNK_ROWS, ArrowPlan
from scalselect_fast.native import HAVE_NATIVE
from scalselect_fast.data.records import RecordProblem as _Problem, parse_record, record_id

IMG = pa.struct([("bytes", pa.binary()), ("path", pa.string())])



def _red_png(shade: int) -> bytes:
    """A 3×2 PNG whose red channel is ``shade``: distinct bytes per shade."""
    return png_bytes((shade, 0, 0), (3, 2))


class _Skips:
    def __init__(self):
        self.items = []

    def add(self, sample_id, index, reason, detail="", **extra):
        self.items.append((index, reason))
        return True


def _reference(tables: list[tuple[str, pa.Table]], base: str, id_field: str | None = "id", folder: str = ""):
    """Per record, the row dicts of each file through parse_record: (samples, [(index, reason)]).
    ``id_field=None``: a row without an ``id`` key is ``<folder><file name>#<row in file>``."""
    samples, skips, index = [], [], 0
    resolve = ImageResolver(None, base)
    for name, table in tables:
        for local, row in enumerate(table.to_pylist()):
            try:
                sid = (f"{folder}{name}#{local}" if id_field is None and "id" not in row
                       else record_id(row, id_field or "id"))
                samples.append(parse_record(row, index=index, line=None, resolve=resolve, id_field=id_field or "id",
                                            sample_id=sid, where=name, local=local))
            except _Problem as p:
                skips.append((index, p.reason))
            index += 1
    return samples, skips


def _ours(data, id_field: str | None = "id"):
    log = _Skips()
    return list(read_dataset(data, skip_log=log, id_field=id_field)), log.items


def _turns(*pairs, keys=("from", "value")):
    return [{keys[0]: a, keys[1]: b} for a, b in pairs]


def _llava_rows():
    q, a = "<image>\nWhat is it?", "A red patch."
    two = "<image> and <image>: same?"
    return [
        {"id": "a0", "images": [{"bytes": _red_png(1), "path": None}], "source": "vqa", "dataset": "d",
         "conversations": _turns(("human", q), ("gpt", a))},
        # two images, two placeholders; one named, one not
        {"id": "a1", "images": [{"bytes": _red_png(2), "path": "named.png"}, {"bytes": _red_png(3), "path": None}],
         "source": "", "dataset": "fallback", "conversations": _turns(("human", two), ("gpt", "no"))},
        # images without placeholders: prepended to the first user turn
        {"id": "a2", "images": [{"bytes": _red_png(4), "path": ""}, {"bytes": _red_png(5), "path": None}],
         "source": None, "dataset": None, "conversations": _turns(("system", "be brief"), ("human", "Which?"),
                                                                  ("gpt", "left"))},
        # a path-only struct (an image beside the dataset) and an empty one
        {"id": "a3", "images": [{"bytes": None, "path": "pics/x.jpg"}], "source": "s", "dataset": None,
         "conversations": _turns(("human", q), ("gpt", a))},
        {"id": "a4", "images": [{"bytes": None, "path": None}], "source": "s", "dataset": None,
         "conversations": _turns(("human", q), ("gpt", a))},
        {"id": "a5", "images": [{"bytes": b"", "path": "pics/empty-bytes.jpg"}], "source": "s", "dataset": None,
         "conversations": _turns(("human", q), ("gpt", a))},
        # no images (null and empty list), text only
        {"id": "a6", "images": None, "source": "t", "dataset": None,
         "conversations": _turns(("human", "hi"), ("gpt", "hello"))},
        {"id": "a7", "images": [], "source": "t", "dataset": None,
         "conversations": _turns(("user", "hi"), ("assistant", "yo"))},
        # role spellings the alias table only knows in lower case; unknown role; null text; empty turns
        {"id": "a8", "images": None, "source": "t", "dataset": None,
         "conversations": _turns(("Human", "hi"), ("GPT", "x"))},
        {"id": "a9", "images": None, "source": "t", "dataset": None, "conversations": _turns(("narrator", "hi"))},
        {"id": "a10", "images": None, "source": "t", "dataset": None, "conversations": _turns(("human", None))},
        {"id": "a11", "images": None, "source": "t", "dataset": None, "conversations": []},
        {"id": "a12", "images": None, "source": "t", "dataset": None, "conversations": None},
        # placeholder mismatch; images but no user turn
        {"id": "a13", "images": [{"bytes": _red_png(6), "path": None}], "source": "t", "dataset": None,
         "conversations": _turns(("human", "<image><image>"), ("gpt", "?"))},
        {"id": "a14", "images": [{"bytes": _red_png(7), "path": None}], "source": "t", "dataset": None,
         "conversations": _turns(("gpt", "only an answer"))},
        # bad ids: missing, empty, with a line break
        {"id": None, "images": None, "source": "t", "dataset": None, "conversations": _turns(("human", "hi"))},
        {"id": "", "images": None, "source": "t", "dataset": None, "conversations": _turns(("human", "hi"))},
        {"id": "bad\nid", "images": None, "source": "t", "dataset": None, "conversations": _turns(("human", "hi"))},
    ]


_Q, _A = [("user", "<image>\nWhat is it?"), ("assistant", "A red patch.")], [("user", "hi")]
#: What each row of ``_llava_rows()`` becomes, worked out by hand from the rows: ``(source, messages,
#: images)`` of its sample (``{f}`` is the file's name, ``#{k}`` the row's place in it; a path is
#: relative to the file's folder), or the reason it is skipped. The comparisons with the record path
#: above cannot fail without the native extension (both sides are then the record path); these can.
_LLAVA_OUTCOME = {
    0: ("vqa", _Q, ["{f}#{k}/image0"]),
    1: ("fallback", [("user", "<image> and <image>: same?"), ("assistant", "no")], ["named.png", "{f}#{k}/image1"]),
    2: (None, [("system", "be brief"), ("user", "<image>\n<image>\nWhich?"), ("assistant", "left")],
        ["{f}#{k}/image0", "{f}#{k}/image1"]),
    3: ("s", _Q, ["pics/x.jpg"]),
    4: "image_empty",
    5: ("s", _Q, ["pics/empty-bytes.jpg"]),  # no bytes but a path: an image beside the dataset
    6: ("t", [("user", "hi"), ("assistant", "hello")], []),
    7: ("t", [("user", "hi"), ("assistant", "yo")], []),
    8: ("t", [("user", "hi"), ("assistant", "x")], []),
    9: "invalid_field", 10: "missing_field", 11: "invalid_field", 12: "missing_field",
    13: "image_placeholder_mismatch", 14: "image_placeholder_mismatch",
    15: "missing_field", 16: "invalid_field", 17: "invalid_id",  # the bad ids; by position they are fine:
}
_POSITIONAL_OUTCOME = {**_LLAVA_OUTCOME, **{k: ("t", _A, []) for k in (15, 16, 17)}}


def _expected(files: list[tuple[str, list[int], list[str]]], outcome=_LLAVA_OUTCOME):
    """The samples (as :func:`_outcome` shows them) and skips of files read in order: per file its name,
    the ``_llava_rows()`` numbers of its rows and their ids."""
    samples, skips, index = [], [], 0
    for f, rows, ids in files:
        for k, (row, sid) in enumerate(zip(rows, ids)):
            out = outcome[row]
            if isinstance(out, str):
                skips.append((index, out))
            else:
                source, messages, images = out
                samples.append((sid, index, source, messages, [i.format(f=f, k=k) for i in images]))
            index += 1
    return samples, skips


def _outcome(samples, base) -> list[tuple]:
    """``(id, index, source, [(role, text)], images)`` per sample; an embedded image by its name, a path
    relative to ``base``."""
    base = os.path.realpath(base)
    return [(s.id, s.index, s.source, [(m["role"], m["content"]) for m in s.messages],
             [i.name if isinstance(i, EmbeddedImage) else os.path.relpath(i, base) for i in s.images])
            for s in samples]


_LLAVA = pa.schema([("id", pa.string()), ("images", pa.list_(IMG)), ("source", pa.string()),
                    ("dataset", pa.string()), ("conversations", pa.list_(pa.struct([("from", pa.string()),
                                                                                     ("value", pa.string())])))])


def _write(tmp_path, tables: list[pa.Table], **kw) -> list[tuple[str, pa.Table]]:
    out = []
    for k, t in enumerate(tables):
        name = f"train-{k:05d}-of-{len(tables):05d}.parquet"
        pq.write_table(t, tmp_path / name, **kw)
        out.append((name, t))
    return out


def _check(data, tables, base, id_field="id", folder=""):
    ref, ref_skips = _reference(tables, base, id_field, folder)
    got, skips = _ours(data, id_field)
    assert skips == ref_skips
    assert [s.id for s in got] == [s.id for s in ref]
    for s, r in zip(got, ref):
        assert (s.id, s.images, s.messages, s.source, s.index, s.line) == (r.id, r.images, r.messages, r.source,
                                                                          r.index, r.line)
        assert s.raw == r.raw  # built lazily from the batch: the same dict as to_pylist
        assert s == r
    return got, skips


def test_llava_struct_images_match_the_record_path(tmp_path):
    rows = _llava_rows()
    # shard 0: every odd row; shard 1: the plain rows only (no row needs the record path)
    tables = _write(tmp_path, [pa.Table.from_pylist(rows, schema=_LLAVA),
                               pa.Table.from_pylist([dict(r, id=f"p{r['id']}") for r in rows[:3]], schema=_LLAVA)])
    assert (ArrowPlan.for_schema(_LLAVA, "id") is not None) == HAVE_NATIVE  # the fast path is what is tested
    got, skips = _check(str(tmp_path), tables, str(tmp_path))
    reasons = {r for _, r in skips}
    assert {"image_empty", "invalid_field", "missing_field", "image_placeholder_mismatch", "invalid_id"} <= reasons
    by_id = {s.id: s for s in got}
    assert by_id["a1"].images[0].name == "named.png"
    assert by_id["a1"].images[1].name == "train-00000-of-00002.parquet#1/image1"
    assert by_id["a3"].images == [os.path.realpath(tmp_path / "pics/x.jpg")]
    assert by_id["a8"].messages[0]["role"] == "user"  # went through the record path's alias rule
    assert by_id["a1"].source == "fallback"
    ids = [r["id"] for r in rows]
    assert (_outcome(got, tmp_path), skips) == _expected([("train-00000-of-00002.parquet", range(18), ids),
                                                           ("train-00001-of-00002.parquet", range(3),
                                                            [f"p{i}" for i in ids[:3]])])


def test_rows_without_an_id_column_are_named_by_position(tmp_path):
    """No id column (as the Hub corpora ship): the plain rows are still built natively, named
    ``<file>#<row in file>`` as the record path names them; the other rows keep their skip reasons."""
    schema = pa.schema([f for f in _LLAVA if f.name != "id"])
    rows = [{k: v for k, v in r.items() if k != "id"} for r in _llava_rows()]
    (tmp_path / "vqa").mkdir()  # a subset folder: the ids carry it, the embedded images' names do not
    tables = _write(tmp_path / "vqa", [pa.Table.from_pylist(rows, schema=schema),
                                       pa.Table.from_pylist(rows[:3], schema=schema)], row_group_size=4)
    assert (ArrowPlan.for_schema(schema, "id", positional=True) is not None) == HAVE_NATIVE
    assert ArrowPlan.for_schema(schema, "id") is None  # a named id column is required
    got, skips = _check(str(tmp_path), tables, str(tmp_path / "vqa"), id_field=None, folder="vqa/")
    assert got[0].id == "vqa/train-00000-of-00002.parquet#0" and got[-1].id == "vqa/train-00001-of-00002.parquet#2"
    assert {r for _, r in skips} >= {"image_empty", "missing_field"}
    names = [f"train-{k:05d}-of-00002.parquet" for k in range(2)]
    assert (_outcome(got, tmp_path / "vqa"), skips) == _expected(
        [(names[0], range(18), [f"vqa/{names[0]}#{k}" for k in range(18)]),
         (names[1], range(3), [f"vqa/{names[1]}#{k}" for k in range(3)])], _POSITIONAL_OUTCOME)


@pytest.mark.parametrize("odd", ["image", "turn"])
def test_null_struct_in_a_batch_and_small_row_groups(tmp_path, odd):
    rows = _llava_rows()[:8]
    if odd == "image":
        rows[5] = dict(rows[5], images=[None, {"bytes": _red_png(9), "path": None}])  # a null struct element
    else:
        rows[6] = dict(rows[6], conversations=[None, {"from": "human", "value": "hi"}])  # a null turn
    tables = _write(tmp_path, [pa.Table.from_pylist(rows, schema=_LLAVA)], row_group_size=3)
    got, skips = _check(str(tmp_path), tables, str(tmp_path))
    # a null image among two: two images for one placeholder; a null turn: not an object
    odd_row = {5: "image_placeholder_mismatch"} if odd == "image" else {6: "invalid_field"}
    assert (_outcome(got, tmp_path), skips) == _expected(
        [("train-00000-of-00001.parquet", range(8), [r["id"] for r in rows])], {**_LLAVA_OUTCOME, **odd_row})


def test_sharegpt_binary_column_and_int_ids(tmp_path):
    msg = pa.struct([("role", pa.string()), ("content", pa.string())])
    schema = pa.schema([("id", pa.int64()), ("image", pa.binary()), ("task", pa.string()), ("messages", pa.list_(msg))])
    rows = [{"id": 1, "image": _red_png(1), "task": "ocr", "messages": _turns(("user", "<image>read"), ("assistant", "A"),
                                                                          keys=("role", "content"))},
            {"id": 2, "image": None, "task": "chat", "messages": _turns(("user", "hi"), keys=("role", "content"))},
            {"id": 3, "image": b"", "task": "ocr", "messages": _turns(("user", "x"), keys=("role", "content"))},
            {"id": None, "image": _red_png(2), "task": "ocr", "messages": _turns(("user", "x"), keys=("role", "content"))},
            {"id": 5, "image": _red_png(3), "task": None, "messages": _turns(("bot", "first"), ("user", "then"),
                                                                          keys=("role", "content"))}]
    assert (ArrowPlan.for_schema(schema, "id") is not None) == HAVE_NATIVE
    tables = _write(tmp_path, [pa.Table.from_pylist(rows, schema=schema)])
    got, skips = _check(str(tmp_path), tables, str(tmp_path))
    assert [s.id for s in got] == ["1", "2", "5"] and [r for _, r in skips] == ["image_empty", "missing_field"]
    f = "train-00000-of-00001.parquet"
    assert (_outcome(got, tmp_path), skips) == (
        [("1", 0, "ocr", [("user", "<image>read"), ("assistant", "A")], [f"{f}#0/image0"]),
         ("2", 1, "chat", [("user", "hi")], []),
         ("5", 4, None, [("assistant", "first"), ("user", "<image>\nthen")], [f"{f}#4/image0"])],
        [(2, "image_empty"), (3, "missing_field")])


def test_single_struct_image_column(tmp_path):
    schema = pa.schema([("id", pa.string()), ("image", IMG), ("conversations", _LLAVA.field("conversations").type)])
    rows = [{"id": "x", "image": {"bytes": _red_png(1), "path": "a.png"}, "conversations": _turns(("human", "q"))},
            {"id": "y", "image": None, "conversations": _turns(("human", "q"))},
            {"id": "z", "image": {"bytes": None, "path": None}, "conversations": _turns(("human", "q"))}]
    tables = _write(tmp_path, [pa.Table.from_pylist(rows, schema=schema)])
    got, skips = _check(str(tmp_path), tables, str(tmp_path))
    assert (_outcome(got, tmp_path), skips) == ([("x", 0, None, [("user", "<image>\nq")], ["a.png"]),
                                                 ("y", 1, None, [("user", "q")], [])], [(2, "image_empty")])


def test_cauldron_texts_and_path_lists_take_the_record_path(tmp_path):
    texts = pa.list_(pa.struct([("user", pa.string()), ("assistant", pa.string()), ("source", pa.string())]))
    schema = pa.schema([("id", pa.string()), ("images", pa.list_(IMG)), ("texts", texts)])
    rows = [{"id": "c0", "images": [{"bytes": _red_png(1), "path": None}, {"bytes": _red_png(2), "path": None}],
             "texts": [{"user": "Compare.", "assistant": "Same.", "source": "cauldron/x"},
                       {"user": "Sure?", "assistant": None, "source": None}]},
            {"id": "c1", "images": [], "texts": [{"user": "Hi", "assistant": "Yo", "source": None}]}]
    assert ArrowPlan.for_schema(schema, "id") is None
    d1 = tmp_path / "cauldron"
    d1.mkdir()
    got, skips = _check(str(d1), _write(d1, [pa.Table.from_pylist(rows, schema=schema)]), str(d1))
    f = "train-00000-of-00001.parquet"
    assert (_outcome(got, d1), skips) == (
        [("c0", 0, "cauldron/x", [("user", "<image>\n<image>\nCompare."), ("assistant", "Same."), ("user", "Sure?")],
          [f"{f}#0/image0", f"{f}#0/image1"]),
         ("c1", 1, None, [("user", "Hi"), ("assistant", "Yo")], [])], [])
    paths = pa.schema([("id", pa.string()), ("images", pa.list_(pa.string())),
                       ("conversations", _LLAVA.field("conversations").type)])
    assert ArrowPlan.for_schema(paths, "id") is None
    d2 = tmp_path / "paths"
    d2.mkdir()
    rows = [{"id": "p0", "images": ["a.jpg", "b.jpg"], "conversations": _turns(("human", "<image><image>"))}]
    got, skips = _check(str(d2), _write(d2, [pa.Table.from_pylist(rows, schema=paths)]), str(d2))
    assert (_outcome(got, d2), skips) == ([("p0", 0, None, [("user", "<image><image>")], ["a.jpg", "b.jpg"])], [])


def test_datasets_object_and_save_to_disk_match_the_record_path(tmp_path):
    datasets = pytest.importorskip("datasets")
    table = pa.Table.from_pylist(_llava_rows(), schema=_LLAVA)
    ds = datasets.Dataset(table)
    # a Dataset object: its file is a pseudo one named after the object, relative to the cwd
    pseudo = f"<datasets.Dataset ({table.num_rows} rows)>"
    ids = [r["id"] for r in _llava_rows()]
    got, skips = _check(ds, [(pseudo, table)], os.getcwd())
    assert (_outcome(got, os.getcwd()), skips) == _expected([(pseudo, range(18), ids)])
    ds.save_to_disk(str(tmp_path / "hf"))
    got, skips = _check(str(tmp_path / "hf"), [("hf", table)], str(tmp_path))  # paths relative to the folder holding it
    assert (_outcome(got, tmp_path), skips) == _expected([("hf", range(18), ids)])
    sliced = table.slice(2, 9)  # batches that are slices: list offsets not starting at 0
    assert sliced.column("conversations").chunk(0).offsets[0].as_py() > 0
    _check(datasets.Dataset(sliced), [(f"<datasets.Dataset ({sliced.num_rows} rows)>", sliced)], os.getcwd())
    view = ds.select([3, 0, 1])  # an indices mapping: batches through with_format("arrow")
    _check(view, [("<datasets.Dataset (3 rows)>", table.take([3, 0, 1]))], os.getcwd())


def test_duplicate_ids_across_shards_are_found_on_the_batch_path(tmp_path):
    from scalselect_fast.data import DatasetError

    rows = _llava_rows()[:3]
    _write(tmp_path, [pa.Table.from_pylist(rows, schema=_LLAVA), pa.Table.from_pylist(rows[1:2], schema=_LLAVA)])
    with pytest.raises(DatasetError, match="duplicate id 'a1'") as e:
        list(read_dataset(str(tmp_path)))
    assert e.value.reason == "duplicate_id" and e.value.index == 3


def test_null_image_list_that_owns_child_elements(tmp_path):
    """A null list row may still own a range of the child array (Arrow allows it); its images are
    none at all, and the next rows' images stay theirs."""
    structs = pa.array([{"bytes": _red_png(k), "path": None} for k in range(3)], type=IMG)
    images = pa.ListArray.from_arrays(pa.array([0, 1, 2, 3], pa.int32()), structs,
                                      mask=pa.array([False, True, False]))
    conv = pa.array([_turns(("human", "<image> a")), _turns(("human", "no image")), _turns(("human", "<image> c"))],
                    type=_LLAVA.field("conversations").type)
    table = pa.table({"id": ["n0", "n1", "n2"], "images": images, "conversations": conv})
    assert table.column("images").to_pylist()[1] is None
    datasets = pytest.importorskip("datasets")
    got, _ = _check(datasets.Dataset(table), [("<datasets.Dataset (3 rows)>", table)], os.getcwd())
    assert [len(s.images) for s in got] == [1, 0, 1] and got[2].images[0].data == _red_png(2)


def _many_rows(n: int, seed: int) -> list[dict]:
    """n rows mixing plain ones with every kind the native side leaves to the record path."""
    import random

    rng = random.Random(seed)
    plain, odd = _llava_rows()[:3], _llava_rows()[3:]
    out = []
    for i in range(n):
        base = rng.choice(odd) if rng.random() < 0.15 else rng.choice(plain)
        out.append(dict(base, id=f"r{i}" if base["id"] not in (None, "", "bad\nid") else base["id"],
                        source=rng.choice(["vqa", "", None, "ocr"])))
    return out


def _many_expected(rows: list[dict], f: str):
    """:func:`_expected` for :func:`_many_rows`: each row is one of ``_llava_rows()`` (found by its
    images, turns and, for the bad ones, id) under a new id and source; its source is the new one, or
    the row's ``dataset`` where the new one is empty."""
    def key(r):
        return repr((r["images"], r["conversations"], r["id"] if r["id"] in (None, "", "bad\nid") else True))

    which = {key(b): k for k, b in enumerate(_llava_rows())}
    samples, skips = [], []
    for i, r in enumerate(rows):
        out = _LLAVA_OUTCOME[which[key(r)]]
        if isinstance(out, str):
            skips.append((i, out))
        else:
            samples.append((r["id"], i, r["source"] or r["dataset"], out[1], [x.format(f=f, k=i) for x in out[2]]))
    return samples, skips


def test_batches_longer_than_a_chunk_with_odd_rows_anywhere(tmp_path):
    """Rows are built CHUNK_ROWS at a time: plain and odd rows on both sides of every chunk edge keep
    their order, indices, names and skips."""
    rows = _many_rows(3 * CHUNK_ROWS + 17, seed=1)
    tables = _write(tmp_path, [pa.Table.from_pylist(rows, schema=_LLAVA)], row_group_size=1000)
    got, skips = _check(str(tmp_path), tables, str(tmp_path))
    assert len(got) + len(skips) == len(rows) and len(skips) > 10
    assert (_outcome(got, tmp_path), skips) == _many_expected(rows, tables[0][0])


def test_large_types_and_several_source_fields(tmp_path):
    """64-bit offsets (large_string / large_binary / large_list) and a source taken from the first
    of several fields."""
    img = pa.struct([("bytes", pa.large_binary()), ("path", pa.large_string())])
    turn = pa.struct([("from", pa.large_string()), ("value", pa.large_string())])
    schema = pa.schema([("id", pa.large_string()), ("images", pa.large_list(img)), ("source", pa.large_string()),
                        ("dataset", pa.large_string()), ("conversations", pa.large_list(turn))])
    rows = _many_rows(60, seed=2)
    tables = _write(tmp_path, [pa.Table.from_pylist(rows, schema=schema)])
    if HAVE_NATIVE:
        plan = ArrowPlan.for_schema(schema, "id")
        assert plan is not None and plan.large["text"] and plan.large["turns"] and plan.large["bytes"]
    got, skips = _check(str(tmp_path), tables, str(tmp_path))
    assert (_outcome(got, tmp_path), skips) == _many_expected(rows, tables[0][0])


@pytest.mark.skipif(not HAVE_NATIVE, reason="the native extension is not in use")
def test_native_builder_refuses_buffers_that_do_not_fit():
    """The native side reads raw Arrow buffers: lengths and offsets that point outside them are a
    ValueError, never a read past the end."""
    from scalselect_fast.data.arrow import _bits, _list, _strings
    from scalselect_fast.data.records import ROLE_ALIASES as _ROLE_ALIASES
    from scalselect_fast.data.sample import IMAGE_TOKEN, EmbeddedImage, Sample
    from scalselect_fast.native import arrow_samples
    from scalselect_fast.data import arrow as arrow_mod

    table = pa.Table.from_pylist(_llava_rows()[:3], schema=_LLAVA)
    batch = table.to_batches()[0]
    conv = batch.column("conversations")
    turns = conv.values

    def spec(**over):
        s = {"n": 3, "index": 0, "local": 0, "where": "f", "token": IMAGE_TOKEN, "user": "user",
             "aliases": _ROLE_ALIASES, "sample_cls": Sample, "sample_slots": arrow_mod._SAMPLE_SLOTS,
             "image_cls": EmbeddedImage, "image_slots": arrow_mod._IMAGE_SLOTS, "raw": None,
             "turns": _list(conv, False), "turn_valid": _bits(turns),
             "roles": _strings(turns.field("from"), False), "texts": _strings(turns.field("value"), False),
             "ids": _strings(batch.column("id"), False)}
        s.update(over)
        return s

    out, others, _ = arrow_samples(spec(), 0, 3)  # no image column given: a0, a1's placeholders have no image
    assert others == [0, 1] and out[:2] == [None, None] and out[2].id == "a2"
    v, o, d, off, n, _ = _strings(turns.field("value"), False)
    with pytest.raises(ValueError, match="offsets"):
        arrow_samples(spec(texts=(v, o, d[:5], off, n, False)), 0, 3)  # values cut short
    with pytest.raises(ValueError, match="offsets buffer too short"):
        arrow_samples(spec(texts=(v, o, d, off, n, True)), 0, 3)  # int32 offsets read as int64
    with pytest.raises(ValueError, match="wrong length"):
        arrow_samples(spec(n=4), 0, 3)
    with pytest.raises(ValueError, match="start, stop"):
        arrow_samples(spec(), 2, 5)
    with pytest.raises(TypeError, match="slot"):
        arrow_samples(spec(sample_slots=arrow_mod._IMAGE_SLOTS * 3 + (arrow_mod._IMAGE_SLOTS[0],)), 0, 3)


def test_placeholder_counting_in_the_bytes_matches_str_count(tmp_path):
    """The native side counts ``<image>`` in the UTF-8 bytes; around multi-byte characters, partial
    and nested spellings it must count what ``str.count`` counts on the decoded text."""
    texts = ["\u00e9<image>x", "<<image>>", "<imag<image>", "<image><image>", "\u4e2d\u6587<image\u00e9>",
             "<image", "image>", "\U0001F600<image>\U0001F600<image>"]
    rows = []
    for i, t in enumerate(texts):
        n = t.count("<image>")
        rows.append({"id": f"t{i}", "images": [{"bytes": _red_png(i), "path": None}] * max(n, 1), "source": None,
                     "dataset": None, "conversations": _turns(("human", t), ("gpt", "ok"))})
    tables = _write(tmp_path, [pa.Table.from_pylist(rows, schema=_LLAVA)])
    got, skips = _check(str(tmp_path), tables, str(tmp_path))
    # one image and no placeholder: prepended; the rest match their counts
    assert [s.id for s in got] == [f"t{i}" for i in range(len(texts))] and skips == []
    assert got[6].messages[0]["content"] == "<image>\nimage>"


@pytest.mark.parametrize("seed", range(4))
def test_random_rows_match_the_record_path(tmp_path, seed):
    """Rows drawn at random (ids, role spellings, texts with and without placeholders, image lists
    with nulls, empty bytes and paths, sources), in batches that are slices of several row groups:
    the native builder and the record path give the same samples and the same skips."""
    import random

    rng = random.Random(seed)
    roles = ["human", "gpt", "user", "assistant", "system", "Human", "GPT", "bot", "narrator", None]
    texts = ["<image>\nq", "plain", "<image><image> two", "", "\u00e9t\u00e9 <image>", None, "<imag"]

    def image():
        r = rng.random()
        if r < 0.08:
            return None
        if r < 0.16:
            return {"bytes": b"", "path": rng.choice([None, "p.png", ""])}
        if r < 0.22:
            return {"bytes": None, "path": rng.choice([None, "beside.png"])}
        return {"bytes": _red_png(rng.randrange(9)), "path": rng.choice([None, None, "", f"n{rng.randrange(5)}.png"])}

    rows = []
    for i in range(300):
        n_turns = rng.choice([0, 1, 2, 2, 3])
        turns = None if rng.random() < 0.03 else [
            None if rng.random() < 0.02 else {"from": rng.choice(roles), "value": rng.choice(texts)}
            for _ in range(n_turns)]
        imgs = None if rng.random() < 0.1 else [image() for _ in range(rng.choice([0, 1, 1, 1, 2]))]
        rows.append({"id": rng.choice([f"x{i}", f"x{i}", f"x{i}", "", None, f"bad\r{i}"]), "images": imgs,
                     "source": rng.choice(["vqa", "", None]), "dataset": rng.choice(["d", None]),
                     "conversations": turns})
    tables = _write(tmp_path, [pa.Table.from_pylist(rows[:170], schema=_LLAVA),
                               pa.Table.from_pylist(rows[170:], schema=_LLAVA)], row_group_size=37)
    got, skips = _check(str(tmp_path), tables, str(tmp_path))
    assert got and skips  # both paths were exercised


def _sourced_rows(n: int) -> list[dict]:
    """Rows whose sources differ by field: ``dataset`` (strings, some empty or null), ``task``
    (integers), and the first folder of the first image's path (some without a folder, a path or
    any image)."""
    paths = ["coco/train/a.png", "ocr_vqa/b.png", "flat.png", None, "./vg/c.png"]
    out = []
    for i in range(n):
        k = i % 7
        images = ([] if k == 5 else None if k == 6
                  else [{"bytes": _red_png(i % 250 + 1), "path": paths[i % len(paths)]},
                        {"bytes": _red_png(3), "path": "gqa/second.png"}][:1 + i % 2])
        q = " ".join(["<image>"] * len(images or [])) + " What?"
        out.append({"id": f"s{i}", "images": images, "dataset": ["vqa", "", None, "ocr"][i % 4], "task": i % 3,
                    "conversations": _turns(("human", q.strip()), ("gpt", "yes"))})
    return out


@pytest.mark.parametrize("source_field", [None, "dataset", "task", "no_such_field", "image_folder"])
@pytest.mark.parametrize("layout", ["image_list", "one_image", "json"])
def test_sample_source_follows_the_source_field(tmp_path, source_field, layout):
    """``read_dataset(..., source_field=)`` gives each sample the source the run's record table
    counts it under (``record_source(record, source_field)``), on the native Arrow path (a list of
    image structs, or one struct) and the record path alike."""
    import json

    from scalselect_fast.data import record_source

    rows = _sourced_rows(3 * CHUNK_ROWS + 5)
    if layout == "one_image":
        rows = [dict(r, images=(r["images"] or [None])[0]) for r in rows]
    if layout == "json":
        for r in rows:  # image paths only (existence is checked at decode time, not here)
            r["images"] = [im["path"] or "x.png" for im in r["images"] or []]
        data = tmp_path / "data.json"
        data.write_text(json.dumps(rows))
    else:
        data = tmp_path / "data.parquet"
        pq.write_table(pa.Table.from_pylist(rows), data, row_group_size=100)
        plan = ArrowPlan.for_schema(pq.read_schema(data), "id", source_field=source_field)
        assert (plan is not None) == HAVE_NATIVE  # the fast path is what is tested where it exists
    got = list(read_dataset(str(data), skip_log=_Skips(), source_field=source_field))
    assert len(got) > len(rows) // 2
    want = [record_source(rows[s.index], source_field) for s in got]
    assert [s.source for s in got] == want
    assert len(set(want)) > 1 or source_field == "no_such_field"
