"""The output's per-record integrity check: a selected record is written only if it is still what was extracted.

Every stored row carries the content key of the sample it was computed from (the store's ``.keys``
sidecar, :func:`scalselect_fast.store.read_shard_keys`: a sha256 over the rendered messages and the
images' bytes, :func:`scalselect_fast.extract.cache.sample_key`). Before ``scalselect run`` writes the
selected records, :class:`RecordCheck` reads each selected record again from the current input,
through the same reader and the same key function, and compares. When a record's key differs (its
text or an image file was edited after extraction) or the reader no longer yields it, the run writes
no selection and says which record and which file changed (issue 21: refuse, naming the file); the
rerun of the same command extracts the changed records again (the representation cache keeps the
others) and writes a selection whose every record matches its vector.

Memory: the store is walked shard by shard and the input once, in the order both share (stored rows
are in record order), so only one shard's selected ids are held at a time.

Cost: one pass over the input's records (text only) and one read + sha256 of the selected records'
images; nothing is hashed for records that were not selected.

Rows stored without a key (stores written before the sidecar existed) cannot be checked here; the
run's file-level rule (the dataset files must not change during the run) still applies to them.

Not here: how keys are made (:mod:`scalselect_fast.extract.cache`), how they are stored
(:mod:`scalselect_fast.store`), what the run does around the check (:mod:`scalselect_fast.run.stages`).
"""
from __future__ import annotations

import os
import time
from typing import Callable, Iterator, Sequence

import numpy as np

from .store import KEY_BYTES, MatrixSource, read_ids, read_shard_keys

__all__ = ["RecordCheck", "ChangedRecord", "shard_keys_of_rows", "first_changed"]


class ChangedRecord(RuntimeError):
    """A selected record whose content no longer matches its stored key (or that the input lost).

    Attributes
    ----------
    id : str
        The record's id.
    file : str or None
        The record's image files (or embedded images' names), comma-separated; None for a record
        without images or one gone from the input. Whether the text or an image changed is not
        known from one key: the run names an edited dataset file itself.
    gone : bool
        True when the reader no longer yields the record.
    """

    def __init__(self, message: str, id: str, file: str | None, gone: bool):
        super().__init__(message)
        self.id, self.file, self.gone = id, file, gone


def shard_keys_of_rows(src: MatrixSource, rows: Sequence[int] | np.ndarray
                       ) -> Iterator[tuple[dict[str, tuple[int, bytes, bytes]], int]]:
    """Per shard (in store order) the keyed ``rows`` it holds: ``({id: (row, key, context)}, unkeyed)``.

    Parameters
    ----------
    src : MatrixSource
        The run's store.
    rows : sequence of int, shape (m,)
        Global store rows (any order; duplicates ignored).

    Yields
    ------
    keyed : dict
        ``{id: (global row, raw key of KEY_BYTES bytes, key context)}`` for this shard's rows that
        have a key; shards holding none of ``rows`` are not yielded.
    unkeyed : int
        How many of this shard's ``rows`` were stored without a key.
    """
    rows = np.unique(np.asarray(rows, np.int64))
    if rows.size == 0:
        return
    offsets = np.array([s.offset for s in src.shards], np.int64)
    which = np.searchsorted(offsets, rows, side="right") - 1
    bounds = np.searchsorted(which, np.arange(len(src.shards) + 1))
    zero = bytes(KEY_BYTES)
    for si, shard in enumerate(src.shards):
        local = rows[bounds[si]:bounds[si + 1]] - shard.offset
        if local.size == 0:
            continue
        got = read_shard_keys(shard, local)
        if got is None:
            yield {}, int(local.size)
            continue
        keys, ctx = got
        ids = read_ids(shard) if shard.ids_path is not None else None
        keyed, unkeyed = {}, 0
        for j, r in enumerate(local.tolist()):
            k = keys[j].tobytes()
            if k == zero:
                unkeyed += 1
                continue
            keyed[ids[r] if ids is not None else str(shard.offset + r)] = (shard.offset + r, k, ctx)
        yield keyed, unkeyed


