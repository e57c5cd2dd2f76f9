"""Stability certificate: margin and overlap against obvious references, and the certificate's logic."""
from __future__ import annotations

import numpy as np
import pytest

import scalselect_fast as ss
from scalselect_fast.scoring import rank_scores
from scalselect_fast.stability import (cutoff_margin, overlap, randomized_hands_over, score_shift_bound,
                                       stability_bound, stability_certificate)


def low_rank(n=3001, d=24, r=4, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, r)) @ rng.standard_normal((r, d)) * 3 + noise * rng.standard_normal((n, d))
    return x.astype(np.float32)


def test_cutoff_margin_matches_sorting():
    s = np.random.default_rng(1).random(101)
    desc = np.sort(s)[::-1]
    for b in (1, 16, 100):
        m = cutoff_margin(s, b)
        assert m["last_kept"] == desc[b - 1] and m["first_rejected"] == desc[b]
        assert m["margin"] == pytest.approx(desc[b - 1] - desc[b])
        assert m["relative_margin"] == pytest.approx((desc[b - 1] - desc[b]) / desc[b - 1])
    full = cutoff_margin(s, 101)
    assert full["first_rejected"] is None and full["margin"] is None
    ties = cutoff_margin(np.array([3.0, 2.0, 2.0, 2.0, 1.0]), 2)
    assert ties["margin"] == 0.0 and ties["ties_at_cutoff"] == 3
    nan = cutoff_margin(np.array([np.nan, 2.0, 1.0]), 2)  # NaN = excluded row, ranks last
    assert nan["last_kept"] == 1.0
    with pytest.raises(ValueError):
        cutoff_margin(s, 0)


def reference_cutoff(s, b):
    """Cut-off values by one full descending sort (NaN as -inf)."""
    s = np.where(np.isnan(s), -np.inf, s)
    desc = np.sort(s)[::-1]
    return desc[b - 1], (desc[b] if b < s.size else None), int(np.count_nonzero(s == desc[b - 1]))


@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])
def test_cutoff_margin_by_blocks_matches_a_full_sort(chunk, monkeypatch):
    import scalselect_fast.scoring as scoring

    monkeypatch.setattr(scoring, "TOPK_CHUNK", chunk)  # several blocks merged
    rng = np.random.default_rng(5)
    s = rng.integers(0, 12, size=1001).astype(np.float64) / 3  # many ties
    s[rng.integers(0, 1001, 40)] = np.nan
    s[[3, 700]] = -np.inf
    for b in (1, 2, 17, 500, 960, 961, 962, 1000, 1001):
        last, nxt, ties = reference_cutoff(s, b)
        m = cutoff_margin(s, b)
        assert m["last_kept"] == last and m["first_rejected"] == nxt and m["ties_at_cutoff"] == ties, b
        for base in (1, 5):  # read at the ranks instead of from a top: the same dict
            np.testing.assert_equal(cutoff_margin(s, b, rank_scores(s, base), base), m)  # NaN margins equal


def test_overlap():
    assert overlap([1, 2, 3, 4], [3, 4, 5, 6]) == 0.5
    assert overlap([], []) == 1.0


def test_certificate_on_a_clear_spectrum_is_certified():
    x = low_rank()
    sub = ss.fit_subspace(x, solver="exact")
    scores = ss.leverage_scores(x, sub)
    cert = stability_certificate(x, sub, scores, "16%", seeds=(0, 1))
    assert cert["budget"] == 480 and cert["k"] == sub.k and cert["reference_solver"] == "exact"
    assert [r["seed"] for r in cert["runs"]] == [0, 1] and all(r["solver"] == "randomized" for r in cert["runs"])
    for r in cert["runs"]:
        # a re-fit is the user's fit (same energy target) with another solver/seed
        re = ss.fit_subspace(x, energy=0.9, solver="randomized", seed=r["seed"])
        sel = ss.top_k(ss.leverage_scores(x, re), 480)
        assert r["k"] == re.k and r["overlap"] == overlap(sel, ss.top_k(scores, 480))
        # the certificate's theorem: scores moved less than half the margin -> identical set
        if r["max_abs_score_diff"] < cert["margin"]["margin"] / 2:
            assert r["overlap"] == 1.0
    assert cert["refits_certified"] == all(r["max_abs_score_diff"] < cert["margin"]["margin"] / 2
                                           for r in cert["runs"])
    # a clear low-rank spectrum: every re-fit stays inside half the margin, so the set is certified
    assert cert["refits"] == "run" and cert["refits_certified"] is True and all(r["overlap"] == 1.0 for r in cert["runs"])
    assert cert["min_overlap_randomized"] >= 0.99 and cert["overlap_exact_vs_randomized"] >= 0.99


