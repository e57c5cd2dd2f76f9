"""Run the benchmark suite and regenerate BENCHMARKS.md from what it measured.

    python -m benchmarks                 # every bench at its default size (bench_core: its floors)
    python -m benchmarks --quick         # smoke sizes where a bench offers --quick
    python -m benchmarks --full          # --full where a bench offers it (5-minute scaling caps, ...)
    python -m benchmarks --only scaling,quality
    python -m benchmarks --only scaling --bench-args='--cap 60'
    python -m benchmarks --report-only   # rebuild BENCHMARKS.md from benchmarks/results/ as it is

Each ``benchmarks/bench_<topic>.py`` runs in its own process (bench_core, bench_extract,
bench_scaling, bench_quality, in that order, those present; ``--all`` adds any other bench_*.py).
Its output goes to ``benchmarks/results/<topic>.log``; its CSV rows to ``benchmarks/results/``.
BENCHMARKS.md is written from those files only: no number in it is typed by hand. The exit status
is non-zero when a bench failed (a floor FAIL or an error).
"""
from __future__ import annotations

import argparse
import csv
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _suite import PLOTS, RESULTS, ROOT, load_average, machine, now_utc, versions  # noqa: E402

ORDER = ("core", "extract", "scaling", "quality")
#: columns repeated on every row that the report header already states
COMMON_COLS = {"run_id", "timestamp", "host", "cpu", "cores", "python", "numpy", "faiss", "machine",
               "native_backend"}
VERDICT = re.compile(r"\b(PASS|FAIL|MET|NOT MET)\b")


def discover(include_all: bool) -> list[str]:
    here = ROOT / "benchmarks"
    present = {p.stem[len("bench_"):] for p in here.glob("bench_*.py")}
    topics = [t for t in ORDER if t in present]
    if include_all:
        topics += sorted(present - set(ORDER))
    return topics


def flags_of(script: Path) -> str:
    try:
        return subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                              cwd=ROOT, timeout=120).stdout
    except subprocess.TimeoutExpired:
        return ""


def csv_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def latest(rows: list[dict]) -> list[dict]:
    """Rows of the last run: same run_id (or, for CSVs without one, same timestamp) as the last row."""
    if not rows:
        return []
    key = "run_id" if "run_id" in rows[-1] else "timestamp" if "timestamp" in rows[-1] else None
    if key is None:
        return rows[-30:]
    return [r for r in rows if r.get(key) == rows[-1][key]]


def md_table(rows: list[dict], drop=COMMON_COLS, limit: int = 80) -> str:
    if not rows:
        return "_no rows_\n"
    cols = [c for c in rows[0] if c not in drop]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows[:limit]:
        out.append("| " + " | ".join(str(r.get(c, "")).replace("|", "\\|").replace("\n", " ") for c in cols) + " |")
    if len(rows) > limit:
        out.append(f"\n_{len(rows) - limit} more rows in the CSV_")
    return "\n".join(out) + "\n"


def run_bench(topic: str, mode: str, timeout: float, extra: list[str] = ()) -> dict:
    script = ROOT / "benchmarks" / f"bench_{topic}.py"
    help_text = flags_of(script)
    args = ([f"--{mode}"] if mode and f"--{mode}" in help_text else []) + list(extra)
    before = {p.name: len(csv_rows(p)) for p in RESULTS.glob("*.csv")}
    cmd = [sys.executable, str(script), *args]
    print(f"== {' '.join(['python', f'benchmarks/bench_{topic}.py', *args])}", flush=True)
    t = time.perf_counter()
    log = RESULTS / f"{topic}.log"
    RESULTS.mkdir(parents=True, exist_ok=True)
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        rc, out = p.returncode, p.stdout + (f"\n[stderr]\n{p.stderr}" if p.stderr.strip() else "")
    except subprocess.TimeoutExpired as exc:
        rc, out = 124, f"{exc.stdout or ''}\n[timed out after {timeout:g} s]"
        out = out if isinstance(out, str) else out.decode(errors="replace")
    wall = time.perf_counter() - t
    log.write_text(out)
    print(out[-3000:] if len(out) > 3000 else out, flush=True)
    new_rows = {}
    for p in RESULTS.glob("*.csv"):
        rows = csv_rows(p)
        if len(rows) > before.get(p.name, 0):
            new_rows[p.name] = rows[before.get(p.name, 0):]
    verdicts = [ln.strip() for ln in out.splitlines() if VERDICT.match(ln.strip())
                or ln.strip().startswith(("all floors", "FAIL:"))]
    verdicts += csv_verdicts(new_rows)
    return {"topic": topic, "cmd": " ".join(["python", f"benchmarks/bench_{topic}.py", *args]), "rc": rc,
            "wall_s": wall, "verdicts": verdicts, "new_rows": new_rows, "log": log}


