"""Stability certificate of a ScalSelect selection: would another solver run pick the same rows?

A selection is the top ``budget`` rows by leverage score. It is stable when

* the **score margin at the cut-off** (last kept score minus first rejected score) is large
  compared with the solver's score error, and
* re-fitting with the randomized solver under other seeds, and with the exact solver, selects
  (nearly) the same set.

:func:`stability_certificate` measures both and says whether the selection is *certified*: if
every re-fit moves no score by more than half the margin, no row can cross the cut-off, so every
re-fit provably selects the identical set. It is meant to go into the ``report.json`` of every
selection; its cost is one fit + one scoring pass per seed (plus one exact fit when the selection
came from the randomized solver), reported in ``seconds``.

This module does not fit anything itself; it calls :func:`scalselect_fast.fit_subspace`,
:func:`scalselect_fast.leverage_scores` and :func:`scalselect_fast.top_k`.
"""
from __future__ import annotations

import time

import numpy as np

__all__ = ["cutoff_margin", "overlap", "stability_certificate"]


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """|a ∩ b| / max(|a|, |b|) for two index sets (1.0 for two empty sets)."""
    a, b = np.asarray(a), np.asarray(b)
    m = max(a.size, b.size)
    return 1.0 if m == 0 else float(np.intersect1d(a, b).size / m)


def cutoff_margin(scores: np.ndarray, budget: int) -> dict:
    """Score gap at the selection boundary.

    Parameters
    ----------
    scores : (N,) float
        Leverage scores; NaN (rows excluded from the fit) rank below everything.
    budget : int, 1 <= budget <= N

    Returns
    -------
    dict
        ``last_kept`` = score[budget-1], ``first_rejected`` = score[budget] in descending order
        (None when budget == N), ``margin`` = their difference, ``relative_margin`` = margin /
        last_kept, and ``ties_at_cutoff``: how many rows share the last kept score (ties are broken
        by row index, so a positive margin is what makes the set unambiguous).

    Examples
    --------
    >>> cutoff_margin(np.array([0.1, 0.5, 0.3, 0.2]), 2)["margin"]
    0.2
    """
    s = np.asarray(scores, dtype=np.float64)
    s = np.where(np.isnan(s), -np.inf, s)
    n = s.size
    if not 1 <= budget <= n:
        raise ValueError(f"budget {budget} is outside [1, N={n}]")
    last = float(-np.partition(-s, budget - 1)[budget - 1])
    out = {"last_kept": last, "first_rejected": None, "margin": None, "relative_margin": None,
           "ties_at_cutoff": int(np.count_nonzero(s == last))}
    if budget < n:
        nxt = float(-np.partition(-s, budget)[budget])
        margin = last - nxt
        out.update(first_rejected=nxt, margin=margin,
                   relative_margin=margin / abs(last) if last not in (0.0, -np.inf) else None)
    return out


def _fit_kwargs(sub) -> dict:
    """Re-fit as the user did: same preprocessing, same energy target (or the same k when k was
    given), so a re-fit differs only by the solver and its seed (k may then differ too, and is
    reported per run)."""
    target = getattr(sub, "energy", None)
    kw = {"energy": float(target)} if target is not None else {"k": int(sub.k)}
    return {**kw, "standardize": getattr(sub, "scale", None) is not None,
            "l2_normalize": bool(getattr(sub, "l2_normalize", False))}


