"""Token-role assignment: the vectorised numpy path vs the per-token Python loops it replaced (issue 14).

Per sample, encoding assigns a role to every token (visual / answer / user / template) and expands
each image placeholder into its visual tokens. Until issue 14 this ran as Python loops over tokens
(an any() over the spans per token, a list append per expanded token); now it is numpy interval
search and ``np.repeat``. ``LEGACY`` below is that per-token code, kept here as the "before" so both
run in the same process on the same inputs (and must give the same roles).

Two measurements on the tiny LLaVA checkpoint's tokenizer and chat template:

* ``roles``: role assignment + image-token expansion alone, on pre-tokenised samples;
* ``encode``: the whole ``Encoder.encode`` (template rendering, tokenisation, roles, image
  preprocessing) with the legacy functions patched in vs the current ones.

Samples are multi-turn conversations with 576 visual tokens per image (the LLaVA-1.5 count).

    python benchmarks/bench_roles.py [--turns 8] [--n 64] [--repeats 5]

Prints a table, appends rows to ``benchmarks/results/roles.csv``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _suite import RESULTS, append_csv, machine, median_time, now_utc  # noqa: E402


# ----------------------------------------------------------------------------------------- legacy
def _legacy_overlaps(a, b, spans):
    return any(a < e and s < b for s, e in spans)


def legacy_token_roles(offsets, ids, rendered, image_token_id, roles="reference", visual_ids=(), answer_ids=None):
    """The per-token loop (``answer_ids``, the anchoring added with issue 11, is not applied)."""
    from scalselect_fast.extract import roles as R

    visual = {int(image_token_id), *map(int, visual_ids)}
    answer_spans = rendered.spans(roles)
    ids, offsets = list(map(int, ids)), [tuple(o) for o in np.asarray(offsets).tolist()]
    out = np.full(len(ids), R.TEMPLATE, dtype=np.int8)
    for t, ((a, b), tid) in enumerate(zip(offsets, ids)):
        if tid in visual:
            out[t] = R.VISUAL
        elif b > a and _legacy_overlaps(a, b, answer_spans):
            out[t] = R.ANSWER
        elif b > a and _legacy_overlaps(a, b, rendered.user_spans):
            out[t] = R.USER
    return out


def legacy_expand_image_tokens(ids, roles, image_token_id, counts, sample_id="?"):
    from scalselect_fast.extract import roles as R

    out_ids, out_roles, i = [], [], 0
    for t, r in zip(list(map(int, ids)), roles):
        if t == image_token_id:
            out_ids += [t] * int(counts[i])
            out_roles.append(np.full(int(counts[i]), R.VISUAL, np.int8))
            i += 1
        else:
            out_ids.append(t)
            out_roles.append(np.array([r], np.int8))
    return np.asarray(out_ids), np.concatenate(out_roles)


LEGACY = {"token_roles": legacy_token_roles, "expand_image_tokens": legacy_expand_image_tokens}


# ----------------------------------------------------------------------------------------- data
WORDS = ("the picture shows a red square next to two small circles on a plain blue background while a "
         "yellow chart in the corner says that sales increased in the second quarter of the year").split()


def _conversation(rs, turns: int):
    def text(n):
        return " ".join(rs.choice(WORDS, n))

    msgs = [{"role": "user", "content": "<image>\n" + text(40) + "?"}]
    msgs.append({"role": "assistant", "content": text(80) + "."})
    for _ in range(turns - 1):
        msgs += [{"role": "user", "content": text(30) + "?"}, {"role": "assistant", "content": text(80) + "."}]
    return msgs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=64, help="samples [64]")
    p.add_argument("--turns", type=int, default=8, help="question/answer turns per sample [8]")
    p.add_argument("--visual", type=int, default=576, help="visual tokens per image [576]")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    import torch
    from PIL import Image

    from scalselect_fast.extract import build_tiny_model, load_vlm
    from scalselect_fast.extract import model as M
    from scalselect_fast.extract import roles as R

    torch.set_num_threads(1)
    rs = np.random.RandomState(0)
    convs = [_conversation(rs, args.turns) for _ in range(args.n)]
    image = Image.fromarray((rs.rand(32, 32, 3) * 255).astype("uint8"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        vlm = load_vlm(build_tiny_model("llava", Path(tmp) / "llava", num_layers=1), device="cpu", max_length=1 << 20)
        enc = vlm.encoder
        # pre-tokenised inputs for the roles-only measurement
        pre = []
        for c in convs:
            chat = R.build_chat_messages(c, 1)
            rendered = R.render_conversation(chat, enc.render, enc.image_token)
            tok = enc.tokenizer(rendered.text, return_offsets_mapping=True)
            pre.append((np.asarray(tok["offset_mapping"]), np.asarray(tok["input_ids"]), rendered))
        n_tokens = float(np.mean([len(ids) - 1 + args.visual for _, ids, _ in pre]))

        def roles_with(impl):
            def run():
                out = []
                for off, ids, rendered in pre:
                    r = impl["token_roles"](off, ids, rendered, enc.image_token_id, "reference", vlm.visual_ids)
                    out.append(impl["expand_image_tokens"](ids, r, enc.image_token_id, [args.visual]))
                return out
            return run

        current = {"token_roles": R.token_roles, "expand_image_tokens": R.expand_image_tokens}
        a, b = roles_with(LEGACY)(), roles_with(current)()
        same = all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b))
        if not same:
            raise SystemExit("legacy and vectorised role assignment disagree")

        def encode_with(impl):
            def run():
                saved = {k: getattr(M.R, k) for k in impl}
                for k, f in impl.items():
                    setattr(M.R, k, f)
                try:
                    return [enc.encode(str(i), c, [image]) for i, c in enumerate(convs)]
                finally:
                    for k, f in saved.items():
                        setattr(M.R, k, f)
            return run

        # the tiny LLaVA has 16 visual tokens; the encode measurement expands to --visual like LLaVA-1.5
        enc._llava_tokens = args.visual
        for mode, fb, fa in (("roles", roles_with(LEGACY), roles_with(current)),
                             ("encode", encode_with(LEGACY), encode_with(current))):
            tb = median_time(fb, args.repeats, warmup=True)[0]
            ta = median_time(fa, args.repeats, warmup=True)[0]
            rows.append({"timestamp": now_utc(), **machine(), "mode": mode, "n": args.n, "turns": args.turns,
                         "mean_tokens": round(n_tokens, 1), "before_us_per_sample": 1e6 * tb / args.n,
                         "after_us_per_sample": 1e6 * ta / args.n, "speedup": tb / ta, "same_roles": same})
    print(f"{'mode':<7} {'N':>4} {'tokens':>7} {'before µs/sample':>17} {'after µs/sample':>16} {'speedup':>8}")
    for r in rows:
        print(f"{r['mode']:<7} {r['n']:>4} {r['mean_tokens']:>7} {r['before_us_per_sample']:>17.1f} "
              f"{r['after_us_per_sample']:>16.1f} {r['speedup']:>7.2f}x")
    print(f"same roles before/after: {same}")
    append_csv(RESULTS / "roles.csv", [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
                                       for r in rows])
    print(f"appended {len(rows)} rows to {RESULTS / 'roles.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
