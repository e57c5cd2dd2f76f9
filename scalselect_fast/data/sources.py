"""What ``--data`` names: one file, a directory, a glob, a list of them, a URL, or a ``datasets`` object.

:func:`open_dataset` turns any of these into a :class:`DataSource`: the sorted list of input files,
the one container they share, and a global record numbering (sorted file names, then row order),
so extraction shards, resume and the manifest stay fixed however the dataset is split into files.
It does not parse records into samples (that is :mod:`.records`, driven by :mod:`.readers`) and
writes nothing.

Containers are pluggable: a container is a :class:`Container` (how to recognise a file, count its
records and iterate them) added with :func:`register_container`. Each one is a module of its own
that registers itself (:mod:`.json_list`, :mod:`.jsonl`, :mod:`.parquet`, :mod:`.hf`,
:mod:`.webdataset`); a new container is one such module plus one import line in
``scalselect_fast/data/__init__.py``. :func:`formats` lists the ``--format`` values they make.
This module imports none of them: they import it.

Remote inputs
-------------
Anything with a ``scheme://`` (``s3://``, ``gs://``, ``hf://``, ``memory://``, ``file://``) is opened
through :mod:`fsspec` with the scheme's backend (``s3fs``, ``gcsfs``, ``huggingface_hub``); a missing
backend or an unreachable URL is a one-line :class:`DatasetError`, never a traceback. Local paths
never go through fsspec.
"""
from __future__ import annotations

import bisect
import functools
import glob as _glob
import hashlib
import os
import posixpath
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .sample import DatasetError

__all__ = ["Container", "DataSource", "InputFile", "register_container", "containers", "formats", "open_dataset",
           "input_files", "check_data_argument", "sniff_container", "as_input_file", "SNIFF_BYTES", "NO_ID_FIELD",
           "hash_file"]


class _NoIdField:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NO_ID_FIELD"


#: what a container's ``ids`` hook yields for a record that has no id field at all (it may then be
#: named by its position: :class:`~.records.IdRule`)
NO_ID_FIELD = _NoIdField()

#: bytes read from the start of each file to recognise its container
SNIFF_BYTES = 4096
#: files at most this large are hashed whole by :meth:`DataSource.fingerprint`; larger binary
#: containers (Parquet, Arrow, tar) by size + first and last MiB (their footers/indexes live there)
_HASH_WHOLE_MAX = 4 << 20
_EDGE = 1 << 20


# --------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputFile:
    """One input file, local or remote.

    Attributes
    ----------
    path : str
        Local absolute path, or the URL as given (``memory://d/train-0.parquet``).
    fs : fsspec.AbstractFileSystem or None
        The filesystem of a remote file; ``None`` for a local one.
    fs_path : str
        The path inside ``fs`` (equals ``path`` for local files).
    """

    path: str
    fs: Any = field(default=None, compare=False, repr=False)
    fs_path: str = ""

    @property
    def local(self) -> bool:
        return self.fs is None

    @functools.cached_property
    def name(self) -> str:  # cached: read once per record for messages and embedded-image names
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def base_dir(self) -> str | None:
        """Directory that relative image paths are relative to (``None`` for a remote file)."""
        return os.path.dirname(os.path.realpath(self.path)) if self.local else None

    def open(self):
        """Open for binary reading; a :class:`DatasetError` (reason ``"io"``) names the file on failure."""
        try:
            if self.fs is None:
                return open(self.path, "rb")
            return self.fs.open(self.fs_path, "rb")
        except Exception as e:  # OSError locally; backends raise their own (ClientError, HTTPError ...)
            raise self._unreadable(e) from None

    def _unreadable(self, e: BaseException) -> DatasetError:
        why = _why(e) if self.fs is None else _why_remote(e)
        return DatasetError(f"cannot read dataset {self.path!r}: {why}", reason="io", path=self.path)

    def size(self) -> int:
        """Bytes of the file (of its member files, for a dataset folder)."""
        try:
            if self.fs is None and os.path.isdir(self.path):
                return sum(os.path.getsize(p) for _n, p in folder_members(self.path))
            return os.path.getsize(self.path) if self.fs is None else int(self.fs.size(self.fs_path))
        except Exception as e:
            raise self._unreadable(e) from None

    def head(self, n: int = SNIFF_BYTES) -> bytes:
        with self.open() as fh:
            try:
                return fh.read(n)
            except Exception as e:
                raise self._unreadable(e) from None


