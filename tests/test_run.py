"""`scalselect run` end to end on a tiny random-weight LLaVA and a small generated dataset: outputs,
reuse of checkpoints, fingerprints, crash/resume byte-identity (SIGKILL), and bad input.

Everything is real: the transformers model built from the shipped tiny config, the data readers and
writers, the store, the core fit, faiss. The dataset has 40 records (2 text-only), so a full run
takes a few seconds.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

# the stages this file drives come from the core, data, extract and baselines areas
for _mod in ("scalselect_fast.subspace", "scalselect_fast.data.demo", "scalselect_fast.extract.tiny",
             "scalselect_fast.stability"):
    pytest.importorskip(_mod)

import scalselect_fast as ss  # noqa: E402
from scalselect_fast import cli  # noqa: E402
from scalselect_fast.run import Events, RunError, load_config_file, make_config, run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARD = 8  # 40 records -> 5 extraction shards, so every stage has several checkpoints


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_llava):
    from scalselect_fast.data.demo import make_demo_dataset

    base = tmp_path_factory.mktemp("pipeline")
    data_dir = base / "data"
    truth = make_demo_dataset(data_dir, n=40, seed=3)
    model = tiny_llava
    return {"base": base, "data": data_dir / "demo.json", "root": data_dir, "model": model, "truth": truth}


def _cfg(env, out, **kw):
    args = dict(model=str(env["model"]), data=str(env["data"]), image_root=str(env["root"]), out=str(out),
                budget="25%", shard_size=SHARD, batch_size=4, quiet=True)
    args.update(kw)
    return make_config(**args)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def baseline(env):
    """One uninterrupted run; its outputs' bytes are the reference for the resume tests."""
    out = env["base"] / "baseline"
    buf = io.StringIO()
    data_hash = _sha(env["data"])
    res = run(_cfg(env, out), events=Events(log_json=True, stream=buf))
    assert _sha(env["data"]) == data_hash  # the input is never modified
    events = [json.loads(line) for line in buf.getvalue().splitlines()]
    return {"out": out, "res": res, "events": events,
            "selected": (out / "selected.json").read_bytes(),
            "manifest": (out / "manifest.parquet").read_bytes()}


# --------------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------------
def test_run_writes_selection_manifest_and_report(env, baseline):
    out, res = baseline["out"], baseline["res"]
    records = json.loads(env["data"].read_text())
    man = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [m["id"] for m in man] == [r["id"] for r in records]
    kept_ids = [m["id"] for m in man if m["kept"]]
    assert len(kept_ids) == res.n_selected == 10  # 25% of 40 records
    # the same selection as before `run` and `select` shared one writer (commit a7ba6ae)
    assert kept_ids == ["demo-0003", "demo-0004", "demo-0005", "demo-0018", "demo-0020", "demo-0021",
                        "demo-0022", "demo-0024", "demo-0028", "demo-0034"]
    # the selected dataset: LLaVA JSON again, records unchanged, original order
    sel = json.loads((out / "selected.json").read_text())
    assert [r["id"] for r in sel] == kept_ids
    by_id = {r["id"]: r for r in records}
    assert all(r == by_id[r["id"]] for r in sel)
    # text-only samples are in the manifest with a reason and no score
    text_only = set(env["truth"]["text_only"])
    for m in man:
        if m["id"] in text_only:
            assert m["score"] is None and not m["kept"] and m["skip_reason"].startswith("text_only")
        else:
            assert m["skip_reason"] is None and m["score"] is not None
    # scores and the kept set agree with the core engine run directly on the run's store
    store = out / ".scalselect" / "reps"
    src = ss.open_source(store)
    sub = ss.fit_subspace(src, energy=0.9, solver="exact")
    ref = ss.leverage_scores(src, sub)
    ids = src.ids()
    got = {m["id"]: m["score"] for m in man if m["score"] is not None}
    np.testing.assert_allclose([got[i] for i in ids], ref, rtol=1e-9, atol=1e-12)
    assert sorted(ids[i] for i in ss.top_k(ref, 10)) == sorted(kept_ids)
    ranks = {m["id"]: m["rank"] for m in man if m["rank"] is not None}
    assert sorted(ranks.values()) == list(range(1, len(ids) + 1))  # 1-based, as `select`
    # report
    rep = json.loads((out / "report.json").read_text())
    assert rep["n_samples"] == 40 and rep["n_valid"] == 38 and rep["n_selected"] == 10
    assert rep["skip_reasons"] == {"text_only": 2}
    assert rep["subspace"]["k"] == sub.k and rep["spectrum"]["k"] == sub.k
    assert sum(v["total"] for v in rep["per_source"].values()) == 40
    assert sum(v["kept"] for v in rep["per_source"].values()) == 10
    assert {"extract", "fit", "score", "select"} <= set(rep["timings"])
    assert "margin" in rep["stability"] and "bound" in rep["stability"]
    assert rep["stability"]["refits"] == "not requested"  # re-fits cost passes: only when asked
    assert rep["stability"]["certifies"].startswith("the written selection")
    assert rep["config_hash"] and rep["versions"]["numpy"] == np.__version__
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3
    # the gallery: 4 groups of thumbnails (10 kept, 28 rejected: top and last kept overlap)
    groups = rep["gallery"]["groups"]
    by_rank = sorted((m for m in man if m["rank"] is not None), key=lambda m: m["rank"])
    assert groups["top kept"] == [m["id"] for m in by_rank if m["kept"]][:12]
    assert groups["first rejected (cut-off)"] == [m["id"] for m in by_rank if not m["kept"]][:12]
    assert groups["lowest scored"] == [m["id"] for m in by_rank][-12:]
    assert html.count("data:image/jpeg;base64,") == sum(len(v) for v in groups.values())
    assert "Samples: top, around the cut-off, bottom" in html
    loaded = ss.Subspace.load(out / "subspace.npz")
    assert loaded.provenance["layer"] == 0 and loaded.provenance["threshold"] == 0.9
    assert loaded.provenance["data_fingerprint"] == rep["fingerprint"]["data"]
    # machine-readable events
    kinds = [(e["event"], e.get("stage")) for e in baseline["events"]]
    for stage in ("extract", "fit", "score", "select"):
        assert ("stage_start", stage) in kinds and ("stage_done", stage) in kinds
    assert kinds[-1] == ("done", None) and baseline["events"][-1]["n_selected"] == 10
    prog = [e for e in baseline["events"] if e["event"] == "progress" and e["stage"] == "extract"]
    assert prog and prog[-1]["done"] == prog[-1]["total"] == 40
    assert not list(out.rglob("*.tmp"))


