"""The ``"json"`` container: one JSON list of records (LLaVA-665K's ``llava_v1_5_mix665k.json``,
ShareGPT JSON), streamed.

The list is walked element by element through a bounded text window (:class:`_JsonStream`), so a
multi-gigabyte file needs memory for one chunk plus the largest record, and every error names the
file's line and column exactly as parsing the whole text at once would (:func:`_iter_json_list` is
that whole-text walk, the reference the stream is tested against). :func:`iter_json_stream` also
hands the writers each record's exact source text. Registers itself with :mod:`.sources`; what a
record means is :mod:`.records`' business.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import Any

from .records import ids_of_records
from .sample import DatasetError
from .sources import Container, InputFile, register_container

_WS = re.compile(r"[ \t\n\r]*")


def first_char(head: bytes) -> bytes:
    """The first byte of a file's head after a UTF-8 BOM and whitespace (what sniffing looks at)."""
    return head.lstrip(b"\xef\xbb\xbf").lstrip()[:1]


def too_deep(path, index: int, line: int | None = None) -> DatasetError:
    """The error for a record nested beyond the parser's recursion limit."""
    where = f"line {line}" if line is not None else f"record {index}"
    return DatasetError(f"{path}: {where} is nested too deeply to parse (thousands of levels of lists/objects); "
                        "no dataset record looks like this, fix or remove it", reason="malformed", path=path,
                        index=index, line=line)


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
                raise too_deep(path, index) from None
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


def iter_json_stream(fh, path: str, layout: dict | None = None) -> Iterator[tuple]:
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
    ws = _WS.match
    if pos < len(st.buf) and st.buf[pos] == "]":
        pos += 1
    else:
        while True:
            if pos >= st.CHUNK:
                pos = st.drop(pos)
            while True:
                try:
                    obj, end = dec.raw_decode(st.buf, pos)
                except RecursionError:
                    raise too_deep(path, index) from None
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
            buf = st.buf
            if pos >= st.cnt_pos:  # st.line(pos), inline: it runs once per record
                st.cnt_line += buf.count("\n", st.cnt_pos, pos)
                st.cnt_pos = pos
                line = st.cnt_line
            else:
                line = st.line(pos)
            if layout is None:
                yield index, line, obj
            else:
                yield index, line, obj, buf[pos:end]
            index += 1
            # st.skip_ws, inline for the common case: the separator and the next record are in the window
            pos = ws(buf, end).end()
            if pos >= len(buf):
                pos = st.skip_ws(pos)
            if pos < len(st.buf) and st.buf[pos] == ",":
                buf = st.buf
                nxt = ws(buf, pos + 1).end()
                pos = nxt if nxt < len(buf) else st.skip_ws(nxt)
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


def _iter_json_file(file: InputFile) -> Iterator[tuple[int, int, Any]]:
    with file.open() as fh:
        yield from iter_json_stream(fh, file.path)


#: files up to this size are counted by one ``json.loads`` of the whole text (about half the time of the
#: element-by-element walk; the parsed list lives for the count only)
COUNT_WHOLE_BYTES = 4 << 20


def count_json_file(file: InputFile) -> int:
    """Number of records of a JSON list file, checking its syntax (:func:`iter_json_stream`'s errors).

    A small local file that parses whole as a list is counted by its length; anything else (a large or
    remote file, malformed JSON, another top level, invalid UTF-8) is counted by the streaming walk,
    which raises the exact error with its line and column.
    """
    if file.local:
        try:
            if os.path.getsize(file.path) <= COUNT_WHOLE_BYTES:
                with open(file.path, "rb") as fh:
                    value = json.loads(fh.read().decode("utf-8-sig"))
                if type(value) is list:
                    return len(value)
        except (OSError, ValueError, RecursionError):
            pass  # the walk below reports it (DatasetError naming the file, line and column)
    return sum(1 for _ in _iter_json_file(file))


def _one_json_object(head: bytes, name: str) -> bool:
    """A ``.json`` file that starts with ``{`` but is not JSONL: one object, on one line or pretty-printed.

    Read as JSON, it gets the documented "top level is a JSON object" error instead of being taken
    for a one-record JSONL file. JSONL under a ``.json`` name (first line a whole value, more lines
    after it) stays JSONL; a first line longer than the sniffed head cannot be told apart and stays
    JSONL too (``--format json`` forces the check).
    """
    if not name.lower().endswith(".json") or first_char(head) != b"{":
        return False
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    first, nl, rest = text.partition(b"\n")
    try:
        json.loads(first.decode("utf-8"))
    except (ValueError, RecursionError):  # "{" of a pretty-printed object, or a line cut by the head
        return bool(nl)
    return not rest.strip()


register_container(Container(
    "json", iter_records=_iter_json_file, count=count_json_file,
    sniff=lambda head, name: first_char(head) == b"[" or _one_json_object(head, name), extensions=(".json",),
    ids=ids_of_records(_iter_json_file)))
