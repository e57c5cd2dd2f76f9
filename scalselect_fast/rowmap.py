"""Which id and which dataset record each stored row is: the lookups every output of a selection shares.

A representation store names its rows by id; ``run`` also knows the dataset the store was extracted
from (:class:`Records`), where some records have no row at all (skipped, text-only). The manifest,
the report, the gallery and post-selection by record fields all need the same two mappings, stored
row → id (:func:`shard_ids`, :func:`ids_of`) and stored row → record (:func:`row_record`), so they
live here once.

Memory: ``run`` holds the record table as compact columns (:class:`IdColumn`: the ids' UTF-8 bytes
in Arrow buffers, about ``len(id) + 4`` bytes per record instead of a Python ``str`` each, or none in
memory where they are spilled to a temporary file, as ``run`` does;
:class:`CodedColumn`: an int8/16/32 code per record and one ``str`` per distinct value), and
:func:`row_record` matches stored rows to records by a merge of the two orders (the store's rows are
in record order) instead of a hash table of every id, falling back to the hash lookup
(:func:`~scalselect_fast.data.ids.locate_ids`) for a store whose rows are in another order.

This module does not select, score or write anything, and it does not read the dataset (only the
ids ``run`` already read into :class:`Records`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

__all__ = ["Records", "IdColumn", "CodedColumn", "ID_CHUNK", "shard_ids", "iter_shard_ids", "ids_of", "row_record",
           "locate_store_rows", "budget_base", "value_codes"]

#: records per chunk of an :class:`IdColumn` (and per block where records are walked in blocks)
ID_CHUNK = 1 << 16


def _id_pool():
    """The system allocator for the ids' chunks, which live as long as the record table: in Arrow's
    default pool they would share pages with the transient batches read beside them, and pin them."""
    import pyarrow as pa

    return pa.system_memory_pool()


class IdColumn:
    """One id (``str`` or None) per record, held as Arrow string chunks of :data:`ID_CHUNK` records.

    A read-only sequence: ``len``, ``col[i]`` (``str`` or None), ``col[a:b]`` (a list) and iteration
    (one chunk converted at a time). Build it with :meth:`append` then :meth:`finish`.

    Parameters
    ----------
    spill_dir : str or PathLike, optional
        Where the finished chunks go instead of memory: an anonymous temporary file in that folder
        (deleted by the system when the column is dropped or the process ends). A chunk is read back
        when it is used (the last one read is kept), so memory is one chunk whatever the number of
        records; ``run`` reads its ids in order (the merge with the store, the manifest), a chunk at a
        time. Default: in memory (about ``len(id) + 4`` bytes per record).
    """

    def __init__(self, spill_dir=None):
        self._chunks: list = []  # Arrow arrays, or (offset, length, schema) in the spill file
        self._pending: list = []
        self._n = 0
        self._spill_dir = spill_dir
        self._file = None
        self._cached: tuple = (-1, None)

    def append(self, sample_id: str | None) -> None:
        self._pending.append(sample_id)
        self._n += 1
        if len(self._pending) == ID_CHUNK:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._pending:
            # 32-bit offsets (4 bytes per record less) unless the chunk's UTF-8 could pass 2 GiB
            chars = sum(len(s) for s in self._pending if s is not None)
            kind = pa.string() if 4 * chars < 2**31 else pa.large_string()
            arr = pa.array(self._pending, kind, memory_pool=_id_pool())
            self._pending = []
            if self._spill_dir is None:
                self._chunks.append(arr)
                return
            if self._file is None:
                import tempfile

                self._file = tempfile.TemporaryFile(dir=self._spill_dir)
            batch = pa.record_batch([arr], names=["id"])
            data = batch.serialize()
            self._file.seek(0, 2)
            self._chunks.append((self._file.tell(), data.size, batch.schema))
            self._file.write(data)

    def finish(self) -> "IdColumn":
        self._flush()
        if self._file is not None:
            self._file.flush()
        return self

    def __len__(self) -> int:
        return self._n

    def _array(self, c: int):
        """Chunk ``c`` (finished) as an Arrow array, read back from the spill file where it went there."""
        import pyarrow as pa

        chunk = self._chunks[c]
        if not isinstance(chunk, tuple):
            return chunk
        if self._cached[0] != c:
            offset, size, schema = chunk
            self._file.seek(offset)
            data = self._file.read(size)
            self._cached = (c, pa.ipc.read_record_batch(pa.py_buffer(data), schema).column(0))
        return self._cached[1]

    def chunk(self, c: int) -> list:
        """Ids of records ``c * ID_CHUNK`` to ``(c + 1) * ID_CHUNK`` as a list."""
        return self._array(c).to_pylist() if c < len(self._chunks) else list(self._pending)

    def __iter__(self):
        for c in range(len(self._chunks)):
            yield from self.chunk(c)
        yield from list(self._pending)

    def __getitem__(self, i):
        if isinstance(i, slice):
            a, b, step = i.indices(self._n)
            out: list = []
            for c in range(a // ID_CHUNK, (max(b, a + 1) - 1) // ID_CHUNK + 1):
                lo = c * ID_CHUNK
                part = self.chunk(c)[max(a - lo, 0):max(b - lo, 0)]
                out.extend(part)
            return out[::step] if step != 1 else out
        i = int(i)
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"record {i} out of range ({self._n} records)")
        c, j = divmod(i, ID_CHUNK)
        return self._array(c)[j].as_py() if c < len(self._chunks) else self._pending[j]


class CodedColumn:
    """One value per record (``str`` or None) as a small integer code into a table of distinct values.

    Attributes
    ----------
    codes : ndarray (n,) int8, int16 or int32
        Index into ``values`` per record, in the narrowest of those types that holds every code (a
        source column of a few dozen values costs one byte per record, not four).
    values : list of str or None
        The distinct values, in order of first occurrence.
    """

    def __init__(self, codes: np.ndarray, values: list):
        self.codes, self.values = codes, values

    @classmethod
    def compact(cls, codes, values: list) -> "CodedColumn":
        """A column from int32 ``codes`` (an ``array('i')`` or ndarray), narrowed to fit ``values``."""
        codes = np.frombuffer(codes, np.int32) if len(codes) else np.zeros(0, np.int32)
        for dt in (np.int8, np.int16):
            if len(values) <= np.iinfo(dt).max + 1:
                return cls(codes.astype(dt), values)
        return cls(codes, values)

    @classmethod
    def build(cls, values) -> "CodedColumn":
        """Code an iterable of values (``str`` or None)."""
        from array import array

        table: dict = {}
        codes = array("i", (table.setdefault(v, len(table)) for v in values))
        return cls.compact(codes, list(table))

    def __len__(self) -> int:
        return int(self.codes.size)

    def __iter__(self):
        vals = self.values
        for a in range(0, self.codes.size, ID_CHUNK):
            yield from (vals[c] for c in self.codes[a:a + ID_CHUNK].tolist())

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.values[c] for c in self.codes[i].tolist()]
        return self.values[int(self.codes[i])]


def value_codes(column) -> tuple[np.ndarray, list]:
    """``(codes (n,) int8/16/32, distinct values)`` of a per-record column (a :class:`CodedColumn` as it is,
    any other sequence coded on the fly)."""
    if isinstance(column, CodedColumn):
        return column.codes, column.values
    c = CodedColumn.build(column)
    return c.codes, c.values


@dataclasses.dataclass
class Records:
    """The input dataset a store was extracted from, as ``run`` reads it.

    Attributes
    ----------
    path : str, list or dataset object
        The input as ``run`` was given it (read again by :func:`scalselect_fast.data.write_selected`
        and the gallery).
    ids : sequence of str or None
        Id per record (None where the record has no usable id): a list, or an :class:`IdColumn`.
    sources : sequence of str or None
        ``Sample.source`` per record (per-source counts): a list, or a :class:`CodedColumn`.
    fields : dict of str to sequence
        Quota field values per record (lists or :class:`CodedColumn`).
    skip_reason : dict of int to str
        Record index → why it has no representation.
    skip_counts : dict of str to int
        Reason → records skipped.
    selected_name : str
        File name of the selected dataset in the output directory (``selected.json``, ...).
    format : str
        Input container (``auto``, ``json``, ``jsonl``, ``parquet``).
    image_root : str or None
        Where relative image paths resolve (the gallery loads thumbnails from there).
    order : {"original", "score"}
        Record order of the selected dataset.
    id_field : str or None
        The id column the records were read with (``None``: ``id``, or the positional id of a
        record without one; see :func:`scalselect_fast.data.read_dataset`).
    text_only : list of int
        Indices of the text-only records (no image, so no representation). A fractional budget is
        of the records that are not text-only.
    keep_text_only : bool
        Write the text-only records to the selected dataset outside the budget (``run --text-only
        keep``): they are ``kept`` in the manifest, with no rank, and follow the ranked ids in
        ``selected.txt``.
    """

    path: Any
    ids: Sequence
    sources: Sequence
    fields: dict
    skip_reason: dict
    skip_counts: dict
    selected_name: str
    format: str = "auto"
    image_root: str | None = None
    order: str = "original"
    id_field: str | None = None
    text_only: list = dataclasses.field(default_factory=list)
    keep_text_only: bool = False
    #: record index per stored row, filled by :func:`row_record` on first use (one store per Records)
    stored_record: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def passthrough(self) -> list:
        """Record indices written outside the budget."""
        return self.text_only if self.keep_text_only else []


def shard_ids(src, shard) -> list[str]:
    """The ids of one shard (row numbers as strings where the source has none).

    A store whose shards share an id is refused (:meth:`MatrixSource.check_unique_ids`, once per source).
    """
    from .store import read_ids

    if hasattr(src, "check_unique_ids"):
        src.check_unique_ids()

    arr_ids = getattr(src, "_ids", None)
    if arr_ids is not None:
        return arr_ids[shard.offset:shard.offset + shard.count]
    if shard.ids_path is not None:
        return read_ids(shard)
    return [str(i) for i in range(shard.offset, shard.offset + shard.count)]


def iter_shard_ids(src):
    """Yield ``(shard, ids)`` per shard, reading one shard's ids at a time (memory O(shard))."""
    for shard in src.shards:
        yield shard, shard_ids(src, shard)


