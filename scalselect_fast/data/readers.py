"""Dataset readers: LLaVA JSON, ShareGPT, JSONL of either, and Parquet, all yielding :class:`Sample`.

Containers and flavours are independent:

* **container** (``format``): ``"json"`` (one JSON list of records, loaded whole), ``"jsonl"`` (one
  record per line, streamed), ``"parquet"`` (streamed in row batches). ``"auto"`` sniffs the file's
  first bytes (``PAR1`` magic, ``[`` or ``{``), so a misnamed extension does not matter.
* **flavour**, decided per record: a record with ``conversations`` (``from``/``value`` turns) is
  LLaVA; one with ``messages`` (``role``/``content`` turns, content a string or a list of
  ``{"type": "text"|"image"|"image_url", ...}`` parts) is ShareGPT. Both may carry images as
  ``image`` (LLaVA: a string or a list) or ``images`` (a list); Parquet columns use the same names.

What stops the read and what skips one sample
---------------------------------------------
Fatal (:class:`DatasetError` raised, nothing more is yielded): the file is missing or unreadable,
malformed JSON or a malformed JSONL line (file, line and column in the message), a top level that
is not a list of records, two records with the same id (both positions), an empty dataset (no
records, or every record skipped), a nonexistent ``image_root``.

Per sample (the sample is not yielded): a missing or invalid required field (``id``,
``conversations``/``messages``, a turn's role or text), an image path that escapes ``image_root``
or is not a local path, placeholders that cannot be matched to images. With a ``skip_log`` these are
written to it (one line each, never silently) and reading continues; without one they raise
:class:`DatasetError` naming the record, the field and the fix. Missing/corrupt image *files* are
not detected here (reading would have to decode every image): :func:`load_image` raises
:class:`ImageError` for them when the pixels are needed.

Memory: JSONL and Parquet are streamed; only the id → record-index map used to detect duplicate ids
grows with N (roughly 100-150 bytes per record, ~1.5 GB for 10M records).
"""
from __future__ import annotations

import json
import os
import re
from array import array
from collections.abc import Iterator
from typing import Any

from .images import ImagePathError, ImageResolver, resolve_root
from .sample import (IMAGE_TOKEN, REASON_INVALID_FIELD, REASON_MISSING_FIELD,
                     REASON_PLACEHOLDER_MISMATCH, DatasetError, Sample, _where)

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
    """Return the container of ``path``: ``"json"``, ``"jsonl"`` or ``"parquet"``, from its first bytes."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError as e:
        raise DatasetError(f"cannot open dataset {path!r}: {e.strerror or e}", reason="io", path=path) from None
    if head[:4] == b"PAR1":
        return "parquet"
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    if text[:1] == b"[":
        return "json"
    if text[:1] == b"{":
        return "jsonl"
    if not text:
        raise DatasetError(f"dataset {path!r} is empty (no records)", reason="empty", path=path)
    ext = os.path.splitext(path)[1].lower()
    raise DatasetError(f"cannot tell the format of {path!r} (extension {ext!r}): expected a JSON list of "
                       "records, JSONL (one JSON object per line) or a Parquet file", reason="format",
                       path=path)


def _container(path: str, format: str) -> str:
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
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


def _iter_jsonl_lines(path: str) -> Iterator[tuple[int, int, int, bytes, Any]]:
    """Yield ``(index, line, byte_offset, raw_line, parsed)`` for every non-blank line, streaming."""
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise DatasetError(f"cannot read dataset {path!r}: {e.strerror or e}", reason="io", path=path) from None
    with fh:
        index, offset = 0, 0
        for lineno, raw in enumerate(fh, start=1):
            start = offset
            offset += len(raw)
            body = raw[3:] if lineno == 1 and raw.startswith(b"\xef\xbb\xbf") else raw
            if not body.strip():
                continue
            try:
                obj = json.loads(body.decode("utf-8"))
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


def _open_parquet(path: str):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError subclasses
        raise DatasetError(f"cannot read Parquet file {path!r}: {e}", reason="malformed", path=path) from None


def _iter_parquet_rows(path: str, batch_rows: int = PARQUET_BATCH_ROWS) -> Iterator[tuple[int, None, Any]]:
    pf = _open_parquet(path)
    index = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows):
            for row in batch.to_pylist():
                yield index, None, row
                index += 1
    except DatasetError:
        raise
    except Exception as e:
        raise DatasetError(f"{path}: cannot decode Parquet rows after record {index}: {e}",
                           reason="malformed", path=path, index=index) from None


def iter_records(path: str | os.PathLike, format: str = "auto") -> Iterator[tuple[int, int | None, Any]]:
    """Yield ``(index, line, record)`` for every record of the file, unvalidated (streaming for JSONL/Parquet)."""
    path = os.fspath(path)
    container = _container(path, format)
    if container == "json":
        for index, line, _s, _e, obj in _iter_json_list(_read_text(path), path):
            yield index, line, obj
    elif container == "jsonl":
        for index, line, _o, _r, obj in _iter_jsonl_lines(path):
            yield index, line, obj
    else:
        yield from _iter_parquet_rows(path)


def count_records(path: str | os.PathLike, format: str = "auto") -> int:
    """Number of records in the file (for progress bars); Parquet reads only the footer."""
    path = os.fspath(path)
    try:
        container = _container(path, format)
    except DatasetError as e:
        if e.reason == "empty":  # an empty file holds zero records; that is an answer, not an error
            return 0
        raise
    if container == "parquet":
        return _open_parquet(path).metadata.num_rows
    if container == "jsonl":
        n = 0
        with open(path, "rb") as fh:
            for raw in fh:
                if raw.strip() and raw.strip() != b"\xef\xbb\xbf":
                    n += 1
        return n
    return sum(1 for _ in _iter_json_list(_read_text(path), path))


# --------------------------------------------------------------------------------------------------
# records -> samples
# --------------------------------------------------------------------------------------------------
class _Problem(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


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
    return value


def record_id_or_none(record: Any, id_field: str = "id") -> str | None:
    """The record's id as a string, or ``None`` when it has no usable id (such a record is skipped)."""
    try:
        return record_id(record, id_field)
    except _Problem:
        return None


