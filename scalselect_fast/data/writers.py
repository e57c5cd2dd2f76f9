"""Write a selected subset of a dataset in the input's own layout.

The output is made of the input's own bytes wherever the format allows it, so nothing a downstream
trainer relies on can drift:

* **LLaVA / ShareGPT JSON** (a list): each kept record's source text is copied verbatim (same key
  order, spacing, escapes, number spelling) and joined with the input's own separators and
  indentation.
* **JSONL**: kept lines are copied verbatim (line endings included).
* **Parquet** (one file or shards): kept rows are written with the input's Arrow schema (metadata
  included, so a Hugging Face ``Image`` column stays one, image bytes untouched); row groups are
  rebuilt at about :data:`ROW_GROUP_BYTES` each. Shards in, shards out: a directory where each
  input file that has kept rows gets its kept rows under its own path relative to the dataset root
  (``selected/ai2d/train-00000-of-00001.parquet``), in input order or best first within the file.
* **WebDataset** tar shards: every member of a kept key (record, images, anything else) is copied
  byte for byte, tar headers included, into ``shard-000000.tar`` ... of at most as many samples as
  the largest input shard, ending in a standard end-of-archive marker.
* **``datasets.save_to_disk``** directory: ``Dataset.select(...).save_to_disk`` into the output.

The input is only read. A single-file output appears atomically (temporary file beside it, fsync,
rename); a multi-file output is written into a temporary directory that is renamed into place as a
set (:func:`~scalselect_fast.atomic.atomic_dir`). A crash or a full disk leaves either no output or
a previous complete one, never a partial file or a partial set of shards.
"""
from __future__ import annotations

import contextvars
import json
import os
import tarfile
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from ..atomic import atomic_dir, atomic_path, atomic_write_bytes
from .json_list import iter_json_stream
from .jsonl import iter_jsonl_lines
from .ids import IdRegistry
from .hf import import_datasets, iter_dataset_rows
from .parquet import open_parquet
from .records import IdRule, position_id
from .sample import DatasetError, position_text
from .sources import containers, open_dataset
from .webdataset import group_id, iter_key_groups, shard_opener

ORDERS = ("original", "score")
#: Target uncompressed bytes per Parquet row group in written selections (image rows are large, so a
#: row count alone would make groups of gigabytes or of a few kilobytes).
ROW_GROUP_BYTES = 32 << 20
_MAX_GROUP_ROWS = 65536
#: rows per batch read from an input Parquet row group while its kept rows are written
_READ_BATCH_ROWS = 8192


def _normalise_keep(keep, order: str) -> tuple[set[str], dict[str, int] | None]:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if isinstance(keep, (set, frozenset)):
        if order == "score":
            raise ValueError("order='score' needs `keep` as a sequence of ids in rank order, not a set")
        # the caller's set as it is when it holds strings only (a copy is one more table of every kept id)
        return (keep if all(type(k) is str for k in keep) else {str(k) for k in keep}), None
    if isinstance(keep, (str, bytes)) or not isinstance(keep, Iterable):
        raise TypeError(f"keep must be a set or a sequence of ids, got {type(keep).__name__}")
    ids = [str(k) for k in keep]
    rank = {}
    for i, k in enumerate(ids):
        if rank.setdefault(k, i) != i:
            raise ValueError(f"keep lists id {k!r} twice (positions {rank[k]} and {i})")
    return set(rank), (rank if order == "score" else None)


class _Recheck(Exception):
    """Two ids share a digest (a duplicate id, or a rare digest collision): the writer is rerun with
    an exact table of every id, which names the duplicate as before or finds none."""


#: while set, writers note every id in a plain dict (exact; memory grows with the input)
_EXACT_IDS = contextvars.ContextVar("scalselect_exact_ids", default=False)