def as_input_file(path: "str | os.PathLike | InputFile") -> InputFile:
    """``path`` as a local :class:`InputFile` (an :class:`InputFile` is returned as it is)."""
    if isinstance(path, InputFile):
        return path
    p = os.fspath(path)
    return InputFile(p, None, p)


_DIGESTS: dict[tuple, str] = {}


def folder_members(path: str) -> list[tuple[str, str]]:
    """The files that make up a dataset folder (``save_to_disk``): ``(name relative to the folder,
    absolute path)``, sorted by name.

    ``state.json`` names the Arrow files ``load_from_disk`` reads; those, ``state.json`` and
    ``dataset_info.json`` are the members (a ``cache-*.arrow`` left by a ``map`` is not data). A
    folder whose ``state.json`` cannot be read lists every non-hidden file in it instead.
    """
    import json

    try:
        with open(os.path.join(path, "state.json"), encoding="utf-8") as fh:
            state = json.load(fh)
        names = [d["filename"] for d in state["_data_files"]] + ["state.json", "dataset_info.json"]
    except (OSError, ValueError, KeyError, TypeError):
        names = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            names.extend(os.path.relpath(os.path.join(dirpath, f), path) for f in filenames if not f.startswith("."))
    return sorted((n.replace(os.sep, "/"), os.path.join(path, n)) for n in set(names)
                  if os.path.isfile(os.path.join(path, n)))


def _stat_key(f: InputFile) -> tuple:
    """(size, modification time, ...): what :meth:`DataSource.digest` memoises on. Locally the change
    time and inode too, which no writer can set back (``touch -r`` / ``os.utime`` restore the mtime):
    an edit that keeps size and mtime must not be answered with the old file's digest."""
    if f.local:
        if os.path.isdir(f.path):  # a dataset folder: its member files' sizes and times
            return tuple((n, *_file_stat(p)) for n, p in folder_members(f.path))
        return _file_stat(f.path)
    info = f.fs.info(f.fs_path)
    return info.get("size"), str(info.get("mtime") or info.get("LastModified") or info.get("ETag") or "")


def _file_stat(path: str) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def _why_remote(e: BaseException) -> str:
    """:func:`_why`, saying which limit a timeout is (a timeout's own text is empty)."""
    import asyncio

    if isinstance(e, (TimeoutError, asyncio.TimeoutError)):  # distinct classes before Python 3.11
        return f"no answer within {url_timeout():g} s; SCALSELECT_URL_TIMEOUT_S sets the limit"
    return _why(e)


def _why(e: BaseException) -> str:
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return text.splitlines()[0] if text else type(e).__name__


# --------------------------------------------------------------------------------------------------
# containers
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Container:
    """How to read one kind of dataset file.

    Attributes
    ----------
    name : str
        The ``--format`` value (``"json"``, ``"parquet"``, ...).
    iter_records : callable
        ``iter_records(file: InputFile) -> Iterator[(index, line, record)]``: every record of one
        file in order, ``index`` counting from 0 in that file, ``line`` the 1-based line where the
        record starts (``None`` where lines mean nothing), ``record`` a dict (image fields may hold
        ``EmbeddedImage``, raw bytes or HF ``Image`` structs). Fatal problems raise
        :class:`DatasetError` naming the file.
    count : callable
        ``count(file: InputFile) -> int``: number of records, as cheaply as the container allows.
    sniff : callable, optional
        ``sniff(head: bytes, name: str) -> bool``: whether a file whose first :data:`SNIFF_BYTES`
        bytes are ``head`` is of this container (``format="auto"``).
    extensions : tuple of str
        File name endings picked up when ``--data`` is a directory.
    is_dataset_dir : callable, optional
        ``is_dataset_dir(path: str) -> bool`` for containers whose unit is a directory
        (``datasets.save_to_disk``); such a directory is one input, not a folder of files.
    dataset_dir : callable, optional
        ``dataset_dir(path: str) -> str``: the folder to read for a dataset directory the user named
        (a ``DatasetDict`` folder: its one split, or a :class:`DatasetError` listing the splits).
    schema : callable, optional
        ``schema(file)`` returns a value comparable with ``==`` (and, for the message, with a
        ``diff(other) -> str`` method or a ``str``); shards of one input whose schemas differ are
        refused, naming the first file and the one that differs.
    ids : callable, optional
        ``ids(file, id_field) -> Iterator[(index, id or None)]``: the id of every record (``None``
        where it has no usable one, :data:`NO_ID_FIELD` where it has no ``id_field`` at all),
        without the rest of the record where the container allows (a Parquet column), for the
        duplicate-id check before a run; it also counts the records.
    iter_batches : callable, optional
        ``iter_batches(file, columns=None) -> Iterator[pyarrow.RecordBatch]`` for Arrow-backed
        containers: the same rows as ``iter_records``, in the same order, as record batches, so the
        readers can take the columns a sample needs without building every row as a dict
        (``iter_records`` must be ``to_pylist`` of these batches); with ``columns``, only those of
        them the file has.
    wraps : callable, optional
        ``wraps(obj) -> bool`` for containers that also read an in-memory dataset object (a
        ``datasets.Dataset``): whether ``obj`` is one, decided without importing its library.
    object_source : callable, optional
        ``object_source(obj) -> DataSource`` for an object that ``wraps`` accepts.
    """

    name: str
    iter_records: Callable[[InputFile], Iterator[tuple[int, int | None, Any]]]
    count: Callable[[InputFile], int]
    sniff: Callable[[bytes, str], bool] | None = None
    extensions: tuple[str, ...] = ()
    is_dataset_dir: Callable[[str], bool] | None = None
    dataset_dir: Callable[[str], str] | None = None
    schema: Callable[[InputFile], Any] | None = None
    ids: Callable[[InputFile, str], Iterator[tuple[int, str | None]]] | None = None
    iter_batches: Callable[[InputFile], Iterator[Any]] | None = None
    wraps: Callable[[Any], bool] | None = None
    object_source: Callable[[Any], "DataSource"] | None = None


