"""Hostile inputs (issue 12): every refusal is exit status 2 with ONE line on stderr and no traceback,
every input is byte-identical afterwards, and no output (not even a partial one) is left behind.

Each case builds its files in its own folder and returns the command line; the harness hashes every
file under that folder before and after, so "inputs untouched" and "no partial outputs" are one
check: the folder's files are exactly what they were.

Sections: (1) core commands, validation, stores, models (below); (2) run-level cases, at the end.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from scalselect_fast import cli
from scalselect_fast.store import StoreError, StoreWriter

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# harness
# --------------------------------------------------------------------------------------------------
def _tree(base: Path) -> dict[str, str]:
    """sha256 of every file under ``base`` (symlinks recorded by target, not followed)."""
    out = {}
    for root, _dirs, files in os.walk(base):
        for name in files:
            p = Path(root) / name
            rel = str(p.relative_to(base))
            out[rel] = ("link:" + os.readlink(p)) if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _cli_subprocess(argv, env_extra=None, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    r = subprocess.run([sys.executable, "-m", "scalselect_fast", *argv], capture_output=True, text=True,
                       env=env, timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def _rows(n=40, d=6, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _npy(path: Path, n=40, d=6) -> Path:
    np.save(path, _rows(n, d))
    return path


def _store(path: Path, shards=2, n=20, d=6, ids=None) -> Path:
    w = StoreWriter(path, d=d, dtype="float32")
    for j in range(shards):
        w.write_shard(_rows(n, d, seed=j), ids[j] if ids else [f"s{j}-{i}" for i in range(n)])
    return path


def _subspace(path: Path, src) -> Path:
    from scalselect_fast.subspace import fit_subspace

    fit_subspace(src, k=2).save(path)
    return path


def _flip_bytes(path: Path, where: int = -24, count: int = 4) -> None:
    b = bytearray(path.read_bytes())
    for i in range(count):
        b[where + i] ^= 0x5A
    path.write_bytes(bytes(b))


def _manifest_edit(store: Path, fn) -> None:
    m = json.loads((store / "manifest.json").read_text())
    fn(m)
    (store / "manifest.json").write_text(json.dumps(m))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A real tiny LLaVA-style checkpoint and a 20-record dataset with images (built once)."""
    from scalselect_fast.data.demo import make_demo_dataset
    from scalselect_fast.extract.tiny import build_tiny_model

    base = tmp_path_factory.mktemp("hostile-model")
    make_demo_dataset(base / "data", n=20, seed=1)
    return {"model": build_tiny_model("llava", base / "tiny-llava", seed=0), "data": base / "data" / "demo.json",
            "root": base / "data"}


# --------------------------------------------------------------------------------------------------
# (1) core commands, validation, stores, models          [integ-cli]
# Each case: (tmp: Path, tiny: dict | None) -> (argv, regex the one-line message must match).
# --------------------------------------------------------------------------------------------------
def c_fit_out_is_input(t, _):
    _npy(t / "g.npy")
    return ["fit", str(t / "g.npy"), "--out", str(t / "g.npy"), "--k", "2"], r"--out .*g\.npy is the input"


def c_fit_out_symlink_to_input(t, _):
    _npy(t / "g.npy")
    os.symlink(t / "g.npy", t / "link.npz")
    return ["fit", str(t / "g.npy"), "--out", str(t / "link.npz"), "--k", "2"], r"is the input .*g\.npy"


def c_fit_out_hardlink_to_input(t, _):
    _npy(t / "g.npy")
    os.link(t / "g.npy", t / "hard.npz")
    return ["fit", str(t / "g.npy"), "--out", str(t / "hard.npz"), "--k", "2"], r"is the input .*same file"


def c_fit_out_is_a_store_shard(t, _):
    _store(t / "reps")
    return ["fit", str(t / "reps"), "--out", str(t / "reps" / "shard-00000.npy"), "--k", "2"], \
        r"is the input .*shard-00000\.npy"


