"""Real-size shapes without downloads: what the early-exit load allocates, counted against the config.

The published shapes (``benchmarks/configs/*.json``) are loaded with random weights, in bf16, at
ℓ = 0/1, and the parameters actually allocated are compared with a count written out here by hand
from each architecture (vision tower + projector/merger + embeddings + layers 0..ℓ + final norm, and
nothing else: no LM head, no decoder layer > ℓ, no vision layer LLaVA does not read). About 1.3-2.8 GB
of host memory per model, for a few seconds each.
"""
from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from scalselect_fast.extract import UnsupportedModelError, build_shaped_model, build_tiny_model, load_vlm  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "benchmarks" / "configs"


def _llava_params(c: dict, layer: int) -> int:
    """LLaVA-1.5: CLIP ViT (only the layers up to vision_feature_layer), 2-layer MLP projector, Llama."""
    v, t = c["vision_config"], c["text_config"]
    V, Iv, P, S = v["hidden_size"], v["intermediate_size"], v["patch_size"], v["image_size"]
    kept = v["num_hidden_layers"] + 1 + c["vision_feature_layer"]  # hidden_states[-2] = after 23 of 24 layers
    positions = (S // P) ** 2 + 1
    clip_layer = 4 * (V * V + V) + (V * Iv + Iv) + (Iv * V + V) + 2 * (2 * V)
    vision = V + 3 * P * P * V + positions * V + 2 * V + kept * clip_layer + 2 * V  # cls, patches, pos, 2 LNs
    D, F = t["hidden_size"], t["intermediate_size"]
    kv = t["num_key_value_heads"] * (D // t["num_attention_heads"])
    projector = (V * D + D) + (D * D + D)
    decoder_layer = 2 * D * D + 2 * D * kv + 3 * D * F + 2 * D
    return vision + projector + t["vocab_size"] * D + (layer + 1) * decoder_layer + D


def _qwen25_params(c: dict, layer: int) -> int:
    """Qwen2.5-VL: windowed ViT with RMSNorm and SwiGLU blocks, 2x2 patch merger; Qwen2 decoder (q/k/v bias)."""
    v, t = c["vision_config"], c["text_config"]
    H, Iv, P, T, out = v["hidden_size"], v["intermediate_size"], v["patch_size"], v["temporal_patch_size"], v["out_hidden_size"]
    m = H * v["spatial_merge_size"] ** 2
    block = 2 * H + (H * 3 * H + 3 * H) + (H * H + H) + 2 * (H * Iv + Iv) + (Iv * H + H)
    vision = 3 * T * P * P * H + v["depth"] * block + H + (m * m + m) + (m * out + out)
    D, F = t["hidden_size"], t["intermediate_size"]
    kv = t["num_key_value_heads"] * (D // t["num_attention_heads"])
    decoder_layer = (D * D + D) + 2 * (D * kv + kv) + D * D + 3 * D * F + 2 * D
    return vision + t["vocab_size"] * D + (layer + 1) * decoder_layer + D


def _qwen3_params(c: dict, layer: int) -> int:
    """Qwen3-VL: ViT with LayerNorm/GELU blocks and learned positions, a merger plus one deepstack merger
    per tapped block; Qwen3 decoder (no biases, per-head q/k RMSNorm)."""
    v, t = c["vision_config"], c["text_config"]
    H, Iv, P, T, out = v["hidden_size"], v["intermediate_size"], v["patch_size"], v["temporal_patch_size"], v["out_hidden_size"]
    m = H * v["spatial_merge_size"] ** 2
    block = 2 * (2 * H) + (H * 3 * H + 3 * H) + (H * H + H) + (H * Iv + Iv) + (Iv * H + H)
    merger_mlp = (m * m + m) + (m * out + out)
    vision = (3 * T * P * P * H + H) + v["num_position_embeddings"] * H + v["depth"] * block \
        + (2 * H + merger_mlp) + len(v["deepstack_visual_indexes"]) * (2 * m + merger_mlp)
    D, F, hd = t["hidden_size"], t["intermediate_size"], t["head_dim"]
    q, kv = t["num_attention_heads"] * hd, t["num_key_value_heads"] * hd
    decoder_layer = D * q + 2 * D * kv + q * D + 2 * hd + 3 * D * F + 2 * D
    return vision + t["vocab_size"] * D + (layer + 1) * decoder_layer + D


CASES = [("llava-1.5-7b", 1, _llava_params), ("qwen2.5-vl-7b", 0, _qwen25_params),
         ("qwen3-vl-8b", 0, _qwen3_params)]


#: parameter counts the model cards publish (billions, 3 significant figures)
PUBLISHED_B = {"llava-1.5-7b": 7.06, "qwen2.5-vl-7b": 8.29, "qwen3-vl-8b": 8.77}


@pytest.mark.parametrize("name", sorted(PUBLISHED_B))
def test_shaped_configs_have_the_published_size(tmp_path, name):
    """The whole model of each config (built on the meta device: nothing allocated) has the
    checkpoint's published parameter count, so the shapes are the real ones."""
    import transformers
    from transformers import AutoConfig, AutoModelForImageTextToText

    if name == "qwen3-vl-8b" and not hasattr(transformers, "Qwen3VLModel"):
        pytest.skip(f"transformers {transformers.__version__} has no Qwen3-VL")
    path = build_shaped_model(CONFIGS / f"{name}.json", tmp_path / name)
    with torch.device("meta"):
        full = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(path))
    assert round(sum(p.numel() for p in full.parameters()) / 1e9, 2) == PUBLISHED_B[name]


@pytest.mark.parametrize("name,layer,expected_params", CASES, ids=[c[0] for c in CASES])
def test_early_exit_load_allocates_only_what_runs(tmp_path, name, layer, expected_params):
    import transformers

    cfg = json.loads((CONFIGS / f"{name}.json").read_text())
    if name == "qwen3-vl-8b" and not hasattr(transformers, "Qwen3VLModel"):
        pytest.skip(f"transformers {transformers.__version__} has no Qwen3-VL")
    path = build_shaped_model(CONFIGS / f"{name}.json", tmp_path / name)
    vlm = load_vlm(path, layer=layer, dtype="bf16", device="cpu", random_weights=True)
    try:
        params = dict(vlm.model.named_parameters())
        assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in params.values())
        allocated = sum(p.numel() for p in params.values())
        assert allocated == expected_params(cfg, layer), (name, allocated, expected_params(cfg, layer))
        assert allocated * 2 == sum(p.untyped_storage().nbytes() for p in params.values()), "shared/oversized storage"
        assert not [n for n in params if "lm_head" in n], "the LM head never runs and must not be allocated"
        assert len(vlm.language_model.layers) == layer + 1
        assert vlm.depth == cfg["text_config"]["num_hidden_layers"]
        assert vlm.hidden_size == cfg["text_config"]["hidden_size"]
        assert all(bool(p.isfinite().all()) for p in params.values())  # random init, not garbage memory
        w = vlm.decoder_layer.mlp.down_proj.weight.float()  # transformers' init scale, drawn by the fast init
        assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 1e-3
        assert bool((vlm.decoder_layer.input_layernorm.weight == 1).all())
        if name.startswith("llava"):
            assert len(vlm.model.vision_tower.encoder.layers) == cfg["vision_config"]["num_hidden_layers"] - 1
    finally:
        del vlm
        gc.collect()


def test_shaped_llava_runs_a_sample_through_layer_0(tmp_path):
    """A 336-px image becomes 576 visual tokens and one pooled 4096-vector (random weights, bf16)."""
    import numpy as np
    from PIL import Image

    from scalselect_fast.data import Sample
    from scalselect_fast.extract import encode_and_pool
    from scalselect_fast.extract import roles as R

    path = build_shaped_model(CONFIGS / "llava-1.5-7b.json", tmp_path / "llava")
    vlm = load_vlm(path, layer=0, dtype="bf16", device="cpu", random_weights=True)
    try:
        img = tmp_path / "a.jpg"
        Image.fromarray(np.random.RandomState(0).randint(0, 255, (480, 640, 3), dtype=np.uint8)).save(img)
        msgs = [{"role": "user", "content": "<image>\nWhat is in the picture?"},
                {"role": "assistant", "content": "Noise."}]
        enc = vlm.encode("s0", msgs, [Image.open(img).convert("RGB")])
        assert int((enc.roles == R.VISUAL).sum()) == 576 == int((np.asarray(enc.input_ids) == vlm.image_token_id).sum())
        res = encode_and_pool(vlm, [Sample("s0", [str(img)], msgs, None, 0, None, {})], pool_impl="torch")
        assert res.vectors.shape == (1, 4096) and np.isfinite(res.vectors).all()
    finally:
        del vlm
        gc.collect()


def test_missing_weights_refused_unless_random_weights(tmp_path):
    """A checkpoint lacking weights would give random vectors: refused with the key named."""
    path = build_tiny_model("llava", tmp_path / "m", num_layers=2)
    f = path / "model.safetensors"
    tensors = safetensors_torch.load_file(str(f))
    dropped = next(k for k in tensors if "layers.0.mlp.down_proj" in k)
    del tensors[dropped]
    safetensors_torch.save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelError, match="weights the model needs are not in the checkpoint"):
        load_vlm(path, layer=0, device="cpu")
    vlm = load_vlm(path, layer=0, device="cpu", random_weights=True)
    assert len(vlm.language_model.layers) == 1


@pytest.mark.native_kernels  # reads its Parquet input through the native Arrow rows
def test_bench_extract_gpu_cpu_smoke_runs_and_both_contenders_agree(tmp_path):
    """The GPU benchmark's --cpu-smoke mode runs end to end: real data path (Parquet, JPEG bytes),
    ours vs the authors' whole eager model on the same weights give the same vectors."""
    import csv
    import sys

    sys.path.insert(0, str(CONFIGS.parent))
    import bench_extract_gpu

    rc = bench_extract_gpu.main(["--cpu-smoke", "--models", "llava-1.5-7b", "--n", "4", "--n-authors", "2",
                                 "--batch-sizes", "2", "--workers", "1", "--out", str(tmp_path)])
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "extract_gpu.csv")))
    assert len(rows) == 1 and rows[0]["mode"] == "cpu-smoke" and rows[0]["n"] == "4"
    assert float(rows[0]["min_cosine"]) > 0.9999
    assert float(rows[0]["mean_tokens"]) > 576  # 576 visual tokens + the instruction
    for k in ("ours_samples_s", "authors_b1_samples_s", "loader_samples_s", "ms_decoder_layer_l", "ms_vision_tower"):
        assert float(rows[0][k]) > 0, k
