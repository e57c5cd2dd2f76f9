"""The exact solver: one Gram pass (two with ``l2_normalize``), then the one exact-fit finisher
:func:`finish_exact` (Gram accumulator -> :class:`~.result.Subspace`) that every exact fit uses:
the local fit, :mod:`scalselect_fast.distributed`, :class:`~.stream.SubspaceAccumulator` and
``scalselect run``.
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Protocol

import numpy as np

from .accumulators import GramAccumulator, MomentAccumulator, TreeReducer
from .backends import NumpyBackend
from .eigen import check_rows_and_variance, scale_from_moments, subspace_from_gram
from .passes import FIRST_PASS, PassOptions, first_block_mean, gram_pass, moment_pass, StorePass
from .result import Subspace, SubspaceError
from .rows import source_name

__all__ = ["finish_exact", "l2_moments", "GramProgress", "GramCheckpoint"]

def l2_moments(mom: MomentAccumulator, *, standardize: bool, src_name: str, n_invalid: int = 0, backend=None):
    """What the l2 Gram pass needs from the moments pass: ``(n, mean, scale, n_constant)``.

    Row norms are taken after centring (and scaling), so μ and the scale must be known before the
    Gram pass; the row-count and variance checks run here, before that pass is spent.
    """
    be = backend or NumpyBackend()
    n, mean, csq = mom.n, be.to_host(mom.mean), be.to_host(mom.centred_sumsq)
    check_rows_and_variance(src_name, n, float(csq.sum()), mean, n_invalid)
    scale, n_const = scale_from_moments(csq / n) if standardize else (None, 0)
    return n, mean, scale, n_const


def finish_exact(acc: GramAccumulator, *, energy, k, standardize: bool, src_name: str, compute_dtype,
                 l2: tuple | None = None, backend=None, n_invalid: int = 0, passes: int = 1,
                 info: dict | None = None, provenance: dict | None = None) -> Subspace:
    """The one exact-fit finisher: a summed Gram accumulator -> :class:`~.result.Subspace`.

    Standardises (column scales from the accumulator's own moments), checks the row count and the
    total variance, eigendecomposes, picks k (energy target or fixed ``k``) and records how.

    Parameters
    ----------
    acc : GramAccumulator
        Sums over every valid row: shifted rows (centring applied here), or, with ``l2``, rows
        already centred, scaled and normalised (the Gram is used as it is).
    energy : float in (0, 1]
    k : int or None
        Fixed k (overrides ``energy``).
    standardize : bool
        Divide centred columns by their standard deviation (ddof=0; constant columns keep 1).
    src_name : str
        Names the data in error messages.
    compute_dtype : numpy dtype
        Dtype the chunk products were formed in (float32 or float64): sets the rank tolerance.
    l2 : tuple, optional
        ``(n, mean, scale, n_constant)`` from :func:`l2_moments` for an l2-normalised fit.
    backend : backend object, optional
        Where ``acc`` lives (numpy by default); the Gram stays there for the eigensolver.
    n_invalid : int
        Rows dropped as invalid (named in the too-few-rows error).
    passes : int
        Passes over the data the fit made.
    info, provenance : dict, optional
        The caller's record of how the fit ran; ``standardize``, ``constant_columns`` and
        ``timings["eigh_s"]`` are added to ``info``.

    Returns
    -------
    Subspace
        ``solver="exact"``.
    """
    be = backend or NumpyBackend()
    if l2 is None:
        n, mean, csq = acc.n, be.to_host(acc.mean), be.to_host(acc.centred_sumsq)
        check_rows_and_variance(src_name, n, float(csq.sum()), mean, n_invalid)
        G = acc.centred_gram()  # stays in the backend's memory for the eigensolver
        scale, n_const = None, 0
        if standardize:
            scale, n_const = scale_from_moments(csq / n)
            sc = be.asarray(scale)
            G = G / sc[:, None] / sc[None, :]
    else:
        n, mean, scale, n_const = l2
        G = (acc.gram + acc.gram.T) * 0.5
    t0 = time.perf_counter()
    fields = subspace_from_gram(G, n=n, mean=mean, scale=scale, l2_normalize=l2 is not None, energy=energy,
                                k=k, src_name=src_name, compute_dtype=compute_dtype, backend=be)
    info = dict(info or {})
    info["timings"] = {**info.get("timings", {}), "eigh_s": time.perf_counter() - t0}
    info.update(standardize=bool(standardize), constant_columns=n_const)
    return Subspace(solver="exact", passes=passes, info=info, provenance=dict(provenance or {}), **fields)


# --------------------------------------------------------------------------------------------------
# checkpoints of the Gram pass
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class GramProgress:
    """How far a checkpointed Gram pass got: the reducer's partials over the first shards.

    Attributes
    ----------
    shards : list of str
        Names of the shards covered, a prefix of the source's shards.
    stack : list of (int, GramAccumulator)
        :attr:`TreeReducer.stack` after the last covered shard; resuming from it builds the same
        tree, so a resumed fit is bit-identical to one that never stopped.
    invalid_rows : ndarray of int64
        Invalid rows found in the covered shards (``drop_invalid``).
    """

    shards: list
    stack: list
    invalid_rows: np.ndarray

    def to_arrays(self, extra_meta: dict | None = None) -> dict:
        """Host arrays for ``np.savez`` (one JSON string carries the names and heights)."""
        out = {"invalid_rows": np.asarray(self.invalid_rows, np.int64)}
        for i, (_, part) in enumerate(self.stack):
            to_host = np.asarray if part.xp is np else part.xp.asnumpy
            out.update({f"p{i}_shift": to_host(part.shift), f"p{i}_colsum": to_host(part.colsum),
                        f"p{i}_sumsq": to_host(part.sumsq), f"p{i}_gram": to_host(part.gram)})
        meta = {"shards": list(self.shards), "heights": [h for h, _ in self.stack],
                "n": [int(part.n) for _, part in self.stack], **(extra_meta or {})}
        out["meta"] = np.array(json.dumps(meta))
        return out

    @classmethod
    def from_arrays(cls, z, xp=None) -> tuple["GramProgress", dict]:
        """Inverse of :meth:`to_arrays`; returns the progress and the whole metadata dict."""
        meta = json.loads(str(z["meta"]))
        stack = []
        for i, (h, n) in enumerate(zip(meta["heights"], meta["n"])):
            part = GramAccumulator(z[f"p{i}_shift"].shape[0], z[f"p{i}_shift"], xp=xp)
            part.n = int(n)
            part.colsum = part.xp.asarray(z[f"p{i}_colsum"]).copy()
            part.sumsq = part.xp.asarray(z[f"p{i}_sumsq"]).copy()
            part.gram = part.xp.asarray(z[f"p{i}_gram"]).copy()
            stack.append((int(h), part))
        return cls(list(meta["shards"]), stack, np.asarray(z["invalid_rows"], np.int64)), meta


class GramCheckpoint(Protocol):
    """What :func:`~.fit.fit_subspace` asks of a checkpoint (``checkpoint=``, exact solver, no l2)."""

    def load(self, xp) -> GramProgress | None:
        """The saved progress of this fit, or None to start from the first shard."""

    def save(self, progress: GramProgress, last: bool) -> None:
        """Called after every shard, in shard order (``last`` after the final one); the
        checkpoint decides whether to write (e.g. every 30 s and at the end)."""


def _resume(checkpoint: GramCheckpoint, src, shift: np.ndarray, be, tracker):
    """Reducer and remaining shards from a checkpoint (a fresh start when it does not fit)."""
    progress = checkpoint.load(be.xp)
    names = [s.name for s in src.shards]
    if progress is None or not progress.stack:
        return TreeReducer(GramAccumulator.merge), list(src.shards)
    if progress.shards != names[:len(progress.shards)]:
        raise SubspaceError(f"{source_name(src)}: the fit checkpoint covers shards {progress.shards[:3]}... that do "
                            f"not match the representation store; discard the checkpoint and fit again")
    if any(not np.array_equal(be.to_host(part.shift), shift) for _, part in progress.stack):
        raise SubspaceError(f"{source_name(src)}: the fit checkpoint was summed around another shift (the first "
                            f"block changed); discard the checkpoint and fit again")
    if progress.invalid_rows.size:
        tracker.rows.append(progress.invalid_rows)
    return TreeReducer(GramAccumulator.merge, progress.stack), list(src.shards[len(progress.shards):])


def fit_exact(src, energy, k, standardize, l2_normalize, block_rows, be, tracker, timings, *,
               info: dict, checkpoint: GramCheckpoint | None = None) -> Subspace:
    """The exact solver over ``src``: Gram pass(es), then :func:`finish_exact`."""
    p = StorePass(src, block_rows, be, tracker)
    shift = first_block_mean(src, block_rows)
    t0 = time.perf_counter()
    d = src.d
    if not l2_normalize:
        acc = GramAccumulator(d, shift, matmul=be.matmul, xp=be.xp)
        reducer, shards = TreeReducer(GramAccumulator.merge), None
        after = None
        if checkpoint is not None:
            reducer, shards = _resume(checkpoint, src, shift, be, tracker)
            covered = [s.name for s in src.shards[:len(src.shards) - len(shards)]]
            final = src.shards[-1].name

            def after(shard, red):
                covered.append(shard.name)
                end = shard.offset + shard.count  # rows of shards still in flight are not covered yet
                rows = tracker.all_rows()
                checkpoint.save(GramProgress(list(covered), list(red.stack), rows[rows < end]),
                                last=shard.name == final)
        gram_pass(p, acc, FIRST_PASS, shards=shards, reducer=reducer, after_shard=after)
        timings["gram_pass_s"] = time.perf_counter() - t0
        l2, passes = None, 1
    else:
        mom = MomentAccumulator(d, shift, xp=be.xp)
        moment_pass(p, mom, FIRST_PASS)
        timings["moments_pass_s"] = time.perf_counter() - t0
        l2 = l2_moments(mom, standardize=standardize, src_name=source_name(src), n_invalid=tracker.all_rows().size,
                        backend=be)
        scale = l2[2]
        t1 = time.perf_counter()
        acc = GramAccumulator(d, np.zeros(d), matmul=be.matmul, xp=be.xp)
        gram_pass(p, acc, PassOptions(record=False, verify=False, shift=l2[1], l2=True,
                                       inv_scale=None if scale is None else 1.0 / scale,
                                       known_bad=np.sort(tracker.all_rows())))
        timings["gram_pass_s"] = time.perf_counter() - t1
        passes = 2
    return finish_exact(acc, energy=energy, k=k, standardize=standardize, src_name=source_name(src),
                        compute_dtype=p.dtype, l2=l2, backend=be, n_invalid=tracker.all_rows().size,
                        passes=passes, info={**info, "timings": timings}, provenance=dict(src.provenance))