def c_score_out_is_input(t, _):
    _subspace(t / "s.npz", _npy(t / "g.npy"))
    return ["score", str(t / "g.npy"), "--subspace", str(t / "s.npz"), "--out", str(t / "g.npy")], \
        r"is the input .*g\.npy"


def c_score_out_is_subspace(t, _):
    _subspace(t / "s.npz", _npy(t / "g.npy"))
    return ["score", str(t / "g.npy"), "--subspace", str(t / "s.npz"), "--out", str(t / "s.npz")], \
        r"is the input .*s\.npz"


def c_select_out_holds_input(t, _):
    (t / "d").mkdir()
    _npy(t / "d" / "scores.npy")
    return ["select", str(t / "d" / "scores.npy"), "--budget", "5", "--out", str(t / "d"), "--k", "2"], \
        r"--out .*d holds the input .*scores\.npy"


def c_select_out_is_the_store(t, _):
    _store(t / "reps")
    return ["select", str(t / "reps"), "--budget", "5", "--out", str(t / "reps")], r"(holds|is) the input .*reps"


def c_baseline_out_holds_input(t, _):
    (t / "d").mkdir()
    _npy(t / "d" / "indices.npy")
    return ["baseline", "--method", "random", str(t / "d" / "indices.npy"), "--budget", "5", "--out",
            str(t / "d")], r"holds the input .*indices\.npy"


def c_extract_out_holds_data(t, _):
    (t / "d").mkdir()
    (t / "d" / "data.json").write_text("[]")
    (t / "m").mkdir()
    return ["extract", "--model", str(t / "m"), "--data", str(t / "d" / "data.json"), "--out", str(t / "d"),
            "--quiet"], r"holds the input .*data\.json"


def c_run_data_is_manifest_in_out(t, _):
    (t / "d").mkdir()
    (t / "d" / "manifest.parquet").write_bytes(b"PAR1 not really")
    (t / "m").mkdir()
    return ["run", "--model", str(t / "m"), "--data", str(t / "d" / "manifest.parquet"), "--out", str(t / "d"),
            "--quiet"], r"holds the input .*manifest\.parquet"


def c_run_data_is_skiplog_in_out(t, _):
    (t / "d").mkdir()
    (t / "d" / "skipped.jsonl").write_text('{"id": "a"}\n')
    (t / "m").mkdir()
    return ["run", "--model", str(t / "m"), "--data", str(t / "d" / "skipped.jsonl"), "--out", str(t / "d"),
            "--quiet"], r"holds the input .*skipped\.jsonl"


def c_score_flipped_shard(t, _):
    _subspace(t / "s.npz", _store(t / "reps"))
    _flip_bytes(t / "reps" / "shard-00001.npy")
    return ["score", str(t / "reps"), "--subspace", str(t / "s.npz"), "--out", str(t / "scores.npy")], \
        r"checksum mismatch in shard 'shard-00001'"


def c_select_subspace_flipped_shard(t, _):
    _subspace(t / "s.npz", _store(t / "reps"))
    _flip_bytes(t / "reps" / "shard-00000.npy")
    return ["select", str(t / "reps"), "--subspace", str(t / "s.npz"), "--budget", "5", "--out", str(t / "sel")], \
        r"checksum mismatch in shard 'shard-00000'"


def c_baseline_kcenter_flipped_shard(t, _):
    _store(t / "reps")
    _flip_bytes(t / "reps" / "shard-00001.npy")
    return ["baseline", "--method", "kcenter", str(t / "reps"), "--budget", "5", "--out", str(t / "kc")], \
        r"checksum mismatch in shard 'shard-00001'"


def c_empty_npy(t, _):
    (t / "g.npy").write_bytes(b"")
    return ["fit", str(t / "g.npy"), "--out", str(t / "s.npz")], r"g\.npy is empty \(0 bytes\)"


def c_empty_store_shard(t, _):
    _store(t / "reps")
    (t / "reps" / "shard-00001.npy").write_bytes(b"")
    return ["fit", str(t / "reps"), "--out", str(t / "s.npz")], r"shard 'shard-00001'.* is empty \(0 bytes\)"