def test_certificate_from_a_randomized_fit_reuses_its_seed_and_refits_exact():
    x = low_rank(seed=2)
    sub = ss.fit_subspace(x, solver="randomized", seed=1)
    scores = ss.leverage_scores(x, sub)
    cert = stability_certificate(x, sub, scores, 100, seeds=(1, 5))
    assert [(r["solver"], r["seed"]) for r in cert["runs"]] == [("randomized", 5), ("exact", None)]
    assert cert["overlap_exact_vs_randomized"] is not None
    margin_only = stability_certificate(x, sub, scores, 100, seeds=(), exact=False)
    assert margin_only["runs"] == [] and margin_only["refits"] == "not requested"
    assert margin_only["refits_certified"] is None and "bound" in margin_only
    with pytest.raises(ValueError, match="rows"):
        stability_certificate(x, sub, scores[:-1], 100)


def test_certificate_skips_invalid_rows_like_the_selection():
    x = low_rank(seed=3)
    x[5] = np.nan
    sub = ss.fit_subspace(x, drop_invalid=True)
    scores = ss.leverage_scores(x, sub, drop_invalid=True)
    cert = stability_certificate(x, sub, scores, 50, seeds=(0,), drop_invalid=True)
    assert cert["runs"][0]["overlap"] >= 0.9 and np.isfinite(cert["runs"][0]["max_abs_score_diff"])


def test_select_report_carries_the_certificate(tmp_path):
    from scalselect_fast.cli import main
    import json

    x = low_rank(n=800, seed=4)
    np.save(tmp_path / "x.npy", x)
    # default: margin + bound, no re-fit
    assert main(["select", str(tmp_path / "x.npy"), "--budget", "10%", "--out", str(tmp_path / "d"),
                 "--no-html"]) == 0
    st = json.loads((tmp_path / "d" / "report.json").read_text())["stability"]
    assert st["refits"] == "not requested" and "runs" not in st
    assert st["margin"]["last_kept"] > st["margin"]["first_rejected"] and st["bound"]["tolerated_relative"] > 0
    assert main(["select", str(tmp_path / "x.npy"), "--budget", "10%", "--out", str(tmp_path / "a"),
                 "--manifest-format", "jsonl", "--stability-seeds", "3"]) == 0
    cert = json.loads((tmp_path / "a" / "report.json").read_text())["stability"]
    assert cert["budget"] == 80 and [r["seed"] for r in cert["runs"]] == [3]
    assert cert["margin"]["last_kept"] > cert["margin"]["first_rejected"]
    assert main(["select", str(tmp_path / "x.npy"), "--budget", "10%", "--out", str(tmp_path / "b"),
                 "--manifest-format", "jsonl", "--stability-seeds", "none"]) == 0
    assert json.loads((tmp_path / "b" / "report.json").read_text())["stability"] is None


