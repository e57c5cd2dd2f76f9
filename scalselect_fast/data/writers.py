"""Write a selected subset of a dataset in the input's own layout.

The output is made of the input's own bytes wherever the format allows it, so nothing a downstream
trainer relies on can drift:

* **LLaVA / ShareGPT JSON** (a list): each kept record's source text is copied verbatim (same key
  order, spacing, escapes, number spelling) and joined with the input's own separators and
  indentation.
* **JSONL**: kept lines are copied verbatim (line endings included).
* **Parquet** (one file or shards): kept rows are written with the input's Arrow schema (metadata
  included, so a Hugging Face ``Image`` column stays one, image bytes untouched); row groups are
  rebuilt at about :data:`ROW_GROUP_BYTES` each. Shards in, shards out: a directory of
  ``part-00000-of-0000N.parquet`` files with at most as many rows as the largest input shard.
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

import glob as _glob
import json
import os
import tarfile
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from ..atomic import atomic_dir, atomic_path, atomic_write_bytes
from .readers import (_WS, FORMATS, _container, _iter_json_list, _iter_jsonl_lines, _open_parquet,
                      _read_text, record_id_or_none)
from .sample import DatasetError, _where

ORDERS = ("original", "score")
#: Target uncompressed bytes per Parquet row group in written selections (image rows are large, so a
#: row count alone would make groups of gigabytes or of a few kilobytes).
ROW_GROUP_BYTES = 32 << 20
_MAX_GROUP_ROWS = 65536


def _normalise_keep(keep, order: str) -> tuple[set[str], dict[str, int] | None]:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if isinstance(keep, (set, frozenset)):
        if order == "score":
            raise ValueError("order='score' needs `keep` as a sequence of ids in rank order, not a set")
        return {str(k) for k in keep}, None
    if isinstance(keep, (str, bytes)) or not isinstance(keep, Iterable):
        raise TypeError(f"keep must be a set or a sequence of ids, got {type(keep).__name__}")
    ids = [str(k) for k in keep]
    rank = {}
    for i, k in enumerate(ids):
        if rank.setdefault(k, i) != i:
            raise ValueError(f"keep lists id {k!r} twice (positions {rank[k]} and {i})")
    return set(rank), (rank if order == "score" else None)


def _check_found(path: str, keep: set[str], found: dict[str, int]) -> None:
    missing = [k for k in keep if k not in found]
    if missing:
        shown = ", ".join(repr(m) for m in sorted(missing)[:5])
        raise DatasetError(f"{len(missing)} selected id(s) are not in {path!r} (e.g. {shown}); the "
                           "selection does not belong to this dataset", reason="selection", path=path)


def _note(path: str, found: dict[str, int], sid: str, index: int, line: int | None) -> None:
    first = found.setdefault(sid, index)
    if first != index:
        raise DatasetError(f"{path}: duplicate id {sid!r}: record {first} and {_where(index, line)}; a "
                           "selection by id is ambiguous", reason="duplicate_id", path=path, index=index,
                           line=line, sample_id=sid)


def _is_save_to_disk(path: str) -> bool:
    return os.path.isdir(path) and (os.path.isfile(os.path.join(path, "state.json"))
                                    or os.path.isfile(os.path.join(path, "dataset_dict.json")))


def _parquet_inputs(spec) -> list[str] | None:
    """The Parquet files of a multi-file input (list, directory, glob); ``None`` if it is not one."""
    items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    files: list[str] = []
    for item in items:
        s = os.fspath(item)
        if os.path.isdir(s):
            files.extend(os.path.join(s, n) for n in os.listdir(s) if n.endswith(".parquet"))
        elif _glob.has_magic(s):
            files.extend(_glob.glob(s))
        elif isinstance(spec, (list, tuple)):
            files.append(s)
        else:
            return None
    files = sorted(files)
    if not files or not all(f.endswith(".parquet") for f in files):
        return None
    return files


def input_layout(spec) -> str:
    """The layout of a dataset input, which is also the layout its selection is written in.

    Returns
    -------
    str
        ``"webdataset"`` (tar shards), ``"parquet_shards"`` (several Parquet files: a list, a
        directory or a glob), ``"save_to_disk"`` (a ``datasets`` directory) or ``"file"`` (one
        JSON / JSONL / Parquet file).
    """
    from .webdataset import is_webdataset

    if is_webdataset(spec):
        return "webdataset"
    if not isinstance(spec, (list, tuple)) and _is_save_to_disk(os.fspath(spec)):
        return "save_to_disk"
    if _parquet_inputs(spec) is not None:
        return "parquet_shards"
    return "file"


def selected_name(spec, format: str = "auto") -> str:
    """File or directory name of the selection written for input ``spec`` (``selected.json``,
    ``selected.jsonl``, ``selected.parquet``, or ``selected`` for a multi-file layout)."""
    layout = input_layout(spec)
    if layout != "file":
        return "selected"
    from .readers import detect_format

    path = os.fspath(spec)
    fmt = format if format != "auto" else detect_format(path)
    suffix = os.path.splitext(path)[1]
    if format == "auto" and suffix:
        return "selected" + suffix
    return "selected" + {"json": ".json", "jsonl": ".jsonl", "parquet": ".parquet"}.get(fmt, ".json")


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
                   id_field: str = "id") -> int:
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
    format : {"auto", "json", "jsonl", "parquet"}
        Output container for a single-file input; ``"auto"`` is the input's. JSON and JSONL may be
        converted into each other (records re-serialised compactly when the container changes);
        Parquet stays Parquet. Multi-file layouts are always written in kind.
    id_field : str
        Record field (column) that holds the id. For WebDataset, a record without it is
        identified by its key, as the reader does.

    Returns
    -------
    int
        Number of records written (``len(keep)``).

    Raises
    ------
    DatasetError
        An id in ``keep`` is not in the input, or a selected id occurs twice in the input.
    """
    dst = os.fspath(out_path)
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    keep_set, rank = _normalise_keep(keep, order)
    layout = input_layout(input_path)
    if layout != "file":
        if os.path.isfile(dst):
            raise ValueError(f"output {dst!r} is a file; the selection of a {layout} input is a directory")
        _check_writable(dst)
        if layout == "webdataset":
            return _write_webdataset(input_path, dst, keep_set, rank, id_field)
        if layout == "parquet_shards":
            return _write_parquet(_parquet_inputs(input_path), dst, keep_set, rank, id_field, single=False)
        return _write_save_to_disk(os.fspath(input_path), dst, keep_set, rank, id_field)
    src = os.fspath(input_path)
    if os.path.exists(dst) and os.path.exists(src) and os.path.samefile(src, dst):
        raise ValueError(f"refusing to overwrite the input {src!r}: choose another output path")
    if os.path.isdir(dst):
        raise ValueError(f"output {dst!r} is a directory; pass a file path")
    _check_writable(dst)
    container = _container(src, "auto")
    out_container = container if format == "auto" else format
    if out_container != container and "parquet" in (container, out_container):
        raise ValueError(f"cannot write {container} input as {out_container}: Parquet stays Parquet")
    if container == "json":
        return _write_from_json(src, dst, keep_set, rank, out_container, id_field)
    if container == "jsonl":
        return _write_from_jsonl(src, dst, keep_set, rank, out_container, id_field)
    return _write_parquet([src], dst, keep_set, rank, id_field, single=True)