def c_npz_under_npy_name(t, _):
    _subspace(t / "s.npz", _rows())
    np.savez(t / "g.npz", a=_rows())
    os.rename(t / "g.npz", t / "g.npy")
    return ["score", str(t / "g.npy"), "--subspace", str(t / "s.npz"), "--out", str(t / "o.npy")], \
        r"g\.npy holds an \.npz archive"


def c_fit_out_is_a_directory(t, _):
    _npy(t / "g.npy")
    (t / "outdir").mkdir()
    return ["fit", str(t / "g.npy"), "--out", str(t / "outdir")], r"--out .*outdir is a directory"


def c_fit_out_under_a_file(t, _):
    _npy(t / "g.npy")
    (t / "afile").write_text("x")
    return ["fit", str(t / "g.npy"), "--out", str(t / "afile" / "s.npz"), "--k", "2"], \
        r"error: File exists: .*afile; check the path"


def c_truncated_subspace(t, _):
    _subspace(t / "s.npz", _npy(t / "g.npy"))
    (t / "s.npz").write_bytes((t / "s.npz").read_bytes()[:300])
    return ["score", str(t / "g.npy"), "--subspace", str(t / "s.npz"), "--out", str(t / "o.npy")], \
        r"s\.npz: cannot read a subspace file"


def c_stability_seeds_abc(t, _):
    _npy(t / "g.npy")
    return ["select", str(t / "g.npy"), "--budget", "5", "--out", str(t / "sel"), "--stability-seeds", "abc"], \
        r"--stability-seeds 'abc': give comma-separated integers"


def c_baseline_unknown_opt(t, _):
    _npy(t / "g.npy")
    return ["baseline", "--method", "kcenter", str(t / "g.npy"), "--budget", "5", "--out", str(t / "kc"),
            "--opt", "bogus=1"], r"--opt bogus: the kcenter method has no option 'bogus'; its options: "


def c_baseline_opt_without_value(t, _):
    _npy(t / "g.npy")
    return ["baseline", "--method", "semdedup", str(t / "g.npy"), "--budget", "5", "--out", str(t / "sd"),
            "--opt", "eps"], r"--opt 'eps': expected KEY=VALUE"


def c_baseline_opt_wrong_type(t, _):
    _npy(t / "g.npy")
    return ["baseline", "--method", "kcenter", str(t / "g.npy"), "--budget", "5", "--out", str(t / "kc"),
            "--opt", "block_rows=[1]"], r"kcenter.*(wrong type|block_rows)"


def c_manifest_rows_file_escapes(t, _):
    _store(t / "reps")
    _npy(t / "outside.npy", n=20)
    _manifest_edit(t / "reps", lambda m: m["shards"][0].update(rows_file="../outside.npy"))
    return ["fit", str(t / "reps"), "--out", str(t / "s.npz")], r"names the file '\.\./outside\.npy'"


def c_manifest_absolute_ids_file(t, _):
    _store(t / "reps")
    (t / "ids.txt").write_text("".join(f"x{i}\n" for i in range(20)))
    _manifest_edit(t / "reps", lambda m: m["shards"][1].update(ids_file=str(t / "ids.txt")))
    return ["select", str(t / "reps"), "--budget", "5", "--out", str(t / "sel")], \
        r"not a plain path inside the store"


def c_manifest_symlink_escape(t, _):
    _store(t / "reps")
    _npy(t / "outside.npy", n=20)
    os.symlink(t / "outside.npy", t / "reps" / "evil.npy")
    _manifest_edit(t / "reps", lambda m: m["shards"][0].update(rows_file="evil.npy"))
    return ["fit", str(t / "reps"), "--out", str(t / "s.npz")], r"leads outside the store"


def c_manifest_malformed_record(t, _):
    _store(t / "reps")
    _manifest_edit(t / "reps", lambda m: m["shards"][0].pop("count"))
    return ["fit", str(t / "reps"), "--out", str(t / "s.npz")], r"malformed manifest"


