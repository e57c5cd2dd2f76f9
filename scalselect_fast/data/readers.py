"""Dataset readers: records of any container (JSON list, JSONL, Parquet, ...) into :class:`Sample`.

Containers, inputs and flavours are independent:

* **input**: a file, directory, glob, list, URL or ``datasets`` object, resolved by
  :func:`~.sources.open_source` into sorted files with global record numbers.
* **container** (``format``): ``"json"`` (one JSON list of records, streamed through a bounded
  window), ``"jsonl"`` (one record per line), ``"parquet"`` (row batches); more are registered by
  their modules (:mod:`.hf`, :mod:`.webdataset`). ``"auto"`` sniffs each file's first bytes
  (``PAR1`` magic, ``[`` or ``{``), so a misnamed extension does not matter.
* **flavour**, decided per record: ``conversations`` (``from``/``value`` turns) is LLaVA;
  ``messages`` (``role``/``content`` turns, content a string or a list of
  ``{"type": "text"|"image"|"image_url", ...}`` parts) is ShareGPT; ``texts``
  (``[{"user", "assistant", "source"?}]``, images before the first user turn) is the Cauldron /
  FineVision. Any of them carries images as ``image`` (one, or a list) or ``images`` (a list), each a
  path, encoded bytes, or a Hugging Face ``Image`` struct ``{"bytes", "path"}`` (bytes become an
  :class:`EmbeddedImage`; a struct with only a path is a path; with neither, the sample is skipped
  with ``image_empty``).

What stops the read and what skips one sample
---------------------------------------------
Fatal (:class:`DatasetError` raised, nothing more is yielded): the file is missing or unreadable,
malformed JSON or a malformed JSONL line (file, line and column in the message), a top level that
is not a list of records, two records with the same id (both positions; raised after the last
record, see below), an empty dataset (no records, or every record skipped), a nonexistent
``image_root``, and for several files: a glob that matches nothing, mixed containers, Parquet
shards with different schemas.

Per sample (the sample is not yielded): a missing or invalid required field (an ``id`` that is
there but null, empty or not a string/integer, or missing when ``id_field`` names it; a record with
no ``id`` field at all gets its positional id, see :class:`IdRule`; ``conversations``/``messages``,
a turn's role or text), an image path that escapes ``image_root``
or is not a local path, placeholders that cannot be matched to images. With a ``skip_log`` these are
written to it (one line each, never silently) and reading continues; without one they raise
:class:`DatasetError` naming the record, the field and the fix. Missing/corrupt image *files* are
not detected here (reading would have to decode every image): :func:`load_image` raises
:class:`ImageError` for them when the pixels are needed.

Arrow containers (Parquet, ``save_to_disk``, ``datasets.Dataset``) are read a record batch at a
time: :class:`~.arrow.ArrowPlan` (decided once per schema) builds the plain rows' samples from whole
columns with the same rules; the rows it does not cover go through :func:`parse_record` on their row
dict. ``Sample.raw`` of a plain row is built on first access (:class:`~.sample.LazyRow`).

Memory: every container is streamed (a JSON list too: a bounded text window, see
:class:`_JsonStream`), and duplicate ids are found with constant memory (:mod:`.ids`: 16 bytes per
record spilled to temporary files, checked when the last record has been read), so reading 10M
records needs no memory proportional to N.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import Any

from .ids import IdRegistry
from .images import ImagePathError, ImageResolver, resolve_root
from .sample import (IMAGE_TOKEN, REASON_IMAGE_EMPTY, REASON_INVALID_FIELD, REASON_INVALID_ID, REASON_MISSING_FIELD,
                     REASON_PLACEHOLDER_MISMATCH, DatasetError, EmbeddedImage, Sample, UnusableRecord,
                     _where)
from .sources import (NO_ID_FIELD, Container, DataSource, InputFile, check_data_argument, containers, open_source,
                      register_container, sniff_container)

#: the built-in containers (more may be registered: see :mod:`.sources`)
FORMATS = ("auto", "json", "jsonl", "parquet")

#: Record fields tried, in order, for ``Sample.source``.
SOURCE_FIELDS = ("source", "dataset", "data_source", "task", "task_type", "category")

_ROLE_ALIASES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "bot": "assistant", "model": "assistant",
    "chatgpt": "assistant",
    "system": "system",
}
_WS = re.compile(r"[ \t\n\r]*")
PARQUET_BATCH_ROWS = 1024


# --------------------------------------------------------------------------------------------------
# containers
# --------------------------------------------------------------------------------------------------
def detect_format(path: str | os.PathLike) -> str:
    """Return the container of ``path`` (a file, directory, glob, URL or list): ``"json"``, ``"jsonl"``,
    ``"parquet"`` or another registered container, from the files' first bytes."""
    check_data_argument(path, "detect_format: path")
    return open_source(path).container


def _container(path: str, format: str) -> str:
    if format != "auto" and format not in containers():
        raise ValueError(f"format must be one of {('auto', *containers())}, got {format!r}")
    return detect_format(path) if format == "auto" else format


