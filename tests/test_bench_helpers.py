"""The benchmark suite's own arithmetic: slope fit, latest-run pick, quality metrics, data generator."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("faiss")

from benchmarks import __main__ as suite_main  # noqa: E402
from benchmarks import bench_quality, bench_scaling  # noqa: E402


def test_loglog_slope_recovers_the_exponent_and_grid_steps():
    pts = [(n, 3e-7 * n ** 1.7) for n in (1e4, 2e4, 4e4, 8e4)]
    assert bench_scaling.loglog_slope(pts) == pytest.approx(1.7)
    assert np.isnan(bench_scaling.loglog_slope(pts[:1]))
    assert bench_scaling.size_grid(10_000, 40_000, 2 ** 0.5) == [10_000, 14_142, 20_000, 28_284, 40_000]


def test_latest_run_and_markdown_table():
    rows = [{"run_id": "a", "x": "1"}, {"run_id": "b", "x": "2"}, {"run_id": "b", "x": "3|4"}]
    assert [r["x"] for r in suite_main.latest(rows)] == ["2", "3|4"]
    assert suite_main.latest([{"timestamp": "t1", "v": 1}, {"timestamp": "t2", "v": 2}]) == [{"timestamp": "t2", "v": 2}]
    table = suite_main.md_table(suite_main.latest(rows))
    assert "| x |" in table and "3\\|4" in table and "run_id" not in table


def test_structured_data_has_the_planted_parts():
    x, mode, group = bench_quality.structured(4000, 32, seed=1)
    assert x.shape == (4000, 32) and x.dtype == np.float32
    rare_groups = np.unique(group[mode >= 0])
    assert rare_groups.size == 5 * 10 and set(mode[mode >= 0].tolist()) == set(range(5))
    assert 4000 - np.unique(group).size == 600           # 15% near-duplicates
    i = np.nonzero(np.bincount(group) > 1)[0][0]
    members = np.nonzero(group == i)[0]
    assert np.abs(x[members[0]] - x[members[1]]).max() < 0.02  # copies are near-identical


def test_quality_metrics_against_direct_computation():
    x, mode, group = bench_quality.structured(1500, 32, seed=2)
    k, vk = bench_quality.energy_k(x)
    ac = x.astype(np.float64) - x.mean(0)
    ac_norm = float(np.linalg.norm(ac @ vk) ** 2)
    everything = bench_quality.metrics(x, mode, group, np.arange(1500), k, vk, ac_norm)
    assert everything["subspace"] == pytest.approx(1.0) and everything["max_dist"] < 1e-2
    assert everything["rare_recall"] == 1.0 and everything["rare_hit"] == 1.0
    assert everything["dup_rate"] == pytest.approx(1 - np.unique(group).size / 1500)
    sel = np.random.default_rng(0).choice(1500, 100, replace=False)
    m = bench_quality.metrics(x, mode, group, sel, k, vk, ac_norm)
    d = np.sqrt(((x[:, None, :].astype(np.float64) - x[None, sel, :]) ** 2).sum(-1)).min(1)
    assert m["mean_dist"] == pytest.approx(d.mean(), rel=1e-4) and m["max_dist"] == pytest.approx(d.max(), rel=1e-4)
    xs = x[sel].astype(np.float64) - x[sel].mean(0)
    vs = np.linalg.svd(xs, full_matrices=False)[2][:k].T
    assert m["subspace"] == pytest.approx(np.linalg.norm(ac @ vs) ** 2 / ac_norm, rel=1e-9)
    assert 0 < m["subspace"] <= 1 + 1e-9


def test_csv_verdicts_count_floor_rows_by_status_or_verdict():
    new = {"core.csv": [{"metric": "speed-up", "status": "FAIL"}, {"metric": "slope", "status": "PASS"},
                        {"metric": "baseline s", "status": ""}],
           "pool.csv": [{"variant": "triton", "verdict": "PASS"}],
           "data.csv": [{"container": "json"}]}
    assert suite_main.csv_verdicts(new) == ["core.csv: 1 PASS, 1 FAIL (speed-up)", "pool.csv: 1 PASS, 0 FAIL"]


def test_append_csv_widens_one_file_instead_of_leaving_dated_leftovers(tmp_path):
    import csv

    from benchmarks._suite import append_csv

    path = tmp_path / "topic.csv"
    append_csv(path, [{"a": "1", "b": "2"}])
    append_csv(path, [{"a": "3", "b": "4", "c": "5"}])   # a new column: rewritten with the union
    append_csv(path, [{"a": "6"}])                       # a missing column: left blank
    assert sorted(p.name for p in tmp_path.iterdir()) == ["topic.csv"]
    with open(path, newline="") as fh:
        r = csv.DictReader(fh)
        assert r.fieldnames == ["a", "b", "c"]
        assert list(map(dict, r)) == [{"a": "1", "b": "2", "c": ""}, {"a": "3", "b": "4", "c": "5"},
                                      {"a": "6", "b": "", "c": ""}]
