"""Tiny random-weight vision-language models for tests, the demo and benchmarks (no downloads).

:func:`build_tiny_model` writes a directory that loads exactly like a real checkpoint
(``--model PATH``): ``config.json`` + ``model.safetensors`` + a tokenizer with the family's chat
template and vision special tokens + an image-processor config. The architecture comes from a config
shipped in ``scalselect_fast/assets/tiny_models/<family>.json``; weights are drawn from a fixed seed;
the tokenizer is a small byte-level BPE trained from code on a fixed corpus (deterministic, a few
hundred tokens), so nothing is ever fetched from the network.

The chat templates below are written for these tiny models in the style of each family's prompt
format (LLaVA-1.5: ``USER: <image>\\n... ASSISTANT: ...</s>``; Qwen-VL: ChatML with
``<|vision_start|><|image_pad|><|vision_end|>``). Real checkpoints bring their own templates; the
extractor only relies on the template rendering each message's text verbatim.

This module is not a model zoo: the models are random, their outputs meaningless, and they exist so
the extraction machinery runs end to end on real transformers classes.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

__all__ = ["FAMILIES", "build_tiny_model", "build_shaped_model", "tiny_config", "build_tokenizer",
           "build_image_processor"]

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "tiny_models"

#: families the factory can build (the Qwen3-VL entry needs a transformers with Qwen3VLConfig)
FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")

LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] if item['type'] == 'text' -%}{{ item['text'] }}{%- endfor -%}"
    "{%- endif -%}{{ ' ' }}"
    "{%- else -%}"
    "{{ message['role'] | upper }}{{ ': ' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<image>\\n' }}{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{ '</s>' }}{%- else -%}{{ ' ' }}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

_LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

# A fixed training corpus: a deterministic tokenizer with realistic, context-dependent merges.
_CORPUS = [
    "What is shown in this image? Describe the picture in detail.",
    "The image shows a red square on a blue background with a small green circle.",
    "How many objects are there? There are three objects: two circles and one square.",
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "You are a helpful assistant. Answer the question using a single word or phrase.",
    "What color is the large shape? It is yellow. Where is it? In the top left corner.",
    "Is there text in the image? No. What does the chart say? Sales increased in 2024.",
    "user assistant system USER ASSISTANT image picture photo question answer",
]


def _family_specials(family: str) -> list[str]:
    return _LLAVA_SPECIALS if family == "llava" else _QWEN_SPECIALS


def build_tokenizer(family: str, vocab_size: int = 384):
    """Build the family's tiny tokenizer from code (byte-level BPE trained on a fixed corpus).

    Parameters
    ----------
    family : {"llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"}
    vocab_size : int
        Target vocabulary size including the 256 byte symbols and the special tokens.

    Returns
    -------
    transformers.PreTrainedTokenizerFast
        With the family's chat template, padding token and vision special tokens; LLaVA's prepends
        ``<s>`` like Llama's tokenizer, Qwen's adds nothing.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    _check_family(family)
    specials = _family_specials(family)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    if family == "llava":
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
        kw = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                  extra_special_tokens={"image_token": "<image>"}, chat_template=LLAVA_CHAT_TEMPLATE)
    else:
        kw = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>",
                  extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                        "vision_bos_token": "<|vision_start|>",
                                        "vision_eos_token": "<|vision_end|>"},
                  chat_template=QWEN_CHAT_TEMPLATE)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=4096, **kw)