class _SeenIds:
    """The ids a writer has read, in memory that does not grow with the input or the selection: every
    id's 64-bit digest in partition files on disk (:class:`~scalselect_fast.data.ids.IdRegistry`) and a
    count of the reads that are in ``keep``. Once the pass is over, no shared digest means no repeated
    id, so the count is the number of kept ids found; a shared digest or a kept id not found raises
    :class:`_Recheck` (handled by :func:`write_selected`): the exact rerun then names the first
    repeated id in input order, or the missing ones, as before."""

    def __init__(self, keep: set[str]):
        self.keep, self.n_kept = keep, 0
        self.registry = IdRegistry()

    def setdefault(self, sid: str, index: int) -> int:
        self.registry.add(sid, index)
        self.n_kept += sid in self.keep
        return index

    def verify(self) -> None:
        try:
            if self.registry.duplicates(limit=1) or self.n_kept != len(self.keep):
                raise _Recheck
        finally:
            self.registry.close()


def _seen_ids(keep: set[str]):
    """Where a writer notes the ids it reads: a plain dict on the exact rerun, else :class:`_SeenIds`."""
    return {} if _EXACT_IDS.get() else _SeenIds(keep)


def _check_found(path: str, keep: set[str], found) -> None:
    if isinstance(found, _SeenIds):
        found.verify()  # every kept id found once, or a _Recheck
        return
    missing = [k for k in keep if k not in found]
    if missing:
        shown = ", ".join(repr(m) for m in sorted(missing)[:5])
        raise DatasetError(f"{len(missing)} selected id(s) are not in {path!r} (e.g. {shown}); the "
                           "selection does not belong to this dataset", reason="selection", path=path)


def _note(path: str, found, sid: str, index: int, line: int | None) -> None:
    first = found.setdefault(sid, index)
    if first != index:
        raise DatasetError(f"{path}: duplicate id {sid!r}: record {first} and {position_text(index, line)}; a "
                           "selection by id is ambiguous", reason="duplicate_id", path=path, index=index,
                           line=line, sample_id=sid)


#: Layouts whose selection is a directory of files (committed as a set).
MULTI_FILE_LAYOUTS = ("webdataset", "parquet_shards", "save_to_disk", "datasets_object")


def _layout(source) -> str:
    if source.dataset is not None:
        return "datasets_object"
    if source.container == "webdataset":
        return "webdataset"
    if source.container == "datasets":
        return "save_to_disk"
    if source.container == "parquet" and not source.single:
        return "parquet_shards"
    return "file" if source.single else "files"


def input_layout(spec, format: str = "auto") -> str:
    """The layout of a dataset input, which is also the layout its selection is written in.

    Parameters
    ----------
    spec : str, path-like, list, DataSource or datasets object
        Anything :func:`~scalselect_fast.data.open_dataset` accepts.
    format : str
        ``"auto"`` or a container name, as for the readers.

    Returns
    -------
    str
        ``"webdataset"`` (tar shards), ``"parquet_shards"`` (several Parquet files),
        ``"save_to_disk"`` (a ``datasets`` directory), ``"datasets_object"`` (a ``datasets.Dataset``
        given in Python), ``"files"`` (several JSON or JSONL files: one file out) or ``"file"``.
    """
    return _layout(open_dataset(spec, format))


def selected_name(spec, format: str = "auto") -> str:
    """File or directory name of the selection written for input ``spec``: ``selected.json``,
    ``selected.jsonl``, ``selected.parquet`` (the input file's own suffix when it has one), or
    ``selected`` (a directory) for the multi-file layouts."""
    source = open_dataset(spec, format)
    layout = _layout(source)
    if layout in MULTI_FILE_LAYOUTS:
        return "selected"
    suffix = os.path.splitext(source.files[0].name)[1] if layout == "file" else ""
    return "selected" + (suffix or {"jsonl": ".jsonl", "parquet": ".parquet"}.get(source.container, ".json"))


def _check_writable(dst: str) -> None:
    probe = os.path.dirname(os.path.abspath(dst))
    while not os.path.exists(probe):  # the nearest existing ancestor decides
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"cannot write {dst!r}: {probe!r} is a file, not a folder; choose another "
                         "output path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {dst!r}: folder {probe!r} is not writable; choose another "
                              "output path or fix its permissions")


