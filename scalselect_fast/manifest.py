"""The one manifest schema of a selection (``manifest.parquet`` or ``manifest.jsonl``) and its writer.

One row per input record (``run``) or per stored row (``select``)::

    id: string, index: int64, shard: string, row: int64, score: float64, rank: int64,
    kept: bool, skip_reason: string

``index`` is the record's position in the dataset (``select``: the global row), ``shard``/``row``
where its representation is stored, ``rank`` the **1-based** (:data:`RANK_BASE`) position in the
score order (descending score, ties → lower row) over the rows that have a score; rows without a
score (skipped records, NaN/inf rows) have null ``shard``/``row``/``score``/``rank`` and a
``skip_reason``. The Parquet schema metadata carries ``scalselect.rank_base`` = ``"1"``, the budget
and the caller's fingerprints.

This module lays out and writes the rows; it does not rank or select (the ranks and the kept set come
from :func:`scalselect_fast.selection.run_selection`) and it does not commit (the caller hands it a
staged path, see :class:`scalselect_fast.atomic.StagedOutputs`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from .rowmap import iter_shard_ids, row_record

__all__ = ["MANIFEST_SCHEMA", "MANIFEST_FORMATS", "RANK_BASE", "INVALID_ROW", "manifest_batches", "write_manifest"]

#: column names and Arrow types of every manifest, in order
MANIFEST_SCHEMA = (("id", "string"), ("index", "int64"), ("shard", "string"), ("row", "int64"),
                   ("score", "float64"), ("rank", "int64"), ("kept", "bool"), ("skip_reason", "string"))
#: file formats a manifest can be written in
MANIFEST_FORMATS = ("parquet", "jsonl")
#: rank of the best row
RANK_BASE = 1
#: records per manifest batch (``run``), so the columns of all records are never held at once
BATCH_ROWS = 1 << 16
#: ``skip_reason`` of a stored row whose representation holds NaN/inf
INVALID_ROW = "invalid_row: NaN/inf in the representation (--drop-invalid)"


def manifest_batches(src, scores, rank, kept_mask, records, rejected: Mapping[int, str],
                     batch_rows: int = BATCH_ROWS) -> Iterator[dict]:
    """Column batches of the manifest: per store shard (select) or per ``batch_rows`` records (run).

    Parameters
    ----------
    src : MatrixSource
        The stored representations (n rows).
    scores : ndarray (n,) float64
        NaN where a row has no score.
    rank : ndarray (n,) int64
        :data:`RANK_BASE`-based rank of every scored row.
    kept_mask : ndarray (n,) bool
    records : Records or None
        The dataset behind the store (``run``): one row per record instead of one per stored row.
    rejected : mapping of int to str
        Stored row → why post-selection dropped it (``near-duplicate of row R``).
    batch_rows : int
        Records per batch (``run``): memory of one batch, whatever the number of records.

    Yields
    ------
    dict
        One array or list per :data:`MANIFEST_SCHEMA` column, plus ``_valid`` (the row has a score)
        and ``_placed`` (the record has a stored row).
    """
    if records is None:
        for shard, ids in iter_shard_ids(src):
            sl = slice(shard.offset, shard.offset + shard.count)
            v = ~np.isnan(scores[sl])
            reasons = [rejected.get(shard.offset + j) if ok else INVALID_ROW for j, ok in enumerate(v.tolist())]
            yield {"id": list(ids), "index": np.arange(shard.offset, shard.offset + shard.count),
                   "shard": [shard.name] * shard.count, "row": np.arange(shard.count), "score": scores[sl],
                   "rank": rank[sl], "kept": kept_mask[sl], "skip_reason": reasons,
                   "_valid": v, "_placed": np.ones(shard.count, bool)}
        return
    n_rec = len(records.ids)
    rec_of = row_record(src, records) if src.n else np.zeros(0, np.int64)
    in_order = bool(np.all(rec_of[1:] > rec_of[:-1]))  # rows in record order: no (n_records,) inverse
    inverse = None
    if not in_order:
        inverse = np.full(n_rec, -1, np.int64)
        inverse[rec_of] = np.arange(src.n)
    offsets = np.array([sh.offset for sh in src.shards], np.int64)
    names = [sh.name for sh in src.shards]
    passthrough = np.asarray(records.passthrough, dtype=np.int64)
    for a in range(0, n_rec, batch_rows):
        b = min(a + batch_rows, n_rec)
        if in_order:  # this batch's records with a stored row are rows lo..hi, in order
            # the keys in rec_of's own dtype: int64 keys would make numpy cast all of int32 rec_of per batch
            lo, hi = np.searchsorted(rec_of, np.array([a, b], rec_of.dtype))
            rec_row = np.full(b - a, -1, np.int64)
            rec_row[rec_of[lo:hi] - a] = np.arange(lo, hi)
        else:
            rec_row = inverse[a:b]
        has = rec_row >= 0
        rr = np.where(has, rec_row, 0)
        sh = np.searchsorted(offsets, rr, side="right") - 1 if src.n else np.zeros(b - a, np.int64)
        sc = scores[rr] if src.n else np.zeros(b - a)
        valid = has & ~np.isnan(sc) if src.n else has
        reasons = []
        for i, h, ok, r in zip(range(a, b), has.tolist(), valid.tolist(), rr.tolist()):
            if not h:
                reasons.append(records.skip_reason.get(i, "not extracted (no representation; see skipped.jsonl)"))
            elif not ok:
                reasons.append(INVALID_ROW)
            else:
                reasons.append(rejected.get(r))
        kept = (kept_mask[rr] & has) if src.n else np.zeros(b - a, bool)
        p = passthrough[(passthrough >= a) & (passthrough < b)]
        kept[p - a] = True  # written outside the budget
        yield {"id": records.ids[a:b], "index": np.arange(a, b),
               "shard": [names[s] if h else None for s, h in zip(sh.tolist(), has.tolist())],
               "row": rr - offsets[sh] if src.n else np.zeros(b - a, np.int64), "score": sc,
               "rank": rank[rr] if src.n else np.zeros(b - a, np.int64),
               "kept": kept, "skip_reason": reasons, "_valid": valid, "_placed": has}


def write_manifest(path: Path, fmt: str, batches, metadata: Mapping[str, str]) -> None:
    """Write the manifest batches (see :data:`MANIFEST_SCHEMA`) to ``path`` (a staged temp name).

    Parameters
    ----------
    path : Path
        Written in place: the caller stages and commits it.
    fmt : {"parquet", "jsonl"}
    batches : iterable of dict
        From :func:`manifest_batches`.
    metadata : mapping of str to str
        Parquet schema metadata (ignored for JSONL).
    """
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([(n, getattr(pa, {"bool": "bool_"}.get(t, t))()) for n, t in MANIFEST_SCHEMA],
                           metadata={k: str(v) for k, v in metadata.items()})
        with pq.ParquetWriter(path, schema, compression="zstd") as w:
            for b in batches:
                v, placed = b["_valid"], b["_placed"]
                w.write_table(pa.table({
                    "id": pa.array(b["id"], pa.string()),
                    "index": pa.array(np.asarray(b["index"], np.int64), pa.int64()),
                    "shard": pa.array(b["shard"], pa.string()),
                    "row": pa.array(np.asarray(b["row"], np.int64), pa.int64(), mask=~placed),
                    "score": pa.array(np.where(v, b["score"], 0.0), pa.float64(), mask=~v),
                    "rank": pa.array(np.where(v, b["rank"], 0), pa.int64(), mask=~v),
                    "kept": pa.array(np.asarray(b["kept"], bool), pa.bool_()),
                    "skip_reason": pa.array(b["skip_reason"], pa.string())}, schema=schema))
        return
    with open(path, "w", encoding="utf-8") as fh:
        for b in batches:
            v, placed = b["_valid"], b["_placed"]
            for j in range(len(b["id"])):
                ok = bool(v[j])
                fh.write(json.dumps({
                    "id": b["id"][j], "index": int(b["index"][j]), "shard": b["shard"][j],
                    "row": int(b["row"][j]) if placed[j] else None,
                    "score": float(b["score"][j]) if ok else None, "rank": int(b["rank"][j]) if ok else None,
                    "kept": bool(b["kept"][j]), "skip_reason": b["skip_reason"][j]}) + "\n")
