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

    # per (field, value) integer bounds in samples
    def cap(q: Quota, v: str) -> int:
        return int(math.floor(q.bounds(v)[1] * budget + 1e-9))

    def need(q: Quota, v: str) -> int:
        return int(math.ceil(q.bounds(v)[0] * budget - 1e-9))

    counts: list[dict[str, int]] = [dict() for _ in quotas]
    rejected: dict[int, str] = {}
    kept: list[int] = []
    taken = np.zeros(int(order.max()) + 1 if order.size else 0, dtype=bool)
    if index == "auto":
        index = "hnsw" if budget > 200_000 else "flat"
    kidx: _KeptIndex | None = None
    thr = None if dedup_eps is None else 1.0 - float(dedup_eps)
    n_dup = 0
    n_quota = 0

    def groups_of(r: int) -> list[str]:
        return [str(labels[q.field][r]) for q in quotas]

    def under_cap(g: list[str]) -> bool:
        return all(counts[i].get(v, 0) < cap(q, v) for i, (q, v) in enumerate(zip(quotas, g)))

    def wants_min(g: list[str]) -> bool:
        return any(counts[i].get(v, 0) < need(q, v) for i, (q, v) in enumerate(zip(quotas, g)))

    def walk(cands: np.ndarray, admit: Callable[[list[str]], bool], stop: Callable[[], bool],
             record_quota: bool) -> None:
        nonlocal kidx, n_dup, n_quota
        for s in range(0, cands.size, chunk):
            if stop():
                return
            rows = cands[s:s + chunk]
            rows = rows[~taken[rows]]
            if rows.size == 0:
                continue
            if thr is not None:
                vecs = _normalize(vectors(rows))
                if kidx is None:
                    kidx = _KeptIndex(vecs.shape[1], index)
                sim_kept, pos_kept = kidx.nearest(vecs)
                sim_chunk = vecs @ vecs.T
            acc_local: list[int] = []
            for j, r in enumerate(rows.tolist()):
                if stop():
                    break
                g = groups_of(r) if quotas else []
                if quotas and not admit(g):
                    if record_quota and r not in rejected:
                        n_quota += 1
                        full = [f"{q.field}={v}" for i, (q, v) in enumerate(zip(quotas, g))
                                if counts[i].get(v, 0) >= cap(q, v)]
                        rejected[r] = f"quota: {', '.join(full)} reached its maximum share"
                    continue
                if thr is not None:
                    best, who = float(sim_kept[j]), int(pos_kept[j])
                    who_row = kidx.kept_rows[who] if who >= 0 else -1
                    if acc_local:
                        loc = sim_chunk[j, acc_local]
                        m = int(np.argmax(loc))
                        if loc[m] > best:
                            best, who_row = float(loc[m]), int(rows[acc_local[m]])
                    if best >= thr:
                        n_dup += 1
                        rejected[r] = f"near-duplicate of row {who_row} (cosine distance {1.0 - best:.4g})"
                        taken[r] = True  # never reconsidered in a later phase
                        continue
                    acc_local.append(j)
                kept.append(r)
                taken[r] = True
                rejected.pop(r, None)
                for i, v in enumerate(g):
                    counts[i][v] = counts[i].get(v, 0) + 1
            if thr is not None and acc_local:
                kidx.add(vecs[acc_local], rows[acc_local])

    # phase 1: fill minimum shares, walking the global ranking restricted to groups with a minimum
    if quotas and any(r.min_share > 0 for q in quotas for r in q.rules):
        has_min = np.zeros(order.size, dtype=bool)
        for i, q in enumerate(quotas):
            lab = labels[q.field]
            mins = {r.value for r in q.rules if r.min_share > 0 and r.value != "*"}
            star_min = any(r.value == "*" and r.min_share > 0 for r in q.rules)
            has_min |= np.fromiter(((str(lab[r]) in mins) or (star_min and need(q, str(lab[r])) > 0)
                                    for r in order.tolist()), dtype=bool, count=order.size)

        def phase1_admit(g):
            return wants_min(g) and under_cap(g)

        walk(order[has_min], phase1_admit, lambda: len(kept) >= budget, record_quota=False)

    walk(order, under_cap, lambda: len(kept) >= budget, record_quota=True)

    shortfalls = {}
    for i, q in enumerate(quotas):
        for r in q.rules:
            if r.value == "*":
                continue
            if counts[i].get(r.value, 0) < need(q, r.value):
                shortfalls[f"{q.field}={r.value}"] = {"wanted": need(q, r.value), "got": counts[i].get(r.value, 0)}
    if len(kept) < budget and quotas and n_quota:
        raise PostSelectError(
            f"the quota caps leave only {len(kept)} of the {budget} budgeted samples selectable "
            f"({n_quota} candidates were refused by a cap); raise the maximum shares "
            f"({', '.join(f'--quota {q.field}=...' for q in quotas)}) or lower --budget")
    # rank order of the kept set (phase 1 picks interleave with phase 2 picks)
    pos = np.empty(taken.size, dtype=np.int64)
    pos[order] = np.arange(order.size)
    kept_arr = np.asarray(kept, dtype=np.int64)
    kept_arr = kept_arr[np.argsort(pos[kept_arr], kind="stable")] if kept_arr.size else kept_arr
    info = {"rejected": rejected, "n_dedup_dropped": n_dup, "n_quota_skipped": n_quota,
            "quota_counts": {q.field: dict(sorted(counts[i].items())) for i, q in enumerate(quotas)},
            "quota_shortfalls": shortfalls, "index": index if thr is not None else None,
            "n_kept": int(kept_arr.size)}
    return kept_arr, info
