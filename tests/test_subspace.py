"""Streaming subspace fit vs a dense float64 SVD of the centred matrix (the obvious reference)."""
import json
import pickle
from functools import reduce

import numpy as np
import pytest

from conftest import bf16_bits
from scalselect_fast.store import StoreWriter, open_source, to_float32
from scalselect_fast.subspace import (GramAccumulator, InvalidRowsError, MomentAccumulator, SketchAccumulator,
                                      Subspace, SubspaceError, choose_solver, fit_subspace)


# ------------------------------------------------------------------------------------------------
# slow, obvious references
# ------------------------------------------------------------------------------------------------
def transformed(X, standardize=False, l2=False):
    A = np.asarray(X, dtype=np.float64)
    A = A - A.mean(axis=0)
    if standardize:
        sd = A.std(axis=0)
        sd[sd <= 1e-10 * sd.max()] = 1.0
        A = A / sd
    if l2:
        nr = np.linalg.norm(A, axis=1, keepdims=True)
        A = np.divide(A, nr, out=np.zeros_like(A), where=nr > 0)
    return A


def reference(X, energy=0.9, k=None, standardize=False, l2=False):
    """(k, σ_k, all σ², leverage) from a dense float64 SVD."""
    A = transformed(X, standardize, l2)
    U, S, _ = np.linalg.svd(A, full_matrices=False)
    s2 = S ** 2
    if k is None:
        k = int(np.flatnonzero(np.cumsum(s2) >= energy * s2.sum() * (1 - 1e-9))[0] + 1)
    return k, S[:k], s2, (U[:, :k] ** 2).sum(axis=1)


def known_spectrum(n, d, sigmas, seed=0, offset=3.0):
    """Rows whose centred matrix has exactly the singular values ``sigmas`` (plus a mean offset)."""
    rng = np.random.default_rng(seed)
    r = len(sigmas)
    U = rng.standard_normal((n, r))
    U -= U.mean(axis=0)
    U = np.linalg.qr(U)[0]  # orthonormal columns, each orthogonal to the ones vector
    V = np.linalg.qr(rng.standard_normal((d, r)))[0]
    return (U * sigmas) @ V.T + offset * rng.standard_normal(d)


def decaying(n, d, seed=0, alpha=1.0, noise=0.02, offset=4.0):
    rng = np.random.default_rng(seed)
    s = np.arange(1, d + 1, dtype=np.float64) ** -alpha
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    return (rng.standard_normal((n, d)) * s) @ basis.T + noise * rng.standard_normal((n, d)) \
        + offset * rng.standard_normal(d)