def write_selected(input_path, out_path: str | os.PathLike,
                   keep: set[str] | Sequence[str], order: str = "original", format: str = "auto",
                   id_field: str | None = None) -> int:
    """Write the records of ``input_path`` whose id is in ``keep`` to ``out_path``, in the input's layout.

    Parameters
    ----------
    input_path : str, path-like or list
        The dataset that was read: a JSON list, JSONL or Parquet file; Parquet shards (a list, a
        directory or a glob); WebDataset tar shards (a ``.tar``, a brace pattern, a list or a
        directory of them); a ``datasets.save_to_disk`` directory. Never modified.
    out_path : str or path-like
        Destination, written atomically: a file for a single-file input, a directory for the
        multi-file layouts (see :func:`selected_name`). Must not be the input.
    keep : set of str or sequence of str
        Selected ids (integers are compared as strings). A sequence is taken as rank order.
    order : {"original", "score"}
        ``"original"``: input order. ``"score"``: the order of ``keep`` (a sequence).
    format : str
        Output container: ``"auto"`` (the input's), or a container name. JSON and JSONL may be
        converted into each other (records re-serialised compactly when the container changes);
        every other layout is written in kind, so naming the input's own container (what
        ``--format`` passes) is the same as ``"auto"``.
    id_field : str, optional
        Record field (column) that holds the id, as for :func:`~.readers.read_dataset`: ``None``
        reads ``id`` and names a record without an ``id`` field by its position
        (``<file relative to the dataset root>#<row>``). For WebDataset, a record without it is
        identified by its key, as the reader does.

    Returns
    -------
    int
        Number of records written (``len(keep)``).

    Raises
    ------
    DatasetError
        An id in ``keep`` is not in the input, or a selected id occurs twice in the input.

    Notes
    -----
    Memory does not hold the input's ids: their 64-bit digests go to temporary files
    (:class:`~scalselect_fast.data.ids.IdRegistry`); only ``keep`` is held by value. When two digests
    match (a repeated id, or a rare collision) or a kept id is missing, the writer runs again with an
    exact table of every id, so the error names the first repeated id in input order, or the missing
    ids, as before.
    """
    try:
        return _write_selected(input_path, out_path, keep, order, format, id_field)
    except _Recheck:  # two ids share a digest: the exact pass names the duplicate (or finds none)
        token = _EXACT_IDS.set(True)
        try:
            return _write_selected(input_path, out_path, keep, order, format, id_field)
        finally:
            _EXACT_IDS.reset(token)


def _write_selected(input_path, out_path, keep, order: str, format: str, id_field: str | None) -> int:
    dst = os.fspath(out_path)
    if format != "auto" and format not in containers():
        raise ValueError(f"format must be 'auto' or one of {tuple(containers())}, got {format!r}")
    keep_set, rank = _normalise_keep(keep, order)
    source = open_dataset(input_path)
    layout = _layout(source)
    id_rule = _Ids(IdRule(id_field), source)
    if format not in ("auto", source.container) and not {format, source.container} <= {"json", "jsonl"}:
        raise ValueError(f"cannot write a {source.container} input as {format}: only JSON and JSONL convert "
                         "into each other (Parquet stays Parquet; other layouts are written in kind)")
    for f in source.files:
        if f.local and os.path.exists(dst) and os.path.samefile(f.path, dst):
            raise ValueError(f"refusing to overwrite the input {f.path!r}: choose another output path")
    if layout in MULTI_FILE_LAYOUTS:
        if os.path.isfile(dst):
            raise ValueError(f"output {dst!r} is a file; the selection of a {layout} input is a directory")
        _check_writable(dst)
        if layout == "webdataset":
            return _write_webdataset(source.files, dst, keep_set, rank, id_rule)
        if layout == "parquet_shards":
            return _write_parquet(source.files, dst, keep_set, rank, id_rule, single=False)
        if layout == "save_to_disk":
            return _write_datasets(source.files[0].path, None, dst, keep_set, rank, id_rule)
        return _write_datasets(None, source.dataset, dst, keep_set, rank, id_rule)
    if os.path.isdir(dst):
        raise ValueError(f"output {dst!r} is a directory; pass a file path")
    _check_writable(dst)
    container = source.container
    out_container = container if format == "auto" else format
    if container == "json":
        return _write_from_json(source.files, dst, keep_set, rank, out_container, id_rule)
    if container == "jsonl":
        return _write_from_jsonl(source.files, dst, keep_set, rank, out_container, id_rule)
    if container == "parquet":
        return _write_parquet(source.files, dst, keep_set, rank, id_rule, single=True)
    raise ValueError(f"cannot write a selection of a {container!r} input")


