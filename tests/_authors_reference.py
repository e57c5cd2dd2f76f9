"""An independent re-implementation of the ScalSelect authors' extraction rule (issue 11).

Written from the rule's description (``scripts/feature_extract_sft.py`` in ChangtiWu/ScalSelect), it
shares no code with ``scalselect_fast.extract``: no chat-template spans, no offsets, no role codes.

Per sample, batch size 1, the whole model in eager attention:

* messages as the authors build them: the images go first in the first user message (``<image>``
  markers removed, text stripped); the processor's chat template renders the conversation and the
  processor tokenises it and expands the image tokens;
* answers are found by searching each assistant answer's own token ids (``content.strip()``
  tokenised without special tokens) in the sequence, from where the previous answer ended; when not
  found, once more with a leading space (byte-level BPE merges the space into the first token);
* visual tokens: the image token; for the Qwen-VL families ``<|vision_start|>``, ``<|image_pad|>``
  and ``<|vision_end|>``;
* instruction tokens: every token neither visual nor answer;
* ``output_attentions=True``: layer ℓ's map averaged over heads, rows = instruction tokens averaged,
  columns = visual tokens, normalised, sorted descending, cumulated; the tokens up to and including
  the first whose running sum exceeds the threshold are averaged in ``hidden_states[ℓ+1]``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

QWEN_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
QWEN_VISION = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
PAPER_PIXELS = (256 * 32 * 32, 576 * 32 * 32)


def read_llava_json(path, limit=None):
    """[(id, [image paths], [{"role", "content"}])] straight from a LLaVA-format JSON file."""
    path = Path(path)
    out = []
    for rec in json.loads(path.read_text()):
        imgs = rec.get("image")
        imgs = [] if imgs is None else ([imgs] if isinstance(imgs, str) else list(imgs))
        role = {"human": "user", "gpt": "assistant", "system": "system"}
        msgs = [{"role": role[t["from"]], "content": t["value"]} for t in rec["conversations"]]
        out.append((str(rec["id"]), [str(path.parent / p) for p in imgs], msgs))
        if limit and len(out) >= limit:
            break
    return out


def authors_messages(messages, n_images):
    """The authors' conversion: images first in the first user message, ``<image>`` removed, stripped."""
    out, placed = [], False
    for m in messages:
        content = m["content"]
        if m["role"] == "user" and n_images and not placed:
            placed = True
            text = content.replace("<image>", "").strip()
            items = [{"type": "image"} for _ in range(n_images)]
            if text:
                items.append({"type": "text", "text": text})
            out.append({"role": "user", "content": items})
        else:
            out.append({"role": m["role"], "content": [{"type": "text", "text": content}]})
    return out


def find(seq, pattern, start):
    """First i >= start with seq[i:i+len(pattern)] == pattern, or None (a plain sliding window)."""
    n = len(pattern)
    for i in range(start, len(seq) - n + 1):
        if seq[i:i + n] == pattern:
            return i
    return None


def answer_positions(ids, messages, tokenizer):
    """Positions of answer tokens: each answer's own ids searched in order (one leading-space retry)."""
    marked = set()
    start = 0
    for m in messages:
        if m["role"] != "assistant":
            continue
        content = m["content"].strip()
        if not content:
            continue
        at = None
        for text in (content, " " + content):
            pat = tokenizer(text, add_special_tokens=False)["input_ids"]
            at = find(ids, pat, start) if pat else None
            if at is not None:
                break
        if at is not None:
            marked.update(range(at, at + len(pat)))
            start = at + len(pat)
    return marked


class AuthorsExtractor:
    """The authors' way on one checkpoint directory (fp32, CPU, eager, batch 1)."""

    def __init__(self, model_dir, model_type, pixels=None):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.qwen = model_type in QWEN_TYPES
        if self.qwen:
            # AutoProcessor would also build the video processor, which needs torchvision: do the Qwen
            # processor's two steps by hand (render, then repeat <|image_pad|> grid/merge² times)
            from transformers import AutoImageProcessor, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
            self.image_processor = AutoImageProcessor.from_pretrained(model_dir)
            self.template = (Path(model_dir) / "chat_template.jinja").read_text()
        else:
            self.processor = AutoProcessor.from_pretrained(model_dir)
            self.tokenizer = self.processor.tokenizer
        if pixels is not None:  # the authors set the Qwen processor's size by hand
            self.image_processor.size = {"shortest_edge": pixels[0], "longest_edge": pixels[1]}
        self.model = AutoModelForImageTextToText.from_pretrained(
            model_dir, attn_implementation="eager", dtype=torch.float32).eval()
        tok = self.tokenizer
        if self.qwen:
            self.vision_ids = {tok.convert_tokens_to_ids(t) for t in QWEN_VISION}
        else:
            self.vision_ids = {int(self.model.config.image_token_id)}

    def roles(self, messages, images):
        """(inputs, vision positions, instruction positions) of one sample."""
        conv = authors_messages(messages, len(images))
        if self.qwen:
            import torch

            text = self.tokenizer.apply_chat_template(conv, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=False)
            inputs = dict(self.image_processor(images=images, return_tensors="pt"))
            merge = self.image_processor.merge_size ** 2
            pieces = text.split("<|image_pad|>")
            assert len(pieces) == len(images) + 1
            text = pieces[0] + "".join("<|image_pad|>" * (int(g.prod()) // merge) + p
                                       for g, p in zip(inputs["image_grid_thw"], pieces[1:]))
            ids = self.tokenizer(text, return_tensors="pt")["input_ids"]
            pad = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
            inputs.update(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == pad).long())
        else:
            text = self.processor.apply_chat_template(conv, tokenize=False, add_generation_prompt=False)
            inputs = self.processor(text=[text], images=[images], return_tensors="pt")
        ids = inputs["input_ids"][0].tolist()
        answers = answer_positions(ids, messages, self.tokenizer)
        vision = [i for i, t in enumerate(ids) if t in self.vision_ids]
        instruction = [i for i in range(len(ids)) if i not in answers and ids[i] not in self.vision_ids]
        return inputs, vision, instruction

    def vector(self, messages, images, layer=0, threshold=0.9):
        """One sample's representation (float64 numpy, shape (hidden,)), or None without instruction/vision."""
        import torch

        inputs, vision, instruction = self.roles(messages, images)
        if not vision or not instruction:
            return None
        with torch.no_grad():
            out = self.model(**inputs, output_attentions=True, output_hidden_states=True, use_cache=False)
        att = out.attentions[layer][0].double().mean(0)            # (L, L), heads averaged
        hid = out.hidden_states[layer + 1][0].double()             # (L, D)
        per_vision = att[instruction][:, vision].mean(0)
        probs = per_vision / per_vision.sum()
        vals, order = torch.sort(probs, descending=True)
        over = torch.nonzero(torch.cumsum(vals, 0) > threshold).flatten()
        k = int(over[0]) + 1 if len(over) else len(vision)
        return hid[[vision[int(i)] for i in order[:k]]].mean(0).numpy()


def authors_vectors(model_dir, model_type, records, layer=0, threshold=0.9, pixels=None):
    """{id: vector} for ``records`` = [(id, image paths, messages)] (text-only records are left out)."""
    from PIL import Image

    ex = AuthorsExtractor(model_dir, model_type, pixels)
    out = {}
    for sid, paths, msgs in records:
        if not paths:
            continue
        images = [Image.open(p).convert("RGB") for p in paths]
        v = ex.vector(msgs, images, layer, threshold)
        if v is not None:
            out[sid] = v
    return out
