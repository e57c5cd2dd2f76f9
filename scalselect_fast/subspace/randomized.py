"""The randomized solver: subspace iteration with Rayleigh-Ritz on the centred operator, growing
its sketch until the energy target is held, handing over to the exact solver when that is cheaper.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from .accumulators import EXACT_GRAM_MAX_BYTES, MomentAccumulator, SketchAccumulator
from .eigen import check_rows_and_variance, eps_for, pick_k, scale_from_moments, canonical_signs
from .passes import FIRST_PASS, first_block_mean, moment_pass, StorePass
from .result import SubspaceError
from .rows import source_name

#: above this width the randomized solver hands over to the exact one once its sketch needs > d/2
SKETCH_SWITCH_MIN_D = 256
# --------------------------------------------------------------------------------------------------
# randomized solver
# --------------------------------------------------------------------------------------------------
class SwitchToExact(Exception):
    """The randomized solver gave up for a cost or convergence reason; the exact solver takes over."""

    def __init__(self, reason: str, passes: int, history: list):
        super().__init__(reason)
        self.reason, self.passes, self.history = reason, passes, history


@dataclass(frozen=True)
class SketchOptions:
    """How the randomized solver sketches (the defaults are :func:`~.fit.fit_subspace`'s).

    Attributes
    ----------
    oversample : int, >= 0
        Spare sketch columns beyond k (ℓ = k + oversample once k is known).
    n_iter : int, >= 0
        Power iterations after the sketch is wide enough, before convergence is tested.
    max_passes : int, >= 1
        Passes over the data (the first, moment pass included) before handing over to the exact solver.
    init_width : int, >= 1
        Sketch width ℓ of an energy-target fit before k is known.
    ritz_rtol : float, > 0
        Converged when the top-k Ritz values moved by at most this much relative to themselves.
    """

    oversample: int = 10
    n_iter: int = 2
    max_passes: int = 10
    init_width: int = 64
    ritz_rtol: float = 1e-6

    def initial_width(self, d: int, k) -> int:
        """ℓ of the first sketch: k + oversample with a k, else ``init_width`` (at most d)."""
        return min(d, (int(k) + self.oversample) if k is not None else max(self.init_width, self.oversample + 1))


class _CentredGramOperator:
    """``Q -> AᵀA Q`` for the transformed centred matrix A, one streaming pass per application.

    A's rows are ``x_i - μ``, divided by the column scales when standardising, then by their norm
    when L2-normalising. Holds what the first (moment) pass learnt: n, μ, the scales, the rows found
    invalid, and ``total`` = ‖A‖_F² (set by the first product for L2-normalised rows).
    """

    def __init__(self, p: StorePass, shift: np.ndarray, mom, bad: np.ndarray, standardize: bool, l2_normalize: bool):
        be = p.be
        self.p, self.be, self.shift, self.bad, self.l2_normalize = p, be, shift, bad, l2_normalize
        self.n, self.mean = mom.n, be.to_host(mom.mean)
        csq = be.to_host(mom.centred_sumsq)
        self.raw_total = float(csq.sum())
        self.scale, self.n_const = (None, 0)
        if standardize:
            self.scale, self.n_const = scale_from_moments(csq / max(self.n, 1))
        self.inv = None if self.scale is None else 1.0 / self.scale
        # every valid non-zero L2-normalised row has norm 1: its total is summed on the first product
        self.total = None if l2_normalize else (
            self.raw_total if self.inv is None else float((csq * self.inv * self.inv).sum()))
        self.delta = None  # μ - shift, once the rows are known to be enough (see `check`)
        self._mom = mom

    def check(self, src) -> None:
        """Refuse too few rows or zero variance (before dividing by n)."""
        check_rows_and_variance(src, self.n, self.raw_total, self.mean, self.bad.size)
        self.delta = self.be.to_host(self._mom.colsum) / self.n

    def apply(self, Q: np.ndarray) -> tuple[np.ndarray, float | None]:
        """``(AᵀA Q, ‖A‖_F²)`` for a host d×ℓ ``Q``; the energy only for L2-normalised rows, else None."""
        p, be, xp = self.p, self.be, self.be.xp
        d = Q.shape[0]
        if self.l2_normalize:
            sk = SketchAccumulator(d, self.mean, Q, moments=False, matmul=be.matmul, dtype=p.dtype, xp=xp)
            row_energy = 0.0
            for off, b, n_valid in p.blocks(self.mean, inv_scale=self.inv, l2=True, known_bad=self.bad):
                sk.add(b, sk.products(b), n_valid)
                row_energy += float(xp.einsum("ij,ij->", b, b).astype(np.float64))
            return be.to_host(sk.Z), row_energy
        Qin = Q if self.inv is None else Q * self.inv[:, None]
        sk = SketchAccumulator(d, self.shift, Qin, moments=False, matmul=be.matmul, dtype=p.dtype, xp=xp)
        for off, b, n_valid in p.blocks(self.shift, known_bad=self.bad):
            sk.add(b, sk.products(b), n_valid)
        Z = be.to_host(sk.centred_product(self.delta, self.n))
        return (Z if self.inv is None else Z * self.inv[:, None]), None


def _first_pass(src, p: StorePass, omega: np.ndarray, standardize: bool, l2_normalize: bool, tracker,
                timings: dict) -> tuple[_CentredGramOperator, np.ndarray, int]:
    """Moments, and ``AᵀA Ω`` for the random start ``omega`` (d×ℓ): ``(operator, Z, passes)``.

    Without L2 normalisation the product rides along the moment pass (rows need no μ before being
    transformed: ``AᵀA Ω`` follows from the shifted products and the moments); with it, μ must be
    known first, so the product takes a second pass.
    """
    be, xp, d = p.be, p.be.xp, src.d
    shift = first_block_mean(src, p.block_rows)
    t0 = time.perf_counter()
    if not l2_normalize:
        acc = SketchAccumulator(d, shift, omega, moments=True, matmul=be.matmul, dtype=p.dtype, xp=xp)
        for off, b, n_valid in p.blocks(shift, verify=True):
            z = acc.products(b)
            cs_ok = bool(xp.isfinite(z).all())
            if not cs_ok:
                n_valid -= p.fix(off, b, True)
                z = acc.products(b)
            acc.add(b, z, n_valid)
            if not (bool(xp.isfinite(acc.colsum).all()) and bool(xp.isfinite(acc.sumsq).all())):
                raise SubspaceError(f"{source_name(src)}: values too large near row {off}; rescale the data")
        mom = acc
    else:
        mom = MomentAccumulator(d, shift, xp=xp)
        moment_pass(p, mom, FIRST_PASS)
        acc = None
    timings["pass1_s"] = time.perf_counter() - t0
    op = _CentredGramOperator(p, shift, mom, np.sort(tracker.all_rows()), standardize, l2_normalize)
    op.check(src)
    passes = 1
    if acc is not None:
        Z = be.to_host(acc.centred_product(op.delta, op.n))
        if op.inv is not None:
            Z = Z * op.inv[:, None]  # = AᵀA (D Ω): a random start with scaled columns, still generic
    else:
        Z, op.total = op.apply(omega)
        passes += 1
    check_rows_and_variance(src, op.n, op.total, op.mean)
    return op, Z, passes


@dataclass
class _Sketch:
    """What the range finder leaves: an orthonormal basis Q (d×ℓ) of the dominant range of AᵀA, the
    Ritz values ``lam`` (descending) and vectors ``U`` (ℓ×ℓ, in Q's coordinates), the chosen k."""

    Q: np.ndarray
    lam: np.ndarray
    U: np.ndarray
    k: int | None
    passes: int
    growths: int
    history: list


def _range_finder(src, op: _CentredGramOperator, Z: np.ndarray, rng, energy, k, opts: SketchOptions,
                  passes: int, timings: dict) -> _Sketch:
    """Subspace iteration with Rayleigh-Ritz from ``Z`` = AᵀA Ω, widening the sketch until it holds
    the energy target with ``oversample`` spare columns, then ``n_iter`` more iterations until the
    top-k Ritz values are stable.

    Raises :class:`SwitchToExact` when the exact solver is cheaper (a flat spectrum) or the sketch
    does not converge within ``max_passes``.
    """
    d = src.d
    ell = Z.shape[1]
    total = op.total
    growths = 0
    iters_after_fit = 0
    prev = None
    history = []
    while True:
        Q = np.linalg.qr(Z)[0]  # d×ℓ: small, on the host
        t1 = time.perf_counter()
        Z, _ = op.apply(Q)
        passes += 1
        timings[f"pass{passes}_s"] = time.perf_counter() - t1
        M = Q.T @ Z
        lam, U = np.linalg.eigh((M + M.T) * 0.5)
        lam, U = np.maximum(lam[::-1], 0.0), U[:, ::-1]
        kk = pick_k(lam, total, energy, k, rank=ell, n=op.n, d=d, src_name=source_name(src))
        captured = float(lam[:kk].sum()) if kk is not None else float(lam.sum())
        history.append({"ell": ell, "k": kk, "captured": captured / total})
        enough = kk is not None and (kk + opts.oversample <= ell or ell == d)
        if not enough and ell < d and passes < opts.max_passes:
            new = _grown_width(lam, total, energy, k, kk, ell, d, passes, history, opts)
            extra = rng.standard_normal((d, new - ell))
            # keep what was learnt: next basis = [current AᵀA Q | fresh random columns]
            Z = np.concatenate([Z, extra * np.linalg.norm(Z) / math.sqrt(Z.size)], axis=1)
            ell = new
            growths += 1
            iters_after_fit = 0
            prev = None
            continue
        iters_after_fit += 1
        # converged when k is stable and the top-k Ritz values stopped moving (they converge about
        # twice as fast as the vectors, hence the tight tolerance)
        converged = prev is not None and prev.size >= kk and \
            float(np.max(np.abs(lam[:kk] - prev[:kk]) / np.maximum(lam[:kk], 1e-300))) <= opts.ritz_rtol
        prev = lam.copy()
        if iters_after_fit >= opts.n_iter and converged:
            return _Sketch(Q, lam, U, kk, passes, growths, history)
        if passes >= opts.max_passes:
            raise SwitchToExact(f"the sketch did not converge within {opts.max_passes} passes", passes, history)


def _grown_width(lam, total, energy, k, kk, ell: int, d: int, passes: int, history: list,
                 opts: SketchOptions) -> int:
    """The next, wider ℓ; raises :class:`SwitchToExact` when that width costs more than exact."""
    if SKETCH_SWITCH_MIN_D < d and 8 * d * d <= EXACT_GRAM_MAX_BYTES:
        need = _predict_sketch_width(lam, total, energy, k, opts.oversample, d)
        # finishing needs at least one pass at that width plus n_iter refinements, each
        # 4·N·d·ℓ flops; the exact solver's one Gram pass costs N·d² (and its Gram fits)
        if (opts.n_iter + 1) * 4 * need > d:
            raise SwitchToExact(
                f"the sketch would need ℓ≈{need} columns (Ritz spectrum extrapolated after "
                f"{passes} passes), and {opts.n_iter + 1} more passes at that width cost more than "
                f"one exact Gram pass (flat spectrum; ℓ > d/2={d // 2} would exceed it per pass)",
                passes, history)
    # 1.5× keeps the overshoot (extra flops in every later pass) moderate
    new = min(d, max(ell + ell // 2, (kk or 0) + opts.oversample))
    if 2 * new > d > SKETCH_SWITCH_MIN_D:
        # A pass with ℓ > d/2 columns costs 4·N·d·ℓ > 2·N·d² flops, more than the exact
        # solver's whole Gram pass: finish exactly instead (the user gets the exact answer).
        # Small d keeps sketching (up to ℓ = d, where one Rayleigh-Ritz pass is exact).
        raise SwitchToExact(f"the sketch needed ℓ={new} > d/2={d // 2} columns (spectrum too "
                             f"flat for a low-rank sketch)", passes, history)
    return new


def _ritz_svd(src, op: _CentredGramOperator, sketch: _Sketch, energy, k, opts: SketchOptions,
              dtype) -> dict:
    """The finishing step: components ``V = Q U_k`` (signs fixed) and σ = √λ from the Ritz pairs.

    Returns the keyword arguments of :class:`~.result.Subspace` (without solver, passes, info).
    """
    lam, kk, d = sketch.lam, sketch.k, src.d
    if kk is None:
        raise SubspaceError(f"{source_name(src)}: the randomized sketch (ℓ={sketch.Q.shape[1]}) did not reach energy "
                            f"{energy} within {opts.max_passes} passes; use solver='exact'")
    if k is not None and kk > int((lam > lam[0] * d * eps_for(dtype) * 4).sum()):
        raise SubspaceError(f"{source_name(src)}: k={k} exceeds the numerical rank of the centred matrix; "
                            f"choose a smaller k")
    V = canonical_signs(np.ascontiguousarray(sketch.Q @ sketch.U[:, :kk]))
    sv = np.sqrt(lam[:kk])
    return dict(mean=op.mean, scale=op.scale, l2_normalize=op.l2_normalize, components=V, singular_values=sv,
                energy_curve=lam, k=int(kk), energy=None if k is not None else float(energy),
                captured_energy=float(lam[:kk].sum()), total_energy=float(op.total), n=op.n, d=d)


def fit_randomized(src, energy, k, standardize: bool, l2_normalize: bool, block_rows: int, be, tracker,
                    timings: dict, seed: int, opts: SketchOptions = SketchOptions()):
    """Randomized fit: first pass, range finder, Rayleigh-Ritz finish.

    Returns ``(fields, passes, info)``: :class:`~.result.Subspace` keyword arguments, the passes
    over the data, and the sketch's record for ``Subspace.info``.

    Notes
    -----
    Halko, Martinsson & Tropp (2011), "Finding structure with randomness", Algorithms 4.3 (range
    finder with power iterations) and 5.1 (the SVD from the sketch), applied to AᵀA without forming it,
    with the sketch widened adaptively until it holds the energy target.
    """
    rng = np.random.default_rng(seed)
    p = StorePass(src, block_rows, be, tracker)
    omega = rng.standard_normal((src.d, opts.initial_width(src.d, k)))
    op, Z, passes = _first_pass(src, p, omega, standardize, l2_normalize, tracker, timings)
    sketch = _range_finder(src, op, Z, rng, energy, k, opts, passes, timings)
    fields = _ritz_svd(src, op, sketch, energy, k, opts, p.dtype)
    return fields, sketch.passes, {"sketch_width": sketch.Q.shape[1], "growths": sketch.growths,
                                   "oversample": opts.oversample, "power_iterations": opts.n_iter,
                                   "history": sketch.history, "constant_columns": op.n_const}


def _predict_sketch_width(lam: np.ndarray, total: float, energy, k, oversample: int, d: int) -> int:
    """Sketch width the energy target will need, extrapolated from the current Ritz values.

    ``lam`` (descending) are Ritz values of a sketch that does not yet hold ``energy`` × ``total``.
    Fits a power law ``λ_i ≈ C·i^-a`` to the middle of the Ritz spectrum (its top is accurate, its
    last values underestimate) and adds extrapolated eigenvalues until the target is met; a tail
    that does not decay is extrapolated as flat. Only used to decide, early, that the exact solver
    is cheaper: a wrong guess costs time, never accuracy (both solvers give the same answer).
    """
    ell = lam.size
    if k is not None:
        return min(d, int(k) + oversample)
    pos = lam[lam > 0]
    if pos.size < 8:
        return d
    i = np.arange(1, pos.size + 1, dtype=np.float64)
    lo, hi = pos.size // 4, (3 * pos.size) // 4
    slope, icpt = np.polyfit(np.log(i[lo:hi]), np.log(pos[lo:hi]), 1)
    a = max(-slope, 0.0)
    j = np.arange(ell + 1, d + 1, dtype=np.float64)
    tail = np.exp(icpt) * j ** -a if a > 0 else np.full(j.size, pos[-1])
    tail = np.minimum(tail, pos[-1])
    missing = energy * total - float(lam.sum())
    reached = np.flatnonzero(np.cumsum(tail) >= missing)
    need = (ell + 1 + int(reached[0])) if reached.size else d
    return int(min(d, need + oversample))