def c_duplicate_ids_across_shards(t, _):
    _store(t / "reps", ids=[[f"a{i}" for i in range(20)], [f"b{i}" for i in range(19)] + ["a7"]])
    return ["select", str(t / "reps"), "--budget", "5", "--out", str(t / "sel"), "--stability-seeds", "none"], \
        r"id 'a7' occurs twice in the store .*shard-00000.*shard-00001"


def c_unreachable_dask_scheduler(t, _):
    pytest.importorskip("distributed")
    _npy(t / "g.npy")
    return ["fit", str(t / "g.npy"), "--out", str(t / "s.npz"), "--dask-scheduler", "tcp://127.0.0.1:9"], \
        r"cannot reach the Dask scheduler tcp://127\.0\.0\.1:9"


def c_run_bad_dtype(t, tiny):
    return _run_argv(t, tiny, "--dtype", "bogus"), r"unknown --dtype 'bogus'"


def c_run_bad_device(t, tiny):
    return _run_argv(t, tiny, "--device", "bogus"), r"--device 'bogus' is not a device"


def c_run_cuda_without_cuda(t, tiny):
    _no_cuda()
    return _run_argv(t, tiny, "--device", "cuda"), r"--device cuda requested but CUDA is not available"


def c_run_fit_device_cuda_without_cupy(t, tiny):
    from scalselect_fast.gpu import cuda_available

    if cuda_available()[0]:
        pytest.skip("CuPy sees a GPU here")
    return _run_argv(t, tiny, "--fit-device", "cuda"), r"--fit-device cuda: device 'cuda' needs CuPy|--fit-device cuda: "


def c_extract_cuda_without_cuda(t, tiny):
    _no_cuda()
    return ["extract", "--model", str(tiny["model"]), "--data", str(tiny["data"]), "--image-root",
            str(tiny["root"]), "--out", str(t / "reps"), "--device", "cuda", "--quiet"], \
        r"--device cuda requested but CUDA is not available"


def c_run_bad_budget_before_extract(t, tiny):
    return _run_argv(t, tiny, "--budget", "lots"), r"--budget: budget 'lots' is not a count"


def c_run_budget_above_records(t, tiny):
    return _run_argv(t, tiny, "--budget", "21"), r"asks for 21 rows but only 20 are available"


def c_run_k_zero(t, tiny):
    return _run_argv(t, tiny, "--k", "0"), r"--k 0: the subspace needs at least 1 component"


def c_run_layer_beyond_the_model(t, tiny):
    return _run_argv(t, tiny, "--layer", "99"), r"layer 99 does not exist; the model has 2 decoder layers"


def c_run_bad_quota_before_extract(t, tiny):
    return _run_argv(t, tiny, "--quota", "bogus"), r"--quota 'bogus': expected FIELD="


def c_run_config_value_wrong_type(t, tiny):
    (t / "run.toml").write_text('layer = "abc"\nbudget = "2"\n')
    return _run_argv(t, tiny, "--config", str(t / "run.toml")), r"setting layer \(in .*run\.toml\): 'abc' is not an int"


def c_run_deeply_nested_json(t, tiny):
    (t / "deep.json").write_text("[" + "[" * 200_000 + "]" * 200_000 + "]")
    return _run_argv(t, tiny, data=t / "deep.json"), r"deep\.json: record 0 is nested too deeply"


def c_run_top_level_object(t, tiny):
    (t / "obj.json").write_text(json.dumps({"id": "a", "image": "x.png", "conversations": []}, indent=1))
    return _run_argv(t, tiny, data=t / "obj.json"), r"obj\.json: the top level is a JSON object"


def c_run_top_level_object_one_line(t, tiny):
    (t / "obj.json").write_text(json.dumps({"id": "a", "image": "x.png", "conversations": []}))
    return _run_argv(t, tiny, data=t / "obj.json"), r"obj\.json: the top level is a JSON object"


