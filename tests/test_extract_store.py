"""extract_to_store: skip reasons, resume after a crash, per-rank shards, the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from _extract_util import make_dataset  # noqa: E402

from scalselect_fast.extract import build_tiny_model, extract_to_store, load_vlm  # noqa: E402
from scalselect_fast.store import StoreError, open_source  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_model("llava", tmp_path_factory.mktemp("tiny") / "llava", num_layers=2)


@pytest.fixture(scope="module")
def vlm(model):
    return load_vlm(model, layer=0, dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    (root / "broken.png").write_bytes(b"this is not a png")
    (root.parent / "outside.png").write_bytes(b"x")
    extra = {2: {"image": None, "conversations": [{"from": "human", "value": "Only text?"},
                                                   {"from": "gpt", "value": "Yes."}]},
             4: {"image": "img/missing.png"}, 6: {"image": "broken.png"}, 9: {"image": "../outside.png"}}
    return make_dataset(root, n=11, extra=extra), root


def _run(vlm, dataset, out, **kw):
    data, root = dataset
    kw.setdefault("shard_size", 4)
    kw.setdefault("batch_size", 3)
    return extract_to_store(vlm, data, out, image_root=root, store_dtype="float32", progress=False, **kw)


def test_skips_are_recorded_with_reasons(vlm, dataset, tmp_path):
    out = tmp_path / "store"
    summary = _run(vlm, dataset, out)
    src = open_source(out)
    assert src.ids() == [f"s{i}" for i in (0, 1, 3, 5, 7, 8, 10)]
    assert summary["rows"] == 7 and summary["skipped"] == 4
    log = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    reasons = {e["id"]: e["reason"] for e in log}
    assert reasons == {"s2": "text_only", "s4": "image_missing", "s6": "image_corrupt", "s9": "image_outside_root"}
    assert all(e["detail"] for e in log)
    m = json.loads((out / "manifest.json").read_text())
    assert [s["range"] for s in m["shards"]] == [[0, 4], [4, 8], [8, 11]]
    assert [s["skipped"] for s in m["shards"]] == [1, 2, 1]
    prov = m["provenance"]
    assert prov["layer"] == 0 and prov["threshold"] == 0.9 and prov["instruction"] == "all"
    assert prov["model"]["type"] == "llava" and len(prov["data"]["sha256"]) == 64 and prov["dtype"] == "float32"


def test_over_long_samples_are_skipped(model, dataset, tmp_path):
    short = load_vlm(model, layer=0, dtype="fp32", device="cpu", max_length=40)
    _run(short, dataset, tmp_path / "s")
    log = [json.loads(line) for line in (tmp_path / "s" / "skipped.jsonl").read_text().splitlines()]
    too_long = [e for e in log if e["reason"] == "too_long"]
    assert too_long and all("exceed the maximum length 40" in e["detail"] for e in too_long)


def test_resume_after_crash_gives_the_same_store(vlm, dataset, tmp_path):
    from scalselect_fast.data import load_image

    clean = tmp_path / "clean"
    _run(vlm, dataset, clean)

    def crashing(path):
        if path.endswith("/8.png"):
            raise RuntimeError("simulated crash")
        return load_image(path)

    out = tmp_path / "crashy"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(vlm, dataset, out, image_loader=crashing)
    assert [s.name for s in open_source(out).shards] == ["shard-00000", "shard-00001"]
    seen = []
    summary = _run(vlm, dataset, out, on_progress=lambda done, total: seen.append((done, total)))
    assert summary["shards_resumed"] == 2 and summary["shards_written"] == 1
    assert seen[-1] == (11, 11) and seen[0][0] > 8 and [d for d, _ in seen] == sorted(d for d, _ in seen)
    a, b = open_source(clean), open_source(out)
    assert a.ids() == b.ids()
    np.testing.assert_array_equal(a.to_array(), b.to_array())
    entries = (out / "skipped.jsonl").read_text().splitlines()
    assert len(entries) == len(set(entries)) == 4  # no duplicate skip lines after the rerun
    # a finished store is left alone; a different run into it is refused
    assert _run(vlm, dataset, out)["shards_written"] == 0
    from scalselect_fast.extract import ExtractError, UnsupportedModelError

    assert issubclass(UnsupportedModelError, ExtractError)
    with pytest.raises(StoreError, match="different run"):
        _run(vlm, dataset, out, threshold=0.5)


def test_ranks_merge_to_the_single_process_store(vlm, dataset, tmp_path):
    single = tmp_path / "single"
    _run(vlm, dataset, single)
    multi = tmp_path / "multi"
    for r in (0, 1):
        _run(vlm, dataset, multi, rank=r, world_size=2)
    src = open_source(multi)
    assert [s.name for s in src.shards] == ["rank000-shard-00000", "rank000-shard-00001",
                                            "rank001-shard-00000", "rank001-shard-00001"]
    assert src.ids() == open_source(single).ids()
    np.testing.assert_allclose(src.to_array(), open_source(single).to_array(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_two_processes_with_torchrun_env_and_cli(model, dataset, tmp_path):
    """Two concurrent `scalselect extract` processes with RANK/WORLD_SIZE, as torchrun would start them."""
    data, root = dataset
    out = tmp_path / "store"
    procs = []
    for r in (0, 1):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), OMP_NUM_THREADS="1",
                   PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "scalselect_fast", "extract", "--model", str(model), "--data", str(data),
               "--image-root", str(root), "--out", str(out), "--dtype", "fp32", "--device", "cpu",
               "--store-dtype", "float32", "--shard-size", "2", "--batch-size", "2", "--quiet"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-2000:]
    summaries = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    assert sorted(s["range"] for s in summaries) == [[0, 5], [5, 11]]
    src = open_source(out)
    assert len(src.shards) == 6 and src.ids() == [f"s{i}" for i in (0, 1, 3, 5, 7, 8, 10)]
    log = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in log) == ["s2", "s4", "s6", "s9"]  # each record logged once, by its rank
    # the same store, computed in this process
    ref = tmp_path / "ref"
    extract_to_store(model, data, ref, image_root=root, dtype="fp32", device="cpu", store_dtype="float32",
                     shard_size=2, batch_size=2, progress=False, rank=0, world_size=1)
    np.testing.assert_allclose(src.to_array(), open_source(ref).to_array(), rtol=1e-5, atol=1e-6)


def test_cli_in_process(model, dataset, tmp_path, capsys):
    from scalselect_fast.cli import main

    data, root = dataset
    rc = main(["extract", "--model", str(model), "--data", str(data), "--image-root", str(root), "--out",
               str(tmp_path / "o"), "--dtype", "fp32", "--device", "cpu", "--layer", "1", "--quiet"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] == 7
    src = open_source(tmp_path / "o")
    assert src.dtype == "float16" and src.d == 64 and src.provenance["layer"] == 1
    rc = main(["extract", "--model", str(model), "--data", str(data), "--image-root", str(root), "--out",
               str(tmp_path / "o2"), "--layer", "2", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "layer 2 does not exist" in err and "Traceback" not in err


def test_encoding_workers_give_the_same_store(vlm, dataset, tmp_path):
    """num_workers > 0: samples are encoded in forked processes one batch ahead; same rows, same skips."""
    ref = tmp_path / "ref"
    _run(vlm, dataset, ref)
    out = tmp_path / "workers"
    summary = _run(vlm, dataset, out, num_workers=2)
    assert summary["rows"] == 7 and summary["skipped"] == 4
    assert open_source(out).ids() == open_source(ref).ids()
    np.testing.assert_array_equal(open_source(out).to_array(), open_source(ref).to_array())
    assert sorted((out / "skipped.jsonl").read_text().splitlines()) == sorted((ref / "skipped.jsonl").read_text().splitlines())
    m = json.loads((out / "manifest.json").read_text())
    assert [s["skipped"] for s in m["shards"]] == [1, 2, 1]


def test_an_unexpected_encoder_failure_names_the_sample():
    """Anything the processor/tokenizer raises for one sample stops the run with that sample's id
    and record index (not a bare traceback from a worker); sample-level problems stay skips."""
    import pytest

    from scalselect_fast.extract import roles as R
    from scalselect_fast.extract.batch import _encode_one, _Skip

    class Refusing:  # stands in for the processor call that raised; the wrapper is under test
        def encode(self, sid, messages, pix):
            raise ValueError("aspect ratio 250 > 200")

    item = ("s-17", 17, 42, [b"img"], [{"role": "user", "content": "hi"}])
    with pytest.raises(R.ExtractError, match=r"sample s-17 \(record 17, line 42\).*ValueError: aspect ratio"):
        _encode_one(Refusing(), item, loader=lambda p: p)
    skipped = _encode_one(Refusing(), ("s-18", 18, None, [], []), loader=lambda p: p)
    assert isinstance(skipped, _Skip) and "text-only" in skipped.detail


def test_worker_results_travel_as_numpy_and_come_back_as_the_same_tensors():
    """Encoded samples cross the worker pipe as numpy arrays (no torch shared-memory handles, which
    hung in workers forked from a threaded parent) and are restored bit for bit, bf16 included."""
    import pickle

    import torch

    from scalselect_fast.extract.batch import _from_wire, _Skip, _to_wire
    from scalselect_fast.extract.model import Encoded

    g = torch.Generator().manual_seed(0)
    inputs = {"pixel_values": torch.randn(2, 3, 5, 7, generator=g),
              "pixel_bf16": torch.randn(3, 4, generator=g).to(torch.bfloat16),
              "image_grid_thw": torch.tensor([[1, 4, 6]]), "note": "kept as is"}
    enc = Encoded("s1", np.arange(5, dtype=np.int64), np.zeros(5, np.int8), dict(inputs))
    wire = _to_wire(enc)
    assert not any(isinstance(v, torch.Tensor) or (isinstance(v, tuple) and isinstance(v[1], torch.Tensor))
                   for v in wire.image_inputs.values())
    back = _from_wire(pickle.loads(pickle.dumps(wire)))
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            assert back.image_inputs[k].dtype == v.dtype and torch.equal(back.image_inputs[k], v), k
        else:
            assert back.image_inputs[k] == v
    skip = _Skip("s2", 3, "text_only", "no image", None)
    assert _from_wire(_to_wire(skip)) is skip
