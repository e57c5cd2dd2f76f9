"""The output's per-record integrity check: copy a selected record only if it is still what was extracted.

Every stored row carries the content key of the sample it was computed from (the store's ``.keys``
sidecar, :func:`scalselect_fast.store.read_shard_keys`: a sha256 over the rendered messages and the
images' bytes, :func:`scalselect_fast.extract.cache.sample_key`). Before ``scalselect run`` writes the
selected records, :class:`RecordCheck` reads each selected record again from the current input,
through the same reader and the same key function, and compares. A record whose key differs (its
text or an image file was edited after extraction), or that the reader no longer yields, is withheld:
it is not copied, it is listed in ``skipped.jsonl`` with reason ``changed_during_run``, counted in
``report.json`` and named in one warning. Rerunning the same command extracts it again.

Cost: one pass over the input's records (text only) and one read + sha256 of the selected records'
images; nothing is hashed for records that were not selected.

Rows stored without a key (stores written before the sidecar existed) cannot be checked here; the
run then keeps its file-level rule (the dataset files must not change during the run).

Not here: how keys are made (:mod:`scalselect_fast.extract.cache`), how they are stored
(:mod:`scalselect_fast.store`), what the run does around the check (:mod:`scalselect_fast.run.stages`).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .atomic import atomic_write_bytes
from .store import KEY_BYTES, MatrixSource, read_ids, read_shard_keys

__all__ = ["RecordCheck", "REASON_CHANGED", "changed_records", "stored_keys"]

#: ``skipped.jsonl`` reason of a selected record that changed after its representation was computed
REASON_CHANGED = "changed_during_run"
_DETAIL = ("its content (text or image bytes) differs from what its representation was computed from; not "
           "copied to the output")
_GONE = "the input no longer yields this record (removed, renamed or now refused by the reader); not copied"


def stored_keys(src: MatrixSource, rows: Sequence[int] | np.ndarray) -> dict[int, tuple[str, bytes | None, bytes]]:
    """``{row: (id, key or None, context)}`` for global store ``rows``, read shard by shard.

    ``key`` is None for a row stored without one (an older store, or an image the key could not read).
    """
    rows = np.unique(np.asarray(rows, np.int64))
    out: dict[int, tuple[str, bytes | None, bytes]] = {}
    if rows.size == 0:
        return out
    offsets = np.array([s.offset for s in src.shards], np.int64)
    which = np.searchsorted(offsets, rows, side="right") - 1
    zero = bytes(KEY_BYTES)
    for si in np.unique(which).tolist():
        shard = src.shards[si]
        local = rows[which == si] - shard.offset
        ids = read_ids(shard) if shard.ids_path is not None else None
        got = read_shard_keys(shard, local)
        for j, r in enumerate(local.tolist()):
            sid = ids[r] if ids is not None else str(shard.offset + r)
            if got is None:
                out[shard.offset + r] = (sid, None, b"")
                continue
            k = got[0][j].tobytes()
            out[shard.offset + r] = (sid, None if k == zero else k, got[1])
    return out


def changed_records(src: MatrixSource, rows: Sequence[int] | np.ndarray, data, *, image_root=None,
                    format: str = "auto", id_field: str | None = None, keys: dict | None = None
                    ) -> tuple[dict[int, dict], list[int]]:
    """Which of the store ``rows`` no longer match the current input.

    Parameters
    ----------
    src : MatrixSource
        The run's store (rows with keys: see :func:`scalselect_fast.store.read_shard_keys`).
    rows : sequence of int, shape (m,)
        Global store rows to check (the selected ones).
    data, image_root, format, id_field
        The input as the extraction read it (:func:`scalselect_fast.data.read_dataset`'s arguments).
    keys : dict, optional
        :func:`stored_keys` of ``rows`` when the caller has read them already.

    Returns
    -------
    changed : dict of int to dict
        ``{row: skipped.jsonl entry}`` for each row whose record's key differs now or which the reader
        no longer yields (``index`` is the record's position now, None when it is gone).
    unkeyed : list of int
        Rows stored without a key (not checked).
    """
    from .data import read_dataset
    from .data.skiplog import DiscardSkips
    from .extract.cache import sample_key

    want = stored_keys(src, rows) if keys is None else keys
    unkeyed = sorted(r for r, (_, k, _) in want.items() if k is None)
    pending = {sid: (r, k, ctx) for r, (sid, k, ctx) in want.items() if k is not None}
    changed: dict[int, dict] = {}
    if pending:
        for s in read_dataset(data, image_root=image_root, format=format, skip_log=DiscardSkips(),
                              id_field=id_field):
            hit = pending.pop(str(s.id), None)
            if hit is None:
                continue
            row, key, ctx = hit
            if sample_key(ctx, s) != key:
                changed[row] = {"id": str(s.id), "index": int(s.index), "reason": REASON_CHANGED,
                                "detail": _DETAIL, "stage": "output"}
            if not pending:
                break
    for sid, (row, _, _) in pending.items():
        changed[row] = {"id": sid, "index": None, "reason": REASON_CHANGED, "detail": _GONE, "stage": "output"}
    return changed, unkeyed


class RecordCheck:
    """The run's check of its selected records, as ``run_selection(withhold=...)`` calls it.

    Parameters
    ----------
    src : MatrixSource
        The run's store.
    data, image_root, format, id_field
        The run's input, as extracted.
    skipped : path
        The published ``skipped.jsonl``: withheld records are appended to it (the file is replaced
        atomically).
    warn : callable
        Receives the one warning (first id and count) when records are withheld.
    cache : bool
        Whether the run uses a representation cache (said in the warning: what a rerun re-extracts).
    all_keyed : callable, optional
        Called before the input is read again, when every row to check has a key: the run then needs
        its file-level rule only for edits made after this point (``_InputsUnchanged.rebase``).

    Attributes
    ----------
    summary : dict
        ``{"checked", "changed", "unkeyed", "first_id", "cpu_seconds"}`` after the call (for report.json).
    """

    def __init__(self, src: MatrixSource, data, *, image_root=None, format: str = "auto", id_field=None,
                 skipped: str | os.PathLike, warn: Callable[[str], None], cache: bool = True,
                 all_keyed: Callable[[], None] | None = None):
        self.src, self.data, self.image_root, self.format, self.id_field = src, data, image_root, format, id_field
        self.skipped, self.warn, self.cache, self.all_keyed = Path(skipped), warn, cache, all_keyed
        self.summary: dict = {"checked": 0, "changed": 0, "unkeyed": 0, "first_id": None, "cpu_seconds": 0.0}

    def __call__(self, rows: np.ndarray) -> dict[int, str]:
        """``{row: reason}`` for the selected ``rows`` whose records must not be copied."""
        t = time.process_time()
        rows = np.asarray(rows, np.int64)
        keys = stored_keys(self.src, rows)
        if self.all_keyed is not None and all(k is not None for _, k, _ in keys.values()):
            self.all_keyed()
        changed, unkeyed = changed_records(self.src, rows, self.data, image_root=self.image_root,
                                           format=self.format, id_field=self.id_field, keys=keys)
        order = [r for r in rows.tolist() if r in changed]  # selection order: the first one named is the best
        self.summary = {"checked": int(rows.size - len(unkeyed)), "changed": len(order), "unkeyed": len(unkeyed),
                        "first_id": changed[order[0]]["id"] if order else None,
                        "cpu_seconds": round(time.process_time() - t, 6)}
        if order:
            self._publish([changed[r] for r in order])
            first = changed[order[0]]
            again = ("only those records (the representation cache holds the others)" if self.cache else
                     "their shards (--cache none; after an edit of a dataset file the rerun needs --force)")
            self.warn(f"{len(order)} selected record{'s' if len(order) > 1 else ''} changed after extraction "
                      f"(first: {first['id']!r}, {first['detail'].split(';')[0]}); not copied to the output, "
                      f"listed in {self.skipped} with reason {REASON_CHANGED}. Rerun the same command to "
                      f"extract {again} again and write them")
        return {r: f"{REASON_CHANGED}: {changed[r]['detail']}" for r in order}

    def _publish(self, entries: list[dict]) -> None:
        try:
            before = self.skipped.read_bytes()
        except FileNotFoundError:
            before = b""
        if before and not before.endswith(b"\n"):
            before += b"\n"
        # ASCII JSON: no character in a line that a reader could take for a line break
        lines = "".join(json.dumps(e, ensure_ascii=True) + "\n" for e in entries).encode("ascii")
        atomic_write_bytes(self.skipped, before + lines)
