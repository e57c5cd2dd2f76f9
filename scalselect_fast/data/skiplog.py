"""``skipped.jsonl``: the append-only record of every sample a stage did not use, and why.

One JSON object per line: ``{"id", "index", "reason", "detail", ...extra}``. Lines end with ``\\n``
and nothing else: U+0085, U+2028 and U+2029 (line breaks to ``str.splitlines`` and to some editors)
and lone surrogates (no UTF-8 form) are written as ``\\uXXXX`` escapes, and :func:`read_skip_log`
splits on ``\\n`` only, so an id holding one of them never splits an entry. Lines are appended with
a single ``write`` on an ``O_APPEND`` descriptor (so a crash leaves at most one torn final line, and
several processes can append to one file without interleaving lines), and flushed to the OS at once,
so a ``kill -9`` loses nothing already reported. Reopening the file (a resumed run) reads the
existing entries, drops a torn final line, and ignores re-reports of an entry already present, so a
stage that re-processes its last unfinished shard does not duplicate lines.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path


#: characters JSON leaves raw that ``str.splitlines`` (and some editors) take for line breaks
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


#: a lone UTF-16 surrogate (an id or detail read from ``"\ud800"`` in JSON): no UTF-8 encoding exists
_SURROGATE = re.compile("[\ud800-\udfff]")


def _dumps(entry: dict) -> str:
    # readable UTF-8 for everything else; in JSON these three can only occur inside strings, where the
    # \uXXXX escape reads back as the same character
    text = json.dumps(entry, ensure_ascii=False).translate(_LINE_BREAKS)
    if not text.isascii():  # lone surrogates as \uXXXX too: read back, they are the same string
        text = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return text


def read_skip_log(path: str | os.PathLike) -> list[dict]:
    """The entries of a ``skipped.jsonl`` in file order (``[]`` if it does not exist).

    Lines are split on ``\\n`` only; a torn last line (a crash mid-write) and lines that are not JSON
    objects are ignored.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


#: what to check first for the most common reason a whole dataset is skipped
_HINTS = {
    "missing_field": "the records lack a field the readers need: check the layout (LLaVA conversations, "
                     "ShareGPT messages or the Cauldron's texts) and, for ids, --id-field",
    "invalid_field": "a field has the wrong type: check the record layout",
    "image_outside_root": "check --image-root (image paths must resolve inside it)",
    "image_missing": "check --image-root (the folder the image paths are relative to)",
    "text_only": "no record has an image; ScalSelect ranks samples by their visual tokens",
    "image_empty": "the image structs hold neither bytes nor a path",
    "image_placeholder_mismatch": "the number of <image> placeholders does not match the images",
}


def summarize_skips(counts: "dict[str, int] | Counter", example: dict | None = None, top: int = 3) -> str:
    """One line naming the most common skip reasons with their counts and one example record.

    Parameters
    ----------
    counts : mapping of reason -> number of records
    example : dict, optional
        One skip entry of the most common reason (``{"id", "index", "detail", "file"?, "line"?}``).
    top : int
        Reasons named; the rest are counted together.

    Returns
    -------
    str
        ``"missing_field: 400 (e.g. record 0 of a.parquet: missing required field 'id' ...)"``, then
        what to check for that reason.
    """
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
    parts = [f"{reason}: {n}" for reason, n in ranked[:top]]
    if len(ranked) > top:
        parts.append(f"{len(ranked) - top} other reason(s): {sum(n for _r, n in ranked[top:])}")
    text = ", ".join(parts) or "no reason recorded"
    if example is not None:
        where = f"record {example.get('index')}"
        if example.get("line") is not None:
            where += f" (line {example['line']})"
        if example.get("file"):
            where += f" of {example['file']}"
        if example.get("id") is not None:
            where += f", id {example['id']!r}"
        detail = str(example.get("detail") or "").splitlines()[0] if example.get("detail") else ""
        text += f" (e.g. {where}: {detail[:300]})" if detail else f" (e.g. {where})"
    hint = _HINTS.get(ranked[0][0]) if ranked else None
    return text + (f"; {hint}" if hint else "")