def _iter_json_list(text: str, path: str) -> Iterator[tuple[int, int, int, int, Any]]:
    """Yield ``(index, line, start, end)`` spans and the parsed value of each element of a JSON list.

    Parsing element by element (``raw_decode``) instead of ``json.loads`` keeps each record's exact
    source text available to the writer and gives every record its line number.
    """
    dec = json.JSONDecoder()
    pos = _WS.match(text, 0).end()
    if pos < len(text) and text[pos] == "{":
        raise DatasetError(f"{path}: the top level is a JSON object; expected a list of records "
                           "(LLaVA JSON) or one record per line (JSONL)", reason="malformed", path=path)
    if pos >= len(text) or text[pos] != "[":
        raise DatasetError(f"{path}: expected a JSON list of records", reason="malformed", path=path)
    pos = _WS.match(text, pos + 1).end()
    line, counted_to = 1, 0
    index = 0
    if pos < len(text) and text[pos] == "]":
        end_list = pos + 1
    else:
        while True:
            try:
                obj, end = dec.raw_decode(text, pos)
            except RecursionError:
                raise _too_deep(path, index) from None
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}: malformed JSON at line {e.lineno} column {e.colno} (record "
                                   f"{index}): {e.msg}. Fix the file (e.g. check it with "
                                   "`python -m json.tool`)", reason="malformed", path=path, index=index,
                                   line=e.lineno) from None
            line += text.count("\n", counted_to, pos)
            counted_to = pos
            yield index, line, pos, end, obj
            index += 1
            pos = _WS.match(text, end).end()
            if pos < len(text) and text[pos] == ",":
                pos = _WS.match(text, pos + 1).end()
                continue
            if pos < len(text) and text[pos] == "]":
                end_list = pos + 1
                break
            ln = text.count("\n", 0, pos) + 1
            raise DatasetError(f"{path}: malformed JSON at line {ln}: expected ',' or ']' after record "
                               f"{index - 1}" + ("" if pos < len(text) else " (file ends early: truncated?)"),
                               reason="malformed", path=path, index=index - 1, line=ln)
    rest = _WS.match(text, end_list).end()
    if rest != len(text):
        ln = text.count("\n", 0, rest) + 1
        raise DatasetError(f"{path}: malformed JSON at line {ln}: extra data after the closing ']'",
                           reason="malformed", path=path, line=ln)


class _JsonStream:
    """Incremental, bounded-memory walk over a JSON list of records read from a binary file.

    Holds a text window of the file: ``buf`` starts at line ``buf_line``, column ``buf_col`` (0-based)
    of the file. Records are decoded by the C ``json`` decoder (``raw_decode``) inside the window;
    a record cut by the window's end is retried after reading the next chunk, so memory is the
    chunk size plus the largest record, whatever the number of records. Line and column numbers
    (and the messages) are exactly those of parsing the whole text at once.
    """

    CHUNK = 1 << 20

    def __init__(self, fh, path: str):
        import codecs

        self.fh, self.path = fh, path
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.buf = ""
        self.eof = False
        self.buf_line, self.buf_col = 1, 0
        self.cnt_pos, self.cnt_line = 0, 1  # line number at window position cnt_pos
        self.bytes_read = 0

    def more(self) -> bool:
        """Append the next chunk to the window; False at end of file."""
        if self.eof:
            return False
        chunk = self.fh.read(self.CHUNK)
        try:
            text = self.decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as e:
            ln = self.buf_line + self.buf.count("\n") + chunk.count(b"\n", 0, max(e.start, 0))
            raise DatasetError(f"{self.path}: line {ln} is not valid UTF-8 (byte "
                               f"{self.bytes_read + max(e.start, 0)}); re-encode the file as UTF-8",
                               reason="malformed", path=self.path, line=ln) from None
        self.bytes_read += len(chunk)
        if not chunk:
            self.eof = True
        self.buf += text
        return bool(chunk)

    def skip_ws(self, pos: int) -> int:
        while True:
            pos = _WS.match(self.buf, pos).end()
            if pos < len(self.buf) or not self.more():
                return pos

    def line(self, pos: int) -> int:
        """1-based file line of window position ``pos`` (counted incrementally: positions only grow)."""
        if pos >= self.cnt_pos:
            self.cnt_line += self.buf.count("\n", self.cnt_pos, pos)
            self.cnt_pos = pos
            return self.cnt_line
        return self.buf_line + self.buf.count("\n", 0, pos)

    def where(self, pos: int) -> tuple[int, int]:
        """1-based (line, column) in the file of window position ``pos`` (for error messages)."""
        last = self.buf.rfind("\n", 0, pos)
        return self.line(pos), (pos - last if last >= 0 else self.buf_col + pos + 1)

    def drop(self, pos: int) -> int:
        """Forget the window before ``pos`` (keeping line/column bookkeeping); return the new ``pos``."""
        if pos < self.CHUNK:
            return pos
        self.buf_line, col = self.where(pos)
        self.buf_col = col - 1
        self.buf = self.buf[pos:]
        self.cnt_pos, self.cnt_line = 0, self.buf_line
        return 0


def _iter_json_stream(fh, path: str, layout: dict | None = None) -> Iterator[tuple]:
    """Yield ``(index, line, record)`` for each element of the JSON list in ``fh``, streaming.

    With ``layout`` (a dict, for the writer that copies records verbatim) it yields
    ``(index, line, record, source_text)`` and fills ``layout`` with the text after ``[`` (``lead``),
    between the first two records (``sep``), before ``]`` (``tail``) and after it (``trailer``).
    """
    dec = json.JSONDecoder()
    st = _JsonStream(fh, path)
    pos = st.skip_ws(0)
    if pos < len(st.buf) and st.buf[pos] == "{":
        raise DatasetError(f"{path}: the top level is a JSON object; expected a list of records "
                           "(LLaVA JSON) or one record per line (JSONL)", reason="malformed", path=path)
    if pos >= len(st.buf) or st.buf[pos] != "[":
        raise DatasetError(f"{path}: expected a JSON list of records", reason="malformed", path=path)
    open_at = pos
    pos = st.skip_ws(pos + 1)
    if layout is not None:
        layout.update(lead=st.buf[open_at + 1:pos], sep=None, tail="")
    index = 0
    if pos < len(st.buf) and st.buf[pos] == "]":
        pos += 1
    else:
        while True:
            pos = st.drop(pos)
            while True:
                try:
                    obj, end = dec.raw_decode(st.buf, pos)
                except RecursionError:
                    raise _too_deep(path, index) from None
                except json.JSONDecodeError as e:
                    # Cut by the window's end (or a string still open): read on and retry. An error
                    # well before the end cannot be fixed by more text (JSON is decided left to right).
                    if not st.eof and (e.pos >= len(st.buf) - 16 or e.msg.startswith("Unterminated string")):
                        st.more()
                        continue
                    ln, col = st.where(e.pos)
                    raise DatasetError(f"{path}: malformed JSON at line {ln} column {col} (record {index}): "
                                       f"{e.msg}. Fix the file (e.g. check it with `python -m json.tool`)",
                                       reason="malformed", path=path, index=index, line=ln) from None
                if end >= len(st.buf) and not st.eof and st.more():
                    continue  # a bare number may go on in the next chunk
                break
            if layout is None:
                yield index, st.line(pos), obj
            else:
                yield index, st.line(pos), obj, st.buf[pos:end]
            index += 1
            pos = st.skip_ws(end)
            if pos < len(st.buf) and st.buf[pos] == ",":
                pos = st.skip_ws(pos + 1)
                if layout is not None and layout["sep"] is None:
                    layout["sep"] = st.buf[end:pos]
                continue
            if pos < len(st.buf) and st.buf[pos] == "]":
                if layout is not None:
                    layout["tail"] = st.buf[end:pos]
                pos += 1
                break
            ln = st.line(pos)
            raise DatasetError(f"{path}: malformed JSON at line {ln}: expected ',' or ']' after record "
                               f"{index - 1}" + ("" if pos < len(st.buf) else " (file ends early: truncated?)"),
                               reason="malformed", path=path, index=index - 1, line=ln)
    rest = st.skip_ws(pos)
    if rest != len(st.buf):
        ln = st.line(rest)
        raise DatasetError(f"{path}: malformed JSON at line {ln}: extra data after the closing ']'",
                           reason="malformed", path=path, line=ln)
    if layout is not None:
        layout["trailer"] = st.buf[pos:rest]


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as e:
        raise DatasetError(f"cannot read dataset {path!r}: {e.strerror or e}", reason="io", path=path) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        ln = data.count(b"\n", 0, e.start) + 1
        raise DatasetError(f"{path}: line {ln} is not valid UTF-8 (byte {e.start}); re-encode the file "
                           "as UTF-8", reason="malformed", path=path, line=ln) from None