def _image_names(sample) -> str:
    """The record's images as a message names them (files, or embedded images by their names)."""
    names = [os.fspath(im) for im in sample.images]
    return ", ".join(names[:3]) + (f" (and {len(names) - 3} more)" if len(names) > 3 else "")


def first_changed(src: MatrixSource, rows: Sequence[int] | np.ndarray, data, *, image_root=None,
                  format: str = "auto", id_field: str | None = None) -> tuple[ChangedRecord | None, int, int]:
    """The first of the store ``rows`` whose record no longer matches the current input.

    Parameters
    ----------
    src : MatrixSource
        The run's store (rows with keys: see :func:`scalselect_fast.store.read_shard_keys`).
    rows : sequence of int, shape (m,)
        Global store rows to check (the selected ones).
    data, image_root, format, id_field
        The input as the extraction read it (:func:`scalselect_fast.data.read_dataset`'s arguments).

    Returns
    -------
    changed : ChangedRecord or None
        The first record (in input order) whose key differs now or which the reader no longer
        yields; None when every keyed row still matches.
    checked : int
        Keyed rows compared before the answer was known (all of them when ``changed`` is None).
    unkeyed : int
        Rows stored without a key (not checked).
    """
    from .data import read_dataset
    from .data.skiplog import DiscardSkips
    from .extract.cache import sample_key

    shards = shard_keys_of_rows(src, rows)
    pending: dict = {}
    checked = unkeyed = 0

    def advance() -> bool:
        nonlocal pending, unkeyed
        for keyed, n_unkeyed in shards:
            unkeyed += n_unkeyed
            if keyed:
                pending = keyed
                return True
        pending = {}
        return False

    if advance():
        for s in read_dataset(data, image_root=image_root, format=format, skip_log=DiscardSkips(),
                              id_field=id_field):
            hit = pending.pop(str(s.id), None)
            if hit is None:
                continue
            _row, key, ctx = hit
            checked += 1
            if sample_key(ctx, s) != key:
                images = _image_names(s)
                return ChangedRecord(f"record {str(s.id)!r} ({s.where}) changed after its representation was "
                                     f"computed: its text or the bytes of its image{'s' if len(s.images) > 1 else ''}"
                                     f" ({images}) differ now", str(s.id), images or None, False), checked, unkeyed
            if not pending and not advance():
                break
    if pending:  # a record the reader no longer yields (or one that moved behind the records after it)
        sid = next(iter(pending))
        return ChangedRecord(f"record {sid!r} is no longer read from the input (removed, renamed or now refused "
                             f"by the reader) though it was selected", sid, None, True), checked, unkeyed
    for _keyed, n_unkeyed in shards:  # the rest of the shards hold only unkeyed rows
        unkeyed += n_unkeyed
    return None, checked, unkeyed


class RecordCheck:
    """The run's check of its selected records, as ``run_selection(check_kept=...)`` calls it.

    Parameters
    ----------
    src : MatrixSource
        The run's store.
    data, image_root, format, id_field
        The run's input, as extracted.
    refuse : callable
        ``refuse(changed: ChangedRecord)``: raises the run's error (the run first applies its file-level
        rule, so an edited dataset file is named as such); must not return.

    Attributes
    ----------
    summary : dict
        ``{"checked", "unkeyed", "cpu_seconds"}`` after the call (for report.json).
    """

    def __init__(self, src: MatrixSource, data, *, image_root=None, format: str = "auto", id_field=None,
                 refuse: Callable[[ChangedRecord], None]):
        self.src, self.data, self.image_root, self.format, self.id_field = src, data, image_root, format, id_field
        self.refuse = refuse
        self.summary: dict = {"checked": 0, "unkeyed": 0, "cpu_seconds": 0.0}

    def __call__(self, rows: np.ndarray) -> None:
        """Check the selected ``rows``; calls ``refuse`` (which raises) on the first changed record."""
        t = time.process_time()
        changed, checked, unkeyed = first_changed(self.src, rows, self.data, image_root=self.image_root,
                                                  format=self.format, id_field=self.id_field)
        self.summary = {"checked": checked, "unkeyed": unkeyed, "cpu_seconds": round(time.process_time() - t, 6)}
        if changed is not None:
            self.refuse(changed)
            raise changed  # refuse must raise; never write a record that does not match its vector
