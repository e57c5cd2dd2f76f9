"""The --plan cost model: sizes follow the formulas, and runs that cannot fit are refused with a fix."""
import json

import pytest

from scalselect_fast.plan import GiB, count_samples, estimate_run, model_cost

LLAVA_7B = {"model_type": "llava",
            "text_config": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                            "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064},
            "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                              "image_size": 336, "patch_size": 14}}


def test_model_cost_llava_7b_is_about_7b_params():
    c = model_cost(LLAVA_7B, layer=0)
    assert c["d"] == 4096 and c["image_tokens"] == 576
    assert 6.5e9 < c["full_params"] < 7.5e9
    # early exit runs one decoder layer: far fewer parameters than the full model
    assert c["run_params"] < 0.2 * c["full_params"]
    assert model_cost(LLAVA_7B, layer=3)["flops_per_sample"] > c["flops_per_sample"]


def test_estimate_sizes_follow_formulas(tmp_path):
    est = estimate_run(1_000_000, d=768, out_dir=tmp_path, flops_per_s=1e11, store_dtype="float16",
                       memory_available=64 * GiB, disk_free=1000 * GiB)
    shards = -(-1_000_000 // 4096)  # the default --shard-size
    assert est.disk_bytes["representation store"] == 1_000_000 * 768 * 2 + 1_000_000 * 25 + shards * 700
    # the per-shard score checkpoints and scores.npy
    assert est.disk_bytes["scores"] == 2 * 8_000_000 + (shards + 1) * 128
    assert est.seconds["fit"] == pytest.approx((2.0 * 1e6 * 768 ** 2 + 10 * 768 ** 3) / 1e11)
    assert est.ok and "fits: yes" in est.format()


def test_refuses_when_disk_or_memory_too_small(tmp_path):
    est = estimate_run(50_000_000, model=LLAVA_7B, out_dir=tmp_path, flops_per_s=1e11,
                       memory_available=2 * GiB, disk_free=10 * GiB)
    assert not est.ok
    text = " ".join(est.problems)
    assert "disk" in text and "--out" in text
    # 2 GiB cannot hold the 7B model's extraction batch: the fix offered is the GPU / a smaller dtype
    assert "memory: stage 'extract'" in text and "--device cuda" in text
    assert "CANNOT RUN" in est.format()
    # a huge d makes the Gram matrix the memory problem, and the fix names the randomized solver
    est = estimate_run(1000, d=60_000, solver="exact", out_dir=tmp_path, flops_per_s=1e11,
                       memory_available=16 * GiB, disk_free=1000 * GiB)
    assert any("--solver randomized" in p for p in est.problems)


def test_measured_rate_and_model_dir(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(LLAVA_7B))
    est = estimate_run(100, model=tmp_path / "m", out_dir=tmp_path)
    assert est.d == 4096 and est.seconds["extract"] > 0
    assert float(est.assumptions["matmul_flops_per_s"]) > 1e8


def test_count_samples(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"id": 1}\n\n{"id": 2}\n')
    assert count_samples(p) == (2, p.stat().st_size)
    q = tmp_path / "a.json"
    q.write_text(json.dumps([{"id": i} for i in range(5)]))
    assert count_samples(q)[0] == 5


def test_model_cost_qwen2_vl_7b_layout():
    q = {"model_type": "qwen2_vl", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
         "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
         "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "patch_size": 14,
                           "spatial_merge_size": 2, "hidden_size": 3584}}
    c = model_cost(q)
    assert c["d"] == 3584 and c["image_tokens"] == 144  # 24x24 patches merged 2x2
    assert 7.0e9 < c["full_params"] < 9.5e9  # Qwen2-VL-7B has ~8.3B parameters


def test_bytes_already_under_out_count_as_free_for_a_rerun(tmp_path, monkeypatch):
    """A resume reuses/overwrites what the earlier run wrote, so the preflight must not refuse it
    for space the earlier run itself took."""
    from scalselect_fast import plan

    out = tmp_path / "out"
    (out / ".scalselect" / "store").mkdir(parents=True)
    (out / ".scalselect" / "store" / "shard-00000.npy").write_bytes(b"x" * 100_000)
    (out / "report.json").write_bytes(b"y" * 2_000)
    monkeypatch.setattr(plan, "_fs_free", lambda path: 1_000)  # the filesystem's own free space
    assert plan._disk_free(out) == 1_000 + 102_000
    assert plan._disk_free(tmp_path / "missing") == 1_000
    est = plan.estimate_run(1_000, d=64, out_dir=out, flops_per_s=1e11, memory_available=2**30)
    assert est.available["disk_free"] == 103_000


# --------------------------------------------------------------------------------------------------
# `scalselect run --plan` against the run it plans (calibrated on the data and the tiny model)
# --------------------------------------------------------------------------------------------------
def _du(path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _plan_json(capsys, args) -> tuple[int, dict]:
    from scalselect_fast import cli

    capsys.readouterr()
    rc = cli.main(["run", *args, "--plan", "--log-json"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    return rc, next(e for e in map(json.loads, lines) if e.get("event") == "plan")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("scalselect_fast.extract.tiny")
    from scalselect_fast.extract.tiny import build_tiny_model

    return build_tiny_model("llava", tmp_path_factory.mktemp("tiny") / "llava", seed=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A LLaVA-OneVision-style ``save_to_disk`` folder (embedded PNGs), the Hub's own features."""
    pytest.importorskip("datasets")
    from test_hub_corpora import llava_onevision

    folder = tmp_path_factory.mktemp("saved") / "onevision"
    llava_onevision(80, text_only=(3,)).save_to_disk(str(folder), num_shards=2)
    return folder


def test_plan_of_a_save_to_disk_input_is_within_2x_of_what_the_run_writes(tiny, saved, tmp_path, capsys):
    from scalselect_fast import cli

    out = tmp_path / "out"
    args = ["--model", str(tiny), "--data", str(saved), "--out", str(out), "--budget", "50%", "--batch-size", "4"]
    rc, plan = _plan_json(capsys, args)
    assert rc == 0 and plan["ok"], plan["problems"]
    assert "samples extracted" in plan["assumptions"]["calibrated"]  # measured, not a FLOP count
    assert not out.exists() or not any(out.iterdir())  # the plan writes nothing under --out
    assert cli.main(["run", *args, "--quiet"]) == 0
    selected = _du(out / "selected")
    assert 0.5 <= plan["disk_bytes"]["selected dataset"] / selected <= 2.0
    assert 0.5 <= plan["disk_bytes"]["report.html"] / (out / "report.html").stat().st_size <= 2.0
    assert 0.5 <= plan["total_disk_bytes"] / _du(out) <= 2.0


def test_plan_reports_a_disk_too_small_for_the_report_and_the_store(tiny, saved, tmp_path, capsys, monkeypatch):
    """The outputs the old plan left out (report.html with its thumbnails, the cache, the real store)
    are counted: a disk with room for the rest but not for them is refused, and the run indeed needs more."""
    from scalselect_fast import cli, plan

    out = tmp_path / "out"
    args = ["--model", str(tiny), "--data", str(saved), "--out", str(out), "--budget", "50%", "--batch-size", "4"]
    rc, est = _plan_json(capsys, args)
    small = est["disk_bytes"]["selected dataset"] + est["disk_bytes"]["manifest.parquet"] + 4096
    monkeypatch.setattr(plan, "_fs_free", lambda path: small)
    rc, est = _plan_json(capsys, args)
    assert rc == 3 and not est["ok"]
    disk = [p for p in est["problems"] if p.startswith("disk:")]
    assert disk and "report.html" in disk[0] and "--out" in disk[0]
    monkeypatch.undo()
    assert cli.main(["run", *args, "--quiet"]) == 0
    assert _du(out) > small  # the refusal was right: the run wrote more than that disk had


@pytest.fixture
def llava_json(tmp_path):
    from scalselect_fast.data.demo import make_demo_dataset

    root = tmp_path / "demo"
    make_demo_dataset(root, n=24, seed=1)
    return root


def test_plan_reports_what_the_run_would_refuse(tiny, llava_json, tmp_path, capsys):
    """Every image missing under --image-root: the old plan said "fits", the run then refused."""
    from scalselect_fast import cli

    args = ["--model", str(tiny), "--data", str(llava_json / "demo.json"), "--image-root", str(llava_json),
            "--out", str(tmp_path / "out"), "--batch-size", "4"]
    for png in (llava_json / "images").glob("*.png"):
        png.unlink()
    rc, est = _plan_json(capsys, args)
    assert rc == 3 and not est["ok"]
    assert any("every record would be skipped" in p and "image_missing" in p for p in est["problems"])
    assert cli.main(["run", *args, "--quiet"]) != 0  # and the run does refuse it


def test_plan_reports_a_budget_the_usable_records_cannot_meet(tiny, llava_json, tmp_path, capsys):
    from scalselect_fast import cli

    args = ["--model", str(tiny), "--data", str(llava_json / "demo.json"), "--image-root", str(llava_json),
            "--out", str(tmp_path / "out"), "--batch-size", "4", "--budget", "20"]
    for png in sorted((llava_json / "images").glob("*.png"))[:12]:
        png.unlink()
    rc, est = _plan_json(capsys, args)
    assert rc == 3 and any(p.startswith("budget:") and "image_missing" in p for p in est["problems"])
    assert cli.main(["run", *args, "--quiet"]) != 0


def test_calibration_counts_sources_by_the_source_field(tiny, llava_json, tmp_path):
    """``--source-field``: the plan's calibration (which sizes the report's per-source table) counts
    each record under the source the run's report counts it under, not under the default fields."""
    from scalselect_fast import cli
    from scalselect_fast.plan import calibrate

    records = json.loads((llava_json / "demo.json").read_text())
    for i, r in enumerate(records):
        r["task"] = f"t{i % 3}"  # the default fields name other sources (the demo's own "source")
    data = llava_json / "tasks.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "out"
    assert cli.main(["run", "--model", str(tiny), "--data", str(data), "--image-root", str(llava_json),
                     "--out", str(out), "--batch-size", "4", "--source-field", "task", "--quiet"]) == 0
    per_source = json.loads((out / "report.json").read_text())["per_source"]
    assert sorted(per_source) == ["t0", "t1", "t2"]
    cal = calibrate(tiny, data, image_root=llava_json, source_field="task", batch_size=4, batches=3)
    assert cal.exhausted and not cal.problems
    assert cal.sources == {k: v["total"] for k, v in per_source.items()}


def test_plan_names_the_extraction_processes_of_devices(tiny, llava_json, tmp_path, capsys):
    """``--devices cpu:2 --plan``: the plan says it assumed two extraction processes (text and JSON),
    and counts the extraction's memory once per process; one process stays as before."""
    from scalselect_fast import cli

    args = ["--model", str(tiny), "--data", str(llava_json / "demo.json"), "--image-root", str(llava_json),
            "--out", str(tmp_path / "out"), "--batch-size", "4"]
    rc1, one = _plan_json(capsys, args)
    rc2, two = _plan_json(capsys, [*args, "--devices", "cpu:2"])
    assert rc1 == rc2 == 0
    assert (one["processes"], two["processes"]) == (1, 2)
    assert (one["assumptions"]["extract_processes"], two["assumptions"]["extract_processes"]) == (1, 2)
    assert two["memory_bytes"]["extract"] == 2 * one["memory_bytes"]["extract"]
    assert cli.main(["run", *args, "--devices", "cpu:2", "--plan"]) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert head.endswith("device=cpu, 2 extraction processes"), head
    assert cli.main(["run", *args, "--plan"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("device=cpu")


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_extraction_time_is_divided_across_the_processes(tmp_path, device):
    """The largest rank's records at the calibrated rate, plus what every process pays on its own
    (start-up, model load, warm-up) and parsing every record; CPU processes past one per core share it."""
    import os

    from scalselect_fast.plan import Calibration

    cal = Calibration(parsed=1000, parse_seconds=0.5, exhausted=False, load_seconds=3.0, warmup=(32, 4.0),
                      timed=(100, 2.0), model_fed=132, model_kept=132, d=64)
    n, startup = 10_001, 6.0

    def extract(processes):
        return estimate_run(n, d=64, device=device, out_dir=tmp_path, flops_per_s=1e11, calibration=cal,
                            startup_seconds=startup, processes=processes, disk_free=1 << 40,
                            memory_available=1 << 40).seconds["extract"]

    read = 0.5 / 1000 * n
    assert extract(1) == pytest.approx(3.0 + 4.0 + 0.02 * (n - 32) + read)
    crowding = 1 if device == "cuda" else 4 / min(4, os.cpu_count())  # (2 on a 2-core box)
    assert extract(4) == pytest.approx(startup + 3.0 + 4.0 + 0.02 * (2501 - 32) * crowding + read)
    with pytest.raises(Exception, match="processes must be >= 1"):
        extract(0)
