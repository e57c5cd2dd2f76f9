"""Streaming fit of the dominant subspace of a centred N×d representation matrix.

This package turns a :class:`~scalselect_fast.store.MatrixSource` (ndarray, memmap, ``.npy`` or
store directory) into a :class:`Subspace`: the column mean, the top-k right singular vectors V_k,
the singular values, and how they were computed. Memory is O(d² + block) for the exact solver and
O(d·ℓ + block) for the randomized one; the N×d matrix is never materialised, centred or not.
Scoring (leverage) and top-k live in :mod:`scalselect_fast.scoring`; this package does not select.

The matrix the method defines (ScalSelect, arXiv 2602.11636) is ``A = norm(scale(X - 1μᵀ))``:
centred, optionally divided by the column standard deviation (``standardize``), optionally with each
row divided by its L2 norm (``l2_normalize``), in that order. k is the smallest number of singular
values of A whose σ² sum reaches ``energy`` × ‖A‖_F² (the *total* energy, not the energy of the
computed components).

Solvers
-------
exact
    One pass: column sums and the d×d Gram of the shifted rows ``x - s`` (s = mean of the first
    block, so centring by a later correction stays accurate), then ``eigh``. Each row chunk's
    product ``Bᵀ B`` is formed by BLAS in float64 (whatever the storage dtype: the same scores on
    every CPU need it, see :func:`scalselect_fast.native.leverage_block`) and accumulated in float64
    across chunks; see
    :class:`GramAccumulator`. With ``l2_normalize`` the row norms need μ (and the scale) first, so
    a cheap moments pass comes before the Gram pass (2 passes).
randomized
    Subspace iteration with Rayleigh-Ritz on the centred operator, never forming it:
    ``AᵀA Q = BᵀB Q − n δ (δᵀQ)`` with ``B = X − 1sᵀ`` and ``δ = μ − s``. Each pass streams the
    data once (``T = B Q``, ``Z += Bᵀ T``). The first pass also collects the moments (μ, scale,
    the exact total energy). The sketch width ℓ starts at ``k + oversample`` (or 64 for an
    energy target) and grows, keeping the current basis, until the Ritz energy in the sketch
    reaches ``energy`` × total with ``oversample`` spare columns (growing 1.5× at a time); then ``n_iter`` further power
    iterations (QR re-orthonormalisation each time) refine it. Deterministic for a fixed ``seed``.
    It stops when k is stable and the top-k Ritz values moved < 1e-6 (relative) in the last pass.
    When the sketch would need more than d/2 columns (d > 256), or the Ritz spectrum extrapolated
    after a pass says the remaining passes at the width the target needs would cost more than one
    Gram pass, or it has not converged in 10 passes, the exact solver finishes the fit; ``info``
    records ``randomized_gave_up`` with the reason and the passes spent.
    Reference: Halko, Martinsson & Tropp (2011), Alg. 4.4 / 5.1, applied to ``AᵀA``.
auto
    Exact when d ≤ 4096 (the Gram is small and one pass is cheapest) or when the flop model
    ``N·d² (Gram)`` beats ``4·N·d·ℓ·passes`` (sketch); randomized otherwise and whenever the d×d
    float64 Gram would exceed 2 GiB. The choice and the reason are recorded in ``Subspace.info``.

Accumulators for distributed fits
---------------------------------
:class:`MomentAccumulator` (n, shifted column sums and sums of squares), :class:`GramAccumulator`
(the same plus the shifted Gram) and :class:`SketchAccumulator` (``Σ Bᵀ(B Q)``) are plain, picklable
objects with ``update(block)``, ``merge(other)`` and a finaliser. ``merge`` is associative and
commutative up to float64 rounding (partials with different shifts are re-shifted exactly), so a
tree reduction of per-shard partials equals one sequential pass to ~1e-12 relative. Recipe for a
cluster fit (exact, no l2; :mod:`scalselect_fast.distributed` runs the fit's own per-shard pass,
with invalid-row handling, as its tasks)::

    shift = first_block_mean                       # any shift close to μ (merge re-shifts exactly)

    def shard_partial(shard):                      # one task per shard
        part = GramAccumulator(d, shift)
        for _, block in src.iter_shard_blocks(shard):
            part.update_block(block, src.is_bf16)
        return part

    acc = tree_reduce(map(shard_partial, src.shards), GramAccumulator.merge)  # the tree fit_subspace builds
    sub = finish_exact(acc, energy=0.9, k=None, standardize=False, src_name="reps/",
                       compute_dtype=np.float64)     # the one exact-fit finisher

Array namespace
---------------
Both solvers are written against a small backend object (:func:`.backends.array_namespace`) holding the array
module ``xp`` (numpy here; CuPy for the GPU issue), a pluggable ``matmul``, ``eigh`` and the
decode+shift of a host block into a reused device buffer. The accumulators take ``xp=`` and create

Modules
-------
``result`` the :class:`Subspace` and the errors; ``backends`` the array namespace; ``rows`` row
naming and invalid-row tracking; ``accumulators`` the partial sums and :func:`tree_reduce`;
``passes`` the streaming passes and their BLAS threading; ``eigen`` Gram -> eigenpairs, k and the
checks; ``exact`` and ``randomized`` the two solvers (``exact.finish_exact`` is the one exact-fit
finisher); ``fit`` :func:`fit_subspace` and the ``auto`` cost model; ``stream``
:class:`SubspaceAccumulator` for callers that own their batches.
"""
from __future__ import annotations

from .accumulators import (EXACT_GRAM_MAX_BYTES, GRAM_CHUNK_ROWS, GramAccumulator, MomentAccumulator,
                           SketchAccumulator, tree_reduce)
from .eigen import subspace_from_gram
from .exact import finish_exact
from .fit import choose_solver, fit_subspace
from .result import InvalidRowsError, Subspace, SubspaceError
from .rows import describe_rows
from .stream import SubspaceAccumulator

__all__ = [
    "Subspace",
    "fit_subspace",
    "subspace_from_gram",
    "finish_exact",
    "SubspaceError",
    "InvalidRowsError",
    "MomentAccumulator",
    "GramAccumulator",
    "SketchAccumulator",
    "SubspaceAccumulator",
    "choose_solver",
    "tree_reduce",
    "describe_rows",
    "EXACT_GRAM_MAX_BYTES",
    "GRAM_CHUNK_ROWS",
]