_CONTAINERS: dict[str, Container] = {}


def register_container(container: Container) -> Container:
    """Make ``container`` known to :func:`open_dataset` (``format=container.name`` and sniffing)."""
    _CONTAINERS[container.name] = container
    return container


def containers() -> dict[str, Container]:
    """The registered containers by name, in registration order (the order sniffing tries them)."""
    return dict(_CONTAINERS)


def formats() -> tuple[str, ...]:
    """The ``--format`` values: ``"auto"`` and every registered container's name."""
    return ("auto", *_CONTAINERS)


def _object_container(obj: Any) -> Container | None:
    """The container that reads the in-memory dataset object ``obj``, if one does."""
    for c in _CONTAINERS.values():
        if c.wraps is not None and c.wraps(obj):
            return c
    return None


def sniff_container(file: InputFile) -> str:
    """The container ``file``'s first bytes (and name) say it is; :class:`DatasetError` if none."""
    head = file.head()
    for c in _CONTAINERS.values():
        if c.sniff is not None and c.sniff(head, file.name):
            return c.name
    if not head.lstrip(b"\xef\xbb\xbf").strip():
        raise DatasetError(f"dataset {file.path!r} is empty (no records)", reason="empty", path=file.path)
    ext = os.path.splitext(file.name)[1].lower()
    raise DatasetError(f"cannot tell the format of {file.path!r} (extension {ext!r}): expected a JSON list "
                       f"of records, JSONL (one JSON object per line) or one of "
                       f"{', '.join(n for n in _CONTAINERS if n not in ('json', 'jsonl'))}",
                       reason="format", path=file.path)


