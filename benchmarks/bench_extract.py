"""Extraction throughput: early exit + fused pooling vs the authors' way (full eager forward, all maps).

Baseline (what the ScalSelect scripts do): run the WHOLE model with ``attn_implementation="eager"``,
``output_attentions=True`` and ``output_hidden_states=True``, then compute the representation from
layer ℓ's returned ``[B, H, L, L]`` map. Ours: vision tower + layers 0..ℓ only (layers > ℓ not even
loaded), SDPA with q/k captured by the attention hook, :func:`scalselect_fast.ops.instruction_attended_pool`.

Both sides share the same sample encoding (chat template, tokenisation, image preprocessing), which is
timed too: ``end-to-end`` = encode + forward + pool, ``forward`` = forward + pool on pre-encoded batches.
The model is a tiny-but-deep random-weight LLaVA (CPU). Floor (issue 3): extraction >= 4x the baseline's
samples/s end to end. Prints a table, appends rows to ``benchmarks/results/extract.csv``.

Agreement (``vs_authors_*`` columns) is measured against ``tests/_authors_reference.py``, an
independent re-implementation of the authors' extraction rule (their answer search, their visual
token set, eager full model, batch 1) that shares no code with our role assignment (issue 11).

    python benchmarks/bench_extract.py            # quick: 12 layers, 16 samples
    python benchmarks/bench_extract.py --full     # 24 layers, wider, 64 samples
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _authors_reference import authors_vectors  # noqa: E402
from _suite import append_csv, median_time  # noqa: E402

FLOOR = 4.0


def _dataset(root: Path, n: int, side: int):
    from PIL import Image

    from scalselect_fast.data import Sample

    rs = np.random.RandomState(0)
    qs = ["What is shown in the picture?", "Describe the image in detail, please.", "How many objects are there?"]
    out = []
    for i in range(n):
        p = root / f"{i}.png"
        Image.fromarray((rs.rand(side, side, 3) * 255).astype("uint8")).save(p)
        msgs = [{"role": "user", "content": "<image>\n" + qs[i % 3]},
                {"role": "assistant", "content": "The picture shows a few coloured shapes on a plain background."}]
        out.append(Sample(f"s{i}", [str(p)], msgs, None, i, None, {}))
    return out


def _baseline_pool(out, inputs, roles, layer, threshold):
    """The authors' computation from the returned eager attention map of layer ℓ (vectorised)."""
    import torch

    from scalselect_fast.extract import roles as R

    att = out.attentions[layer].float().mean(1)                # (B, L, L)
    hid = out.hidden_states[layer + 1].float()
    dev = att.device
    mask = inputs["attention_mask"].bool().to(dev)
    q = torch.from_numpy(R.instruction_mask(roles.numpy(), "all")).to(dev) & mask
    v = (roles.to(dev) == R.VISUAL) & mask
    col = (att * q[:, :, None]).sum(1) / q.sum(1, keepdim=True)   # mean over instruction rows
    col = torch.where(v, col, torch.zeros_like(col))
    a = col / col.sum(1, keepdim=True)
    vals, order = torch.sort(a, dim=1, descending=True, stable=True)
    cs = torch.cumsum(vals, 1)
    k = ((cs > threshold).float().argmax(1) + 1).clamp(max=v.sum(1))
    vecs = []
    for b in range(att.shape[0]):
        vecs.append(hid[b, order[b, : int(k[b])]].mean(0))
    return torch.stack(vecs).cpu().numpy()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="24 layers, hidden 256, 64 samples")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads [1]: on a shared machine more threads mostly measure contention")

    args = p.parse_args(argv)

    import torch
    import transformers
    from transformers import AutoModelForImageTextToText

    from scalselect_fast.data import load_image
    from scalselect_fast.extract import build_tiny_model, encode_and_pool, load_vlm

    if args.threads:
        torch.set_num_threads(args.threads)
    layers = args.layers or (24 if args.full else 12)
    n = args.n or (64 if args.full else 16)
    hidden = 256 if args.full else 128
    side, patch = 48, 4  # 144 visual tokens per image
    overrides = {"vision_config": {"image_size": side, "patch_size": patch, "hidden_size": 64, "intermediate_size": 128},
                 "text_config": {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_attention_heads": 8,
                                 "num_key_value_heads": 8}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_tiny_model("llava", tmp / "model", num_layers=layers, overrides=overrides)
        (tmp / "img").mkdir()
        samples = _dataset(tmp / "img", n, side)
        batches = [samples[i:i + args.batch_size] for i in range(0, n, args.batch_size)]

        ours = load_vlm(model_dir, layer=args.layer, dtype="fp32", device="cpu")
        full = AutoModelForImageTextToText.from_pretrained(model_dir, attn_implementation="eager").eval()

        def encode(batch):
            enc = [ours.encode(s.id, s.messages, [load_image(x) for x in s.images]) for s in batch]
            return ours.collate(enc, "right")

        pre = [encode(b) for b in batches]
        seq = float(np.mean([c["mask"].sum(1).float().mean().item() for c in pre]))

        def run_ours_e2e():
            return [encode_and_pool(ours, b, pool_impl="torch").vectors for b in batches]

        def run_base_e2e():
            res = []
            for b in batches:
                c = encode(b)
                with torch.no_grad():
                    out = full(**c["inputs"], output_attentions=True, output_hidden_states=True, use_cache=False)
                res.append(_baseline_pool(out, c["inputs"], c["roles"], args.layer, 0.9))
            return res

        def run_ours_fwd():
            import scalselect_fast.ops as ops

            from scalselect_fast.extract import roles as R

            res = []
            for c in pre:
                cap = ours.forward_layer(c["inputs"])
                q = torch.from_numpy(R.instruction_mask(c["roles"].numpy(), "all"))
                res.append(ops.instruction_attended_pool(cap.query, cap.key, cap.hidden, q, c["roles"] == R.VISUAL,
                                                         c["mask"], 0.9, cap.scaling, pool_impl="torch").numpy())
            return res

        def run_base_fwd():
            res = []
            for c in pre:
                with torch.no_grad():
                    out = full(**c["inputs"], output_attentions=True, output_hidden_states=True, use_cache=False)
                res.append(_baseline_pool(out, c["inputs"], c["roles"], args.layer, 0.9))
            return res

        # warm-up + agreement check (same vectors, up to float rounding)
        a, b = np.concatenate(run_ours_e2e()), np.concatenate(run_base_e2e())
        max_diff = float(np.abs(a - b).max())
        # agreement with the independent re-implementation of the authors' rule
        ref = authors_vectors(model_dir, "llava", [(s.id, s.images, s.messages) for s in samples], args.layer, 0.9)
        if sorted(ref) != sorted(s.id for s in samples):
            raise SystemExit("the authors' rule produced no vector for some samples")
        d_auth = np.array([np.abs(ref[s.id] - a[i]).max() for i, s in enumerate(samples)])
        auth_max, auth_bad = float(d_auth.max()), int((d_auth > 1e-5).sum())
        for mode, f_ours, f_base in (("end-to-end", run_ours_e2e, run_base_e2e), ("forward", run_ours_fwd, run_base_fwd)):
            t_base = median_time(f_base, args.repeats)[0]
            t_ours = median_time(f_ours, args.repeats)[0]
            rows.append({"mode": mode, "model": f"llava-tiny L{layers} d{hidden}", "layer": args.layer, "n": n,
                         "batch_size": args.batch_size, "mean_tokens": round(seq, 1),
                         "baseline_samples_s": n / t_base, "ours_samples_s": n / t_ours, "speedup": t_base / t_ours,
                         "max_abs_diff": max_diff, "vs_authors_max_abs_diff": auth_max,
                         "vs_authors_differ_1e-5": auth_bad})
    print(f"{'mode':<11} {'model':<20} {'N':>4} {'tokens':>7} {'baseline/s':>11} {'ours/s':>9} {'speedup':>8}  floor")
    for r in rows:
        verdict = "" if r["mode"] != "end-to-end" else ("PASS" if r["speedup"] >= FLOOR else "FAIL")
        print(f"{r['mode']:<11} {r['model']:<20} {r['n']:>4} {r['mean_tokens']:>7} {r['baseline_samples_s']:>11.1f} "
              f"{r['ours_samples_s']:>9.1f} {r['speedup']:>7.2f}x  {'>= %.0fx ' % FLOOR + verdict if verdict else ''}")
    print(f"max |ours - baseline| over all vectors: {max_diff:.2e}")
    print(f"vs the authors' rule (tests/_authors_reference.py): max |diff| {auth_max:.2e}, "
          f"{auth_bad}/{n} vectors differ by > 1e-5")
    out_csv = Path(__file__).resolve().parent / "results" / "extract.csv"
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    meta = {"timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.node()} {platform.machine()} cpus={os.cpu_count()}", "device": "cpu",
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "load1": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else ""}
    # a changed column set (the vs_authors columns) starts a new file beside the old one
    append_csv(out_csv, [{**meta, **{k: (round(v, 4) if isinstance(v, float) and v >= 1e-3 else v)
                                     for k, v in r.items()}} for r in rows])
    print(f"appended {len(rows)} rows to {out_csv}")
    e2e = next(r for r in rows if r["mode"] == "end-to-end")
    return 0 if e2e["speedup"] >= FLOOR else 1


if __name__ == "__main__":
    raise SystemExit(main())
