"""`scalselect fit | score | select` end to end, in-process, in a temp directory."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from scalselect_fast import cli
from scalselect_fast.store import StoreWriter
from scalselect_fast.subspace import Subspace


def reference_selection(X, energy, m):
    A = X.astype(np.float64) - X.astype(np.float64).mean(0)
    U, S, _ = np.linalg.svd(A, full_matrices=False)
    k = int(np.flatnonzero(np.cumsum(S ** 2) >= energy * (S ** 2).sum() * (1 - 1e-9))[0] + 1)
    lev = (U[:, :k] ** 2).sum(1)
    return k, lev, np.array(sorted(range(len(lev)), key=lambda i: (-lev[i], i))[:m])


@pytest.fixture
def reps(tmp_path):
    rng = np.random.default_rng(0)
    X = (rng.standard_normal((1500, 24)) * np.arange(1, 25) ** -0.8 + 1.0).astype(np.float16)
    path = tmp_path / "reps.npy"
    np.save(path, X)
    return path, X


def test_fit_score_select(tmp_path, reps, capsys):
    path, X = reps
    k_ref, lev_ref, sel_ref = reference_selection(X, 0.9, 240)
    assert cli.main(["fit", str(path), "--out", str(tmp_path / "sub.npz")]) == 0
    sub = Subspace.load(tmp_path / "sub.npz")
    assert sub.k == k_ref
    assert cli.main(["score", str(path), "--subspace", str(tmp_path / "sub.npz"),
                     "--out", str(tmp_path / "scores.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "scores.npy"), lev_ref, atol=2e-6)
    out = tmp_path / "sel"
    assert cli.main(["select", str(path), "--budget", "16%", "--out", str(out), "--block-rows", "333"]) == 0
    printed = capsys.readouterr().out
    assert "selected 240 of 1500 samples" in printed and f"k={k_ref}" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["subspace"]["k"] == k_ref and report["n_selected"] == 240 and report["n_samples"] == 1500
    assert report["subspace"]["solver"] == "exact" and report["subspace"]["passes"] == 1
    assert len(report["spectrum"]["singular_values"]) == 24
    assert {"fit", "score", "select", "stability", "write"} <= set(report["timings"])
    assert report["executor"]["native_backend"] in ("native", "python")
    t = pq.read_table(out / "manifest.parquet").to_pydict()
    assert t["id"][:3] == ["0", "1", "2"] and len(t["id"]) == 1500
    kept = np.flatnonzero(t["kept"])
    np.testing.assert_array_equal(np.sort(kept), np.sort(sel_ref))
    ranks = np.array(t["rank"])
    np.testing.assert_array_equal(np.argsort(ranks)[:240], sel_ref)  # rank 1.. follows the selection order
    assert ranks.min() == 1 and ranks[sel_ref[0]] == 1 and sorted(ranks) == list(range(1, 1501))
    assert t["index"] == list(range(1500)) and set(t["shard"]) == {"reps.npy"} and t["row"] == list(range(1500))
    assert (out / "selected.txt").read_text().split()[:3] == [str(i) for i in sel_ref[:3]]
    np.testing.assert_allclose(np.load(out / "scores.npy"), lev_ref, atol=2e-6)


@pytest.mark.parametrize("budget,count", [("100", 100), ("0.16", 240), ("16%", 240)])
def test_select_budgets_jsonl_and_reuse(tmp_path, reps, budget, count):
    path, X = reps
    assert cli.main(["fit", str(path), "--out", str(tmp_path / "sub.npz"), "--k", "4"]) == 0
    out = tmp_path / "sel"
    assert cli.main(["select", str(path), "--budget", budget, "--out", str(out), "--subspace",
                     str(tmp_path / "sub.npz"), "--manifest-format", "jsonl"]) == 0
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 1500 and sum(r["kept"] for r in rows) == count
    report = json.loads((out / "report.json").read_text())
    assert report["subspace"]["k"] == 4 and report["subspace"]["reused_from"].endswith("sub.npz")


def test_select_store_with_invalid_rows(tmp_path):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((400, 8)).astype(np.float32)
    X[[5, 250]] = np.nan
    w = StoreWriter(tmp_path / "store", d=8, dtype="float32")
    w.write_shard(X[:200], [f"a{i}" for i in range(200)])
    w.write_shard(X[200:], [f"b{i}" for i in range(200)])
    code = cli.main(["select", str(tmp_path / "store"), "--budget", "10%", "--out", str(tmp_path / "o")])
    assert code == 2
    assert not (tmp_path / "o" / "report.json").exists()
    assert cli.main(["select", str(tmp_path / "store"), "--budget", "10%", "--out", str(tmp_path / "o"),
                     "--drop-invalid", "--solver", "randomized"]) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["invalid_rows"] == {"count": 2, "rows": [5, 250], "ids": ["a5", "b50"], "dropped": True}
    assert report["subspace"]["n"] == 398 and report["subspace"]["solver"] == "randomized"
    assert report["n_valid"] == 398 and report["skip_reasons"] == {"invalid_row": 2}
    t = pq.read_table(tmp_path / "o" / "manifest.parquet").to_pydict()
    assert t["score"][5] is None and t["rank"][250] is None and not t["kept"][5]
    assert t["skip_reason"][5].startswith("invalid_row") and t["skip_reason"][6] is None
    assert t["id"][200] == "b0" and t["shard"][200] != t["shard"][0] and t["row"][200] == 0
    # ranks are 1-based over the rows with a score
    assert sorted(r for r in t["rank"] if r is not None) == list(range(1, 399))


def test_clear_errors(tmp_path, reps, capsys):
    path, X = reps
    assert cli.main(["fit", str(tmp_path / "nope.npy"), "--out", str(tmp_path / "s.npz")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert cli.main(["select", str(path), "--budget", "0", "--out", str(tmp_path / "o")]) == 2
    assert "at least 1 row" in capsys.readouterr().err
    assert cli.main(["select", str(path), "--budget", "2000", "--out", str(tmp_path / "o")]) == 2
    assert "only 1500 are available" in capsys.readouterr().err
    assert cli.main(["fit", str(path), "--out", str(tmp_path / "s.npz"), "--energy", "1.5"]) == 2
    assert "energy must be in (0, 1]" in capsys.readouterr().err
    assert cli.main(["fit", str(path), "--out", str(tmp_path / "s.npz"), "--k", "100"]) == 2
    assert "k=100 exceeds" in capsys.readouterr().err


def test_select_on_bundled_demo_reps(tmp_path, capsys):
    from importlib import resources

    from scalselect_fast.assets.make_demo_reps import make

    path = resources.files("scalselect_fast") / "assets" / "demo_reps.npy"
    np.testing.assert_array_equal(np.load(path), make())  # the committed file is what the script makes
    assert cli.main(["select", str(path), "--budget", "16%", "--out", str(tmp_path / "o")]) == 0
    assert "selected 320 of 2000 samples" in capsys.readouterr().out