# --------------------------------------------------------------------------------------------------
# the source
# --------------------------------------------------------------------------------------------------
class DataSource:
    """A resolved dataset input: its files (sorted), their container, and global record numbers.

    Build it with :func:`open_dataset`. Records are numbered across files in file order; a file's
    first record is number ``offsets[i]``, known once the file before it has been read (or counted).

    Attributes
    ----------
    files : list of InputFile
        The input files in reading order (sorted by path); empty for a ``datasets`` object.
    container : str
        The one container every file has.
    label : str
        What the user passed, for messages (``"data/train-*.parquet (420 files)"``).
    dataset : object or None
        The ``datasets.Dataset`` / ``IterableDataset`` when the input is one.
    """

    def __init__(self, files: list[InputFile], container: str, label: str, dataset: Any = None,
                 root: str | None = None):
        self.files = files
        self.container = container
        self.label = label
        self.dataset = dataset
        #: the folder the input files are named relative to (:meth:`relative_name`)
        self.root = root
        self._names: dict[str, str] = {}
        self._counts: list[int] | None = None
        #: path -> sha256 of each file as :meth:`digest` last read it (None until it reads them: a
        #: digest memoised by an earlier source of the same files leaves it None)
        self.read_digests: dict[str, str] | None = None

    def __str__(self) -> str:
        return self.label

    def __repr__(self) -> str:
        return f"DataSource({self.label!r}, container={self.container!r}, files={len(self.files)})"

    @property
    def single(self) -> bool:
        """True when the input is one plain file (messages and outputs then look as they always did)."""
        return len(self.files) == 1 and self.dataset is None

    def _container(self) -> Container:
        return _CONTAINERS[self.container]

    def counts(self) -> list[int]:
        """Records per file (cached: a source is a snapshot of its files)."""
        if self._counts is None:
            c = self._container()
            self.check_schemas()
            self._counts = [c.count(f) for f in self.files]
        return list(self._counts)

    def check_schemas(self) -> None:
        """Refuse shards whose schemas differ (containers with a ``schema`` hook; once per source)."""
        c = self._container()
        if c.schema is None or len(self.files) < 2 or getattr(self, "_schemas_ok", False):
            return
        first = c.schema(self.files[0])
        for f in self.files[1:]:
            other = c.schema(f)
            if other != first:
                how = first.diff(other) if hasattr(first, "diff") else f"{first} vs {other}"
                raise DatasetError(f"--data {self.label}: shards have different schemas: {self.files[0].path} vs "
                                   f"{f.path}: {how}. Convert the shards to one schema (same columns and "
                                   "types) or select from them in separate runs", reason="schema", path=f.path)
        self._schemas_ok = True

    def count(self) -> int:
        """Total number of records."""
        return sum(self.counts())

    def _files_from(self, start: int) -> tuple[int, list[InputFile]]:
        """``(offset, files)``: the files from the one holding record ``start`` on, and the global index of
        that file's first record; files wholly before ``start`` are left out (counted, never read)."""
        if start <= 0:
            return 0, list(self.files)
        offset = 0
        for i, n in enumerate(self.counts()):
            if offset + n > start:
                return offset, list(self.files[i:])
            offset += n
        return offset, []

    def iter_records(self, start: int = 0) -> Iterator[tuple[int, int | None, Any, InputFile, int]]:
        """Yield ``(index, line, record, file, file_index)``: ``index`` global, ``file_index`` in ``file``.

        ``start`` > 0 begins at the file holding record ``start``: the files before it are not read
        (their records are counted, see :meth:`counts`); that file's records before ``start`` are
        yielded too (a record's index is only known once its file is read up to it).
        """
        c = self._container()
        self.check_schemas()
        offset, files = self._files_from(start)
        for f in files:
            n = 0
            for local, line, record in c.iter_records(f):
                yield offset + local, line, record, f, local
                n = local + 1
            offset += n

    def has_batches(self) -> bool:
        """Whether :meth:`iter_batches` can serve this source (an Arrow-backed container)."""
        return self._container().iter_batches is not None

    def iter_batches(self, columns: list[str] | None = None, start: int = 0) -> Iterator[tuple[int, Any, InputFile, int]]:
        """Yield ``(index, batch, file, file_index)`` for Arrow-backed containers: ``batch`` a
        ``pyarrow.RecordBatch`` whose first row is global record ``index`` and record ``file_index``
        of ``file``; the rows are exactly those of :meth:`iter_records` (``start`` as there), with
        only the ``columns`` the data has when given (the others are not read where the container
        allows)."""
        c = self._container()
        self.check_schemas()
        offset, files = self._files_from(start)
        for f in files:
            local = 0
            for batch in (c.iter_batches(f) if columns is None else c.iter_batches(f, columns=columns)):
                yield offset + local, batch, f, local
                local += batch.num_rows
            offset += local

    def locate(self, index: int) -> tuple[InputFile, int]:
        """The file holding global record ``index`` and the record's index inside it (counts the files)."""
        ends, total = [], 0
        for n in self.counts():
            total += n
            ends.append(total)
        i = bisect.bisect_right(ends, index)
        if i >= len(self.files):
            raise IndexError(f"record {index} is past the end of {self.label} ({total} records)")
        return self.files[i], index - (ends[i - 1] if i else 0)

    def relative_name(self, file: InputFile) -> str:
        """``file``'s path relative to the dataset root, with ``/`` separators (``ai2d/train-00000-of-00001.parquet``).

        The root is the folder the inputs were named by: a directory given as ``--data`` is its own
        root, a file's is its folder, a glob's the folder before its first wildcard, a
        ``save_to_disk`` folder's its parent (so it keeps its own name); several inputs share the
        deepest folder holding all their roots, so the names do not depend on the order they were
        listed in. Positional ids (:func:`~.records.position_id`) and the per-file outputs use it.
        """
        name = self._names.get(file.path)  # asked once per record by the record paths
        if name is None:
            if self.root is None:
                name = file.name
            elif file.local:
                name = os.path.relpath(file.path, self.root).replace(os.sep, "/")
            else:
                name = posixpath.relpath(file.fs_path, self.root)
            self._names[file.path] = name
        return name

    def input_paths(self) -> list[str]:
        """Every input file as a path/URL (for the no-overwrite check and provenance)."""
        return [f.path for f in self.files]

    def total_bytes(self) -> int:
        """Sum of the input files' sizes (0 for a ``datasets`` object)."""
        return sum(f.size() for f in self.files)

    def digest(self) -> str:
        """sha256 (64 hex digits) over every input file, in order: name, size and content.

        JSON/JSONL files and any file up to 4 MiB are hashed whole; larger binary containers by size,
        modification time and their first and last MiB (hashing terabytes of image bytes at every
        start would not be affordable; the modification time catches an in-place edit of the
        middle, such as one embedded image swapped for another of the same size, which head, tail
        and Parquet's footer would not). Copying such a dataset elsewhere changes its fingerprint,
        so a run resumed on the copy is refused until ``--force``. A file below a subfolder of the
        dataset root also contributes that path (positional ids are made of it, see
        :meth:`relative_name`). A ``datasets.Dataset`` uses its own content fingerprint, an
        ``IterableDataset`` a hash of every record it yields. Memoised per (files, sizes, mtimes)
        within the process, so the run and the extraction engine do not both read the data.
        """
        if self.dataset is not None:
            h = hashlib.sha256(f"source\0{self.container}\0".encode())
            fp = getattr(self.dataset, "_fingerprint", None)
            h.update(str(fp if fp is not None else self._records_digest()).encode())
            return h.hexdigest()
        key = (self.container, self.root, tuple((f.path, *_stat_key(f)) for f in self.files))
        hit = _DIGESTS.get(key)
        if hit is not None:
            return hit
        h = hashlib.sha256(f"source\0{self.container}\0".encode())
        per_file = {}
        for f in self.files:
            rel = self.relative_name(f)
            if rel != f.name:  # a file in a subfolder of the root: positional ids carry that path
                h.update(f"path\0{rel}\0".encode())
            hf = hashlib.sha256()
            self._hash_input(_Tee(h, hf), f)
            per_file[f.path] = hf.hexdigest()
        self.read_digests = per_file
        if len(_DIGESTS) > 64:
            _DIGESTS.clear()
        _DIGESTS[key] = h.hexdigest()
        return _DIGESTS[key]

    def _hash_input(self, h, f: InputFile) -> None:
        """Feed ``f`` to ``h`` by :meth:`digest`'s rules (name, size, content or its edges; a dataset
        folder as its member files)."""
        whole = self.container in ("json", "jsonl")
        if f.local and os.path.isdir(f.path):
            # a dataset folder (save_to_disk): its data files, each hashed like a file of its own
            h.update(f"{f.name}\0folder\0".encode())
            for name, path in folder_members(f.path):
                hash_file(h, name, os.path.getsize(path), lambda p=path: open(p, "rb"), whole=whole,
                          mtime=lambda p=path: _file_stat(p)[1])
        else:
            hash_file(h, f.name, f.size(), f.open, whole=whole, mtime=lambda f=f: _stat_key(f)[1])

    def file_digests(self) -> dict[str, str]:
        """sha256 of each input file (path -> hex) by :meth:`digest`'s rules, read now, never memoised:
        what ``run`` compares with :attr:`read_digests` before committing its outputs, to prove that
        the records it copies are the ones it read. ``{}`` for a ``datasets`` object."""
        out = {}
        for f in self.files if self.dataset is None else []:
            hf = hashlib.sha256()
            self._hash_input(hf, f)
            out[f.path] = hf.hexdigest()
        return out

    def fingerprint(self) -> str:
        """The first 32 hex digits of :meth:`digest` (what run state and manifests record)."""
        return self.digest()[:32]

    def _records_digest(self) -> str:
        # an IterableDataset has no content fingerprint: hash what it yields (one extra pass)
        h = hashlib.sha256()
        for index, _line, record, _f, _l in self.iter_records():
            h.update(repr(record).encode())
        return h.hexdigest()