# --------------------------------------------------------------------------------------------------
# the free bound: checked against eigen-decompositions of perturbed Gram matrices
# --------------------------------------------------------------------------------------------------
def _lev(A, G, k):
    """Reference leverage of the rows of A under the top-k eigenpairs of G (any symmetric G)."""
    lam, V = np.linalg.eigh(G)
    lam, V = lam[::-1], V[:, ::-1]
    return ((A @ V[:, :k]) ** 2 / lam[:k]).sum(1), lam


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rel_eta", [1e-6, 1e-4, 1e-2])
def test_score_shift_bound_holds_for_perturbed_grams(seed, rel_eta):
    rng = np.random.default_rng(seed)
    n, d, k = 301, 13, 4
    A = rng.standard_normal((n, d)) * np.geomspace(6, 0.3, d)
    A -= A.mean(0)
    G = A.T @ A
    ref, lam = _lev(A, G, k)
    assert np.allclose(ref, np.linalg.svd(A, full_matrices=False)[0][:, :k].__pow__(2).sum(1))
    eta = rel_eta * lam[0]
    for trial in range(4):
        if trial == 0:  # the worst direction: mixes the k-th and (k+1)-th eigenvectors
            _, V = np.linalg.eigh(G)
            V = V[:, ::-1]
            E = eta * (np.outer(V[:, k - 1], V[:, k]) + np.outer(V[:, k], V[:, k - 1]))
        else:
            E = rng.standard_normal((d, d))
            E = E + E.T
            E *= eta / np.linalg.norm(E, 2)
        got, lam_p = _lev(A, G + E, k)
        shift = np.abs(got - ref).max()
        # the bound may be evaluated with either side's eigenvalues (the fit only knows its own)
        for lk, lk1 in ((lam_p[k - 1], lam_p[k]), (lam[k - 1], lam[k])):
            bound = score_shift_bound(np.linalg.norm(E, 2), lk, lk1)
            assert shift <= bound * (1 + 1e-9) + 1e-12, (shift, bound)
        if trial == 0 and rel_eta <= 1e-4:
            assert bound < 50 * shift  # not vacuous: within a modest factor of the worst case


def test_bound_certifies_what_it_claims():
    x = low_rank(n=2001, seed=5).astype(np.float64)
    sub = ss.fit_subspace(x, solver="exact")
    scores = ss.leverage_scores(x, sub)
    st = stability_bound(sub, scores, 200)
    b = st["bound"]
    lam = np.asarray(sub.energy_curve)
    assert b["lambda_k"] == lam[sub.k - 1] and b["lambda_k1"] == lam[sub.k]
    tol = b["tolerated_gram_perturbation"]
    assert score_shift_bound(tol, b["lambda_k"], b["lambda_k1"]) < st["margin"]["margin"] / 2
    assert score_shift_bound(tol * 1.01, b["lambda_k"], b["lambda_k1"]) >= st["margin"]["margin"] / 2 * 0.999
    assert b["tolerated_relative"] == pytest.approx(tol / sub.total_energy)
    # a perturbation of the Gram inside the tolerance keeps the selected set (checked by re-selecting)
    A = x - x.mean(0)
    G = A.T @ A
    E = np.random.default_rng(0).standard_normal(G.shape)
    E = (E + E.T) * (0.9 * tol / np.linalg.norm(E + E.T, 2))
    lam_e, V = np.linalg.eigh(G + E)
    lev = ((A @ V[:, ::-1][:, :sub.k]) ** 2 / lam_e[::-1][:sub.k]).sum(1)
    assert set(ss.top_k(lev, 200).tolist()) == set(ss.top_k(scores, 200).tolist())
    # float64 source: the rounding bound uses u = 2^-53 and certifies this clear spectrum
    assert b["solver_error"]["worst_case"] < 1e-9 * sub.total_energy and st["certified"] is True


def test_randomized_hand_over_is_predicted_not_run():
    rng = np.random.default_rng(7)
    d = 300  # above the solver's hand-over width
    flat = (rng.standard_normal((3000, d)) * np.linspace(1.0, 0.7, d)).astype(np.float32)
    sub = ss.fit_subspace(flat, solver="exact")
    why = randomized_hands_over(sub)
    assert why is not None and "hand over" in why
    # the prediction agrees with what the solver really does
    rand = ss.fit_subspace(flat, solver="randomized", seed=0)
    assert rand.solver == "exact" and "switched to exact" in rand.info["solver_reason"]
    assert randomized_hands_over(rand) is not None  # the fit says so itself
    scores = ss.leverage_scores(flat, sub)
    cert = stability_certificate(flat, sub, scores, 300, seeds=(0, 1, 2))
    assert cert["refits"].startswith("not applicable") and cert["runs"] == []
    # a steep spectrum with small k stays randomized, and the prediction says so
    steep = low_rank(n=3000, d=d, r=4, seed=8)
    sub2 = ss.fit_subspace(steep, solver="exact")
    assert randomized_hands_over(sub2) is None
    assert ss.fit_subspace(steep, solver="randomized", seed=0).solver == "randomized"
