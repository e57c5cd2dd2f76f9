"""Baselines: each fast path against a slow, obvious reference defined here; seeds; budgets; errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from scalselect_fast import baselines
from scalselect_fast.baselines import cluster_balanced, facility_location, kcenter, semdedup
from scalselect_fast.store import StoreWriter, open_source

pytest.importorskip("faiss")


def gaussian(n, d, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def planted_duplicates(groups=40, copies=3, d=16, seed=0):
    """``groups`` well-separated base rows, each with ``copies`` near-exact copies (noise 1e-4)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((groups, d)).astype(np.float32)
    rows = np.repeat(base, copies + 1, axis=0)
    rows[np.arange(rows.shape[0]) % (copies + 1) != 0] += 1e-4 * rng.standard_normal(
        (groups * copies, d)).astype(np.float32)
    perm = rng.permutation(rows.shape[0])
    return rows[perm], np.repeat(np.arange(groups), copies + 1)[perm]


# ------------------------------------------------------------------------------------------------
# slow references
# ------------------------------------------------------------------------------------------------
def kcenter_naive(x, budget, start):
    x = x.astype(np.float64)
    dist = np.linalg.norm(x[:, None, :] - x[None, :, :], axis=2)  # (n, n), O(n²) memory: small n
    chosen = [start]
    for _ in range(budget - 1):
        mind = dist[:, chosen].min(axis=1)
        mind[chosen] = -1
        chosen.append(int(np.argmax(mind)))
    return np.array(chosen)


def covering_radius(x, chosen):
    x = x.astype(np.float64)
    return np.linalg.norm(x[:, None, :] - x[None, chosen, :], axis=2).min(axis=1).max()


def fl_similarity(x):
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    return np.clip((1.0 + xn @ xn.T) / 2.0, 0.0, 1.0).astype(np.float32)


def fl_naive_greedy(s, budget):
    """Plain greedy: every round evaluates every row's marginal gain; first maximum wins."""
    n = s.shape[0]
    cover = np.zeros(n, dtype=np.float32)
    out = []
    for _ in range(budget):
        gains = np.array([float(np.add.reduce(np.maximum(s[j] - cover, np.float32(0)))) for j in range(n)])
        gains[out] = -1.0
        j = int(np.argmax(gains))
        out.append(j)
        cover = np.maximum(cover, s[j])
    return np.array(out)


def fl_objective(s, chosen):  # float64 here: the objective, not the greedy's gains
    return float(s[:, chosen].max(axis=1).sum(dtype=np.float64))


# ------------------------------------------------------------------------------------------------
# registry, budgets, determinism (all methods)
# ------------------------------------------------------------------------------------------------
def test_registry_rejects_unknown_method():
    with pytest.raises(ValueError, match="unknown baseline 'nope'.*kcenter"):
        baselines.get("nope")


@pytest.mark.parametrize("method", baselines.METHODS)
def test_budget_edges_and_determinism(method):
    x = gaussian(157, 12, seed=1)  # odd, non-power-of-two shape
    a = baselines.select(method, x, "16%", seed=3)
    b = baselines.select(method, x, 0.16, seed=3)
    assert a.dtype == np.int64 and a.shape == (25,)
    assert np.array_equal(a, b), "same seed must give the same selection"
    assert np.unique(a).size == a.size and a.min() >= 0 and a.max() < 157
    one = baselines.select(method, x, 1, seed=0)
    assert one.shape == (1,)
    full = baselines.select(method, x, 157, seed=0)
    assert np.array_equal(np.sort(full), np.arange(157)), "budget = N selects every row once"
    for bad in (0, 158, -1):
        with pytest.raises(ValueError):
            baselines.select(method, x, bad)


@pytest.mark.parametrize("method", baselines.METHODS)
def test_nan_rows_are_named(method):
    x = gaussian(60, 8)
    x[17, 3] = np.nan
    if method == "random":  # never reads rows, so it cannot see them
        assert baselines.select(method, x, 5).shape == (5,)
        return
    with pytest.raises(ValueError, match=r"rows \[17\].*NaN"):
        baselines.select(method, x, 5)


