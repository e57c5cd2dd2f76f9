"""Wall time and peak memory vs N for ScalSelect (fit + score + top-k) and every baseline.

Each (method, N) runs in a fresh child process on the same synthetic clustered low-rank float32
matrix (d fixed, budget a fixed fraction of N), so peak RSS is per run and a run that exceeds the
time cap is killed (SIGALRM) without taking the benchmark down. N grows by sqrt(2) from 10k;
a method stops at its first timeout/refusal, or when its last two points predict the next run
would exceed the cap. The log-log slope of time vs N is fitted per method (ScalSelect over
N >= --fit-min-n so fixed per-call overheads do not flatter or hurt it).

Floors (issue 5): ScalSelect slope <= 1.1 and facility location slope >= 1.8 in the same run;
the script prints PASS/FAIL and exits non-zero if either fails.

    python benchmarks/bench_scaling.py                 # quick: cap 30 s per run, N <= 800k
    python benchmarks/bench_scaling.py --full          # cap 300 s per run (the issue's 5 min), N <= 3.2M

Writes benchmarks/results/scaling.csv (one row per run), benchmarks/results/scaling_slopes.csv
and benchmarks/plots/scaling.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _suite import PLOTS, RESULTS, ROOT, append_csv, embeddings, load_average, machine, now_utc, versions  # noqa: E402

METHODS = ("scalselect", "random", "kcenter", "facility_location", "semdedup", "cluster_balanced")
SCALSELECT_FLOOR = 1.1
FACILITY_FLOOR = 1.8
#: facility location's dense N×N matrix is capped here: the machine is shared
FL_MAX_BYTES = 4 * 2**30


def size_grid(n_min: int, n_max: int, factor: float) -> list[int]:
    out, i = [], 0
    while True:
        n = int(round(n_min * factor ** i))
        if n > n_max:
            return out
        out.append(n)
        i += 1


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark (VmHWM) so the peak covers only the method's run."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    hwm = _status_kb("VmHWM")
    return hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------------------------------
# child: one (method, N) measurement, printed as one JSON line
# ------------------------------------------------------------------------------------------------
def run_method(method: str, x, budget: float, seed: int):
    if method == "scalselect":
        import scalselect_fast as ss

        sub = ss.fit_subspace(x, seed=seed)
        idx = ss.top_k(ss.leverage_scores(x, sub), budget)
        return idx, {"k": int(sub.k), "solver": sub.solver}
    from scalselect_fast import baselines

    opts = {"max_bytes": FL_MAX_BYTES} if method == "facility_location" else {}
    return baselines.select(method, x, budget, seed=seed, **opts), {}


def warm_imports(method: str) -> None:
    """Import what the method needs before the peak is reset, so library code is not counted."""
    import scalselect_fast as ss
    from scalselect_fast import baselines

    if method == "scalselect":
        ss.fit_subspace, ss.leverage_scores, ss.top_k  # noqa: B018 - resolves the lazy imports
    else:
        baselines.get(method)
        if method in ("semdedup", "cluster_balanced", "facility_location"):
            import faiss  # noqa: F401


def child(args) -> int:
    import gc

    x = embeddings(args.n, args.d, seed=args.seed)
    warm_imports(args.method)
    gc.collect()
    reset_peak_rss()
    before = rss_bytes()
    signal.alarm(max(1, int(math.ceil(args.cap))))  # SIGALRM's default action ends the process
    times, info = [], {}
    try:
        while True:
            t = time.perf_counter()
            idx, info = run_method(args.method, x, args.budget, args.seed)
            times.append(time.perf_counter() - t)
            # repeated (median of up to --repeats) because the machine is shared, as long as the
            # repeats stay well inside the cap
            if len(times) >= args.repeats or sum(times) + times[-1] > args.cap / 2:
                break
    except MemoryError as exc:  # facility location's refusal (TooLargeError is a MemoryError)
        print(json.dumps({"status": "refused", "note": str(exc).split(". Pass")[0]}))
        return 0
    signal.alarm(0)
    peak = peak_rss_bytes()
    print(json.dumps({"status": "ok", "seconds": statistics.median(times), "repeats": len(times),
                      "peak_rss_mb": peak / 2**20, "extra_rss_mb": max(0, peak - before) / 2**20,
                      "selected": int(len(idx)), **info}))
    return 0


# ------------------------------------------------------------------------------------------------
# parent
# ------------------------------------------------------------------------------------------------
def cap_for(method: str, args) -> float:
    """The method under test gets at least --scalselect-cap: the cap exists to stop quadratic
    methods, and a ScalSelect point lost to a busy machine would only shorten its slope fit."""
    return max(args.cap, args.scalselect_cap) if method == "scalselect" else args.cap


def measure(method: str, n: int, args) -> dict:
    cap = cap_for(method, args)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--n", str(n), "--d", str(args.d),
           "--budget", str(args.budget), "--seed", str(args.seed), "--cap", str(cap),
           "--repeats", str(args.repeats)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=cap + 600)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "note": "no answer from the child"}
    if p.returncode == -signal.SIGALRM:
        return {"status": "timeout", "note": f"> {cap:g} s cap"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr.strip().splitlines() or ["?"])[-1]
        return {"status": "error", "note": f"rc={p.returncode}: {tail[:200]}"}
    return json.loads(lines[-1])


def loglog_slope(points: list[tuple[int, float]]) -> float:
    if len(points) < 2:
        return float("nan")
    xs = [math.log(n) for n, _ in points]
    ys = [math.log(t) for _, t in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((a - mx) ** 2 for a in xs)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sxx if sxx > 0 else float("nan")


def plot(results: dict, slopes: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for method, pts in results.items():
        ok = [(n, r["seconds"]) for n, r in pts if r["status"] == "ok"]
        if not ok:
            continue
        s = slopes.get(method, float("nan"))
        ax.loglog(*zip(*ok), marker="o", lw=2 if method == "scalselect" else 1.2,
                  label=f"{method} (slope {s:.2f})" if not math.isnan(s) else method)
    ax.set_xlabel("N (rows)")
    ax.set_ylabel("wall time (s)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="cap 300 s per run, N up to 3.2M")
    ap.add_argument("--cap", type=float, default=None, help="seconds per (method, N) run (default 30; --full 300)")
    ap.add_argument("--scalselect-cap", type=float, default=120.0, help="cap for ScalSelect runs (at least --cap)")
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--budget", type=float, default=0.16, help="fraction of N selected")
    ap.add_argument("--n-min", type=int, default=10_000)
    ap.add_argument("--n-max", type=int, default=None, help="largest N (default 800k; --full 3.2M)")
    ap.add_argument("--fit-min-n", type=int, default=100_000, help="ScalSelect slope uses N >= this")
    ap.add_argument("--repeats", type=int, default=3, help="median of up to this many runs (fewer when long)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.cap is None:
        args.cap = 300.0 if args.full else 30.0
    if args.child:
        args.method = args.child
        return child(args)
    n_max = args.n_max or (3_200_000 if args.full else 800_000)
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    run_id, mach, vers = now_utc(), machine(), versions()
    print(f"bench_scaling  run {run_id}  d={args.d} budget={args.budget:g}·N  cap {args.cap:g} s/run  "
          f"load {load_average()}")
    print(f"machine: {mach['cpu']}, {mach['cores']} cores, {mach['memory_gib']} GiB; native={vers.get('native_backend')}")
    results: dict[str, list] = {}
    rows = []
    for method in methods:
        # ScalSelect doubles (its runs are cheap and many); the quadratic baselines step by sqrt(2)
        grid = size_grid(args.n_min, n_max, 2.0 if method == "scalselect" else math.sqrt(2))
        pts = results.setdefault(method, [])
        for n in grid:
            ok = [(nn, r["seconds"]) for nn, r in pts if r["status"] == "ok"]
            if len(ok) >= 2:
                s = max(1.0, loglog_slope(ok[-2:]))
                pred = ok[-1][1] * (n / ok[-1][0]) ** s
                if pred > cap_for(method, args):
                    r = {"status": "skipped", "note": f"predicted {pred:.0f} s > cap"}
                    pts.append((n, r))
                    rows.append((method, n, r))
                    print(f"  {method:18s} N={n:>9,d}  skipped: predicted {pred:.0f} s > {cap_for(method, args):g} s cap")
                    break
            r = measure(method, n, args)
            pts.append((n, r))
            rows.append((method, n, r))
            if r["status"] == "ok":
                extra = f"  k={r['k']} {r['solver']}" if "k" in r else ""
                print(f"  {method:18s} N={n:>9,d}  {r['seconds']:9.3f} s  peak {r['peak_rss_mb']:7.0f} MB "
                      f"(+{r['extra_rss_mb']:.0f} MB over the data){extra}", flush=True)
            else:
                print(f"  {method:18s} N={n:>9,d}  {r['status']}: {r.get('note', '')}", flush=True)
                break
    slopes, slope_rows = {}, []
    for method, pts in results.items():
        ok = [(n, r["seconds"]) for n, r in pts if r["status"] == "ok"
              and (method != "scalselect" or n >= args.fit_min_n)]
        slopes[method] = loglog_slope(ok)
        floor, verdict = "", ""
        if method == "scalselect":
            floor, verdict = f"<= {SCALSELECT_FLOOR}", "PASS" if slopes[method] <= SCALSELECT_FLOOR else "FAIL"
        elif method == "facility_location":
            floor, verdict = f">= {FACILITY_FLOOR}", "PASS" if slopes[method] >= FACILITY_FLOOR else "FAIL"
        slope_rows.append({"run_id": run_id, "method": method, "slope": round(slopes[method], 4),
                           "points": len(ok), "n_min": min((n for n, _ in ok), default=""),
                           "n_max": max((n for n, _ in ok), default=""), "floor": floor, "verdict": verdict})

    print(f"\n{'method':18s} {'slope':>6s} {'points':>6s} {'N range':>21s}  {'largest N time':>14s}  floor")
    for sr in slope_rows:
        pts = [(n, r) for n, r in results[sr["method"]] if r["status"] == "ok"]
        last = f"{pts[-1][1]['seconds']:.2f} s" if pts else "-"
        rng = f"{sr['n_min']:,}-{sr['n_max']:,}" if sr["points"] else "-"
        print(f"{sr['method']:18s} {sr['slope']:6.2f} {sr['points']:6d} {rng:>21s}  {last:>14s}  "
              f"{sr['floor']} {sr['verdict']}")

    common = {"run_id": run_id, "timestamp": run_id, "host": mach["host"], "cpu": mach["cpu"],
              "cores": mach["cores"], "python": vers["python"], "numpy": vers["numpy"], "faiss": vers["faiss"],
              "native_backend": vers.get("native_backend"), "load_avg": load_average(), "d": args.d,
              "budget_fraction": args.budget, "cap_s": args.cap}
    append_csv(RESULTS / "scaling.csv", [
        {**common, "method": m, "n": n, "status": r["status"], "seconds": r.get("seconds", ""),
         "repeats": r.get("repeats", ""), "peak_rss_mb": round(r["peak_rss_mb"], 1) if "peak_rss_mb" in r else "",
         "extra_rss_mb": round(r["extra_rss_mb"], 1) if "extra_rss_mb" in r else "",
         "k": r.get("k", ""), "note": r.get("note", "")} for m, n, r in rows])
    append_csv(RESULTS / "scaling_slopes.csv", [{**common, **sr} for sr in slope_rows])
    plot(results, slopes, PLOTS / "scaling.png",
         f"time vs N, d={args.d}, budget {args.budget:.0%}, cap {args.cap:g} s/run ({mach['cpu']}, {run_id})")
    print(f"\nwrote {RESULTS / 'scaling.csv'}, {RESULTS / 'scaling_slopes.csv'}, {PLOTS / 'scaling.png'}")
    failed = [sr for sr in slope_rows if sr["verdict"] == "FAIL"]
    for sr in slope_rows:
        if sr["verdict"]:
            print(f"{sr['verdict']}: {sr['method']} slope {sr['slope']:.2f} (floor {sr['floor']})")
    missing = [m for m in ("scalselect", "facility_location") if m not in results]
    if missing:
        print(f"note: {', '.join(missing)} not run, so its floor was not checked")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
