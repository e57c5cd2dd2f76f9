"""Fast paths a fully cached rerun leans on, each against a slow, obvious reference: the JSON list's
record count (one ``json.loads`` of a small file) and its streaming walk (separators and line numbers
taken inline), on well-formed and malformed files, across the stream's chunk boundaries."""
from __future__ import annotations

import json

import pytest

from scalselect_fast.data import json_list
from scalselect_fast.data.sample import DatasetError
from scalselect_fast.data.sources import open_dataset

RECORDS = [{"id": f"r{i}", "image": f"images/{i}.png",
            "conversations": [{"from": "human", "value": "<image>\n" + "x" * (i % 7)},
                              {"from": "gpt", "value": "caf\u00e9 \u4e2d" * (i % 3)}]} for i in range(23)]

TEXTS = {
    "compact": json.dumps(RECORDS),
    "indented": json.dumps(RECORDS, indent=2),
    "bom+crlf": "\ufeff" + json.dumps(RECORDS, indent=1).replace("\n", "\r\n"),
    "odd spacing": "[ \n" + " ,\n\n ".join(json.dumps(r) for r in RECORDS) + "\t\n]\n\n",
    "empty list": "[]",
    "scalars": "[1, 2.5e3, \"x\", null, [], {}]",
}
BAD = {
    "object": '{"id": "a"}',
    "trailing comma": json.dumps(RECORDS[:3])[:-1] + ",]",
    "truncated": json.dumps(RECORDS, indent=2)[:-40],
    "extra data": json.dumps(RECORDS[:2]) + " []",
    "bad utf-8": (json.dumps(RECORDS[:2])[:-1] + ', "\udcff"]'),
    "not a list": "42",
    "missing comma": json.dumps(RECORDS[:2]).replace("}, {", "} {", 1),
}


def _write(tmp_path, name: str, text: str):
    p = tmp_path / "data.json"
    p.write_bytes(text.encode("utf-8", "surrogateescape"))
    return open_dataset(str(p), "json").files[0]


def _walk_reference(path) -> list:
    """The whole-text walk (``_iter_json_list``) the stream is documented to equal."""
    text = open(path, "rb").read().decode("utf-8-sig")
    return [(i, line, obj) for i, line, _s, _e, obj in json_list._iter_json_list(text, str(path))]


def _outcome(fn):
    try:
        return ("ok", fn())
    except DatasetError as e:
        return ("error", str(e), e.reason, e.line)


@pytest.mark.parametrize("chunk", [1 << 20, 64, 7])
@pytest.mark.parametrize("name", sorted(TEXTS))
def test_stream_equals_the_whole_text_walk(tmp_path, monkeypatch, name, chunk):
    monkeypatch.setattr(json_list._JsonStream, "CHUNK", chunk)
    f = _write(tmp_path, name, TEXTS[name])
    with f.open() as fh:
        got = list(json_list.iter_json_stream(fh, f.path))
    assert got == _walk_reference(f.path)


@pytest.mark.parametrize("whole", [True, False])
@pytest.mark.parametrize("name", sorted(TEXTS) + sorted(BAD))
def test_count_equals_counting_the_stream(tmp_path, monkeypatch, name, whole):
    """Counted whole (small file) or walked (``COUNT_WHOLE_BYTES`` = 0): the same count, or the same
    error with the same line, as counting the streaming walk one record at a time."""
    text = TEXTS.get(name, BAD.get(name))
    f = _write(tmp_path, name, text)
    if not whole:
        monkeypatch.setattr(json_list, "COUNT_WHOLE_BYTES", 0)

    def reference():
        with f.open() as fh:
            return sum(1 for _ in json_list.iter_json_stream(fh, f.path))

    want = _outcome(reference)
    assert _outcome(lambda: json_list.count_json_file(f)) == want
    assert (want[0] == "ok") == (name in TEXTS)  # the bad files are refused, the good ones counted