def c_extract_unknown_model_type(t, _):
    (t / "m").mkdir()
    (t / "m" / "config.json").write_text(json.dumps({"model_type": "no_such_vlm_type", "hidden_size": 8}))
    (t / "data.json").write_text("[]")
    return ["extract", "--model", str(t / "m"), "--data", str(t / "data.json"), "--out", str(t / "reps"),
            "--quiet", "--device", "cpu"], r"m: cannot read the model config .*no_such_vlm_type"


def c_extract_truncated_safetensors(t, tiny):
    import shutil

    shutil.copytree(tiny["model"], t / "m")
    w = next((t / "m").glob("*.safetensors"))
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    return ["extract", "--model", str(t / "m"), "--data", str(tiny["data"]), "--image-root", str(tiny["root"]),
            "--out", str(t / "reps"), "--quiet", "--device", "cpu"], r"m: (cannot load the weights|a weights file)"


def c_extract_into_foreign_store(t, tiny):
    w = StoreWriter(t / "reps", d=6, dtype="float16", provenance={"kind": "another run"})
    w.write_shard(_rows(3), ["a", "b", "c"])
    return ["extract", "--model", str(tiny["model"]), "--data", str(tiny["data"]), "--image-root",
            str(tiny["root"]), "--out", str(t / "reps"), "--quiet", "--device", "cpu"], \
        r"already holds a store from a different run"


def _no_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")


def _run_argv(t, tiny, *extra, data=None):
    return ["run", "--model", str(tiny["model"]), "--data", str(data or tiny["data"]), "--image-root",
            str(tiny["root"]), "--out", str(t / "out"), "--budget", "2", "--quiet", "--device", "cpu",
            *extra]


CORE_CASES = {name[2:]: fn for name, fn in sorted(globals().items()) if name.startswith("c_")}
NEEDS_MODEL = {"run_layer_beyond_the_model", "run_bad_quota_before_extract", "run_fit_device_cuda_without_cupy", "run_bad_dtype", "run_bad_device", "run_cuda_without_cuda", "extract_cuda_without_cuda",
               "run_bad_budget_before_extract", "run_budget_above_records", "run_k_zero",
               "run_config_value_wrong_type", "run_deeply_nested_json", "run_top_level_object",
               "run_top_level_object_one_line", "extract_truncated_safetensors", "extract_into_foreign_store"}
#: run in a fresh interpreter: what a user sees, including interpreter-level failures
SUBPROCESS = {"run_deeply_nested_json", "unreachable_dask_scheduler", "fit_out_is_input"}