class _Tee:
    """Two hashers fed as one (the source's digest and a file's own)."""

    def __init__(self, *hashers):
        self.hashers = hashers

    def update(self, data: bytes) -> None:
        for h in self.hashers:
            h.update(data)


def hash_file(h, name: str, size: int, opener, *, whole: bool, mtime=None) -> None:
    """Add one file to the digest ``h``: its name and size, then its bytes.

    The bytes go in whole when ``whole`` or the file is at most 4 MiB; a bigger file contributes its
    first and last MiB, preceded by ``mtime()`` when ``mtime`` is given. The input's digest passes it
    (the modification time stands in for the unread middle: an image replaced in place by one of the
    same size leaves size, head and footer unchanged); the model's digest does not, so a copied or
    re-downloaded checkpoint keeps its digest (:func:`~scalselect_fast.extract.cache.model_digest`).
    ``opener()`` returns a binary file object that can seek.
    """
    h.update(f"{name}\0{size}\0".encode())
    with opener() as fh:
        if whole or size <= _HASH_WHOLE_MAX:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        else:
            if mtime is not None:
                h.update(f"{mtime()}\0".encode())
            h.update(fh.read(_EDGE))
            fh.seek(size - _EDGE)
            h.update(fh.read(_EDGE))


# --------------------------------------------------------------------------------------------------
# resolution
# --------------------------------------------------------------------------------------------------
_GLOB_CHARS = set("*?[")
def _is_url(s: str) -> bool:
    head, sep, _ = s.partition("://")
    return bool(sep) and head.replace("+", "").replace("-", "").isalnum() and len(head) > 1


