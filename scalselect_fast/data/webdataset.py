"""WebDataset tar shards: one sample per key, a ``{key}.json`` record plus the key's image members.

Layout read here (the WebDataset convention): a tar member ``dir/000123.0.jpg`` belongs to the
sample with key ``dir/000123`` and has the extension ``0.jpg`` (everything after the first dot of
the base name; the split follows ``webdataset.tariterators.base_plus_ext``).
A sample's members are contiguous in the tar. Per key:

* ``{key}.json`` holds the LLaVA (``conversations``) or ShareGPT (``messages``) record. Its id is
  the record's id field, or the key when the record has none.
* images are the members whose extension ends in an image suffix (``jpg``, ``jpeg``, ``png``,
  ``webp``, ``gif``, ``bmp``, ``tif``, ``tiff``): ``{key}.jpg`` for one image, ``{key}.0.jpg``,
  ``{key}.1.jpg`` ... for several (numeric order). A record that names its images (``image`` /
  ``images``) is matched by member name, by extension (``"0.jpg"``) or by base name; when the names
  do not match but the record names as many images as the key holds, they are taken in member
  order (records converted from LLaVA JSON keep their original paths). Images become
  :class:`~scalselect_fast.data.EmbeddedImage` named ``<shard>#<member>``; nothing is decoded here.

This module registers the ``"webdataset"`` container (one input file = one shard, recognised by
its ``ustar`` header), so ``--data`` takes a ``.tar``, a list, a directory or a glob of them, or a
brace pattern (``shard-{000000..000127}.tar``, expanded with ``braceexpand``, the package
``webdataset`` uses) like any input (:func:`~scalselect_fast.data.open_dataset`). Samples are
numbered globally: shards in sorted name order, then member order.

Why ``tarfile`` and not the ``webdataset`` package for the walk: the selection writer copies kept
samples byte for byte (tar headers included), which needs each member's byte offsets, and bad input
must be named exactly (shard, member, byte). ``webdataset``'s pipeline yields only names and bytes,
ends a shard quietly at a corrupt header, and turns a key that reappears later into a second sample;
here those are errors. Importing ``webdataset`` also imports torch (1.7 s here), which the data layer
does not otherwise need. What it would give is kept: the same key/extension rule and the same
brace expansion (``braceexpand``, its dependency); ``tests/test_data_layouts.py`` checks the grouping
against ``webdataset``'s own ``group_by_keys``.

Fatal (:class:`DatasetError`): a missing shard, a truncated or corrupt tar (named with the last good
member and the byte offset), a key that occurs twice in one shard, a key with two members of the
same extension, a ``.json`` member that is not a JSON object; across shards, a repeated id (the key,
for records without an id) is refused by the reader as for every layout. Per sample (skipped with a
reason, via :class:`~scalselect_fast.data.sample.UnusableRecord`): a key without a ``.json`` record
(``missing_record``), a record that names an image the key does not have (``image_missing``). A
member that is not really an image is found when it is decoded
(:func:`~scalselect_fast.data.load_image`: ``image_corrupt``).
"""
from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from .sample import REASON_IMAGE_MISSING, DatasetError, EmbeddedImage, UnusableRecord
from .records import record_id_or_none
from .sources import Container, open_dataset, register_container

#: Extension suffixes (lower case) whose members are images.
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"})
#: Skip reason of a key that has members but no ``.json`` record.
REASON_MISSING_RECORD = "missing_record"
_BLOCK = tarfile.BLOCKSIZE
_ZERO_BLOCK = bytes(_BLOCK)


def _base_plus_ext(name: str) -> tuple[str | None, str | None]:
    """``("dir/000123", "0.jpg")`` for ``"dir/000123.0.jpg"``: the key ends at the base name's first dot
    (WebDataset's rule); ``(None, None)`` when the base name has no dot or starts with one."""
    base = name.rfind("/") + 1
    dot = name.find(".", base)
    if dot <= base:
        return None, None
    return name[:dot], name[dot + 1:]