def _as_file(path: "str | os.PathLike | InputFile") -> InputFile:
    if isinstance(path, InputFile):
        return path
    p = os.fspath(path)
    return InputFile(p, None, p)


def _iter_jsonl_lines(path: "str | InputFile") -> Iterator[tuple[int, int, int, bytes, Any]]:
    """Yield ``(index, line, byte_offset, raw_line, parsed)`` for every non-blank line, streaming."""
    file = _as_file(path)
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
                raise _too_deep(path, index, lineno) from None
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


def _open_parquet(path: "str | InputFile"):
    import pyarrow.parquet as pq

    file = _as_file(path)
    try:
        return pq.ParquetFile(file.path if file.local else file.open())
    except DatasetError:
        raise
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError subclasses
        raise DatasetError(f"cannot read Parquet file {file.path!r}: {e}", reason="malformed",
                           path=file.path) from None


def _iter_parquet_batches(path: "str | InputFile", batch_rows: int = PARQUET_BATCH_ROWS,
                          columns: "list[str] | None" = None) -> Iterator[Any]:
    """The file's rows as Arrow record batches (only ``columns``, those of them the file has, when
    given: the others are not even decoded); a decoding failure names the file and the record."""
    file = _as_file(path)
    pf = _open_parquet(file)
    if columns is not None:
        columns = [c for c in pf.schema_arrow.names if c in set(columns)]
    index = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
            yield batch
            index += batch.num_rows
    except DatasetError:
        raise
    except Exception as e:
        raise DatasetError(f"{file.path}: cannot decode Parquet rows after record {index}: {e}",
                           reason="malformed", path=file.path, index=index) from None


def _iter_parquet_rows(path: "str | InputFile", batch_rows: int = PARQUET_BATCH_ROWS
                       ) -> Iterator[tuple[int, None, Any]]:
    index = 0
    for batch in _iter_parquet_batches(path, batch_rows):
        for row in batch.to_pylist():
            yield index, None, row
            index += 1


def _iter_json_file(file: InputFile) -> Iterator[tuple[int, int, Any]]:
    with file.open() as fh:
        yield from _iter_json_stream(fh, file.path)


def _count_jsonl(file: InputFile) -> int:
    # parses every line: the counting pass is also the syntax check, before any extraction work
    return sum(1 for _ in _iter_jsonl_lines(file))


def _first_char(head: bytes) -> bytes:
    return head.lstrip(b"\xef\xbb\xbf").lstrip()[:1]


def _too_deep(path, index: int, line: int | None = None) -> DatasetError:
    where = f"line {line}" if line is not None else f"record {index}"
    return DatasetError(f"{path}: {where} is nested too deeply to parse (thousands of levels of lists/objects); "
                        "no dataset record looks like this, fix or remove it", reason="malformed", path=path,
                        index=index, line=line)


def _one_json_object(head: bytes, name: str) -> bool:
    """A ``.json`` file that starts with ``{`` but is not JSONL: one object, on one line or pretty-printed.

    Read as JSON, it gets the documented "top level is a JSON object" error instead of being taken
    for a one-record JSONL file. JSONL under a ``.json`` name (first line a whole value, more lines
    after it) stays JSONL; a first line longer than the sniffed head cannot be told apart and stays
    JSONL too (``--format json`` forces the check).
    """
    if not name.lower().endswith(".json") or _first_char(head) != b"{":
        return False
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    first, nl, rest = text.partition(b"\n")
    try:
        json.loads(first.decode("utf-8"))
    except (ValueError, RecursionError):  # "{" of a pretty-printed object, or a line cut by the head
        return bool(nl)
    return not rest.strip()


def _record_ids(iter_records):
    def ids(file: InputFile, id_field: str):
        for local, _line, record in iter_records(file):
            if isinstance(record, dict) and id_field not in record:
                yield local, NO_ID_FIELD
            else:
                yield local, record_id_or_none(record, id_field)
    return ids


def arrow_ids(batches: Iterator[Any]) -> Iterator[str | None]:
    """The ids in record batches of one id column (string or integer), as the readers take them:
    ``str``, ``None`` where null or empty."""
    import pyarrow.compute as pc
    import pyarrow.types as pt

    for batch in batches:
        col = batch.column(0)
        if pt.is_integer(col.type):
            col = pc.cast(col, "string")
        for sid in col.to_pylist():
            yield sid or None


def usable_id_type(t) -> bool:
    """Whether an Arrow column of type ``t`` can hold ids (string or integer)."""
    import pyarrow.types as pt

    return pt.is_integer(t) or pt.is_string(t) or pt.is_large_string(t)