#: seconds an http(s):// input may take to connect, and to send each next piece of data, before the read
#: fails (env SCALSELECT_URL_TIMEOUT_S); a server that accepts and never answers fails, never hangs
URL_TIMEOUT_S = 30.0


def url_timeout() -> float:
    """:data:`URL_TIMEOUT_S`, or the environment's ``SCALSELECT_URL_TIMEOUT_S`` when set."""
    text = os.environ.get("SCALSELECT_URL_TIMEOUT_S", "")
    try:
        value = float(text) if text else URL_TIMEOUT_S
    except ValueError:
        value = -1.0
    if not value > 0:
        raise DatasetError(f"SCALSELECT_URL_TIMEOUT_S={text!r}: give a positive number of seconds, e.g. 30",
                           reason="io")
    return value


def _http_options(url: str) -> dict:
    """fsspec options for an http(s):// URL: aiohttp's connect and read timeouts (its default is to wait
    for 5 minutes in total, a whole download included)."""
    if url.split("://", 1)[0].lower() not in ("http", "https"):
        return {}
    try:
        import aiohttp
    except ImportError:
        raise DatasetError(f"--data {url!r} is an http(s) URL, which needs aiohttp: pip install aiohttp (or "
                           "'scalselect-fast[data]')", reason="io", path=url) from None
    t = url_timeout()
    return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t)}}


def _remote_fs(url: str):
    try:
        import fsspec
    except ImportError:
        raise DatasetError(f"--data {url!r} is a URL, which needs fsspec: pip install fsspec (plus the "
                           "backend: s3fs, gcsfs or huggingface_hub)", reason="io", path=url) from None
    options = _http_options(url)
    try:
        return fsspec.core.url_to_fs(url, **options)
    except ImportError as e:
        raise DatasetError(f"--data {url!r}: the backend for this URL is not installed ({_why(e)})",
                           reason="io", path=url) from None
    except Exception as e:
        raise DatasetError(f"--data {url!r}: cannot open this URL ({_why(e)})", reason="io", path=url) from None


def _has_ext(name: str, exts: set[str]) -> bool:
    low = name.lower()
    return any(low.endswith(e) for e in exts)


def _dataset_dir_container(path: str) -> str | None:
    for c in _CONTAINERS.values():
        if c.is_dataset_dir is not None and c.is_dataset_dir(path):
            return c.name
    return None


_BRACES = re.compile(r"\{[^{}]*(\.\.|,)[^{}]*\}")


def _expand_braces(item: Any) -> list[Any]:
    """``shard-{000000..000127}.tar`` -> 128 names (``braceexpand``, what WebDataset uses); else ``[item]``."""
    if not isinstance(item, str) or not _BRACES.search(item):
        return [item]
    try:
        from braceexpand import braceexpand
    except ImportError:
        raise DatasetError(f"--data {item!r} is a brace pattern; install the data extra (pip install "
                           "'scalselect-fast[data]') to expand it, or list the files", reason="io",
                           path=item) from None
    return list(braceexpand(item))


