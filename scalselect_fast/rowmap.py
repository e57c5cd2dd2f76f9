"""Which id and which dataset record each stored row is: the lookups every output of a selection shares.

A representation store names its rows by id; ``run`` also knows the dataset the store was extracted
from (:class:`Records`), where some records have no row at all (skipped, text-only). The manifest,
the report, the gallery and post-selection by record fields all need the same two mappings, stored
row → id (:func:`shard_ids`, :func:`ids_of`) and stored row → record (:func:`row_record`), so they
live here once.

This module does not select, score or write anything, and it does not read the dataset (only the
ids ``run`` already read into :class:`Records`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

__all__ = ["Records", "shard_ids", "iter_shard_ids", "ids_of", "row_record", "budget_base"]


@dataclasses.dataclass
class Records:
    """The input dataset a store was extracted from, as ``run`` reads it.

    Attributes
    ----------
    path : str, list or dataset object
        The input as ``run`` was given it (read again by :func:`scalselect_fast.data.write_selected`
        and the gallery).
    ids : list of str or None
        Id per record (None where the record has no usable id).
    sources : list of str or None
        ``Sample.source`` per record (per-source counts).
    fields : dict of str to list
        Quota field values per record.
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
    ids: list
    sources: list
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
    out = [""] * rows.size
    pos: dict[int, list[int]] = {}
    for j, r in enumerate(rows.tolist()):
        pos.setdefault(r, []).append(j)
    want = np.unique(rows)
    for shard in src.shards:
        lo, hi = np.searchsorted(want, [shard.offset, shard.offset + shard.count])
        if hi == lo:
            continue
        ids = shard_ids(src, shard)
        for r in want[lo:hi].tolist():
            for j in pos[r]:
                out[j] = ids[r - shard.offset]
    return out


def row_record(src, records: Records) -> np.ndarray:
    """Record index of every stored row (ids are matched; the store holds the records' ids)."""
    from .data.ids import locate_ids
    from .subspace import SubspaceError  # the job's input error; imported here so the report needs nothing of the fit

    ids = src.ids()
    rows = locate_ids(records.ids, ids)
    if (rows < 0).any():
        missing = [ids[j] for j in np.flatnonzero(rows < 0)[:3].tolist()]
        raise SubspaceError(f"the representation store holds ids not in {records.path} (e.g. {missing}); "
                            f"the dataset changed after extraction")
    return rows


def budget_base(src, records: Records | None) -> dict:
    """What a fractional budget is a fraction of: the records that are not text-only (``run``; they
    have no representation by nature), or the stored rows (a store alone, ``src``)."""
    if records is None:
        return {"n": int(src.n), "of": "stored rows"}
    n = len(records.ids)
    return {"n": n - len(records.text_only), "of": "records that are not text-only", "n_records": n,
            "n_text_only": len(records.text_only)}