def _parquet_ids(file: InputFile, id_field: str):
    pf = _open_parquet(file)
    if id_field not in pf.schema_arrow.names:
        yield from ((i, NO_ID_FIELD) for i in range(pf.metadata.num_rows))
        return
    field = pf.schema_arrow.field(id_field)
    if not usable_id_type(field.type):
        # no usable id column: every record is skipped (missing/invalid id) when read
        yield from ((i, None) for i in range(pf.metadata.num_rows))
        return
    yield from enumerate(arrow_ids(pf.iter_batches(batch_size=65536, columns=[id_field])))


register_container(Container(
    "json", iter_records=_iter_json_file, count=lambda f: sum(1 for _ in _iter_json_file(f)),
    sniff=lambda head, name: _first_char(head) == b"[" or _one_json_object(head, name), extensions=(".json",),
    ids=_record_ids(lambda f: _iter_json_file(f))))
register_container(Container(
    "jsonl", iter_records=lambda f: ((i, ln, obj) for i, ln, _o, _r, obj in _iter_jsonl_lines(f)),
    count=_count_jsonl, sniff=lambda head, name: _first_char(head) == b"{", extensions=(".jsonl", ".ndjson"),
    ids=_record_ids(lambda f: ((i, ln, obj) for i, ln, _o, _r, obj in _iter_jsonl_lines(f)))))
class _ParquetSchema:
    """A Parquet file's columns and types (metadata ignored), comparable and printable in one line."""

    def __init__(self, file: InputFile):
        schema = _open_parquet(file).schema_arrow
        self.fields = {f.name: str(f.type) for f in schema}

    def __eq__(self, other) -> bool:
        return isinstance(other, _ParquetSchema) and self.fields == other.fields

    def diff(self, other: "_ParquetSchema") -> str:
        a, b = self.fields, other.fields
        parts = []
        if set(a) - set(b):
            parts.append(f"columns only in the first: {sorted(set(a) - set(b))}")
        if set(b) - set(a):
            parts.append(f"columns only in the second: {sorted(set(b) - set(a))}")
        parts += [f"column {k!r} is {a[k]} vs {b[k]}" for k in a if k in b and a[k] != b[k]]
        return "; ".join(parts) or "column order differs"


register_container(Container(
    "parquet", iter_records=_iter_parquet_rows, count=lambda f: _open_parquet(f).metadata.num_rows,
    sniff=lambda head, name: head[:4] == b"PAR1", extensions=(".parquet",), schema=_ParquetSchema,
    ids=_parquet_ids, iter_batches=lambda f, columns=None: _iter_parquet_batches(f, columns=columns)))


def iter_records(path, format: str = "auto") -> Iterator[tuple[int, int | None, Any]]:
    """Yield ``(index, line, record)`` for every record, unvalidated and streamed.

    ``path`` is anything :func:`~scalselect_fast.data.sources.open_source` accepts (a file, directory,
    glob, URL, list, or ``datasets`` object); ``index`` is global across files (sorted file names,
    then record order) and ``line`` is the line inside the record's own file.
    """
    check_data_argument(path, "iter_records: path", format)
    for index, line, record, _f, _l in open_source(path, format).iter_records():
        yield index, line, record


def count_records(path, format: str = "auto") -> int:
    """Number of records of the dataset (progress bars, shard ranges), checking its syntax on the way.

    JSON and JSONL are parsed completely (every line of a JSONL file), so a malformed record
    anywhere raises :class:`DatasetError` (file, line, column) here, before any expensive work
    starts; Parquet reads only footers (its pages are checked when they are decoded).
    """
    try:
        check_data_argument(path, "count_records: path", format)
        return open_source(path, format).count()
    except DatasetError as e:
        if e.reason == "empty":  # an empty file holds zero records; that is an answer, not an error
            return 0
        raise


# --------------------------------------------------------------------------------------------------
# records -> samples
# --------------------------------------------------------------------------------------------------
class _Problem(Exception):
    def __init__(self, reason: str, detail: str, sample_id: str | None = None):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.sample_id = sample_id  # the id as written, when it is the id itself that is refused
        self.read_id = None  # the record's id when it was read before the problem (for the message)


def record_id(record: Any, id_field: str = "id") -> str:
    """The record's id as a string (what ``Sample.id`` and the writers use).

    Raises an internal ``_Problem`` (reason + detail) if the id is missing or not a string/integer;
    callers outside the readers can use :func:`record_id_or_none`.
    """
    if not isinstance(record, dict):
        raise _Problem(REASON_INVALID_FIELD, f"record is a {type(record).__name__}, expected a JSON object")
    if id_field not in record or record[id_field] is None:
        raise _Problem(REASON_MISSING_FIELD, f"missing required field {id_field!r}: every record needs a "
                                             "unique id so the selection can be written back")
    value = record[id_field]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _Problem(REASON_INVALID_FIELD, f"field {id_field!r} must be a string or an integer, got "
                                             f"{type(value).__name__}")
    value = str(value)
    if not value:
        raise _Problem(REASON_INVALID_FIELD, f"field {id_field!r} is empty")
    if "\n" in value or "\r" in value:
        raise _Problem(REASON_INVALID_ID, f"id {value!r} contains a line break; ids are written one per line, "
                                          "so give this record a single-line id", sample_id=value)
    if not value.isascii() and _SURROGATE.search(value):
        raise _Problem(REASON_INVALID_ID, f"id {value!r} holds {_surrogate_text(value)}, which is not valid "
                                          "Unicode text and cannot be written out as UTF-8; give this record "
                                          "a valid id", sample_id=value)
    return value


#: a lone UTF-16 surrogate: valid in JSON (``"\ud800"``), not a character, so no UTF-8 encoding exists
_SURROGATE = re.compile("[\ud800-\udfff]")


def writable_text(text: str) -> str:
    """``text`` with every lone surrogate written as its ``\\uXXXX`` escape (what the JSON input said),
    so UTF-8 outputs (Parquet manifest, report) can hold it; ``text`` itself when it has none."""
    if text.isascii() or not _SURROGATE.search(text):
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _surrogate_text(text: str) -> str:
    m = _SURROGATE.search(text)
    return f"a lone surrogate (U+{ord(m.group()):04X} at character {m.start()})"


