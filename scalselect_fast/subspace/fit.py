"""The public entry point :func:`fit_subspace` and the ``auto`` cost model :func:`choose_solver`."""
from __future__ import annotations

import time
import warnings

import numpy as np

from .. import native
from ..store import DEFAULT_BLOCK_ROWS, open_source
from .accumulators import EXACT_GRAM_MAX_BYTES
from .backends import array_namespace
from .eigen import check_energy_k
from .exact import fit_exact
from .randomized import SketchOptions, fit_randomized, SwitchToExact
from .result import Subspace, SubspaceError
from .rows import InvalidTracker, source_name

# --------------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------------
def choose_solver(n: int, d: int, k: int | None = None, oversample: int = 10, passes: int = 4) -> tuple[str, str]:
    """The ``auto`` cost model: returns ``(solver, reason)``.

    Exact costs one pass of ``N·d²`` flops (syrk) plus ``~10·d³`` for ``eigh`` and ``8·d²`` bytes;
    randomized costs ``passes`` × ``4·N·d·ℓ`` flops with ``ℓ = k + oversample`` (``d/8`` guessed for
    an energy target, the sketch then grows as needed).
    """
    gram_bytes = 8 * d * d
    if gram_bytes > EXACT_GRAM_MAX_BYTES:
        return "randomized", f"the d×d float64 Gram would take {gram_bytes / 2**30:.1f} GiB (> 2 GiB)"
    if d <= 4096:
        return "exact", f"d={d} ≤ 4096: one Gram pass (N·d² flops) and a small eigh are cheapest and exact"
    ell = (k + oversample) if k is not None else max(64, d // 8)
    exact = n * d * d + 10 * d ** 3
    rand = passes * 4 * n * d * ell
    if rand < exact:
        return "randomized", f"sketch cost {rand:.3g} flops (ℓ≈{ell}, {passes} passes) < exact {exact:.3g}"
    return "exact", f"exact cost {exact:.3g} flops ≤ sketch {rand:.3g} (ℓ≈{ell}, {passes} passes)"


def fit_subspace(source, energy: float = 0.9, k: int | None = None, solver: str = "auto", *,
                 standardize: bool = False, l2_normalize: bool = False,
                 seed: int = 0, block_rows: int = DEFAULT_BLOCK_ROWS, drop_invalid: bool = False,
                 array_backend: str = "numpy", matmul=None, oversample: int = 10, n_iter: int = 2,
                 checkpoint=None, backend: str | None = None) -> Subspace:
    """Fit the dominant subspace of the centred representation matrix, streaming.

    Parameters
    ----------
    source : ndarray (n, d), np.memmap, str/PathLike (``.npy`` or store directory) or MatrixSource
        float16, bfloat16 (stores only), float32 or float64 rows.
    energy : float in (0, 1], default 0.9
        k = smallest k with Σ_{i≤k} σ_i² ≥ energy · ‖A‖_F² (the total energy).
    k : int, optional
        Use exactly k components (1 ≤ k ≤ rank); overrides ``energy``.
    solver : {"auto", "exact", "randomized"}
    standardize : bool
        Divide centred columns by their standard deviation (ddof=0; constant columns keep scale 1).
    l2_normalize : bool
        Divide each transformed row by its L2 norm (zero rows stay zero); costs one extra pass.
    seed : int
        Seed of the randomized solver's test matrices (results are deterministic for a seed).
    block_rows : int
        Rows per streamed block (memory ≈ block_rows · d · 4 bytes plus the d×d Gram).
    drop_invalid : bool
        Exclude rows with NaN/inf from the fit instead of raising; they are listed in
        ``info["invalid_rows"]`` (and get no score and are never selected downstream).
    array_backend : {"numpy", "cupy"}
        Array namespace (see the module docstring and :mod:`scalselect_fast.devices`;
        :func:`scalselect_fast.devices.array_backend` gives it for a fit device).
    matmul : callable, optional
        Replacement for ``xp.matmul`` (signature ``matmul(a, b, out=...)``).
    oversample, n_iter : int
        Randomized solver: spare sketch columns and power iterations after the sketch is wide enough.
    checkpoint : :class:`~.exact.GramCheckpoint`, optional
        Resume the exact solver's Gram pass from saved per-shard progress and report progress after
        every shard (``scalselect run`` keeps it on disk). Ignored by the randomized solver and by
        l2-normalised fits (several passes: callers checkpoint those whole).
    backend : {"numpy", "cupy"}, optional
        Deprecated name of ``array_backend``.

    Returns
    -------
    Subspace

    Raises
    ------
    SubspaceError
        energy outside (0, 1], k > rank, fewer than 2 rows, zero total variance.
    InvalidRowsError
        NaN/inf rows without ``drop_invalid``.
    StoreError
        Unreadable paths, mismatched shards, checksum mismatch.

    Notes
    -----
    Leverage of row i is ``‖U_k[i]‖² = ‖pre(x_i) V_k Σ_k⁻¹‖²`` (:meth:`Subspace.projection`); over the
    fitted rows the scores sum to k. See the module docstring for the algorithms.

    Examples
    --------
    >>> import numpy as np, scalselect_fast as ss
    >>> X = np.random.default_rng(0).standard_normal((500, 16)).astype(np.float32)
    >>> sub = ss.fit_subspace(X, energy=0.5)
    >>> sub.components.shape == (16, sub.k)
    True
    """
    check_energy_k(energy, k)
    if block_rows < 1:
        raise SubspaceError(f"block_rows must be ≥ 1, got {block_rows}")
    t_start = time.perf_counter()
    src = open_source(source)
    if backend is not None:
        warnings.warn("fit_subspace(backend=...) is deprecated; use array_backend=... ('numpy' or 'cupy')",
                      DeprecationWarning, stacklevel=2)
        array_backend = backend
    be = array_namespace(array_backend, matmul)
    if src.n < 2:
        raise SubspaceError(f"{source_name(src)}: need at least 2 rows to fit a subspace, got {src.n}")
    if k is not None and int(k) > min(src.n - 1, src.d):
        raise SubspaceError(f"{source_name(src)}: k={k} exceeds min(n-1, d) = {min(src.n - 1, src.d)}, the largest "
                            f"possible rank of the centred matrix; choose a smaller k")
    if solver == "auto":
        chosen, reason = choose_solver(src.n, src.d, k, oversample)
    elif solver in ("exact", "randomized"):
        chosen, reason = solver, "requested"
    else:
        raise SubspaceError(f"unknown solver {solver!r}; use 'auto', 'exact' or 'randomized'")
    tracker = InvalidTracker(src, drop_invalid)
    timings: dict[str, float] = {}
    info = fit_info(src, solver_requested=solver, backend=be.name, block_rows=block_rows, seed=seed,
                    drop_invalid=drop_invalid, standardize=standardize)
    if chosen == "exact":
        sub = fit_exact(src, energy, k, standardize, l2_normalize, block_rows, be, tracker, timings,
                         info=info, checkpoint=checkpoint)
    else:
        try:
            fields, passes, extra = fit_randomized(src, energy, k, standardize, l2_normalize, block_rows, be,
                                                    tracker, timings, seed,
                                                    SketchOptions(oversample=oversample, n_iter=n_iter))
            sub = Subspace(solver="randomized", passes=passes, info={**info, "timings": timings, **extra},
                           provenance=dict(src.provenance), **fields)
        except SwitchToExact as sw:
            tracker = InvalidTracker(src, drop_invalid)  # the exact pass records the rows again
            sub = fit_exact(src, energy, k, standardize, l2_normalize, block_rows, be, tracker, timings,
                             info=info, checkpoint=checkpoint)
            sub.passes += sw.passes
            sub.info.update(randomized_gave_up=sw.reason, randomized_passes=sw.passes, history=sw.history)
            reason += f"; randomized switched to exact: {sw.reason}"
    sub.info["timings"]["fit_s"] = time.perf_counter() - t_start
    sub.info.update(solver_reason=reason, invalid_rows=np.sort(tracker.all_rows()).tolist())
    return sub


def fit_info(src, *, solver_requested: str, backend: str, block_rows: int, seed: int | None,
             drop_invalid: bool, standardize: bool) -> dict:
    """The part of ``Subspace.info`` every fit of ``src`` records (local, Dask, ``scalselect run``)."""
    return {"solver_requested": solver_requested, "backend": backend, "native": native.BACKEND,
            "block_rows": int(block_rows), "seed": None if seed is None else int(seed), "source_dtype": src.dtype,
            "source_rows": int(src.n), "drop_invalid": bool(drop_invalid), "standardize": bool(standardize)}
