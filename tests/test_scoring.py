"""Leverage scores, top-k and budgets vs slow references (run with and without the native module)."""
import numpy as np
import pytest

from scalselect_fast import native
from scalselect_fast.scoring import (BudgetError, count_scored, leverage_scores, rank_scores, resolve_budget,
                                     score_order, top_k)
from scalselect_fast.store import StoreWriter
from scalselect_fast.subspace import InvalidRowsError, SubspaceError, fit_subspace


def reference_leverage(X, k):
    A = np.asarray(X, dtype=np.float64)
    A = A - A.mean(axis=0)
    U = np.linalg.svd(A, full_matrices=False)[0]
    return (U[:, :k] ** 2).sum(axis=1)


def reference_top_k(scores, m):
    return np.array(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:m], dtype=np.int64)


def data(n, d, seed=0):
    rng = np.random.default_rng(seed)
    s = np.arange(1, d + 1) ** -0.7
    return (rng.standard_normal((n, d)) * s) @ np.linalg.qr(rng.standard_normal((d, d)))[0] + 2.0


def test_backend_reported():
    assert native.BACKEND in ("native", "python")


@pytest.mark.parametrize("dtype,atol", [(np.float64, 1e-11), (np.float32, 2e-6), (np.float16, 2e-6)])
def test_leverage_matches_row_norms_of_U(dtype, atol):
    X = data(1013, 29).astype(dtype)
    sub = fit_subspace(X, energy=0.8)
    lev = leverage_scores(X, sub, block_rows=77)
    assert lev.dtype == np.float64 and lev.shape == (1013,)
    np.testing.assert_allclose(lev, reference_leverage(X, sub.k), atol=atol, rtol=1e-4)
    assert abs(lev.sum() - sub.k) < 1e-6
    # a different block partition: the native kernel's float32 product (fp16/fp32 input) may round
    # a row differently in another tile position; float64 input keeps a float64 product
    rtol = 1e-12 if dtype == np.float64 or not native.HAVE_NATIVE else 1e-6
    np.testing.assert_allclose(sub.score(X[100:200]), lev[100:200], rtol=rtol, atol=1e-15)


def test_leverage_over_multi_shard_store(tmp_path):
    X = data(1000, 16, seed=1)
    w = StoreWriter(tmp_path / "s", d=16, dtype="float32")
    for a, b in [(0, 300), (300, 301), (301, 1000)]:
        w.write_shard(X[a:b], [f"r{i}" for i in range(a, b)])
    sub = fit_subspace(tmp_path / "s", block_rows=128)
    lev = leverage_scores(tmp_path / "s", sub, block_rows=128)
    np.testing.assert_allclose(lev, reference_leverage(X.astype(np.float32), sub.k), atol=2e-6)


def test_leverage_invalid_rows():
    X = data(500, 10, seed=2)
    sub = fit_subspace(X)
    Y = X.copy()
    Y[[3, 400]] = np.nan
    with pytest.raises(InvalidRowsError, match=r"row 3 \(id '3'.*row 400"):
        leverage_scores(Y, sub, block_rows=1000)
    lev = leverage_scores(Y, sub, drop_invalid=True)
    assert np.isnan(lev[[3, 400]]).all() and np.isfinite(np.delete(lev, [3, 400])).all()
    # the setting the subspace was fitted with carries over
    sub2 = fit_subspace(Y, drop_invalid=True)
    lev2 = leverage_scores(Y, sub2)
    assert np.isnan(lev2[3]) and abs(np.nansum(lev2) - sub2.k) < 1e-6
    sel = top_k(lev2, 498)
    assert 3 not in sel and 400 not in sel
    with pytest.raises(BudgetError, match="only 498 of 500 rows have a score"):
        top_k(lev2, 499)
    with pytest.raises(SubspaceError, match="d=10 but the source has d=4"):
        leverage_scores(np.zeros((3, 4)), sub)


@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])
def test_top_k_matches_sorted_reference(chunk):
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 20, size=1001).astype(np.float64) / 7  # many ties
    for m in (1, 5, 160, 1001):
        np.testing.assert_array_equal(top_k(scores, m, chunk=chunk), reference_top_k(scores, m))
    got = top_k(scores, "16%", chunk=chunk)
    assert got.dtype == np.int64 and got.size == 160
    with_nan = scores.copy()
    with_nan[[0, 10, 500]] = np.nan
    ref = [i for i in reference_top_k(np.nan_to_num(with_nan, nan=-1.0), 998)]
    np.testing.assert_array_equal(top_k(with_nan, 998, chunk=chunk), ref)


