"""Fidelity to the authors' extraction per family on the demo samples (issue 11's floor).

For each family, our vectors (fp32, CPU, defaults, batch 8) are compared with the independent
re-implementation of the authors' rule in ``tests/_authors_reference.py`` (eager full model,
batch 1): the number of vectors differing by more than 1e-5, the largest difference, and whether the
authors' scoring (``cur.py``: center, standardise, L2-normalise, SVD, 90% energy, leverage) picks the
same top 16% from both. Floor: at most 1% of vectors differ per family and the selections are equal.
The deviation options (``--roles label-mask``, ``--vision-tokens pad-only``) are measured too, to
show what the defaults fixed.

Families: the tiny random-weight LLaVA-1.5, Qwen2-VL, Qwen2.5-VL, Qwen3-VL models, the generic path
(the LLaVA checkpoint through AutoProcessor), and with ``--real`` the LLaVA / Qwen2-VL models with
the real tokenizers (``tests/_real_tokenizers.py``; downloads the llama-cpp-python sdist once).

    python benchmarks/bench_fidelity.py [--n 240] [--real] [--deviations]

Prints a table, appends rows to ``benchmarks/results/fidelity.csv``.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _authors_reference import authors_vectors, read_llava_json  # noqa: E402
from _suite import RESULTS, append_csv, machine, now_utc  # noqa: E402

FLOOR = 0.01
ATOL = 1e-5


def authors_top(x: np.ndarray, fraction: float = 0.16, energy: float = 0.9) -> set[int]:
    """The authors' scoring (cur.py) on the rows of ``x``: indices of the top ``fraction``."""
    x = x - x.mean(0, keepdims=True)
    sd = x.std(0, keepdims=True)
    sd[sd == 0] = 1
    x = x / sd
    nrm = np.linalg.norm(x, axis=1, keepdims=True)
    nrm[nrm == 0] = 1
    u, s, _ = np.linalg.svd(x / nrm, full_matrices=False)
    cum = np.cumsum(s ** 2) / np.sum(s ** 2)
    k = max(1, min(int(np.searchsorted(cum, energy)) + 1, len(s)))
    lev = np.sum(u[:, :k] ** 2, axis=1)
    return set(np.argsort(lev)[::-1][: int(fraction * len(lev))].tolist())


@contextlib.contextmanager
def _generic(on: bool):
    """Route the LLaVA checkpoint through the generic (AutoProcessor) path."""
    from scalselect_fast.extract import model as M

    saved = M.KNOWN_FAMILIES.pop("llava") if on else None
    try:
        yield
    finally:
        if on:
            M.KNOWN_FAMILIES["llava"] = saved


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=240, help="demo records (240 = all)")
    p.add_argument("--real", action="store_true", help="also the real LLaVA-1.5 / Qwen2-VL tokenizers")
    p.add_argument("--deviations", action="store_true", help="also --roles label-mask / --vision-tokens pad-only")
    args = p.parse_args(argv)

    import torch

    from scalselect_fast.data import read_dataset
    from scalselect_fast.data.demo import DEMO_DATA, DEMO_DIR
    from scalselect_fast.extract import build_tiny_model, extract_representations, load_vlm

    torch.set_num_threads(1)
    records = read_llava_json(DEMO_DIR / DEMO_DATA, limit=args.n)
    samples = list(read_dataset(DEMO_DIR / DEMO_DATA, image_root=DEMO_DIR))[: args.n]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases = [(f, build_tiny_model(f, tmp / f, num_layers=2), f, {}) for f in
                 ("llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")]
        cases.append(("generic", cases[0][1], "llava", {}))
        if args.real:
            from _real_tokenizers import tiny_model_with_real_tokenizer

            cases += [(f"{f} (real tokenizer)", tiny_model_with_real_tokenizer(f, tmp / f"real-{f}"), f, {})
                      for f in ("llava", "qwen2_vl")]
        if args.deviations:
            cases += [("llava roles=label-mask", cases[0][1], "llava", {"roles": "label-mask"}),
                      ("qwen2_vl roles=label-mask", cases[1][1], "qwen2_vl", {"roles": "label-mask"}),
                      ("qwen2_vl vision_tokens=pad-only", cases[1][1], "qwen2_vl", {"vision_tokens": "pad-only"})]
        refs: dict = {}
        for name, path, family, opts in cases:
            key = str(path)
            if key not in refs:
                refs[key] = authors_vectors(path, family, records)
            ref = refs[key]
            pixels = "processor" if family.startswith("qwen") else None
            with _generic(name == "generic"):
                vlm = load_vlm(path, layer=0, dtype="fp32", device="cpu", pixels=pixels, **opts)
                got = {}
                for ids, vecs in extract_representations(vlm, samples, batch_size=8, pool_impl="torch"):
                    got.update(zip(ids, vecs.astype(np.float64)))
            keys = sorted(set(ref) & set(got))
            a, b = np.stack([ref[k] for k in keys]), np.stack([got[k] for k in keys])
            diff = np.abs(a - b).max(1)
            cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
            n_bad = int((diff > ATOL).sum())
            default = not opts
            rows.append({"timestamp": now_utc(), **machine(), "case": name, "samples": len(keys),
                         "only_ours": len(set(got) - set(ref)), "only_authors": len(set(ref) - set(got)),
                         "differ_1e-5": n_bad, "max_abs_diff": float(diff.max()), "min_cosine": float(cos.min()),
                         "top16_equal": authors_top(a) == authors_top(b),
                         "floor": ("PASS" if n_bad <= FLOOR * len(keys) and authors_top(a) == authors_top(b)
                                   and len(set(ref) ^ set(got)) == 0 else "FAIL") if default else "(deviation)"})
    print(f"{'case':<32} {'N':>4} {'differ>1e-5':>12} {'max |diff|':>11} {'min cos':>9} {'top-16% equal':>14}  floor")
    for r in rows:
        print(f"{r['case']:<32} {r['samples']:>4} {r['differ_1e-5']:>12} {r['max_abs_diff']:>11.2e} "
              f"{r['min_cosine']:>9.6f} {str(r['top16_equal']):>14}  {r['floor']}")
    append_csv(RESULTS / "fidelity.csv", rows)
    print(f"appended {len(rows)} rows to {RESULTS / 'fidelity.csv'}")
    return 0 if all(r["floor"] != "FAIL" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
