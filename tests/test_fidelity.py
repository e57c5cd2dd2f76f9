"""Fidelity to the authors' extraction (issue 11): our default vectors equal their rule's on the demo.

The reference is ``_authors_reference.py``: a plain re-implementation of the rule of ScalSelect's
``feature_extract_sft.py`` (answers located by searching their own token ids, the Qwen vision
markers visual, eager full model with ``output_attentions=True``), sharing no code with our role
assignment. Every family: LLaVA-1.5, Qwen2-VL, Qwen2.5-VL, Qwen3-VL and the generic
(AutoProcessor) path, on the tiny models' byte-level BPE tokenizers and on the real LLaVA-1.5
(SentencePiece) and Qwen2-VL tokenizers (``_real_tokenizers.py``, built from a cached PyPI download;
skipped when the registry cannot be reached). The default suite checks every fifth demo sample (48,
multi-turn ones included); ``-m slow`` (also run by ``make test``) checks all 238 samples with images.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from _authors_reference import PAPER_PIXELS, authors_vectors, read_llava_json  # noqa: E402

from scalselect_fast.data import read_dataset  # noqa: E402
from scalselect_fast.data.demo import DEMO_DATA, DEMO_DIR  # noqa: E402
from scalselect_fast.extract import build_tiny_model, extract_representations, load_vlm  # noqa: E402
from scalselect_fast.extract import model as M  # noqa: E402

FAMILIES = ["llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "generic"]
ATOL = 1e-5


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fidelity")
    fams = {"llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"}
    return {f: build_tiny_model(f, root / f, num_layers=2) for f in fams}


@pytest.fixture(scope="module")
def demo():
    records = read_llava_json(DEMO_DIR / DEMO_DATA)
    samples = list(read_dataset(DEMO_DIR / DEMO_DATA, image_root=DEMO_DIR))
    assert [r[0] for r in records] == [str(s.id) for s in samples]
    return records, samples


def _ours(model_dir, family, samples, monkeypatch, **kw):
    """{id: vector} from our extraction with its defaults (the tiny Qwen models keep their pixel range)."""
    if family == "generic":
        # the LLaVA checkpoint through the generic path: AutoModelForImageTextToText + AutoProcessor
        monkeypatch.delitem(M.KNOWN_FAMILIES, "llava")
    kw.setdefault("pixels", "processor" if family.startswith("qwen") else None)
    vlm = load_vlm(model_dir, layer=0, dtype="fp32", device="cpu", **kw)
    assert (vlm.encoder.processor is not None) == (family == "generic")
    out = {}
    for ids, vecs in extract_representations(vlm, samples, batch_size=8, pool_impl="torch"):
        out.update(zip(ids, vecs.astype(np.float64)))
    return out


@pytest.fixture(scope="module")
def real_dirs(tmp_path_factory):
    """Tiny models carrying the real LLaVA-1.5 / Qwen2-VL tokenizers and published chat templates."""
    from _real_tokenizers import tiny_model_with_real_tokenizer

    root = tmp_path_factory.mktemp("real-tokenizers")
    return {f: tiny_model_with_real_tokenizer(f, root / f) for f in ("llava", "qwen2_vl")}


def _reference(model_dirs, family, records, pixels=None):
    fam = "llava" if family == "generic" else family
    return authors_vectors(model_dirs[fam], fam, records, layer=0, threshold=0.9, pixels=pixels)


def authors_top(vectors: np.ndarray, fraction: float = 0.16, energy: float = 0.9) -> set[int]:
    """The authors' scoring (``cur.py``): center, standardise, L2-normalise rows, SVD, k by 90% energy,
    leverage = squared row norms of U_k, the top ``fraction`` by score."""
    x = vectors - vectors.mean(0, keepdims=True)
    sd = x.std(0, keepdims=True)
    sd[sd == 0] = 1
    x = x / sd
    nrm = np.linalg.norm(x, axis=1, keepdims=True)
    nrm[nrm == 0] = 1
    x = x / nrm
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    cum = np.cumsum(s ** 2) / np.sum(s ** 2)
    k = max(1, min(int(np.searchsorted(cum, energy)) + 1, len(s)))
    lev = np.sum(u[:, :k] ** 2, axis=1)
    return set(np.argsort(lev)[::-1][: int(fraction * len(lev))].tolist())


def _compare(ref: dict, got: dict):
    assert sorted(ref) == sorted(got), "the same samples must produce a vector"
    keys = sorted(ref)
    a = np.stack([ref[k] for k in keys])
    b = np.stack([got[k] for k in keys])
    diff = np.abs(a - b).max(1)
    bad = [keys[i] for i in np.flatnonzero(diff > ATOL)]
    assert not bad, f"{len(bad)}/{len(keys)} vectors differ by > {ATOL} (max {diff.max():.2e}): {bad[:5]}"
    assert authors_top(a) == authors_top(b), "the authors' top-16% selection differs"
    return diff


def _check_family(model_dirs, demo, family, monkeypatch, step):
    records, samples = demo
    records, samples = records[::step], samples[::step]
    assert any(len(r[2]) > 2 for r in records), "the subset must include multi-turn samples"
    ref = _reference(model_dirs, family, records)
    got = _ours(model_dirs["llava" if family == "generic" else family], family, samples, monkeypatch)
    _compare(ref, got)


@pytest.mark.parametrize("family", FAMILIES)
def test_defaults_equal_the_authors_rule(model_dirs, demo, family, monkeypatch):
    _check_family(model_dirs, demo, family, monkeypatch, step=5)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_defaults_equal_the_authors_rule_on_every_demo_sample(model_dirs, demo, family, monkeypatch):
    _check_family(model_dirs, demo, family, monkeypatch, step=1)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_real_tokenizers_equal_the_authors_rule(real_dirs, demo, family, monkeypatch):
    """SentencePiece splits the space before a digit answer into its own "▁" piece: still equal."""
    _check_family(real_dirs, demo, family, monkeypatch, step=5)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_real_tokenizers_equal_the_authors_rule_on_every_demo_sample(real_dirs, demo, family, monkeypatch):
    _check_family(real_dirs, demo, family, monkeypatch, step=1)


@pytest.mark.parametrize("family,option", [("llava", {"roles": "label-mask"}), ("qwen2_vl", {"roles": "label-mask"}),
                                           ("qwen2_vl", {"vision_tokens": "pad-only"})])
def test_deviation_options_differ_from_the_reference(model_dirs, demo, family, option, monkeypatch):
    """The options keep today's behaviour and the reference sees the difference (the check has teeth)."""
    records, samples = demo[0][:24], demo[1][:24]
    ref = _reference(model_dirs, family, records)
    got = _ours(model_dirs[family], family, samples, monkeypatch, **option)
    diff = np.array([np.abs(ref[k] - got[k]).max() for k in ref])
    assert (diff > ATOL).sum() >= 3, f"{option} should change vectors, max diff {diff.max():.2e}"


