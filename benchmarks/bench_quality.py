"""Selection quality of ScalSelect and every baseline on structured synthetic data.

The data has what real instruction-tuning pools have and a good selection should handle:

* planted clusters of very different sizes (Zipf-like), each with its own low-rank spread;
* rare modes: a few tiny clusters (0.25% of N each) off the main clusters' subspace;
* near-duplicates: 15% of the rows are copies of other rows plus tiny noise.

Metrics, per method and budget (5/16/30% of N):

``subspace``   ‖A_c V_S‖²_F / ‖A_c V_k‖²_F: V_k = top-k right singular vectors of the centred full
               matrix A_c (k = 90% energy), V_S = top-k principal directions of the selected rows
               only (centred on their own mean). 1.0 = the selection spans the dominant subspace.
``mean_dist``  mean distance from every row to its nearest selected row (faiss exact L2).
``max_dist``   the same, maximum (covering radius).
``dup_rate``   share of selected rows that are redundant copies: 1 - distinct duplicate groups /
               |S| (ground truth from the generator, not a threshold).
``rare_recall`` share of rare-mode rows selected; ``rare_hit``: rare modes with at least one row.

Nothing here is tuned for any method: the generator and metrics were fixed before the first run
and the numbers are printed as they come. Expectations from the issue (ScalSelect preserves the
dominant subspace at least as well as the baselines; it selects fewer near-duplicates than random)
are reported as MET / NOT MET; they are not floors.

    python benchmarks/bench_quality.py            # N = 10k, d = 128
    python benchmarks/bench_quality.py --n 40000  # facility location then needs ~6.4 GB

Writes benchmarks/results/quality.csv and benchmarks/plots/quality.png.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _suite import PLOTS, RESULTS, append_csv, load_average, machine, now_utc, versions  # noqa: E402

METHODS = ("scalselect", "random", "kcenter", "facility_location", "semdedup", "cluster_balanced")
BUDGETS = (0.05, 0.16, 0.30)
METRICS = ("subspace", "mean_dist", "max_dist", "dup_rate", "rare_recall", "rare_hit")


def structured(n: int, d: int, seed: int = 0, clusters: int = 20, rare_modes: int = 5,
               rare_frac: float = 0.0025, dup_frac: float = 0.15):
    """Return (X float32 (n, d), rare_mode (n,) int: -1 or mode id, dup_group (n,) int).

    ``dup_group[i]`` is the row a copy was made from (itself for originals), so rows sharing a
    group are near-duplicates of one another.
    """
    if d < 32:
        raise ValueError(f"d={d}: the generator needs d >= 32 (24-dim cluster subspace + room for rare modes)")
    rng = np.random.default_rng(seed)
    n_rare = rare_modes * max(1, int(round(rare_frac * n)))
    n_dup = int(round(dup_frac * n))
    n_main = n - n_rare - n_dup
    # main clusters live in a 24-dim subspace; sizes Zipf-like (1/rank)
    latent = np.linalg.qr(rng.standard_normal((d, 24)))[0].T.astype(np.float32)     # (24, d)
    w = 1.0 / np.arange(1, clusters + 1)
    sizes = np.floor(w / w.sum() * n_main).astype(int)
    sizes[0] += n_main - sizes.sum()
    parts = []
    for c, m in enumerate(sizes):
        center = 6.0 * rng.standard_normal(24)
        spread = rng.standard_normal((24, 4)) * rng.uniform(0.5, 2.0)              # own 4-dim spread
        z = center + rng.standard_normal((m, 4)) @ spread.T
        parts.append(z @ latent)
    main = np.concatenate(parts)
    # rare modes: tight clusters pointing out of the main subspace
    per = n_rare // rare_modes
    off = rng.standard_normal((rare_modes, d))
    off -= (off @ latent.T) @ latent
    off *= 8.0 / np.linalg.norm(off, axis=1, keepdims=True)
    rare = np.concatenate([o + 0.5 * rng.standard_normal((per, d)) for o in off])
    x = np.concatenate([main, rare]) + 0.3 * rng.standard_normal((n_main + n_rare, d))
    mode = np.concatenate([np.full(n_main, -1), np.repeat(np.arange(rare_modes), per)])
    # near-duplicates of random earlier rows (rare rows included, like re-posted samples)
    src = rng.integers(0, x.shape[0], n_dup)
    dups = x[src] + 1e-3 * rng.standard_normal((n_dup, d))
    x = np.concatenate([x, dups]).astype(np.float32)
    mode = np.concatenate([mode, mode[src]])
    group = np.concatenate([np.arange(n_main + n_rare), src])
    perm = rng.permutation(n)
    return x[perm], mode[perm], group[perm]


def top_subspace(a: np.ndarray, k: int) -> np.ndarray:
    """(d, k) top right singular vectors of the centred rows of ``a`` (float64 dense SVD)."""
    a = a.astype(np.float64)
    a = a - a.mean(0)
    return np.linalg.svd(a, full_matrices=False)[2][:k].T


def energy_k(x: np.ndarray, energy: float = 0.9) -> tuple[int, np.ndarray]:
    a = x.astype(np.float64) - x.mean(0, dtype=np.float64)
    _, s, vt = np.linalg.svd(a, full_matrices=False)
    c = np.cumsum(s**2) / np.sum(s**2)
    k = int(np.searchsorted(c, energy) + 1)
    return k, vt[:k].T


def metrics(x, mode, group, sel, k, vk, ac_norm):
    import faiss

    sel = np.asarray(sel)
    ac = x.astype(np.float64) - x.mean(0, dtype=np.float64)
    vs = top_subspace(x[sel], k) if sel.size > 1 else np.zeros((x.shape[1], k))
    sub = float(np.linalg.norm(ac @ vs) ** 2 / ac_norm)
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(np.ascontiguousarray(x[sel]))
    d2, _ = index.search(np.ascontiguousarray(x), 1)
    dist = np.sqrt(np.maximum(d2[:, 0], 0))
    rare = mode >= 0
    n_modes = int(mode.max()) + 1
    return {"subspace": sub, "mean_dist": float(dist.mean()), "max_dist": float(dist.max()),
            "dup_rate": 1.0 - np.unique(group[sel]).size / sel.size,
            "rare_recall": float(np.isin(np.nonzero(rare)[0], sel).mean()),
            "rare_hit": len(set(mode[sel][mode[sel] >= 0].tolist())) / n_modes}


def run(method, x, budget, seed):
    if method == "scalselect":
        import scalselect_fast as ss

        sub = ss.fit_subspace(x, seed=seed)
        return ss.top_k(ss.leverage_scores(x, sub), budget), f"k={sub.k} {sub.solver}"
    from scalselect_fast import baselines

    return baselines.select(method, x, budget, seed=seed), ""


def plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"subspace": "subspace preservation (↑)", "mean_dist": "mean dist to nearest selected (↓)",
              "max_dist": "max dist to nearest selected (↓)", "dup_rate": "duplicate rate in selection (↓)",
              "rare_recall": "rare-mode recall (↑)", "rare_hit": "rare modes hit (↑)"}
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    for ax, metric in zip(axes.ravel(), METRICS):
        for method in METHODS:
            pts = sorted((r["budget_fraction"], r[metric]) for r in rows if r["method"] == method)
            if pts:
                ax.plot(*zip(*pts), marker="o", lw=2.2 if method == "scalselect" else 1.2, label=method)
        ax.set_title(labels[metric], fontsize=9)
        ax.set_xlabel("budget (fraction of N)")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--full", action="store_true", help="N = 40k (facility location needs ~6.4 GB)")
    args = ap.parse_args(argv)
    if args.full and args.n == 10_000:
        args.n = 40_000
    methods = [m for m in args.methods.split(",") if m]
    run_id, mach, vers = now_utc(), machine(), versions()
    x, mode, group = structured(args.n, args.d, args.seed)
    k, vk = energy_k(x)
    ac = x.astype(np.float64) - x.mean(0, dtype=np.float64)
    ac_norm = float(np.linalg.norm(ac @ vk) ** 2)
    print(f"bench_quality  run {run_id}  N={args.n} d={args.d}  k(90% energy)={k}  "
          f"rare rows={int((mode >= 0).sum())} in {int(mode.max()) + 1} modes  "
          f"duplicate rows={args.n - np.unique(group).size}  load {load_average()}")
    rows = []
    hdr = f"{'method':18s} {'budget':>6s} " + " ".join(f"{m:>11s}" for m in METRICS) + f" {'time_s':>8s}  note"
    print(hdr)
    for budget in BUDGETS:
        for method in methods:
            t = time.perf_counter()
            sel, note = run(method, x, budget, args.seed)
            dt = time.perf_counter() - t
            m = metrics(x, mode, group, sel, k, vk, ac_norm)
            rows.append({"run_id": run_id, "timestamp": run_id, "host": mach["host"], "cpu": mach["cpu"],
                         "python": vers["python"], "numpy": vers["numpy"], "faiss": vers["faiss"],
                         "n": args.n, "d": args.d, "k": k, "seed": args.seed, "method": method,
                         "budget_fraction": budget, "selected": int(len(sel)),
                         **{key: round(v, 5) for key, v in m.items()}, "seconds": round(dt, 3), "note": note})
            print(f"{method:18s} {budget:6.0%} " + " ".join(f"{m[key]:11.4f}" for key in METRICS)
                  + f" {dt:8.2f}  {note}", flush=True)
        print()
    append_csv(RESULTS / "quality.csv", rows)
    plot(rows, PLOTS / "quality.png", f"selection quality, N={args.n}, d={args.d}, k={k} ({run_id})")
    print(f"wrote {RESULTS / 'quality.csv'}, {PLOTS / 'quality.png'}")
    for line in expectations(rows):
        print(line)
    return 0


def expectations(rows) -> list[str]:
    """The issue's expectations, checked on the numbers (reported, not enforced)."""
    out = []
    for budget in sorted({r["budget_fraction"] for r in rows}):
        at = {r["method"]: r for r in rows if r["budget_fraction"] == budget}
        if "scalselect" not in at:
            continue
        ss_ = at["scalselect"]
        others = {m: r for m, r in at.items() if m != "scalselect"}
        if others:
            best = max(others, key=lambda m: others[m]["subspace"])
            met = ss_["subspace"] >= others[best]["subspace"] - 1e-9
            out.append(f"{'MET' if met else 'NOT MET'}: budget {budget:.0%}: ScalSelect subspace preservation "
                       f"{ss_['subspace']:.4f} vs best baseline {best} {others[best]['subspace']:.4f}")
        if "random" in at:
            met = ss_["dup_rate"] < at["random"]["dup_rate"]
            out.append(f"{'MET' if met else 'NOT MET'}: budget {budget:.0%}: ScalSelect duplicate rate "
                       f"{ss_['dup_rate']:.4f} vs random {at['random']['dup_rate']:.4f}")
    return out


if __name__ == "__main__":
    sys.exit(main())