def as_dtype(X, dtype, tmp_path):
    """Source of ``X`` in ``dtype`` plus the float64 matrix it actually holds (what to compare with)."""
    if dtype == "bfloat16":
        w = StoreWriter(tmp_path / "bf16", d=X.shape[1], dtype="bfloat16")
        w.write_shard(X[: X.shape[0] // 2], [f"a{i}" for i in range(X.shape[0] // 2)])
        w.write_shard(X[X.shape[0] // 2:], [f"b{i}" for i in range(X.shape[0] - X.shape[0] // 2)])
        src = open_source(tmp_path / "bf16")
        return src, to_float32(bf16_bits(X), True).astype(np.float64)
    Y = X.astype(dtype)
    return Y, Y.astype(np.float64)


# per-dtype bounds on |leverage - reference| (reference computed from the same stored values)
LEV_ATOL = {"float64": 1e-10, "float32": 2e-6, "float16": 2e-6, "bfloat16": 2e-6}


# ------------------------------------------------------------------------------------------------
# exact solver
# ------------------------------------------------------------------------------------------------
def test_known_spectrum_exact_float64():
    sig = np.array([50.0, 20.0, 10.0, 5.0, 2.0, 1.0, 0.5])
    X = known_spectrum(503, 37, sig)
    sub = fit_subspace(X, k=7, solver="exact", block_rows=100)
    np.testing.assert_allclose(sub.singular_values, sig, rtol=1e-10)
    np.testing.assert_allclose(sub.total_energy, (sig ** 2).sum(), rtol=1e-10)
    # energy target: 50²+20² = 2900 of 3034.5 = 0.9557 -> k=2 at 0.9, k=3 at 0.96
    assert fit_subspace(X, energy=0.9, block_rows=64).k == 2
    assert fit_subspace(X, energy=0.96, block_rows=64).k == 3
    np.testing.assert_allclose(np.sort(sub.energy_curve)[::-1][:7], sig ** 2, rtol=1e-9)


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
@pytest.mark.parametrize("block_rows", [97, 4096])
def test_exact_matches_dense_svd(dtype, block_rows, tmp_path):
    X = decaying(1237, 61, seed=1)
    src, Xd = as_dtype(X, dtype, tmp_path)
    k_ref, s_ref, s2_ref, lev_ref = reference(Xd)
    sub = fit_subspace(src, solver="exact", block_rows=block_rows)
    assert sub.k == k_ref and sub.solver == "exact" and sub.passes == 1
    rtol = 1e-10 if dtype == "float64" else 2e-5
    np.testing.assert_allclose(sub.singular_values, s_ref, rtol=rtol)
    np.testing.assert_allclose(sub.total_energy, s2_ref.sum(), rtol=rtol)
    from scalselect_fast.scoring import leverage_scores

    lev = leverage_scores(src, sub, block_rows=block_rows)
    np.testing.assert_allclose(lev, lev_ref, atol=LEV_ATOL[dtype], rtol=1e-4)
    assert abs(lev.sum() - sub.k) < 1e-6
    # V has orthonormal columns and spans the reference subspace (cosines of the principal angles
    # between span(V) and the dense SVD's top-k right singular vectors are all 1)
    np.testing.assert_allclose(sub.components.T @ sub.components, np.eye(sub.k), atol=1e-10)
    V_ref = np.linalg.svd(transformed(Xd, False, False), full_matrices=False)[2][:k_ref].T
    cosines = np.linalg.svd(V_ref.T @ sub.components, compute_uv=False)
    np.testing.assert_allclose(cosines, 1.0, atol=1e-10)  # measured: 1 - cos <= 5e-14 for every dtype


@pytest.mark.parametrize("standardize,l2", [(True, False), (False, True), (True, True)])
def test_options_match_reference(standardize, l2):
    X = decaying(801, 45, seed=2)
    X[:, 7] = 1.25  # a constant column: scale 1, contributes nothing
    k_ref, s_ref, _, lev_ref = reference(X, standardize=standardize, l2=l2)
    for solver in ("exact", "randomized"):
        sub = fit_subspace(X, solver=solver, standardize=standardize, l2_normalize=l2, block_rows=150)
        assert sub.k == k_ref and sub.solver == solver
        if solver == "exact":
            assert sub.passes == 1 + l2
        if standardize:
            assert sub.info["constant_columns"] == 1 and sub.scale[7] == 1.0
        np.testing.assert_allclose(sub.singular_values, s_ref, rtol=1e-5 if solver == "exact" else 1e-3)
        np.testing.assert_allclose(sub.score(X), lev_ref, atol=1e-6 if solver == "exact" else 1e-4)


def test_energy_one_and_k_override():
    X = decaying(300, 20, seed=3)
    k_ref, s_ref, _, _ = reference(X, energy=1.0)
    sub = fit_subspace(X, energy=1.0)
    assert sub.k == k_ref == 20
    sub = fit_subspace(X, k=5)
    assert sub.k == 5 and sub.energy is None
    np.testing.assert_allclose(sub.singular_values, reference(X, k=5)[1], rtol=1e-6)


def test_two_rows_and_rank_limits():
    X = np.array([[0.0, 1.0, 2.0], [1.0, 1.0, 0.0]], dtype=np.float32)
    sub = fit_subspace(X)
    assert sub.k == 1 and sub.n == 2
    np.testing.assert_allclose(sub.score(X), [0.5, 0.5], atol=1e-7)  # U_1 = ±1/√2
    with pytest.raises(SubspaceError, match=r"k=2 exceeds min\(n-1, d\) = 1"):
        fit_subspace(X, k=2)
    # rank 2 matrix in 6 dims with plenty of rows: k=3 exceeds its numerical rank
    Y = known_spectrum(50, 6, np.array([3.0, 1.0]))
    with pytest.raises(SubspaceError, match="exceeds the rank"):
        fit_subspace(Y, k=3, solver="exact")


def test_bad_arguments():
    X = decaying(50, 5)
    for energy in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(SubspaceError, match="energy must be in"):
            fit_subspace(X, energy=energy)
    with pytest.raises(SubspaceError, match="k must be a positive integer"):
        fit_subspace(X, k=0)
    with pytest.raises(SubspaceError, match="unknown solver"):
        fit_subspace(X, solver="magic")
    with pytest.raises(TypeError, match="center"):  # always centred: the parameter is gone
        fit_subspace(X, center=False)
    with pytest.raises(SubspaceError, match="at least 2 rows"):
        fit_subspace(X[:1])
    with pytest.raises(SubspaceError, match="zero total variance"):
        fit_subspace(np.tile(X[:1], (10, 1)))


def test_invalid_rows_error_and_drop():
    X = decaying(1000, 12, seed=4).astype(np.float32)
    X[[17, 533, 534]] = np.nan
    X[900, 3] = np.inf
    for solver in ("exact", "randomized"):
        with pytest.raises(InvalidRowsError, match=r"row 17 \(id '17'"):
            fit_subspace(X, solver=solver, block_rows=256)
    keep = np.setdiff1d(np.arange(1000), [17, 533, 534, 900])
    k_ref, s_ref, _, lev_ref = reference(X[keep])
    for solver, l2 in (("exact", False), ("exact", True), ("randomized", False)):
        sub = fit_subspace(X, solver=solver, drop_invalid=True, block_rows=256, l2_normalize=l2)
        assert sub.info["invalid_rows"] == [17, 533, 534, 900]
        assert sub.n == 996
        if not l2:
            assert sub.k == k_ref
            np.testing.assert_allclose(sub.singular_values, s_ref, rtol=1e-4)
    # all rows invalid but one
    Y = np.full((5, 3), np.nan)
    Y[0] = 1
    with pytest.raises(SubspaceError, match="4 invalid rows were dropped"):
        fit_subspace(Y, drop_invalid=True)


def test_fp16_inf_is_invalid():
    X = decaying(200, 8, seed=5).astype(np.float16)
    X[42, 0] = np.float16(np.inf)
    with pytest.raises(InvalidRowsError) as ei:
        fit_subspace(X)
    assert ei.value.rows.tolist() == [42]


# ------------------------------------------------------------------------------------------------
# randomized solver
# ------------------------------------------------------------------------------------------------
def test_randomized_accuracy_and_determinism():
    X = decaying(3001, 130, seed=6, alpha=1.2).astype(np.float32)
    k_ref, s_ref, _, lev_ref = reference(X)
    a = fit_subspace(X, solver="randomized", seed=7, block_rows=1000)
    b = fit_subspace(X, solver="randomized", seed=7, block_rows=1000)
    assert a.solver == "randomized" and a.passes >= 3 and "randomized_gave_up" not in a.info
    assert a.k == k_ref
    np.testing.assert_array_equal(a.components, b.components)  # bit-identical for a fixed seed
    np.testing.assert_allclose(a.singular_values, s_ref, rtol=1e-3)
    np.testing.assert_allclose(a.total_energy, (X.astype(np.float64) - X.mean(0, dtype=np.float64)).var(0).sum()
                               * X.shape[0], rtol=1e-6)
    lev = a.score(X)
    assert abs(lev.sum() - a.k) < 1e-6
    top = set(np.argsort(-lev_ref)[:480])
    assert len(top & set(np.argsort(-lev)[:480])) >= 0.99 * 480
    c = fit_subspace(X, solver="randomized", seed=8, block_rows=1000)
    assert not np.array_equal(a.components, c.components)  # the seed matters ...
    np.testing.assert_allclose(c.singular_values, a.singular_values, rtol=1e-3)  # ... but not the answer


def test_randomized_grows_sketch():
    # flat spectrum: 90% energy needs ~110 of 128 directions, more than the initial 64 columns
    X = np.random.default_rng(9).standard_normal((2000, 128))
    k_ref = reference(X)[0]
    sub = fit_subspace(X, solver="randomized", block_rows=512)
    assert sub.info["growths"] >= 1 and sub.info["sketch_width"] > 64 and sub.solver == "randomized"
    assert abs(sub.k - k_ref) <= 1


def test_randomized_hands_over_to_exact_when_sketch_too_wide():
    # flat spectrum, d=300 > 256: 90% of the energy needs ~250 directions, a sketch wider than d/2
    X = np.random.default_rng(14).standard_normal((1200, 300))
    sub = fit_subspace(X, solver="randomized", block_rows=400)
    assert sub.solver == "exact" and "d/2" in sub.info["randomized_gave_up"]
    # the Ritz spectrum after the first sketch already says so: no growth passes are spent
    assert sub.info["randomized_passes"] == 2 and "extrapolated" in sub.info["randomized_gave_up"]
    assert sub.passes == sub.info["randomized_passes"] + 1
    assert "switched to exact" in sub.info["solver_reason"]
    k_ref, s_ref, _, _ = reference(X)
    assert sub.k == k_ref
    np.testing.assert_allclose(sub.singular_values, s_ref, rtol=1e-9)


def test_predict_sketch_width_extrapolates_the_ritz_tail():
    from scalselect_fast.subspace.randomized import _predict_sketch_width

    d = 2000
    lam_all = np.arange(1, d + 1, dtype=np.float64) ** -1.5  # exact power law
    total = lam_all.sum()
    true_k = int(np.flatnonzero(np.cumsum(lam_all) >= 0.99 * total)[0]) + 1
    need = _predict_sketch_width(lam_all[:64], total, 0.99, None, 10, d)
    assert abs(need - (true_k + 10)) <= 0.05 * true_k  # the power law is recovered from 64 values
    flat = np.ones(64)  # no decay: 90% of the energy needs 90% of the directions
    assert _predict_sketch_width(flat, float(d), 0.9, None, 10, d) == int(0.9 * d) + 10
    assert _predict_sketch_width(lam_all[:64], total, 0.9, 20, 10, d) == 30  # k given: k + oversample


def test_randomized_k_override():
    X = decaying(700, 90, seed=10)
    sub = fit_subspace(X, k=6, solver="randomized")
    assert sub.k == 6 and sub.info["sketch_width"] == 16
    np.testing.assert_allclose(sub.singular_values, reference(X, k=6)[1], rtol=1e-4)


def test_auto_records_choice():
    sub = fit_subspace(decaying(100, 10))
    assert sub.solver == "exact" and "4096" in sub.info["solver_reason"]
    assert choose_solver(10_000_000, 16384, k=50)[0] == "randomized"
    # d=6000 without k: the sketch is guessed at d/8 = 750 columns, 4 passes cost more than the Gram
    solver, why = choose_solver(10_000_000, 6000)
    assert solver == "exact" and "exact cost" in why


# ------------------------------------------------------------------------------------------------
# accumulators (the Dask engineer's building blocks)
# ------------------------------------------------------------------------------------------------
def test_gram_accumulator_tree_reduction_equals_one_pass():
    X = decaying(999, 17, seed=11)
    one = GramAccumulator(17, X[:50].mean(0)).update(X - X[:50].mean(0))
    parts = []
    for i, (a, b) in enumerate([(0, 100), (100, 450), (450, 451), (451, 999)]):
        shift = X[a:b].mean(0) + i  # different shifts per shard: merge re-shifts exactly
        parts.append(pickle.loads(pickle.dumps(GramAccumulator(17, shift).update_block(X[a:b]))))
    tree = reduce(GramAccumulator.merge, [parts[0].merge(parts[1]), parts[2].merge(parts[3])])
    ref = transformed(X)
    np.testing.assert_allclose(tree.centred_gram(), ref.T @ ref, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(one.centred_gram(), ref.T @ ref, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(tree.mean, X.mean(0), rtol=1e-12)
    assert tree.n == 999


def test_moment_and_sketch_accumulators():
    X = decaying(400, 9, seed=12)
    shift = X[:10].mean(0)
    m = MomentAccumulator(9, shift, xp=np).update_block(X[:123]).merge(MomentAccumulator(9, 0 * shift).update_block(X[123:]))
    np.testing.assert_allclose(m.mean, X.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.centred_sumsq, ((X - X.mean(0)) ** 2).sum(0), rtol=1e-10)
    Q = np.random.default_rng(0).standard_normal((9, 3))
    s1 = SketchAccumulator(9, shift, Q, dtype=np.float64).update(X[:200] - shift)
    s2 = SketchAccumulator(9, shift, Q, dtype=np.float64).update(X[200:] - shift)
    s = pickle.loads(pickle.dumps(s1)).merge(s2)
    A = transformed(X)
    np.testing.assert_allclose(s.centred_product(s.colsum / s.n, s.n), A.T @ (A @ Q), rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# Subspace object
# ------------------------------------------------------------------------------------------------
def test_save_load_roundtrip_and_pickle(tmp_path):
    X = decaying(500, 24, seed=13).astype(np.float16)
    sub = fit_subspace(X, standardize=True)
    path = sub.save(tmp_path / "sub.npz")
    back = Subspace.load(path)
    for name in ("mean", "scale", "components", "singular_values", "energy_curve"):
        np.testing.assert_array_equal(getattr(back, name), getattr(sub, name))
    assert (back.k, back.n, back.d, back.solver, back.passes) == (sub.k, sub.n, sub.d, sub.solver, sub.passes)
    assert back.info["solver_reason"] == sub.info["solver_reason"]
    np.testing.assert_array_equal(back.score(X), sub.score(X))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(sub)).score(X), sub.score(X))
    np.testing.assert_allclose(sub.projection(), sub.components / sub.singular_values)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(SubspaceError, match="cannot read a subspace file"):
        Subspace.load(tmp_path / "junk.npz")
    with pytest.raises(SubspaceError, match="width 24"):
        sub.score(np.zeros((2, 5)))


@pytest.mark.parametrize("d,k", [(2, 1), (2, 2), (37, 5), (130, 130)])
def test_tridiagonal_top_vectors_match_eigh(d, k):
    from scalselect_fast.subspace.eigen import _tridiagonal

    rng = np.random.default_rng(d)
    A = rng.standard_normal((3 * d + 2, d)) * np.linspace(2, 0.1, d)
    G = A.T @ A
    if d > 4:
        G[:, 0] = G[0, :] = 0.0  # a zero eigenvalue and a repeated one (0 and the rest)
        G[0, 0] = G[1, 1] = G[1, 0] = G[0, 1] = 0.0
    lam, U = np.linalg.eigh(G)
    tri = _tridiagonal(G)
    assert _tridiagonal(G[:1, :1]) is None  # d=1 goes through eigh
    np.testing.assert_allclose(np.sort(tri.eigenvalues()), lam, atol=1e-12 * lam.max())
    V = tri.top_vectors(k)
    np.testing.assert_allclose(V.T @ V, np.eye(k), atol=1e-10)
    np.testing.assert_allclose(np.einsum("ij,ij->j", V, G @ V), lam[::-1][:k], rtol=1e-10, atol=1e-10 * lam.max())


def test_one_column():
    X = np.random.default_rng(0).standard_normal((20, 1))
    sub = fit_subspace(X)
    assert sub.k == 1
    np.testing.assert_allclose(sub.score(X), reference(X)[3], atol=1e-12)


def test_unchecked_device_gram_path_matches_the_checked_one_and_backs_out_on_nan():
    """The GPU's one-read-back-per-shard Gram path, run here over numpy (its code is xp-generic)."""
    from scalselect_fast.subspace.backends import NumpyBackend
    from scalselect_fast.subspace.passes import (PassOptions, _gram_shard, _gram_shard_unchecked, StorePass,
                                                 _SingleThreadedBlas)
    from scalselect_fast.subspace.rows import InvalidTracker

    X = decaying(5000, 40, seed=3).astype(np.float32)
    src = open_source(X)
    shift = X[:64].astype(np.float64).mean(0)
    p = StorePass(src, 1200, NumpyBackend(), InvalidTracker(src, drop=False))
    fast = GramAccumulator(40, shift)
    assert _gram_shard_unchecked(p, fast, src.shards[0], PassOptions(verify=False))
    ref = GramAccumulator(40, shift)
    with _SingleThreadedBlas() as blas:
        _gram_shard(p, ref, src.shards[0], PassOptions(record=True, verify=False), blas)
    assert fast.n == ref.n == 5000
    # same float32 chunk products, run with a different BLAS thread count: equal to float32 rounding
    np.testing.assert_allclose(fast.gram, ref.gram, rtol=0, atol=1e-6 * np.abs(ref.gram).max())
    np.testing.assert_allclose(fast.colsum, ref.colsum, rtol=0, atol=1e-6 * np.abs(ref.colsum).max())

    Y = X.copy()
    Y[4321, 7] = np.nan
    bad_src = open_source(Y)
    q = StorePass(bad_src, 1200, NumpyBackend(), InvalidTracker(bad_src, drop=False))
    acc = GramAccumulator(40, shift)
    before = (acc.n, acc.gram.copy(), acc.colsum.copy())
    assert not _gram_shard_unchecked(q, acc, bad_src.shards[0], PassOptions(verify=False))
    assert acc.n == before[0]
    np.testing.assert_array_equal(acc.gram, before[1])
    np.testing.assert_array_equal(acc.colsum, before[2])


def test_small_shards_summed_side_by_side_give_the_sequential_bits(tmp_path, monkeypatch):
    """Shards of one chunk each are summed concurrently (one thread per shard); every shard's
    partial is still formed the same way, so the subspace is bit-identical to summing them one by
    one, and invalid rows are found and reported in row order either way."""
    from scalselect_fast.subspace import passes as S

    X = decaying(9 * 1500 + 7, 48, seed=4).astype(np.float32)
    X[[20, 3100, 9000]] = np.nan
    w = StoreWriter(tmp_path / "s", d=48, dtype="float32")
    for a in range(0, X.shape[0], 1500):
        w.write_shard(X[a:a + 1500], [str(i) for i in range(a, min(a + 1500, X.shape[0]))])
    side = fit_subspace(tmp_path / "s", solver="exact", drop_invalid=True)
    with pytest.raises(InvalidRowsError) as err:
        fit_subspace(tmp_path / "s", solver="exact")
    assert err.value.rows.tolist() == [20]  # the first bad shard in row order, as sequentially
    monkeypatch.setattr(S, "_shards_side_by_side", lambda *a: False)
    seq = fit_subspace(tmp_path / "s", solver="exact", drop_invalid=True)
    np.testing.assert_array_equal(side.components, seq.components)
    np.testing.assert_array_equal(side.singular_values, seq.singular_values)
    assert side.info["invalid_rows"] == seq.info["invalid_rows"] == [20, 3100, 9000]


class _Crash(Exception):
    pass


class _MemoryCheckpoint:
    """A GramCheckpoint kept in memory (through the on-disk array format), that can stop the fit
    after a given number of shards, as a killed process would."""

    def __init__(self, stop_after=None):
        self.saved, self.stop_after, self.calls = None, stop_after, 0

    def load(self, xp):
        from scalselect_fast.subspace.exact import GramProgress

        return None if self.saved is None else GramProgress.from_arrays(self.saved, xp)[0]

    def save(self, progress, last):
        self.saved = progress.to_arrays()
        self.calls += 1
        if self.stop_after is not None and self.calls == self.stop_after:
            raise _Crash


@pytest.mark.parametrize("stop_after", [1, 2, 5, 8])  # 8: after the last shard, before the eigh
def test_checkpointed_gram_pass_resumes_bit_identically(tmp_path, stop_after):
    """A fit stopped after some shards and resumed from its checkpoint equals the uninterrupted fit
    to the last bit, invalid rows found before and after the stop included."""
    X = decaying(7 * 700 + 13, 24, seed=5).astype(np.float32)
    X[[5, 2000, 4500]] = np.inf
    w = StoreWriter(tmp_path / "s", d=24, dtype="float32")
    for a in range(0, X.shape[0], 700):
        w.write_shard(X[a:a + 700], [str(i) for i in range(a, min(a + 700, X.shape[0]))])
    whole = fit_subspace(tmp_path / "s", solver="exact", drop_invalid=True)
    ck = _MemoryCheckpoint(stop_after)
    with pytest.raises(_Crash):
        fit_subspace(tmp_path / "s", solver="exact", drop_invalid=True, checkpoint=ck)
    ck.stop_after = None
    resumed = fit_subspace(tmp_path / "s", solver="exact", drop_invalid=True, checkpoint=ck)
    assert ck.calls == 8  # one save per shard: stop_after before the stop, the rest after it
    np.testing.assert_array_equal(resumed.components, whole.components)
    np.testing.assert_array_equal(resumed.singular_values, whole.singular_values)
    np.testing.assert_array_equal(resumed.mean, whole.mean)
    assert resumed.n == whole.n == X.shape[0] - 3
    assert resumed.info["invalid_rows"] == whole.info["invalid_rows"] == [5, 2000, 4500]


def test_checkpoint_of_other_shards_is_refused(tmp_path):
    X = decaying(3000, 12, seed=6).astype(np.float32)
    w = StoreWriter(tmp_path / "s", d=12, dtype="float32")
    for a in range(0, 3000, 1000):
        w.write_shard(X[a:a + 1000], [str(i) for i in range(a, a + 1000)])
    ck = _MemoryCheckpoint()
    fit_subspace(tmp_path / "s", checkpoint=ck)
    meta = json.loads(str(ck.saved["meta"]))
    meta["shards"] = ["elsewhere"] + meta["shards"][1:]
    ck.saved = {**ck.saved, "meta": np.array(json.dumps(meta))}
    with pytest.raises(SubspaceError, match="checkpoint covers shards"):
        fit_subspace(tmp_path / "s", checkpoint=ck)