def _smart_resize_tokens(h, w, factor, lo, hi):
    """Visual tokens of an h x w image under the Qwen rule (resize to multiples of `factor`, pixels in [lo, hi])."""
    hb, wb = round(h / factor) * factor, round(w / factor) * factor
    if hb * wb > hi:
        beta = math.sqrt(h * w / hi)
        hb, wb = math.floor(h / beta / factor) * factor, math.floor(w / beta / factor) * factor
    elif hb * wb < lo:
        beta = math.sqrt(lo / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return (hb // factor) * (wb // factor)


@pytest.mark.parametrize("family,patch", [("qwen2_vl", 14), ("qwen3_vl", 16)])
def test_paper_pixels_are_the_default_and_match_the_reference(tmp_path, demo, family, patch, monkeypatch):
    """Default pixels: 262,144..589,824 (the authors' processor size), with the real patch sizes."""
    path = build_tiny_model(family, tmp_path / family, num_layers=2, overrides={"vision_config": {"patch_size": patch}})
    records, samples = demo[0][:3], demo[1][:3]
    vlm = load_vlm(path, layer=0, dtype="fp32", device="cpu")
    assert vlm.pixels == "paper" and vlm.pixel_range == PAPER_PIXELS == (262144, 589824)
    enc = vlm.encode("x", samples[0].messages, [_load(samples[0])])
    want = _smart_resize_tokens(32, 32, 2 * patch, *PAPER_PIXELS)
    assert int((enc.input_ids == vlm.image_token_id).sum()) == want > 250
    got = {}
    for ids, vecs in extract_representations(vlm, samples, batch_size=3, pool_impl="torch"):
        got.update(zip(ids, vecs.astype(np.float64)))
    ref = authors_vectors(path, family, records, pixels=PAPER_PIXELS)
    diff = np.array([np.abs(ref[k] - got[k]).max() for k in ref])
    assert sorted(ref) == sorted(got) and diff.max() <= ATOL
    # MIN:MAX and the checkpoint's own range
    small = vlm.with_options(pixels="1024:4096")
    assert small.pixel_range == (1024, 4096) and vlm.pixel_range == PAPER_PIXELS  # the original is untouched
    n = int((small.encode("x", samples[0].messages, [_load(samples[0])]).input_ids == vlm.image_token_id).sum())
    assert n == _smart_resize_tokens(32, 32, 2 * patch, 1024, 4096)
    own = vlm.with_options(pixels="processor")
    assert own.pixel_range is None and own.image_processor.size == own._checkpoint_image_processor.size


def _load(sample):
    from scalselect_fast.data import load_image

    return load_image(sample.images[0])


def test_pixels_option_validation(model_dirs):
    for bad in ("big", "10:5", "0:5", "1:2:3", "a:b"):
        with pytest.raises(ValueError, match="pixels"):
            M.parse_pixels(bad)
    with pytest.raises(M.UnsupportedModelError, match="Qwen-VL families only"):
        load_vlm(model_dirs["llava"], device="cpu", pixels="1000:2000")
    with pytest.raises(ValueError, match="roles must be one of reference, label-mask"):
        load_vlm(model_dirs["llava"], device="cpu", roles="labels")
    with pytest.raises(ValueError, match="vision_tokens must be one of reference, pad-only"):
        load_vlm(model_dirs["llava"], device="cpu", vision_tokens="all")


def test_store_records_the_choices_and_refuses_others(model_dirs, tmp_path):
    from _extract_util import make_dataset

    from scalselect_fast.extract import extract_to_store
    from scalselect_fast.store import StoreError

    data = make_dataset(tmp_path / "ds", n=4)
    out = tmp_path / "store"
    kw = dict(image_root=tmp_path / "ds", dtype="fp32", device="cpu", progress=False, shard_size=2)
    extract_to_store(model_dirs["qwen2_vl"], data, out, pixels="processor", **kw)
    prov = json.loads((out / "manifest.json").read_text())["provenance"]
    assert (prov["roles"], prov["vision_tokens"], prov["pixels"]) == ("reference", "reference", "processor")
    assert len(prov["visual_token_ids"]) == 3 and prov["pixel_range"] is None
    for other in ({"roles": "label-mask"}, {"vision_tokens": "pad-only"}, {"pixels": "1024:4096"}):
        with pytest.raises(StoreError, match="provenance differs"):
            extract_to_store(model_dirs["qwen2_vl"], data, out, **{"pixels": "processor", **kw, **other})
    # the same choices resume (nothing left to do)
    again = extract_to_store(model_dirs["qwen2_vl"], data, out, pixels="processor", **kw)
    assert again["shards_resumed"] == 2 and again["shards_written"] == 0


def test_run_config_carries_the_choices():
    from scalselect_fast.run.config import RunConfig, RunError, make_config
    from scalselect_fast.run.fingerprints import stage_fingerprints

    cfg = make_config(model="m", data="d", out="o")
    assert (cfg.roles, cfg.vision_tokens, cfg.pixels) == ("reference", "reference", "paper")
    assert {"roles", "vision_tokens", "pixels"} <= set(RunConfig.EXTRACT_KEYS)
    base = stage_fingerprints(cfg, "M", "D")
    for k, v in (("roles", "label-mask"), ("vision_tokens", "pad-only"), ("pixels", "processor")):
        other = stage_fingerprints(make_config(model="m", data="d", out="o", **{k: v}), "M", "D")
        assert other["extract"] != base["extract"], k
    for k, v in (("roles", "labels"), ("vision_tokens", "x"), ("pixels", "5:1")):
        with pytest.raises(RunError, match=k.replace("_", "-")):
            make_config(model="m", data="d", out="o", **{k: v}).validate()


def test_config_file_and_cli_take_the_choices(tmp_path, capsys):
    from scalselect_fast.cli import main
    from scalselect_fast.run.config import make_config

    f = tmp_path / "run.toml"
    f.write_text('model = "m"\ndata = "d"\nout = "o"\nroles = "label-mask"\nvision-tokens = "pad-only"\n'
                 'pixels = "1024:4096"\n')
    cfg = make_config(f)
    assert (cfg.roles, cfg.vision_tokens, cfg.pixels) == ("label-mask", "pad-only", "1024:4096")
    cfg.validate()
    assert make_config(f, roles="reference").roles == "reference"  # the command line overrides the file
    for cmd in ("extract", "run"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = capsys.readouterr().out
        assert "--roles {reference,label-mask}" in out and "--vision-tokens {reference,pad-only}" in out
        assert "--pixels paper|processor|MIN:MAX" in out
    with pytest.raises(SystemExit) as exc:
        main(["extract", "--model", "m", "--data", "d", "--out", "o", "--pixels", "9:1"])
    assert exc.value.code == 2 and "need 0 < MIN <= MAX" in capsys.readouterr().err
