"""``--devices``: one extraction process per device, one store, one selection (issue 23).

Everything runs for real on the suite's tiny LLaVA with ``cpu:2`` (two CPU processes): the parsing
of the setting, a run equal to the one-process run, a worker killed with SIGKILL (one line naming the
device, the rerun resumes to identical outputs), the parent killed with SIGKILL (no child survives,
the rerun is identical), a rerun with another process count, and the ``extract`` command.
The reference for every multi-process result is the plain one-process run of the same data.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("scalselect_fast.extract.tiny")

from scalselect_fast import cli  # noqa: E402
from scalselect_fast.extract import DevicesError, parse_devices  # noqa: E402
from scalselect_fast.run import make_config, run  # noqa: E402
from scalselect_fast.store import StoreSource  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARD = 8  # 40 records, 2 ranks of 20 -> 3 shards each (8, 8, 4): several commits per rank


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_llava):
    from scalselect_fast.data.demo import make_demo_dataset

    base = tmp_path_factory.mktemp("devices")
    make_demo_dataset(base / "data", n=40, seed=3)
    return {"base": base, "data": base / "data" / "demo.json", "root": base / "data", "model": tiny_llava}


def _cfg(env, out, **kw):
    args = dict(model=str(env["model"]), data=str(env["data"]), image_root=str(env["root"]), out=str(out),
                budget="25%", shard_size=SHARD, batch_size=4, quiet=True)
    args.update(kw)
    return make_config(**args)


def _args(env, out, devices="cpu:2"):
    return [sys.executable, "-m", "scalselect_fast", "run", "--model", str(env["model"]), "--data", str(env["data"]),
            "--image-root", str(env["root"]), "--out", str(out), "--budget", "25%", "--shard-size", str(SHARD),
            "--batch-size", "4", "--quiet", "--devices", devices]


def _cli(args, crash_at=None, tag=None) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHONPATH=str(ROOT))
    e.pop("SCALSELECT_CRASH_AT", None)
    if crash_at:
        e["SCALSELECT_CRASH_AT"] = crash_at
    if tag:
        e["SCALSELECT_TEST_TAG"] = tag
    return subprocess.run(args, cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)


def _vectors(store: Path):
    src = StoreSource(store)
    return src.ids(), src.to_array(np.float32)


@pytest.fixture(scope="module")
def single(env, tmp_path_factory):
    """The reference: the plain one-process run."""
    out = tmp_path_factory.mktemp("single") / "out"
    res = run(_cfg(env, out, devices="cpu:1"))
    return {"out": out, "ids": sorted(r["id"] for r in json.loads(res.selected_path.read_text())),
            "store": _vectors(out / ".scalselect" / "reps")}


@pytest.fixture(scope="module")
def double(env, tmp_path_factory):
    """An uninterrupted ``cpu:2`` run through the CLI: the outputs the interrupted runs must reproduce."""
    out = tmp_path_factory.mktemp("double") / "out"
    p = _cli(_args(env, out))
    assert p.returncode == 0, p.stderr[-3000:]
    return {"out": out, "selected": (out / "selected.json").read_bytes(),
            "manifest": (out / "manifest.parquet").read_bytes()}


# --------------------------------------------------------------------------------------------------
# the setting
# --------------------------------------------------------------------------------------------------
def test_parse_devices_values():
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert parse_devices("auto") == ([f"cuda:{i}" for i in range(n)] if n else ["cpu"])
    assert parse_devices(None, "cpu") == ["cpu"]  # --device cpu keeps one CPU process
    assert parse_devices("auto", "cuda:1") == ["cuda:1"]
    assert parse_devices("cpu:3") == ["cpu", "cpu", "cpu"]
    assert parse_devices(" CPU:2 ") == ["cpu", "cpu"]
    assert parse_devices("cpu") == ["cpu"]
    assert parse_devices(["cpu:2"], "cpu") == ["cpu", "cpu"]


@pytest.mark.parametrize("spec, device, words", [
    ("gpu:1", "auto", "'gpu:1' is not a device"),
    ("cpu:0", "auto", "N >= 1"),
    ("cpu:x", "auto", "'cpu:x' is not a device"),
    ("", "auto", "empty entry"),
    ("cuda:0,,cuda:1", "auto", "empty entry"),
    ("cuda:0,cpu", "auto", "cannot share"),
    ("cuda:0,cuda:0", "auto", "cuda:0 is listed twice"),
    ("cuda:99", "auto", "cuda:99 is not visible"),
    ("cpu:2", "cuda:1", "disagree"),
])
def test_parse_devices_refuses_bad_values(spec, device, words):
    with pytest.raises(DevicesError, match=words):
        parse_devices(spec, device)


def test_bad_devices_are_one_line_errors_before_any_work(env, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli.main(["run", "--model", str(env["model"]), "--data", str(env["data"]), "--image-root",
                     str(env["root"]), "--out", str(out), "--devices", "tpu:4", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--devices 'tpu:4'" in err and "cpu:N" in err
    assert not out.exists()
    with pytest.raises(Exception, match="not 'auto', 'cpu:N' or a list"):
        make_config(devices=3)
    assert make_config(devices=["cpu", "cpu"]).devices == "cpu,cpu"


# --------------------------------------------------------------------------------------------------
# cpu:2 against the one-process run
# --------------------------------------------------------------------------------------------------
def test_cpu2_run_selects_what_one_process_selects(single, double):
    out = double["out"]
    assert sorted(r["id"] for r in json.loads(double["selected"])) == single["ids"]
    store = out / ".scalselect" / "reps"
    names = sorted(p.name for p in store.glob("rank*-shard-*.npy"))
    assert names and {n[:7] for n in names} == {"rank000", "rank001"}  # both processes wrote the one store
    assert json.loads((store / "manifest.json").read_text())["provenance"]["world_size"] == 2
    ids, x = _vectors(store)
    ref_ids, ref = single["store"]
    assert ids == ref_ids  # the same rows in the same order
    # other batch boundaries at the rank split: equal up to float rounding (float16 storage)
    np.testing.assert_allclose(x, ref, rtol=2e-3, atol=2e-3)
    assert json.loads((out / "report.json").read_text())["config"]["devices"] == "cpu:2"


def test_extract_command_with_two_processes(env, single, tmp_path, capsys):
    out = tmp_path / "store"
    assert cli.main(["extract", "--model", str(env["model"]), "--data", str(env["data"]), "--image-root",
                     str(env["root"]), "--out", str(out), "--shard-size", str(SHARD), "--batch-size", "4",
                     "--dtype", "fp32", "--devices", "cpu:2", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["devices"] == ["cpu", "cpu"]
    assert summary["rows"] == 38 and summary["skipped"] == 2 and summary["shards_written"] == 6
    assert [s["range"] for s in summary["ranks"]] == [[0, 20], [20, 40]]
    ids, x = _vectors(out)
    ref_ids, ref = single["store"]
    assert ids == ref_ids
    np.testing.assert_allclose(x, ref, rtol=2e-3, atol=2e-3)
    # the same store with another process count: refused, naming both counts and the way out
    assert cli.main(["extract", "--model", str(env["model"]), "--data", str(env["data"]), "--image-root",
                     str(env["root"]), "--out", str(out), "--shard-size", str(SHARD), "--batch-size", "4",
                     "--dtype", "fp32", "--devices", "cpu:3", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "written by 2 process(es) and this job has 3" in err and "--force" in err


# --------------------------------------------------------------------------------------------------
# faults
# --------------------------------------------------------------------------------------------------
def _manifest_shards(out: Path) -> list[str]:
    m = out / ".scalselect" / "reps" / "manifest.json"
    return [s["name"] for s in json.loads(m.read_text())["shards"]] if m.exists() else []


def test_worker_killed_stops_the_run_with_one_line_and_the_rerun_is_identical(env, double, tmp_path):
    out = tmp_path / "out"
    # rank 1 kills itself (SIGKILL, as the OOM killer would) at its third progress report: after its
    # first shard is committed
    p = _cli(_args(env, out), crash_at="devices.rank1:3")
    assert p.returncode == 2, p.stderr[-3000:]
    err = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(err) == 1, p.stderr
    assert "cpu (rank 1) was killed by SIGKILL" in err[0] and "rerun the same command to resume" in err[0]
    kept = _manifest_shards(out)
    assert any(n.startswith("rank001-") for n in kept) and len(kept) < 6
    assert not (out / "selected.json").exists()
    p = _cli(_args(env, out))
    assert p.returncode == 0, p.stderr[-3000:]
    assert set(kept) <= set(_manifest_shards(out))  # resumed: the committed shards were kept
    assert (out / "selected.json").read_bytes() == double["selected"]
    assert (out / "manifest.parquet").read_bytes() == double["manifest"]


def _tagged_processes(tag: str) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if f"SCALSELECT_TEST_TAG={tag}".encode() in (d / "environ").read_bytes():
                    found.append(int(d.name))
            except OSError:
                pass
    return found


def test_parent_killed_leaves_no_worker_and_the_rerun_is_identical(env, double, tmp_path):
    if not Path("/proc/self/environ").exists():
        pytest.skip("needs /proc to find the workers")
    out = tmp_path / "out"
    tag = uuid.uuid4().hex
    p = _cli(_args(env, out), crash_at="devices.parent:4", tag=tag)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    deadline = time.monotonic() + 30  # the kernel delivers the workers' SIGKILL at once; allow a slow box
    while _tagged_processes(tag) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _tagged_processes(tag) == []
    p = _cli(_args(env, out))
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "selected.json").read_bytes() == double["selected"]
    assert (out / "manifest.parquet").read_bytes() == double["manifest"]


def test_rerun_with_another_process_count_restarts_through_the_cache(env, double, tmp_path):
    out = tmp_path / "out"
    p = _cli(_args(env, out), crash_at="devices.rank0:3")
    assert p.returncode == 2 and "cpu (rank 0) was killed by SIGKILL" in p.stderr
    assert _manifest_shards(out)
    p = _cli(_args(env, out, devices="cpu:1"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "partial extraction by 2 process(es) and this run has 1" in p.stderr
    assert all(n.startswith("shard-") for n in _manifest_shards(out))  # one store layout, never mixed
    assert (out / "selected.json").read_bytes() == double["selected"]


# --------------------------------------------------------------------------------------------------
# a run launched by torchrun
# --------------------------------------------------------------------------------------------------
def test_run_under_torchrun_every_rank_extracts_and_rank_0_selects(env, double, tmp_path):
    pytest.importorskip("torch.distributed.run")
    out = tmp_path / "out"
    args = _args(env, out, devices="auto")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
              "scalselect_fast", *args[3:]]
    p = _cli(launch)
    assert p.returncode == 0, p.stderr[-3000:]
    shards = _manifest_shards(out)
    assert {n[:7] for n in shards} == {"rank000", "rank001"}  # both ranks wrote their range of the store
    # the same ranks, ranges and batches as --devices cpu:2: the same bytes
    assert (out / "selected.json").read_bytes() == double["selected"]
    assert (out / "manifest.parquet").read_bytes() == double["manifest"]


def test_rerun_under_torchrun_re_extracts_only_a_deleted_rank_range(env, double, tmp_path):
    """A finished two-rank run whose rank 1 shards were deleted: the rerun under torchrun finds them
    missing, rank 0 extracts rank 1's range again (rank 1 had already been told the store was done),
    rank 0's shards are kept as they are, and the outputs are the uninterrupted run's, byte for byte."""
    import shutil

    pytest.importorskip("torch.distributed.run")
    out = tmp_path / "out"
    shutil.copytree(double["out"], out)
    store = out / ".scalselect" / "reps"
    gone = sorted(p for p in store.iterdir() if p.name.startswith("rank001-"))
    kept = {p.name: p.stat().st_mtime_ns for p in store.iterdir() if p.name.startswith("rank000-")}
    assert gone and kept
    for p in gone:
        p.unlink()
    args = _args(env, out, devices="auto")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
              "scalselect_fast", *args[3:]]
    p = _cli(launch)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "rank001-shard-" in p.stderr  # the missing shards were named
    assert sorted(p.name for p in store.iterdir() if p.name.startswith("rank001-")) == [p.name for p in gone]
    assert {p.name: p.stat().st_mtime_ns for p in store.iterdir() if p.name.startswith("rank000-")} == kept
    assert sorted(_manifest_shards(out)) == sorted(_manifest_shards(double["out"]))
    assert (out / "selected.json").read_bytes() == double["selected"]
    assert (out / "manifest.parquet").read_bytes() == double["manifest"]
