"""Stability of a ScalSelect selection: would a slightly different fit pick the same rows?

A selection is the top ``budget`` rows by leverage score. Two kinds of evidence, by cost:

* **Free** (:func:`stability_bound`, the default in every report): the score margin at the cut-off
  (last kept score minus first rejected score) and a perturbation bound computed from the fitted
  spectrum alone. Any change of the d×d Gram matrix of spectral norm η moves every leverage score by
  at most :func:`score_shift_bound` (η) (a Davis–Kahan argument, see its Notes), so every
  perturbation smaller than ``tolerated_gram_perturbation`` provably keeps the selected set. The
  solver's own rounding error (estimated from the same numbers) is compared with it. No pass over
  the data.
* **Paid, only when asked** (:func:`stability_certificate`, ``--stability-seeds 0,1,2``): re-fit with
  the randomized solver under other seeds (and with the exact solver) and compare the selections.
  It is reported as not applicable instead of run when the randomized solver would hand over to the
  exact one (:func:`randomized_hands_over`): that "re-fit" would compare exact with exact.

This module does not fit anything itself; the re-fits call :func:`scalselect_fast.fit_subspace`,
:func:`scalselect_fast.leverage_scores` and :func:`scalselect_fast.top_k`.
"""
from __future__ import annotations

import math
import time

import numpy as np

__all__ = ["parse_seeds", "cutoff_margin", "overlap", "stability_certificate", "stability_bound", "score_shift_bound",
           "randomized_hands_over"]


def parse_seeds(text) -> tuple[int, ...] | None:
    """``--stability-seeds`` as given: ``"none"`` -> None (no stability entry), ``""`` -> ``()``
    (cut-off margin and bound only, the default), ``"0,1,2"`` (or a list of ints) -> ``(0, 1, 2)``
    (also re-fit under those seeds). Raises ValueError for anything else, a negative seed included."""
    if isinstance(text, (list, tuple)):
        text = ",".join(str(v) for v in text)
    if not isinstance(text, str):
        raise ValueError(f"{text!r}: give comma-separated integers (0,1,2), '' or 'none'")
    if text.strip().lower() == "none":
        return None
    try:
        seeds = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{text!r}: give comma-separated integers (0,1,2), '' for the cut-off margin and "
                         f"bound only, or 'none'") from None
    negative = [s for s in seeds if s < 0]
    if negative:  # the randomized solver's generator takes seeds >= 0 only; refused before any work
        raise ValueError(f"{text!r}: seed {negative[0]} is negative; seeds are integers >= 0, e.g. 0,1,2")
    return seeds


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """|a ∩ b| / max(|a|, |b|) for two index sets (1.0 for two empty sets)."""
    a, b = np.asarray(a), np.asarray(b)
    m = max(a.size, b.size)
    return 1.0 if m == 0 else float(np.intersect1d(a, b).size / m)


def cutoff_margin(scores: np.ndarray, budget: int, rank: np.ndarray | None = None, rank_base: int = 1) -> dict:
    """Score gap at the selection boundary.

    Parameters
    ----------
    scores : (N,) float
        Leverage scores; NaN (rows excluded from the fit) rank below everything.
    budget : int, 1 <= budget <= N
    rank : (N,) int, optional
        The rank of every scored row (:func:`scalselect_fast.scoring.rank_scores`, 0 for NaN rows):
        the cut-off values are then read at ranks ``budget`` and ``budget + 1``, with no top kept.
    rank_base : int
        The best row's rank in ``rank``.

    Returns
    -------
    dict
        ``last_kept`` = score[budget-1], ``first_rejected`` = score[budget] in descending order
        (None when budget == N), ``margin`` = their difference, ``relative_margin`` = margin /
        last_kept, and ``ties_at_cutoff``: how many rows share the last kept score (ties are broken
        by row index, so a positive margin is what makes the set unambiguous). Scores are canonical
        (float64 leverage rounded to float32, see :func:`scalselect_fast.native.leverage_block`), so a
        margin of 0 is a tie at that precision, decided by the row index the same way everywhere.

    Examples
    --------
    >>> cutoff_margin(np.array([0.1, 0.5, 0.3, 0.2]), 2)["margin"]
    0.2
    """
    s = np.asarray(scores, dtype=np.float64)
    n = s.size
    if not 1 <= budget <= n:
        raise ValueError(f"budget {budget} is outside [1, N={n}]")
    top = _largest(s, budget + 1) if rank is None else _at_positions(s, rank, rank_base, min(budget + 1, n))
    last = float(top[budget - 1])
    out = {"last_kept": last, "first_rejected": None, "margin": None, "relative_margin": None,
           "ties_at_cutoff": _count_equal(s, last)}
    if budget < n:
        nxt = float(top[budget])
        margin = last - nxt
        out.update(first_rejected=nxt, margin=margin,
                   relative_margin=margin / abs(last) if last not in (0.0, -np.inf) else None)
    return out


