"""Write a selected subset of a dataset file in the input's own format.

The output is made of the input's own bytes wherever the format allows it, so nothing a downstream
trainer relies on can drift:

* **LLaVA / ShareGPT JSON** (a list): each kept record's source text is copied verbatim (same key
  order, spacing, escapes, number spelling) and joined with the input's own separators and
  indentation.
* **JSONL**: kept lines are copied verbatim (line endings included).
* **Parquet**: kept rows are written with the input's Arrow schema (metadata included); row groups
  are rebuilt.

The input is only read. The output appears atomically (temporary file beside it, fsync, rename), so
a crash or a full disk leaves either no output or a previous complete one, never a partial file.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

from ..atomic import atomic_path, atomic_write_bytes
from .readers import (_WS, FORMATS, _container, _iter_json_list, _iter_jsonl_lines, _open_parquet,
                      _read_text, record_id_or_none)
from .sample import DatasetError, _where

ORDERS = ("original", "score")


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


def write_selected(input_path: str | os.PathLike, out_path: str | os.PathLike,
                   keep: set[str] | Sequence[str], order: str = "original", format: str = "auto",
                   id_field: str = "id") -> int:
    """Write the records of ``input_path`` whose id is in ``keep`` to ``out_path``.

    Parameters
    ----------
    input_path : str or path-like
        The dataset that was read (JSON list, JSONL or Parquet). Never modified.
    out_path : str or path-like
        Destination; written atomically. Must not be the input file.
    keep : set of str or sequence of str
        Selected ids (integers are compared as strings). A sequence is taken as rank order.
    order : {"original", "score"}
        ``"original"``: input order. ``"score"``: the order of ``keep`` (a sequence).
    format : {"auto", "json", "jsonl", "parquet"}
        Output container; ``"auto"`` is the input's. JSON and JSONL may be converted into each
        other (records re-serialised compactly when the container changes); Parquet stays Parquet.
    id_field : str
        Record field that holds the id.

    Returns
    -------
    int
        Number of records written (``len(keep)``).

    Raises
    ------
    DatasetError
        An id in ``keep`` is not in the input, or a selected id occurs twice in the input.
    """
    src = os.fspath(input_path)
    dst = os.fspath(out_path)
    if os.path.exists(dst) and os.path.exists(src) and os.path.samefile(src, dst):
        raise ValueError(f"refusing to overwrite the input {src!r}: choose another output path")
    if os.path.isdir(dst):
        raise ValueError(f"output {dst!r} is a directory; pass a file path")
    parent = os.path.dirname(os.path.abspath(dst))
    probe = parent
    while not os.path.exists(probe):  # the nearest existing ancestor decides
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"cannot write {dst!r}: {probe!r} is a file, not a folder; choose another "
                         "output path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {dst!r}: folder {probe!r} is not writable; choose another "
                              "output path or fix its permissions")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    keep_set, rank = _normalise_keep(keep, order)
    container = _container(src, "auto")
    out_container = container if format == "auto" else format
    if out_container != container and "parquet" in (container, out_container):
        raise ValueError(f"cannot write {container} input as {out_container}: Parquet stays Parquet")
    if container == "json":
        return _write_from_json(src, dst, keep_set, rank, out_container, id_field)
    if container == "jsonl":
        return _write_from_jsonl(src, dst, keep_set, rank, out_container, id_field)
    return _write_from_parquet(src, dst, keep_set, rank, id_field)


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


def _write_from_parquet(src, dst, keep, rank, id_field) -> int:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    pf = _open_parquet(src)
    schema = pf.schema_arrow
    if id_field not in schema.names:
        raise DatasetError(f"{src}: no {id_field!r} column; cannot select rows by id", reason="missing_field",
                           path=src)
    value_set = pa.array(sorted(keep), type=pa.string())
    found: dict[str, int] = {}
    parts = []
    n_written = 0
    index = 0
    with atomic_path(dst) as tmp:
        writer = None if rank is not None else pq.ParquetWriter(tmp, schema)
        try:
            for batch in pf.iter_batches(batch_size=65536):
                ids = batch.column(id_field)
                if not pa.types.is_string(ids.type):
                    ids = pc.cast(ids, pa.string())
                for i, sid in enumerate(ids.to_pylist()):
                    if sid is not None:
                        _note(src, found, sid, index + i, None)
                index += batch.num_rows
                mask = pc.is_in(ids, value_set=value_set)
                sel = batch.filter(mask)
                if sel.num_rows == 0:
                    continue
                if writer is not None:
                    writer.write_batch(sel)
                else:
                    parts.append(sel)
                n_written += sel.num_rows
            _check_found(src, keep, found)
            if rank is not None:
                table = pa.Table.from_batches(parts, schema=schema)
                col = table.column(id_field)
                sids = (col if pa.types.is_string(col.type) else pc.cast(col, pa.string())).to_pylist()
                perm = sorted(range(len(sids)), key=lambda r: rank[sids[r]])
                pq.write_table(table.take(pa.array(perm, type=pa.int64())), tmp)
        finally:
            if writer is not None:
                writer.close()
    return n_written
