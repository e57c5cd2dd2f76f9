"""Representation store: the on-disk hand-off between extraction and selection.

A store is a directory of shards plus a manifest::

    store/
      manifest.json          d, dtype, total count, provenance, one record per committed shard
      shard-00000.npy        (count, d) matrix in numpy's .npy format (memory-mappable);
                             bfloat16 is stored as uint16 bit patterns
      shard-00000.ids.txt    one sample id per line, UTF-8, same order as the rows
      shard-00000.keys       optional: each row's 32-byte content key (what the row was computed
                             from, :func:`scalselect_fast.extract.cache.sample_key`), raw, row order;
                             32 zero bytes for a row without one
      keys-<sha256:16>.context   the key context the shards' keys were made under (named by its digest)

Shards are committed atomically: data and ids are written to temporary names, fsynced and renamed,
and only then is the shard recorded in the manifest (itself replaced atomically). A shard that is on
disk but not in the manifest is therefore never read; a rerun overwrites it. Each record carries a
CRC-32 of the matrix payload; every reader verifies it on its first read of the shard (while the rows
are streamed, or before rows are gathered). The manifest is not trusted: its file names must stay
inside the store directory, and an id may occur only once in the store.

This module also defines :class:`MatrixSource`, the one interface every streaming consumer (subspace
fit, scoring, baselines, Dask) reads rows through, and :func:`open_source`, which turns an ndarray, a
memmap, a ``.npy`` path or a store directory into one. It is not a database: it does not index ids
or support updates in place.
"""
from __future__ import annotations

import contextlib
import json
import mmap
import os
import queue
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .atomic import atomic_path, atomic_write_bytes, atomic_write_json, fsync_dir

__all__ = [
    "StoreError",
    "ShardInfo",
    "MatrixSource",
    "ArraySource",
    "StoreSource",
    "BlockReader",
    "StoreWriter",
    "open_source",
    "load_npy",
    "uncommit_shards",
    "shard_file_stat",
    "read_shard_keys",
    "SUPPORTED_DTYPES",
    "KEY_BYTES",
]

FORMAT_NAME = "scalselect-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: storage dtype name -> numpy dtype of the bytes on disk
SUPPORTED_DTYPES = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32, "float64": np.float64}
DEFAULT_BLOCK_ROWS = 16384
#: blocks the streaming passes read ahead (BlockReader); 0 = memory-mapped views, no thread
DEFAULT_PREFETCH = 2
#: width of one row's content key in a ``.keys`` sidecar (a sha256 digest)
KEY_BYTES = 32


class StoreError(ValueError):
    """A store, shard or input matrix is malformed; the message names the file and the fix.

    ``shard`` names the store shard whose checksum failed (None for other problems), so a job that
    owns the store can re-extract exactly that shard.
    """

    shard: str | None = None


def _crc32_array(a: np.ndarray) -> str:
    return f"crc32:{zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1)) & 0xFFFFFFFF:08x}"


# --------------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardInfo:
    """One contiguous run of rows.

    Attributes
    ----------
    name : str
        Shard name (``"shard-00000"``; ``"array"`` for in-memory sources).
    offset : int
        Global index of the shard's first row.
    count : int
        Number of rows.
    path : str or None
        Path of the ``.npy`` matrix, or None for in-memory data.
    ids_path : str or None
        Path of the ids file, or None when ids are row numbers.
    checksum : str or None
        ``"crc32:xxxxxxxx"`` of the matrix payload, or None.
    keys_path, keys_checksum, keys_context_path : str or None
        The row content keys sidecar, its CRC-32 and the file holding the context they were made
        under; None for shards written without keys (older stores, in-memory data).
    """

    name: str
    offset: int
    count: int
    path: str | None = None
    ids_path: str | None = None
    checksum: str | None = None
    keys_path: str | None = None
    keys_checksum: str | None = None
    keys_context_path: str | None = None