def _glob_base(pattern: str, sep: str = os.sep) -> str:
    """The folder part of ``pattern`` before its first wildcard (``data/*/x-*.parquet`` -> ``data``)."""
    parts = pattern.split(sep)
    fixed = []
    for part in parts[:-1]:
        if _GLOB_CHARS & set(part):
            break
        fixed.append(part)
    return sep.join(fixed) or ("/" if pattern.startswith(sep) else ".")


def _expand_one(item: str) -> tuple[list[InputFile], str]:
    """Files named by one entry of ``--data`` (a file, a directory, a glob, or a URL of any of those)
    and the folder they are named relative to (see :meth:`DataSource.relative_name`)."""
    exts = {e for c in _CONTAINERS.values() for e in c.extensions}
    if _is_url(item) and not item.startswith("file://"):
        fs, path = _remote_fs(item)
        proto = item.split("://", 1)[0]

        def url(p: str) -> str:
            return p if "://" in p else f"{proto}://{p.lstrip('/') if proto == 'memory' else p}"

        try:
            if _GLOB_CHARS & set(path):
                found = sorted(fs.glob(path))
                return [InputFile(url(p), fs, p) for p in found if not fs.isdir(p)], _glob_base(path, "/")
            if fs.isdir(path):
                found = sorted(p for p in fs.find(path) if _has_ext(p, exts)
                               and not os.path.basename(p).startswith("."))
                return [InputFile(url(p), fs, p) for p in found], path.rstrip("/") or "/"
            if not fs.exists(path):
                raise DatasetError(f"--data {item!r}: no such file or directory at that URL", reason="io",
                                   path=item)
        except DatasetError:
            raise
        except Exception as e:  # network, credentials, permission: one line, never a traceback
            raise DatasetError(f"--data {item!r}: cannot reach it ({_why_remote(e)}); check the URL, your "
                               "network and credentials", reason="io", path=item) from None
        return [InputFile(item, fs, path)], posixpath.dirname(path)
    if item.startswith("file://"):
        item = item[len("file://"):]
    item = os.path.expanduser(item)
    if _GLOB_CHARS & set(item) and not os.path.exists(item):
        found = sorted(p for p in _glob.glob(item, recursive=True) if os.path.isfile(p))
        return ([InputFile(os.path.abspath(p), None, os.path.abspath(p)) for p in found],
                os.path.abspath(_glob_base(item)))
    if os.path.isdir(item):
        kind = _dataset_dir_container(item)
        if kind is not None:
            named = os.path.abspath(item)  # a trailing "/" or "." goes: the folder keeps its own name
            hook = _CONTAINERS[kind].dataset_dir
            p = hook(named) if hook is not None else named
            return [InputFile(p, None, p)], os.path.dirname(named)
        found = []
        for dirpath, dirnames, filenames in os.walk(item):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found.extend(os.path.join(dirpath, f) for f in filenames
                         if not f.startswith(".") and _has_ext(f, exts))
        return [InputFile(os.path.abspath(p), None, os.path.abspath(p)) for p in sorted(found)], os.path.abspath(item)
    p = os.path.abspath(item)
    return [InputFile(p, None, p)], os.path.dirname(p)


def check_data_argument(data: Any, name: str = "data", format: Any = "auto") -> None:
    """Raise a ``TypeError`` naming the argument ``name`` and what it accepts unless ``data`` is a
    path (``str`` or ``os.PathLike`` of ``str``), a non-string sequence of paths, a
    :class:`DataSource` or a dataset object a container reads (``datasets``); and unless ``format`` is a string."""
    if not isinstance(format, str):
        raise TypeError(f"format must be a string ('auto' or one of {', '.join(_CONTAINERS)}), got "
                        f"{type(format).__name__}")
    if isinstance(data, DataSource) or _object_container(data) is not None:
        return
    items = data if isinstance(data, (list, tuple)) else [data]
    for item in items:
        if isinstance(item, str) or (isinstance(item, os.PathLike) and isinstance(os.fspath(item), str)):
            continue
        what = f"{type(item).__name__} {item!r:.80}" if isinstance(item, (bytes, bytearray)) else type(item).__name__
        raise TypeError(f"{name} must be a path (str or os.PathLike), a list of paths, a DataSource or a "
                        f"datasets Dataset; got {what}" + (" (decode it: path.decode())"
                                                           if isinstance(item, (bytes, bytearray)) else ""))