@pytest.mark.parametrize("method", baselines.METHODS)
def test_fp16_npy_and_store_sources_agree_with_array(method, tmp_path):
    x16 = gaussian(120, 10, seed=2).astype(np.float16)
    np.save(tmp_path / "x.npy", x16)
    w = StoreWriter(tmp_path / "store", d=10, dtype="float16")
    w.write_shard(x16[:50], [f"a{i}" for i in range(50)])
    w.write_shard(x16[50:], [f"b{i}" for i in range(70)])
    ref = baselines.select(method, x16.astype(np.float32), 15, seed=4)
    assert np.array_equal(baselines.select(method, str(tmp_path / "x.npy"), 15, seed=4), ref)
    assert np.array_equal(baselines.select(method, tmp_path / "store", 15, seed=4), ref)


def test_random_is_a_seeded_prefix():
    x = gaussian(500, 3)
    a = baselines.select("random", x, 50, seed=7)
    assert np.array_equal(a, np.random.default_rng(7).permutation(500)[:50])
    assert np.array_equal(baselines.select("random", x, 20, seed=7), a[:20])
    assert not np.array_equal(baselines.select("random", x, 50, seed=8), a)


# ------------------------------------------------------------------------------------------------
# k-center
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_rows", [7, 64, 8192])
def test_kcenter_matches_naive_farthest_point(block_rows):
    x = gaussian(211, 9, seed=5) * np.linspace(0.5, 3.0, 9, dtype=np.float32)
    got = kcenter.select(x, 30, start=13, block_rows=block_rows)
    ref = kcenter_naive(x, 30, start=13)
    assert np.array_equal(got, ref)
    assert covering_radius(x, got) == pytest.approx(covering_radius(x, ref))


def test_kcenter_seed_picks_start_and_l2_normalize_matches_naive_on_unit_rows():
    x = gaussian(150, 6, seed=6)
    s = int(np.random.default_rng(11).integers(150))
    assert kcenter.select(x, 10, seed=11)[0] == s
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert np.array_equal(kcenter.select(x * 5.0, 20, start=3, l2_normalize=True),
                          kcenter_naive(xn, 20, start=3))


def test_kcenter_with_more_centers_than_distinct_rows_fills_lowest_indices():
    x = np.repeat(gaussian(4, 5, seed=7), 3, axis=0)   # 4 distinct rows, each 3 times
    got = kcenter.select(x, 7, start=0)
    # 4 distinct points covered first, then everything is at distance 0: lowest unchosen indices
    assert len({tuple(r) for r in x[got[:4]]}) == 4
    assert got[4:].tolist() == sorted(set(range(12)) - set(got[:4].tolist()))[:3]


# ------------------------------------------------------------------------------------------------
# facility location
# ------------------------------------------------------------------------------------------------
def test_facility_location_lazy_greedy_matches_naive_greedy():
    x = gaussian(173, 8, seed=8)
    got = facility_location.select(x, 25, block_rows=50)
    s = fl_similarity(x)
    ref = fl_naive_greedy(s, 25)
    assert np.array_equal(got, ref)
    assert fl_objective(s, got) == pytest.approx(fl_objective(s, ref), rel=1e-12)
    # greedy beats random subsets of the same size on its own objective
    rng = np.random.default_rng(0)
    assert all(fl_objective(s, got) > fl_objective(s, rng.choice(173, 25, replace=False)) for _ in range(20))


def test_facility_location_ties_go_to_lower_index():
    x = np.repeat(gaussian(5, 4, seed=9), 2, axis=0)   # rows 2i and 2i+1 identical
    got = facility_location.select(x, 5)
    assert np.array_equal(got, fl_naive_greedy(fl_similarity(x), 5))
    assert all(i % 2 == 0 for i in got), "of two identical rows the lower index is taken"


