"""The record rules: one parsed record (a dict, from any container) into a :class:`~.sample.Sample`.

Each record decides its own flavour: ``conversations`` (``from``/``value`` turns) is LLaVA;
``messages`` (``role``/``content`` turns, content a string or a list of
``{"type": "text"|"image"|"image_url", ...}`` parts) is ShareGPT; ``texts``
(``[{"user", "assistant", "source"?}]``, images before the first user turn) is the Cauldron /
FineVision. Any of them carries images as ``image`` (one, or a list) or ``images`` (a list), each a
path, encoded bytes, or a Hugging Face ``Image`` struct ``{"bytes", "path"}`` (bytes become an
:class:`~.sample.EmbeddedImage`; a struct with only a path is a path; with neither, the sample is
skipped with ``image_empty``). The id rule (:class:`IdRule`, :func:`position_id`), the role aliases
and the source fields live here too, once.

This module knows nothing of files: the container modules (:mod:`.json_list`, :mod:`.jsonl`,
:mod:`.parquet`, :mod:`.hf`, :mod:`.webdataset`) yield record dicts, :mod:`.readers` runs the read
loop and calls :func:`parse_record` on each, and :class:`~.arrow.ArrowPlan` applies the same rules
column-wise to Arrow batches. A record that cannot become a sample raises :class:`RecordProblem`
(a skip reason and its detail), which the read loop logs or raises.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from .images import ImagePathError, ImageResolver
from .sample import (IMAGE_TOKEN, REASON_IMAGE_EMPTY, REASON_INVALID_FIELD, REASON_INVALID_ID, REASON_MISSING_FIELD,
                     REASON_PLACEHOLDER_MISMATCH, EmbeddedImage, Sample)
from .sources import NO_ID_FIELD, InputFile

#: Record fields tried, in order, for ``Sample.source``.
SOURCE_FIELDS = ("source", "dataset", "data_source", "task", "task_type", "category")

#: role spellings of the datasets -> the roles of :data:`~.sample.ROLES`
ROLE_ALIASES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "bot": "assistant", "model": "assistant",
    "chatgpt": "assistant",
    "system": "system",
}


class RecordProblem(Exception):
    """Why one record cannot become a sample: a skip ``reason`` (``REASON_*`` of :mod:`.sample`) and its
    ``detail``. Raised by the rules here; the read loop (:mod:`.readers`) logs it or raises it as a
    :class:`~.sample.DatasetError`."""

    def __init__(self, reason: str, detail: str, sample_id: str | None = None):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.sample_id = sample_id  # the id as written, when it is the id itself that is refused
        self.read_id = None  # the record's id when it was read before the problem (for the message)


def record_id(record: Any, id_field: str = "id") -> str:
    """The record's id as a string (what ``Sample.id`` and the writers use).

    Raises :class:`RecordProblem` (reason + detail) if the id is missing or not a string/integer;
    callers outside the readers can use :func:`record_id_or_none`.
    """
    if not isinstance(record, dict):
        raise RecordProblem(REASON_INVALID_FIELD, f"record is a {type(record).__name__}, expected a JSON object")
    if id_field not in record or record[id_field] is None:
        raise RecordProblem(REASON_MISSING_FIELD, f"missing required field {id_field!r}: every record needs a "
                                             "unique id so the selection can be written back")
    value = record[id_field]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RecordProblem(REASON_INVALID_FIELD, f"field {id_field!r} must be a string or an integer, got "
                                             f"{type(value).__name__}")
    value = str(value)
    if not value:
        raise RecordProblem(REASON_INVALID_FIELD, f"field {id_field!r} is empty")
    if "\n" in value or "\r" in value:
        raise RecordProblem(REASON_INVALID_ID, f"id {value!r} contains a line break; ids are written one per line, "
                                          "so give this record a single-line id", sample_id=value)
    if not value.isascii() and _SURROGATE.search(value):
        raise RecordProblem(REASON_INVALID_ID, f"id {value!r} holds {_surrogate_text(value)}, which is not valid "
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
    except RecordProblem:
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
        raise RecordProblem(REASON_INVALID_FIELD, f"field {field!r} must be a path, image bytes, an image struct "
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
    raise RecordProblem(REASON_IMAGE_EMPTY, f"{field}[{i}] is an image struct with neither bytes nor a "
                                       "path ({bytes: null, path: null}); the record holds no "
                                       "image there. Fill or drop it")


def _bytes_ref(v: Any, field: str, i: int) -> tuple:
    """Raw encoded bytes (a binary column) -> ``(bytes, None)`` to embed."""
    if not len(v):
        raise RecordProblem(REASON_IMAGE_EMPTY, f"{field}[{i}] holds zero image bytes")
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
                    raise RecordProblem(REASON_INVALID_FIELD, f"turn {turn}: text part without a string 'text'")
                pieces.append(text)
            elif isinstance(part, dict) and part.get("type") in ("image", "image_url"):
                pieces.append(IMAGE_TOKEN)
                part_paths.append(_part_image_path(part))
            else:
                raise RecordProblem(REASON_INVALID_FIELD, f"turn {turn}: unsupported content part {part!r:.80}; "
                                                     "expected {'type': 'text'|'image'|'image_url', ...}")
        return "".join(pieces)
    raise RecordProblem(REASON_INVALID_FIELD, f"turn {turn}: content must be a string or a list of parts, "
                                         f"got {type(content).__name__}")


def _messages(record: dict) -> tuple[list[dict], list[Any], int]:
    if "conversations" in record and record["conversations"] is not None:
        key, role_key, text_key = "conversations", "from", "value"
    elif "messages" in record and record["messages"] is not None:
        key, role_key, text_key = "messages", "role", "content"
    elif "texts" in record and record["texts"] is not None:
        return _texts_messages(record["texts"])
    else:
        raise RecordProblem(REASON_MISSING_FIELD, "missing required field 'conversations' (LLaVA: "
                                             "[{'from', 'value'}]), 'messages' (ShareGPT: [{'role', 'content'}]) "
                                             "or 'texts' (the Cauldron: [{'user', 'assistant'}])")
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise RecordProblem(REASON_INVALID_FIELD, f"field {key!r} must be a non-empty list of turns")
    messages, part_paths, n_parts = [], [], 0
    # Tolerate the other flavour's key names inside a turn (ShareGPT files with from/value exist).
    alt_role, alt_text = ("role", "content") if role_key == "from" else ("from", "value")
    for t, turn in enumerate(turns):
        if type(turn) is not dict and not isinstance(turn, dict):
            raise RecordProblem(REASON_INVALID_FIELD, f"{key}[{t}] must be an object, got {type(turn).__name__}")
        role = turn.get(role_key)
        if role is None:
            role = turn.get(alt_role)
            if role is None:
                raise RecordProblem(REASON_MISSING_FIELD, f"{key}[{t}] has no {role_key!r}")
        norm = None
        if isinstance(role, str):
            norm = ROLE_ALIASES.get(role) or ROLE_ALIASES.get(role.lower())
        if norm is None:
            raise RecordProblem(REASON_INVALID_FIELD, f"{key}[{t}] has unknown role {role!r}; expected one of "
                                                 f"{sorted(ROLE_ALIASES)}")
        content = turn.get(text_key)
        if content is None:
            content = turn.get(alt_text)
            if content is None:
                raise RecordProblem(REASON_MISSING_FIELD, f"{key}[{t}] has no {text_key!r}")
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
        raise RecordProblem(REASON_INVALID_FIELD, "field 'texts' must be a non-empty list of {'user', 'assistant'}")
    messages = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordProblem(REASON_INVALID_FIELD, f"texts[{t}] must be an object, got {type(turn).__name__}")
        user, answer = turn.get("user"), turn.get("assistant")
        if not isinstance(user, str):
            raise RecordProblem(REASON_MISSING_FIELD if user is None else REASON_INVALID_FIELD,
                           f"texts[{t}] needs a string 'user'")
        if answer is not None and not isinstance(answer, str):
            raise RecordProblem(REASON_INVALID_FIELD, f"texts[{t}]['assistant'] must be a string")
        messages.append({"role": "user", "content": user})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    return messages, [], 0


def parse_record(record: Any, *, index: int, line: int | None, resolve: ImageResolver,
                 id_field: str = "id", sample_id: str | None = None, where: str | None = None,
                 local: int | None = None, source_field: str | None = None) -> Sample:
    """Normalise one parsed record into a :class:`Sample` (raises ``RecordProblem`` for per-sample issues).

    ``where`` (the file's name) and ``local`` (the record's index in it) name embedded images that
    carry no name of their own: ``"<file>#<local>/image<i>"``. ``source_field`` picks
    ``Sample.source`` as for :func:`record_source`.
    """
    sid = sample_id if sample_id is not None else record_id(record, id_field)
    messages, part_paths, n_parts = _messages(record)
    if "images" in record and record["images"] is not None:
        raw = _image_refs(record["images"], "images")
    elif "image" in record and record["image"] is not None:
        raw = _image_refs(record["image"], "image")
    else:
        raw = []
    return _assemble(sid, messages, part_paths, n_parts, raw, record_source(record, source_field), index, line,
                     record, resolve, where, local)


def _assemble(sid: str, messages: list[dict], part_paths: list[Any], n_parts: int, raw: list[Any],
              source: str | None, index: int, line: int | None, record: Any, resolve: ImageResolver,
              where: str | None, local: int | None) -> Sample:
    """The rules :func:`parse_record` feeds per record dict: images from content parts, the
    placeholder rule, names for unnamed embedded images, path resolution. ``raw`` holds the image
    refs of :func:`_image_refs`. (:class:`~.arrow.ArrowPlan` applies the same rules to the plain rows
    of Arrow batches in native code; the tests pin the two equal.)"""
    if not raw and n_parts:
        if any(p is None for p in part_paths):
            raise RecordProblem(REASON_MISSING_FIELD, "content has image parts without a path and the record "
                                                 "has no 'images' list")
        raw = _image_refs(part_paths, "content")
    n_placeholders = 0
    for t, m in enumerate(messages):
        text = m["content"]
        n_placeholders += text.count(IMAGE_TOKEN)
        if not text.isascii() and _SURROGATE.search(text):  # a tokenizer cannot take it (nor UTF-8)
            raise RecordProblem(REASON_INVALID_FIELD, f"message {t} ({m['role']}) holds {_surrogate_text(text)}, "
                                                 "which is not valid Unicode text; fix the text of this record")
    if raw and n_placeholders == 0:
        # LLaVA convention (and the Cauldron's): images go before the first user text.
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise RecordProblem(REASON_PLACEHOLDER_MISMATCH, "the record has images but no user turn to hold them")
        first_user["content"] = (IMAGE_TOKEN + "\n") * len(raw) + first_user["content"]
    elif n_placeholders != len(raw):
        raise RecordProblem(REASON_PLACEHOLDER_MISMATCH,
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
                raise RecordProblem(e.reason, str(e)) from None
    return Sample(sid, images, messages, source, index, line, record)


def record_source(record: Any, source_field: str | None = None) -> str | None:
    """The source (dataset, subset) a raw record belongs to, as a string; ``None`` if it names none.

    Parameters
    ----------
    record : dict
        A raw record, as a container yields it.
    source_field : str, optional
        ``None`` (the default, and ``Sample.source``): the first of :data:`SOURCE_FIELDS` holding a
        non-empty string or integer, else the Cauldron's ``texts[0]["source"]``. A field name: that
        field only. :data:`IMAGE_FOLDER`: the first folder of the record's image path (see
        :func:`image_folder`), for datasets that name no source but file their images by it.

    Examples
    --------
    >>> record_source({"id": "1", "image": "coco/train2017/1.jpg", "data_source": "vqa"})
    'vqa'
    >>> record_source({"id": "1", "image": "coco/train2017/1.jpg"}, IMAGE_FOLDER)
    'coco'
    """
    if not isinstance(record, dict):
        return None
    if source_field is not None:
        return image_folder(record) if source_field == IMAGE_FOLDER else _source_text(record.get(source_field))
    for f in SOURCE_FIELDS:
        v = _source_text(record.get(f))
        if v is not None:
            return v
    texts = record.get("texts")  # the Cauldron names the source per exchange
    if isinstance(texts, list) and texts and isinstance(texts[0], dict):
        return _source_text(texts[0].get("source"))
    return None


def _source_text(v: Any) -> str | None:
    """A source value as text: a non-empty string or an integer; ``None`` for anything else."""
    if isinstance(v, (str, int)) and not isinstance(v, bool) and str(v):
        return str(v)
    return None


#: the ``source_field`` that reads no field: the first folder of the image path (LLaVA-665K names no
#: source, but files its images under ``coco/``, ``gqa/``, ``ocr_vqa/``, ``textvqa/``, ``vg/``)
IMAGE_FOLDER = "image_folder"


def image_folder(record: dict) -> str | None:
    """The first folder of the record's first image path as written (``"coco/train2017/1.jpg"`` ->
    ``"coco"``; a leading ``/`` or ``./`` is skipped); ``None`` for a record without an image path
    (text-only, embedded bytes, a bare file name)."""
    value = record.get("images")
    if value is None:
        value = record.get("image")
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if isinstance(value, dict):  # a Hugging Face Image struct: its path
        value = value.get("path")
    if not isinstance(value, str):
        return None
    parts = [p for p in re.split(r"[/\\]", value) if p not in ("", ".")]
    return parts[0] if len(parts) > 1 else None


def source_columns(source_field: str | None = None) -> tuple[str, ...]:
    """The record fields :func:`record_source` reads for ``source_field`` (what a column-wise pass
    over Arrow data must load)."""
    if source_field is None:
        return (*SOURCE_FIELDS, "texts")
    return ("images", "image") if source_field == IMAGE_FOLDER else (source_field,)


def ids_of_records(iter_records: Callable[[InputFile], Iterator[tuple]]) -> Callable:
    """A container's ``ids`` hook (see :class:`~.sources.Container`) that reads whole records with
    ``iter_records`` and takes each one's id by these rules (for containers without an id column)."""
    def ids(file: InputFile, id_field: str):
        for local, _line, record in iter_records(file):
            if isinstance(record, dict) and id_field not in record:
                yield local, NO_ID_FIELD
            else:
                yield local, record_id_or_none(record, id_field)
    return ids