def reference_ranks(scores, base):
    """Rank per row by one plain sort of every scored row on (-score, row); 0 for NaN rows."""
    scored = [i for i in range(len(scores)) if not np.isnan(scores[i])]
    rank = np.zeros(len(scores), np.int64)
    for r, i in enumerate(sorted(scored, key=lambda i: (-scores[i], i))):
        rank[i] = base + r
    return rank


def _ranked_scores(kind, n, rng):
    if kind == "ties":
        return rng.integers(0, 20, size=n).astype(np.float64) / 7
    s = rng.random(n)
    if kind == "nan":
        s[rng.random(n) < 0.1] = np.nan
        if n:
            s[rng.integers(0, n, 5)] = 0.25  # ties among NaNs
    elif kind == "signed-zero-inf":
        s[::3] = 0.0
        s[1::7] = -0.0  # equal to 0.0: ties broken by row, as the stable sort breaks them
        s[2::11] = np.inf
        s[4::13] = -np.inf
        s[5::17] = np.nan
    elif kind == "all-equal":
        s[:] = 1.5
    elif kind == "all-nan":
        s[:] = np.nan
    return s


@pytest.mark.parametrize("kind", ["ties", "nan", "signed-zero-inf", "all-equal", "all-nan", "distinct"])
@pytest.mark.parametrize("block", [1, 3, 64, 1 << 19])
@pytest.mark.parametrize("n", [0, 1, 1001])
def test_rank_scores_matches_a_full_sort(kind, block, n):
    scores = _ranked_scores(kind, n, np.random.default_rng(n + 17))
    ref = reference_ranks(scores, 1)
    got = rank_scores(scores, 1, block=block)
    assert got.dtype == np.int32 and got.shape == (n,)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(rank_scores(scores, 0, block=block)[~np.isnan(scores)],
                                  ref[~np.isnan(scores)] - 1)
    order = score_order(scores)
    assert order.dtype == np.int64 and order.size == count_scored(scores) == int((~np.isnan(scores)).sum())
    np.testing.assert_array_equal(got[order], np.arange(1, order.size + 1))


def test_rank_scores_refuses_bad_input():
    with pytest.raises(ValueError, match="1-D"):
        rank_scores(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="block"):
        rank_scores(np.zeros(3), block=0)


@pytest.mark.parametrize("bad,exc,match", [
    (np.zeros((10, 2)), ValueError, r"scores must be 1-D .* shape \(10, 2\)"),
    (np.float64(1.0), ValueError, "scores must be 1-D"),
    (np.array(["a", "b"]), TypeError, "must be a float array"),
])
def test_top_k_refuses_what_is_not_one_score_per_row(bad, exc, match):
    # a 2-D array used to be flattened silently, returning positions in the flattened array
    with pytest.raises(exc, match=match):
        top_k(bad, 1)


def test_leverage_scores_names_a_wrong_subspace_argument():
    with pytest.raises(TypeError, match="sub must be a Subspace"):
        leverage_scores(np.zeros((3, 4)), np.eye(4))


def test_scores_are_canonical_and_the_same_from_any_block_layout():
    # the canonical score: float32-representable, and independent of how the rows are streamed
    X = data(3001, 37, seed=5).astype(np.float16)
    sub = fit_subspace(X)
    a = leverage_scores(X, sub, block_rows=3001)
    b = leverage_scores(X, sub, block_rows=97)
    np.testing.assert_array_equal(a, a.astype(np.float32).astype(np.float64))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, reference_leverage(X, sub.k), rtol=2e-7, atol=1e-12)


def test_resolve_budget():
    assert resolve_budget(100, 1000) == 100
    assert resolve_budget(np.int64(7), 10) == 7
    assert resolve_budget("100000", 200000) == 100000
    assert resolve_budget("0.16", 2000) == 320
    assert resolve_budget(0.16, 2000) == 320
    assert resolve_budget("16%", 2000) == 320
    assert resolve_budget(" 100% ", 17) == 17
    assert resolve_budget(5.0, 10) == 5
    assert resolve_budget("0.5", 3) == 2  # 1.5 rounds half up
    for bad, msg in [(0, "at least 1"), (-3, "at least 1"), (11, "only 10 are available"),
                     ("0%", r"must be in \(0, 100\]"), ("150%", r"must be in \(0, 100\]"),
                     ("0.01%", "rounds to 0"), ("200", "only 10 are available"), ("abc", "not a count"),
                     (2.5, "whole count"), (True, "not a count"), (0.001, "rounds to 0"), ("nan", "not a number")]:
        with pytest.raises(BudgetError, match=msg):
            resolve_budget(bad, 10)