class _Ids:
    """The readers' id rule (:class:`~.records.IdRule`) for the files of one source: the id column's
    name (``field``) and each record's id, positional where a record has no id field."""

    def __init__(self, rule: IdRule, source):
        self.rule, self.source = rule, source
        self.field = rule.field

    def of(self, record, file, row: int) -> str | None:
        return self.rule.of(record, self.source.relative_name(file) if file is not None else "", row)

    def column(self, names, what: str, path) -> bool:
        """Whether the id column is there (True) or rows are named by position (False); else refuse."""
        if self.field in names:
            return True
        if self.rule.positional:
            return False
        raise DatasetError(f"{what}: no {self.field!r} column; cannot select rows by id (omit --id-field to "
                           "name rows by their position)", reason="missing_field", path=path)

    def positions(self, file, start: int, n: int) -> list[str]:
        name = self.source.relative_name(file) if file is not None else ""
        return [position_id(name, start + i) for i in range(n)]


def _ranked(items: list, rank: dict[str, int] | None) -> list:
    """``items`` are ``(sid, payload)`` in input order; reorder by ``rank`` when given."""
    return items if rank is None else sorted(items, key=lambda it: rank[it[0]])


def _label(files) -> str:
    return files[0].path if len(files) == 1 else f"the {len(files)} input files"


def _write_from_json(files, dst, keep, rank, out_container, id_rule) -> int:
    """JSON list(s) in: kept records' source text copied verbatim, joined with the (first) input's own
    separators and indentation. Streamed: memory is the kept records, not the input."""
    found = _seen_ids(keep)
    kept = []
    first_layout = None
    offset = 0
    for file in files:
        layout: dict = {}
        n = 0
        with file.open() as fh:
            for index, line, obj, text in iter_json_stream(fh, file.path, layout):
                n = index + 1
                sid = id_rule.of(obj, file, index)
                if sid is None:
                    continue
                _note(file.path, found, sid, offset + index, line)
                if sid in keep:
                    kept.append((sid, text))
        if first_layout is None:
            first_layout = layout
        offset += n
    _check_found(_label(files), keep, found)
    kept = _ranked(kept, rank)
    if out_container == "jsonl":
        body = "".join(json.dumps(json.loads(t), ensure_ascii=False) + "\n" for _, t in kept)
        atomic_write_bytes(dst, body.encode("utf-8"))
        return len(kept)
    # Reuse the (first) input's layout: what follows '[', what separates records, what precedes ']'.
    lead, sep, tail = first_layout["lead"], first_layout["sep"], first_layout["tail"]
    if sep is None:  # fewer than two records: a separator in the same style as the lead
        sep = "," + lead if "\n" in lead else ", "
    body = "[" + (lead + sep.join(t for _, t in kept) + tail if kept else "") + "]" + first_layout["trailer"]
    with atomic_path(dst) as tmp, open(tmp, "w", encoding="utf-8", newline="") as out:
        out.write(body)
    return len(kept)


def _write_from_jsonl(files, dst, keep, rank, out_container, id_rule) -> int:
    found = _seen_ids(keep)
    kept = []  # (sid, (file, offset, length)): the bytes are re-read, so memory stays O(len(keep))
    base = 0
    for fi, file in enumerate(files):
        n = 0
        for index, line, offset, raw, obj in iter_jsonl_lines(file):
            n = index + 1
            sid = id_rule.of(obj, file, index)
            if sid is None:
                continue
            _note(file.path, found, sid, base + index, line)
            if sid in keep:
                kept.append((sid, (fi, offset, len(raw))))
        base += n
    _check_found(_label(files), keep, found)
    kept = _ranked(kept, rank)
    handles: dict[int, object] = {}
    try:
        with atomic_path(dst) as tmp, open(tmp, "wb") as fout:
            if out_container == "json":
                fout.write(b"[\n")
            for i, (_, (fi, offset, length)) in enumerate(kept):
                fin = handles.get(fi)
                if fin is None:
                    fin = handles[fi] = files[fi].open()
                fin.seek(offset)
                raw = fin.read(length)
                if offset == 0 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                if out_container == "json":
                    fout.write((b",\n" if i else b"") + b"  " + raw.strip())
                else:
                    fout.write(raw if raw.endswith(b"\n") else raw + b"\n")
            if out_container == "json":
                fout.write(b"\n]\n" if kept else b"]\n")
    finally:
        for fh in handles.values():
            fh.close()
    return len(kept)