def _largest(s: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` largest values of ``s`` (NaN as -inf), descending (:func:`~scalselect_fast.scoring.
    top_rows`: memory two ``count``-long tops and one block, not partitioned copies of the scores)."""
    from .scoring import top_rows

    return top_rows(s, count)[1]


def _at_positions(s: np.ndarray, rank: np.ndarray, rank_base: int, upto: int) -> dict:
    """``{p: value}`` for the 0-based descending positions ``upto - 2`` and ``upto - 1`` (NaN as -inf, so
    a position past the scored rows is -inf), read at those ranks."""
    from .scoring import rows_ranked

    first = max(upto - 2, 0)
    out = {p: -np.inf for p in range(first, upto)}
    out.update(zip(range(first, upto), s[rows_ranked(rank, rank_base + first, rank_base + upto)].tolist()))
    return out


def _count_equal(s: np.ndarray, value: float) -> int:
    """Rows of ``s`` (NaN as -inf) equal to ``value``, counted a block at a time."""
    from .scoring import TOPK_CHUNK, count_scored

    n = sum(int(np.count_nonzero(s[a:a + TOPK_CHUNK] == value)) for a in range(0, s.size, TOPK_CHUNK))
    return n + (s.size - count_scored(s) if value == -np.inf else 0)  # the NaN rows count as -inf


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
    """:func:`stability_bound` plus re-fits under other solver seeds (and the exact solver).

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
        Seeds of randomized-solver re-fits. Empty: the free part only (no re-fit at all).
    exact : bool
        With seeds, also compare with the exact solver (reuses ``scores`` when ``sub`` is exact).
    fit_kwargs : dict, optional
        Extra arguments for the re-fits (e.g. ``oversample``, ``n_iter``, or ``k`` to pin k).
    drop_invalid : bool
        As in the selection: NaN/inf rows are excluded from the re-fits and never selected.
    block_rows : int, optional
        Rows per streamed block in the re-fits and re-scoring.

    Returns
    -------
    dict
        Everything :func:`stability_bound` returns, and ``refits``: ``"not requested"`` (no seeds),
        ``"not applicable: <why>"`` (the randomized solver would hand over to exact, see
        :func:`randomized_hands_over`; nothing is run) or ``"run"``; then ``runs``: per re-fit
        ``{solver, seed, k, overlap, max_abs_score_diff, seconds}`` where overlap is with the
        reference selection; ``min_overlap_randomized`` (over seeds),
        ``min_pairwise_overlap_randomized`` (seed vs seed), ``overlap_exact_vs_randomized`` (min over
        seeds); ``refits_certified``: every re-fit moved every score by less than half the margin,
        so all of them select exactly the reference set (None without re-fits); ``seconds``: cost.

    Notes
    -----
    The certificate argument: if |s'_i - s_i| < m/2 for all i, where m is the margin between the
    budget-th and (budget+1)-th largest s, then every kept row still scores above every rejected
    one under s', so the top-budget set is unchanged.

    Examples
    --------
    >>> import scalselect_fast as ss                               # doctest: +SKIP
    >>> sub = ss.fit_subspace(X); s = ss.leverage_scores(X, sub)    # doctest: +SKIP
    >>> stability_certificate(X, sub, s, "16%", seeds=(0, 1))["refits_certified"]   # doctest: +SKIP
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
    out = stability_bound(sub, scores, b)
    out.update(refits="not requested", runs=[], min_overlap_randomized=None,
               min_pairwise_overlap_randomized=None, overlap_exact_vs_randomized=None, refits_certified=None)
    seeds = tuple(int(x) for x in (seeds or ()))
    why_not = randomized_hands_over(sub) if seeds else None
    if not seeds or why_not:
        if why_not:
            out["refits"] = f"not applicable: {why_not}"
        out["seconds"] = round(time.perf_counter() - t_start, 4)
        return out
    ref = top_k(scores, b)
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
    m = out["margin"]["margin"]
    out.update(
        refits="run", runs=runs,
        min_overlap_randomized=min((r["overlap"] for r in runs if r["solver"] == "randomized"), default=None),
        min_pairwise_overlap_randomized=min(pair, default=None),
        overlap_exact_vs_randomized=(min(overlap(ex, r) for r in rand) if ex is not None and rand else None),
        # budget == N selects every row whatever the scores
        refits_certified=b == src.n or (bool(runs) and m is not None
                                        and all(r["max_abs_score_diff"] < m / 2 for r in runs)),
        seconds=round(time.perf_counter() - t_start, 4))
    return out


# --------------------------------------------------------------------------------------------------
# the free part: margin + a perturbation bound from the fitted spectrum (no pass over the data)
# --------------------------------------------------------------------------------------------------
def score_shift_bound(eta: float, lam_k: float, lam_k1: float) -> float:
    """Largest possible change of any leverage score when the Gram matrix changes by ‖E‖₂ ≤ η.

    Parameters
    ----------
    eta : float, ≥ 0
        Spectral norm of the symmetric perturbation E of the centred d×d Gram G = AᵀA.
    lam_k, lam_k1 : float
        λ_k and λ_{k+1} (descending eigenvalues of the *fitted* Gram, i.e. σ² of the fit; λ_{k+1} = 0
        when k = d).

    Returns
    -------
    float
        β(η) such that |ℓ'_i − ℓ_i| ≤ β(η) for every row i, where ℓ are the leverage scores under one
        of G, G + E and ℓ' under the other (k fixed); ``inf`` when the gap is too small
        (λ_k − λ_{k+1} ≤ 2η) for any bound.

    Notes
    -----
    With Q, Λ' the top-k eigenpairs of G' = G + E and ℓ'_i = ‖a_iᵀ Q Λ'^{-1/2}‖²:

    * U' = A Q Λ'^{-1/2} has U'ᵀU' = I − F with ‖F‖ ≤ η/λ'_k, so ℓ'_i differs from the i-th diagonal
      entry of the projector onto range(AQ) by at most η/λ'_k (that entry is ≤ 1);
    * Davis–Kahan (sin θ) with Weyl's λ_{k+1} ≤ λ'_{k+1} + η gives sin θ(Q, V_k) ≤ s = η/(λ'_k −
      λ'_{k+1} − η); range(AQ) is then within tan θ ≤ σ_{k+1}/σ_k · s/√(1 − s²) of the top-k left
      singular subspace, whose projector's diagonal is ℓ (σ_{k+1}²/σ_k² ≤ (λ'_{k+1}+η)/(λ'_k−η)).

    Summing: β(η) = η/λ'_k + √((λ'_{k+1}+η)/(λ'_k−η)) · s/√(1−s²). The argument is symmetric in G
    and G', so the fitted eigenvalues may stand on either side. If β(η) < margin/2, no row can cross
    the cut-off: the selected set is the same under both.

    Examples
    --------
    >>> score_shift_bound(0.0, 4.0, 1.0)
    0.0
    >>> round(score_shift_bound(0.01, 4.0, 1.0), 6)
    0.004183
    """
    eta, lam_k, lam_k1 = float(eta), float(lam_k), max(float(lam_k1), 0.0)
    if eta <= 0.0:
        return 0.0
    gap = lam_k - lam_k1
    if not (gap > 2.0 * eta and lam_k > eta):
        return math.inf
    s = eta / (gap - eta)
    return eta / lam_k + math.sqrt((lam_k1 + eta) / (lam_k - eta)) * s / math.sqrt(1.0 - s * s)


def _tolerated(lam_k: float, lam_k1: float, half_margin: float) -> float:
    """Largest η with score_shift_bound(η) < half_margin (bisection; the bound grows with η)."""
    gap = lam_k - max(lam_k1, 0.0)
    if half_margin <= 0.0 or gap <= 0.0:
        return 0.0
    lo, hi = 0.0, min(gap / 2.0, lam_k)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if score_shift_bound(mid, lam_k, lam_k1) < half_margin:
            lo = mid
        else:
            hi = mid
    return lo


def _rounding_error(sub) -> dict | None:
    """Spectral-norm size of the exact solver's rounding error in the Gram, from the fit's numbers.

    The exact fit sums float64 BLAS products of at most ``GRAM_CHUNK_ROWS`` rows into float64 (for
    every storage dtype, since issue 19). Per entry a product of inner length c errs by at most
    γ_c·(|X|ᵀ|X|)_ij, γ_c = c·u/(1 − c·u) (worst case, Higham Thm 3.5), typically √c·u·(…) (rounding
    errors behave like a random walk, Higham §2.8); ‖E‖₂ ≤ ‖E‖_F ≤ that factor × ‖X‖_F², and ‖X‖_F² is
    the total energy of the (shifted) rows.
    """
    from .subspace import GRAM_CHUNK_ROWS

    if getattr(sub, "solver", None) != "exact":
        return None
    u = 2.0 ** -53
    c = min(int(GRAM_CHUNK_ROWS), max(int(sub.n), 1))
    total = float(sub.total_energy)
    return {"worst_case": c * u / (1.0 - c * u) * total, "typical": math.sqrt(c) * u * total,
            "basis": f"Gram rounding: float64 products of ≤{c} rows "
                     f"summed in float64; worst case c·u·‖X‖_F², typical √c·u·‖X‖_F²"}


def stability_bound(sub, scores: np.ndarray, budget: int, rank: np.ndarray | None = None, rank_base: int = 1) -> dict:
    """Cut-off margin and the perturbation bound of a selection, from the fit alone (no data pass).

    Parameters
    ----------
    sub : Subspace
        The fit the scores came from (its ``energy_curve`` holds the fitted σ², descending).
    scores : (N,) float64
        The leverage scores; NaN rows (invalid) rank last.
    budget : int, 1 ≤ budget ≤ N
    rank, rank_base : optional
        Every row's rank, for :func:`cutoff_margin`.

    Returns
    -------
    dict
        ``budget``, ``k``, ``reference_solver``, ``margin`` (:func:`cutoff_margin`) and ``bound``:
        ``lambda_k``, ``lambda_k1``, ``relative_eigengap`` ((λ_k − λ_{k+1})/λ_k),
        ``tolerated_gram_perturbation`` (largest ‖E‖₂ for which :func:`score_shift_bound` stays below
        half the margin: any such change of the Gram keeps the selected set), ``tolerated_relative``
        (the same over the total energy), ``solver_error`` (the exact solver's rounding, worst case and
        typical; None for the randomized solver, whose error is not known without another pass) and
        ``max_score_shift`` (β of each). ``certified``: the worst-case rounding bound is below the
        tolerated perturbation (a proof the solver's rounding cannot have changed the set);
        ``certified_typical``: the same for the typical rounding size. ``basis`` says what was used.
    """
    from .scoring import count_scored

    m = cutoff_margin(scores, int(budget), rank, rank_base)
    lam = np.asarray(getattr(sub, "energy_curve", []), dtype=np.float64)
    k, d = int(sub.k), int(sub.d)
    out = {"budget": int(budget), "k": k, "reference_solver": getattr(sub, "solver", "unknown"), "margin": m}
    bound: dict = {"lambda_k": None, "lambda_k1": None, "relative_eigengap": None,
                   "tolerated_gram_perturbation": None, "tolerated_relative": None, "solver_error": None,
                   "max_score_shift": None}
    certified = certified_typical = int(budget) >= count_scored(scores)
    if lam.size >= k and k >= 1:
        lk = float(lam[k - 1])
        lk1 = float(lam[k]) if lam.size > k else (0.0 if k >= d else None)
        if lk1 is not None and lk > 0:
            bound.update(lambda_k=lk, lambda_k1=lk1, relative_eigengap=(lk - lk1) / lk)
            margin = m["margin"]
            if margin is not None:
                tol = _tolerated(lk, lk1, margin / 2.0)
                bound.update(tolerated_gram_perturbation=tol,
                             tolerated_relative=tol / float(sub.total_energy) if sub.total_energy else None)
                err = _rounding_error(sub)
                if err is not None:
                    bound["solver_error"] = err
                    shift = {w: score_shift_bound(err[w], lk, lk1) for w in ("worst_case", "typical")}
                    bound["max_score_shift"] = {w: (v if math.isfinite(v) else None) for w, v in shift.items()}
                    certified = certified or shift["worst_case"] < margin / 2.0
                    certified_typical = certified_typical or shift["typical"] < margin / 2.0
        else:
            bound["note"] = ("λ_{k+1} is not known (the randomized sketch holds exactly k components)"
                             if lk1 is None else "λ_k is 0")
    out.update(bound=bound, certified=bool(certified), certified_typical=bool(certified_typical),
               basis="cut-off margin and a Davis–Kahan perturbation bound from the fitted spectrum "
                     "(no extra pass over the data)")
    return out


def randomized_hands_over(sub, oversample: int = 10, n_iter: int = 2, init_width: int = 64) -> str | None:
    """Why a randomized re-fit of ``sub``'s problem would be finished by the exact solver, or None.

    A randomized "re-fit" that hands over compares the exact answer with itself (overlap 1.0 by
    construction), so :func:`stability_certificate` reports it as not applicable instead of paying
    for it. The prediction applies the randomized solver's hand-over rules
    (:mod:`scalselect_fast.subspace`) to the fitted k: with an energy target the sketch starts at
    ``init_width`` columns and must reach ℓ = k + oversample; when it has to grow and either the
    remaining passes at that width cost more than one exact Gram pass ((n_iter+1)·4·ℓ > d) or
    ℓ > d/2, the exact solver finishes (only for d above ``SKETCH_SWITCH_MIN_D`` and a Gram that
    fits). A fit that itself handed over says so in its ``info``.
    """
    from .subspace import EXACT_GRAM_MAX_BYTES
    from .subspace.randomized import SKETCH_SWITCH_MIN_D

    info = getattr(sub, "info", {}) or {}
    if info.get("randomized_gave_up"):
        return f"this fit's randomized solver already handed over to exact ({info['randomized_gave_up']})"
    d, k = int(sub.d), int(sub.k)
    if not (SKETCH_SWITCH_MIN_D < d and 8 * d * d <= EXACT_GRAM_MAX_BYTES):
        return None
    if getattr(sub, "energy", None) is None:  # fixed k: the sketch starts at k + oversample, no growth
        return None
    need = min(d, k + oversample)
    if need <= min(d, max(init_width, oversample + 1)):
        return None
    if (n_iter + 1) * 4 * need > d or 2 * need > d:
        return (f"the randomized solver would hand over to exact: k={k} needs a sketch of ℓ≈{need} columns, "
                f"and at d={d} finishing at that width costs more than one exact Gram pass")
    return None
