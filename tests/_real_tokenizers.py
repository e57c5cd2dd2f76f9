"""Real LLaVA-1.5 and Qwen2-VL tokenizers for the tests, built offline from a cached PyPI download.

The ``llama-cpp-python`` source distribution (MIT) vendors vocabulary-only GGUF files of llama.cpp's
tokenizer tests: ``ggml-vocab-llama-spm.gguf`` (the Llama-2 SentencePiece vocabulary LLaVA-1.5 uses,
32,000 tokens) and ``ggml-vocab-qwen2.gguf`` (the Qwen2 byte-level BPE vocabulary, 151,936 ids).
transformers reads them (``from_pretrained(dir, gguf_file=...)``, needs the ``gguf`` package); we
add each family's special tokens at their published ids and the published chat templates, and save
ordinary tokenizer folders. Everything lives in a cache outside the repository
(``$SCALSELECT_TEST_CACHE``, default ``~/.cache/scalselect-test``): the sdist is downloaded once
with pip, the folders are built once per transformers version. Vocabulary files are never committed.

When the registry cannot be reached the tests that need these tokenizers are skipped, saying so.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

LLAMA_CPP_PYTHON = "0.3.36"
CACHE = Path(os.environ.get("SCALSELECT_TEST_CACHE", Path.home() / ".cache" / "scalselect-test"))
VOCABS = {"llava": "ggml-vocab-llama-spm.gguf", "qwen2_vl": "ggml-vocab-qwen2.gguf"}

# the chat templates published with llava-hf/llava-1.5-7b-hf and Qwen/Qwen2-VL-7B-Instruct
LLAVA_15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in "
    "messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] "
    "== 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value "
    "+ 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|>"
    "<|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = "
    "video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|>"
    "<|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# published ids of the Qwen2-VL special tokens (the GGUF holds [PADnnnnnn] placeholders there)
QWEN2_VL_SPECIALS = {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>",
                     151646: "<|object_ref_start|>", 151647: "<|object_ref_end|>", 151648: "<|box_start|>",
                     151649: "<|box_end|>", 151650: "<|quad_start|>", 151651: "<|quad_end|>",
                     151652: "<|vision_start|>", 151653: "<|vision_end|>", 151654: "<|vision_pad|>",
                     151655: "<|image_pad|>", 151656: "<|video_pad|>"}
LLAVA_SPECIALS = {32000: "<image>", 32001: "<pad>"}


def _vocab_dir() -> Path:
    """The two GGUF vocabularies, extracted from the cached (or freshly downloaded) sdist."""
    out = CACHE / "vocab"
    if all((out / f).exists() for f in VOCABS.values()):
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.exists():
        # only this package's sdist; its build dependencies come as wheels, so this takes seconds
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python", "-q",
               f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(CACHE)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"real tokenizers: could not download llama-cpp-python=={LLAMA_CPP_PYTHON} from PyPI ({exc})")
        if r.returncode != 0 or not sdist.exists():
            why = (r.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"real tokenizers: PyPI not reachable for the llama-cpp-python sdist ({why})")
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tar:
        for name in VOCABS.values():
            member = tar.getmember(f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/models/{name}")
            src = tar.extractfile(member)
            tmp = out / (name + ".part")
            with open(tmp, "wb") as fh:
                shutil.copyfileobj(src, fh)
            tmp.replace(out / name)
    return out


def _build_llava(vocab: Path, out: Path) -> None:
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(vocab, gguf_file=VOCABS["llava"])
    for i, t in sorted(LLAVA_SPECIALS.items()):
        tok.add_tokens([AddedToken(t, special=True, normalized=False)], special_tokens=True)
        assert tok.convert_tokens_to_ids(t) == i, (t, i)
    tok.pad_token = "<pad>"
    tok.chat_template = LLAVA_15_TEMPLATE
    tok.save_pretrained(out)


def _build_qwen(vocab: Path, out: Path) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = AutoTokenizer.from_pretrained(vocab, gguf_file=VOCABS["qwen2_vl"])
    raw = out.with_name(out.name + ".raw")
    tok.save_pretrained(raw)
    spec = json.loads((raw / "tokenizer.json").read_text())
    vocab_map = spec["model"]["vocab"]
    by_id = {v: k for k, v in vocab_map.items()}
    added = {a["id"]: a for a in spec["added_tokens"]}
    for i, content in QWEN2_VL_SPECIALS.items():
        old = added[i]["content"] if i in added else by_id.get(i)
        if old is not None and old in vocab_map and old != content:
            del vocab_map[old]
        vocab_map[content] = i
        entry = added.setdefault(i, {"id": i, "single_word": False, "lstrip": False, "rstrip": False,
                                     "normalized": False})
        entry.update(content=content, special=True)
    spec["added_tokens"] = sorted(added.values(), key=lambda a: a["id"])
    (raw / "tokenizer.json").write_text(json.dumps(spec))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(raw / "tokenizer.json"), eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=QWEN2_VL_TEMPLATE,
                                   extra_special_tokens={"image_token": "<|image_pad|>",
                                                         "video_token": "<|video_pad|>",
                                                         "vision_bos_token": "<|vision_start|>",
                                                         "vision_eos_token": "<|vision_end|>"})
    for i, t in QWEN2_VL_SPECIALS.items():
        assert fast.convert_tokens_to_ids(t) == i, (t, i)
    fast.save_pretrained(out)
    shutil.rmtree(raw)


def real_tokenizer_dir(family: str) -> Path:
    """A saved tokenizer folder for ``family`` in {"llava", "qwen2_vl"} (built once, then cached)."""
    import transformers

    out = CACHE / f"tokenizers-tf{transformers.__version__}" / family
    if (out / "tokenizer_config.json").exists():
        return out
    vocab = _vocab_dir()
    tmp = out.with_name(family + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    (_build_llava if family == "llava" else _build_qwen)(vocab, tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def tiny_model_with_real_tokenizer(family: str, out: Path, num_layers: int = 2) -> Path:
    """The tiny random-weight ``family`` model, its embeddings resized to the real vocabulary, with
    the real tokenizer, the published chat template and the published special-token ids."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    from scalselect_fast.extract import build_tiny_model

    base = build_tiny_model(family, out.with_name(out.name + "-base"), num_layers=num_layers)
    tok = AutoTokenizer.from_pretrained(real_tokenizer_dir(family))
    cls = getattr(transformers, {"llava": "LlavaForConditionalGeneration",
                                 "qwen2_vl": "Qwen2VLForConditionalGeneration"}[family])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls.from_pretrained(base).eval()
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    cfg, tc = model.config, model.config.get_text_config()
    if family == "llava":
        cfg.image_token_id = 32000
        tc.bos_token_id, tc.eos_token_id, tc.pad_token_id = 1, 2, 32001
    else:
        cfg.image_token_id, cfg.video_token_id = 151655, 151656
        cfg.vision_start_token_id, cfg.vision_end_token_id = 151652, 151653
        tc.bos_token_id, tc.eos_token_id, tc.pad_token_id = 151643, 151645, 151643
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    for name in ("preprocessor_config.json", "processor_config.json"):
        shutil.copy(base / name, out / name)
    (out / "chat_template.jinja").write_text(LLAVA_15_TEMPLATE if family == "llava" else QWEN2_VL_TEMPLATE)
    return out