def build_image_processor(family: str, config: dict):
    """Image processor sized for the tiny vision tower in ``config`` (PIL backend, no torchvision)."""
    _check_family(family)
    if family == "llava":
        from transformers import CLIPImageProcessor

        side = int(config["vision_config"]["image_size"])
        try:
            from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as cls
        except ImportError:  # older transformers: CLIPImageProcessor is the PIL one
            cls = CLIPImageProcessor
        return cls(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    vc = config["vision_config"]
    patch, merge = int(vc["patch_size"]), int(vc["spatial_merge_size"])
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as cls
    except ImportError:
        from transformers import Qwen2VLImageProcessor as cls
    factor = patch * merge
    max_pixels = config.get("_max_pixels", config.get("_tiny_max_pixels", (4 * factor) ** 2))
    return cls(patch_size=patch, merge_size=merge, temporal_patch_size=int(vc.get("temporal_patch_size", 2)),
               min_pixels=int(config.get("_min_pixels", factor * factor)), max_pixels=int(max_pixels))


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {list(FAMILIES)}")


def _merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        base[k] = _merge(dict(base.get(k) or {}), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


def tiny_config(family: str, num_layers: int | None = None, overrides: dict | None = None) -> dict:
    """The shipped architecture config of a tiny ``family`` model (a dict, see the assets folder).

    ``overrides`` is merged recursively (e.g. ``{"text_config": {"hidden_size": 128}}``).
    """
    _check_family(family)
    cfg = json.loads((ASSETS / f"{family}.json").read_text())
    if overrides:
        cfg = _merge(cfg, copy.deepcopy(overrides))
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        cfg["text_config"]["num_hidden_layers"] = int(num_layers)
    return cfg


def _config_object(family: str, cfg: dict, tokenizer, keep_vocab: bool = False):
    import transformers

    cfg = {k: v for k, v in copy.deepcopy(cfg).items() if not k.startswith("_") and k != "model_type"}
    cls_name = {"llava": "LlavaConfig", "qwen2_vl": "Qwen2VLConfig", "qwen2_5_vl": "Qwen2_5_VLConfig",
                "qwen3_vl": "Qwen3VLConfig"}[family]
    if not hasattr(transformers, cls_name):
        raise ValueError(f"this transformers ({transformers.__version__}) has no {cls_name}; "
                         f"tiny {family} models need a newer transformers")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _family_specials(family)}
    tc = cfg["text_config"]
    if not keep_vocab or len(tokenizer) > int(tc.get("vocab_size", 0)):
        tc["vocab_size"] = len(tokenizer)
    if family == "llava":
        cfg["image_token_id"] = ids["<image>"]
        tc.update(bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"])
    else:
        cfg.update(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
        tc.update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                  pad_token_id=ids["<|endoftext|>"])
    return getattr(transformers, cls_name)(**cfg)


def build_tiny_model(family: str, out_dir: str | os.PathLike, num_layers: int | None = None, seed: int = 0,
                     overwrite: bool = False, overrides: dict | None = None) -> Path:
    """Build a deterministic random-weight tiny VLM and save it like a real checkpoint.

    Parameters
    ----------
    family : {"llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"}
        ``llava``: llava-hf layout (``LlavaForConditionalGeneration``, CLIP vision + Llama text).
        ``qwen2_vl`` / ``qwen2_5_vl`` / ``qwen3_vl``: the Qwen-VL classes of the same names.
    out_dir : path
        Directory to write (``config.json``, ``model.safetensors``, tokenizer and processor files).
    num_layers : int, optional
        Number of decoder layers of the language model (default: the shipped config's).
    seed : int
        Weights are drawn with ``torch.manual_seed(seed)``: the same seed gives the same weights.
    overwrite : bool
        Rebuild even if ``out_dir`` already holds a model built with the same arguments.
    overrides : dict, optional
        Recursively merged into the shipped config (benchmarks use it for deeper/wider models).

    Returns
    -------
    pathlib.Path
        ``out_dir``, loadable with ``scalselect extract --model out_dir``.
    """
    import torch
    import transformers

    out = Path(out_dir)
    cfg_dict = tiny_config(family, num_layers, overrides)
    stamp = {"family": family, "num_layers": cfg_dict["text_config"]["num_hidden_layers"], "seed": seed,
             "transformers": transformers.__version__, "overrides": overrides or {}}
    stamp_path = out / "tiny_model.json"
    if not overwrite and stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp \
            and (out / "model.safetensors").exists():
        return out
    tokenizer = build_tokenizer(family)
    config = _config_object(family, cfg_dict, tokenizer)
    model_cls = {"llava": "LlavaForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration",
                 "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                 "qwen3_vl": "Qwen3VLForConditionalGeneration"}[family]
    # Fork the global RNG so building a model does not perturb the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, model_cls)(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    build_image_processor(family, cfg_dict).save_pretrained(out)
    _save_processor(family, out, cfg_dict, tokenizer)
    from ..atomic import atomic_write_json

    atomic_write_json(stamp_path, stamp)
    return out


def build_shaped_model(config, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a weightless checkpoint directory with a published model's shapes (no downloads).

    The directory holds the architecture (``config.json``), an empty ``model.safetensors``, the
    family's stand-in tokenizer and chat template (:func:`build_tokenizer`: its ids index the full-size
    embedding table) and an image processor with the published vision settings. Load it with
    ``load_vlm(out_dir, layer=ℓ, random_weights=True)``: every weight is then "missing" and drawn by
    transformers' initialisation, and only what extraction runs is allocated (vision tower,
    projector, embeddings, layers 0..ℓ).

    Parameters
    ----------
    config : path or dict
        A config with the family's ``model_type`` and nested ``vision_config``/``text_config``
        (``benchmarks/configs/*.json``). Optional ``_min_pixels``/``_max_pixels`` set the Qwen-VL
        processor's pixel range; other keys starting with ``_`` are notes.
    out_dir : path
        Directory to write.
    overwrite : bool
        Rebuild even if ``out_dir`` already holds this config.

    Returns
    -------
    pathlib.Path
        ``out_dir``.

    Notes
    -----
    The stand-in tokenizer splits text into more pieces than the real 32k/150k vocabularies, so
    benchmarks should report the token counts they ran with. Token positions, not token values, set
    the cost of a forward pass.
    """
    import transformers
    from safetensors.torch import save_file

    from ..atomic import atomic_write_json

    cfg_dict = json.loads(Path(config).read_text()) if not isinstance(config, dict) else copy.deepcopy(config)
    family = cfg_dict.get("model_type")
    _check_family(family)
    out = Path(out_dir)
    stamp = {"shaped": cfg_dict, "transformers": transformers.__version__}
    stamp_path = out / "shaped_model.json"
    if not overwrite and stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp:
        return out
    tokenizer = build_tokenizer(family)
    config_obj = _config_object(family, cfg_dict, tokenizer, keep_vocab=True)
    out.mkdir(parents=True, exist_ok=True)
    config_obj.save_pretrained(out)
    save_file({}, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    build_image_processor(family, cfg_dict).save_pretrained(out)
    _save_processor(family, out, cfg_dict, tokenizer)
    atomic_write_json(stamp_path, stamp)
    return out


def _save_processor(family: str, out: Path, cfg: dict, tokenizer) -> None:
    """Write processor_config.json + chat template so ``AutoProcessor`` loads the directory."""
    from ..atomic import atomic_write_json

    template = LLAVA_CHAT_TEMPLATE if family == "llava" else QWEN_CHAT_TEMPLATE
    (out / "chat_template.jinja").write_text(template)
    if family == "llava":
        vc = cfg["vision_config"]
        proc = {"processor_class": "LlavaProcessor", "patch_size": int(vc["patch_size"]),
                "vision_feature_select_strategy": cfg.get("vision_feature_select_strategy", "default"),
                "num_additional_image_tokens": 1, "image_token": "<image>"}
    else:
        proc = {"processor_class": {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
                                    "qwen3_vl": "Qwen3VLProcessor"}[family]}
    atomic_write_json(out / "processor_config.json", proc)