def _ranked(items: list, rank: dict[str, int] | None) -> list:
    """``items`` are ``(sid, payload)`` in input order; reorder by ``rank`` when given."""
    return items if rank is None else sorted(items, key=lambda it: rank[it[0]])


def _write_from_json(src, dst, keep, rank, out_container, id_field) -> int:
    text = _read_text(src)
    found: dict[str, int] = {}
    kept, spans = [], []
    for index, line, start, end, obj in _iter_json_list(text, src):
        spans.append((start, end))
        sid = record_id_or_none(obj, id_field)
        if sid is None:
            continue
        _note(src, found, sid, index, line)
        if sid in keep:
            kept.append((sid, text[start:end]))
    _check_found(src, keep, found)
    kept = _ranked(kept, rank)
    if out_container == "jsonl":
        body = "".join(json.dumps(json.loads(t), ensure_ascii=False) + "\n" for _, t in kept)
        atomic_write_bytes(dst, body.encode("utf-8"))
        return len(kept)
    # Reuse the input's layout: what follows '[', what separates records, what precedes ']'.
    open_at = _WS.match(text, 0).end()  # the '['
    close_at = text.rindex("]")
    if spans:
        lead = text[open_at + 1:spans[0][0]]
        tail = text[spans[-1][1]:close_at]
        sep = text[spans[0][1]:spans[1][0]] if len(spans) > 1 else ("," + lead if "\n" in lead else ", ")
    else:
        lead, tail, sep = "", "", ", "
    body = "[" + (lead + sep.join(t for _, t in kept) + tail if kept else "") + "]" + text[close_at + 1:]
    atomic_write_bytes(dst, body.encode("utf-8"))
    return len(kept)


