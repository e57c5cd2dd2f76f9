"""``SubspaceAccumulator``: the streaming fit for callers that own their data loading.

::

    sel = scalselect_fast.SubspaceAccumulator(energy=0.9, solver="auto")
    for batch_reps in stream:            # any number of (m, d) batches, in any order
        sel.partial_fit(batch_reps)
    sub = sel.finalize()                 # -> scalselect_fast.Subspace
    sub.save("subspace.npz")             # provenance travels with it
    scores = sub.score(new_reps)         # O(d·k) per row, stateless, picklable

It is a thin shell over :class:`~.accumulators.GramAccumulator` (column sums and the d×d Gram in
float64, shifted by the first batch's mean and re-shifted exactly on merge) and the one exact-fit
finisher :func:`~.exact.finish_exact`, so the subspace equals
``fit_subspace(concatenated, solver="exact")`` up to float rounding whatever the batch order.
One pass over arbitrary batches cannot run the multi-pass randomized solver; for widths where the
Gram does not fit, write the representations to a store and call ``fit_subspace`` on it.
"""
from __future__ import annotations

import numpy as np

from .. import native
from .accumulators import EXACT_GRAM_MAX_BYTES as MAX_GRAM_BYTES  # the largest Gram it will hold, as auto
from .accumulators import GramAccumulator
from .eigen import check_energy_k
from .exact import finish_exact
from .result import Subspace, SubspaceError

__all__ = ["SubspaceAccumulator"]


class SubspaceAccumulator:
    """Accumulate representation batches, then finalize into a :class:`~scalselect_fast.Subspace`.

    Parameters
    ----------
    energy : float in (0, 1], default 0.9
        k = smallest number of components whose σ² reaches this fraction of the total energy.
    k : int, optional
        Fixed number of components (overrides ``energy``).
    solver : {"auto", "exact"}
        ``auto`` resolves to ``exact`` (a one-pass Gram); ``randomized`` is refused (it needs
        several passes over the data; use ``fit_subspace`` on a store).
    standardize : bool
        Divide centred columns by their standard deviation before the fit.
    provenance : dict, optional
        Recorded in the subspace (e.g. ``{"model": ..., "layer": 0, "threshold": 0.9,
        "data_fingerprint": ...}``) and saved with it.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    >>> sel = SubspaceAccumulator(energy=0.9)
    >>> for b in np.array_split(X, 3):
    ...     _ = sel.partial_fit(b)
    >>> sub = sel.finalize()
    >>> bool(abs(sub.score(X).sum() - sub.k) < 1e-6 * sub.k)
    True
    """

    def __init__(self, energy: float = 0.9, k: int | None = None, solver: str = "auto",
                 standardize: bool = False, provenance: dict | None = None):
        check_energy_k(energy, k)
        if solver not in ("auto", "exact", "randomized"):
            raise ValueError(f"unknown solver {solver!r}; use 'auto' or 'exact'")
        if solver == "randomized":
            raise ValueError("SubspaceAccumulator makes one pass over batches in any order, which the multi-pass "
                             "randomized solver cannot use; use solver='exact'/'auto', or write the "
                             "representations to a store and call fit_subspace(store, solver='randomized')")
        self.energy, self.k, self.solver = energy, k, solver
        self.standardize = bool(standardize)
        self.provenance = dict(provenance or {})
        self._acc = None
        self._dtype = None
        self.n_batches_ = 0

    @property
    def n_samples_seen_(self) -> int:
        return 0 if self._acc is None else int(self._acc.n)

    def partial_fit(self, reps) -> "SubspaceAccumulator":
        """Add a batch of representations.

        Parameters
        ----------
        reps : array-like, shape (m, d)
            float16/float32/float64 rows (torch tensors are accepted via ``numpy()``).

        Returns
        -------
        SubspaceAccumulator
            self, for chaining.
        """
        if hasattr(reps, "detach"):  # a torch tensor
            reps = reps.detach().float().cpu().numpy()
        X = np.asarray(reps)
        if X.ndim != 2:
            raise SubspaceError(f"partial_fit: expected a 2-D (m, d) batch, got shape {X.shape}")
        if X.dtype.kind != "f":
            raise SubspaceError(f"partial_fit: expected floating-point rows, got dtype {X.dtype}")
        if X.shape[0] == 0:
            return self
        bad = ~np.isfinite(X).all(axis=1)
        if bad.any():
            rows = np.flatnonzero(bad)
            raise SubspaceError(f"partial_fit: batch {self.n_batches_} has {rows.size} row(s) with NaN/inf "
                                f"(rows {rows[:5].tolist()}); drop or fix them before fitting")
        cdt = np.float64  # as fit_subspace: float64 products whatever the input dtype
        if self._acc is None:
            d = X.shape[1]
            if 8 * d * d > MAX_GRAM_BYTES:
                raise SubspaceError(f"partial_fit: d={d} needs a {8 * d * d / 2**30:.1f} GiB Gram; write the "
                                    f"representations to a store and use fit_subspace(..., solver='randomized')")
            self._acc = GramAccumulator(d, X.astype(np.float64).mean(axis=0))
            self._dtype = cdt
        elif X.shape[1] != self._acc.d:
            raise SubspaceError(f"partial_fit: batch {self.n_batches_} has width {X.shape[1]}, earlier batches "
                                f"{self._acc.d}; all representations must come from one model/layer")
        if cdt == np.float64:
            self._dtype = np.float64  # any float64 batch makes the rank tolerance float64's
        buf = (X.astype(np.float64) - self._acc.shift).astype(cdt)
        self._acc.update(buf)
        self.n_batches_ += 1
        return self

    def merge(self, other: "SubspaceAccumulator") -> "SubspaceAccumulator":
        """Add another accumulator's batches (e.g. from another worker) into this one."""
        if other._acc is None:
            return self
        if self._acc is None:
            import copy

            self._acc = copy.deepcopy(other._acc)
            self._dtype = other._dtype
        else:
            self._acc.merge(other._acc)
            if other._dtype == np.float64:
                self._dtype = np.float64
        self.n_batches_ += other.n_batches_
        return self

    def finalize(self) -> Subspace:
        """Eigendecompose the accumulated Gram and return the :class:`~.result.Subspace`."""
        if self._acc is None:
            raise SubspaceError("finalize(): no batches were given to partial_fit")
        info = {"solver_requested": self.solver, "solver_reason": "SubspaceAccumulator: one-pass Gram over batches",
                "batches": self.n_batches_, "native": native.BACKEND}
        return finish_exact(self._acc, energy=self.energy, k=self.k, standardize=self.standardize,
                            src_name="SubspaceAccumulator", compute_dtype=self._dtype, info=info,
                            provenance=self.provenance)