def test_run_and_select_share_one_manifest_and_report_schema(env, baseline, tmp_path):
    from scalselect_fast.manifest import MANIFEST_SCHEMA

    out = baseline["out"]
    store = out / ".scalselect" / "reps"
    assert cli.main(["select", str(store), "--budget", "10", "--out", str(tmp_path / "sel"), "--solver", "exact",
                     "--no-html"]) == 0
    run_t, sel_t = pq.read_table(out / "manifest.parquet"), pq.read_table(tmp_path / "sel" / "manifest.parquet")
    assert run_t.schema.names == sel_t.schema.names == [n for n, _ in MANIFEST_SCHEMA]
    assert [f.type for f in run_t.schema] == [f.type for f in sel_t.schema]
    assert run_t.schema.metadata[b"scalselect.rank_base"] == sel_t.schema.metadata[b"scalselect.rank_base"] == b"1"
    run_rep = json.loads((out / "report.json").read_text())
    sel_rep = json.loads((tmp_path / "sel" / "report.json").read_text())
    assert set(sel_rep) <= set(run_rep) and set(run_rep) - set(sel_rep) <= {"config_hash", "fingerprint", "config", "cache",
                                                                       "output_check"}
    assert set(sel_rep["subspace"]) == set(run_rep["subspace"]) and set(sel_rep["stability"]) == set(run_rep["stability"])
    # same job on the same rows: the same kept set and ranks
    run_rank = {m["id"]: m["rank"] for m in run_t.to_pylist() if m["rank"] is not None}
    sel_rank = {m["id"]: m["rank"] for m in sel_t.to_pylist()}
    assert run_rank == sel_rank
    assert sorted((tmp_path / "sel" / "selected.txt").read_text().split()) == sorted(
        m["id"] for m in run_t.to_pylist() if m["kept"])