def summarize_skip_log(path: str | os.PathLike, top: int = 3) -> str:
    """:func:`summarize_skips` of a ``skipped.jsonl`` (its first entry of the most common reason)."""
    entries = read_skip_log(path)
    counts = Counter(e.get("reason") for e in entries)
    first = min(counts, key=lambda r: (-counts[r], str(r))) if counts else None  # summarize_skips' order
    example = next((e for e in entries if e.get("reason") == first), None)
    return summarize_skips(counts, example, top)


class DiscardSkips:
    """A skip log that keeps nothing: for a second read of a dataset whose skips were already logged
    (or do not matter to the reader), so :func:`~.readers.read_dataset` goes past bad records instead
    of raising on the first."""

    def add(self, *args, **kwargs) -> bool:
        """Accept and forget one skipped sample; ``False``: nothing new was recorded."""
        return False


class SkipLog:
    """Append-only, resumable writer of ``skipped.jsonl``.

    Parameters
    ----------
    path : str or path-like
        The file; created (with parent folders) if missing, otherwise resumed.

    Notes
    -----
    An entry's identity is ``(id, index, reason)``: adding it again is a no-op, so the same sample
    may appear once per distinct reason (e.g. skipped by two stages for two causes).

    Examples
    --------
    >>> with SkipLog(tmp / "skipped.jsonl") as log:            # doctest: +SKIP
    ...     log.add("s1", 4, "image_missing", "image '/d/a.png' does not exist")
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._entries: list[dict] = []
        self._keys: set[tuple] = set()
        self._pairs: set[tuple] = set()
        self._load_existing()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _load_existing(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        good_end = data.rfind(b"\n") + 1
        if good_end < len(data):
            # A torn last line from a crash: cut it so the next append starts on a fresh line.
            with open(self.path, "rb+") as fh:
                fh.truncate(good_end)
        for lineno, raw in enumerate(data[:good_end].split(b"\n"), start=1):
            if not raw.strip():
                continue
            try:
                entry = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.path}: line {lineno} is not valid JSON ({e.msg}); this file is "
                                 "written only by scalselect: move it away to start a fresh log") from None
            self._remember(entry)

    @staticmethod
    def _key(sample_id, index, reason) -> tuple:
        return (None if sample_id is None else str(sample_id), index, reason)

    def _remember(self, entry: dict) -> bool:
        key = self._key(entry.get("id"), entry.get("index"), entry.get("reason"))
        if key in self._keys:
            return False
        self._keys.add(key)
        self._pairs.add(key[:2])
        self._entries.append(entry)
        return True

    def add(self, sample_id: str | None, index: int | None, reason: str, detail: str = "", **extra) -> bool:
        """Record one skipped sample; return ``False`` if the same entry was already recorded.

        Parameters
        ----------
        sample_id : str or None
            The sample id (``None`` when the record has no usable id).
        index : int or None
            0-based record index in the dataset file.
        reason : str
            Stable short code (``image_missing``, ``text_only``, ...).
        detail : str
            Human-readable explanation naming the file/field and the fix.
        **extra
            Further JSON-serialisable fields (``line``, ``stage``, ``path``, ...).
        """
        if self._fd is None:
            raise ValueError(f"SkipLog {self.path} is closed")
        entry = {"id": None if sample_id is None else str(sample_id), "index": index, "reason": reason,
                 "detail": detail}
        entry.update({k: v for k, v in extra.items() if v is not None})
        if not self._remember(entry):
            return False
        line = (_dumps(entry) + "\n").encode()
        os.write(self._fd, line)  # one write on O_APPEND: no interleaving, no user-space buffer
        return True

    def __contains__(self, key) -> bool:
        """``(id, index, reason)`` or ``(id, index)`` (any reason) membership."""
        if len(key) == 3:
            return self._key(*key) in self._keys
        return self._key(key[0], key[1], None)[:2] in self._pairs

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[dict]:
        """All entries, existing ones first, in file order."""
        return list(self._entries)

    def counts(self) -> Counter:
        """Number of entries per reason."""
        return Counter(e.get("reason") for e in self._entries)

    def sync(self) -> None:
        """fsync the file (call at checkpoints; lines are already in the OS after every ``add``)."""
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> SkipLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # best effort; explicit close() / with-block is the contract
        fd = getattr(self, "_fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