@pytest.mark.parametrize("case", sorted(CORE_CASES))
def test_hostile_core(case, tmp_path, request, capsys):
    tiny = request.getfixturevalue("tiny") if case in NEEDS_MODEL else None
    work = tmp_path / "case"
    work.mkdir()
    argv, pattern = CORE_CASES[case](work, tiny)
    before = _tree(work)
    model_before = _tree(tiny["model"].parent) if tiny else None
    if case in SUBPROCESS:
        rc, _out, err = _cli_subprocess(argv, {"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "3s"})
    else:
        capsys.readouterr()  # what building the fixtures printed
        rc = cli.main(argv)
        err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (rc, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    import re

    assert re.search(pattern, lines[0]), lines[0]
    assert _tree(work) == before, "an input changed or an output was left behind"
    if tiny:
        assert _tree(tiny["model"].parent) == model_before


def test_checksums_are_verified_by_every_reader(tmp_path):
    """API level: leverage_scores, read_rows and ids-free readers refuse a flipped shard; good data passes."""
    from scalselect_fast import leverage_scores
    from scalselect_fast.store import StoreSource

    store = _store(tmp_path / "reps")
    sub_good = StoreSource(store)
    from scalselect_fast.subspace import fit_subspace

    sub = fit_subspace(sub_good, k=2)
    reference = leverage_scores(StoreSource(store), sub)
    _flip_bytes(store / "shard-00001.npy")
    with pytest.raises(StoreError, match="checksum mismatch in shard 'shard-00001'"):
        leverage_scores(StoreSource(store), sub)
    with pytest.raises(StoreError, match="checksum mismatch in shard 'shard-00001'"):
        StoreSource(store).read_rows([25])
    # shard 0 is intact: random access into it still works, and equals the original rows
    np.testing.assert_array_equal(StoreSource(store).read_rows([3])[0], _rows(20, 6, seed=0)[3])
    assert np.isfinite(reference).all()


def test_verification_is_once_per_shard(tmp_path):
    """A second full read through the same source does not recompute the CRC (it reads the data once)."""
    store = _store(tmp_path / "reps")
    from scalselect_fast.store import StoreSource

    src = StoreSource(store)
    calls = []
    real = zlib.crc32
    import scalselect_fast.store as st

    st.zlib = type("Z", (), {"crc32": staticmethod(lambda *a: calls.append(1) or real(*a))})
    try:
        list(src.iter_blocks(8))
        first = len(calls)
        list(src.iter_blocks(8))
        assert first > 0 and len(calls) == first
        list(src.iter_blocks(8, verify=True))  # an explicit verify=True checks again
        assert len(calls) > first
    finally:
        st.zlib = zlib


@pytest.mark.parametrize("budget,expect", [("1.0", 40), ("1", 1), ("0.999", 40), ("0.5", 20), ("2", 2),
                                           ("100%", 40), ("2.0", 2)])
def test_budget_one_point_zero_is_everything(tmp_path, budget, expect, capsys):
    from scalselect_fast.scoring import resolve_budget

    assert resolve_budget(budget, 40) == expect
    assert resolve_budget(float(budget), 40) == expect if "." in budget else True
    rc = cli.main(["select", str(_npy(tmp_path / "g.npy")), "--budget", budget, "--out", str(tmp_path / "s"),
                   "--k", "2", "--stability-seeds", "none"])
    assert rc == 0
    assert len((tmp_path / "s" / "selected.txt").read_text().splitlines()) == expect


def test_plan_refuses_unwritable_out_and_prints_small_sizes(tmp_path):
    from scalselect_fast.plan import estimate_run

    (tmp_path / "afile").write_text("x")
    est = estimate_run(10, d=8, out_dir=tmp_path / "afile" / "sub", disk_free=1 << 40)
    assert not est.ok and "fits: yes" not in est.format()
    assert any("is not a writable folder" in p for p in est.problems)
    small = estimate_run(10, d=8, out_dir=tmp_path, disk_free=100)
    msg = " ".join(small.problems)
    assert "disk: needs ~" in msg and "0.00 GiB" not in msg and "100 B is free" in msg
    assert "0.00 GiB" not in small.format()


def test_refuse_overwrite_allows_new_files_beside_inputs(tmp_path):
    """The check refuses only real clashes: a new file in a store, a fresh output folder, pass."""
    from scalselect_fast.paths import OverwriteError, refuse_overwrite

    store = _store(tmp_path / "reps")
    refuse_overwrite([store / "sub.npz"], [store])           # a new file inside an input folder
    refuse_overwrite([tmp_path / "new-out"], [store])         # a folder that does not exist yet
    refuse_overwrite([tmp_path / "other"], [store / "shard-00000.npy"])
    with pytest.raises(OverwriteError):
        refuse_overwrite([store / "manifest.json"], [store])
    with pytest.raises(OverwriteError):
        refuse_overwrite([tmp_path], [store])                  # an existing folder holding the input


def test_ctrl_c_exits_130_with_resume_hint(tiny, tmp_path):
    """A real SIGINT to a running `scalselect run`: exit 130 and the one-line hint, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "scalselect_fast", *_run_argv(tmp_path, tiny)[:-3], "--log-json",
            "--device", "cpu"]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in p.stdout:  # wait until the run is under way
            if '"run_start"' in line:
                break
        p.send_signal(signal.SIGINT)
        _out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith("interrupted; rerun the same command to resume")


# --------------------------------------------------------------------------------------------------
# (2) run-level cases                                    [integ-run appends below]
# --------------------------------------------------------------------------------------------------
