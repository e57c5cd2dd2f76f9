"""Optional steps after ranking (beyond the paper; off by default): near-duplicate removal within the
selected set and per-group quotas.

Both work on the ranked candidate list (row indices sorted by descending leverage score, ties to the
lower row) and walk it greedily, so the result is still "the best-ranked samples", only constrained:

* ``dedup_eps``: a candidate is dropped when its cosine distance ``1 - cos(x_i, x_j)`` to an already
  kept sample is ``<= eps``; the next-ranked candidates refill the budget. Similarities are computed
  with faiss on the kept rows only (never an N×N matrix): candidates are read in chunks, each chunk is
  searched against an index of the kept rows (exact ``IndexFlatIP``; HNSW for very large budgets) and
  against itself, then resolved in rank order. The result equals the obvious sequential greedy.
* ``quotas``: per-group minimum and maximum shares of the budget for a field such as ``source``.
  Minimums are filled first (walking the global ranking, taking only samples of groups still under
  their minimum), then the rest of the budget is filled in rank order skipping groups at their cap.

The module does not rank, score or read datasets; it maps (ranking, labels, vectors) to a kept set.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

__all__ = ["QuotaRule", "Quota", "parse_quota", "select_ranked", "PostSelectError"]


class PostSelectError(ValueError):
    """Quotas or dedup settings that cannot be satisfied; the message says what to change."""


@dataclass(frozen=True)
class QuotaRule:
    """Share bounds for one value of a field. Shares are fractions of the budget in [0, 1]."""

    value: str
    min_share: float = 0.0
    max_share: float = 1.0


@dataclass
class Quota:
    """Quota rules on one field (``value="*"`` applies a bound to every value without its own rule)."""

    field: str
    rules: list[QuotaRule] = field(default_factory=list)

    def bounds(self, value: str) -> tuple[float, float]:
        star = (0.0, 1.0)
        for r in self.rules:
            if r.value == value:
                return r.min_share, r.max_share
            if r.value == "*":
                star = (r.min_share, r.max_share)
        return star


_RULE = re.compile(r"^\s*(?P<value>[^<>=]+?)\s*(?P<op>>=|<=|=)\s*(?P<share>[^,]+?)\s*$")


def _share(text: str, spec: str) -> float:
    t = text.strip()
    try:
        v = float(t[:-1]) / 100.0 if t.endswith("%") else float(t)
    except ValueError:
        raise PostSelectError(f"--quota {spec!r}: {text!r} is not a share; write e.g. 10% or 0.1") from None
    if not 0.0 <= v <= 1.0:
        raise PostSelectError(f"--quota {spec!r}: share {text!r} must be between 0 and 100% of the budget")
    return v


def parse_quota(spec: str) -> Quota:
    """Parse ``FIELD=RULE[,RULE...]`` into a :class:`Quota`.

    Rules: ``VALUE>=SHARE`` (minimum), ``VALUE<=SHARE`` (maximum), ``VALUE=LO:HI`` (both);
    ``VALUE`` may be ``*`` (every other value). Shares are ``10%`` or ``0.1`` of the budget.

    Examples
    --------
    >>> parse_quota("source=coco<=40%,ocr>=10%").bounds("ocr")
    (0.1, 1.0)
    """
    if "=" not in spec:
        raise PostSelectError(f"--quota {spec!r}: expected FIELD=VALUE>=SHARE[,VALUE<=SHARE...], "
                              f"e.g. --quota 'source=coco<=40%,ocr>=10%'")
    fld, rest = spec.split("=", 1)
    fld = fld.strip()
    if not fld or not rest.strip():
        raise PostSelectError(f"--quota {spec!r}: missing field name or rules")
    merged: dict[str, list[float]] = {}
    for part in rest.split(","):
        m = _RULE.match(part)
        if not m:
            raise PostSelectError(f"--quota {spec!r}: cannot parse rule {part!r}; use VALUE>=SHARE, "
                                  f"VALUE<=SHARE or VALUE=LO:HI")
        value, op, share = m.group("value"), m.group("op"), m.group("share")
        lo, hi = merged.setdefault(value, [0.0, 1.0])
        if op == ">=":
            lo = _share(share, spec)
        elif op == "<=":
            hi = _share(share, spec)
        else:
            if ":" not in share:
                raise PostSelectError(f"--quota {spec!r}: {part!r}: use VALUE=LO:HI, VALUE>=LO or VALUE<=HI")
            a, b = share.split(":", 1)
            lo, hi = _share(a, spec), _share(b, spec)
        if lo > hi:
            raise PostSelectError(f"--quota {spec!r}: minimum share of {value!r} exceeds its maximum")
        merged[value] = [lo, hi]
    q = Quota(fld, [QuotaRule(v, lo, hi) for v, (lo, hi) in merged.items()])
    if sum(r.min_share for r in q.rules if r.value != "*") > 1.0 + 1e-12:
        raise PostSelectError(f"--quota {spec!r}: the minimum shares add up to more than 100% of the budget")
    return q


# --------------------------------------------------------------------------------------------------
# near-duplicate index over the kept rows
# --------------------------------------------------------------------------------------------------
def _normalize(v: np.ndarray) -> np.ndarray:
    v = np.ascontiguousarray(v, dtype=np.float32)
    n = np.linalg.norm(v, axis=1, keepdims=True)
    np.divide(v, n, out=v, where=n > 0)
    return v


class _KeptIndex:
    """Kept rows' unit vectors in a faiss inner-product index (exact flat, or HNSW when huge)."""

    def __init__(self, d: int, kind: str):
        import faiss

        self.kind = kind
        if kind == "hnsw":
            self.index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efSearch = 128
        else:
            self.index = faiss.IndexFlatIP(d)
        self.kept_rows: list[int] = []

    def nearest(self, vecs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.index.ntotal == 0:
            return np.full(len(vecs), -np.inf, np.float32), np.full(len(vecs), -1, np.int64)
        sim, pos = self.index.search(vecs, 1)
        return sim[:, 0], pos[:, 0]

    def add(self, vecs: np.ndarray, rows: Sequence[int]) -> None:
        if len(rows):
            self.index.add(np.ascontiguousarray(vecs, dtype=np.float32))
            self.kept_rows.extend(int(r) for r in rows)


# --------------------------------------------------------------------------------------------------
# the greedy walk
# --------------------------------------------------------------------------------------------------
def select_ranked(order: np.ndarray, budget: int, *, labels: Mapping[str, Sequence[str]] | None = None,
                  quotas: Sequence[Quota] = (), vectors: Callable[[np.ndarray], np.ndarray] | None = None,
                  dedup_eps: float | None = None, index: str = "auto", chunk: int = 2048,
                  ) -> tuple[np.ndarray, dict]:
    """Walk a ranking and keep ``budget`` samples subject to quotas and near-duplicate removal.

    Parameters
    ----------
    order : ndarray of int64, shape (m,)
        Candidate rows in rank order (best first).
    budget : int
        Number of samples to keep.
    labels : mapping field -> sequence of str, each of length >= max(order)+1
        Group label of every row, for each field a quota refers to.
    quotas : sequence of Quota
    vectors : callable, rows (int64 array) -> float32 array (len(rows), d)
        Reads representation rows; required with ``dedup_eps``.
    dedup_eps : float or None
        Cosine-distance threshold in [0, 2); None disables near-duplicate removal.
    index : {"auto", "flat", "hnsw"}
        faiss index over kept rows. ``auto`` = exact flat up to 200k kept rows, HNSW above.
    chunk : int
        Candidates resolved per faiss query.

    Returns
    -------
    kept : ndarray of int64, shape (<= budget,)
        Kept rows in rank order.
    info : dict
        ``rejected`` (row -> reason), ``n_dedup_dropped``, ``n_quota_skipped``, ``quota_counts``,
        ``quota_shortfalls`` (groups whose minimum could not be met), ``index``.

    Raises
    ------
    PostSelectError
        If the caps make the budget impossible to fill from the candidates.
    """
    order = np.asarray(order, dtype=np.int64)
    budget = int(budget)
    if dedup_eps is not None:
        if vectors is None:
            raise ValueError("dedup_eps needs a vectors(rows) reader")
        if not (0.0 <= float(dedup_eps) < 2.0):
            raise PostSelectError(f"--dedup-selected {dedup_eps}: the cosine-distance threshold must be in "
                                  f"[0, 2); typical values are 0.01-0.1")
    quotas = list(quotas)
    labels = dict(labels or {})
    for q in quotas:
        if q.field not in labels:
            raise PostSelectError(f"--quota on field {q.field!r}: the samples have no such field")
    if index == "auto":
        index = "hnsw" if budget > 200_000 else "flat"
    walk = _GreedyWalk(budget, int(order.max()) + 1 if order.size else 0, labels, quotas, vectors, dedup_eps,
                       index, chunk)
    walk.fill_minimums(order)  # phase 1
    walk.walk(order, walk.under_cap, record_quota=True)  # phase 2: the rest, in rank order, under the caps
    return walk.result(order)


class _GreedyWalk:
    """One :func:`select_ranked` call: what is kept so far, per-group counts, rejections and the index of
    the kept rows, shared by the two phases of the walk (minimum shares first, then the rest)."""

    def __init__(self, budget: int, n_rows: int, labels: Mapping[str, Sequence[str]], quotas: list[Quota],
                 vectors: Callable[[np.ndarray], np.ndarray] | None, dedup_eps: float | None, index: str,
                 chunk: int):
        self.budget, self.labels, self.quotas, self.vectors = budget, labels, quotas, vectors
        self.index_kind, self.chunk = index, chunk
        self.thr = None if dedup_eps is None else 1.0 - float(dedup_eps)  # cosine similarity that is a duplicate
        self.counts: list[dict[str, int]] = [dict() for _ in quotas]
        self.rejected: dict[int, str] = {}
        self.kept: list[int] = []
        self.taken = np.zeros(n_rows, dtype=bool)  # kept, or dropped as a duplicate: never looked at again
        self.kidx: _KeptIndex | None = None
        self.n_dup = 0
        self.n_quota = 0

    # per (field, value) integer bounds in samples
    def cap(self, q: Quota, v: str) -> int:
        return int(math.floor(q.bounds(v)[1] * self.budget + 1e-9))

    def need(self, q: Quota, v: str) -> int:
        return int(math.ceil(q.bounds(v)[0] * self.budget - 1e-9))

    def groups_of(self, r: int) -> list[str]:
        return [str(self.labels[q.field][r]) for q in self.quotas]

    def under_cap(self, g: list[str]) -> bool:
        return all(self.counts[i].get(v, 0) < self.cap(q, v) for i, (q, v) in enumerate(zip(self.quotas, g)))

    def wants_min(self, g: list[str]) -> bool:
        return any(self.counts[i].get(v, 0) < self.need(q, v) for i, (q, v) in enumerate(zip(self.quotas, g)))

    def full(self) -> bool:
        return len(self.kept) >= self.budget

    def fill_minimums(self, order: np.ndarray) -> None:
        """Phase 1: fill minimum shares, walking the global ranking restricted to groups with a minimum."""
        if not (self.quotas and any(r.min_share > 0 for q in self.quotas for r in q.rules)):
            return
        has_min = np.zeros(order.size, dtype=bool)
        for q in self.quotas:
            lab = self.labels[q.field]
            mins = {r.value for r in q.rules if r.min_share > 0 and r.value != "*"}
            star_min = any(r.value == "*" and r.min_share > 0 for r in q.rules)
            has_min |= np.fromiter(((str(lab[r]) in mins) or (star_min and self.need(q, str(lab[r])) > 0)
                                    for r in order.tolist()), dtype=bool, count=order.size)
        self.walk(order[has_min], lambda g: self.wants_min(g) and self.under_cap(g), record_quota=False)

    def walk(self, cands: np.ndarray, admit: Callable[[list[str]], bool], record_quota: bool) -> None:
        """Keep admitted, non-duplicate candidates in rank order until the budget is full.

        ``record_quota``: a candidate ``admit`` refuses is counted and given a reason (phase 2; in
        phase 1 a refusal only means the group has its minimum).
        """
        quotas = self.quotas
        for s in range(0, cands.size, self.chunk):
            if self.full():
                return
            rows = cands[s:s + self.chunk]
            rows = rows[~self.taken[rows]]
            if rows.size == 0:
                continue
            if self.thr is not None:
                vecs = _normalize(self.vectors(rows))
                if self.kidx is None:
                    self.kidx = _KeptIndex(vecs.shape[1], self.index_kind)
                sim_kept, pos_kept = self.kidx.nearest(vecs)
                sim_chunk = vecs @ vecs.T
            acc_local: list[int] = []  # positions in this chunk kept so far (not yet in the index)
            for j, r in enumerate(rows.tolist()):
                if self.full():
                    break
                g = self.groups_of(r) if quotas else []
                if quotas and not admit(g):
                    if record_quota and r not in self.rejected:
                        self.n_quota += 1
                        at_cap = [f"{q.field}={v}" for i, (q, v) in enumerate(zip(quotas, g))
                                  if self.counts[i].get(v, 0) >= self.cap(q, v)]
                        self.rejected[r] = f"quota: {', '.join(at_cap)} reached its maximum share"
                    continue
                if self.thr is not None:
                    if self._is_duplicate(r, j, rows, sim_kept, pos_kept, sim_chunk, acc_local):
                        continue
                    acc_local.append(j)
                self.kept.append(r)
                self.taken[r] = True
                self.rejected.pop(r, None)
                for i, v in enumerate(g):
                    self.counts[i][v] = self.counts[i].get(v, 0) + 1
            if self.thr is not None and acc_local:
                self.kidx.add(vecs[acc_local], rows[acc_local])

    def _is_duplicate(self, r: int, j: int, rows: np.ndarray, sim_kept, pos_kept, sim_chunk,
                      acc_local: list[int]) -> bool:
        """Whether candidate ``r`` (position ``j`` of the chunk) is within ``dedup_eps`` of a kept row,
        in the index or kept earlier in this chunk; a duplicate is recorded and never reconsidered."""
        best, who = float(sim_kept[j]), int(pos_kept[j])
        who_row = self.kidx.kept_rows[who] if who >= 0 else -1
        if acc_local:
            loc = sim_chunk[j, acc_local]
            m = int(np.argmax(loc))
            if loc[m] > best:
                best, who_row = float(loc[m]), int(rows[acc_local[m]])
        if best < self.thr:
            return False
        self.n_dup += 1
        self.rejected[r] = f"near-duplicate of row {who_row} (cosine distance {1.0 - best:.4g})"
        self.taken[r] = True
        return True

    def result(self, order: np.ndarray) -> tuple[np.ndarray, dict]:
        """``(kept rows in rank order, info)``; refuses a budget the caps left unfilled."""
        quotas, counts = self.quotas, self.counts
        shortfalls = {}
        for i, q in enumerate(quotas):
            for r in q.rules:
                if r.value == "*":
                    continue
                if counts[i].get(r.value, 0) < self.need(q, r.value):
                    shortfalls[f"{q.field}={r.value}"] = {"wanted": self.need(q, r.value),
                                                          "got": counts[i].get(r.value, 0)}
        if len(self.kept) < self.budget and quotas and self.n_quota:
            raise PostSelectError(
                f"the quota caps leave only {len(self.kept)} of the {self.budget} budgeted samples selectable "
                f"({self.n_quota} candidates were refused by a cap); raise the maximum shares "
                f"({', '.join(f'--quota {q.field}=...' for q in quotas)}) or lower --budget")
        # rank order of the kept set (phase 1 picks interleave with phase 2 picks)
        pos = np.empty(self.taken.size, dtype=np.int64)
        pos[order] = np.arange(order.size)
        kept_arr = np.asarray(self.kept, dtype=np.int64)
        kept_arr = kept_arr[np.argsort(pos[kept_arr], kind="stable")] if kept_arr.size else kept_arr
        info = {"rejected": self.rejected, "n_dedup_dropped": self.n_dup, "n_quota_skipped": self.n_quota,
                "quota_counts": {q.field: dict(sorted(counts[i].items())) for i, q in enumerate(quotas)},
                "quota_shortfalls": shortfalls, "index": self.index_kind if self.thr is not None else None,
                "n_kept": int(kept_arr.size)}
        return kept_arr, info
