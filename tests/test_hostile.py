"""Hostile inputs (issue 12): every refusal is exit status 2 with ONE line on stderr and no traceback,
every input is byte-identical afterwards, and no output (not even a partial one) is left behind.

Each case builds its files in its own folder and returns the command line; the harness hashes every
file under that folder before and after, so "inputs untouched" and "no partial outputs" are one
check: the folder's files are exactly what they were.

Sections: (1) core commands, validation, stores, models (below; issue 21's refusals close it);
(2) run-level cases; (3) issue 21 (round two: surrogates, bombs, API types, URLs, quotas, a dataset
edited during the run), at the end.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import struct
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
def tiny(tmp_path_factory, tiny_llava):
    """The suite's tiny LLaVA checkpoint and a 20-record dataset with images (built once)."""
    from scalselect_fast.data.demo import make_demo_dataset

    base = tmp_path_factory.mktemp("hostile-model")
    make_demo_dataset(base / "data", n=20, seed=1)
    return {"model": tiny_llava, "data": base / "data" / "demo.json", "root": base / "data"}


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


def c_manifest_nested_too_deep(t, _):
    _store(t / "reps")
    (t / "reps" / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    return ["score", str(t / "reps"), "--subspace", str(_subspace(t / "s.npz", _rows())), "--out",
            str(t / "o.npy")], r"manifest\.json: unreadable manifest \(RecursionError"


def c_manifest_not_an_object(t, _):
    _store(t / "reps")
    (t / "reps" / "manifest.json").write_text("[1, 2]")
    return ["fit", str(t / "reps"), "--out", str(t / "s.npz")], r"manifest\.json: not a scalselect-store manifest"


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


def c_extract_shard_size_zero(t, tiny):
    return ["extract", "--model", str(tiny["model"]), "--data", str(tiny["data"]), "--image-root", str(tiny["root"]),
            "--out", str(t / "reps"), "--quiet", "--shard-size", "0"], r"--shard-size and --batch-size must be positive"


def c_extract_max_length_zero(t, tiny):
    return ["extract", "--model", str(tiny["model"]), "--data", str(tiny["data"]), "--image-root", str(tiny["root"]),
            "--out", str(t / "reps"), "--quiet", "--max-length", "0"], r"--max-length 0: must be a positive"


def c_extract_missing_image_root(t, tiny):
    return ["extract", "--model", str(tiny["model"]), "--data", str(tiny["data"]), "--image-root", str(t / "nope"),
            "--out", str(t / "reps"), "--quiet"], r"--image-root .*nope: not a directory"


def c_extract_unknown_model_type(t, _):
    (t / "m").mkdir()
    (t / "m" / "config.json").write_text(json.dumps({"model_type": "no_such_vlm_type", "hidden_size": 8}))
    (t / "data.json").write_text("[]")
    return ["extract", "--model", str(t / "m"), "--data", str(t / "data.json"), "--out", str(t / "reps"),
            "--quiet", "--device", "cpu"], r"m: cannot read the model config .*no_such_vlm_type"


def c_extract_truncated_safetensors(t, tiny):

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


# ---- issue 21 (round two): refused before the first stage, so the folder stays as it was ---------
def c_select_stability_seed_negative(t, _):
    _npy(t / "g.npy")
    return ["select", str(t / "g.npy"), "--budget", "5", "--out", str(t / "sel"), "--stability-seeds=-1"], \
        r"--stability-seeds '-1': seed -1 is negative; seeds are integers >= 0"


def c_select_stability_seed_negative_in_a_list(t, _):
    _npy(t / "g.npy")
    return ["select", str(t / "g.npy"), "--budget", "5", "--out", str(t / "sel"), "--stability-seeds=-1,2"], \
        r"--stability-seeds '-1,2': seed -1 is negative"


def c_select_seed_negative(t, _):
    _npy(t / "g.npy")
    return ["select", str(t / "g.npy"), "--budget", "5", "--out", str(t / "sel"), "--k", "2", "--seed=-1"], \
        r"--seed -1: seeds are integers >= 0"


def c_baseline_seed_negative(t, _):
    _npy(t / "g.npy")
    return ["baseline", "--method", "random", str(t / "g.npy"), "--budget", "5", "--out", str(t / "r"),
            "--seed=-1"], r"--seed -1: seeds are integers >= 0"


def c_fit_seed_negative_randomized(t, _):
    _npy(t / "g.npy")
    return ["fit", str(t / "g.npy"), "--out", str(t / "s.npz"), "--k", "2", "--solver", "randomized",
            "--seed=-1"], r"--seed -1: seeds are integers >= 0"


def c_fit_seed_negative_exact(t, _):
    _npy(t / "g.npy")
    return ["fit", str(t / "g.npy"), "--out", str(t / "s.npz"), "--k", "2", "--solver", "exact", "--seed=-1"], \
        r"--seed -1: seeds are integers >= 0"


def c_run_stability_seed_negative(t, tiny):
    return _run_argv(t, tiny, "--stability-seeds=-1"), r"--stability-seeds '-1': seed -1 is negative"


def c_run_stability_seed_negative_in_a_list(t, tiny):
    return _run_argv(t, tiny, "--stability-seeds=-1,2"), r"--stability-seeds '-1,2': seed -1 is negative"


def c_run_config_stability_seed_negative(t, tiny):
    (t / "run.toml").write_text("stability-seeds = [0, -1]\n")
    return _run_argv(t, tiny, "--config", str(t / "run.toml")), r"--stability-seeds '0,-1': seed -1 is negative"


def c_run_seed_negative_randomized(t, tiny):
    return _run_argv(t, tiny, "--seed=-1", "--solver", "randomized"), r"--seed -1: seeds are integers >= 0"


def c_run_seed_negative_exact(t, tiny):
    return _run_argv(t, tiny, "--seed=-1", "--solver", "exact"), r"--seed -1: seeds are integers >= 0"


def c_run_config_same_setting_twice(t, tiny):
    (t / "run.toml").write_text(f'image-root = "{tiny["root"]}"\nimage_root = "{t}"\n')
    return _run_argv(t, tiny, "--config", str(t / "run.toml")), \
        r"run\.toml: 'image-root' and 'image_root' are the same setting, given twice; keep one"


def c_run_config_same_setting_twice_json(t, tiny):
    (t / "run.json").write_text(json.dumps({"stability_seeds": "0", "stability-seeds": "1"}))
    return _run_argv(t, tiny, "--config", str(t / "run.json")), \
        r"run\.json: 'stability_seeds' and 'stability-seeds' are the same setting"


def c_run_jsonl_format_on_a_json_list(t, tiny):
    (t / "list.json").write_text(json.dumps(json.loads(tiny["data"].read_text())))  # one line: one "record"
    return _run_argv(t, tiny, "--format", "jsonl", data=t / "list.json"), \
        (r"list\.json': all 1 records were skipped, nothing to select: invalid_field: 1 \(e\.g\. record 0 \(line 1\)"
         r".*record is a list, expected a JSON object.* read as jsonl \(--format jsonl\): pass --format json or "
         r"--format auto")


def c_run_quota_on_a_field_no_record_has(t, tiny):
    return _run_argv(t, tiny, "--quota", "lang=en>=10%"), \
        r"--quota lang=\.\.\.: no record of .*demo\.json has a field 'lang' \(all 20 lack it\), so every record"


def _free_loopback_port() -> int:
    """A port on 127.0.0.1 that nobody listens on (bound by the OS, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def c_run_url_connection_refused(t, tiny):
    pytest.importorskip("aiohttp")
    url = f"http://127.0.0.1:{_free_loopback_port()}/x.json"
    return _run_argv(t, tiny, data=url), rf"--data '{re.escape(url)}': cannot reach it \(.*\); check the URL"


def c_run_jsonl_format_on_a_pretty_json_list(t, tiny):
    (t / "list.json").write_text(json.dumps(json.loads(tiny["data"].read_text()), indent=2))
    return _run_argv(t, tiny, "--format", "jsonl", data=t / "list.json"), \
        r"list\.json: line 1: malformed JSON.* Its content is json, but it was read as jsonl \(--format jsonl\)"


ROUND_TWO_NEEDS_MODEL = {"run_stability_seed_negative", "run_stability_seed_negative_in_a_list",
                         "run_config_stability_seed_negative", "run_seed_negative_randomized",
                         "run_seed_negative_exact", "run_config_same_setting_twice",
                         "run_config_same_setting_twice_json", "run_jsonl_format_on_a_json_list",
                         "run_jsonl_format_on_a_pretty_json_list",
                         "run_quota_on_a_field_no_record_has", "run_url_connection_refused"}


CORE_CASES = {name[2:]: fn for name, fn in sorted(globals().items()) if name.startswith("c_")}
NEEDS_MODEL = {"extract_shard_size_zero", "extract_max_length_zero", "extract_missing_image_root", "run_layer_beyond_the_model", "run_bad_quota_before_extract", "run_fit_device_cuda_without_cupy", "run_bad_dtype", "run_bad_device", "run_cuda_without_cuda", "extract_cuda_without_cuda",
               "run_bad_budget_before_extract", "run_budget_above_records", "run_k_zero",
               "run_config_value_wrong_type", "run_deeply_nested_json", "run_top_level_object",
               "run_top_level_object_one_line", "extract_truncated_safetensors", "extract_into_foreign_store"} | ROUND_TWO_NEEDS_MODEL
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


@pytest.mark.parametrize("argv", [["select", "x.npy", "--budget"], ["bogus"], ["run", "--dtype"],
                                  ["fit", "x.npy", "--out", "s.npz", "--energy", "lots"]])
def test_usage_errors_are_one_line(tmp_path, argv):
    rc, _out, err = _cli_subprocess(argv)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "error:" in lines[0] and "--help" in lines[0], err
    assert "usage:" not in err


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
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root writes through chmod: a read-only mount is the real case
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(ro)],
                                 capture_output=True).returncode == 0
    else:
        ro.chmod(0o500)
        mounted = True
    try:
        if mounted:
            est = estimate_run(10, d=8, out_dir=ro / "out", disk_free=1 << 40)
            assert not est.ok and "fits: yes" not in est.format() and "CANNOT RUN" in est.format()
    finally:
        if os.geteuid() == 0 and mounted:
            subprocess.run(["umount", "-l", str(ro)], capture_output=True)
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
    os.link(store / "shard-00001.npy", tmp_path / "elsewhere.npz")  # a hard link to a file of the store
    with pytest.raises(OverwriteError, match="shard-00001.npy"):
        refuse_overwrite([tmp_path / "elsewhere.npz"], [store])


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
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith("interrupted; rerun the same command to resume")
    assert json.loads(out.strip().splitlines()[-1])["type"] == "KeyboardInterrupt"  # --log-json: an event too


# --------------------------------------------------------------------------------------------------
# (2) run-level cases                                    [integ-run appends below]
# --------------------------------------------------------------------------------------------------
# ---- run-level cases (integ-run) ----------------------------------------------------------------
# Locks on --out and on a store, a FIFO / device as an image, an enormous PNG that is tiny on disk,
# ids with line breaks, a malformed JSONL line at the end, a corrupt or deleted shard of a finished
# run, an image replaced after extraction. Datasets have a handful of samples (seconds per run).
pytest.importorskip("torch")
pytest.importorskip("transformers")

_REPO = Path(__file__).resolve().parents[1]


def _digest_tree(*paths: Path) -> dict:
    """sha256 of every file under the given files/directories (to prove inputs were not touched)."""
    out = {}
    for p in paths:
        for f in sorted([p] if p.is_file() else p.rglob("*")):
            if f.is_file() and not f.is_fifo():
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().split("\n") if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _conv(text="What is shown?", image=True):
    return [{"from": "human", "value": ("<image>\n" if image else "") + text}, {"from": "gpt", "value": "A shape."}]


def _one_bit_png(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of the given size, compressed as it is built (never held decoded)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def hostile_env(tmp_path_factory):
    from PIL import Image

    from scalselect_fast.extract import build_tiny_model

    base = tmp_path_factory.mktemp("hostile-run")
    model = build_tiny_model("llava", base / "tiny-llava", num_layers=2)
    root = base / "data"
    (root / "img").mkdir(parents=True)
    rs = np.random.RandomState(0)
    for i in range(6):
        Image.fromarray((rs.rand(24, 24 + 4 * i, 3) * 255).astype("uint8")).save(root / "img" / f"{i}.png")
    good = [{"id": f"s{i}", "image": f"img/{i}.png", "conversations": _conv()} for i in range(6)]
    data = root / "data.json"
    data.write_text(json.dumps(good))
    return {"base": base, "model": model, "root": root, "data": data, "good": good}


def _run_args(env, data, out, *extra):
    return ["run", "--model", str(env["model"]), "--data", str(data), "--image-root", str(env["root"]),
            "--out", str(out), "--budget", "3", "--shard-size", "2", "--batch-size", "2", "--quiet", *extra]


def _hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding ``path`` the documented way (flock + its PID in the file)."""
    code = ("import fcntl, os, sys\n"
            f"fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.write(fd, str(os.getpid()).encode())\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert p.stdout.readline().strip() == b"locked"
    return p


@pytest.mark.parametrize("target", ["run", "extract"])
def test_second_writer_is_refused_naming_the_holder(hostile_env, tmp_path, capsys, target):
    env = hostile_env
    out = tmp_path / "out"
    out.mkdir()
    lock = out / (".scalselect.lock" if target == "run" else ".extract.lock")
    before = _digest_tree(env["root"])
    holder = _hold_lock(lock)
    try:
        if target == "run":
            argv = _run_args(env, env["data"], out)
        else:
            argv = ["extract", "--model", str(env["model"]), "--data", str(env["data"]), "--image-root",
                    str(env["root"]), "--out", str(out), "--dtype", "fp32", "--device", "cpu", "--quiet"]
        rc = cli.main(argv)
        line = _one_line(capsys.readouterr().err)
        assert rc == 2
        assert f"PID {holder.pid}" in line and "in use" in line and str(out) in line
        assert sorted(p.name for p in out.iterdir()) == [lock.name]  # nothing written
        assert _digest_tree(env["root"]) == before
    finally:
        holder.send_signal(signal.SIGKILL)  # the OS drops the lock of a killed holder
        holder.wait()
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert _digest_tree(env["root"]) == before
    assert not lock.exists()  # the holder removes its lock file when it finishes


def test_fifo_and_device_images_are_skipped_not_waited_on(hostile_env, tmp_path):
    """A FIFO (no writer) or /dev/zero as an image would block or never end; both are skipped."""
    env = hostile_env
    d = tmp_path / "d"
    shutil.copytree(env["root"] / "img", d / "img")
    os.mkfifo(d / "img" / "pipe.png")
    recs = env["good"][:3] + [{"id": "fifo", "image": "img/pipe.png", "conversations": _conv()},
                              {"id": "dev", "image": "/dev/zero", "conversations": _conv()}]
    data = d / "data.json"
    data.write_text(json.dumps(recs))
    before = _digest_tree(data)
    out = tmp_path / "store"
    # no --image-root: absolute paths are allowed, so /dev/zero reaches the image loader
    p = subprocess.run([sys.executable, "-m", "scalselect_fast", "extract", "--model", str(env["model"]),
                        "--data", str(data), "--out", str(out), "--dtype", "fp32", "--device", "cpu", "--quiet"],
                       cwd=_REPO, env=dict(os.environ, PYTHONPATH=str(_REPO)), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.strip().split("\n")[-1])["rows"] == 3
    skipped = {e["id"]: e for e in map(json.loads, (out / "skipped.jsonl").read_text().split("\n")[:-1])}
    assert set(skipped) == {"fifo", "dev"}
    assert skipped["fifo"]["reason"] == "image_unreadable" and "FIFO" in skipped["fifo"]["detail"]
    assert skipped["dev"]["reason"] == "image_unreadable" and "device" in skipped["dev"]["detail"]
    assert _digest_tree(data) == before and (d / "img" / "pipe.png").is_fifo()


@pytest.fixture(scope="module")
def hostile_records_run(hostile_env):
    """One real run over good samples plus ids with line breaks / U+2028 / U+0085 / U+2029 and a
    12000 x 12000 PNG that is ~20 KB on disk."""
    env = hostile_env
    base = env["base"] / "records"
    shutil.copytree(env["root"], base / "root")
    (base / "root" / "img" / "huge.png").write_bytes(_one_bit_png(12000, 12000))
    odd = {"nl": "a\nb", "cr": "c\rd", "ls": "e\u2028f", "nel": "g\x85h", "ps": "i\u2029j"}
    recs = list(env["good"]) + [
        {"id": odd["nl"], "image": "img/0.png", "conversations": _conv()},
        {"id": odd["cr"], "image": "img/1.png", "conversations": _conv()},
        {"id": odd["ls"], "conversations": _conv(image=False)},   # text-only: skipped with this id
        {"id": odd["nel"], "conversations": _conv(image=False)},
        {"id": odd["ps"], "image": "img/2.png", "conversations": _conv()},  # a valid id: kept
        {"id": "huge", "image": "img/huge.png", "conversations": _conv()},
    ]
    data = base / "data.json"
    data.write_text(json.dumps(recs))
    before = _digest_tree(base / "root")
    out = base / "out"
    env2 = dict(env, root=base / "root")
    rc = cli.main(_run_args(env2, data, out))
    return {"rc": rc, "out": out, "odd": odd, "before": before, "root": base / "root", "data": data}


@pytest.mark.parametrize("case,reason", [("nl", "invalid_id"), ("cr", "invalid_id"), ("ls", "text_only"),
                                         ("nel", "text_only"), ("ps", None), ("huge", "image_too_large")])
def test_hostile_records_are_skipped_with_their_reason(hostile_records_run, case, reason):
    r = hostile_records_run
    assert r["rc"] == 0
    sid = r["odd"].get(case, case)
    raw = (r["out"] / "skipped.jsonl").read_bytes()
    # the log splits into entries on "\n" only, and no entry holds a raw line-break character
    text = raw.decode("utf-8")
    assert not any(ch in text for ch in ("\u2028", "\u2029", "\x85", "\r"))
    assert len(text.splitlines()) == len(text.split("\n")) - 1
    entries = {e["id"]: e for e in map(json.loads, text.split("\n")[:-1])}
    import pyarrow.parquet as pq

    man = {m["id"]: m for m in pq.read_table(r["out"] / "manifest.parquet").to_pylist()}
    if reason is None:
        assert sid not in entries and man[sid]["score"] is not None
    else:
        assert entries[sid]["reason"] == reason
        assert man[sid]["skip_reason"].startswith(reason) and man[sid]["score"] is None
    rep = json.loads((r["out"] / "report.json").read_text())
    assert rep["skip_reasons"] == {"invalid_id": 2, "text_only": 2, "image_too_large": 1}
    assert rep["n_samples"] == 12 and rep["n_valid"] == 7
    assert _digest_tree(r["root"]) == r["before"]


def test_max_image_pixels_is_read_from_the_header(tmp_path):
    from scalselect_fast.data import ImageError, load_image

    p = tmp_path / "big.png"
    p.write_bytes(_one_bit_png(12000, 12000))
    assert p.stat().st_size < 64_000
    with pytest.raises(ImageError, match="12000x12000") as ei:
        load_image(p)  # the default limit, 40 Mpx
    assert ei.value.reason == "image_too_large"
    small = tmp_path / "small.png"
    small.write_bytes(_one_bit_png(300, 200))
    assert load_image(small).size == (300, 200)
    with pytest.raises(ImageError) as ei:
        load_image(small, max_pixels=300 * 200 - 1)
    assert ei.value.reason == "image_too_large"
    assert load_image(small, max_pixels=300 * 200).size == (300, 200)


@pytest.mark.parametrize("bad", ["0", "-5"])
def test_max_image_pixels_option_is_validated(hostile_env, tmp_path, capsys, bad):
    out = tmp_path / "out"
    rc = cli.main(_run_args(hostile_env, hostile_env["data"], out, "--max-image-pixels", bad))
    assert rc == 2 and "--max-image-pixels" in _one_line(capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.parametrize("opt", [("--max-image-pixels", "0"), ("--batch-size", "0"), ("--shard-size", "0"),
                                 ("--threshold", "2")])
def test_extract_option_errors_are_one_line(hostile_env, tmp_path, capsys, opt):
    env = hostile_env
    out = tmp_path / "store"
    rc = cli.main(["extract", "--model", str(env["model"]), "--data", str(env["data"]), "--image-root",
                   str(env["root"]), "--out", str(out), "--quiet", *opt])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and not out.exists()
    assert opt[0] in line or opt[0].lstrip("-").replace("-", "_") in line  # the CLI's or the API's name


def test_malformed_jsonl_line_at_the_end_stops_before_extraction(hostile_env, tmp_path, capsys):
    env = hostile_env
    data = tmp_path / "d.jsonl"
    lines = [json.dumps(dict(r, image=str(env["root"] / r["image"]))) for r in env["good"]]
    data.write_text("\n".join(lines) + '\n{"id": "s6", "conversations": [\n')
    before = _digest_tree(data)
    out = tmp_path / "out"
    rc = cli.main(_run_args(env, data, out))
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and "line 7" in line and "malformed JSON" in line
    assert not (out / ".scalselect" / "reps").exists()  # found by the counting pass: nothing extracted
    assert _digest_tree(data) == before


def _scores(out: Path) -> dict:
    import pyarrow.parquet as pq

    return {m["id"]: m["score"] for m in pq.read_table(out / "manifest.parquet").to_pylist()}


def _files(store: Path) -> dict:
    """name -> (inode, sha256) of every shard file, to prove which ones were kept untouched."""
    return {p.name: (p.stat().st_ino, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(store.glob("shard-*")) if p.suffix in (".npy", ".txt")}


@pytest.fixture(scope="module")
def finished_run(hostile_env):
    """A finished run over 6 samples in 3 shards of 2: the reference for the repair cases."""
    out = hostile_env["base"] / "finished"
    assert cli.main(_run_args(hostile_env, hostile_env["data"], out)) == 0
    return {"out": out, "selected": (out / "selected.json").read_bytes(), "scores": _scores(out)}


def _damage(shard: Path, how: str) -> None:
    npy, ids = shard.with_suffix(".npy"), shard.with_suffix(".ids.txt")
    if how == "flipped":
        raw = bytearray(npy.read_bytes())
        for k in range(1, 5):
            raw[-4 * k] ^= 0xFF
        npy.write_bytes(bytes(raw))
    elif how == "truncated":
        npy.write_bytes(npy.read_bytes()[:-40])
    else:
        npy.unlink()
        ids.unlink()


@pytest.mark.parametrize("how", ["flipped", "truncated", "deleted"])
def test_a_damaged_shard_of_a_finished_run_is_re_extracted_alone(hostile_env, finished_run, tmp_path, capsys, how):
    env = hostile_env
    out = tmp_path / "out"
    shutil.copytree(finished_run["out"], out)
    store = out / ".scalselect" / "reps"
    kept = {k: v for k, v in _files(store).items() if not k.startswith("shard-00001")}
    before = _digest_tree(env["root"])
    _damage(store / "shard-00001", how)
    capsys.readouterr()
    rc = cli.main(_run_args(env, env["data"], out))
    err = capsys.readouterr().err
    assert rc == 0, err
    line = next(ln for ln in err.split("\n") if "shard-00001" in ln)
    assert line.startswith("warning: shard shard-00001") and "re-extracting only that shard" in line
    assert ("missing" if how == "deleted" else "corrupt") in line
    # the good shards were kept as they were (same inode, same bytes); the damaged one is back, intact
    after = _files(store)
    assert {k: v for k, v in after.items() if not k.startswith("shard-00001")} == kept
    assert {"shard-00001.npy", "shard-00001.ids.txt"} <= set(after)
    aside = sorted(p.name for p in store.glob("shard-00001.npy.corrupt-*"))
    assert len(aside) == (0 if how == "deleted" else 1)
    assert (out / "selected.json").read_bytes() == finished_run["selected"]
    assert _scores(out) == pytest.approx(finished_run["scores"], rel=1e-9, abs=1e-12)
    assert _digest_tree(env["root"]) == before
    # and the repaired run is whole again: the next rerun finds nothing to redo
    assert cli.main(_run_args(env, env["data"], out)) == 0
    assert "shard" not in capsys.readouterr().err


def test_extract_rerun_repairs_a_corrupt_shard(hostile_env, tmp_path, capsys):
    env = hostile_env
    out = tmp_path / "store"
    argv = ["extract", "--model", str(env["model"]), "--data", str(env["data"]), "--image-root", str(env["root"]),
            "--out", str(out), "--dtype", "fp32", "--device", "cpu", "--shard-size", "2", "--quiet"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    ref = _files(out)
    _damage(out / "shard-00002", "flipped")
    assert cli.main(argv) == 0
    cap = capsys.readouterr()
    summary = json.loads(cap.out.strip().split("\n")[-1])
    assert summary["shards_redone"] == ["shard-00002"] and summary["shards_written"] == 1
    assert summary["shards_resumed"] == 2 and "shard-00002" in cap.err and "corrupt" in cap.err
    after = _files(out)
    assert {k: v[1] for k, v in after.items()} == {k: v[1] for k, v in ref.items()}  # the original bytes
    assert all(after[k] == ref[k] for k in ref if not k.startswith("shard-00002"))  # the others never moved


def test_a_changed_image_redoes_its_shard(hostile_env, tmp_path, capsys):
    """Replacing an image (dataset file unchanged) re-extracts the shard holding it, and the result
    equals a fresh run on the new images."""
    from PIL import Image

    env = hostile_env
    root = tmp_path / "root"
    shutil.copytree(env["root"], root)
    env2 = dict(env, root=root)
    data = root / "data.json"
    out = tmp_path / "out"
    assert cli.main(_run_args(env2, data, out)) == 0
    store = out / ".scalselect" / "reps"
    kept = {k: v for k, v in _files(store).items() if not k.startswith("shard-00001")}
    old_scores = _scores(out)
    rs = np.random.RandomState(7)
    Image.fromarray((rs.rand(40, 30, 3) * 255).astype("uint8")).save(root / "img" / "3.png")  # record 3
    capsys.readouterr()
    assert cli.main(_run_args(env2, data, out)) == 0
    err = capsys.readouterr().err
    redo = [ln for ln in err.split("\n") if "re-extracting" in ln]
    assert len(redo) == 1 and "shard-00001" in redo[0] and "images changed" in redo[0]
    assert {k: v for k, v in _files(store).items() if not k.startswith("shard-00001")} == kept
    fresh = tmp_path / "fresh"
    assert cli.main(_run_args(env2, data, fresh)) == 0
    assert _scores(out) == pytest.approx(_scores(fresh), rel=1e-9, abs=1e-12)
    assert _scores(out)["s3"] != pytest.approx(old_scores["s3"], rel=1e-6)
    assert (out / "selected.json").read_bytes() == (fresh / "selected.json").read_bytes()


def test_a_shard_that_rots_unseen_is_redone_when_the_fit_reads_it(hostile_env, finished_run, tmp_path, capsys):
    """Bytes flipped with the file's size and mtime kept (bit rot, a restore with -p): nothing shows
    before the read; the fit's CRC check finds it, and the run re-extracts that shard and refits."""
    env = hostile_env
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "scalselect_fast", *_run_args(env, env["data"], out)], cwd=_REPO,
                       env=dict(os.environ, PYTHONPATH=str(_REPO), SCALSELECT_CRASH_AT="fit.shard:1",
                                SCALSELECT_FIT_CHECKPOINT_S="0"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]  # killed inside the fit, extraction finished
    store = out / ".scalselect" / "reps"
    npy = store / "shard-00002.npy"
    st = npy.stat()
    _damage(store / "shard-00002", "flipped")
    os.utime(npy, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert npy.stat().st_mtime_ns == st.st_mtime_ns and npy.stat().st_size == st.st_size
    before = _digest_tree(env["root"])
    capsys.readouterr()
    rc = cli.main(_run_args(env, env["data"], out))
    err = capsys.readouterr().err
    assert rc == 0, err
    redo = [ln for ln in err.split("\n") if "re-extracting" in ln]
    assert len(redo) == 1 and "shard shard-00002" in redo[0] and "checksum mismatch" in redo[0]
    assert "then redoing the fit" in redo[0]  # found by the fit's read, not by the start-up check
    assert len(list(store.glob("shard-00002.npy.corrupt-*"))) == 1
    assert (out / "selected.json").read_bytes() == finished_run["selected"]
    assert _scores(out) == pytest.approx(finished_run["scores"], rel=1e-9, abs=1e-12)
    assert _digest_tree(env["root"]) == before


# --------------------------------------------------------------------------------------------------
# (3) issue 21 (round two), run-level and API
# --------------------------------------------------------------------------------------------------
def test_lone_surrogates_are_skipped_per_sample(hostile_env, tmp_path, capsys):
    """``"\\ud800"`` is valid JSON but no character: as an id it is skipped as invalid_id, in message
    text as invalid_field (a tokenizer cannot take it); a kept record whose source holds one is kept,
    and every output (skip log, manifest, report, selected dataset) is still written."""
    import pyarrow.parquet as pq

    env = hostile_env
    recs = [dict(r, source="web\udfff") for r in env["good"][:4]] + [
        {"id": "\ud800", "image": "img/4.png", "conversations": _conv()},
        {"id": "text", "image": "img/5.png", "conversations": _conv("What is \udc80 shown?")}]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(recs))  # ensure_ascii: the file holds the escapes, as such files do
    before = _digest_tree(data, env["root"])
    out = tmp_path / "out"
    rc = cli.main(_run_args(env, data, out))
    assert rc == 0, capsys.readouterr().err
    raw = (out / "skipped.jsonl").read_bytes()
    entries = {e["index"]: e for e in map(json.loads, raw.decode("utf-8").split("\n")[:-1])}
    assert set(entries) == {4, 5}
    assert entries[4]["id"] == "\ud800" and entries[4]["reason"] == "invalid_id"
    assert entries[5]["id"] == "text" and entries[5]["reason"] == "invalid_field"
    assert "lone surrogate" in entries[4]["detail"] and "message 0" in entries[5]["detail"]
    man = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [m["id"] for m in man] == ["s0", "s1", "s2", "s3", None, "text"]
    assert man[4]["skip_reason"].startswith("invalid_id") and man[5]["skip_reason"].startswith("invalid_field")
    rep = json.loads((out / "report.json").read_text())
    assert rep["skip_reasons"] == {"invalid_id": 1, "invalid_field": 1} and rep["n_selected"] == 3
    assert rep["per_source"]["web\\udfff"]["valid"] == 4
    selected = json.loads((out / "selected.json").read_text())
    assert len(selected) == 3 and all(r in recs[:4] for r in selected)
    assert _digest_tree(data, env["root"]) == before


def test_a_lone_surrogate_id_is_skipped_by_read_dataset(tmp_path):
    from scalselect_fast.data import SkipLog, read_dataset, read_skip_log

    (tmp_path / "a.png").write_bytes(_one_bit_png(4, 4))
    lines = [json.dumps({"id": i, "image": "a.png", "conversations": _conv()}) for i in ("ok", "\udbff", "x\ud800y")]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    with SkipLog(tmp_path / "skipped.jsonl") as log:
        assert [s.id for s in read_dataset(tmp_path / "d.jsonl", skip_log=log)] == ["ok"]
    got = [(e["id"], e["reason"]) for e in read_skip_log(tmp_path / "skipped.jsonl")]
    assert got == [("\udbff", "invalid_id"), ("x\ud800y", "invalid_id")]
    (tmp_path / "skipped.jsonl").read_bytes().decode("utf-8")  # the log itself is UTF-8


def _api_calls() -> dict:
    """name -> (a call with an argument of the wrong type, the TypeError message it must give)."""
    from scalselect_fast.data import count_records, open_dataset, read_dataset
    from scalselect_fast.run import load_config_file, make_config, run

    return {
        "run-None": (lambda: run(None), r"run\(cfg\): cfg must be a RunConfig, got NoneType; build one with .*make_config"),
        "run-dict": (lambda: run({"model": "m", "data": "d.json", "out": "o"}),
                     r"run\(cfg\): cfg must be a RunConfig, got dict"),
        "read_dataset-bytes": (lambda: list(read_dataset(b"/path/d.json")),
                               r"read_dataset: path must be a path \(str or os.PathLike\), a list of paths, .*got bytes"),
        "read_dataset-list-with-None": (lambda: list(read_dataset([".", None])),
                                        r"read_dataset: path must be a path .*got NoneType"),
        "read_dataset-image_root-bytes": (lambda: list(read_dataset(".", image_root=b".")),
                                          r"read_dataset: image_root must be a directory path \(str or os.PathLike\) "
                                          r"or None, got bytes"),
        "count_records-int": (lambda: count_records(3), r"count_records: path must be a path .*got int"),
        "open_dataset-format-None": (lambda: open_dataset("d.json", format=None),
                                    r"format must be a string \('auto' or one of json"),
        "make_config-budget-list": (lambda: make_config(budget=[3]),
                                    r"setting budget: \[3\] is not a count \(int, e.g. 100000\), a fraction "
                                    r"\(float, e.g. 0.16\) or a string"),
        "make_config-layer-str": (lambda: make_config(layer="abc"), r"setting layer: 'abc' is not an int"),
        "make_config-quota-str": (lambda: make_config(quota="source=a>=1%"),
                                  r"setting quota: expected a list of strings such as \['source=coco<=40%'\], "
                                  r"got 'source=a>=1%'"),
        "make_config-data-bytes": (lambda: make_config(data=b"d.json"),
                                   r"setting data: b'd.json' is not a path \(str or os.PathLike\)"),
        "load_config_file-int": (lambda: load_config_file(7),
                                 r"config file: expected a path \(str or os.PathLike\) to a .toml, .yaml or "
                                 r".json file, got int"),
        "make_config-unknown": (lambda: make_config(bugdet=3), r"make_config: unknown run setting 'bugdet'; known: .*budget"),
    }


@pytest.mark.parametrize("case", sorted(_api_calls()))
def test_api_entry_points_say_what_they_accept(case):
    """Each public entry point refuses a wrong type with a TypeError naming the argument and what it
    accepts (not an AttributeError or a bytes/str mix-up from deep inside)."""
    call, pattern = _api_calls()[case]
    with pytest.raises(TypeError, match=pattern):
        call()


def test_make_config_type_errors_are_run_errors_too(tmp_path):
    """The CLI reports RunError in one line: a config file's wrong type is one, and a TypeError too."""
    from scalselect_fast.run import RunError, make_config

    (tmp_path / "run.toml").write_text("budget = [3]\n")
    with pytest.raises(RunError, match=r"setting budget \(in .*run\.toml\): \[3\] is not a count") as ei:
        make_config(tmp_path / "run.toml")
    assert isinstance(ei.value, TypeError)
    assert make_config(budget=3).budget == "3" and make_config(budget=0.16).budget == "0.16"
    assert make_config(budget="16%").budget == "16%"


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` but whose pixel data is empty (a bomb's header
    without the bomb: what matters is that nothing past the header is needed to refuse it)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_max_image_pixels_governs_above_pillows_bomb_limit(tmp_path):
    """Pillow refuses over 2 x Image.MAX_IMAGE_PIXELS (179 Mpx) on its own, with its own words; the
    tool's --max-image-pixels decides instead, below and above that limit, and Pillow's setting is left
    as it was."""
    from PIL import Image

    from scalselect_fast.data import ImageError, load_image

    limit = Image.MAX_IMAGE_PIXELS
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(100_000, 100_000))
    assert 100_000 * 100_000 > 2 * limit
    with pytest.raises(ImageError) as ei:
        load_image(bomb)
    assert ei.value.reason == "image_too_large"
    assert "100000x100000" in str(ei.value) and "over --max-image-pixels 40,000,000" in str(ei.value)
    assert "exceeds limit" not in str(ei.value)
    # a limit above Pillow's: a 200 Mpx header is not refused for its size (its pixel data is empty)
    big = tmp_path / "big.png"
    big.write_bytes(_png_header_only(20_000, 10_000))
    assert 20_000 * 10_000 > 2 * limit
    with pytest.raises(ImageError) as ei:
        load_image(big, max_pixels=300_000_000)
    assert ei.value.reason in ("image_truncated", "image_corrupt"), str(ei.value)
    with pytest.raises(ImageError, match="20000x10000 = 200,000,000 pixels, over --max-image-pixels 199,999,999"):
        load_image(big, max_pixels=199_999_999)
    assert Image.MAX_IMAGE_PIXELS == limit
    with pytest.raises(ImageError, match="too large to decode safely"):  # None: Pillow's limit alone
        load_image(bomb, max_pixels=None)


def test_a_bomb_header_is_skipped_with_the_tools_own_message(hostile_env, tmp_path, capsys):
    env = hostile_env
    root = tmp_path / "root"
    shutil.copytree(env["root"], root)
    (root / "img" / "bomb.png").write_bytes(_png_header_only(100_000, 100_000))
    data = root / "data.json"
    data.write_text(json.dumps(env["good"] + [{"id": "bomb", "image": "img/bomb.png", "conversations": _conv()}]))
    before = _digest_tree(root)
    out = tmp_path / "out"
    rc = cli.main(_run_args(dict(env, root=root), data, out, "--max-image-pixels", "50000000"))
    assert rc == 0, capsys.readouterr().err
    (entry,) = map(json.loads, (out / "skipped.jsonl").read_text().split("\n")[:-1])
    assert entry["id"] == "bomb" and entry["reason"] == "image_too_large"
    assert "100000x100000" in entry["detail"] and "over --max-image-pixels 50,000,000" in entry["detail"]
    assert _digest_tree(root) == before


def test_quota_on_a_field_some_records_lack_warns(hostile_env, tmp_path, capsys):
    """Records without the quota's field form the group <none>: allowed, but said once on stderr."""
    import pyarrow.parquet as pq

    env = hostile_env
    recs = [dict(r, lang="en" if i < 3 else "fr") if i < 4 else r for i, r in enumerate(env["good"])]
    data = tmp_path / "with-lang.json"  # image paths are relative to --image-root, not to this file
    data.write_text(json.dumps(recs))
    out = tmp_path / "out"
    rc = cli.main(_run_args(env, data, out, "--quota", "lang=fr>=30%"))
    err = capsys.readouterr().err
    assert rc == 0, err
    warned = [ln for ln in err.split("\n") if "lang" in ln]
    assert warned == ["warning: --quota lang=...: 2 of 6 records have no field 'lang'; they form the group "
                      "'<none>', bounded by the '*' rule if there is one"]
    kept = [m["id"] for m in pq.read_table(out / "manifest.parquet").to_pylist() if m["kept"]]
    assert "s3" in kept and len(kept) == 3  # the one 'fr' record holds its >= 30% share of 3


def test_a_url_that_never_answers_fails_within_the_timeout(tiny, tmp_path):
    """A local server (127.0.0.1 only) that accepts connections and never answers: the run fails with
    one line naming the URL and the limit (SCALSELECT_URL_TIMEOUT_S, here 2 s) instead of hanging;
    the subprocess's own timeout is what would catch a hang."""
    import socket
    import threading

    pytest.importorskip("aiohttp")
    held = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.settimeout(None)

        def accept():
            try:
                while True:
                    held.append(server.accept()[0])  # accepted, never read, never answered
            except OSError:  # the socket closed at the end of the test
                pass

        threading.Thread(target=accept, daemon=True).start()
        url = f"http://127.0.0.1:{server.getsockname()[1]}/data.json"
        try:
            rc, _out, err = _cli_subprocess(_run_argv(tmp_path, tiny, data=url), {"SCALSELECT_URL_TIMEOUT_S": "2"},
                                            timeout=90)
        finally:
            for c in held:
                c.close()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and "Traceback" not in err and len(lines) == 1, err
    assert f"--data '{url}': cannot reach it (no answer within 2 s; SCALSELECT_URL_TIMEOUT_S" in lines[0]
    assert held, "the run never connected to the server"
    assert not (tmp_path / "out").exists()


def test_url_timeout_setting_is_validated(monkeypatch):
    from scalselect_fast.data import DatasetError
    from scalselect_fast.data.sources import URL_TIMEOUT_S, url_timeout

    monkeypatch.delenv("SCALSELECT_URL_TIMEOUT_S", raising=False)
    assert url_timeout() == URL_TIMEOUT_S == 30.0
    monkeypatch.setenv("SCALSELECT_URL_TIMEOUT_S", "0.5")
    assert url_timeout() == 0.5
    for bad in ("0", "-1", "soon", "nan"):
        monkeypatch.setenv("SCALSELECT_URL_TIMEOUT_S", bad)
        with pytest.raises(DatasetError, match="SCALSELECT_URL_TIMEOUT_S=.*positive number of seconds"):
            url_timeout()


def _edit_between(monkeypatch, after_extract=None, before_output=None):
    """Run ``after_extract()`` once the representations exist (before the fit) and ``before_output()``
    once the scores exist (before the selection is written): another process editing the dataset
    while the run uses it, at fixed points instead of a race."""
    from scalselect_fast.run import stages

    fit, score = stages._stage_fit, stages._stage_score

    def fit_after(*a, **k):
        if after_extract is not None:
            after_extract()
        return fit(*a, **k)

    def score_before(*a, **k):
        result = score(*a, **k)
        if before_output is not None:
            before_output()
        return result

    monkeypatch.setattr(stages, "_stage_fit", fit_after)
    monkeypatch.setattr(stages, "_stage_score", score_before)


@pytest.mark.parametrize("how", ["longer-text", "same-size-and-mtime"])
def test_a_dataset_edited_during_the_run_is_refused_before_the_output(hostile_env, tmp_path, capsys, monkeypatch,
                                                                      how):
    """The selected dataset copies records from the input file: if the file changed after the run read
    it, the copied text would not be the text the vectors were computed from. The run refuses, naming
    the file, and commits no selection; the rerun is refused until --force."""
    env = hostile_env
    data = tmp_path / "data.json"
    data.write_text(json.dumps(env["good"]))
    original = data.read_bytes()

    def edit():
        if how == "longer-text":
            data.write_text(json.dumps([dict(r, conversations=_conv("What is shown here, really?"))
                                        for r in env["good"]]))
        else:  # one letter of every record swapped, size and mtime kept: only the content tells
            st = data.stat()
            data.write_bytes(original.replace(b"What is shown?", b"What is sh0wn?"))
            os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
            assert data.stat().st_size == st.st_size and data.stat().st_mtime_ns == st.st_mtime_ns

    _edit_between(monkeypatch, before_output=edit)
    out = tmp_path / "out"
    rc = cli.main(_run_args(env, data, out))
    line = _one_line(capsys.readouterr().err)
    assert rc == 2
    assert line.startswith(f"error: {data} was edited while this run used --data {data}")
    assert "so the selection was not written" in line and "--force" in line
    assert not any((out / name).exists() for name in ("selected.json", "manifest.parquet", "report.json",
                                                      "selected.txt", "subspace.npz"))
    assert not list(out.glob(".*stage-*")), "a staged output was left behind"
    # the next run sees the changed data in its fingerprint: never silently mixed. It starts over through
    # the representation cache (issue 22): the edited records have other keys, so they are extracted
    # anew, and the output is the edited text
    monkeypatch.undo()
    edited = data.read_bytes()
    assert cli.main(_run_args(env, data, out)) == 0
    assert "the dataset changed since the checkpoints" in capsys.readouterr().err
    assert json.loads((out / "report.json").read_text())["cache"]["extracted"] > 0
    assert json.loads((out / "selected.json").read_text())[0] in json.loads(edited)
    assert data.read_bytes() == edited


def test_a_dataset_edited_and_restored_before_the_output_is_accepted(hostile_env, tmp_path, capsys, monkeypatch):
    """What the check compares is the content: a file that is back to what the run read passes, and
    the run's outputs equal an undisturbed run's."""
    env = hostile_env
    data = tmp_path / "data.json"
    data.write_text(json.dumps(env["good"]))
    original = data.read_bytes()
    ref = tmp_path / "ref"
    assert cli.main(_run_args(env, data, ref)) == 0
    _edit_between(monkeypatch, after_extract=lambda: data.write_bytes(original.replace(b"shape", b"thing")),
                  before_output=lambda: data.write_bytes(original))
    out = tmp_path / "out"
    assert cli.main(_run_args(env, data, out)) == 0, capsys.readouterr().err
    assert (out / "selected.json").read_bytes() == (ref / "selected.json").read_bytes()


def test_a_file_added_to_a_dataset_folder_during_the_run_is_refused(hostile_env, tmp_path, capsys, monkeypatch):
    env = hostile_env
    folder = tmp_path / "d"
    folder.mkdir()
    lines = [json.dumps(r) for r in env["good"]]
    (folder / "a.jsonl").write_text("\n".join(lines[:3]) + "\n")
    (folder / "b.jsonl").write_text("\n".join(lines[3:]) + "\n")
    extra = json.dumps({"id": "late", "image": "img/0.png", "conversations": _conv()})
    _edit_between(monkeypatch, before_output=lambda: (folder / "c.jsonl").write_text(extra + "\n"))
    out = tmp_path / "out"
    rc = cli.main(_run_args(env, folder, out))
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and line.startswith(f"error: {folder / 'c.jsonl'} was added while this run used --data")
    assert not (out / "selected").exists() and not (out / "report.json").exists()