class MatrixSource:
    """A read-only (n, d) matrix that is streamed in row blocks.

    Subclasses provide :meth:`_shard_array`. Consumers use :meth:`iter_blocks`, which yields
    ``(row_offset, block)`` with ``block`` a C-contiguous array of the storage dtype (float16,
    float32, float64, or uint16 holding bfloat16 bits when :attr:`is_bf16`). Blocks never span
    shards, so a shard can be processed where it lives.

    Attributes
    ----------
    n, d : int
        Shape of the matrix.
    dtype : str
        Storage dtype name, one of ``float16``, ``bfloat16``, ``float32``, ``float64``.
    shards : list of ShardInfo
    provenance : dict
    """

    n: int
    d: int
    dtype: str
    shards: list[ShardInfo]
    provenance: dict

    @property
    def is_bf16(self) -> bool:
        return self.dtype == "bfloat16"

    @property
    def itemsize(self) -> int:
        return np.dtype(SUPPORTED_DTYPES[self.dtype]).itemsize

    @property
    def nbytes(self) -> int:
        return self.n * self.d * self.itemsize

    def _shard_array(self, shard: ShardInfo) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def iter_shard_blocks(self, shard: ShardInfo, block_rows: int = DEFAULT_BLOCK_ROWS,
                          verify: bool | None = None, prefetch: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(global_row_offset, block)`` for one shard, verifying its checksum on first read.

        When the shard is checked (see :meth:`_should_verify`: ``verify=None``, the default, checks a
        shard the first time this source reads it in full; ``True`` always; ``False`` never) the CRC-32
        of the payload is accumulated as blocks are yielded and a :class:`StoreError` naming the shard
        is raised after its last block if it does not match, so a consumer never finishes on corrupt
        rows.

        With ``prefetch > 0`` a :class:`BlockReader` thread reads up to ``prefetch`` blocks ahead
        into reused buffers, so each yielded block is only valid until the next one is requested
        (copy it to keep it). ``prefetch=0`` yields independent (memory-mapped) views.
        """
        if prefetch > 0:
            yield from BlockReader(self, block_rows=block_rows, prefetch=prefetch, verify=verify,
                                   shards=[shard])
            return
        if block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {block_rows}")
        arr = self._shard_array(shard)
        crc = 0
        check = self._should_verify(shard, verify)
        for start in range(0, shard.count, block_rows):
            block = np.ascontiguousarray(arr[start:start + block_rows])
            if check:
                crc = zlib.crc32(block.view(np.uint8).reshape(-1), crc)
            yield shard.offset + start, block
        if check:
            _check_crc(shard, crc)
            self._mark_verified(shard)

    def iter_blocks(self, block_rows: int = DEFAULT_BLOCK_ROWS, verify: bool | None = None,
                    prefetch: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(global_row_offset, block)`` over all shards in order. See :meth:`iter_shard_blocks`.

        ``prefetch > 0`` reads ahead across shard boundaries with one :class:`BlockReader` thread;
        blocks then live in reused buffers and are valid until the next block is requested.
        """
        if prefetch > 0:
            yield from BlockReader(self, block_rows=block_rows, prefetch=prefetch, verify=verify)
            return
        for shard in self.shards:
            yield from self.iter_shard_blocks(shard, block_rows, verify)

    def shard_array(self, shard: ShardInfo) -> np.ndarray:
        """The shard's rows as a (possibly memory-mapped) array of the storage dtype (checksum verified)."""
        self.verify_shard(shard)
        return self._shard_array(shard)

    # -- checksums: each shard is verified on its first read through this source ---------------
    def _verified(self) -> set:
        v = self.__dict__.get("_verified_shards")
        if v is None:
            v = self.__dict__["_verified_shards"] = set()
        return v

    def _should_verify(self, shard: ShardInfo, verify: bool | None) -> bool:
        """Whether a full read of ``shard`` checks its CRC: ``verify`` True/False forces it, None
        (the default of every reader) checks a shard not yet verified through this source."""
        if shard.checksum is None or verify is False:
            return False
        return verify is True or shard.name not in self._verified()

    def _mark_verified(self, shard: ShardInfo) -> None:
        self._verified().add(shard.name)

    def verify_shard(self, shard: ShardInfo) -> None:
        """Check ``shard``'s CRC-32 now unless this source already has (random-access readers).

        Raises
        ------
        StoreError
            The payload does not match the manifest's checksum.
        """
        if not self._should_verify(shard, None):
            return
        arr = self._shard_array(shard)
        crc = 0
        step = max(1, (64 << 20) // max(1, self.d * self.itemsize))  # 64 MiB of a mapping at a time
        for start in range(0, shard.count, step):
            crc = zlib.crc32(np.ascontiguousarray(arr[start:start + step]).view(np.uint8).reshape(-1), crc)
        _check_crc(shard, crc)
        self._mark_verified(shard)

    def check_unique_ids(self) -> None:
        """Raise :class:`StoreError` if two rows carry the same id (checked once per source).

        Memory is bounded: the 64-bit hashes of the ids go to partition files on disk, checked one
        partition at a time (:class:`~scalselect_fast.data.ids.IdRegistry`), plus one shard's ids;
        hash collisions are confirmed on the ids themselves before anything is reported.
        """
        from .data.ids import IdRegistry

        if self.__dict__.get("_ids_unique") or all(s.ids_path is None for s in self.shards):
            return
        with IdRegistry() as reg:
            for shard in self.shards:
                ids = read_ids(shard) if shard.ids_path is not None else \
                    [str(i) for i in range(shard.offset, shard.offset + shard.count)]
                for a in range(0, len(ids), 1 << 16):
                    part = ids[a:a + (1 << 16)]
                    reg.add_many(part, range(shard.offset + a, shard.offset + a + len(part)))
            cand = reg.duplicates(limit=1 << 20)
        if cand:
            seen: dict[str, int] = {}
            for r in sorted({r for pair in cand for r in pair}):
                shard = self._shard_of(r)
                sid = (read_ids(shard) if shard.ids_path is not None else [str(r)])[
                    r - shard.offset if shard.ids_path is not None else 0]
                if sid in seen:
                    a, b = self._shard_of(seen[sid]), shard
                    raise StoreError(
                        f"id {sid!r} occurs twice in the store (rows {seen[sid]} in shard {a.name!r} and {r} "
                        f"in shard {b.name!r}); every sample needs a unique id: re-extract the store, or "
                        f"remove the duplicate shard from the manifest")
                seen[sid] = r
        self.__dict__["_ids_unique"] = True

    def _shard_of(self, row: int) -> ShardInfo:
        offsets = [s.offset for s in self.shards]
        import bisect

        return self.shards[bisect.bisect_right(offsets, row) - 1]

    def read_rows(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Gather arbitrary global rows as float32 (bfloat16 decoded). Shape ``(len(rows), d)``."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((rows.size, self.d), dtype=np.float32)
        if rows.size == 0:
            return out
        if rows.min() < 0 or rows.max() >= self.n:
            raise IndexError(f"row index out of range [0, {self.n})")
        offsets = np.array([s.offset for s in self.shards], dtype=np.int64)
        which = np.searchsorted(offsets, rows, side="right") - 1
        for si in np.unique(which):
            sel = np.nonzero(which == si)[0]
            shard = self.shards[si]
            self.verify_shard(shard)
            local = rows[sel] - shard.offset
            out[sel] = to_float32(self._shard_array(shard)[local], self.is_bf16)
        return out

    def to_array(self, dtype=np.float32) -> np.ndarray:
        """Materialise the whole matrix (for small data, tests and quadratic baselines)."""
        out = np.empty((self.n, self.d), dtype=dtype)
        for off, block in self.iter_blocks():
            out[off:off + block.shape[0]] = to_float32(block, self.is_bf16)
        return out

    def ids(self) -> list[str]:
        """Sample ids in row order (row numbers as strings where the source has none).

        Raises
        ------
        StoreError
            Two rows carry the same id (a store whose shards overlap).
        """
        out: list[str] = []
        for shard in self.shards:
            if shard.ids_path is None:
                out.extend(str(i) for i in range(shard.offset, shard.offset + shard.count))
            else:
                out.extend(read_ids(shard))
        if len(set(out)) != len(out):
            self.check_unique_ids()  # names the id and both shards
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n}, d={self.d}, dtype={self.dtype}, shards={len(self.shards)})"


def to_float32(block: np.ndarray, is_bf16: bool = False) -> np.ndarray:
    """Decode a block of the storage dtype to float32 (bfloat16 bits -> float32 exactly)."""
    if is_bf16:
        return (block.astype(np.uint32) << 16).view(np.float32)
    return block.astype(np.float32, copy=False)


def _check_crc(shard: ShardInfo, crc: int) -> None:
    got = f"crc32:{crc & 0xFFFFFFFF:08x}"
    if got != shard.checksum:
        err = StoreError(
            f"checksum mismatch in shard {shard.name!r} ({shard.path}): manifest says "
            f"{shard.checksum}, data has {got}. The shard was modified or truncated after it "
            f"was written; rerun the `scalselect run` / `scalselect extract` command that wrote it (it "
            f"moves the corrupt shard aside and re-extracts only that one) or restore the file.")
        err.shard = shard.name
        raise err


def read_ids(shard: ShardInfo) -> list[str]:
    with open(shard.ids_path, encoding="utf-8") as fh:
        ids = fh.read().split("\n")
    if ids and ids[-1] == "":
        ids.pop()
    if len(ids) != shard.count:
        raise StoreError(f"shard {shard.name!r}: {shard.ids_path} holds {len(ids)} ids but the matrix has "
                         f"{shard.count} rows; the shard is damaged, re-extract it.")
    return ids


def read_shard_keys(shard: ShardInfo, rows: Sequence[int] | np.ndarray | None = None
                    ) -> tuple[np.ndarray, bytes] | None:
    """The content keys of a shard's rows and the context they were made under (None without keys).

    The sidecar is read whole (``KEY_BYTES`` per row: 128 KiB for 4096 rows) and checked against the
    manifest's CRC-32; the context file against the digest in its name. Only this shard's keys are
    held, so a caller going shard by shard never holds the whole store's keys.

    Parameters
    ----------
    shard : ShardInfo
        A store shard; its ``keys_path`` None means it was written without keys.
    rows : sequence of int, optional
        Shard-local row numbers (0 .. count-1); default every row.

    Returns
    -------
    keys : ndarray, uint8, shape (len(rows), KEY_BYTES)
        One raw sha256 key per row; all zero for a row stored without one.
    context : bytes
        The key context (pass it to :func:`~scalselect_fast.extract.cache.sample_key`).

    Raises
    ------
    StoreError
        A file is missing, of the wrong size, or fails its checksum; the message names the shard.
    """
    if shard.keys_path is None:
        return None
    fix = ("rerun the command that wrote the store: it re-extracts a shard whose files changed size or time; "
           "for damage that changed neither, add --force (with the representation cache only lookups are "
           "redone), or restore the file")
    try:
        data = Path(shard.keys_path).read_bytes()
        context = Path(shard.keys_context_path).read_bytes()
    except OSError as exc:
        err = StoreError(f"shard {shard.name!r}: cannot read its content keys ({exc.filename}: "
                         f"{exc.strerror or exc}); {fix}")
        err.shard = shard.name
        raise err from None
    got = f"crc32:{zlib.crc32(data) & 0xFFFFFFFF:08x}"
    ctx_ok = Path(shard.keys_context_path).name == _context_file_name(context)
    if len(data) != shard.count * KEY_BYTES or got != shard.keys_checksum or not ctx_ok:
        err = StoreError(f"shard {shard.name!r}: its content keys ({shard.keys_path if ctx_ok else shard.keys_context_path}"
                         f") do not match the manifest (size {len(data)} for {shard.count} rows, {got} vs "
                         f"{shard.keys_checksum}); the file was modified or truncated after it was written; {fix}")
        err.shard = shard.name
        raise err
    keys = np.frombuffer(data, np.uint8).reshape(shard.count, KEY_BYTES)
    if rows is not None:
        keys = keys[np.asarray(rows, np.int64)]
    return keys, context


def _context_file_name(context: bytes) -> str:
    import hashlib

    return f"keys-{hashlib.sha256(context).hexdigest()[:16]}.context"


class ArraySource(MatrixSource):
    """An in-memory ndarray or ``np.memmap`` of shape (n, d) as a single-shard source.

    Parameters
    ----------
    array : ndarray, shape (n, d)
        float16, float32 or float64 (other dtypes are rejected; convert first).
    ids : sequence of str, optional
        Sample ids; defaults to row numbers.
    name : str
        Shown in error messages.
    """

    def __init__(self, array: np.ndarray, ids: Sequence[str] | None = None, name: str = "array",
                 path: str | None = None):
        if array.ndim != 2:
            raise StoreError(f"{name}: expected a 2-D (n, d) matrix, got shape {array.shape}")
        dt = np.dtype(array.dtype)
        names = {np.dtype(np.float16): "float16", np.dtype(np.float32): "float32", np.dtype(np.float64): "float64"}
        if dt not in names:
            raise StoreError(f"{name}: dtype {dt} is not supported; use float16, float32 or float64 "
                             f"(bfloat16 only inside a store)")
        self._array = array
        self.n, self.d = int(array.shape[0]), int(array.shape[1])
        self.dtype = names[dt]
        self._ids = list(map(str, ids)) if ids is not None else None
        if self._ids is not None and len(self._ids) != self.n:
            raise StoreError(f"{name}: {len(self._ids)} ids for {self.n} rows")
        self.shards = [ShardInfo(name=name, offset=0, count=self.n, path=path)]
        self.provenance = {}

    def _shard_array(self, shard: ShardInfo) -> np.ndarray:
        return self._array

    def ids(self) -> list[str]:
        return self._ids if self._ids is not None else super().ids()


class StoreSource(MatrixSource):
    """A representation store directory opened for reading (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise StoreError(f"{self.path}: no {MANIFEST}; this is not a representation store "
                             f"(create one with `scalselect extract` or StoreWriter)")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:  # unreadable, not JSON/UTF-8, nested too deep
            raise StoreError(f"{mpath}: unreadable manifest ({type(exc).__name__}: {str(exc)[:200]}); restore "
                             f"it or re-extract the store") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise StoreError(f"{mpath}: not a {FORMAT_NAME} manifest")
        self.manifest = manifest
        try:
            self.d = int(manifest["d"])
            self.dtype = manifest["dtype"]
            if self.dtype not in SUPPORTED_DTYPES:
                raise StoreError(f"{mpath}: unsupported dtype {self.dtype!r}")
            self.provenance = manifest.get("provenance", {})
            self.shards = []
            offset = 0
            names = set()
            for rec in sorted(manifest.get("shards", []), key=lambda r: str(r["name"])):
                name, count = str(rec["name"]), int(rec["count"])
                if name in names or count < 0:
                    raise StoreError(f"{mpath}: shard {name!r} is listed twice or has a negative count")
                names.add(name)
                keys = rec.get("keys_file") is not None
                self.shards.append(ShardInfo(
                    name=name, offset=offset, count=count,
                    path=self._confined(rec["rows_file"], name, mpath),
                    ids_path=self._confined(rec["ids_file"], name, mpath),
                    checksum=rec.get("checksum"),
                    keys_path=self._confined(rec["keys_file"], name, mpath) if keys else None,
                    keys_checksum=rec.get("keys_checksum") if keys else None,
                    keys_context_path=self._confined(rec["keys_context_file"], name, mpath) if keys else None))
                offset += count
        except StoreError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StoreError(f"{mpath}: malformed manifest ({type(exc).__name__}: {exc}); re-extract the "
                             f"store or restore its manifest.json") from exc
        self.n = offset
        self._cache: dict[str, np.ndarray] = {}

    def _confined(self, rel, shard: str, mpath: Path) -> str:
        """``rel`` joined to the store, refused unless it names a file inside the store directory."""
        if not isinstance(rel, str) or not rel or os.path.isabs(rel) or ".." in Path(rel).parts:
            raise StoreError(f"{mpath}: shard {shard!r} names the file {rel!r}, which is not a plain path "
                             f"inside the store; the manifest was edited or damaged, re-extract the store")
        full = self.path / rel
        root = os.path.realpath(self.path)
        if os.path.commonpath([root, os.path.realpath(full)]) != root:
            raise StoreError(f"{mpath}: shard {shard!r} file {rel!r} leads outside the store (a symlink to "
                             f"{os.path.realpath(full)}); stores are self-contained, copy the file in or "
                             f"re-extract")
        return str(full)

    def _shard_array(self, shard: ShardInfo) -> np.ndarray:
        arr = self._cache.get(shard.name)
        if arr is not None:
            return arr
        arr = load_npy(shard.path, f"shard {shard.name!r}: ",
                       "re-extract the shard or restore the file")
        want = np.dtype(SUPPORTED_DTYPES[self.dtype])
        if arr.ndim != 2 or arr.shape[1] != self.d or arr.dtype != want:
            raise StoreError(
                f"shard {shard.name!r}: {shard.path} has shape {arr.shape} dtype {arr.dtype}, but the "
                f"manifest says d={self.d} dtype={self.dtype}; shards of different models/dtypes "
                f"cannot be mixed in one store")
        if arr.shape[0] != shard.count:
            raise StoreError(f"shard {shard.name!r}: {shard.path} has {arr.shape[0]} rows, manifest says "
                             f"{shard.count}; the file was truncated or replaced, re-extract it")
        self._cache[shard.name] = arr
        return arr

    def check_shard(self, shard: ShardInfo) -> None:
        """Read one shard whole now (ids and rows, checksum forced); raise :class:`StoreError` if a file is
        missing or damaged or fails its checksum."""
        try:
            read_ids(shard)
            if shard.keys_path is not None:
                read_shard_keys(shard)
            for _ in self.iter_shard_blocks(shard, verify=True, prefetch=2):
                pass
        except OSError as exc:
            raise StoreError(f"shard {shard.name!r}: cannot read {exc.filename or shard.path} "
                             f"({exc.strerror or exc})") from exc


# --------------------------------------------------------------------------------------------------
# read-ahead
# --------------------------------------------------------------------------------------------------
_DONE = object()


def _file_region(arr: np.ndarray) -> tuple[str, int] | None:
    """``(path, byte offset of row 0)`` when ``arr`` is a whole, C-ordered memory-mapped file.

    Only a memmap created directly over a file qualifies (its ``base`` is the ``mmap`` object and
    its ``offset`` attribute is the true offset of element 0); a slice of one inherits a stale
    ``offset``, so it is read through the mapping instead.
    """
    if (isinstance(arr, np.memmap) and isinstance(arr.base, mmap.mmap) and arr.filename
            and arr.flags.c_contiguous):
        return str(arr.filename), int(arr.offset)
    return None


def _is_mapped(arr: np.ndarray) -> bool:
    b = arr
    while b is not None:
        if isinstance(b, (np.memmap, mmap.mmap)):
            return True
        b = getattr(b, "base", None)
    return False


class BlockReader:
    """Stream row blocks with a background read-ahead thread and a fixed set of reused buffers.

    The thread reads block ``i + 1 .. i + prefetch`` while the caller computes on block ``i``, so
    disk reads (and the kernel's copy out of the page cache) overlap compute. Memory is fixed:
    ``prefetch + 1`` buffers of ``block_rows x d`` in the storage dtype, allocated once; nothing is
    allocated per block.

    How a shard is read depends on what backs it:

    * a ``.npy`` file (store shards, ``open_source("x.npy")``): ``readinto`` straight into the
      buffer from the header offset on, with ``POSIX_FADV_SEQUENTIAL`` on the file and
      ``POSIX_FADV_WILLNEED`` on the next block, so the kernel keeps a request in flight;
    * another memory-mapped array: copied out of the mapping by the thread (page faults are taken
      there, not in the caller);
    * an in-memory array: yielded as zero-copy views (nothing to read ahead).

    Parameters
    ----------
    source : MatrixSource
    block_rows : int, >= 1
        Rows per block; blocks never span shards (the last block of a shard may be shorter).
    prefetch : int, >= 1
        Blocks read ahead of the one the caller holds.
    verify : bool or None
        Accumulate each shard's CRC-32 in the reader thread and raise :class:`StoreError` (from
        the iterator, after the shard's last block) on a mismatch. None (default): for shards the
        source has not verified yet; True: always; False: never.
    shards : list of ShardInfo, optional
        Subset of ``source.shards`` to read, in this order (default: all).

    Notes
    -----
    A yielded block is a view of a reused buffer: it stays valid until the caller asks for the
    next block, then the buffer is refilled. Copy it to keep it. Breaking out of the loop (or an
    error in the caller) stops and joins the thread. Errors in the thread (a truncated file, a
    checksum mismatch) are re-raised in the caller, in order.

    Examples
    --------
    >>> src = open_source("reps/")                                    # doctest: +SKIP
    >>> for off, block in BlockReader(src, block_rows=16384, prefetch=2):  # doctest: +SKIP
    ...     total += block.astype(np.float64).sum(0)
    """

    def __init__(self, source: MatrixSource, block_rows: int = DEFAULT_BLOCK_ROWS, prefetch: int = 2,
                 verify: bool | None = None, shards: Sequence[ShardInfo] | None = None):
        if block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {block_rows}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        self.source = source
        self.block_rows = int(block_rows)
        self.prefetch = int(prefetch)
        self.verify = verify
        self.shards = list(source.shards if shards is None else shards)
        self.dtype = np.dtype(SUPPORTED_DTYPES[source.dtype])
        self._buffers: list[np.ndarray] | None = None
        #: bytes read from files with readinto / copied out of mappings (for benchmarks)
        self.bytes_read = 0

    def _alloc(self) -> list[np.ndarray]:
        if self._buffers is None:
            rows = min(self.block_rows, max((s.count for s in self.shards), default=0))
            self._buffers = [np.empty((max(rows, 1), self.source.d), dtype=self.dtype)
                             for _ in range(self.prefetch + 1)]
        return self._buffers

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        free: queue.Queue = queue.Queue()
        ready: queue.Queue = queue.Queue()
        stop = threading.Event()
        for b in self._alloc():
            free.put(b)
        thread = threading.Thread(target=self._run, args=(free, ready, stop), daemon=True,
                                  name="scalselect-readahead")
        thread.start()
        held = None
        try:
            while True:
                if held is not None:  # the caller asked for the next block: the last one is free
                    free.put(held)
                    held = None
                item = ready.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                offset, buf, block = item
                held = buf
                yield offset, block
        finally:
            stop.set()
            free.put(None)  # wake the thread if it waits for a buffer
            thread.join()

    # -- reader thread ------------------------------------------------------------------------
    def _run(self, free: queue.Queue, ready: queue.Queue, stop: threading.Event) -> None:
        try:
            for shard in self.shards:
                if stop.is_set():
                    return
                arr = self.source._shard_array(shard)
                region = _file_region(arr)
                if region is not None:
                    self._read_file(shard, region, free, ready, stop)
                else:
                    self._read_array(shard, arr, _is_mapped(arr), free, ready, stop)
            ready.put(_DONE)
        except BaseException as exc:  # handed to the caller, raised there
            ready.put(exc)

    def _get_buffer(self, free: queue.Queue, stop: threading.Event):
        buf = free.get()
        return None if (buf is None or stop.is_set()) else buf

    def _read_file(self, shard, region, free, ready, stop) -> None:
        path, data_offset = region
        row_bytes = self.source.d * self.dtype.itemsize
        check = self.source._should_verify(shard, self.verify)
        crc = 0
        # Unbuffered FileIO: readinto goes straight from the page cache into our buffer, GIL released.
        with open(path, "rb", buffering=0) as fh:
            fd = fh.fileno()
            _fadvise(fd, data_offset, shard.count * row_bytes, "POSIX_FADV_SEQUENTIAL")
            fh.seek(data_offset)
            for start in range(0, shard.count, self.block_rows):
                m = min(self.block_rows, shard.count - start)
                buf = self._get_buffer(free, stop)
                if buf is None:
                    return
                nbytes = m * row_bytes
                nxt = start + m
                if nxt < shard.count:  # start the kernel on the next block while we copy this one
                    _fadvise(fd, data_offset + nxt * row_bytes,
                             min(self.block_rows, shard.count - nxt) * row_bytes, "POSIX_FADV_WILLNEED")
                view = buf[:m]
                mv = memoryview(buf.reshape(-1).view(np.uint8))[:nbytes]
                done = 0
                while done < nbytes:
                    got = fh.readinto(mv[done:])
                    if not got:
                        raise StoreError(
                            f"shard {shard.name!r}: {path} ended after {start + done // row_bytes} of "
                            f"{shard.count} rows; the file was truncated, re-extract the shard")
                    done += got
                self.bytes_read += nbytes
                if check:
                    crc = zlib.crc32(mv, crc)
                ready.put((shard.offset + start, buf, view))
        if check:
            _check_crc(shard, crc)
            self.source._mark_verified(shard)

    def _read_array(self, shard, arr, mapped, free, ready, stop) -> None:
        check = self.source._should_verify(shard, self.verify)
        crc = 0
        for start in range(0, shard.count, self.block_rows):
            if stop.is_set():
                return
            part = arr[start:start + self.block_rows]
            if mapped:
                buf = self._get_buffer(free, stop)
                if buf is None:
                    return
                view = buf[:part.shape[0]]
                np.copyto(view, part)  # page faults happen here, in the reader thread
                self.bytes_read += view.nbytes
            else:
                buf, view = None, np.ascontiguousarray(part)
            if check:
                crc = zlib.crc32(view.view(np.uint8).reshape(-1), crc)
            ready.put((shard.offset + start, buf, view))
        if check:
            _check_crc(shard, crc)
            self.source._mark_verified(shard)


def _fadvise(fd: int, offset: int, length: int, advice: str) -> None:
    # Advice is a hint; platforms without posix_fadvise (macOS) just skip it.
    fn = getattr(os, "posix_fadvise", None)
    if fn is not None and hasattr(os, advice):
        with contextlib.suppress(OSError):
            fn(fd, offset, length, getattr(os, advice))


def load_npy(path, context: str = "", fix: str = "") -> np.ndarray:
    """Memory-map a ``.npy`` file, with one clear :class:`StoreError` for anything that is not one.

    Empty and truncated files, ``.npz`` archives under a ``.npy`` name and pickled (object) arrays
    are refused; the message starts with ``context`` and ends with ``fix``.
    """
    what = f"{context}{path}"
    tail = f"; {fix}" if fix else ""
    try:
        if os.path.getsize(path) == 0:
            raise StoreError(f"{what} is empty (0 bytes), not a .npy matrix{tail}")
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except StoreError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        raise StoreError(f"{what}: cannot read as .npy ({type(exc).__name__}: {exc}){tail}") from exc
    if not isinstance(arr, np.ndarray):  # np.load opened a .npz archive despite the name
        with contextlib.suppress(Exception):
            arr.close()
        raise StoreError(f"{what} holds an .npz archive, not a .npy matrix{tail}")
    return arr


def open_source(source, ids: Sequence[str] | None = None) -> MatrixSource:
    """Turn what a user passes into a :class:`MatrixSource`.

    Parameters
    ----------
    source : MatrixSource, ndarray, np.memmap, str or PathLike
        An existing source (returned as is), an (n, d) array, a ``.npy`` file (memory-mapped;
        a single-shard store with ids = row numbers) or a store directory.
    ids : sequence of str, optional
        Ids for an array source.

    Raises
    ------
    StoreError
        If the path does not exist or is not a ``.npy`` file or store.
    """
    if isinstance(source, MatrixSource):
        return source
    if isinstance(source, np.ndarray):
        return ArraySource(source, ids=ids)
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.is_dir():
            return StoreSource(p)
        if p.suffix == ".npy" and p.is_file():
            arr = load_npy(p, "", "pass a matrix saved with numpy.save")
            return ArraySource(arr, ids=ids, name=p.name, path=str(p))
        if not p.exists():
            raise StoreError(f"{p}: no such file or directory")
        raise StoreError(f"{p}: expected a .npy matrix or a representation store directory")
    raise TypeError(f"cannot read representations from {type(source).__name__}; pass an ndarray, "
                    f"a .npy path or a store directory")


# --------------------------------------------------------------------------------------------------
# writer
# --------------------------------------------------------------------------------------------------
@dataclass
class StoreWriter:
    """Append shards to a store directory, committing each one atomically.

    Parameters
    ----------
    path : str or PathLike
        Store directory (created if missing).
    d : int
        Representation width.
    dtype : {"float16", "bfloat16", "float32"}
        Storage dtype. Rows passed as float32/float64 are cast (bfloat16 with round-to-nearest-even).
    provenance : dict, optional
        Model, layer, threshold, data fingerprint, ... Must match an existing store's provenance
        unless ``force`` (an existing store from a different run is refused, never mixed).
    prefix : str
        Shard name prefix; per-rank writers use ``"rank003-shard"`` so ranks never collide.

    Examples
    --------
    >>> w = StoreWriter("reps", d=4, dtype="float32")            # doctest: +SKIP
    >>> w.write_shard(np.zeros((2, 4)), ["a", "b"])              # doctest: +SKIP
    """

    path: str | os.PathLike
    d: int
    dtype: str = "float16"
    provenance: dict = field(default_factory=dict)
    prefix: str = "shard"
    force: bool = False

    def __post_init__(self):
        if self.dtype not in SUPPORTED_DTYPES:
            raise StoreError(f"unsupported store dtype {self.dtype!r}; choose one of {sorted(SUPPORTED_DTYPES)}")
        self.path = Path(self.path)
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"{self.path} exists and is not a directory; choose another output path")
        self.path.mkdir(parents=True, exist_ok=True)
        mpath = self.path / MANIFEST
        if mpath.exists():
            m = json.loads(mpath.read_text())
            same = m.get("d") == self.d and m.get("dtype") == self.dtype and \
                m.get("provenance", {}) == json.loads(json.dumps(self.provenance))
            if not same and not self.force:
                raise StoreError(
                    f"{self.path} already holds a store from a different run (d={m.get('d')}, "
                    f"dtype={m.get('dtype')}, provenance differs); use another directory or force=True "
                    f"(--force) to discard it")
            if not same:
                self._reset()
        if not mpath.exists():
            atomic_write_json(mpath, self._manifest([]))

    def _reset(self):
        for p in self.path.glob("*"):
            if p.name == MANIFEST or p.suffix in (".npy", ".txt", ".keys", ".context"):
                p.unlink()

    def _manifest(self, shards: list[dict]) -> dict:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "d": self.d, "dtype": self.dtype,
                "count": int(sum(s["count"] for s in shards)), "provenance": self.provenance,
                "shards": sorted(shards, key=lambda s: s["name"])}

    def committed(self) -> dict[str, dict]:
        """Records of the shards already committed, by name (for resuming)."""
        m = json.loads((self.path / MANIFEST).read_text())
        return {s["name"]: s for s in m.get("shards", [])}

    def shard_name(self, index: int) -> str:
        return f"{self.prefix}-{index:05d}"

    def write_shard(self, rows: np.ndarray, ids: Sequence[str], index: int | None = None,
                    extra: dict | None = None, commit: bool = True, keys: Sequence[bytes | None] | None = None,
                    key_context: bytes | None = None) -> dict:
        """Write one shard and commit it to the manifest.

        Parameters
        ----------
        rows : ndarray, shape (count, d)
            float16/float32/float64 values, or uint16 bfloat16 bits when ``dtype="bfloat16"``.
        ids : sequence of str
            One id per row; ids may not contain newlines.
        index : int, optional
            Shard number; defaults to one past the highest committed shard of this prefix.
        extra : dict, optional
            Extra fields stored in the shard record (e.g. the input range it covers).
        commit : bool
            False: write the shard's files (their data fsynced) but leave it off the manifest; pass the
            returned record to :meth:`commit`, with others, to commit them together.
        keys : sequence of bytes or None, optional
            One ``KEY_BYTES``-byte content key per row (None: the row has none, stored as zeros), written
            to ``<shard>.keys`` and checksummed in the record (see :func:`read_shard_keys`).
        key_context : bytes
            The context the keys were made under (required with ``keys``); stored once per store in a
            file named by its digest.

        Returns
        -------
        dict
            The shard record (committed when ``commit``).
        """
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.d:
            raise StoreError(f"{self.path}: shard rows have shape {rows.shape}, expected (count, {self.d})")
        ids = [str(i) for i in ids]
        if len(ids) != rows.shape[0]:
            raise StoreError(f"{self.path}: {len(ids)} ids for {rows.shape[0]} rows")
        for i in ids:
            if "\n" in i or "\r" in i:
                raise StoreError(f"sample id {i!r} contains a newline; ids must be single-line strings")
        data = _encode(rows, self.dtype)
        if index is None:
            mine = [int(n.rsplit("-", 1)[1]) for n in self.committed() if n.startswith(self.prefix + "-")]
            index = max(mine, default=-1) + 1
        name = self.shard_name(index)
        rows_file, ids_file = f"{name}.npy", f"{name}.ids.txt"
        # the renames are made durable by commit()'s one directory fsync, before the manifest names them
        with atomic_path(self.path / rows_file, sync_dir=False) as tmp:
            with open(tmp, "wb") as fh:  # a file object: np.save would append ".npy" to a bare path
                np.save(fh, data, allow_pickle=False)
        atomic_write_bytes(self.path / ids_file, ("\n".join(ids) + ("\n" if ids else "")).encode("utf-8"),
                           sync_dir=False)
        rec = {"name": name, "count": int(rows.shape[0]), "rows_file": rows_file, "ids_file": ids_file,
               "checksum": _crc32_array(data), **(extra or {})}
        if keys is not None:
            rec.update(self._write_keys(name, keys, key_context, len(ids)))
        rec["stat"] = shard_file_stat(self.path, rows_file, ids_file, rec.get("keys_file"))
        if commit:
            self.commit([rec])
        return rec

    def _write_keys(self, name: str, keys: Sequence[bytes | None], context: bytes | None, count: int) -> dict:
        if context is None:
            raise StoreError(f"{self.path}: shard keys need the key_context they were made under")
        if len(keys) != count:
            raise StoreError(f"{self.path}: {len(keys)} content keys for {count} rows")
        zero = bytes(KEY_BYTES)
        for k in keys:
            if k is not None and len(k) != KEY_BYTES:
                raise StoreError(f"{self.path}: a content key has {len(k)} bytes, {KEY_BYTES} expected")
        blob = b"".join(zero if k is None else bytes(k) for k in keys)
        keys_file, context_file = f"{name}.keys", _context_file_name(context)
        cpath = self.path / context_file
        if not (cpath.is_file() and cpath.read_bytes() == context):
            atomic_write_bytes(cpath, context, sync_dir=False)
        atomic_write_bytes(self.path / keys_file, blob, sync_dir=False)
        return {"keys_file": keys_file, "keys_checksum": f"crc32:{zlib.crc32(blob) & 0xFFFFFFFF:08x}",
                "keys_context_file": context_file}

    def commit(self, records: Sequence[dict]) -> None:
        """Put shards written with ``write_shard(..., commit=False)`` on the manifest, in one update.

        Their files' data was fsynced when written; one fsync of the store directory makes their renames
        durable before the manifest (itself written atomically) names them, so a crash at any point
        leaves each shard either committed whole or absent from the manifest (extracted again).
        """
        if not records:
            return
        fsync_dir(self.path)
        with _manifest_lock(self.path):
            shards = self.committed()
            shards.update((rec["name"], rec) for rec in records)
            atomic_write_json(self.path / MANIFEST, self._manifest(list(shards.values())))


def shard_file_stat(store: str | os.PathLike, rows_file: str, ids_file: str, keys_file: str | None = None
                    ) -> dict | None:
    """``{"rows": [size, mtime_ns], "ids": [size, mtime_ns]}`` of a shard's files (None if one is missing),
    with ``"keys"`` too when the shard has a keys sidecar.

    Recorded when a shard is committed: a resumed job re-reads (and checksums) only the shards whose
    files no longer match it; the others are still verified by their first full read.
    """
    out = {}
    for key, name in (("rows", rows_file), ("ids", ids_file), ("keys", keys_file)):
        if name is None:
            continue
        try:
            st = os.stat(Path(store) / name)
        except OSError:
            return None
        out[key] = [int(st.st_size), int(st.st_mtime_ns)]
    return out


@contextlib.contextmanager
def _manifest_lock(store: Path):
    # Serialise manifest updates between processes (per-rank writers share one store).
    import fcntl

    with open(store / ".manifest.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def uncommit_shards(store: str | os.PathLike, names: Sequence[str], move_aside: bool = True) -> list[Path]:
    """Remove shards from a store's manifest, so that the next extraction writes them again.

    Parameters
    ----------
    store : path
        Store directory.
    names : sequence of str
        Shard names (``"shard-00003"``); names not in the manifest are ignored.
    move_aside : bool
        Rename the shards' files to ``<file>.corrupt-<UTC time>`` (kept for inspection, never read
        again) instead of leaving them to be overwritten.

    Returns
    -------
    list of Path
        The files moved aside.
    """
    import time

    store = Path(store)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    with _manifest_lock(store):
        m = json.loads((store / MANIFEST).read_text())
        dropped = [r for r in m.get("shards", []) if r["name"] in set(names)]
        if not dropped:
            return []
        m["shards"] = [r for r in m.get("shards", []) if r["name"] not in set(names)]
        m["count"] = int(sum(int(r["count"]) for r in m["shards"]))
        atomic_write_json(store / MANIFEST, m)  # first: a shard off the manifest is never read
    moved = []
    if move_aside:
        for rec in dropped:
            for key in ("rows_file", "ids_file", "keys_file"):
                if rec.get(key) is None:
                    continue
                p = store / str(rec.get(key, ""))
                if p.parent.resolve() == store.resolve() and p.is_file():  # never outside the store
                    dst = p.with_name(f"{p.name}.corrupt-{stamp}")
                    os.replace(p, dst)
                    moved.append(dst)
    return moved


def _encode(rows: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        if rows.dtype == np.uint16:
            return np.ascontiguousarray(rows)
        f = np.ascontiguousarray(rows, dtype=np.float32)
        bits = f.view(np.uint32)
        # round to nearest even on the dropped 16 bits; NaN stays NaN
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        return np.where(np.isnan(f), np.uint16(0x7FC0), rounded)
    return np.ascontiguousarray(rows, dtype=SUPPORTED_DTYPES[dtype])