def test_facility_location_knn_matches_naive_greedy_on_the_knn_graph():
    x = gaussian(140, 7, seed=10)
    k = 9
    s = fl_similarity(x)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    nbrs = np.argsort(-(xn @ xn.T), axis=1, kind="stable")[:, :k]
    mask = np.zeros_like(s, dtype=bool)
    mask[np.repeat(np.arange(140), k), nbrs.reshape(-1)] = True
    mask[np.arange(140), np.arange(140)] = True
    # client i is covered by candidate j only if j is among i's k nearest: column j of S·mask
    sparse = np.where(mask, s, 0.0).T.copy()  # row j = similarities j offers to its clients
    got = facility_location.select(x, 20, knn=k)
    assert np.array_equal(got, fl_naive_greedy(sparse, 20))


def test_facility_location_refuses_with_an_estimate_and_offers_options():
    x = gaussian(400, 8)
    with pytest.raises(facility_location.TooLargeError, match=r"400x400.*KiB.*max_n=M.*knn=K"):
        facility_location.select(x, 10, max_bytes=1000)
    # the two ways out work under the same limit
    sub = facility_location.select(x, 10, max_n=15, max_bytes=1000, seed=2)
    rows = np.sort(np.random.default_rng(2).choice(400, 15, replace=False))
    assert set(sub.tolist()) <= set(rows.tolist())
    assert np.array_equal(sub, rows[fl_naive_greedy(fl_similarity(x[rows]), 10)])
    assert facility_location.select(x, 10, knn=5, max_bytes=1000).shape == (10,)
    with pytest.raises(ValueError, match="max_n=5 is smaller than the budget 10"):
        facility_location.select(x, 10, max_n=5)
    with pytest.raises(ValueError, match="not both"):
        facility_location.select(x, 10, max_n=50, knn=5)


# ------------------------------------------------------------------------------------------------
# SemDedup
# ------------------------------------------------------------------------------------------------
def test_max_prior_similarity_matches_double_loop():
    x = gaussian(97, 6, seed=12)
    xn = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    ref = np.array([-np.inf] + [max(float(xn[i] @ xn[j]) for i in range(j)) for j in range(1, 97)])
    for block in (5, 32, 2048):
        np.testing.assert_allclose(semdedup.max_prior_similarity(xn, block), ref, rtol=0, atol=1e-6)


def semdedup_naive(x, assign, dist, eps, keep):
    """Per cluster: order by distance, drop j if cos(j, any earlier) > 1 - eps; survivors first,
    then the dropped rows by their largest similarity to an earlier row, ascending."""
    n = x.shape[0]
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    key = -dist if keep == "hard" else dist
    dup = np.zeros(n, dtype=bool)
    prior = np.full(n, -np.inf)
    for c in np.unique(assign):
        members = sorted(np.nonzero(assign == c)[0], key=lambda i: (key[i], i))
        for pos, j in enumerate(members):
            sims = [float(xn[i] @ xn[j]) for i in members[:pos]]
            dup[j] = any(v > 1 - eps for v in sims)
            prior[j] = max(sims, default=-np.inf)
    # survivors by key, then duplicates least similar first
    return sorted(range(n), key=lambda i: (dup[i], prior[i] if dup[i] else 0.0, key[i], i)), dup


@pytest.mark.parametrize("keep", ["hard", "easy"])
def test_semdedup_fill_order_matches_naive_for_any_clustering(keep):
    x, _ = planted_duplicates(groups=15, copies=2, d=6, seed=13)
    x = x + 0.3 * gaussian(*x.shape, seed=14) * (np.arange(x.shape[0]) % 2)[:, None]  # some real dups
    rng = np.random.default_rng(15)
    assign = rng.integers(0, 4, x.shape[0])
    dist = rng.random(x.shape[0])
    order, dup = semdedup.fill_order(open_source(x), assign, dist, eps=0.02, keep=keep, block_rows=7)
    ref_order, ref_dup = semdedup_naive(x.astype(np.float64), assign, dist, 0.02, keep)
    assert np.array_equal(dup, ref_dup) and dup.any() and not dup.all()
    assert order.tolist() == ref_order