def _image_paths_from_value(value: Any, field: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise _Problem(REASON_INVALID_FIELD, f"field {field!r} must be a path or a list of paths, got "
                                             f"{type(value).__name__}")
    out = []
    for v in value:
        if isinstance(v, dict):  # Hugging Face `Image` feature style {"path": ..., "bytes": ...}
            if not v.get("path"):
                raise _Problem(REASON_INVALID_FIELD, f"field {field!r} holds an embedded image without a "
                                                     "path; only image paths are supported")
            v = v["path"]
        out.append(v)
    return out


def _part_image_path(part: dict) -> Any:
    if part.get("type") == "image_url":
        url = part.get("image_url")
        return url.get("url") if isinstance(url, dict) else url
    for key in ("image", "path", "url"):
        if isinstance(part.get(key), str):
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
    else:
        raise _Problem(REASON_MISSING_FIELD, "missing required field 'conversations' (LLaVA: "
                                             "[{'from', 'value'}]) or 'messages' (ShareGPT: [{'role', 'content'}])")
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise _Problem(REASON_INVALID_FIELD, f"field {key!r} must be a non-empty list of turns")
    messages, part_paths, n_parts = [], [], 0
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _Problem(REASON_INVALID_FIELD, f"{key}[{t}] must be an object, got {type(turn).__name__}")
        # Tolerate the other flavour's key names inside a turn (ShareGPT files with from/value exist).
        role = turn.get(role_key, turn.get("role" if role_key == "from" else "from"))
        if role is None:
            raise _Problem(REASON_MISSING_FIELD, f"{key}[{t}] has no {role_key!r}")
        norm = _ROLE_ALIASES.get(str(role).lower()) if isinstance(role, str) else None
        if norm is None:
            raise _Problem(REASON_INVALID_FIELD, f"{key}[{t}] has unknown role {role!r}; expected one of "
                                                 f"{sorted(_ROLE_ALIASES)}")
        content = turn.get(text_key, turn.get("content" if text_key == "value" else "value"))
        if content is None:
            raise _Problem(REASON_MISSING_FIELD, f"{key}[{t}] has no {text_key!r}")
        before = len(part_paths)
        text = _content_text(content, t, part_paths)
        n_parts += len(part_paths) - before
        messages.append({"role": norm, "content": text})
    return messages, part_paths, n_parts


def parse_record(record: Any, *, index: int, line: int | None, resolve: ImageResolver,
                 id_field: str = "id", sample_id: str | None = None) -> Sample:
    """Normalise one parsed record into a :class:`Sample` (raises ``_Problem`` for per-sample issues)."""
    sid = sample_id if sample_id is not None else record_id(record, id_field)
    messages, part_paths, n_parts = _messages(record)
    if "images" in record and record["images"] is not None:
        raw_paths = _image_paths_from_value(record["images"], "images")
    elif "image" in record and record["image"] is not None:
        raw_paths = _image_paths_from_value(record["image"], "image")
    else:
        raw_paths = []
    if not raw_paths and n_parts:
        if any(p is None for p in part_paths):
            raise _Problem(REASON_MISSING_FIELD, "content has image parts without a path and the record "
                                                 "has no 'images' list")
        raw_paths = part_paths
    n_placeholders = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if raw_paths and n_placeholders == 0:
        # LLaVA convention: images go before the first user text.
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise _Problem(REASON_PLACEHOLDER_MISMATCH, "the record has images but no user turn to hold them")
        first_user["content"] = (IMAGE_TOKEN + "\n") * len(raw_paths) + first_user["content"]
    elif n_placeholders != len(raw_paths):
        raise _Problem(REASON_PLACEHOLDER_MISMATCH,
                       f"{n_placeholders} {IMAGE_TOKEN!r} placeholder(s) in the text but {len(raw_paths)} "
                       "image(s); each image needs exactly one placeholder (or none at all)")
    images = []
    for p in raw_paths:
        try:
            images.append(resolve(p))
        except ImagePathError as e:
            raise _Problem(e.reason, str(e)) from None
    return Sample(id=sid, images=images, messages=messages, source=record_source(record), index=index,
                  line=line, raw=record)


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
    return None


def read_dataset(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                 format: str = "auto", skip_log=None, id_field: str = "id") -> Iterator[Sample]:
    """Stream the samples of a dataset file.

    Parameters
    ----------
    path : str or path-like
        LLaVA JSON, ShareGPT JSON, JSONL of either, or Parquet (see the module notes).
    image_root : str or path-like, optional
        Directory that relative image paths are joined to; every resolved image path (after ``..``
        and symlinks) must lie inside it, otherwise the sample is refused. Without it, relative
        paths are relative to the dataset file's directory and nothing is confined.
    format : {"auto", "json", "jsonl", "parquet"}
        Container; ``"auto"`` sniffs the file's first bytes.
    skip_log : SkipLog, optional
        Where per-sample problems go (reading continues). Without it they raise.
    id_field : str
        Record field that holds the unique id.

    Yields
    ------
    Sample
        In file order; ``Sample.index`` counts every record, skipped ones included.

    Raises
    ------
    DatasetError
        Fatal problems (malformed file, duplicate ids, empty dataset, ...) and, without a
        ``skip_log``, per-sample problems. The message names the file, record and line.
    """
    path = os.fspath(path)
    root = resolve_root(image_root) if image_root is not None else None
    resolve = ImageResolver(root, os.path.dirname(os.path.realpath(path)))
    seen: dict[str, int] = {}
    lines = array("q")  # record index -> line, for duplicate-id messages
    n_records = n_yielded = n_skipped = 0
    for index, line, record in iter_records(path, format):
        n_records += 1
        lines.append(line if line is not None else -1)
        sid = None
        try:
            sid = record_id(record, id_field)
            first = seen.setdefault(sid, index)
            if first != index:
                l0 = lines[first]
                raise DatasetError(
                    f"{path}: duplicate id {sid!r}: {_where(first, l0 if l0 >= 0 else None)} and "
                    f"{_where(index, line)}. Ids must be unique; rename or drop one of them",
                    reason="duplicate_id", path=path, index=index, line=line, sample_id=sid)
            sample = parse_record(record, index=index, line=line, resolve=resolve,
                                  id_field=id_field, sample_id=sid)
        except _Problem as p:
            if skip_log is None:
                raise DatasetError(f"{path}: {_where(index, line)}" + (f" (id {sid!r})" if sid else "")
                                   + f": {p.detail}. Fix the record, or read with a SkipLog to skip such "
                                   "samples and continue", reason=p.reason, path=path, index=index,
                                   line=line, sample_id=sid) from None
            skip_log.add(sid, index, p.reason, p.detail, line=line)
            n_skipped += 1
            continue
        n_yielded += 1
        yield sample
    if n_records == 0:
        raise DatasetError(f"dataset {path!r} is empty (no records)", reason="empty", path=path)
    if n_yielded == 0:
        where = f" (see {skip_log.path})" if skip_log is not None and hasattr(skip_log, "path") else ""
        raise DatasetError(f"dataset {path!r}: all {n_records} records were skipped{where}; nothing "
                           "to select. Check the record layout and --image-root", reason="empty", path=path)
