"""Stability certificate: margin and overlap against obvious references, and the certificate's logic."""
from __future__ import annotations

import numpy as np
import pytest

import scalselect_fast as ss
from scalselect_fast.stability import cutoff_margin, overlap, stability_certificate


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
    assert cert["certified"] == all(r["max_abs_score_diff"] < cert["margin"]["margin"] / 2 for r in cert["runs"])
    # a clear low-rank spectrum: every re-fit stays inside half the margin, so the set is certified
    assert cert["certified"] is True and all(r["overlap"] == 1.0 for r in cert["runs"])
    assert cert["min_overlap_randomized"] >= 0.99 and cert["overlap_exact_vs_randomized"] >= 0.99


def test_certificate_from_a_randomized_fit_reuses_its_seed_and_refits_exact():
    x = low_rank(seed=2)
    sub = ss.fit_subspace(x, solver="randomized", seed=1)
    scores = ss.leverage_scores(x, sub)
    cert = stability_certificate(x, sub, scores, 100, seeds=(1, 5))
    assert [(r["solver"], r["seed"]) for r in cert["runs"]] == [("randomized", 5), ("exact", None)]
    assert cert["overlap_exact_vs_randomized"] is not None
    margin_only = stability_certificate(x, sub, scores, 100, seeds=(), exact=False)
    assert margin_only["runs"] == [] and margin_only["certified"] is False
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
    assert main(["select", str(tmp_path / "x.npy"), "--budget", "10%", "--out", str(tmp_path / "a"),
                 "--manifest-format", "jsonl", "--stability-seeds", "3"]) == 0
    cert = json.loads((tmp_path / "a" / "report.json").read_text())["stability"]
    assert cert["budget"] == 80 and [r["seed"] for r in cert["runs"]] == [3]
    assert cert["margin"]["last_kept"] > cert["margin"]["first_rejected"]
    assert main(["select", str(tmp_path / "x.npy"), "--budget", "10%", "--out", str(tmp_path / "b"),
                 "--manifest-format", "jsonl", "--stability-seeds", "none"]) == 0
    assert json.loads((tmp_path / "b" / "report.json").read_text())["stability"] is None