def test_semdedup_keeps_one_per_duplicate_group():
    x, group = planted_duplicates(groups=40, copies=3, d=16, seed=16)
    got = semdedup.select(x, 40, n_clusters=6, seed=0)
    assert np.unique(group[got]).size == 40, "exactly one member of every duplicate group"
    # random at the same budget almost surely repeats groups: the baseline is doing something
    assert np.unique(group[baselines.select("random", x, 40, seed=0)]).size < 40


# ------------------------------------------------------------------------------------------------
# cluster-balanced
# ------------------------------------------------------------------------------------------------
def allocation_naive(sizes, budget):
    alloc = np.zeros(len(sizes), dtype=int)
    for _ in range(budget):  # one at a time to the least-served cluster with room
        room = [c for c in range(len(sizes)) if alloc[c] < sizes[c]]
        c = min(room, key=lambda c: (alloc[c], -sizes[c], c))
        alloc[c] += 1
    return alloc


def test_balanced_allocation_matches_one_at_a_time_reference():
    rng = np.random.default_rng(17)
    for _ in range(50):
        sizes = rng.integers(0, 30, rng.integers(1, 12))
        budget = int(rng.integers(0, sizes.sum() + 1))
        assert cluster_balanced.balanced_allocation(sizes, budget).tolist() == \
            allocation_naive(sizes, budget).tolist()


@pytest.mark.parametrize("order", ["nearest", "farthest"])
def test_cluster_balanced_pick_matches_naive(order):
    rng = np.random.default_rng(18)
    assign = rng.integers(0, 6, 200)
    assign[assign == 5] = 4            # an empty cluster id
    dist = rng.random(200)
    got = cluster_balanced.pick(assign, dist, 37, order)
    alloc = allocation_naive(np.bincount(assign, minlength=6), 37)
    ref = []
    for c in range(6):
        members = sorted(np.nonzero(assign == c)[0], key=lambda i: (dist[i] if order == "nearest" else -dist[i], i))
        ref += members[:alloc[c]]
    assert sorted(got.tolist()) == sorted(ref)


def test_cluster_balanced_spreads_budget_over_planted_clusters():
    rng = np.random.default_rng(19)
    sizes = [25, 60, 90, 120, 150]
    centers = rng.standard_normal((5, 24)) * 10
    x = np.concatenate([c + rng.standard_normal((m, 24)) for c, m in zip(centers, sizes)]).astype(np.float32)
    label = np.repeat(np.arange(5), sizes)
    got = cluster_balanced.select(x, 145, n_clusters=5, seed=0, nredo=10)
    # the small cluster is taken whole, the other four share the rest evenly
    assert np.bincount(label[got], minlength=5).tolist() == [25, 30, 30, 30, 30]
    # within a cluster the rows nearest the (normalised) cluster mean come first
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    for c in range(1, 5):
        m = np.nonzero(label == c)[0]
        mu = xn[m].mean(0)
        mu /= np.linalg.norm(mu)
        nearest = set(m[np.argsort(-(xn[m] @ mu))[:30]].tolist())
        assert len(nearest & set(got.tolist())) >= 27


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def test_cli_baseline_writes_indices_ids_and_report(tmp_path):
    from scalselect_fast.cli import main

    x = gaussian(90, 5, seed=20)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out"
    rc = main(["baseline", "--method", "facility_location", str(tmp_path / "x.npy"), "--budget", "10%",
               "--out", str(out), "--seed", "3", "--opt", "knn=6"])
    assert rc == 0
    idx = np.load(out / "indices.npy")
    assert np.array_equal(idx, facility_location.select(x, 9, knn=6))
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "facility_location" and report["budget"] == 9 and report["n"] == 90
    assert report["options"] == {"knn": 6, "device": "cpu"} and report["seed"] == 3
    assert (out / "selected_ids.txt").read_text().split() == [str(i) for i in idx]
    with pytest.raises(SystemExit):
        main(["baseline", "--method", "nope", str(tmp_path / "x.npy"), "--budget", "3", "--out", str(out)])


