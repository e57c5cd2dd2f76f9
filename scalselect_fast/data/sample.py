"""The in-memory form of one dataset record, and the errors the data layer raises.

A :class:`Sample` is what every reader yields, whatever the file format: an id, the resolved image
paths, the conversation as ``{"role", "content"}`` messages, and enough provenance (record index,
line, the untouched original record) to point a user at the exact record and to write the record
back out unchanged. It holds no pixels: images are decoded later, by :func:`~scalselect_fast.data.
images.load_image`, so reading stays cheap and streaming.

Image placeholders
------------------
Every image of a sample is represented in the text by exactly one :data:`IMAGE_TOKEN` (``"<image>"``)
inside some message's ``content``, in the same order as ``Sample.images``: the *i*-th placeholder
(counting across messages, left to right) is ``images[i]``. Readers normalise the input to this rule:

* LLaVA text already carries ``<image>``; it is kept where it is.
* ShareGPT content given as a list of parts gets one ``<image>`` per image part, at the part's place.
* A sample with images but no placeholder at all (common in LLaVA-style data, where the trainer
  prepends it) gets one ``<image>\\n`` per image prepended to its first user message; this is what
  LLaVA's own preprocessing does.
* Any other mismatch (placeholders without images, or counts that differ) is ambiguous, so the
  sample is rejected with reason :data:`REASON_PLACEHOLDER_MISMATCH`.

Model adapters that need another convention (Qwen2-VL's ``<|vision_start|>…``, content parts for
``apply_chat_template``) rebuild it from this one, e.g. with :meth:`Sample.to_chat`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: The image placeholder inside message text; one per image, in ``Sample.images`` order.
IMAGE_TOKEN = "<image>"

#: Message roles after normalisation.
ROLES = ("system", "user", "assistant")

# Skip reasons written to ``skipped.jsonl`` (stable strings: reports group by them).
REASON_MISSING_FIELD = "missing_field"
REASON_INVALID_FIELD = "invalid_field"
#: an id holding a line break (``\n`` / ``\r``: ids are stored one per line) or a lone surrogate (no UTF-8
#: form): it cannot be kept
REASON_INVALID_ID = "invalid_id"
REASON_IMAGE_OUTSIDE_ROOT = "image_outside_root"
REASON_PLACEHOLDER_MISMATCH = "image_placeholder_mismatch"
REASON_IMAGE_MISSING = "image_missing"
REASON_IMAGE_UNREADABLE = "image_unreadable"
REASON_IMAGE_CORRUPT = "image_corrupt"
REASON_IMAGE_TRUNCATED = "image_truncated"
REASON_IMAGE_TOO_LARGE = "image_too_large"
#: an embedded image struct with neither bytes nor a path (``{"bytes": null, "path": null}``)
REASON_IMAGE_EMPTY = "image_empty"


class DatasetError(ValueError):
    """The dataset file (or one record of it) cannot be used.

    The message names the file and, where there is one, the record index and line, and says what
    to fix. ``reason`` is a stable short code (one of the ``REASON_*`` constants for per-sample
    problems, or ``"malformed"``, ``"duplicate_id"``, ``"empty"``, ``"format"``, ``"io"``,
    ``"selection"`` for file-level ones).
    """

    def __init__(self, message: str, *, reason: str = "invalid", path: str | None = None,
                 index: int | None = None, line: int | None = None, sample_id: str | None = None):
        super().__init__(message)
        self.reason = reason
        self.path = path
        self.index = index
        self.line = line
        self.sample_id = sample_id


class ImageError(ValueError):
    """An image could not be loaded; ``path`` is the file and ``reason`` a ``REASON_IMAGE_*`` code."""

    def __init__(self, message: str, *, path: str, reason: str):
        super().__init__(message)
        self.path = path
        self.reason = reason


# Hashable but not frozen, for the reason given at Sample: a frozen dataclass's __init__ costs 2.4x
# more, once per image. Treat it as read-only all the same.
@dataclass(slots=True, unsafe_hash=True)
class EmbeddedImage:
    """An image whose encoded bytes travel inside the dataset (Parquet ``Image`` struct, binary column,
    WebDataset member, ``datasets`` row), decoded from memory by :func:`~scalselect_fast.data.images.
    load_image` with the same ``ImageError`` reasons as a file; no temporary file is written.

    Attributes
    ----------
    data : bytes
        The encoded image (PNG, JPEG, WebP, ...), exactly as stored.
    name : str
        What to call it in messages and skip logs: the struct's ``path``, the tar member's name, or
        ``"<shard>#<record>/image<i>"`` when the dataset gives none.
    """

    data: bytes = field(repr=False)
    name: str

    def __fspath__(self) -> str:  # so error messages and os.fspath() name it; never opened as a file
        return self.name


class UnusableRecord:
    """Yielded by a container in place of a record it cannot turn into one (e.g. a WebDataset key with
    images but no ``.json``); the readers skip it with ``reason`` and ``detail``, as any bad record."""

    __slots__ = ("sample_id", "reason", "detail")

    def __init__(self, sample_id: str | None, reason: str, detail: str):
        self.sample_id = sample_id
        self.reason = reason
        self.detail = detail

    def __repr__(self) -> str:
        return f"UnusableRecord({self.sample_id!r}, {self.reason!r})"


#: What one entry of ``Sample.images`` is: a resolved file path or an image carried in the dataset.
ImageRef = "str | EmbeddedImage"


# Not frozen: a frozen dataclass's __init__ goes through object.__setattr__ per field, which was a
# measurable share of reading time at millions of samples. Treat samples as read-only all the same.
@dataclass(slots=True)
class Sample:
    """One record of a multimodal instruction dataset, normalised.

    Attributes
    ----------
    id : str
        The record's ``id`` field as a string (integer ids are converted with ``str``).
    images : list[str | EmbeddedImage]
        Absolute, symlink-resolved image paths, or :class:`EmbeddedImage` for images stored inside
        the dataset, in placeholder order (see the module notes). Empty for text-only samples.
        Existence is not checked here: :func:`load_image` does that.
    messages : list[dict]
        ``{"role": "system" | "user" | "assistant", "content": str}`` in conversation order, with one
        ``"<image>"`` placeholder per image.
    source : str or None
        The record's source as :func:`~.records.record_source` reads it with the reader's
        ``source_field`` (by default the first of ``source`` / ``dataset`` / ``data_source`` /
        ``task`` / ``task_type`` / ``category`` present, as a string), for per-source counts.
    index : int
        0-based position of the record in the file (counting every record, skipped ones included).
    line : int or None
        1-based line where the record starts (JSON and JSONL); ``None`` for Parquet.
    raw : dict
        The original record as parsed, never modified by the readers.
    """

    id: str
    images: list  # list[str | EmbeddedImage]
    messages: list[dict]
    source: str | None
    index: int
    line: int | None
    raw: dict = field(repr=False, compare=True)

    @property
    def where(self) -> str:
        """``"record 12 (line 240)"``: where to look in the file."""
        return position_text(self.index, self.line)

    def to_chat(self) -> list[dict[str, Any]]:
        """Messages as content-part lists for ``processor.apply_chat_template``.

        Each ``"<image>"`` placeholder becomes ``{"type": "image", "path": <abs path>}`` and the text
        around it ``{"type": "text", "text": ...}`` (empty text pieces are dropped; the newline that
        conventionally follows a placeholder is kept in the text so no character is lost).

        Returns
        -------
        list of dict
            ``[{"role": str, "content": [part, ...]}, ...]``.
        """
        images = iter(self.images)
        chat = []
        for msg in self.messages:
            pieces = msg["content"].split(IMAGE_TOKEN)
            parts: list[dict[str, Any]] = []
            for j, text in enumerate(pieces):
                if j:
                    parts.append({"type": "image", "path": next(images)})
                if text:
                    parts.append({"type": "text", "text": text})
            chat.append({"role": msg["role"], "content": parts})
        return chat


class LazyRow:
    """``Sample.raw`` of the rows of one Arrow record batch read column-wise, shared by all of them:
    a row's dict (exactly its ``batch.to_pylist()`` entry) is built on first access of
    ``Sample.raw``, from the sample's ``index``, since reading needs only a few columns and most
    samples' ``raw`` is never looked at."""

    __slots__ = ("batch", "index")

    def __init__(self, batch: Any, index: int):
        self.batch = batch
        self.index = index  # the record index of the batch's first row

    def row(self, index: int) -> dict:
        """The dict of record ``index`` (of this batch)."""
        return self.batch.slice(index - self.index, 1).to_pylist()[0]


raw_slot = Sample.raw  # the slot's own descriptor, wrapped below


def _get_raw(self: Sample) -> dict:
    value = raw_slot.__get__(self, Sample)
    if type(value) is LazyRow:
        value = value.row(self.index)
        raw_slot.__set__(self, value)
    return value


# ``raw`` stays an ordinary field (constructor argument, equality, pickling) whose value may be a
# LazyRow; reading it always gives the dict.
Sample.raw = property(_get_raw, raw_slot.__set__, doc="The original record as parsed (see the class notes).")


def position_text(index: int | None, line: int | None) -> str:
    if index is None:
        return f"line {line}" if line is not None else "?"
    return f"record {index}" + (f" (line {line})" if line is not None else "")