def record_id_or_none(record: Any, id_field: str = "id") -> str | None:
    """The record's id as a string, or ``None`` when it has no usable id (such a record is skipped)."""
    try:
        return record_id(record, id_field)
    except _Problem:
        return None


#: the field read as the id when none is named
DEFAULT_ID_FIELD = "id"


def position_id(name: str, row: int) -> str:
    """The id of a record that has none: ``<file relative to the dataset root>#<row in that file>``
    (``ai2d/train-00000-of-00001.parquet#17``; ``#17`` for a ``datasets`` object given in Python).

    It depends only on the files and their rows, not on the order ``--data`` listed them in or on
    which records a run reads (see :meth:`~.sources.DataSource.relative_name`).
    """
    return f"{name}#{row}"


class IdRule:
    """Where a record's id comes from, decided once per read from ``id_field``.

    ``id_field=None`` (the default): the ``id`` field, and a record that has no ``id`` field at all
    (an Arrow file without an ``id`` column: the Cauldron, FineVision) gets :func:`position_id`. A
    field that is there but null, empty or not a string/integer still makes the record unusable.
    A named ``id_field`` must be there: a record without it is skipped (``missing_field``).
    """

    __slots__ = ("field", "positional")

    def __init__(self, id_field: "str | None" = None):
        if id_field is not None and (not isinstance(id_field, str) or not id_field):
            raise ValueError(f"id_field must be a column name or None, got {id_field!r}")
        self.field = DEFAULT_ID_FIELD if id_field is None else id_field
        self.positional = id_field is None

    def by_position(self, record: Any) -> bool:
        """Whether ``record`` is named by its position (it has no id field and none was required)."""
        return self.positional and isinstance(record, dict) and self.field not in record

    def of(self, record: Any, name: str, row: int) -> str | None:
        """The id of ``record`` (row ``row`` of the file called ``name``), or ``None`` if it has no usable one."""
        if self.by_position(record):
            return position_id(name, row)
        return record_id_or_none(record, self.field)