def test_cli_baseline_errors_are_one_line(tmp_path, capsys):
    from scalselect_fast.cli import main

    np.save(tmp_path / "x.npy", gaussian(300, 4))
    rc = main(["baseline", "--method", "facility_location", str(tmp_path / "x.npy"), "--budget", "10",
               "--out", str(tmp_path / "o"), "--opt", "max_bytes=1000"])
    err = capsys.readouterr().err
    assert rc == 2 and "300x300" in err and "max_n" in err and "Traceback" not in err
    assert main(["baseline", "--method", "random", str(tmp_path / "x.npy"), "--budget", "301",
                 "--out", str(tmp_path / "o")]) == 2
    assert main(["baseline", "--method", "random", str(tmp_path / "missing.npy"), "--budget", "3",
                 "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------
# faiss device selection (faiss-gpu optional)
# ------------------------------------------------------------------------------------------------
def _faiss_gpus() -> int:
    import faiss

    return int(getattr(faiss, "get_num_gpus", lambda: 0)())


@pytest.mark.skipif(_faiss_gpus() > 0, reason="checks the behaviour without faiss-gpu")
def test_faiss_cuda_without_faiss_gpu_is_a_clear_error_and_auto_falls_back(tmp_path, capsys):
    from scalselect_fast.baselines._faiss import resolve_faiss_device
    from scalselect_fast.cli import main
    from scalselect_fast.gpu import DeviceError

    with pytest.raises(DeviceError, match="--device cpu"):
        resolve_faiss_device("cuda")
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_faiss_device("tpu")
    assert resolve_faiss_device("auto") == resolve_faiss_device(None) == "cpu"
    x = gaussian(300, 8)
    with pytest.raises(DeviceError, match="faiss"):
        cluster_balanced.select(x, 30, n_clusters=5, device="cuda")
    np.testing.assert_array_equal(cluster_balanced.select(x, 30, n_clusters=5, device="auto"),
                                  cluster_balanced.select(x, 30, n_clusters=5))
    np.save(tmp_path / "x.npy", x)
    for method in ("semdedup", "kcenter"):
        rc = main(["baseline", "--method", method, str(tmp_path / "x.npy"), "--budget", "10", "--out",
                   str(tmp_path / method), "--device", "cuda"])
        assert rc == 2 and "--device cpu" in capsys.readouterr().err
    assert main(["baseline", "--method", "semdedup", str(tmp_path / "x.npy"), "--budget", "10", "--out",
                 str(tmp_path / "auto"), "--device", "auto"]) == 0
    report = json.loads((tmp_path / "auto" / "report.json").read_text())
    assert report["options"]["device"] == "auto"


@pytest.mark.skipif(_faiss_gpus() == 0, reason="needs faiss-gpu and a GPU")
def test_faiss_gpu_gives_the_cpu_results():
    x, _ = planted_duplicates(groups=60, copies=2, d=32)
    # exact flat search: the same neighbours (well-separated data, so no float ties)
    a = facility_location.select(x, 40, knn=8)
    b = facility_location.select(x, 40, knn=8, device="cuda")
    np.testing.assert_array_equal(a, b)
    # k-means: same seeded algorithm; the planted groups are found either way
    ca = cluster_balanced.select(x, 60, n_clusters=60, nredo=3)
    cb = cluster_balanced.select(x, 60, n_clusters=60, nredo=3, device="cuda")
    assert len(set(ca.tolist()) & set(cb.tolist())) >= 0.9 * 60
