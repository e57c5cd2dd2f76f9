"""Generate ``demo_reps.npy``: 2000×128 float16 synthetic representations for ``scalselect demo``.

Run ``python -m scalselect_fast.assets.make_demo_reps`` to regenerate (deterministic for the seed).
Structure, chosen to look like pooled VLM features: a shared offset (features are not centred),
a power-law spectrum of "topic" directions (σ_i ∝ i^-0.8), three dense clusters of near-duplicates
(60% of the rows) and 40 rare samples pushed along directions the bulk barely uses — the rows a
leverage-based selection should rank highly.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

N, D, SEED = 2000, 128, 20260211


def make(n: int = N, d: int = D, seed: int = SEED) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    sigma = np.arange(1, d + 1) ** -0.8
    X = (rng.standard_normal((n, d)) * sigma) @ basis.T
    dup = rng.choice(n, size=int(0.6 * n), replace=False)
    centres = rng.standard_normal((3, d)) * 0.6
    X[dup] = centres[rng.integers(0, 3, dup.size)] + 0.05 * X[dup]
    rare = rng.choice(np.setdiff1d(np.arange(n), dup), size=40, replace=False)
    X[rare] += 2.0 * rng.standard_normal((rare.size, 8)) @ basis[:, -8:].T
    X += rng.standard_normal(d) * 3.0
    return X.astype(np.float16)


if __name__ == "__main__":
    out = Path(__file__).with_name("demo_reps.npy")
    np.save(out, make())
    print(f"wrote {out}")
