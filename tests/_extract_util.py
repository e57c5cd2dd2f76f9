"""Shared helpers for the extraction tests: tiny datasets and the eager full-attention-map reference."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

QUESTIONS = ["What is shown in the picture?", "Describe the image in detail.", "How many objects are there?",
             "What color is the large shape?", "Is there text in the image?"]
ANSWERS = ["A red square on a blue background.", "Three objects: two circles and one square.", "It is yellow.",
           "No.", "The chart says sales increased."]


def make_dataset(root: Path, n: int = 10, seed: int = 0, size=(32, 32), extra: dict | None = None) -> Path:
    """LLaVA-format JSON with ``n`` generated images (varied sizes/turns); returns the JSON path."""
    from PIL import Image

    rs = np.random.RandomState(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(n):
        h, w = size if i % 3 else (size[0], size[1] + 8)
        Image.fromarray((rs.rand(h, w, 3) * 255).astype("uint8")).save(root / "img" / f"{i}.png")
        conv = [{"from": "human", "value": "<image>\n" + QUESTIONS[i % 5]}, {"from": "gpt", "value": ANSWERS[i % 5]}]
        if i % 4 == 1:  # multi-turn
            conv += [{"from": "human", "value": QUESTIONS[(i + 1) % 5]}, {"from": "gpt", "value": ANSWERS[(i + 2) % 5]}]
        recs.append({"id": f"s{i}", "image": f"img/{i}.png", "conversations": conv})
    for i, patch in (extra or {}).items():
        recs[i].update(patch)
        for k, v in list(patch.items()):
            if v is None:
                del recs[i][k]
    path = root / "data.json"
    path.write_text(json.dumps(recs))
    return path


_EAGER: dict = {}


def eager_reference(model_dir, inputs: dict, roles, layer: int, threshold: float = 0.9, instruction: str = "all"):
    """ScalSelect vectors from the full model in eager mode with every attention map returned.

    The slow, obvious definition: average layer ``layer``'s attention map over heads, take the mean
    over instruction rows of each visual column, normalise over visual tokens, sort descending, keep
    up to the first token where the running sum exceeds ``threshold``, average those tokens'
    ``hidden_states[layer + 1]``.
    """
    import torch
    from transformers import AutoModelForImageTextToText

    from scalselect_fast.extract import roles as R

    key = str(model_dir)
    if key not in _EAGER:
        _EAGER[key] = AutoModelForImageTextToText.from_pretrained(model_dir, attn_implementation="eager").eval()
    full = _EAGER[key]
    with torch.no_grad():
        out = full(**inputs, output_attentions=True, output_hidden_states=True, use_cache=False)
    att = out.attentions[layer].double()             # (B, H, L, L), the map the paper's scripts use
    hid = out.hidden_states[layer + 1].double()      # (B, L, D)
    mask = inputs["attention_mask"].bool()
    roles = torch.as_tensor(roles)
    qmask = torch.from_numpy(R.instruction_mask(roles.numpy(), instruction)) & mask
    vis = (roles == R.VISUAL) & mask
    vecs = []
    for b in range(att.shape[0]):
        p = att[b].mean(0)
        rows = qmask[b].nonzero().flatten()
        cols = vis[b].nonzero().flatten()
        col = p[rows][:, cols].mean(0)
        a = col / col.sum()
        order = torch.argsort(-a, stable=True)
        cs = torch.cumsum(a[order], 0)
        over = (cs > threshold).nonzero().flatten()
        k = int(over[0]) + 1 if len(over) else len(order)
        vecs.append(hid[b, cols[order[:k]]].mean(0))
    return torch.stack(vecs).float().numpy()


def env_without_threads():
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env