def _image_refs(value: Any, field: str) -> list[Any]:
    """The images of one record field, in order: path strings, or :class:`EmbeddedImage`-to-be.

    Accepts a path, encoded bytes, an HF ``Image`` struct ``{"bytes", "path"}`` or a list of any of
    these. Embedded images come back as ``(data, name_or_None)`` tuples; :func:`parse_record` names
    them once it knows the record's place.
    """
    if value is None:
        return []
    if isinstance(value, (str, dict, bytes, bytearray, memoryview, EmbeddedImage)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise _Problem(REASON_INVALID_FIELD, f"field {field!r} must be a path, image bytes, an image struct "
                                             f"or a list of them, got {type(value).__name__}")
    out = []
    for i, v in enumerate(value):
        if isinstance(v, dict):  # Hugging Face `Image` feature: {"bytes": <encoded> | None, "path": str | None}
            v = _struct_ref(v.get("bytes"), v.get("path"), field, i)
        elif isinstance(v, (bytes, bytearray, memoryview)):
            v = _bytes_ref(v, field, i)
        out.append(v)
    return out


def _struct_ref(data: Any, path: Any, field: str, i: int) -> Any:
    """One HF ``Image`` struct's fields -> ``(bytes, name or None)`` to embed, or a path string."""
    if data:
        return bytes(data), path if isinstance(path, str) and path else None  # bytes(bytes) is no copy
    if path:
        return path  # an image stored beside the dataset: an ordinary path
    raise _Problem(REASON_IMAGE_EMPTY, f"{field}[{i}] is an image struct with neither bytes nor a "
                                       "path ({bytes: null, path: null}); the record holds no "
                                       "image there. Fill or drop it")


def _bytes_ref(v: Any, field: str, i: int) -> tuple:
    """Raw encoded bytes (a binary column) -> ``(bytes, None)`` to embed."""
    if not len(v):
        raise _Problem(REASON_IMAGE_EMPTY, f"{field}[{i}] holds zero image bytes")
    return bytes(v), None


def _part_image_path(part: dict) -> Any:
    if part.get("type") == "image_url":
        url = part.get("image_url")
        return url.get("url") if isinstance(url, dict) else url
    for key in ("image", "path", "url"):
        if isinstance(part.get(key), (str, dict, bytes, EmbeddedImage)):
            return part[key]
    return None


def _content_text(content: Any, turn: int, part_paths: list[Any]) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        pieces = []
        for part in content:
            if isinstance(part, str):
                pieces.append(part)
            elif isinstance(part, dict) and part.get("type") == "text":
                text = part.get("text", part.get("content"))
                if not isinstance(text, str):
                    raise _Problem(REASON_INVALID_FIELD, f"turn {turn}: text part without a string 'text'")
                pieces.append(text)
            elif isinstance(part, dict) and part.get("type") in ("image", "image_url"):
                pieces.append(IMAGE_TOKEN)
                part_paths.append(_part_image_path(part))
            else:
                raise _Problem(REASON_INVALID_FIELD, f"turn {turn}: unsupported content part {part!r:.80}; "
                                                     "expected {'type': 'text'|'image'|'image_url', ...}")
        return "".join(pieces)
    raise _Problem(REASON_INVALID_FIELD, f"turn {turn}: content must be a string or a list of parts, "
                                         f"got {type(content).__name__}")


def _messages(record: dict) -> tuple[list[dict], list[Any], int]:
    if "conversations" in record and record["conversations"] is not None:
        key, role_key, text_key = "conversations", "from", "value"
    elif "messages" in record and record["messages"] is not None:
        key, role_key, text_key = "messages", "role", "content"
    elif "texts" in record and record["texts"] is not None:
        return _texts_messages(record["texts"])
    else:
        raise _Problem(REASON_MISSING_FIELD, "missing required field 'conversations' (LLaVA: "
                                             "[{'from', 'value'}]), 'messages' (ShareGPT: [{'role', 'content'}]) "
                                             "or 'texts' (the Cauldron: [{'user', 'assistant'}])")
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise _Problem(REASON_INVALID_FIELD, f"field {key!r} must be a non-empty list of turns")
    messages, part_paths, n_parts = [], [], 0
    # Tolerate the other flavour's key names inside a turn (ShareGPT files with from/value exist).
    alt_role, alt_text = ("role", "content") if role_key == "from" else ("from", "value")
    for t, turn in enumerate(turns):
        if type(turn) is not dict and not isinstance(turn, dict):
            raise _Problem(REASON_INVALID_FIELD, f"{key}[{t}] must be an object, got {type(turn).__name__}")
        role = turn.get(role_key)
        if role is None:
            role = turn.get(alt_role)
            if role is None:
                raise _Problem(REASON_MISSING_FIELD, f"{key}[{t}] has no {role_key!r}")
        norm = None
        if isinstance(role, str):
            norm = _ROLE_ALIASES.get(role) or _ROLE_ALIASES.get(role.lower())
        if norm is None:
            raise _Problem(REASON_INVALID_FIELD, f"{key}[{t}] has unknown role {role!r}; expected one of "
                                                 f"{sorted(_ROLE_ALIASES)}")
        content = turn.get(text_key)
        if content is None:
            content = turn.get(alt_text)
            if content is None:
                raise _Problem(REASON_MISSING_FIELD, f"{key}[{t}] has no {text_key!r}")
        if type(content) is str:  # the common case, without the call
            text = content
        else:
            before = len(part_paths)
            text = _content_text(content, t, part_paths)
            n_parts += len(part_paths) - before
        messages.append({"role": norm, "content": text})
    return messages, part_paths, n_parts


def _texts_messages(turns: Any) -> tuple[list[dict], list[Any], int]:
    """The Cauldron / FineVision flavour: ``texts = [{"user", "assistant", "source"?}, ...]``, one
    dict per exchange; the record's images go before the first user turn (no placeholders)."""
    if not isinstance(turns, list) or not turns:
        raise _Problem(REASON_INVALID_FIELD, "field 'texts' must be a non-empty list of {'user', 'assistant'}")
    messages = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _Problem(REASON_INVALID_FIELD, f"texts[{t}] must be an object, got {type(turn).__name__}")
        user, answer = turn.get("user"), turn.get("assistant")
        if not isinstance(user, str):
            raise _Problem(REASON_MISSING_FIELD if user is None else REASON_INVALID_FIELD,
                           f"texts[{t}] needs a string 'user'")
        if answer is not None and not isinstance(answer, str):
            raise _Problem(REASON_INVALID_FIELD, f"texts[{t}]['assistant'] must be a string")
        messages.append({"role": "user", "content": user})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    return messages, [], 0


def parse_record(record: Any, *, index: int, line: int | None, resolve: ImageResolver,
                 id_field: str = "id", sample_id: str | None = None, where: str | None = None,
                 local: int | None = None) -> Sample:
    """Normalise one parsed record into a :class:`Sample` (raises ``_Problem`` for per-sample issues).

    ``where`` (the file's name) and ``local`` (the record's index in it) name embedded images that
    carry no name of their own: ``"<file>#<local>/image<i>"``.
    """
    sid = sample_id if sample_id is not None else record_id(record, id_field)
    messages, part_paths, n_parts = _messages(record)
    if "images" in record and record["images"] is not None:
        raw = _image_refs(record["images"], "images")
    elif "image" in record and record["image"] is not None:
        raw = _image_refs(record["image"], "image")
    else:
        raw = []
    return _assemble(sid, messages, part_paths, n_parts, raw, record_source(record), index, line, record,
                     resolve, where, local)


def _assemble(sid: str, messages: list[dict], part_paths: list[Any], n_parts: int, raw: list[Any],
              source: str | None, index: int, line: int | None, record: Any, resolve: ImageResolver,
              where: str | None, local: int | None) -> Sample:
    """The rules :func:`parse_record` feeds per record dict: images from content parts, the
    placeholder rule, names for unnamed embedded images, path resolution. ``raw`` holds the image
    refs of :func:`_image_refs`. (:class:`~.arrow.ArrowPlan` applies the same rules to the plain rows
    of Arrow batches in native code; the tests pin the two equal.)"""
    if not raw and n_parts:
        if any(p is None for p in part_paths):
            raise _Problem(REASON_MISSING_FIELD, "content has image parts without a path and the record "
                                                 "has no 'images' list")
        raw = _image_refs(part_paths, "content")
    n_placeholders = 0
    for t, m in enumerate(messages):
        text = m["content"]
        n_placeholders += text.count(IMAGE_TOKEN)
        if not text.isascii() and _SURROGATE.search(text):  # a tokenizer cannot take it (nor UTF-8)
            raise _Problem(REASON_INVALID_FIELD, f"message {t} ({m['role']}) holds {_surrogate_text(text)}, "
                                                 "which is not valid Unicode text; fix the text of this record")
    if raw and n_placeholders == 0:
        # LLaVA convention (and the Cauldron's): images go before the first user text.
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise _Problem(REASON_PLACEHOLDER_MISMATCH, "the record has images but no user turn to hold them")
        first_user["content"] = (IMAGE_TOKEN + "\n") * len(raw) + first_user["content"]
    elif n_placeholders != len(raw):
        raise _Problem(REASON_PLACEHOLDER_MISMATCH,
                       f"{n_placeholders} {IMAGE_TOKEN!r} placeholder(s) in the text but {len(raw)} "
                       "image(s); each image needs exactly one placeholder (or none at all)")
    images = []
    for i, p in enumerate(raw):
        if type(p) is tuple:  # (bytes, name or None) from _image_refs
            data, name = p
            if not name:
                name = (f"{where}#{index if local is None else local}/image{i}" if where
                        else f"record {index}/image{i}")
            images.append(EmbeddedImage(data, name))
        elif isinstance(p, EmbeddedImage):
            images.append(p)
        else:
            try:
                images.append(resolve(p))
            except ImagePathError as e:
                raise _Problem(e.reason, str(e)) from None
    return Sample(sid, images, messages, source, index, line, record)


def record_source(record: Any) -> str | None:
    """``Sample.source`` of a raw record: the first of :data:`SOURCE_FIELDS` holding a non-empty
    string or integer, as a string; ``None`` if there is none (use it to group raw records the way
    the readers do)."""
    if not isinstance(record, dict):
        return None
    for f in SOURCE_FIELDS:
        v = record.get(f)
        if isinstance(v, (str, int)) and not isinstance(v, bool) and str(v):
            return str(v)
    texts = record.get("texts")  # the Cauldron names the source per exchange
    if isinstance(texts, list) and texts and isinstance(texts[0], dict):
        v = texts[0].get("source")
        if isinstance(v, (str, int)) and not isinstance(v, bool) and str(v):
            return str(v)
    return None


def _raise_duplicates(source: DataSource, registry: IdRegistry, rule: IdRule) -> None:
    """Raise :class:`DatasetError` for the first (by later position) confirmed duplicate id, if any."""
    candidates = registry.duplicates()
    if not candidates:
        return
    wanted = {i for pair in candidates for i in pair}
    last = max(wanted)
    seen: dict[int, tuple[str | None, InputFile, int, int | None]] = {}
    for index, line, record, file, local in source.iter_records():  # error path only: a second pass
        if index in wanted:
            seen[index] = (rule.of(record, source.relative_name(file), local), file, local, line)
        if index >= last:
            break
    for a, b in candidates:
        (sid, fa, la, lna), (sid_b, fb, lb, lnb) = seen[a], seen[b]
        if sid is None or sid != sid_b:
            continue  # two different ids with the same 64-bit digest
        first = _where(la, lna) + (f" of {fa.path}" if not source.single else "")
        raise DatasetError(f"{fb.path}: duplicate id {sid!r}: {first} and {_where(lb, lnb)}. Ids must be unique; "
                           "rename or drop one of them", reason="duplicate_id", path=fb.path, index=b, line=lnb,
                           sample_id=sid)


def check_unique_ids(data, format: str = "auto", id_field: str | None = None) -> int:
    """Raise :class:`DatasetError` if two records share an id; return the number of records with an id.

    Reads only the ids where the container allows it (a Parquet file's id column); memory stays
    constant (see :mod:`.ids`). ``scalselect run`` calls it before extraction so a duplicate stops
    the run before any model work; the same pass gives the record counts (cached on the source).
    Containers without an id reader are checked while reading. ``id_field`` as for
    :func:`read_dataset` (records without an id field are counted with their positional id).
    """
    source = open_source(data, format)
    rule = IdRule(id_field)
    c = containers()[source.container]
    with IdRegistry() as registry:
        if c.ids is not None and source.dataset is None:
            offset, counts = 0, []
            source.check_schemas()
            for f in source.files:
                n = 0
                name = source.relative_name(f)
                for local, sid in c.ids(f, rule.field):  # every record, so this pass also counts them
                    if sid is NO_ID_FIELD:
                        sid = position_id(name, local) if rule.positional else None
                    if sid is not None:
                        registry.add(sid, offset + local)
                    n = local + 1
                counts.append(n)
                offset += n
            if source._counts is None:  # a JSON/JSONL count is a full parse: do not make it twice
                source._counts = counts
        else:
            for index, _line, record, f, local in source.iter_records():
                sid = rule.of(record, source.relative_name(f), local) if isinstance(record, dict) else None
                if sid is not None:
                    registry.add(sid, index)
        _raise_duplicates(source, registry, rule)
        return registry.count


class _RemoteImages:
    """Image paths of a remote dataset: only with ``image_root`` (there is no local folder to be relative to)."""

    def __init__(self, label: str):
        self.label = label

    def __call__(self, path: object) -> str:
        raise ImagePathError(f"image {path!r} is a path, but the dataset {self.label!r} is remote; pass "
                             "--image-root with the folder those paths are relative to (or embed the images)",
                             REASON_INVALID_FIELD)


def read_dataset(path, image_root: str | os.PathLike | None = None,
                 format: str = "auto", skip_log=None, id_field: str | None = None) -> Iterator[Sample]:
    """Stream the samples of a dataset.

    Parameters
    ----------
    path : str, path-like, list, DataSource, or datasets.Dataset / IterableDataset
        A file (LLaVA JSON, ShareGPT JSON, JSONL of either, Parquet, ...), a directory, a glob
        (``data/train-*.parquet``), a URL (``s3://``, ``hf://``, ``memory://`` ...), a list of those,
        or a Hugging Face ``datasets`` object; see :func:`~scalselect_fast.data.sources.open_source`.
    image_root : str or path-like, optional
        Directory that relative image paths are joined to; every resolved image path (after ``..``
        and symlinks) must lie inside it, otherwise the sample is refused. Without it, relative
        paths are relative to the directory of the file holding the record, and nothing is confined.
        Embedded images (bytes in the dataset) need no root.
    format : str
        ``"auto"`` (recognise each file from its first bytes) or a container name (``"json"``,
        ``"jsonl"``, ``"parquet"``, ...).
    skip_log : SkipLog, optional
        Where per-sample problems go (reading continues). Without it they raise.
    id_field : str, optional
        Record field (column) that holds the unique id (unique across all files). ``None`` (the
        default): ``id``, and a record with no ``id`` field at all (a Parquet file or ``datasets``
        folder without an ``id`` column, as the Cauldron and FineVision ship) gets the positional id
        ``<file relative to the dataset root>#<row in the file>`` (:func:`position_id`). A named
        field is required: a record without it is skipped with ``missing_field``.

    Yields
    ------
    Sample
        In order (sorted file names, then record order); ``Sample.index`` numbers every record
        globally, skipped ones included; ``Sample.line`` is the line in the record's own file.

    Raises
    ------
    DatasetError
        Fatal problems (no such file, a glob matching nothing, mixed containers, malformed file,
        duplicate ids, empty dataset, ...) and, without a ``skip_log``, per-sample problems. The
        message names the file, record and line.
    """
    check_data_argument(path, "read_dataset: path", format)
    if image_root is not None and not (isinstance(image_root, str) or (
            isinstance(image_root, os.PathLike) and isinstance(os.fspath(image_root), str))):
        raise TypeError(f"read_dataset: image_root must be a directory path (str or os.PathLike) or None, got "
                        f"{type(image_root).__name__}")
    source = open_source(path, format)
    rule = IdRule(id_field)
    id_field = rule.field
    root = resolve_root(image_root) if image_root is not None else None
    resolvers: dict[str, Any] = {}
    names: dict[str, str] = {}  # file path -> name relative to the dataset root (positional ids)
    many = not source.single
    n_records = n_skipped = 0
    reasons: dict[str, int] = {}  # skips per reason, and the first of each, for the all-skipped message
    examples: dict[str, dict] = {}

    def resolver(file: InputFile):  # image paths resolve relative to the record's own file
        if root is not None:
            return resolvers.get("") or resolvers.setdefault("", ImageResolver(root, root))
        if file.local:
            return resolvers.get(file.path) or resolvers.setdefault(
                file.path, ImageResolver(None, file.base_dir or os.getcwd()))
        return resolvers.get(file.path) or resolvers.setdefault(file.path, _RemoteImages(file.path))

    def skip(p: _Problem, sid: str | None, file: InputFile, index: int, line: int | None, local: int) -> None:
        if skip_log is None:
            raise DatasetError(f"{file.path}: {_where(local, line)}" + (f" (id {sid!r})" if sid else "")
                               + f": {p.detail}. Fix the record, or read with a SkipLog to skip such "
                               "samples and continue", reason=p.reason, path=file.path, index=index,
                               line=line, sample_id=sid) from None
        skip_log.add(sid if sid is not None else p.sample_id, index, p.reason, p.detail, line=line,
                     file=file.path if many else None)
        reasons[p.reason] = reasons.get(p.reason, 0) + 1
        if p.reason not in examples:
            examples[p.reason] = {"id": sid if sid is not None else p.sample_id, "index": local, "line": line,
                                  "file": file.path, "detail": p.detail}

    with IdRegistry() as registry:  # duplicate ids: constant memory, checked once every id is known
        add_id = registry.add

        def record_sample(record: Any, index: int, line: int | None, file: InputFile, local: int, resolve,
                          sid: str | None = None) -> Sample:
            """The record path (a row dict): the sample, or ``_Problem`` carrying the id read so far."""
            try:
                if isinstance(record, UnusableRecord):  # the container already knows why it is unusable
                    sid = record.sample_id
                    raise _Problem(record.reason, record.detail)
                if sid is None:
                    if rule.by_position(record):
                        name = names.get(file.path) or names.setdefault(file.path, source.relative_name(file))
                        sid = position_id(name, local)
                    else:
                        sid = record_id(record, id_field)
                    add_id(sid, index)
                return parse_record(record, index=index, line=line, resolve=resolve, id_field=id_field,
                                    sample_id=sid, where=file.name, local=local)
            except _Problem as p:
                p.read_id = sid
                raise

        if source.has_batches():  # Arrow: column-wise per batch where the schema allows (ArrowPlan)
            from .arrow import ArrowPlan

            file = resolve = schema = plan = None
            for index0, batch, f, local0 in source.iter_batches():
                if f is not file:
                    file, resolve = f, resolver(f)
                n_records += batch.num_rows
                if schema is None or not batch.schema.equals(schema):  # (hashing a schema costs 6 us)
                    schema = batch.schema
                    plan = ArrowPlan.for_schema(schema, id_field, rule.positional)
                if plan is None:  # every row through the record path
                    records = batch.to_pylist()
                    chunks = [([None] * batch.num_rows, list(range(batch.num_rows)))]
                else:
                    records = None
                    name = names.get(file.path) or names.setdefault(file.path, source.relative_name(file))
                    chunks = plan.samples(batch, index0, local0, file.name, registry, name)
                start = 0
                for samples, others in chunks:
                    if not others:
                        yield from samples
                        start += len(samples)
                        continue
                    for k, sample in enumerate(samples):
                        if sample is None:  # the record path decides: a sample, or a skip and why
                            i = start + k
                            try:
                                record = records[i] if records is not None else batch.slice(i, 1).to_pylist()[0]
                                sample = record_sample(record, index0 + i, None, file, local0 + i, resolve)
                            except _Problem as p:
                                skip(p, p.read_id, file, index0 + i, None, local0 + i)
                                n_skipped += 1
                                continue
                        yield sample
                    start += len(samples)
        else:
            file = resolve = None
            for index, line, record, f, local in source.iter_records():
                n_records += 1
                if f is not file:
                    file, resolve = f, resolver(f)
                try:
                    sample = record_sample(record, index, line, file, local, resolve)
                except _Problem as p:
                    skip(p, p.read_id, file, index, line, local)
                    n_skipped += 1
                    continue
                yield sample
        _raise_duplicates(source, registry, rule)
    n_yielded = n_records - n_skipped
    if n_records == 0:
        raise DatasetError(f"dataset {source.label!r} is empty (no records)", reason="empty",
                           path=source.files[0].path if source.files else None)
    if n_yielded == 0:
        from .skiplog import summarize_skips

        logged = getattr(skip_log, "path", None)
        where = f"; every one is listed in {logged}" if logged is not None else ""
        top = min(reasons, key=lambda r: (-reasons[r], r)) if reasons else None
        why = summarize_skips(reasons, examples.get(top))
        raise DatasetError(f"dataset {source.label!r}: all {n_records} records were skipped, nothing to select: "
                           f"{why}{where}{format_mismatch_hint(source)}", reason="empty",
                           path=source.files[0].path if source.files else None)


def format_mismatch_hint(source: DataSource) -> str:
    """``". Its content is json, but it was read as jsonl ..."`` when the first file's content is another
    container than the one it was read as (a JSON list under ``--format jsonl``), else ``""``."""
    if not source.files or (source.files[0].local and os.path.isdir(source.files[0].path)):
        return ""
    try:
        kind = sniff_container(source.files[0])
    except DatasetError:
        return ""
    if kind == source.container:
        return ""
    return (f". Its content is {kind}, but it was read as {source.container} (--format {source.container}): "
            f"pass --format {kind} or --format auto")