def csv_verdicts(new_rows: dict) -> list[str]:
    """``"core.csv: 6 PASS, 1 FAIL (x)"`` from the status/verdict column of the rows a bench wrote,
    so a floor that a bench only prints inside a table row still reaches the report."""
    out = []
    for name, rows in new_rows.items():
        passed, failed = 0, []
        for r in rows:
            v = (r.get("status") or r.get("verdict") or "").strip()
            if v == "PASS":
                passed += 1
            elif v == "FAIL":
                failed.append(r.get("metric") or r.get("variant") or r.get("op") or "?")
        if passed or failed:
            out.append(f"{name}: {passed} PASS, {len(failed)} FAIL" + (f" ({', '.join(failed)})" if failed else ""))
    return out


def scaling_section() -> list[str]:
    slopes = latest(csv_rows(RESULTS / "scaling_slopes.csv"))
    points = latest(csv_rows(RESULTS / "scaling.csv"))
    if not slopes:
        return []
    out = ["### Scaling (time vs N, log-log slope per method)\n",
           f"Run {slopes[0]['run_id']}: d={slopes[0].get('d')}, budget {float(slopes[0].get('budget_fraction', 0)):.0%} "
           f"of N, cap {slopes[0].get('cap_s')} s per run, load average at the end {slopes[0].get('load_avg')}.\n",
           "| method | slope | points | N range | floor | verdict | time at largest N | peak RSS over data at largest N |",
           "|---|---|---|---|---|---|---|---|"]
    for s in slopes:
        ok = [p for p in points if p["method"] == s["method"] and p["status"] == "ok"]
        last = ok[-1] if ok else {}
        stop = [p for p in points if p["method"] == s["method"] and p["status"] != "ok"]
        why = f" (stopped at N={int(stop[0]['n']):,}: {stop[0]['status']} {stop[0]['note']})" if stop else ""
        rng = f"{int(s['n_min']):,}–{int(s['n_max']):,}" if s["n_min"] else "–"
        out.append(f"| {s['method']} | {float(s['slope']):.3f} | {s['points']} | {rng} | {s['floor']} | "
                   f"{s['verdict']} | {float(last['seconds']):.3f} s{why} | "
                   f"{last.get('extra_rss_mb', '')} MB |" if last else
                   f"| {s['method']} | – | 0 | – | {s['floor']} | {s['verdict']} | –{why} | – |")
    out.append("\n![scaling](benchmarks/plots/scaling.png)\n")
    out.append("<details><summary>every run</summary>\n\n" + md_table(points, COMMON_COLS | {
        "load_avg", "d", "budget_fraction", "cap_s"}) + "\n</details>\n")
    return out


def quality_section() -> list[str]:
    rows = latest(csv_rows(RESULTS / "quality.csv"))
    if not rows:
        return []
    r0 = rows[0]
    out = ["### Selection quality (structured synthetic data)\n",
           f"Run {r0['run_id']}: N={r0['n']}, d={r0['d']}, k={r0['k']} (90% energy of the full data), "
           f"seed {r0['seed']}. Data and metrics: see the docstring of `benchmarks/bench_quality.py`.\n",
           "| budget | method | subspace ↑ | mean dist ↓ | max dist ↓ | dup rate ↓ | rare recall ↑ | "
           "rare modes hit ↑ | time (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {float(r['budget_fraction']):.0%} | {r['method']} | {float(r['subspace']):.4f} | "
                   f"{float(r['mean_dist']):.3f} | {float(r['max_dist']):.3f} | {float(r['dup_rate']):.4f} | "
                   f"{float(r['rare_recall']):.4f} | {float(r['rare_hit']):.2f} | {r['seconds']} |")
    try:
        from bench_quality import expectations

        conv = [{**r, **{k: float(r[k]) for k in ("budget_fraction", "subspace", "dup_rate")}} for r in rows]
        out.append("\nThe issue's expectations, checked on these numbers (reported, not enforced):\n")
        out += [f"- {line}" for line in expectations(conv)]
    except Exception as exc:  # noqa: BLE001 - the table above stands without this summary
        out.append(f"\n(expectation summary unavailable: {exc})")
    out.append("\n![quality](benchmarks/plots/quality.png)\n")
    return out


