"""Duplicate-id detection in memory that does not grow with the number of records, and the reading
of ids from an Arrow id column (:func:`arrow_ids`) for the containers that have one.

Ids must be unique across a whole dataset, so some record of every id seen has to be kept. Here it is
an 8-byte digest (the string's SipHash) plus the record's 8-byte index, and it is kept on disk: pairs are
buffered (:data:`BUFFER` pairs, 1 MiB) and appended to one of :data:`PARTITIONS` temporary files
chosen by the digest's top byte. :meth:`IdRegistry.duplicates` then loads one partition at a time
(about ``16 * N / 256`` bytes: 625 KB at 10M records), sorts it and reports equal digests. Memory
is therefore constant up to ~40M records and grows at 1/256 of the ids' size beyond; disk use is 16
bytes per record (160 MB at 10M), in the system temporary folder, removed on close.

Cost: duplicates are known only once every id has been added (the end of a reading pass), not at
the second occurrence. ``scalselect run`` checks ids in a pass of their own before extracting
(:func:`~scalselect_fast.data.readers.check_unique_ids`), so a duplicate stops the run before any
model work. A digest match is only a candidate: callers confirm it against the ids themselves
(two different ids share a 64-bit digest with probability ~N^2 / 2^65, 3e-6 at 10M records).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from array import array
from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["IdRegistry", "arrow_ids", "id_digest", "locate_ids", "usable_id_type"]

#: (digest, index) pairs buffered in memory before they are appended to the partition files
BUFFER = 1 << 16
#: partition files, by the digest's top byte
PARTITIONS = 256

_PAIR = np.dtype([("digest", "<u8"), ("index", "<i8")])


_MASK = (1 << 64) - 1


def id_digest(sample_id: str) -> int:
    """64-bit digest of an id, as an unsigned integer: Python's own string hash (SipHash, cached on the
    string object, so nearly free). It is salted per process, which is fine here: digests are only
    compared within one pass, and every match is confirmed against the ids themselves."""
    return hash(sample_id) & _MASK


def locate_ids(ids, wanted) -> np.ndarray:
    """Where each of ``wanted`` is in ``ids``: the index of the equal id, or -1.

    What ``{sid: i for i, sid in enumerate(ids)}`` answers, in about half its memory (25 bytes per
    id: digests and a sort order, plus one block of queries; for 2M ids 72 MB peak against 131 MB,
    in 1.7x the time), which matters at tens of millions of ids. Digests (``hash``) are matched by
    binary search and every match is confirmed against the ids themselves, so equal digests of
    different ids cost time, not correctness.

    Parameters
    ----------
    ids : sequence of str or None
        Unique among the non-None ones; None (a record without a usable id) never matches.
    wanted : sequence of str

    Returns
    -------
    ndarray of int64, shape (len(wanted),)
    """
    n, m = len(ids), len(wanted)
    out = np.full(m, -1, dtype=np.int64)
    d = _hashes(ids, n)
    order = np.flatnonzero(np.fromiter((s is not None for s in ids), dtype=bool, count=n))
    order = order[np.argsort(d[order], kind="stable")]
    ds = d[order]
    del d
    if not len(ds) or not m:
        return out
    for a in range(0, m, _LOCATE_BLOCK):  # blocks: the Python lists below stay small
        block = wanted[a:a + _LOCATE_BLOCK]
        q = _hashes(block, len(block))
        pos = np.searchsorted(ds, q)
        at = np.minimum(pos, len(ds) - 1)
        cand = np.where(ds[at] == q, order[at], -1)
        ok = [c >= 0 and ids[c] == w for c, w in zip(cand.tolist(), block)]
        res = np.where(ok, cand, -1)
        # a digest shared by several ids: the first of its run was not this one, look at the rest
        for j in np.flatnonzero((cand >= 0) & ~np.asarray(ok, dtype=bool)).tolist():
            p, w = int(pos[j]) + 1, block[j]
            while p < len(ds) and ds[p] == q[j]:
                if ids[order[p]] == w:
                    res[j] = order[p]
                    break
                p += 1
        out[a:a + len(block)] = res
    return out


#: ids looked up per block in :func:`locate_ids`
_LOCATE_BLOCK = 1 << 16


def _hashes(seq, n: int) -> np.ndarray:
    """``hash()`` of each item as int64 (the digest :func:`locate_ids` sorts and searches)."""
    return np.fromiter(map(hash, seq), dtype=np.int64, count=n)


def _sorted(pairs: np.ndarray) -> np.ndarray:
    """``pairs`` by (digest, index): ``lexsort`` of the two columns, ~8x faster than ``np.sort``
    with ``order=`` on the structured array (which compares whole records)."""
    return pairs[np.lexsort((pairs["index"], pairs["digest"]))]


class IdRegistry:
    """Collect ``(id, record index)`` pairs; find the indices that share an id digest.

    Examples
    --------
    >>> with IdRegistry() as reg:                                    # doctest: +SKIP
    ...     for i, sid in enumerate(["a", "b", "a"]):
    ...         reg.add(sid, i)
    ...     reg.duplicates()
    [(0, 2)]
    """

    def __init__(self):
        self._digests = array("Q")  # plain arrays: an append costs ~50 ns, a numpy item set ~1 us
        self._indices = array("q")
        self._dir: str | None = None
        self.count = 0

    def add(self, sample_id: str, index: int) -> None:
        """Record that record ``index`` has id ``sample_id``."""
        self._digests.append(hash(sample_id) & _MASK)
        self._indices.append(index)
        self.count += 1
        if len(self._digests) == BUFFER:
            self._spill()

    def add_many(self, sample_ids: list[str], indices: list[int]) -> None:
        """:meth:`add` for many records at once (one Arrow batch's ids)."""
        self._digests.extend([hash(s) & _MASK for s in sample_ids])
        self._indices.extend(indices)
        self.count += len(indices)
        if len(self._digests) >= BUFFER:
            self._spill()

    def add_digests(self, digests: np.ndarray, indices: np.ndarray) -> None:
        """:meth:`add` for ids whose ``hash()`` was already taken (``int64`` each, the signed values
        ``hash`` returns, e.g. by the native Arrow reader), at record ``indices`` (``int64``)."""
        digests = np.ascontiguousarray(digests, dtype=np.int64)
        self._digests.frombytes(digests.view(np.uint64).tobytes())
        self._indices.frombytes(np.ascontiguousarray(indices, dtype=np.int64).tobytes())
        self.count += len(digests)
        if len(self._digests) >= BUFFER:
            self._spill()

    def _pairs(self) -> np.ndarray:
        pairs = np.empty(len(self._digests), dtype=_PAIR)
        pairs["digest"] = np.frombuffer(self._digests, dtype=np.uint64)
        pairs["index"] = np.frombuffer(self._indices, dtype=np.int64)
        return pairs

    def _spill(self) -> None:
        if not self._digests:
            return
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="scalselect-ids-")
        pairs = self._pairs()
        del self._digests[:], self._indices[:]
        part = (pairs["digest"] >> np.uint64(56)).astype(np.int64)
        order = np.argsort(part, kind="stable")
        pairs, part = pairs[order], part[order]
        bounds = np.searchsorted(part, np.arange(PARTITIONS + 1))
        for p in range(PARTITIONS):
            a, b = bounds[p], bounds[p + 1]
            if a < b:
                with open(os.path.join(self._dir, f"{p:03d}"), "ab") as fh:
                    fh.write(pairs[a:b].tobytes())

    def duplicates(self, limit: int = 10) -> list[tuple[int, int]]:
        """Up to ``limit`` pairs ``(first index, later index)`` whose ids have the same digest, in
        order of the later index (call after the last :meth:`add`)."""
        if self._dir is None:  # everything still in the buffer: no files needed
            groups = [_sorted(self._pairs())]
        else:
            self._spill()
            groups = None
        found: list[tuple[int, int]] = []
        parts = groups if groups is not None else (
            np.fromfile(os.path.join(self._dir, f"{p:03d}"), dtype=_PAIR)
            for p in range(PARTITIONS) if os.path.exists(os.path.join(self._dir, f"{p:03d}")))
        for pairs in parts:
            if groups is None:
                pairs = _sorted(pairs)
            d = pairs["digest"]
            same = np.flatnonzero(d[1:] == d[:-1])
            if same.size == 0:
                continue
            # pair every later occurrence with the first of its run of equal digests
            starts = np.concatenate(([True], d[1:] != d[:-1]))
            run_start = np.maximum.accumulate(np.where(starts, np.arange(d.size), 0))
            later = same + 1
            keep = later[np.argsort(pairs["index"][later], kind="stable")[:limit]]
            found += [(int(pairs["index"][run_start[j]]), int(pairs["index"][j])) for j in keep]
        found.sort(key=lambda ab: ab[1])
        return found[:limit]

    def close(self) -> None:
        """Remove the temporary files."""
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> IdRegistry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()


def arrow_ids(batches: Iterator[Any]) -> Iterator[str | None]:
    """The ids in record batches of one id column (string or integer), as the readers take them:
    ``str``, ``None`` where null or empty."""
    import pyarrow.compute as pc
    import pyarrow.types as pt

    for batch in batches:
        col = batch.column(0)
        if pt.is_integer(col.type):
            col = pc.cast(col, "string")
        for sid in col.to_pylist():
            yield sid or None


def usable_id_type(t) -> bool:
    """Whether an Arrow column of type ``t`` can hold ids (string or integer)."""
    import pyarrow.types as pt

    return pt.is_integer(t) or pt.is_string(t) or pt.is_large_string(t)
