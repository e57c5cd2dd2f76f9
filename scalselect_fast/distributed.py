"""Fit, score and select on a Dask cluster, shard by shard, with the single-node answer.

For stores larger than one node, or teams that already run ``dask.distributed``. Every task gets a
*path and a shard name*, never rows: the worker opens the store and streams that shard itself
(through the same read-ahead reader as the single-node code), so shards are read where they live.

* fit (exact solver): one task per shard accumulates that shard's float64 partial sums (count,
  shifted column sums and sums of squares, shifted d×d Gram) with the very function the
  single-node fit uses; the partials are combined by :func:`tree_reduce`, a pairwise tree whose
  shape depends only on the number of shards; then the same ``eigh`` + k rule. With
  ``l2_normalize`` a moments map-reduce comes first (the row norms need μ), as on one node.
* scores: a map; one float64 array per shard.
* select: each shard task also returns its own top-``budget`` list (``native.top_k_block``), and
  the lists are merged pairwise (``native.top_k_merge``): only ``shards × budget`` (index, score)
  pairs travel, never the N scores, unless they are asked for.

Determinism: every shard uses one common shift (the mean of the first rows of the first shard, as
on one node), blocks are cut at the same rows (blocks never span shards), partials are merged in
a fixed order and merging partials with equal shifts is plain float64 addition. So the subspace is
the same to the last bit whatever the number of workers or the order tasks finish in, and, because
the single-node fit combines its per-shard partials with the same :func:`tree_reduce`, the same as
:func:`scalselect_fast.fit_subspace` — hence identical scores and identical selected ids.

Not here: the randomized solver (``auto`` picks exact whenever the float64 Gram fits in 2 GiB, i.e.
d ≤ 16384), and in-memory arrays (workers need a ``.npy`` or store path they can open).

Example
-------
>>> from dask.distributed import Client                         # doctest: +SKIP
>>> from scalselect_fast import distributed as sd               # doctest: +SKIP
>>> client = Client("tcp://scheduler:8786")                     # doctest: +SKIP
>>> sub = sd.fit_subspace("reps/", client, energy=0.9)          # doctest: +SKIP
>>> idx, top = sd.select("reps/", sub, "16%", client)           # doctest: +SKIP
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import native
from .store import DEFAULT_BLOCK_ROWS, MatrixSource, ShardInfo, StoreError, StoreSource, open_source
from .subspace import EXACT_GRAM_MAX_BYTES, tree_reduce

__all__ = ["tree_reduce", "fit_subspace", "leverage_scores", "select", "run_selection", "DaskExecutor",
           "connect", "ShardView"]


# --------------------------------------------------------------------------------------------------
# one shard as a source (what a worker opens)
# --------------------------------------------------------------------------------------------------
class ShardView(MatrixSource):
    """One shard of a source as a source of its own (rows numbered from 0).

    Parameters
    ----------
    parent : MatrixSource
    shard : ShardInfo
        One of ``parent.shards``.
    """

    def __init__(self, parent: MatrixSource, shard: ShardInfo):
        self.parent, self.orig = parent, shard
        self.n, self.d, self.dtype = shard.count, parent.d, parent.dtype
        self.provenance = parent.provenance
        self.shards = [replace(shard, offset=0)]
        self.path = getattr(parent, "path", None)

    def _shard_array(self, shard: ShardInfo) -> np.ndarray:
        return self.parent._shard_array(self.orig)

    def ids(self) -> list[str]:
        from .rowmap import shard_ids

        return shard_ids(self.parent, self.orig)


def _spec(src: MatrixSource) -> str:
    """The path workers open: a store directory or a ``.npy`` file."""
    if isinstance(src, StoreSource):
        return str(Path(src.path).resolve())
    if len(src.shards) == 1 and src.shards[0].path and str(src.shards[0].path).endswith(".npy"):
        return str(Path(src.shards[0].path).resolve())
    raise StoreError(f"{src!r}: Dask workers read shards from disk themselves; pass a representation "
                     f"store directory or a .npy path they can open (not an in-memory array)")


_OPEN: dict[tuple[str, float], MatrixSource] = {}


def _open_shard(spec: str, name: str) -> ShardView:
    """Worker side: open ``spec`` (cached per manifest version) and return shard ``name``."""
    p = Path(spec)
    stamp = os.stat(p / "manifest.json" if p.is_dir() else p).st_mtime
    src = _OPEN.get((spec, stamp))
    if src is None:
        src = open_source(spec)
        _OPEN.clear()  # one store at a time per worker; old manifests are dropped
        _OPEN[(spec, stamp)] = src
    for shard in src.shards:
        if shard.name == name:
            return ShardView(src, shard)
    raise StoreError(f"{spec}: shard {name!r} is not in the manifest seen by this worker; the store "
                     f"changed during the run (or the worker sees a different copy) - rerun")


def _globalise(exc, shard_name: str, offset: int):
    from .subspace import InvalidRowsError

    rows = np.asarray(exc.rows, dtype=np.int64) + offset
    return InvalidRowsError(f"{exc} [row numbers above count from the start of shard {shard_name!r}, "
                            f"which is global row {offset}]", rows)


# --------------------------------------------------------------------------------------------------
# worker tasks (module-level functions: pickled by reference)
# --------------------------------------------------------------------------------------------------
def _shift_task(spec: str, block_rows: int) -> np.ndarray:
    from .subspace.passes import first_block_mean

    return first_block_mean(open_source(spec), block_rows)


def _shard_pass_task(spec: str, name: str, offset: int, kind: str, shift: np.ndarray, block_rows: int,
                     drop_invalid: bool, inv_scale=None, mean=None, known_bad=None):
    """Per-shard partial sums: ``kind`` = "gram" (centre/standardise), "moments" or "l2gram"."""
    from .subspace import GramAccumulator, InvalidRowsError, MomentAccumulator
    from .subspace.backends import array_namespace
    from .subspace.passes import FIRST_PASS, PassOptions, gram_pass, moment_pass, StorePass
    from .subspace.rows import InvalidTracker

    view = _open_shard(spec, name)
    tracker = InvalidTracker(view, drop_invalid)
    p = StorePass(view, block_rows, array_namespace("numpy"), tracker)
    try:
        if kind == "gram":
            acc = GramAccumulator(view.d, shift)
            gram_pass(p, acc, FIRST_PASS)
        elif kind == "moments":
            acc = MomentAccumulator(view.d, shift)
            moment_pass(p, acc, FIRST_PASS)
        else:  # "l2gram": rows shifted by μ, scaled, normalised; the Gram is then unshifted
            bad = np.asarray(known_bad if known_bad is not None else [], dtype=np.int64) - offset
            acc = GramAccumulator(view.d, np.zeros(view.d))
            gram_pass(p, acc, PassOptions(record=False, verify=False, shift=mean, inv_scale=inv_scale, l2=True,
                                           known_bad=np.sort(bad)))
    except InvalidRowsError as exc:
        raise _globalise(exc, name, offset) from None
    return acc, tracker.all_rows() + offset


def _merge_task(left, right):
    # Partials are (accumulator, invalid rows). Copy before merging in place: a retried task may
    # see the same input object again.
    acc = copy.deepcopy(left[0]).merge(right[0])
    return acc, np.concatenate([left[1], right[1]])


def _score_task(spec: str, name: str, offset: int, sub, block_rows: int, drop_invalid: bool,
                budget: int | None, keep_scores: bool):
    """Scores of one shard and, with ``budget``, its top-``budget`` (global indices)."""
    from .scoring import leverage_scores as _scores
    from .subspace import InvalidRowsError

    view = _open_shard(spec, name)
    try:
        s = _scores(view, sub, block_rows=block_rows, drop_invalid=drop_invalid)
    except InvalidRowsError as exc:
        raise _globalise(exc, name, offset) from None
    nan = np.isnan(s)
    top = None
    if budget is not None:
        t = np.where(nan, -np.inf, s) if nan.any() else s  # NaN (invalid) is never ahead of a score
        top = native.top_k_block(t, offset, budget)
    return (s if keep_scores else None), top, int(nan.sum())


def distributed_wait(futures) -> None:
    from dask.distributed import wait

    wait(futures)


def _item(result, i: int):
    return result[i]


def _topk_merge_task(a, b, budget: int):
    return native.top_k_merge([a, b], budget)


# --------------------------------------------------------------------------------------------------
# client side
# --------------------------------------------------------------------------------------------------
class SchedulerError(ConnectionError):
    """The Dask scheduler cannot be reached (the message names the address and what to do)."""


def connect(address: str):
    """A :class:`dask.distributed.Client` for ``address`` (``tcp://host:8786``, or a scheduler file)."""
    try:
        from dask.distributed import Client
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("--dask-scheduler needs dask.distributed: pip install 'scalselect-fast[dask]'") from exc
    try:
        if address.endswith(".json") and Path(address).is_file():
            return Client(scheduler_file=address)
        return Client(address)
    except (OSError, TimeoutError, ValueError) as exc:  # refused, timed out, malformed address
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SchedulerError(f"cannot reach the Dask scheduler {address} ({why[:200]}); start it (dask scheduler) "
                         f"or pass its address as tcp://host:8786 or a scheduler .json file") from None


def _submit_shards(client, src: MatrixSource, fn, *args, **kwargs):
    spec = _spec(src)
    return [client.submit(fn, spec, s.name, s.offset, *args, pure=False, **kwargs) for s in src.shards]


def _reduce_partials(client, futures):
    return tree_reduce(futures, lambda a, b: client.submit(_merge_task, a, b, pure=False)).result()


def fit_subspace(source, client, energy: float = 0.9, k: int | None = None, solver: str = "auto", *,
                 standardize: bool = False, l2_normalize: bool = False, block_rows: int = DEFAULT_BLOCK_ROWS, drop_invalid: bool = False):
    """:func:`scalselect_fast.fit_subspace` on a Dask cluster (exact solver), one task per shard.

    Parameters
    ----------
    source : str, PathLike or MatrixSource
        A store directory or ``.npy`` file that every worker can open at the same path.
    client : dask.distributed.Client
    energy, k, standardize, l2_normalize, block_rows, drop_invalid
        As in :func:`scalselect_fast.fit_subspace`; results are identical to it.
    solver : {"auto", "exact"}
        Only the exact (Gram) solver is distributed; ``auto`` means exact here.

    Returns
    -------
    Subspace
        ``info["distributed"]`` records the scheduler, worker count and shard count.

    Raises
    ------
    SubspaceError, InvalidRowsError, StoreError
        As the single-node fit; invalid rows are reported with global row numbers.
    """
    from .subspace import SubspaceError, finish_exact
    from .subspace.eigen import check_energy_k
    from .subspace.exact import l2_moments
    from .subspace.fit import fit_info
    from .subspace.passes import compute_dtype
    from .subspace.rows import source_name

    check_energy_k(energy, k)
    src = open_source(source)
    d = src.d
    if solver not in ("auto", "exact"):
        raise SubspaceError(f"solver={solver!r}: only the exact solver runs on Dask (one Gram tree "
                            f"reduction); use solver='exact' or 'auto', or fit on one node")
    if 8 * d * d > EXACT_GRAM_MAX_BYTES:
        raise SubspaceError(f"d={d}: the d×d float64 Gram ({8 * d * d / 2 ** 30:.1f} GiB per partial) is too "
                            f"large to reduce on Dask; fit with solver='randomized' on one node")
    if src.n < 2:
        raise SubspaceError(f"{source_name(src)}: need at least 2 rows to fit a subspace, got {src.n}")
    if k is not None and int(k) > min(src.n - 1, d):
        raise SubspaceError(f"{source_name(src)}: k={k} exceeds min(n-1, d) = {min(src.n - 1, d)}; choose a smaller k")
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    spec = _spec(src)
    shift = client.submit(_shift_task, spec, block_rows, pure=False).result()
    if not l2_normalize:
        acc, invalid = _reduce_partials(client, _submit_shards(client, src, _shard_pass_task, "gram", shift,
                                                               block_rows, drop_invalid))
        timings["gram_pass_s"] = time.perf_counter() - t0
        l2, passes = None, 1
    else:
        mom, invalid = _reduce_partials(client, _submit_shards(client, src, _shard_pass_task, "moments", shift,
                                                               block_rows, drop_invalid))
        timings["moments_pass_s"] = time.perf_counter() - t0
        l2 = l2_moments(mom, standardize=standardize, src_name=source_name(src), n_invalid=invalid.size)
        scale = l2[2]
        t1 = time.perf_counter()
        acc, _ = _reduce_partials(client, _submit_shards(
            client, src, _shard_pass_task, "l2gram", shift, block_rows, drop_invalid,
            None if scale is None else 1.0 / scale, l2[1], np.sort(invalid)))
        timings["gram_pass_s"] = time.perf_counter() - t1
        passes = 2
    invalid = np.sort(invalid)
    workers = len(client.scheduler_info().get("workers", {}))
    info = {**fit_info(src, solver_requested=solver, backend="numpy", block_rows=block_rows, seed=None,
                       drop_invalid=drop_invalid, standardize=standardize),
            "solver_reason": "distributed: exact Gram tree reduction", "invalid_rows": invalid.tolist(),
            "timings": timings,
            "distributed": {"scheduler": getattr(client.scheduler, "address", None), "workers": workers,
                            "shards": len(src.shards), "reduction": "tree_reduce (binary counter)"}}
    sub = finish_exact(acc, energy=energy, k=k, standardize=standardize, src_name=source_name(src),
                       compute_dtype=compute_dtype(src), l2=l2, n_invalid=invalid.size, passes=passes,
                       info=info, provenance=dict(src.provenance))
    sub.info["timings"]["fit_s"] = time.perf_counter() - t0
    return sub


def _score_map(client, src, sub, block_rows, drop_invalid, budget, keep_scores):
    if drop_invalid is None:
        drop_invalid = bool(sub.info.get("drop_invalid", False))
    if src.d != sub.d:
        from .subspace import SubspaceError

        raise SubspaceError(f"the subspace has d={sub.d} but the source has d={src.d}; score with a "
                            f"subspace fitted on representations from the same model and layer")
    [sub_f] = client.scatter([sub], broadcast=True)
    return _submit_shards(client, src, _score_task, sub_f, block_rows, drop_invalid, budget, keep_scores)


def leverage_scores(source, sub, client, *, block_rows: int = DEFAULT_BLOCK_ROWS,
                    drop_invalid: bool | None = None) -> np.ndarray:
    """:func:`scalselect_fast.leverage_scores` as a map over shards; float64 (n,), identical values."""
    src = open_source(source)
    futs = _score_map(client, src, sub, block_rows, drop_invalid, None, True)
    out = np.empty(src.n, np.float64)
    for shard, (s, _, _) in zip(src.shards, client.gather(futs)):
        out[shard.offset:shard.offset + shard.count] = s
    return out


def _select_from(client, src, futs, m, budget, keep_scores):
    from .scoring import BudgetError

    # top-k lists are merged on the workers; the N scores only travel when asked for
    tops = [client.submit(_item, f, 1, pure=False) for f in futs]
    merged = tree_reduce(tops, lambda a, b: client.submit(_topk_merge_task, a, b, m, pure=False))
    nan_counts = client.gather([client.submit(_item, f, 2, pure=False) for f in futs])
    n_nan = int(sum(nan_counts))
    if m > src.n - n_nan:
        raise BudgetError(f"budget {budget!r} asks for {m} rows but only {src.n - n_nan} of {src.n} rows have a "
                          f"score ({n_nan} invalid); lower the budget")
    idx, vals = merged.result()
    scores = None
    if keep_scores:
        scores = np.empty(src.n, np.float64)
        for shard, (s, _, _) in zip(src.shards, client.gather(futs)):
            scores[shard.offset:shard.offset + shard.count] = s
    return np.asarray(idx, np.int64), np.asarray(vals, np.float64), scores


def select(source, sub, budget, client, *, block_rows: int = DEFAULT_BLOCK_ROWS,
           drop_invalid: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Score every shard and return the global top ``budget`` without gathering the N scores.

    Returns
    -------
    idx : ndarray, shape (budget,), int64
        Same ids, same order as ``top_k(leverage_scores(source, sub), budget)``.
    scores : ndarray, shape (budget,), float64
    """
    from .scoring import resolve_budget

    src = open_source(source)
    m = resolve_budget(budget, src.n)
    futs = _score_map(client, src, sub, block_rows, drop_invalid, m, False)
    idx, vals, _ = _select_from(client, src, futs, m, budget, False)
    return idx, vals


class DaskExecutor:
    """The executor of :func:`scalselect_fast.selection.run_selection` on a Dask cluster.

    The fit is :func:`fit_subspace`, the scores and the top-k one task per shard with the per-shard
    lists merged on the workers (:func:`select`'s path); the N scores are gathered for the manifest.
    Re-fits with other randomized-solver seeds are not applicable (the randomized solver does not
    run on Dask); the free stability entry (margin + bound) is computed from the fit as on one node.

    Parameters
    ----------
    client : dask.distributed.Client
    block_rows : int
        Rows per streamed block inside each shard task.
    """

    name = "dask"

    def __init__(self, client, block_rows: int = DEFAULT_BLOCK_ROWS):
        self.client, self.block_rows = client, int(block_rows)
        self._shards = None

    def fit(self, src, *, drop_invalid: bool, **fit_kwargs):
        fit_kwargs.pop("seed", None)  # the exact solver, the only one on Dask, draws nothing
        return fit_subspace(src, self.client, block_rows=self.block_rows, drop_invalid=drop_invalid, **fit_kwargs)

    def score_and_select(self, src, sub, m: int, *, drop_invalid: bool):
        self._shards = len(src.shards)
        t = time.perf_counter()
        futs = _score_map(self.client, src, sub, self.block_rows, drop_invalid, m, True)
        distributed_wait(futs)
        t_score = time.perf_counter() - t  # includes each shard's own top-k
        t = time.perf_counter()
        selected, _, scores = _select_from(self.client, src, futs, m, m, True)
        return scores, selected, t_score, time.perf_counter() - t  # merge + gathering the scores

    def describe(self) -> dict:
        return {"name": self.name, "scheduler": getattr(self.client.scheduler, "address", None),
                "workers": len(self.client.scheduler_info().get("workers", {})), "shards": self._shards}


def run_selection(source, out_dir, budget, client, **kwargs) -> dict:
    """:func:`scalselect_fast.selection.run_selection` with the fit, scores and top-k on Dask.

    Same files, same schemas; the report's ``executor`` names the scheduler, workers and shards.
    ``kwargs`` are those of the local job (``block_rows`` goes to the executor).
    """
    from .selection import run_selection as _run

    return _run(source, out_dir, budget, executor=DaskExecutor(client, kwargs.pop("block_rows", DEFAULT_BLOCK_ROWS)),
                **kwargs)