def test_rerun_reuses_checkpoints_and_orders_by_score(env, baseline):
    out = env["base"] / "rerun"
    shutil.copytree(baseline["out"], out)
    shards = sorted((out / ".scalselect" / "reps").glob("shard-*.npy"))
    before = [p.stat().st_mtime_ns for p in shards]
    buf = io.StringIO()
    res = run(_cfg(env, out, budget="6", order="score"), events=Events(log_json=True, stream=buf))
    stages = [json.loads(x).get("stage") for x in buf.getvalue().splitlines()
              if json.loads(x)["event"] == "stage_start"]
    assert "extract" not in stages and "fit" not in stages  # done stages are not rerun
    assert [p.stat().st_mtime_ns for p in shards] == before
    man = {m["id"]: m for m in pq.read_table(out / "manifest.parquet").to_pylist()}
    sel = [r["id"] for r in json.loads(res.selected_path.read_text())]
    assert len(sel) == 6
    assert [man[i]["rank"] for i in sel] == list(range(1, 7))  # best first


def test_changed_settings_are_refused_then_force_restarts(env, baseline):
    out = env["base"] / "changed"
    shutil.copytree(baseline["out"], out)
    with pytest.raises(RunError, match=r"different run: subspace settings .* --force"):
        run(_cfg(env, out, energy=0.5))
    # without a representation cache a changed dataset is refused (with one it is re-extracted through
    # the cache: tests/test_cache.py)
    with pytest.raises(RunError, match="the dataset file or image root"):
        run(_cfg(env, out, image_root=str(env["root"] / "images"), cache="none"))
    shards = sorted((out / ".scalselect" / "reps").glob("shard-*.npy"))
    before = [p.stat().st_mtime_ns for p in shards]
    res = run(_cfg(env, out, energy=0.5, force=True))
    assert res.report["spectrum"]["energy"] == 0.5
    assert res.report["subspace"]["k"] <= baseline["res"].report["subspace"]["k"]
    # only the subspace changed: --force recomputed fit and scores but kept the representations
    assert [p.stat().st_mtime_ns for p in shards] == before


def test_fit_options_reach_the_fit_and_its_fingerprint(env, baseline):
    """--standardize / --l2-normalize / --drop-invalid / --fit-device are fit settings: changing one
    is refused without --force (they are in the fit fingerprint), and the run's subspace is exactly
    what `scalselect fit` computes on the same store with the same options."""
    out = env["base"] / "fitopts"
    shutil.copytree(baseline["out"], out)
    with pytest.raises(RunError, match=r"different run: subspace settings .* --force"):
        run(_cfg(env, out, standardize=True))
    res = run(_cfg(env, out, standardize=True, l2_normalize=True, drop_invalid=True, fit_device="cpu",
                   force=True))
    got = ss.Subspace.load(res.subspace_path)
    want = ss.fit_subspace(out / ".scalselect" / "reps", standardize=True, l2_normalize=True, drop_invalid=True)
    assert got.scale is not None and got.l2_normalize and got.info["drop_invalid"]
    np.testing.assert_array_equal(got.components, want.components)
    np.testing.assert_array_equal(got.singular_values, want.singular_values)
    # without options the run's fit is bit-identical to `scalselect fit` (same function, same tree)
    plain = ss.Subspace.load(baseline["res"].subspace_path)
    ref = ss.fit_subspace(baseline["out"] / ".scalselect" / "reps")
    np.testing.assert_array_equal(plain.components, ref.components)
    with pytest.raises(RunError, match="--fit-device 'gpu'"):
        run(_cfg(env, out, fit_device="gpu"))


