"""Dask fit / score / select (scalselect_fast.distributed) against the single-process run.

Reference: ``scalselect_fast.fit_subspace`` / ``leverage_scores`` / ``top_k`` on the same store in
this process. The cluster is a real ``LocalCluster`` with 2 worker processes (1 thread each), so
tasks, accumulators and subspaces really are pickled between processes.
"""
import json

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

import scalselect_fast as ss  # noqa: E402
from scalselect_fast import distributed as sd  # noqa: E402
from scalselect_fast.cli import main as cli_main  # noqa: E402
from scalselect_fast.store import StoreError, StoreWriter  # noqa: E402
from scalselect_fast.subspace import InvalidRowsError, tree_reduce  # noqa: E402

D = 67
# odd sizes, a tiny shard, and one shard of more than two 8192-row Gram chunks (products run side
# by side in threads on one node, one at a time in a 1-thread worker: the bits must not change)
COUNTS = [1000, 777, 17000, 3, 2100]


def _rows(rng, c):
    # low rank + noise + offset, like pooled features (the offset exercises the shifted sums)
    z = rng.standard_normal((c, 8)) * np.linspace(2, 0.2, 8)
    return (z @ rng.standard_normal((8, D)) + 0.1 * rng.standard_normal((c, D)) + 3.0).astype(np.float32)


def _store(path, dtype="float16", nan_row=None):
    rng = np.random.default_rng(7)
    w = StoreWriter(path, d=D, dtype=dtype)
    for i, c in enumerate(COUNTS):
        x = _rows(rng, c)
        if nan_row is not None and nan_row[0] == i:
            x[nan_row[1], 5] = np.nan
        w.write_shard(x, [f"s{i}-{j}" for j in range(c)])
    return path


@pytest.fixture(scope="module")
def client():
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=40) as cluster, Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return _store(tmp_path_factory.mktemp("dist") / "reps")


def test_tree_reduce_shape_is_fixed():
    assert tree_reduce(list("a"), lambda a, b: a + b) == "a"
    assert tree_reduce(list("abcde"), lambda a, b: f"({a}{b})") == "(((ab)(cd))e)"
    assert tree_reduce(iter("abcdefg"), lambda a, b: f"({a}{b})") == "(((ab)(cd))((ef)g))"
    with pytest.raises(ValueError):
        tree_reduce([], lambda a, b: a)


@pytest.mark.parametrize("opts", [{}, {"standardize": True}, {"l2_normalize": True}, {"k": 5},
                                  {"block_rows": 512}])
def test_fit_is_bit_identical_and_selection_identical(client, store, opts):
    opts = {"block_rows": 16384, **opts}
    sub1 = ss.fit_subspace(store, **opts)
    subd = sd.fit_subspace(store, client, **opts)
    assert subd.k == sub1.k and subd.n == sub1.n and subd.passes == sub1.passes
    # same shift, same blocks, same per-shard sums, same merge tree -> the same bits
    np.testing.assert_array_equal(subd.mean, sub1.mean)
    np.testing.assert_array_equal(subd.energy_curve, sub1.energy_curve)
    np.testing.assert_array_equal(subd.components, sub1.components)
    np.testing.assert_array_equal(subd.singular_values, sub1.singular_values)
    assert subd.info["distributed"]["shards"] == len(COUNTS)

    s1 = ss.leverage_scores(store, sub1, block_rows=opts["block_rows"])
    sdist = sd.leverage_scores(store, subd, client, block_rows=opts["block_rows"])
    # per-row arithmetic is the same; only the BLAS thread count differs (1 per worker here)
    np.testing.assert_allclose(sdist, s1, rtol=1e-12, atol=0)
    budget = 611
    want = ss.top_k(s1, budget)
    idx, vals = sd.select(store, subd, budget, client, block_rows=opts["block_rows"])
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_allclose(vals, s1[want], rtol=1e-12)


def test_fit_does_not_depend_on_task_order(client, store):
    a = sd.fit_subspace(store, client, k=4)
    b = sd.fit_subspace(store, client, k=4)
    np.testing.assert_array_equal(a.components, b.components)