def _write_from_jsonl(src, dst, keep, rank, out_container, id_field) -> int:
    found: dict[str, int] = {}
    kept = []  # (sid, (offset, length)): the bytes are re-read, so memory stays O(len(keep))
    for index, line, offset, raw, obj in _iter_jsonl_lines(src):
        sid = record_id_or_none(obj, id_field)
        if sid is None:
            continue
        _note(src, found, sid, index, line)
        if sid in keep:
            kept.append((sid, (offset, len(raw))))
    _check_found(src, keep, found)
    kept = _ranked(kept, rank)
    with atomic_path(dst) as tmp, open(src, "rb") as fin, open(tmp, "wb") as fout:
        if out_container == "json":
            fout.write(b"[\n")
        for i, (_, (offset, length)) in enumerate(kept):
            fin.seek(offset)
            raw = fin.read(length)
            if i == 0 and offset == 0 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if out_container == "json":
                fout.write((b",\n" if i else b"") + b"  " + raw.strip())
            else:
                fout.write(raw if raw.endswith(b"\n") else raw + b"\n")
        if out_container == "json":
            fout.write(b"\n]\n" if kept else b"]\n")
    return len(kept)


def _as_strings(col):
    import pyarrow as pa
    import pyarrow.compute as pc

    return col if pa.types.is_string(col.type) or pa.types.is_large_string(col.type) else pc.cast(col, pa.string())


