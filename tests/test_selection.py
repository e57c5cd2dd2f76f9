"""The one selection job (scalselect_fast.selection): selections pinned to those made before the
writers were merged, the one manifest schema, the commit protocol, and the store-only report."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from scalselect_fast import cli, selection
from scalselect_fast.atomic import StagedOutputs
from scalselect_fast.manifest import MANIFEST_SCHEMA, RANK_BASE
from scalselect_fast.selection import run_selection

sys.path.insert(0, str(Path(__file__).parent))
from _selection_reference import assert_selection_matches, reference_scores  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO_REPS = ROOT / "scalselect_fast" / "assets" / "demo_reps.npy"

def _selected_rows(out: Path) -> np.ndarray:
    """selected.txt (ids in rank order) as row numbers: ``rNNNNNNNNNN`` store ids or ``.npy`` rows."""
    return np.array([int(x.lstrip("r")) for x in (out / "selected.txt").read_text().split()], np.int64)


# the selections of `scoring.run_selection` before it became selection.run_selection (commit
# a7ba6ae) were pinned by a hash of selected.txt per build; they now must match an independent
# float64 reference (tests/_selection_reference.py) on any machine, counts pinned as before
@pytest.mark.parametrize("budget,count", [("16%", 320), ("5%", 100), ("30%", 600)])
def test_demo_selection_matches_reference(tmp_path, budget, count):
    rep = run_selection(DEMO_REPS, tmp_path / "o", budget, html=False)
    assert rep["n_selected"] == count
    ref, k = reference_scores(np.load(DEMO_REPS))
    assert k == 3
    assert_selection_matches(_selected_rows(tmp_path / "o"), ref, count)


@pytest.fixture(scope="module")
def bench_store(tmp_path_factory):
    sys.path.insert(0, str(ROOT))
    from benchmarks.make_large_store import make_store

    path = tmp_path_factory.mktemp("bench") / "store"
    make_store(path, n=30000, d=96, dtype="float16", shard_rows=7000, verbose=False)
    return path


@pytest.fixture(scope="module")
def bench_reference(bench_store):
    from scalselect_fast.store import open_source

    return reference_scores(open_source(bench_store).to_array().astype(np.float64))


@pytest.mark.parametrize("solver", ["exact", "randomized"])
@pytest.mark.parametrize("budget,count", [("16%", 4800), ("1000", 1000)])
def test_benchmark_store_selection_matches_reference(tmp_path, bench_store, bench_reference, budget, count,
                                                      solver):
    rep = run_selection(bench_store, tmp_path / "o", budget, solver=solver, html=False)
    ref, k = bench_reference
    assert rep["n_selected"] == count and rep["subspace"]["k"] == k
    assert_selection_matches(_selected_rows(tmp_path / "o"), ref, count)


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
    with StagedOutputs(out) as stage:
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


def test_gallery_groups_thumbnails_and_placeholders(tmp_path):
    """report.html of a selection with its dataset: four groups of thumbnails (embedded JPEGs) with the
    instruction text, a placeholder naming the reason for an image that cannot be read."""
    import html.parser
    import os

    from scalselect_fast.data.demo import make_demo_dataset
    from scalselect_fast.gallery import GALLERY_SIZE
    from scalselect_fast.rowmap import Records
    from scalselect_fast.store import StoreWriter

    data_dir = tmp_path / "data"
    make_demo_dataset(data_dir, n=80, seed=1)
    records = json.loads((data_dir / "demo.json").read_text())
    with_image = [r for r in records if r.get("image")]
    gone = with_image[0]
    os.unlink(data_dir / gone["image"])  # this sample's thumbnail cannot be made
    vecs = np.random.default_rng(0).standard_normal((len(with_image), 16)).astype(np.float32)
    vecs[0] *= 30  # an outlier: the highest score, so the sample without an image is shown first
    w = StoreWriter(tmp_path / "reps", d=16, dtype="float32")
    w.write_shard(vecs, [r["id"] for r in with_image])
    recs = Records(path=str(data_dir / "demo.json"), ids=[r["id"] for r in records],
                   sources=[r.get("source") for r in records], fields={}, skip_reason={}, skip_counts={},
                   selected_name="selected.json", image_root=str(data_dir))
    rep = run_selection(tmp_path / "reps", tmp_path / "o", 20, records=recs)
    groups = rep["gallery"]["groups"]
    man = pq.read_table(tmp_path / "o" / "manifest.parquet").to_pylist()
    by_rank = [m["id"] for m in sorted((m for m in man if m["rank"]), key=lambda m: m["rank"])]
    kept = [i for i in by_rank if i in set((tmp_path / "o" / "selected.txt").read_text().split())]
    assert groups["top kept"] == kept[:GALLERY_SIZE] and groups["last kept (cut-off)"] == kept[-GALLERY_SIZE:]
    assert groups["first rejected (cut-off)"] == [i for i in by_rank if i not in kept][:GALLERY_SIZE]
    assert groups["lowest scored"] == by_rank[-GALLERY_SIZE:]

    class Figures(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.figs, self.cur, self.in_text = [], None, False

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "figure":
                self.cur = {"img": None, "text": "", "noimg": False}
                self.figs.append(self.cur)
            elif self.cur is not None and tag == "img":
                self.cur["img"] = a["src"]
            elif self.cur is not None and tag == "div" and a.get("class") == "noimg":
                self.cur["noimg"] = True
            self.in_text = self.cur is not None and tag == "div" and a.get("class") == "text"

        def handle_data(self, data):
            if self.in_text:
                self.cur["text"] += data

        def handle_endtag(self, tag):
            self.in_text = False if tag == "div" else self.in_text
            if tag == "figure":
                self.cur = None

    page = (tmp_path / "o" / "report.html").read_text()
    p = Figures()
    p.feed(page)
    shown = [i for ids in groups.values() for i in ids]
    assert len(p.figs) == len(shown)
    by_id = {r["id"]: r for r in records}
    import base64

    for sid, fig in zip(shown, p.figs):
        if sid == gone["id"]:
            assert fig["img"] is None and fig["noimg"]
            continue
        assert fig["img"].startswith("data:image/jpeg;base64,")
        assert base64.b64decode(fig["img"].split(",", 1)[1])[:2] == b"\xff\xd8"  # a JPEG, embedded
        question = by_id[sid]["conversations"][0]["value"].replace("<image>", " ")
        assert fig["text"] == " ".join(question.split())[:160]
    assert groups["top kept"][0] == gone["id"]
    assert "image_missing" in page and "could not be loaded" in rep["gallery"]["note"]
    assert "http://" not in page and "https://" not in page and "<script" not in page


@pytest.mark.parametrize("point", ["select.staged:1", "select.commit:1", "select.commit:2"])
def test_kill_during_store_select_never_leaves_a_report_that_disagrees(tmp_path, point):
    """kill -9 (the crash points) while `select` commits a new selection over an old one."""
    import os
    import signal
    import subprocess

    out = tmp_path / "o"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("SCALSELECT_CRASH_AT", None)
    args = [sys.executable, "-m", "scalselect_fast", "select", str(DEMO_REPS), "--out", str(out), "--no-html"]
    assert subprocess.run(args + ["--budget", "5%"], env=env, capture_output=True).returncode == 0

    def agrees() -> int:
        rep = json.loads((out / "report.json").read_text())
        kept = [m["id"] for m in pq.read_table(out / "manifest.parquet").to_pylist() if m["kept"]]
        ids = (out / "selected.txt").read_text().split()
        scores = np.load(out / "scores.npy")
        assert rep["n_selected"] == len(kept) == len(ids) and sorted(kept) == sorted(ids)
        assert rep["stability"]["margin"]["last_kept"] == float(np.sort(scores)[::-1][len(ids) - 1])
        return rep["n_selected"]

    assert agrees() == 100
    p = subprocess.run(args + ["--budget", "30%"], env=dict(env, SCALSELECT_CRASH_AT=point), capture_output=True)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()[-2000:]
    if point == "select.staged:1":
        assert agrees() == 100  # nothing renamed yet: the old selection, complete
    else:
        assert not (out / "report.json").exists()  # mid-commit: visibly incomplete
    assert subprocess.run(args + ["--budget", "30%"], env=env, capture_output=True).returncode == 0
    assert agrees() == 600 and not list(out.glob(".*.tmp"))
