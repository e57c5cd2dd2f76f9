"""The ``"jsonl"`` container: one JSON record per line (``.jsonl`` / ``.ndjson``), streamed.

Blank lines are skipped; a malformed line stops the read naming its line and column. Counting the
records parses every line, so the counting pass is also the syntax check, before any model work.
:func:`iter_jsonl_lines` also gives the writers each line's bytes. Registers itself with
:mod:`.sources`; what a record means is :mod:`.records`' business.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from .json_list import first_char, too_deep
from .records import ids_of_records
from .sample import DatasetError
from .sources import Container, InputFile, as_input_file, register_container


def iter_jsonl_lines(path: "str | InputFile") -> Iterator[tuple[int, int, int, bytes, Any]]:
    """Yield ``(index, line, byte_offset, raw_line, parsed)`` for every non-blank line, streaming."""
    file = as_input_file(path)
    path = file.path
    with file.open() as fh:
        index, offset = 0, 0
        for lineno, raw in enumerate(fh, start=1):
            start = offset
            offset += len(raw)
            body = raw[3:] if lineno == 1 and raw.startswith(b"\xef\xbb\xbf") else raw
            if not body.strip():
                continue
            try:
                obj = json.loads(body.decode("utf-8"))
            except RecursionError:
                raise too_deep(path, index, lineno) from None
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}: line {lineno}: malformed JSON at column {e.colno}: {e.msg}. "
                                   "Each line must hold one complete JSON object", reason="malformed",
                                   path=path, index=index, line=lineno) from None
            except UnicodeDecodeError as e:
                raise DatasetError(f"{path}: line {lineno} is not valid UTF-8 ({e.reason}); re-encode "
                                   "the file as UTF-8", reason="malformed", path=path, index=index,
                                   line=lineno) from None
            yield index, lineno, start, raw, obj
            index += 1


def _iter_jsonl_file(file: InputFile) -> Iterator[tuple[int, int, Any]]:
    return ((i, ln, obj) for i, ln, _o, _r, obj in iter_jsonl_lines(file))


def _count_jsonl(file: InputFile) -> int:
    # parses every line: the counting pass is also the syntax check, before any extraction work
    return sum(1 for _ in iter_jsonl_lines(file))


register_container(Container(
    "jsonl", iter_records=_iter_jsonl_file, count=_count_jsonl, sniff=lambda head, name: first_char(head) == b"{",
    extensions=(".jsonl", ".ndjson"), ids=ids_of_records(_iter_jsonl_file)))
