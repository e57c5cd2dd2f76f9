"""The one selection job (scalselect_fast.selection): selections pinned to those made before the
writers were merged, the one manifest schema, the commit protocol, and the store-only report."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from scalselect_fast import cli, selection
from scalselect_fast.selection import MANIFEST_SCHEMA, RANK_BASE, run_selection

ROOT = Path(__file__).resolve().parents[1]
DEMO_REPS = ROOT / "scalselect_fast" / "assets" / "demo_reps.npy"

# sha256 of selected.txt written by `scoring.run_selection` before it became selection.run_selection
# (commit a7ba6ae), on the bundled demo representations and on the benchmarks' synthetic store
PINNED_DEMO = {"16%": ("8cb44479f4536f2223cd782c727f1a2c7cca9d6e79e845b05297f2f03dcd187a", 320),
               "5%": ("ecb16adf10d49f0eac35d3b30a8988a80f054baeba3542cc57309a852cd9cc0b", 100),
               "30%": ("c76ea08a8efa85341881b40dc2f99ef4401be4068d11f5b6bb28837eab07cae3", 600)}
PINNED_BENCH = {"16%": "9b96b16cd5674399d267d919fd3bbe63e4cf43c323531494d7c977336b034b63",
                "1000": "cb1778d3fbe3a4fd64d802e81363e086fbba5935a35b64fcb25e64fcf63a2f2b"}


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("budget", sorted(PINNED_DEMO))
def test_demo_selection_is_unchanged(tmp_path, budget):
    rep = run_selection(DEMO_REPS, tmp_path / "o", budget, html=False)
    sha, count = PINNED_DEMO[budget]
    assert rep["n_selected"] == count and _sha(tmp_path / "o" / "selected.txt") == sha


@pytest.fixture(scope="module")
def bench_store(tmp_path_factory):
    sys.path.insert(0, str(ROOT))
    from benchmarks.make_large_store import make_store

    path = tmp_path_factory.mktemp("bench") / "store"
    make_store(path, n=30000, d=96, dtype="float16", shard_rows=7000, verbose=False)
    return path


@pytest.mark.parametrize("solver", ["exact", "randomized"])
@pytest.mark.parametrize("budget", sorted(PINNED_BENCH))
def test_benchmark_store_selection_is_unchanged(tmp_path, bench_store, budget, solver):
    run_selection(bench_store, tmp_path / "o", budget, solver=solver, html=False)
    assert _sha(tmp_path / "o" / "selected.txt") == PINNED_BENCH[budget]


def test_manifest_schema_and_rank_base(tmp_path, bench_store):
    rep = run_selection(bench_store, tmp_path / "o", "10%", html=False)
    t = pq.read_table(tmp_path / "o" / "manifest.parquet")
    assert [(f.name, str(f.type)) for f in t.schema] == [
        (n, {"string": "string", "int64": "int64", "float64": "double", "bool": "bool"}[ty])
        for n, ty in MANIFEST_SCHEMA]
    assert t.schema.metadata[b"scalselect.rank_base"] == str(RANK_BASE).encode() == b"1"
    scores = np.load(tmp_path / "o" / "scores.npy")
    d = t.to_pydict()
    # an obvious reference: rank r (1-based) is the r-th row when sorting by (-score, row)
    ref = sorted(range(scores.size), key=lambda i: (-scores[i], i))
    assert [d["rank"][i] for i in ref[:50]] == list(range(1, 51))
    assert [d["id"][i] for i in ref[:rep["n_selected"]]] == (tmp_path / "o" / "selected.txt").read_text().split()
    jl = run_selection(bench_store, tmp_path / "j", "10%", html=False, manifest_format="jsonl",
                       subspace=tmp_path / "o" / "subspace.npz")
    rows = [json.loads(x) for x in (tmp_path / "j" / "manifest.jsonl").read_text().splitlines()]
    assert list(rows[0]) == [n for n, _ in MANIFEST_SCHEMA] and rows == t.to_pylist()
    assert jl["n_selected"] == rep["n_selected"]


def test_failed_write_keeps_the_previous_selection(tmp_path, monkeypatch):
    out = tmp_path / "o"
    run_selection(DEMO_REPS, out, "5%", html=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(path, scores):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(selection, "write_scores", broken)
    with pytest.raises(OSError):
        run_selection(DEMO_REPS, out, "30%", html=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temp left, old set intact


def test_commit_renames_over_a_directory_output(tmp_path):
    """Outputs may be directories (a selected dataset written as shards): the old one is replaced whole."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "sel").mkdir()
    (out / "sel" / "old-shard").write_text("old")
    with selection._Staged(out) as stage:
        tmp = stage.path(out / "sel")
        tmp.mkdir()
        (tmp / "new-shard").write_text("new")
        stage.commit(out / "report.json", {"ok": True})
    assert [p.name for p in (out / "sel").iterdir()] == ["new-shard"]
    assert json.loads((out / "report.json").read_text()) == {"ok": True}
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "sel"]


def test_store_only_report_has_no_gallery_and_says_why(tmp_path, capsys):
    assert cli.main(["select", str(DEMO_REPS), "--budget", "16%", "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    html = (tmp_path / "o" / "report.html").read_text()
    assert "no gallery: this selection was made from stored representations only" in html
    assert "data:image/jpeg" not in html and html.count("data:image/png;base64,") == 2  # spectrum, scores
    assert f"report:           {tmp_path / 'o' / 'report.html'}" in printed
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["gallery"]["note"].startswith("no gallery") and rep["per_source"] is None