def _write_parquet(files: list[str], dst: str, keep: set[str], rank: dict[str, int] | None, id_field: str,
                   single: bool) -> int:
    """Parquet in, Parquet out: one file (``single``) or a directory of shards.

    Two passes: the id column alone finds the kept rows (and checks ids); then only the row groups
    that hold kept rows are read, whole, and the rows taken from them in output order.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    pfs = [_open_parquet(f) for f in files]
    schema = pfs[0].schema_arrow
    for f, pf in zip(files[1:], pfs[1:]):
        if not pf.schema_arrow.equals(schema, check_metadata=False):
            raise DatasetError(f"Parquet shards {files[0]!r} and {f!r} have different schemas "
                               f"({schema.types} vs {pf.schema_arrow.types}); every shard of one dataset "
                               "needs the same columns and types", reason="format", path=f)
    if id_field not in schema.names:
        raise DatasetError(f"{files[0]}: no {id_field!r} column; cannot select rows by id",
                           reason="missing_field", path=files[0])
    value_set = pa.array(sorted(keep), type=pa.string())
    found: dict[str, int] = {}
    picks: list[tuple[str, int, int, int]] = []  # (id, file, row group, row in group), input order
    index = 0
    for fi, (f, pf) in enumerate(zip(files, pfs)):
        for g in range(pf.num_row_groups):
            ids = _as_strings(pf.read_row_group(g, columns=[id_field]).column(0))
            for i, sid in enumerate(ids.to_pylist()):
                if sid is not None:
                    _note(f, found, sid, index + i, None)
            hit = pc.indices_nonzero(pc.fill_null(pc.is_in(ids, value_set=value_set), False)).to_pylist()
            picks.extend((ids[r].as_py(), fi, g, r) for r in hit)
            index += len(ids)
    _check_found(files[0] if single else f"the {len(files)} Parquet shards", keep, found)
    picks = _ranked([(p[0], p[1:]) for p in picks], rank)
    n_rows = sum(pf.metadata.num_rows for pf in pfs)
    row_bytes = sum(pf.metadata.row_group(g).total_byte_size for pf in pfs
                    for g in range(pf.num_row_groups)) / max(1, n_rows)
    group_rows = int(min(_MAX_GROUP_ROWS, max(1, ROW_GROUP_BYTES // max(1.0, row_bytes))))
    shard_rows = len(picks) if single else max(1, max(pf.metadata.num_rows for pf in pfs))
    chunks = [picks[i:i + shard_rows] for i in range(0, len(picks), max(1, shard_rows))] or [[]]

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
            writer.write_table(table_of(chunk), row_group_size=group_rows)

    if single:
        with atomic_path(dst) as tmp:
            write(tmp, chunks[0])
    else:
        with atomic_dir(dst) as tmp:
            for i, chunk in enumerate(chunks):
                write(os.path.join(tmp, f"part-{i:05d}-of-{len(chunks):05d}.parquet"), chunk)
    return len(picks)


class _OpenFiles:
    """A few input shards kept open for random-access copying (score order jumps between shards)."""

    def __init__(self, limit: int = 32):
        self.limit = limit
        self.files: OrderedDict[str, object] = OrderedDict()

    def get(self, path: str):
        fh = self.files.pop(path, None)
        if fh is None:
            fh = open(path, "rb")
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


def _write_webdataset(spec, dst: str, keep: set[str], rank: dict[str, int] | None, id_field: str) -> int:
    """Tar shards in, tar shards out; each kept key's members are copied byte for byte."""
    from .webdataset import expand_shards, group_id, iter_groups

    shards = expand_shards(spec)
    found: dict[str, int] = {}
    picks = []  # (id, (shard, [(start, end), ...]))
    per_shard: dict[int, int] = {}
    for index, si, group in iter_groups(shards, lambda ext: ext == "json"):
        per_shard[si] = per_shard.get(si, 0) + 1
        sid = group_id(group, id_field)
        if sid is None:
            continue
        _note(shards[si], found, sid, index, None)
        if sid in keep:
            picks.append((sid, (shards[si], group.spans())))
    _check_found(shards[0] if len(shards) == 1 else f"the {len(shards)} WebDataset shards", keep, found)
    picks = _ranked(picks, rank)
    per_out = max(1, max(per_shard.values(), default=1))
    chunks = [picks[i:i + per_out] for i in range(0, len(picks), per_out)] or [[]]
    files = _OpenFiles()
    try:
        with atomic_dir(dst) as tmp:
            for i, chunk in enumerate(chunks):
                with open(os.path.join(tmp, f"shard-{i:06d}.tar"), "wb") as fout:
                    for _sid, (shard, spans) in chunk:
                        fin = files.get(shard)
                        for start, end in spans:
                            _copy_range(fin, fout, start, end, shard)
                    # end-of-archive: two zero blocks, padded to a whole record as tar(1) and tarfile do
                    fout.write(bytes(2 * tarfile.BLOCKSIZE))
                    fout.write(bytes(-fout.tell() % tarfile.RECORDSIZE))
    finally:
        files.close()
    return len(picks)


def _write_save_to_disk(src: str, dst: str, keep: set[str], rank: dict[str, int] | None, id_field: str) -> int:
    """``datasets.save_to_disk`` in, ``save_to_disk`` out (``Dataset.select`` keeps features and bytes)."""
    try:
        import datasets
    except ImportError:
        raise DatasetError(f"{src!r} is a Hugging Face datasets folder; install the data extra "
                           "(pip install 'scalselect-fast[data]') to write its selection", reason="io",
                           path=src) from None
    if os.path.abspath(dst) == os.path.abspath(src):
        raise ValueError(f"refusing to overwrite the input {src!r}: choose another output path")
    ds = datasets.load_from_disk(src, keep_in_memory=False)
    if isinstance(ds, datasets.DatasetDict):
        raise DatasetError(f"{src!r} holds several splits ({', '.join(ds)}); pass one split's folder, e.g. "
                           f"{os.path.join(src, next(iter(ds)))!r}", reason="format", path=src)
    if id_field not in ds.column_names:
        raise DatasetError(f"{src}: no {id_field!r} column; cannot select rows by id", reason="missing_field",
                           path=src)
    ids = _as_strings(ds.data.column(id_field)).to_pylist()
    found: dict[str, int] = {}
    picks = []
    for index, sid in enumerate(ids):
        if sid is None:
            continue
        _note(src, found, sid, index, None)
        if sid in keep:
            picks.append((sid, index))
    _check_found(src, keep, found)
    rows = [r for _sid, r in _ranked(picks, rank)]
    # keep_in_memory: select must not write an indices cache file into the input folder
    sub = ds.select(rows, keep_in_memory=True)
    with atomic_dir(dst) as tmp:
        sub.save_to_disk(str(tmp))
    return len(rows)