def stability_certificate(source, sub, scores: np.ndarray, budget, seeds=(0, 1, 2),
                          exact: bool = True, fit_kwargs: dict | None = None,
                          drop_invalid: bool = False, block_rows: int | None = None) -> dict:
    """Overlap of the selected set across solver seeds and exact vs randomized, and the cut-off margin.

    Parameters
    ----------
    source : anything :func:`scalselect_fast.store.open_source` accepts, shape (N, d)
        The rows the selection was made on.
    sub : Subspace
        The subspace the selection was scored with (its k and preprocessing are reused).
    scores : (N,) float64
        The leverage scores the selection was made from.
    budget : int, float or str
        As given to :func:`scalselect_fast.top_k`.
    seeds : sequence of int
        Seeds of randomized-solver re-fits. Empty: margin (and exact comparison) only.
    exact : bool
        Also compare with the exact solver (reuses ``scores`` when ``sub`` is exact).
    fit_kwargs : dict, optional
        Extra arguments for the re-fits (e.g. ``oversample``, ``n_iter``, or ``k`` to pin k).
    drop_invalid : bool
        As in the selection: NaN/inf rows are excluded from the re-fits and never selected.
    block_rows : int, optional
        Rows per streamed block in the re-fits and re-scoring.

    Returns
    -------
    dict
        ``budget``, ``k``, ``reference_solver``, ``margin`` (see :func:`cutoff_margin`),
        ``runs``: per re-fit ``{solver, seed, k, overlap, max_abs_score_diff, seconds}`` where overlap
        is with the reference selection; ``min_overlap_randomized`` (over seeds),
        ``min_pairwise_overlap_randomized`` (seed vs seed), ``overlap_exact_vs_randomized`` (min over
        seeds); ``certified``: every re-fit moved every score by less than half the margin, so all
        of them select exactly the reference set; ``seconds``: total cost.

    Notes
    -----
    The certificate argument: if |s'_i - s_i| < m/2 for all i, where m is the margin between the
    budget-th and (budget+1)-th largest s, then every kept row still scores above every rejected
    one under s', so the top-budget set is unchanged.

    Examples
    --------
    >>> import scalselect_fast as ss                               # doctest: +SKIP
    >>> sub = ss.fit_subspace(X); s = ss.leverage_scores(X, sub)    # doctest: +SKIP
    >>> stability_certificate(X, sub, s, "16%")["certified"]        # doctest: +SKIP
    True
    """
    from .scoring import leverage_scores, resolve_budget, top_k
    from .store import open_source
    from .subspace import fit_subspace

    t_start = time.perf_counter()
    src = open_source(source)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (src.n,):
        raise ValueError(f"scores has shape {scores.shape} but the source has {src.n} rows")
    b = int(resolve_budget(budget, src.n))
    ref = top_k(scores, b)
    margin = cutoff_margin(scores, b)
    kw = {**_fit_kwargs(sub), **(fit_kwargs or {})}
    if fit_kwargs and "k" in fit_kwargs:
        kw.pop("energy", None)
    stream = {"drop_invalid": drop_invalid, **({"block_rows": int(block_rows)} if block_rows else {})}
    ref_solver = getattr(sub, "solver", "unknown")
    finite = ~np.isnan(scores)

    runs, sels = [], {}

    def rerun(solver: str, seed: int | None):
        t = time.perf_counter()
        sub2 = fit_subspace(src, solver=solver, seed=0 if seed is None else seed, **kw, **stream)
        s2 = leverage_scores(src, sub2, **stream)
        sel = top_k(s2, b)
        both = finite & ~np.isnan(s2)
        runs.append({"solver": solver, "seed": seed, "k": int(sub2.k), "overlap": overlap(sel, ref),
                     "max_abs_score_diff": float(np.max(np.abs(s2[both] - scores[both]), initial=0.0)),
                     "seconds": round(time.perf_counter() - t, 4)})
        sels[(solver, seed)] = sel

    for seed in seeds:
        if ref_solver == "randomized" and seed == getattr(sub, "info", {}).get("seed"):
            sels[("randomized", seed)] = ref  # the reference run itself
            continue
        rerun("randomized", int(seed))
    if exact:
        if ref_solver == "exact":
            sels[("exact", None)] = ref
        else:
            rerun("exact", None)

    rand = [v for (solver, _), v in sels.items() if solver == "randomized"]
    pair = [overlap(rand[i], rand[j]) for i in range(len(rand)) for j in range(i + 1, len(rand))]
    ex = sels.get(("exact", None))
    m = margin["margin"]
    return {
        "budget": b, "k": int(sub.k), "reference_solver": ref_solver, "margin": margin, "runs": runs,
        "min_overlap_randomized": min((r["overlap"] for r in runs if r["solver"] == "randomized"), default=None),
        "min_pairwise_overlap_randomized": min(pair, default=None),
        "overlap_exact_vs_randomized": (min(overlap(ex, r) for r in rand) if ex is not None and rand else None),
        # budget == N selects every row whatever the scores
        "certified": b == src.n or (bool(runs) and m is not None
                                    and all(r["max_abs_score_diff"] < m / 2 for r in runs)),
        "seconds": round(time.perf_counter() - t_start, 4),
    }