def open_dataset(data: Any, format: str = "auto") -> DataSource:
    """Resolve ``data`` into a :class:`DataSource`.

    Parameters
    ----------
    data : str, path-like, list of those, DataSource, or datasets.Dataset / IterableDataset
        A file, a directory (every file in it, recursively, whose name ends in a registered
        container's extension, hidden files excluded; or a ``save_to_disk`` directory), a glob
        (``data/train-*.parquet``), a brace pattern (``shard-{000000..000127}.tar``), a URL of any
        of these, or a list of them.
    format : str
        A registered container name, or ``"auto"`` to recognise each file from its first bytes.

    Returns
    -------
    DataSource
        Files sorted by path (duplicates from overlapping list entries removed).

    Raises
    ------
    DatasetError
        Nothing matches (``reason="io"``), a file is missing or unreadable, the files are of
        different containers (``reason="format"``), a URL cannot be reached.
    TypeError
        ``data`` is none of the above (bytes, None, a number, ...) or ``format`` is not a string.
    """
    if isinstance(data, DataSource):
        return data
    check_data_argument(data, "data", format)
    if format not in formats():
        raise ValueError(f"format must be 'auto' or one of {tuple(_CONTAINERS)}, got {format!r}")
    wrapper = _object_container(data)
    if wrapper is not None:
        return wrapper.object_source(data)
    items = list(data) if isinstance(data, (list, tuple)) else [data]
    items = [x for raw in items for x in _expand_braces(raw)]
    if not items:
        raise DatasetError("--data is an empty list; pass at least one dataset file", reason="io")
    files: dict[str, InputFile] = {}
    roots: list[str] = []
    for raw in items:
        item = os.fspath(raw) if not isinstance(raw, str) else raw
        found, root = _expand_one(item)
        roots.append(root)
        if not found:
            kind = "glob" if _GLOB_CHARS & set(item) else "directory"
            raise DatasetError(f"--data {item!r}: the {kind} matches no dataset file; check the path (known "
                               f"file endings: {', '.join(sorted({e for c in _CONTAINERS.values() for e in c.extensions}))})",
                               reason="io", path=item)
        for f in found:
            files.setdefault(f.path, f)
    ordered = [files[k] for k in sorted(files)]
    for f in ordered:
        if f.local and not os.path.exists(f.path):
            raise DatasetError(f"cannot open dataset {f.path!r}: no such file", reason="io", path=f.path)
        if f.local and not (os.path.isfile(f.path) or _dataset_dir_container(f.path)):
            raise DatasetError(f"--data {f.path!r} is not a file", reason="io", path=f.path)
    if format != "auto":
        container = format
    else:
        kinds: dict[str, InputFile] = {}
        nonempty = []
        for f in ordered:
            try:
                kind = _dataset_dir_container(f.path) if f.local and os.path.isdir(f.path) else sniff_container(f)
            except DatasetError as e:
                if e.reason == "empty" and len(ordered) > 1:
                    continue  # an empty shard holds zero records; the others decide the container
                raise
            kinds.setdefault(kind, f)
            nonempty.append(f)
        if not kinds:
            raise DatasetError(f"every file of --data {items[0]!r} is empty (no records)", reason="empty",
                               path=ordered[0].path)
        ordered = nonempty
        if len(kinds) > 1:
            shown = "; ".join(f"{k}: {f.path}" for k, f in kinds.items())
            raise DatasetError(f"--data mixes containers ({shown}); one input must be all one kind. Pass the "
                               "files of one kind only", reason="format", path=next(iter(kinds.values())).path)
        container = next(iter(kinds))
    label = data if isinstance(data, str) else (items[0] if len(items) == 1 else f"{len(items)} inputs")
    label = str(label) + (f" ({len(ordered)} files)" if len(ordered) > 1 else "")
    return DataSource(ordered, container, label, root=_common_root(roots))


def _common_root(roots: list[str]) -> str | None:
    """The deepest folder holding every entry's root (the same whatever order they were listed in)."""
    try:
        return posixpath.commonpath(roots)
    except ValueError:  # absolute and relative (remote) paths mixed: each file keeps its own name
        return None


def input_files(data: Any, format: str = "auto") -> list[str]:
    """Every input file of ``data`` (as :func:`open_dataset` resolves it): what an output must never be."""
    return open_dataset(data, format).input_paths()