def write_report(runs: list[dict], started: str, load_start: str) -> Path:
    mach, vers = machine(), versions()
    lines = ["# Benchmarks", "",
             f"_Generated by `python -m benchmarks` on {now_utc()} (started {started}); "
             f"every number below comes from `benchmarks/results/`. Do not edit by hand._", "",
             "## Machine and versions", "",
             f"- machine: {mach['cpu']}, {mach['cores']} cores, {mach['memory_gib']} GiB RAM, {mach['os']} "
             f"(host `{mach['host']}`)",
             f"- load average at start: {load_start}; at end: {load_average()} (the machine is shared: "
             f"absolute times are noisy, ratios measured in one run are the meaningful numbers)",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()), ""]
    if runs:
        lines += ["## Runs", "", "| bench | command | exit | wall (s) | verdicts |", "|---|---|---|---|---|"]
        for r in runs:
            v = "<br>".join(r["verdicts"][:12]) or "–"
            lines.append(f"| {r['topic']} | `{r['cmd']}` | {r['rc']} | {r['wall_s']:.0f} | {v} |")
        lines.append("")
    lines += ["## Results", ""]
    ran = {r["topic"]: r for r in runs}
    for topic in discover(include_all=True):
        if topic == "scaling":
            sec = scaling_section()
        elif topic == "quality":
            sec = quality_section()
        else:
            sec = []
            r = ran.get(topic)
            files = r["new_rows"] if r else {}
            if not files:  # not run now: the latest run found in its CSV, if any
                p = RESULTS / f"{topic}.csv"
                files = {p.name: latest(csv_rows(p))} if p.exists() else {}
            for name, rows in files.items():
                stamp = rows[0].get("timestamp", rows[0].get("run_id", "")) if rows else ""
                sec += [f"### {topic}: `benchmarks/results/{name}` ({stamp})", "", md_table(rows)]
        if sec:
            lines += sec
        elif topic in ran:
            lines += [f"### {topic}", "", f"no CSV rows; see `benchmarks/results/{topic}.log`", ""]
    for md in sorted(RESULTS.glob("gpu_check*/gpu_check.md")):  # GPU runs come back from a GPU node
        rel = md.relative_to(ROOT)
        body = md.read_text(encoding="utf-8").strip().splitlines()
        lines += [f"### GPU check: `{rel}`", "", "_Copied from the GPU node's `gpu_check.sh` output; "
                  "the full logs sit beside it._", ""] + [
            "#### " + ln[3:] if ln.startswith("## ") else ln.replace("# GPU check", "GPU check", 1) for ln in body] + [""]
    plots = sorted(p.name for p in PLOTS.glob("*.png")) if PLOTS.exists() else []
    other = [p for p in plots if p not in ("scaling.png", "quality.png")]
    if other:
        lines += ["### Other plots", ""] + [f"![{p}](benchmarks/plots/{p})" for p in other] + [""]
    path = ROOT / "BENCHMARKS.md"
    from scalselect_fast.atomic import atomic_write_bytes

    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="pass --quick to benches that take it")
    g.add_argument("--full", action="store_true", help="pass --full to benches that take it")
    ap.add_argument("--only", default="", help="comma list of topics (core,extract,scaling,quality,...)")
    ap.add_argument("--all", action="store_true", help="also run every other benchmarks/bench_*.py")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per bench before it is stopped")
    ap.add_argument("--report-only", action="store_true", help="only regenerate BENCHMARKS.md")
    ap.add_argument("--bench-args", default="", help="extra arguments for the benches run (use with --only), "
                                                      "e.g. --only scaling --bench-args='--cap 60'")
    args = ap.parse_args(argv)
    started, load_start = now_utc(), load_average()
    topics = discover(args.all)
    if args.only:
        want = [t.strip() for t in args.only.split(",") if t.strip()]
        missing = [t for t in want if t not in discover(True)]
        if missing:
            ap.error(f"no benchmarks/bench_{missing[0]}.py; present: {', '.join(discover(True))}")
        topics = want
    runs = []
    if not args.report_only:
        mode = "quick" if args.quick else "full" if args.full else ""
        for topic in topics:
            runs.append(run_bench(topic, mode, args.timeout, shlex.split(args.bench_args)))
    path = write_report(runs, started, load_start)
    print(f"wrote {path}")
    bad = [r for r in runs if r["rc"] != 0]
    for r in bad:
        print(f"bench_{r['topic']} exited {r['rc']} (log: {r['log']})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