def ids_of(src, rows: np.ndarray) -> list[str]:
    """The ids of the given stored rows, in the order given (reads only the shards they fall in)."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return []
    out: list = [""] * rows.size
    by_row = np.argsort(rows, kind="stable")  # positions in row order: no dict of every row
    sorted_rows = rows[by_row]
    for shard in src.shards:
        lo, hi = np.searchsorted(sorted_rows, [shard.offset, shard.offset + shard.count])
        if hi == lo:
            continue
        for j, sid in zip(by_row[lo:hi].tolist(), _shard_ids_at(src, shard, sorted_rows[lo:hi] - shard.offset)):
            out[j] = sid
    return out


def _shard_ids_at(src, shard, local: np.ndarray) -> list[str]:
    """The ids of rows ``local`` (sorted) of one shard. From a store's ids file only those ids become
    Python strings (the file is split as bytes): keeping a few strings out of a list of the whole
    shard's would pin the allocator's pages of all of them."""
    if getattr(src, "_ids", None) is not None or shard.ids_path is None:
        ids = shard_ids(src, shard)
        return [ids[r] for r in local.tolist()]
    src.check_unique_ids()
    with open(shard.ids_path, "rb") as fh:
        raw = fh.read()
    if b"\r" in raw:  # text mode reads "\r" as a line end: leave that to the one reader
        ids = shard_ids(src, shard)
        return [ids[r] for r in local.tolist()]
    ends = np.flatnonzero(np.frombuffer(raw, np.uint8) == 10)
    if not raw.endswith(b"\n"):
        ends = np.append(ends, len(raw))
    if ends.size != shard.count:
        return [shard_ids(src, shard)[r] for r in local.tolist()]  # raises read_ids' damaged-shard error
    starts = np.concatenate(([0], ends[:-1] + 1))
    return [raw[a:b].decode("utf-8") for a, b in zip(starts[local].tolist(), ends[local].tolist())]


def _index_dtype(n: int) -> np.dtype:
    """int32 for indices below 2**31 (half the memory per row), else int64."""
    return np.dtype(np.int32 if n < 2**31 else np.int64)


def locate_store_rows(src, records: Records) -> tuple[np.ndarray, list[str]]:
    """``(record index per stored row (src.n,) int32 or int64, up to 3 stored ids not among the records)``.

    Stored rows are in record order (the extraction writes them so), so the two sequences are merged
    in one pass, one shard's ids and one chunk of record ids at a time: memory is the (n,) result.
    A store in another order (or holding an id the records lack) is matched again by hash lookup
    (:func:`~scalselect_fast.data.ids.locate_ids`), which names the missing ids.
    """
    out = np.empty(src.n, _index_dtype(len(records.ids)))
    rec_ids = iter(records.ids)
    j = -1
    ok = True
    for shard, ids in iter_shard_ids(src):
        for k, sid in enumerate(ids):
            for rid in rec_ids:
                j += 1
                if rid == sid:
                    out[shard.offset + k] = j
                    break
            else:
                ok = False
                break
        if not ok:
            break
    if ok:
        return out, []
    from .data.ids import locate_ids

    ids = src.ids()
    rows = locate_ids(records.ids, ids)
    missing = [ids[j] for j in np.flatnonzero(rows < 0)[:3].tolist()]
    return rows, missing


def row_record(src, records: Records) -> np.ndarray:
    """Record index of every stored row (ids are matched; the store holds the records' ids); computed
    once per :class:`Records` (kept in ``records.stored_record``)."""
    from .subspace import SubspaceError  # the job's input error; imported here so the report needs nothing of the fit

    if records.stored_record is not None and records.stored_record.shape == (src.n,):
        return records.stored_record
    rows, missing = locate_store_rows(src, records)
    if missing:
        raise SubspaceError(f"the representation store holds ids not in {records.path} (e.g. {missing}); "
                            f"the dataset changed after extraction")
    records.stored_record = rows
    return rows


def budget_base(src, records: Records | None) -> dict:
    """What a fractional budget is a fraction of: the records that are not text-only (``run``; they
    have no representation by nature), or the stored rows (a store alone, ``src``)."""
    if records is None:
        return {"n": int(src.n), "of": "stored rows"}
    n = len(records.ids)
    return {"n": n - len(records.text_only), "of": "records that are not text-only", "n_records": n,
            "n_text_only": len(records.text_only)}