def test_npy_source_and_in_memory_rejected(client, tmp_path):
    rng = np.random.default_rng(3)
    x = _rows(rng, 900)
    np.save(tmp_path / "x.npy", x)
    sub1 = ss.fit_subspace(tmp_path / "x.npy")
    subd = sd.fit_subspace(tmp_path / "x.npy", client)
    np.testing.assert_array_equal(subd.components, sub1.components)
    with pytest.raises(StoreError, match="path"):
        sd.fit_subspace(x, client)


def test_invalid_rows_global_numbers_and_drop(client, tmp_path):
    path = _store(tmp_path / "bad", nan_row=(2, 10))
    bad_row = COUNTS[0] + COUNTS[1] + 10
    with pytest.raises(InvalidRowsError) as ei:
        sd.fit_subspace(path, client)
    assert bad_row in np.asarray(ei.value.rows).tolist()
    assert "s2-10" in str(ei.value)
    sub1 = ss.fit_subspace(path, drop_invalid=True)
    subd = sd.fit_subspace(path, client, drop_invalid=True)
    assert subd.info["invalid_rows"] == sub1.info["invalid_rows"] == [bad_row]
    np.testing.assert_array_equal(subd.components, sub1.components)
    s1 = ss.leverage_scores(path, sub1)
    idx, _ = sd.select(path, subd, 800, client)
    np.testing.assert_array_equal(idx, ss.top_k(s1, 800))
    assert bad_row not in idx


def test_unsupported_options_are_clear(client, store):
    with pytest.raises(ValueError, match="exact"):
        sd.fit_subspace(store, client, solver="randomized")


def test_cli_select_with_dask_scheduler(client, store, tmp_path):
    addr = client.scheduler.address
    assert cli_main(["select", str(store), "--budget", "10%", "--out", str(tmp_path / "one"),
                     "--manifest-format", "jsonl"]) == 0
    assert cli_main(["select", str(store), "--budget", "10%", "--out", str(tmp_path / "dask"),
                     "--manifest-format", "jsonl", "--dask-scheduler", addr]) == 0
    one = (tmp_path / "one" / "selected.txt").read_text()
    dask = (tmp_path / "dask" / "selected.txt").read_text()
    assert one == dask and one.count("\n") == round(0.1 * sum(COUNTS))
    rep = json.loads((tmp_path / "dask" / "report.json").read_text())
    assert rep["executor"]["name"] == "dask" and rep["executor"]["workers"] == 2
    # one manifest schema and one report schema for both executors
    one_rep = json.loads((tmp_path / "one" / "report.json").read_text())
    assert set(rep) == set(one_rep) and set(rep["stability"]) == set(one_rep["stability"])
    m1 = [json.loads(x) for x in (tmp_path / "one" / "manifest.jsonl").read_text().splitlines()]
    md = [json.loads(x) for x in (tmp_path / "dask" / "manifest.jsonl").read_text().splitlines()]
    assert m1 == md and min(r["rank"] for r in md) == 1
    # re-fits with other seeds: not applicable on Dask (no randomized solver there), reported as such
    assert cli_main(["select", str(store), "--budget", "10%", "--out", str(tmp_path / "dask2"), "--no-html",
                     "--stability-seeds", "0,1", "--dask-scheduler", addr]) == 0
    st = json.loads((tmp_path / "dask2" / "report.json").read_text())["stability"]
    assert st["refits"].startswith("not applicable") and st["margin"]["margin"] is not None
    # fit and score as separate commands
    assert cli_main(["fit", str(store), "--out", str(tmp_path / "sub.npz"), "--dask-scheduler", addr]) == 0
    assert cli_main(["score", str(store), "--subspace", str(tmp_path / "sub.npz"),
                     "--out", str(tmp_path / "scores.npy"), "--dask-scheduler", addr]) == 0
    s = np.load(tmp_path / "scores.npy")
    ref = ss.leverage_scores(store, ss.fit_subspace(store))
    np.testing.assert_allclose(s, ref, rtol=1e-12)


def test_single_node_fit_does_not_depend_on_blas_threads(store):
    # the property that makes cluster and single-node bits agree: each Gram chunk product is one
    # single-threaded BLAS call whatever the thread count the process was given
    from threadpoolctl import threadpool_limits

    default = ss.fit_subspace(store)
    with threadpool_limits(limits=1, user_api="blas"):
        one = ss.fit_subspace(store)
    np.testing.assert_array_equal(default.components, one.components)
    np.testing.assert_array_equal(default.energy_curve, one.energy_curve)