# --------------------------------------------------------------------------------------------------
# walking one shard
# --------------------------------------------------------------------------------------------------
@dataclass(slots=True)
class Member:
    """One regular file of a shard: its name, extension and byte span (headers + padded data)."""

    name: str
    ext: str  # lower case
    start: int  # first header block (pax / GNU long-name blocks included)
    data_start: int
    size: int
    data: bytes | None = field(default=None, repr=False)

    @property
    def end(self) -> int:
        """End of the member's padded data: ``[start, end)`` is the member, byte for byte."""
        return self.data_start + -(-self.size // _BLOCK) * _BLOCK


@dataclass(slots=True)
class KeyGroup:
    """The members of one sample key, in tar order."""

    key: str
    shard: str
    members: list[Member]

    def spans(self) -> list[tuple[int, int]]:
        """The members' byte spans, adjacent ones merged (usually one span per key)."""
        out: list[list[int]] = []
        for m in self.members:
            if out and out[-1][1] == m.start:
                out[-1][1] = m.end
            else:
                out.append([m.start, m.end])
        return [(a, b) for a, b in out]


def _corrupt(shard: str, last: str | None, offset: int, what: str) -> DatasetError:
    after = f"after member {last!r}" if last else "at its first member"
    return DatasetError(f"WebDataset shard {shard!r} is truncated or corrupt {after} (byte {offset}): {what}. "
                        "Re-download or re-create the shard", reason="malformed", path=shard)


def iter_key_groups(shard: str, want_data: Callable[[str], bool] = lambda ext: True,
                    opener: Callable[[str], BinaryIO] | None = None) -> Iterator[KeyGroup]:
    """Yield the shard's samples as :class:`KeyGroup` (members grouped by key), streaming.

    Parameters
    ----------
    shard : str
        Path of one tar shard (uncompressed tar).
    want_data : callable
        ``want_data(ext)``: read the member's bytes into ``Member.data`` (others are seeked over).
    opener : callable, optional
        ``opener(path)`` returning a seekable binary file (default: ``open(path, "rb")``).

    Raises
    ------
    DatasetError
        The shard is unreadable, truncated or corrupt; a key occurs in two separate runs; a key has
        two members with the same extension.
    """
    try:
        # a 1 MiB buffer: headers are 512-byte reads and small members sit in the same buffer
        # (3-15% faster walks in bench_data's tars than the default 8 KiB)
        fh = opener(shard) if opener is not None else open(shard, "rb", buffering=1 << 20)
    except OSError as e:
        raise DatasetError(f"cannot open WebDataset shard {shard!r}: {e.strerror or e}", reason="io",
                           path=shard) from None
    with fh:
        try:
            tf = tarfile.open(fileobj=fh, mode="r:")
        except (tarfile.TarError, EOFError) as e:
            raise DatasetError(f"{shard!r} is not a readable tar file ({e}); WebDataset shards are "
                               "uncompressed .tar files", reason="malformed", path=shard) from None
        keys_here: dict[str, int] = {}
        current: KeyGroup | None = None
        last: str | None = None
        while True:
            try:
                ti = tf.next()
            except (tarfile.TarError, EOFError, OSError) as e:
                raise _corrupt(shard, last, tf.offset, str(e)) from None
            tf.members = []  # tarfile keeps every header otherwise: O(members) memory
            if ti is None:
                break
            if not ti.isreg():
                continue
            name = ti.name
            key, ext = _base_plus_ext(name)
            if key is not None:
                ext = ext.lower()  # WebDataset compares extensions in lower case too
            data = None
            if key is not None and want_data(ext):
                fh.seek(ti.offset_data)
                data = fh.read(ti.size)
                if len(data) != ti.size:
                    raise _corrupt(shard, name, ti.offset_data + len(data),
                                   f"member {name!r} has {len(data)} of its {ti.size} bytes")
            last = name
            if key is None:  # no extension: not part of any sample (WebDataset ignores it too)
                continue
            if current is None or current.key != key:
                if current is not None:
                    yield current
                if key in keys_here:
                    raise DatasetError(f"{shard}: key {key!r} occurs twice (members {keys_here[key]} and "
                                       f"{name!r}); a sample's members must be contiguous and keys unique",
                                       reason="duplicate_id", path=shard, sample_id=key)
                keys_here[key] = name
                current = KeyGroup(key, shard, [])
            elif any(m.ext == ext for m in current.members):
                raise DatasetError(f"{shard}: key {key!r} has two members with extension {ext!r} ({name!r}); "
                                   "each extension may occur once per sample", reason="duplicate_id",
                                   path=shard, sample_id=key)
            current.members.append(Member(name, ext, ti.offset, ti.offset_data, ti.size, data))
        # tarfile ends quietly at a short or garbled header; a complete tar ends with zero blocks
        fh.seek(tf.offset)
        tail = fh.read(_BLOCK)
        if tail != _ZERO_BLOCK:
            raise _corrupt(shard, last, tf.offset, "no end-of-archive marker (the file is cut short)"
                           if len(tail) < _BLOCK else "an unreadable tar header")
        if current is not None:
            yield current


# --------------------------------------------------------------------------------------------------
# key groups -> records
# --------------------------------------------------------------------------------------------------
def _is_image(ext: str) -> bool:
    return ext.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


def _image_order(m: Member) -> tuple:
    head = m.ext.split(".", 1)[0]
    # {key}.jpg first, then {key}.0.jpg, {key}.1.jpg ... numerically, then any other name
    return (0, 0, "") if "." not in m.ext else ((1, int(head), "") if head.isdigit() else (2, 0, m.ext))


def _named_images(value: Any) -> list[Any] | None:
    if value is None:
        return None
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _parse_record(group: KeyGroup, rec_m: Member) -> dict:
    try:
        record = json.loads(rec_m.data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{group.shard}: member {rec_m.name!r} is not valid JSON ({e}); fix or re-create "
                           "the shard", reason="malformed", path=group.shard, sample_id=group.key) from None
    if not isinstance(record, dict):
        raise DatasetError(f"{group.shard}: member {rec_m.name!r} holds a {type(record).__name__}, expected "
                           "one JSON object (a LLaVA or ShareGPT record)", reason="malformed",
                           path=group.shard, sample_id=group.key)
    return record


def group_id(group: KeyGroup, id_field: str = "id") -> str | None:
    """The id the reader gives this key: the record's id field, else the key; ``None`` when the
    record's id is unusable (the reader skips such a record). Needs the ``.json`` member's data."""
    rec_m = next((m for m in group.members if m.ext == "json"), None)
    if rec_m is None:
        return group.key
    record = _parse_record(group, rec_m)
    if record.get(id_field) is None:
        return group.key
    return record_id_or_none(record, id_field)


def group_record(group: KeyGroup, id_field: str = "id") -> dict | UnusableRecord:
    """The record of one key with its images as :class:`EmbeddedImage` (in ``images``).

    The ``.json`` member is parsed; ``image`` / ``images`` are replaced by the key's image members
    (matched as described in the module notes); the id field defaults to the key.
    """
    shard = group.shard
    by_ext = {m.ext: m for m in group.members}
    rec_m = by_ext.get("json")
    images = sorted((m for m in group.members if _is_image(m.ext)), key=_image_order)
    if rec_m is None:
        return UnusableRecord(group.key, REASON_MISSING_RECORD,
                              f"{shard}: key {group.key!r} has members {[m.name for m in group.members]} but "
                              f"no {group.key}.json record; add the record or remove the members")
    record = _parse_record(group, rec_m)
    if record.get(id_field) is None:
        record[id_field] = group.key
    field_name = "images" if record.get("images") is not None else "image"
    named = _named_images(record.get(field_name))
    if named is None:
        chosen = images
    else:
        chosen = []
        by_name = {m.name: m for m in group.members}
        by_base = {m.name.rsplit("/", 1)[-1]: m for m in group.members}
        for v in named:
            if isinstance(v, dict):  # {"path": ...} style
                v = v.get("path")
            m = None
            if isinstance(v, str) and v:
                m = by_name.get(v) or by_ext.get(v.lower()) or by_base.get(v.rsplit("/", 1)[-1])
            if m is None:
                break
            chosen.append(m)
        if len(chosen) != len(named):
            if len(named) == len(images):  # paths kept from the source dataset: take members in order
                chosen = images
            else:
                return UnusableRecord(
                    str(record[id_field]), REASON_IMAGE_MISSING,
                    f"{shard}: the record of key {group.key!r} names {len(named)} image(s) "
                    f"({named!r:.120}) but the key has {len(images)} image member(s) "
                    f"{[m.name for m in images]}; add the images as {group.key}.jpg (or .0.jpg, .1.jpg ...)")
    record.pop("image", None)
    record["images"] = [EmbeddedImage(m.data, f"{shard}#{m.name}") for m in chosen]
    return record


def _want_read(ext: str) -> bool:
    return ext == "json" or _is_image(ext)


def iter_webdataset_records(spec, id_field: str = "id") -> Iterator[tuple[int, None, dict | UnusableRecord]]:
    """Yield ``(index, None, record)`` for every key of every shard, in global order (unvalidated:
    :func:`~scalselect_fast.data.read_dataset` checks ids and turns records into samples).

    Parameters
    ----------
    spec : str, path-like or list
        Shards: a ``.tar``, a brace pattern, a glob, a directory or a list (anything
        :func:`~scalselect_fast.data.open_dataset` accepts).
    id_field : str
        Record field holding the id (set to the key when absent).

    Yields
    ------
    tuple
        ``(index, None, record)``: ``record`` is a dict whose ``images`` are
        :class:`EmbeddedImage`, or an :class:`UnusableRecord` to be skipped with its reason.

    Raises
    ------
    DatasetError
        See the module notes.
    """
    index = 0
    for file in open_dataset(spec, "webdataset").files:
        for group in iter_key_groups(file.path, _want_read, shard_opener(file)):
            yield index, None, group_record(group, id_field)
            index += 1


def iter_shard_fields(file, id_field: str = "id") -> Iterator[dict]:
    """Every key's record without its images, reading only the ``.json`` members (the images are
    seeked over): the fields a pass over ids, sources and quota values needs. The id defaults to
    the key as in :func:`group_record`; a key without a record gives ``{}``.

    Parameters
    ----------
    file : InputFile
        One shard.
    """
    for group in iter_key_groups(file.path, lambda ext: ext == "json", shard_opener(file)):
        rec_m = next((m for m in group.members if m.ext == "json"), None)
        if rec_m is None:
            yield {}
            continue
        record = _parse_record(group, rec_m)
        if record.get(id_field) is None:
            record[id_field] = group.key
        yield record


# --------------------------------------------------------------------------------------------------
# the container (one input file = one shard)
# --------------------------------------------------------------------------------------------------
_COUNTS: dict[tuple, int] = {}


def shard_opener(file):
    """The ``opener`` :func:`iter_key_groups` takes for ``file``: ``None`` for a local shard, else one
    that opens it through its filesystem."""
    return None if getattr(file, "local", True) else (lambda _path: file.open())


def _iter_shard_file(file) -> Iterator[tuple[int, None, dict | UnusableRecord]]:
    """Container hook: the records of one shard (``file``: an ``InputFile``), numbered from 0."""
    for index, group in enumerate(iter_key_groups(file.path, _want_read, shard_opener(file))):
        yield index, None, group_record(group)


def _count_shard_file(file) -> int:
    """Container hook: the number of keys in one shard, from its headers alone (memoised per size
    and mtime, since a count walks the whole shard)."""
    key = None
    if getattr(file, "local", True):
        st = os.stat(file.path)
        key = (file.path, st.st_size, st.st_mtime_ns)
        if key in _COUNTS:
            return _COUNTS[key]
    n = sum(1 for _ in iter_key_groups(file.path, lambda ext: False, shard_opener(file)))
    if key is not None:
        if len(_COUNTS) > 4096:
            _COUNTS.clear()
        _COUNTS[key] = n
    return n


def _shard_ids(file, id_field: str) -> Iterator[tuple[int, str | None]]:
    """Container hook: every key's id, reading only the ``.json`` members (images are seeked over);
    ``None`` for a key without a record (the reader skips it)."""
    groups = iter_key_groups(file.path, lambda ext: ext == "json", shard_opener(file))
    for index, group in enumerate(groups):
        has_record = any(m.ext == "json" for m in group.members)
        yield index, group_id(group, id_field) if has_record else None


def _sniff_tar(head: bytes, name: str) -> bool:
    return head[257:262] == b"ustar"  # POSIX "ustar\0" and GNU "ustar  " headers alike


register_container(Container("webdataset", iter_records=_iter_shard_file, count=_count_shard_file,
                             sniff=_sniff_tar, extensions=(".tar",), ids=_shard_ids))