def test_config_file_flags_override_and_cli(env, baseline, tmp_path, capsys):
    out = tmp_path / "cfgrun"
    shutil.copytree(baseline["out"], out)
    toml = tmp_path / "run.toml"
    toml.write_text(f'model = "{env["model"]}"\ndata = "{env["data"]}"\nimage-root = "{env["root"]}"\n'
                    f'out = "{out}"\nbudget = "50%"\nshard-size = {SHARD}\nbatch-size = 4\n')
    assert cli.main(["run", "--config", str(toml), "--budget", "3", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "selected 3 of 40 samples" in printed and str(out / "report.html") in printed
    yml = tmp_path / "run.yaml"
    yml.write_text("run:\n  budget: 5\n  bogus_key: 1\n")
    with pytest.raises(RunError, match="unknown setting 'bogus_key'"):
        load_config_file(yml)
    # --plan prints the estimate and does not run
    assert cli.main(["run", "--config", str(toml), "--plan"]) == 0
    assert "Plan for N=40 samples" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_output_keeps_the_input_format(env, tmp_path, fmt):
    import pyarrow as pa

    records = json.loads(env["data"].read_text())[:12]
    if fmt == "jsonl":
        data = tmp_path / "d.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        data = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(records), data)
    res = run(make_config(model=str(env["model"]), data=str(data), image_root=str(env["root"]),
                          out=str(tmp_path / "out"), budget="4", batch_size=4, quiet=True))
    assert res.selected_path.name == f"selected.{fmt}"
    if fmt == "jsonl":
        lines = res.selected_path.read_text().splitlines()
        src_lines = data.read_text().splitlines()
        assert len(lines) == 4 and all(line in src_lines for line in lines)  # lines copied verbatim
    else:
        got = pq.read_table(res.selected_path)
        assert got.schema == pq.read_table(data).schema and got.num_rows == 4
    kept = [m["id"] for m in pq.read_table(res.manifest_path).to_pylist() if m["kept"]]
    ids = [json.loads(x)["id"] for x in lines] if fmt == "jsonl" else got.column("id").to_pylist()
    assert ids == kept


def test_dedup_selected_and_quota_options(env, baseline, tmp_path):
    out = tmp_path / "post"
    shutil.copytree(baseline["out"], out)
    src = ss.open_source(out / ".scalselect" / "reps")
    ids = src.ids()
    base_man = pq.read_table(baseline["out"] / "manifest.parquet").to_pylist()
    kept0 = [ids.index(m["id"]) for m in base_man if m["kept"]]
    U = src.read_rows(kept0).astype(np.float64)
    U /= np.linalg.norm(U, axis=1, keepdims=True)
    D = 1.0 - U @ U.T
    np.fill_diagonal(D, np.inf)
    eps = float(np.sort(D.ravel())[2]) * 1.0001  # at least one near-duplicate pair among the plain top 10
    res = run(_cfg(env, out, dedup_selected=eps))
    man = pq.read_table(out / "manifest.parquet").to_pylist()
    kept = [ids.index(m["id"]) for m in man if m["kept"]]
    assert len(kept) == 10
    V = src.read_rows(kept).astype(np.float64)
    V /= np.linalg.norm(V, axis=1, keepdims=True)
    E = 1.0 - V @ V.T
    np.fill_diagonal(E, np.inf)
    assert E.min() > eps  # no near-duplicates left inside the selection
    dropped = [m for m in man if (m["skip_reason"] or "").startswith("near-duplicate")]
    assert dropped and all(not m["kept"] for m in dropped)
    assert res.report["postselect"]["n_dedup_dropped"] == len(dropped)
    assert "before post-selection" in res.report["stability"]["certifies"]  # says which set it is about
    # quota: cap the most-kept source at 20% of the budget
    records = {r["id"]: r for r in json.loads(env["data"].read_text())}
    top = max(res.report["per_source"], key=lambda k: res.report["per_source"][k]["kept"])
    res = run(_cfg(env, out, quota=[f"source={top}<=20%"]))
    sel = json.loads(res.selected_path.read_text())
    assert len(sel) == 10 and sum(records[r["id"]].get("source") == top for r in sel) <= 2


# --------------------------------------------------------------------------------------------------
# kill -9 and resume
# --------------------------------------------------------------------------------------------------
def _cli_args(env, out):
    return [sys.executable, "-m", "scalselect_fast", "run", "--model", str(env["model"]), "--data", str(env["data"]),
            "--image-root", str(env["root"]), "--out", str(out), "--budget", "25%", "--shard-size", str(SHARD),
            "--batch-size", "4", "--quiet"]


def _spawn(env, out, crash_at=None):
    e = dict(os.environ, PYTHONPATH=str(ROOT))
    e.pop("SCALSELECT_CRASH_AT", None)
    e["SCALSELECT_FIT_CHECKPOINT_S"] = "0"  # a Gram checkpoint after every shard: the crash at
    # fit.shard:2 then leaves one behind, and the rerun must resume from it
    if crash_at:
        e["SCALSELECT_CRASH_AT"] = crash_at
    return subprocess.Popen(_cli_args(env, out), cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sigkill_at_every_stage_then_resume_is_byte_identical(env, baseline, tmp_path):
    out = tmp_path / "killed"
    # 1. an external kill -9 in the middle of extraction (after the first shard is committed)
    p = _spawn(env, out)
    manifest = out / ".scalselect" / "reps" / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if manifest.exists() and json.loads(manifest.read_text() or "{}").get("shards"):
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, p.stderr.read().decode()[-2000:]
    committed = len(json.loads(manifest.read_text())["shards"])
    assert 1 <= committed < 5 and not (out / "selected.json").exists()
    # 2.-4. the process kills itself between two checkpoint commits of fit and score, and after the
    # first staged output is renamed into place but before the others and the report
    for point in ("fit.shard:2", "score.shard:3", "select.commit:1"):
        p = _spawn(env, out, crash_at=point)
        _, err = p.communicate(timeout=300)
        assert p.returncode == -signal.SIGKILL, (point, err.decode()[-2000:])
        if point.startswith("select"):  # no report: a reader knows the outputs are incomplete
            assert not (out / "report.json").exists()
        if point.startswith("fit"):  # killed after the second shard's checkpoint: the rerun resumes from it
            with np.load(out / ".scalselect" / "fit" / "gram.npz") as z:
                assert len(json.loads(str(z["meta"]))["shards"]) == 2
    assert len(json.loads(manifest.read_text())["shards"]) == 5  # extraction resumed and finished
    # 5. the final rerun completes and reproduces the uninterrupted run byte for byte
    p = _spawn(env, out)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err.decode()[-2000:]
    assert (out / "selected.json").read_bytes() == baseline["selected"]
    assert (out / "manifest.parquet").read_bytes() == baseline["manifest"]
    assert not list(out.rglob("*.tmp"))


@pytest.mark.parametrize("point", ["select.staged:1", "select.commit:1"])
def test_kill_during_select_never_leaves_outputs_that_disagree(env, baseline, tmp_path, point):
    """A rerun with another budget killed while committing: either the old complete set (report
    included) or no report at all; never a report that disagrees with the files beside it."""
    out = tmp_path / "sel"
    shutil.copytree(baseline["out"], out)

    def consistent():
        rep = json.loads((out / "report.json").read_text())
        kept = [m["id"] for m in pq.read_table(out / "manifest.parquet").to_pylist() if m["kept"]]
        sel = [r["id"] for r in json.loads((out / "selected.json").read_text())]
        ids = (out / "selected.txt").read_text().split()
        assert rep["n_selected"] == len(kept) == len(sel) == len(ids) and sorted(sel) == sorted(kept) == sorted(ids)
        return rep["n_selected"]

    assert consistent() == 10
    args = [a if a != "25%" else "5" for a in _cli_args(env, out)]
    e = dict(os.environ, PYTHONPATH=str(ROOT), SCALSELECT_CRASH_AT=point)
    p = subprocess.run(args, cwd=ROOT, env=e, capture_output=True)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()[-2000:]
    if point == "select.staged:1":  # nothing renamed yet: the old selection stands, complete
        assert consistent() == 10
        assert (out / "selected.json").read_bytes() == baseline["selected"]
    else:  # the old report is gone before the first rename: the set is visibly incomplete
        assert not (out / "report.json").exists()
    e.pop("SCALSELECT_CRASH_AT")
    p = subprocess.run(args, cwd=ROOT, env=e, capture_output=True)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    assert consistent() == 5 and not list(out.glob(".*.tmp"))


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------
def _write_llava(path: Path, records):
    path.write_text(json.dumps(records))
    return path


def _rec(i, image="images/demo-0000.png", **extra):
    question = "<image>\nWhat is shown?" if image is not None else "Tell me about shapes."
    r = {"id": f"s{i}", "conversations": [{"from": "human", "value": question},
                                          {"from": "gpt", "value": "A shape."}]}
    if image is not None:
        r["image"] = image
    r.update(extra)
    return r


def test_bad_samples_are_skipped_with_reasons_and_budget_checked(env, tmp_path):
    root = tmp_path / "imgs"
    shutil.copytree(env["root"] / "images", root / "images")
    good = sorted(p.name for p in (root / "images").glob("*.png"))[:6]
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    whole = (root / "images" / good[0]).read_bytes()
    (root / "images" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "outside.png").write_bytes(whole)
    records = [_rec(i, f"images/{g}") for i, g in enumerate(good)]
    no_conv = {"id": "noconv", "image": f"images/{good[0]}"}
    records += [no_conv, _rec(10, "../outside.png"), _rec(11, "images/missing.png"),
                _rec(12, "images/corrupt.png"), _rec(13, "images/truncated.png"), _rec(14, image=None)]
    data = _write_llava(tmp_path / "bad.json", records)
    out = tmp_path / "out"
    cfg = dict(model=str(env["model"]), data=str(data), image_root=str(root), out=str(out), batch_size=4,
               shard_size=SHARD, quiet=True)
    res = run(make_config(budget="2", **cfg))
    man = {m["id"]: m["skip_reason"] for m in pq.read_table(out / "manifest.parquet").to_pylist()}
    assert man["noconv"].startswith("missing_field")
    assert man["s10"].startswith("image_outside_root")
    assert man["s11"].startswith("image_missing")
    assert man["s12"].split(":")[0] in ("image_corrupt", "image_unreadable", "image_truncated")
    assert man["s13"].split(":")[0] in ("image_truncated", "image_corrupt")
    assert man["s14"].startswith("text_only")
    assert all(man[f"s{i}"] is None for i in range(6))
    assert res.n_selected == 2
    skipped = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert len(skipped) == 6
    # a budget above the usable samples is refused, naming the count and where the reasons are
    with pytest.raises(RunError, match=r"only 6 of the 12 records have a representation.*skipped\.jsonl"):
        run(make_config(budget="7", **cfg))


@pytest.mark.parametrize("case", ["malformed_jsonl", "duplicate_ids", "empty", "all_text_only"])
def test_dataset_level_errors_are_clear(env, tmp_path, case):
    from scalselect_fast.data import DatasetError

    if case == "malformed_jsonl":
        data = tmp_path / "d.jsonl"
        data.write_text(json.dumps(_rec(0, "images/demo-0000.png")) + "\n" + json.dumps(_rec(1)) + "\n"
                        + '{"id": "s2", "conversations": [\n')
        err, pat = DatasetError, r"line 3"
    elif case == "duplicate_ids":
        data = _write_llava(tmp_path / "d.json", [_rec(0), _rec(1), _rec(0)])
        err, pat = DatasetError, r"duplicate id 's0'"
    elif case == "empty":
        data = _write_llava(tmp_path / "d.json", [])
        err, pat = RunError, r"d\.json is empty \(no records\)"
    else:
        data = _write_llava(tmp_path / "d.json", [_rec(i, image=None) for i in range(4)])
        err, pat = RunError, r"no sample .* produced a representation \(skipped: text_only: 4"
    cfg = make_config(model=str(env["model"]), data=str(data), image_root=str(env["root"]),
                      out=str(tmp_path / "out"), budget="1", quiet=True)
    with pytest.raises(err, match=pat):
        run(cfg)


def test_model_and_setting_errors(env, tmp_path, capsys):
    from scalselect_fast.extract import UnsupportedModelError

    bad_model = tmp_path / "bert"
    bad_model.mkdir()
    (bad_model / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    base = dict(data=str(env["data"]), image_root=str(env["root"]), budget="2", quiet=True)
    with pytest.raises(UnsupportedModelError, match="unknown model type 'bert'"):
        run(make_config(model=str(bad_model), out=str(tmp_path / "o1"), **base))
    with pytest.raises(UnsupportedModelError, match="layer 7 does not exist"):
        run(make_config(model=str(env["model"]), out=str(tmp_path / "o2"), layer=7, **base))
    for t in (0.0, 1.5):
        with pytest.raises(RunError, match=r"threshold must be in \(0, 1\]"):
            run(make_config(model=str(env["model"]), out=str(tmp_path / "o3"), threshold=t, **base))
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(RunError, match="is a file, not a directory"):
        run(make_config(model=str(env["model"]), out=str(afile), **base))
    with pytest.raises(RunError, match="--model .*no such file"):
        run(make_config(model=str(tmp_path / "nope"), out=str(tmp_path / "o4"), **base))
    # the CLI prints the message (no traceback) and exits 2
    rc = cli.main(["run", "--model", str(env["model"]), "--data", str(env["data"]), "--out", str(tmp_path / "o5"),
                   "--threshold", "2", "--quiet"])
    assert rc == 2 and "threshold must be in (0, 1]" in capsys.readouterr().err


def _mount_tmpfs(path: Path, size: str, ro: bool = False) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if ro else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_out_dir_not_writable(env, tmp_path):
    ro = tmp_path / "ro"
    if os.geteuid() == 0:
        if not _mount_tmpfs(ro, "64k", ro=True):
            pytest.skip("running as root without permission to mount a read-only tmpfs")
    else:
        ro.mkdir()
        ro.chmod(0o500)
    try:
        with pytest.raises(RunError, match="is not writable"):
            run(make_config(model=str(env["model"]), data=str(env["data"]), image_root=str(env["root"]),
                            out=str(ro / "sub"), budget="2", quiet=True))
    finally:
        if os.geteuid() == 0:
            _umount(ro)


def test_disk_full_leaves_no_corrupt_output_and_resumes(env, baseline, tmp_path):
    """A real full disk (a 48 KiB tmpfs; RLIMIT_FSIZE in a subprocess where mounting is not allowed)."""
    out = tmp_path / "full"
    if os.geteuid() == 0 and _mount_tmpfs(out, "48k"):
        try:
            with pytest.raises(RunError, match=r"disk full in the '\w+' stage while writing .*rerun the same command"):
                run(_cfg(env, out, plan_check=False))
            leftovers = [p for p in out.rglob("*") if p.is_file()]
            assert not [p for p in leftovers if p.name.endswith(".tmp")]
            assert not (out / "selected.json").exists() and not (out / "manifest.parquet").exists()
            # every store shard the manifest lists is complete (its checksum verifies)
            src = ss.open_source(out / ".scalselect" / "reps")
            for _ in src.iter_blocks(verify=True):
                pass
            subprocess.run(["mount", "-o", "remount,size=8m", str(out)], check=True)
            run(_cfg(env, out))
            assert (out / "selected.json").read_bytes() == baseline["selected"]
            assert (out / "manifest.parquet").read_bytes() == baseline["manifest"]
        finally:
            _umount(out)
    else:
        code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); "
                "from scalselect_fast.cli import main; sys.exit(main(sys.argv[1:]))")
        args = _cli_args(env, out)[3:] + ["--no-plan-check"]
        r = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert r.returncode == 2 and "disk full in the 'fit' stage" in r.stderr, r.stderr[-2000:]
        assert not list(out.rglob("*.tmp")) and not (out / "selected.json").exists()
        p = _spawn(env, out)
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
        assert (out / "selected.json").read_bytes() == baseline["selected"]


def test_demo_command_runs_the_pipeline(env, tmp_path, monkeypatch, capsys):
    """`scalselect demo` = the run pipeline with the tiny model on the bundled dataset (here pointed at
    the small generated copy to keep the test fast; the bundled copy is checked for consistency)."""
    import scalselect_fast.data.demo as demo
    from scalselect_fast.data import count_records

    bundled = json.loads((demo.DEMO_DIR / demo.DEMO_TRUTH).read_text())
    assert count_records(demo.DEMO_DIR / demo.DEMO_DATA) == sum(bundled["counts"].values()) == 240
    monkeypatch.setattr(demo, "DEMO_DIR", env["root"])
    out = tmp_path / "demo-out"
    assert cli.main(["demo", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"selected dataset: {out / 'selected.json'}" in printed and str(out / "report.html") in printed
    rep = json.loads((out / "report.json").read_text())
    assert rep["n_samples"] == 40 and rep["n_selected"] == 6  # 16% of 40, rounded down
    truth = rep["demo_truth"]
    assert truth["rare_samples"] == len(env["truth"]["rare"])
    assert truth["planted_duplicate_pairs"] == len(env["truth"]["duplicates"])


def test_first_shard_all_text_only_still_fits(env, tmp_path):
    """A first extraction shard with no representation (every record text-only) is an empty store
    shard; the fit's shift must come from the first rows that exist, not from an empty mean."""
    records = json.loads(env["data"].read_text())
    for r in records[:SHARD]:
        r.pop("image", None)
        for turn in r["conversations"]:
            turn["value"] = turn["value"].replace("<image>\n", "").replace("<image>", "")
    data = tmp_path / "text_first.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "out"
    run(make_config(model=str(env["model"]), data=str(data), image_root=str(env["root"]), out=str(out),
                    budget="25%", shard_size=SHARD, batch_size=4, quiet=True))
    report = json.loads((out / "report.json").read_text())
    assert report["n_valid"] == sum(1 for r in records if "image" in r) == 30  # demo records 10, 32 are text-only too
    selected = {r["id"] for r in json.loads((out / "selected.json").read_text())}
    assert selected and not selected & {r["id"] for r in records[:SHARD]}


def test_run_and_extract_default_to_auto_device_and_dtype(env, monkeypatch):
    """Both commands default to --device auto --dtype auto; auto is made concrete before the
    fingerprints: here (no GPU) cpu + fp32, on a bf16-capable GPU cuda + bf16."""
    import torch

    from scalselect_fast.extract.model import resolve_dtype
    from scalselect_fast.run.stages import _resolve_auto_device

    parser = cli.build_parser()
    ex = parser.parse_args(["extract", "--model", "m", "--data", "d.json", "--out", "o"])
    assert (ex.device, ex.dtype) == ("auto", "auto")
    cfg = make_config(model="m", data="d.json", out="o")
    assert (cfg.device, cfg.dtype) == ("auto", "auto")
    assert "auto" in parser._subparsers._group_actions[0].choices["run"].format_help()
    assert resolve_dtype("auto", "cpu") == torch.float32
    explicit = make_config(model="m", data="d.json", out="o", device="cpu", dtype="bf16")
    assert _resolve_auto_device(explicit) is explicit  # explicit settings are kept as given
    if not torch.cuda.is_available():
        r = _resolve_auto_device(cfg)
        assert (r.device, r.dtype) == ("cpu", "fp32")
        # the GPU branch of the rule, with torch told a bf16-capable GPU is present
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        r = _resolve_auto_device(cfg)
        assert (r.device, r.dtype) == ("cuda", "bf16")
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
        assert _resolve_auto_device(cfg).dtype == "fp32"


def test_fit_and_score_stages_with_invalid_rows(tmp_path):
    """Stored rows with NaN: without --drop-invalid the fit stage stops naming them; with it they
    are left out of the fit (as `scalselect fit --drop-invalid`) and get a NaN score."""
    from scalselect_fast.run.stages import _stage_fit, _stage_score
    from scalselect_fast.run.state import RunState
    from scalselect_fast.subspace import InvalidRowsError

    X = np.random.default_rng(0).standard_normal((50, 6)).astype(np.float32)
    X[[3, 41]] = np.nan
    w = ss.StoreWriter(tmp_path / "reps", d=6, dtype="float32")
    for a in range(0, 50, 16):
        w.write_shard(X[a:a + 16], [f"s{i}" for i in range(a, min(a + 16, 50))])
    src = ss.open_source(tmp_path / "reps")
    fps = {"model": "m", "data": "d", "extract": "e", "fit": "f", "select": "s"}
    events = Events(quiet=True)
    with pytest.raises(InvalidRowsError, match="'s3'"):
        cfg = make_config(model="m", data="d", out=str(tmp_path / "a"))
        _stage_fit(cfg, RunState(tmp_path / "a", fps, False, events), events, src)
    cfg = make_config(model="m", data="d", out=str(tmp_path / "b"), drop_invalid=True)
    state = RunState(tmp_path / "b", fps, False, events)
    sub = _stage_fit(cfg, state, events, src)
    assert sub.info["invalid_rows"] == [3, 41] and sub.n == 48
    ref = ss.fit_subspace(tmp_path / "reps", drop_invalid=True)
    np.testing.assert_array_equal(sub.components, ref.components)
    scores = _stage_score(cfg, state, events, src, sub)
    assert np.flatnonzero(np.isnan(scores)).tolist() == [3, 41]
    np.testing.assert_allclose(np.nansum(scores), sub.k, rtol=1e-6)  # float32 products


def test_stability_seeds_option(env, baseline, tmp_path):
    """`run --stability-seeds` reaches the selection report as `select --stability-seeds` does: the
    default is the margin and bound without refits, 'none' leaves the entry empty, seeds refit (or
    say why they do not apply) and change nothing else of the outputs."""
    from scalselect_fast.run import RunError

    default = baseline["res"].report["stability"]
    assert default["refits"] == "not requested" and "margin" in json.dumps(default)
    out = tmp_path / "st"
    shutil.copytree(baseline["out"], out)
    res = run(_cfg(env, out, stability_seeds="0,1"))
    st = res.report["stability"]
    assert st["refits"] != "not requested"
    # the same rows (the file's metadata carries the config fingerprint, which covers the option)
    assert pq.read_table(out / "manifest.parquet").to_pylist() == \
        pq.read_table(baseline["out"] / "manifest.parquet").to_pylist()
    assert (out / "selected.json").read_bytes() == baseline["selected"]
    res = run(_cfg(env, out, stability_seeds="none"))
    assert res.report["stability"] is None
    with pytest.raises(RunError, match="stability-seeds"):
        run(_cfg(env, out, stability_seeds="0,x"))
    from scalselect_fast.run import make_config

    (tmp_path / "c.toml").write_text("stability-seeds = [0, 1, 2]\n")
    assert make_config(tmp_path / "c.toml").stability_seeds == "0,1,2"
