"""SubspaceAccumulator (scalselect_fast.subspace.stream, the streaming fit API): batch-order independence, equality with the core fit, pickling,
provenance through save/load."""
import pickle

import numpy as np
import pytest

pytest.importorskip("scalselect_fast.subspace")  # the core engine the accumulator wraps

import scalselect_fast as ss  # noqa: E402
from scalselect_fast.subspace import SubspaceError  # noqa: E402


def _data(n=1203, d=37, seed=0):
    rng = np.random.default_rng(seed)
    # a known decaying spectrum plus an offset so centring matters
    A = rng.standard_normal((n, d)) * np.geomspace(10, 0.1, d) + 5.0
    return A.astype(np.float32)


def _reference_leverage(X, energy):
    """Dense float64 SVD of the centred matrix: the definition."""
    Xc = X.astype(np.float64) - X.astype(np.float64).mean(0)
    U, s, _ = np.linalg.svd(Xc, full_matrices=False)
    cum = np.cumsum(s ** 2) / np.sum(s ** 2)
    k = int(np.searchsorted(cum, energy * (1 - 1e-9)) + 1)
    return k, np.einsum("ij,ij->i", U[:, :k], U[:, :k])


def test_matches_dense_svd_and_batch_order_does_not_matter():
    X = _data()
    k_ref, lev_ref = _reference_leverage(X, 0.9)
    splits = np.array_split(np.arange(X.shape[0]), 7)
    subs = []
    for perm in ([0, 1, 2, 3, 4, 5, 6], [6, 2, 0, 5, 1, 4, 3]):
        sel = ss.SubspaceAccumulator(energy=0.9)
        for i in perm:
            sel.partial_fit(X[splits[i]])
        assert sel.n_samples_seen_ == X.shape[0]
        subs.append(sel.finalize())
    a, b = subs
    assert a.k == b.k == k_ref
    np.testing.assert_allclose(a.score(X), b.score(X), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(a.score(X), lev_ref, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(a.score(X).sum(), a.k, rtol=1e-6)
    # and the core engine's exact fit on the concatenation gives the same subspace
    core = ss.fit_subspace(X, energy=0.9, solver="exact")
    assert core.k == a.k
    np.testing.assert_allclose(core.score(X), a.score(X), rtol=1e-5, atol=1e-9)


def test_merge_equals_single_stream_and_one_row_batches():
    X = _data(n=97, d=11, seed=1)
    one = ss.SubspaceAccumulator(k=3)
    for row in X:
        one.partial_fit(row[None, :])
    left, right = ss.SubspaceAccumulator(k=3), ss.SubspaceAccumulator(k=3)
    left.partial_fit(X[:40])
    right.partial_fit(X[40:])
    merged = left.merge(right).finalize()
    np.testing.assert_allclose(merged.score(X), one.finalize().score(X), rtol=1e-6, atol=1e-10)


def test_pickle_and_save_keep_scores_and_provenance(tmp_path):
    X = _data(n=300, d=16, seed=2)
    prov = {"model": "/models/llava-1.5-7b-hf", "layer": 0, "threshold": 0.9, "data_fingerprint": "abc"}
    sel = ss.SubspaceAccumulator(energy=0.8, provenance=prov)
    sel.partial_fit(X[:150]).partial_fit(X[150:])
    sub = sel.finalize()
    clone = pickle.loads(pickle.dumps(sub))
    np.testing.assert_array_equal(clone.score(X), sub.score(X))
    sub.save(tmp_path / "subspace.npz")
    back = ss.Subspace.load(tmp_path / "subspace.npz")
    assert back.provenance == prov
    np.testing.assert_array_equal(back.score(X), sub.score(X))
    # scoring is stateless: scoring a subset gives the same numbers as inside a larger call
    np.testing.assert_array_equal(back.score(X[7:9]), back.score(X)[7:9])


def test_bad_input_is_refused_clearly():
    sel = ss.SubspaceAccumulator()
    with pytest.raises(SubspaceError, match="2-D"):
        sel.partial_fit(np.zeros(5, np.float32))
    X = np.ones((4, 3), np.float32)
    X[2, 1] = np.nan
    with pytest.raises(SubspaceError, match=r"NaN/inf \(rows \[2\]\)"):
        sel.partial_fit(X)
    sel.partial_fit(np.ones((4, 3), np.float32))
    with pytest.raises(SubspaceError, match="width 4"):
        sel.partial_fit(np.ones((2, 4), np.float32))
    with pytest.raises(SubspaceError, match="no batches"):
        ss.SubspaceAccumulator().finalize()
    with pytest.raises(ValueError, match="randomized"):
        ss.SubspaceAccumulator(solver="randomized")
    with pytest.raises(SubspaceError, match="energy"):
        ss.SubspaceAccumulator(energy=1.5)


def test_the_former_selector_alias_is_gone():
    """One name, one meaning: ``Selector`` was removed at 0.1.0 (use ``SubspaceAccumulator``)."""
    assert not hasattr(ss, "Selector") and "Selector" not in ss.__all__
    import scalselect_fast.subspace.stream as stream

    assert stream.__all__ == ["SubspaceAccumulator"] and not hasattr(stream, "Selector")

