"""The randomized solver: subspace iteration with Rayleigh-Ritz on the centred operator, growing
its sketch until the energy target is held, handing over to the exact solver when that is cheaper.
"""
from __future__ import annotations

import math
import time

import numpy as np

from .accumulators import EXACT_GRAM_MAX_BYTES, MomentAccumulator, SketchAccumulator
from .eigen import _check_rows_and_variance, _eps_for, _pick_k, _scale_from_moments, _signs
from .passes import FIRST_PASS, _first_block_mean, _moment_pass, _Pass
from .result import SubspaceError
from .rows import _name

#: above this width the randomized solver hands over to the exact one once its sketch needs > d/2
SKETCH_SWITCH_MIN_D = 256
# --------------------------------------------------------------------------------------------------
# randomized solver
# --------------------------------------------------------------------------------------------------
class _SwitchToExact(Exception):
    """The randomized solver gave up for a cost or convergence reason; the exact solver takes over."""

    def __init__(self, reason: str, passes: int, history: list):
        super().__init__(reason)
        self.reason, self.passes, self.history = reason, passes, history


def _fit_randomized(src, energy, k, standardize, l2_normalize, block_rows, be, tracker, timings, seed,
                    oversample=10, n_iter=2, max_passes=10, init_width=64, ritz_rtol=1e-6):
    d = src.d
    xp = be.xp
    rng = np.random.default_rng(seed)
    p = _Pass(src, block_rows, be, tracker)
    shift = _first_block_mean(src, block_rows)
    ell = min(d, (int(k) + oversample) if k is not None else max(init_width, oversample + 1))

    # pass 1: moments (+ the first sketch product when rows need no μ before transforming)
    t0 = time.perf_counter()
    omega = rng.standard_normal((d, ell))
    passes = 1
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
                raise SubspaceError(f"{_name(src)}: values too large near row {off}; rescale the data")
        mom = acc
    else:
        mom = MomentAccumulator(d, shift, xp=xp)
        _moment_pass(p, mom, FIRST_PASS)
        acc = None
    timings["pass1_s"] = time.perf_counter() - t0
    n, mean = mom.n, be.to_host(mom.mean)
    bad = np.sort(tracker.all_rows())
    csq = be.to_host(mom.centred_sumsq)
    scale, n_const = (None, 0)
    if standardize:
        scale, n_const = _scale_from_moments(csq / max(n, 1))
    inv = None if scale is None else 1.0 / scale
    total = float(csq.sum()) if scale is None else float((csq * inv * inv).sum())
    _check_rows_and_variance(src, n, float(csq.sum()), mean, bad.size)
    if l2_normalize:
        # every valid non-zero row has norm exactly 1 after normalisation
        total = None  # computed on the first sketch pass below

    delta = be.to_host(mom.colsum) / n  # μ - shift

    def apply(Q):
        """AᵀA Q for the transformed centred operator, one streaming pass."""
        if l2_normalize:
            sk = SketchAccumulator(d, mean, Q, moments=False, matmul=be.matmul, dtype=p.dtype, xp=xp)
            row_energy = 0.0
            for off, b, n_valid in p.blocks(mean, inv_scale=inv, l2=True, known_bad=bad):
                sk.add(b, sk.products(b), n_valid)
                row_energy += float(xp.einsum("ij,ij->", b, b).astype(np.float64))
            return be.to_host(sk.Z), row_energy
        Qin = Q if inv is None else Q * inv[:, None]
        sk = SketchAccumulator(d, shift, Qin, moments=False, matmul=be.matmul, dtype=p.dtype, xp=xp)
        for off, b, n_valid in p.blocks(shift, known_bad=bad):
            sk.add(b, sk.products(b), n_valid)
        Z = be.to_host(sk.centred_product(delta, n))
        return (Z if inv is None else Z * inv[:, None]), None

    if acc is not None:
        Z = be.to_host(acc.centred_product(delta, n))
        if inv is not None:
            Z = Z * inv[:, None]  # = AᵀA (D Ω): a random start with scaled columns, still generic
    else:
        Z, total = apply(omega)
        passes += 1
    _check_rows_and_variance(src, n, total, mean)

    growths = 0
    iters_after_fit = 0
    prev = None
    history = []
    while True:
        Q = np.linalg.qr(Z)[0]  # d×ℓ: small, on the host
        t1 = time.perf_counter()
        Z, _ = apply(Q)
        passes += 1
        timings[f"pass{passes}_s"] = time.perf_counter() - t1
        M = Q.T @ Z
        lam, U = np.linalg.eigh((M + M.T) * 0.5)
        lam, U = np.maximum(lam[::-1], 0.0), U[:, ::-1]
        kk = _pick_k(lam, total, energy, k, rank=ell, n=n, d=d, src_name=_name(src))
        captured = float(lam[:kk].sum()) if kk is not None else float(lam.sum())
        history.append({"ell": ell, "k": kk, "captured": captured / total})
        enough = kk is not None and (kk + oversample <= ell or ell == d)
        if not enough and ell < d and passes < max_passes:
            if SKETCH_SWITCH_MIN_D < d and 8 * d * d <= EXACT_GRAM_MAX_BYTES:
                need = _predict_sketch_width(lam, total, energy, k, oversample, d)
                # finishing needs at least one pass at that width plus n_iter refinements, each
                # 4·N·d·ℓ flops; the exact solver's one Gram pass costs N·d² (and its Gram fits)
                if (n_iter + 1) * 4 * need > d:
                    raise _SwitchToExact(
                        f"the sketch would need ℓ≈{need} columns (Ritz spectrum extrapolated after "
                        f"{passes} passes), and {n_iter + 1} more passes at that width cost more than "
                        f"one exact Gram pass (flat spectrum; ℓ > d/2={d // 2} would exceed it per pass)",
                        passes, history)
            # 1.5× keeps the overshoot (extra flops in every later pass) moderate
            new = min(d, max(ell + ell // 2, (kk or 0) + oversample))
            if 2 * new > d > SKETCH_SWITCH_MIN_D:
                # A pass with ℓ > d/2 columns costs 4·N·d·ℓ > 2·N·d² flops, more than the exact
                # solver's whole Gram pass: finish exactly instead (the user gets the exact answer).
                # Small d keeps sketching (up to ℓ = d, where one Rayleigh-Ritz pass is exact).
                raise _SwitchToExact(f"the sketch needed ℓ={new} > d/2={d // 2} columns (spectrum too "
                                     f"flat for a low-rank sketch)", passes, history)
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
            float(np.max(np.abs(lam[:kk] - prev[:kk]) / np.maximum(lam[:kk], 1e-300))) <= ritz_rtol
        prev = lam.copy()
        if iters_after_fit >= n_iter and converged:
            break
        if passes >= max_passes:
            raise _SwitchToExact(f"the sketch did not converge within {max_passes} passes", passes, history)
    if kk is None:
        raise SubspaceError(f"{_name(src)}: the randomized sketch (ℓ={ell}) did not reach energy {energy} "
                            f"within {max_passes} passes; use solver='exact'")
    if k is not None and kk > int((lam > lam[0] * d * _eps_for(p.dtype) * 4).sum()):
        raise SubspaceError(f"{_name(src)}: k={k} exceeds the numerical rank of the centred matrix; "
                            f"choose a smaller k")
    V = _signs(np.ascontiguousarray(Q @ U[:, :kk]))
    sv = np.sqrt(lam[:kk])
    fields = dict(mean=mean, scale=scale, l2_normalize=l2_normalize, components=V, singular_values=sv,
                  energy_curve=lam, k=int(kk), energy=None if k is not None else float(energy),
                  captured_energy=float(lam[:kk].sum()), total_energy=float(total), n=n, d=d)
    return fields, passes, {"sketch_width": ell, "growths": growths, "oversample": oversample,
                            "power_iterations": n_iter, "history": history, "constant_columns": n_const}


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