def _as_strings(col):
    import pyarrow as pa
    import pyarrow.compute as pc

    return col if pa.types.is_string(col.type) or pa.types.is_large_string(col.type) else pc.cast(col, pa.string())


def _write_parquet(inputs: list, dst: str, keep: set[str], rank: dict[str, int] | None, id_rule: "_Ids",
                   single: bool) -> int:
    """Parquet in, Parquet out: one file (``single``) or a directory of shards.

    Two passes: the id column alone finds the kept rows (and checks ids); then only the row groups
    that hold kept rows are read, whole, and the rows taken from them in output order.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    pfs = [open_parquet(f) for f in inputs]
    files = [f.path for f in inputs]
    schema = pfs[0].schema_arrow
    for f, pf in zip(files[1:], pfs[1:]):
        if not pf.schema_arrow.equals(schema, check_metadata=False):
            raise DatasetError(f"Parquet shards {files[0]!r} and {f!r} have different schemas "
                               f"({schema.types} vs {pf.schema_arrow.types}); every shard of one dataset "
                               "needs the same columns and types", reason="format", path=f)
    has_ids = id_rule.column(schema.names, files[0], files[0])
    found = _seen_ids(keep)
    # input order: (None, (file, row group, kept rows of the group as int64)), one entry per group;
    # best first: (id, (file, row group, row in group)), one per kept row, to be sorted by rank
    picks: list = []
    index = 0
    for fi, (f, pf) in enumerate(zip(files, pfs)):
        row = 0
        for g in range(pf.num_row_groups):
            if has_ids:
                ids = _as_strings(pf.read_row_group(g, columns=[id_rule.field]).column(0))
            else:
                n = pf.metadata.row_group(g).num_rows
                ids = pa.array(id_rule.positions(inputs[fi], row, n), type=pa.string())
            row += len(ids)
            # the kept rows by the set the ids are noted against anyway: an Arrow value set of every
            # kept id (and the hash table is_in builds from it per row group) would grow with the selection
            hit = []
            for i, sid in enumerate(ids.to_pylist()):
                if sid is not None:
                    _note(f, found, sid, index + i, None)
                    if sid in keep:
                        hit.append(i)
            if rank is None:
                if hit:
                    picks.append((None, (fi, g, np.array(hit, np.int64))))
            else:
                picks.extend((ids[r].as_py(), (fi, g, r)) for r in hit)
            index += len(ids)
    _check_found(files[0] if single else f"the {len(files)} Parquet shards", keep, found)
    picks = _ranked(picks, rank)
    n_kept = len(picks) if rank is not None else sum(len(p[1][2]) for p in picks)
    n_rows = sum(pf.metadata.num_rows for pf in pfs)
    row_bytes = sum(pf.metadata.row_group(g).total_byte_size for pf in pfs
                    for g in range(pf.num_row_groups)) / max(1, n_rows)
    group_rows = int(min(_MAX_GROUP_ROWS, max(1, ROW_GROUP_BYTES // max(1.0, row_bytes))))
    if single:
        chunks = [picks]
    else:  # each input file's kept rows, in output order, under that file's own relative path
        per_file: dict[int, list] = {}
        for pick in picks:
            per_file.setdefault(pick[1][0], []).append(pick)
        names = _mirror_names(inputs, id_rule.source)
        chunks = [per_file[fi] for fi in sorted(per_file)]
        chunk_names = [names[fi] for fi in sorted(per_file)]

    def table_of(chunk) -> pa.Table:
        by_group: dict[tuple[int, int], list[int]] = {}
        for pos, (_sid, (fi, g, r)) in enumerate(chunk):
            by_group.setdefault((fi, g), []).append(pos)
        pieces, positions = [], []
        for (fi, g), poss in by_group.items():
            rows = pa.array([chunk[p][1][2] for p in poss], type=pa.int64())
            pieces.append(pfs[fi].read_row_group(g).take(rows).replace_schema_metadata(schema.metadata))
            positions.extend(poss)
        if not pieces:
            return schema.empty_table()
        table = pa.concat_tables(pieces)
        back = [0] * len(positions)  # table row j holds chunk position positions[j]
        for j, pos in enumerate(positions):
            back[pos] = j
        return table.take(pa.array(back, type=pa.int64()))

    def write(path, chunk) -> None:
        with pq.ParquetWriter(path, schema) as writer:
            if rank is not None or not chunk:  # best first: the kept rows are gathered, then reordered
                writer.write_table(table_of(chunk), row_group_size=group_rows)
                return
            # input order: kept rows taken from the input a batch at a time and cut into the same
            # output row groups as one table of every kept row would be (memory: one batch in, one
            # output row group out, whatever the number of kept rows)
            pending, n_pending = [], 0
            for _none, (fi, g, kept_rows) in chunk:
                at = 0  # the input row group in batches: a row group of a million rows is not read whole
                for batch in pfs[fi].iter_batches(batch_size=_READ_BATCH_ROWS, row_groups=[g]):
                    lo, hi = np.searchsorted(kept_rows, [at, at + batch.num_rows])
                    start, at = at, at + batch.num_rows
                    if hi == lo:
                        continue
                    taken = pa.Table.from_batches([batch]).take(pa.array(kept_rows[lo:hi] - start))
                    pending.append(taken.replace_schema_metadata(schema.metadata))
                    n_pending += int(hi - lo)
                    while n_pending >= group_rows:
                        table = pa.concat_tables(pending)
                        writer.write_table(table.slice(0, group_rows), row_group_size=group_rows)
                        rest = table.slice(group_rows)
                        pending, n_pending = ([rest] if rest.num_rows else []), rest.num_rows
            if pending:
                writer.write_table(pa.concat_tables(pending), row_group_size=group_rows)

    if single:
        with atomic_path(dst) as tmp:
            write(tmp, chunks[0])
    else:
        with atomic_dir(dst) as tmp:
            for name, chunk in zip(chunk_names, chunks):
                path = os.path.join(tmp, *name.split("/"))
                os.makedirs(os.path.dirname(path), exist_ok=True)
                write(path, chunk)
    return n_kept


def _mirror_names(inputs: list, source) -> list[str]:
    """Where each input file's selected rows go inside the output folder: the file's path relative
    to the dataset root (``ai2d/train-00000-of-00001.parquet``), so subset folders and shard names
    survive; ``part-0000k-of-0000n.parquet`` when those names cannot be used (two inputs with one
    name, or a name outside the root)."""
    names = [source.relative_name(f) for f in inputs]
    if len(set(names)) == len(names) and all(
            n and not n.startswith("/") and ".." not in n.split("/") for n in names):
        return names
    return [f"part-{i:05d}-of-{len(inputs):05d}.parquet" for i in range(len(inputs))]


class _OpenFiles:
    """A few input shards kept open for random-access copying (score order jumps between shards)."""

    def __init__(self, limit: int = 32):
        self.limit = limit
        self.files: OrderedDict[str, object] = OrderedDict()

    def get(self, file):
        path = file.path
        fh = self.files.pop(path, None)
        if fh is None:
            fh = file.open()
            if len(self.files) >= self.limit:
                self.files.popitem(last=False)[1].close()
        self.files[path] = fh
        return fh

    def close(self) -> None:
        for fh in self.files.values():
            fh.close()


def _copy_range(fin, fout, start: int, end: int, path: str) -> None:
    fin.seek(start)
    left = end - start
    while left:
        buf = fin.read(min(left, 1 << 20))
        if not buf:
            raise DatasetError(f"WebDataset shard {path!r} changed while the selection was written (it "
                               f"ends before byte {end}); rerun", reason="io", path=path)
        fout.write(buf)
        left -= len(buf)


def _write_webdataset(inputs: list, dst: str, keep: set[str], rank: dict[str, int] | None, id_rule: "_Ids") -> int:
    """Tar shards in, tar shards out; each kept key's members are copied byte for byte."""
    found = _seen_ids(keep)
    picks = []  # (id, (InputFile, [(start, end), ...]))
    per_shard = [0] * len(inputs)
    index = 0
    for si, file in enumerate(inputs):
        for group in iter_key_groups(file.path, lambda ext: ext == "json", shard_opener(file)):
            per_shard[si] += 1
            sid = group_id(group, id_rule.field)
            index += 1
            if sid is None:
                continue
            _note(file.path, found, sid, index - 1, None)
            if sid in keep:
                picks.append((sid, (file, group.spans())))
    _check_found(_label(inputs), keep, found)
    picks = _ranked(picks, rank)
    per_out = max(1, max(per_shard, default=1))
    chunks = [picks[i:i + per_out] for i in range(0, len(picks), per_out)] or [[]]
    files = _OpenFiles()
    try:
        with atomic_dir(dst) as tmp:
            for i, chunk in enumerate(chunks):
                with open(os.path.join(tmp, f"shard-{i:06d}.tar"), "wb") as fout:
                    for _sid, (file, spans) in chunk:
                        fin = files.get(file)
                        for start, end in spans:
                            _copy_range(fin, fout, start, end, file.path)
                    # end-of-archive: two zero blocks, padded to a whole record as tar(1) and tarfile do
                    fout.write(bytes(2 * tarfile.BLOCKSIZE))
                    fout.write(bytes(-fout.tell() % tarfile.RECORDSIZE))
    finally:
        files.close()
    return len(picks)


def _write_datasets(src: str | None, ds, dst: str, keep: set[str], rank: dict[str, int] | None,
                    id_rule: "_Ids") -> int:
    """``save_to_disk`` in (``src``) or a ``datasets`` object (``ds``), ``save_to_disk`` out.

    A ``Dataset`` (a folder, an object, a ``select`` view) goes through ``Dataset.select``, which keeps
    the features (an ``Image`` column stays one) and the image bytes. An ``IterableDataset`` has no
    random access: its kept rows are gathered in one pass (memory: the kept rows) and written with
    its features.
    """
    datasets = import_datasets(src or "a datasets object")
    what = src or f"the {type(ds).__name__} object"
    if ds is None:
        ds = datasets.load_from_disk(src)
    file = id_rule.source.files[0] if id_rule.source.files else None
    has_ids = id_rule.column(ds.column_names or [id_rule.field], what, src)
    found = _seen_ids(keep)
    picks = []
    kept_rows: dict[str, dict] = {}
    if isinstance(ds, datasets.Dataset):
        # through the formatter, not ds.data: a select()/shuffle view's rows are not the table's
        ids = (_as_strings(ds.select_columns([id_rule.field]).with_format("arrow")[:][id_rule.field]).to_pylist()
               if has_ids else id_rule.positions(file, 0, ds.num_rows))
        rows = None
    else:
        ids, rows = [], []
        for i, row in enumerate(iter_dataset_rows(ds, what)):
            value = row.get(id_rule.field)
            if not has_ids:
                ids.append(position_id("", i))
            else:
                ids.append(None if value is None or isinstance(value, bool) else str(value))
            if ids[-1] in keep:
                kept_rows[ids[-1]] = row
    for index, sid in enumerate(ids):
        if sid is None:
            continue
        _note(what, found, sid, index, None)
        if sid in keep:
            picks.append((sid, index))
    _check_found(what, keep, found)
    picks = _ranked(picks, rank)
    if rows is None:
        # keep_in_memory: select must not write an indices cache file into the input folder
        sub = ds.select([r for _sid, r in picks], keep_in_memory=True)
    else:
        sub = datasets.Dataset.from_list([kept_rows[sid] for sid, _r in picks], features=ds.features)
    with atomic_dir(dst) as tmp:
        sub.save_to_disk(str(tmp))
    return len(picks)
