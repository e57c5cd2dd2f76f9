"""Shared plumbing for the benchmarks: machine/version facts, CSV appends, synthetic embeddings.

Not a benchmark itself. Imported by the ``bench_*.py`` scripts and ``__main__.py``.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import socket
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PLOTS = ROOT / "benchmarks" / "plots"
if str(ROOT) not in sys.path:  # scripts run as `python benchmarks/bench_x.py` from the checkout
    sys.path.insert(0, str(ROOT))


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return float("nan")


def versions() -> dict:
    """Versions of what the numbers depend on (missing packages are reported as absent)."""
    out = {"python": platform.python_version(), "numpy": np.__version__}
    for mod in ("scipy", "faiss", "torch", "matplotlib"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - any import failure means "not available here"
            out[mod] = "absent"
    try:
        import scalselect_fast

        out["scalselect_fast"] = scalselect_fast.__version__
        from scalselect_fast import native

        out["native_backend"] = native.BACKEND
    except Exception as exc:  # noqa: BLE001
        out["scalselect_fast"] = f"unimportable ({exc})"
    try:
        from threadpoolctl import threadpool_info

        blas = [f"{i.get('internal_api')} {i.get('version')} ({i.get('num_threads')} threads)"
                for i in threadpool_info() if i.get("user_api") == "blas"]
        out["blas"] = "; ".join(blas) or "unknown"
    except Exception:  # noqa: BLE001
        out["blas"] = "unknown"
    return out


def machine() -> dict:
    return {"host": socket.gethostname(), "cpu": cpu_model(), "cores": os.cpu_count(),
            "memory_gib": memory_gib(), "os": f"{platform.system()} {platform.release()}"}


def median_time(fn, repeats: int, sync=None, warmup: bool = False):
    """Median wall time of ``repeats`` calls of ``fn``.

    ``sync`` (e.g. ``torch.cuda.synchronize``) is called after each call so asynchronous work is
    inside the timing; ``warmup`` makes one untimed call first (allocators, JIT compiles).

    Returns
    -------
    (median_seconds, last_result, all_seconds)
    """
    sync = sync or (lambda: None)
    if warmup:
        fn()
        sync()
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), result, times


def alternating_times(fa, fb, repeats: int) -> tuple[list[float], list[float], object, object]:
    """Wall times of ``fa`` and ``fb`` run alternately ``repeats`` times each, after one untimed call
    of each (page cache, allocators, imports), so load on a shared machine drifts into both alike.

    Returns
    -------
    (seconds of each fa call, seconds of each fb call, last result of fa, last result of fb)
    """
    fa(), fb()
    ta, tb, ra, rb = [], [], None, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        ra = fa()
        ta.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        rb = fb()
        tb.append(time.perf_counter() - t0)
    return ta, tb, ra, rb


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def append_csv(path: Path, rows: list[dict]) -> None:
    """Append rows; write the header when the file is new.

    When the new rows carry columns the file lacks (or lack some it has), the file is rewritten once,
    atomically, with the union of the columns (earlier rows blank in the new ones), so one topic keeps
    one CSV whose history stays comparable instead of splitting into dated leftovers.
    """
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0].keys())
    for r in rows[1:]:
        fields += [k for k in r if k not in fields]
    if path.exists():
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            if header != fields and set(fields) - set(header):
                old_rows = list(reader)
            else:
                old_rows = None
        if old_rows is not None:
            union = header + [k for k in fields if k not in header]
            tmp = path.with_suffix(".csv.tmp")
            with open(tmp, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=union)
                w.writeheader()
                w.writerows(old_rows)
            os.replace(tmp, path)
            header = union
        fields = header
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, restval="")
        if new:
            w.writeheader()
        w.writerows(rows)


def read_latest_run(path: Path) -> list[dict]:
    """Rows of the most recent ``run_id`` in a CSV written by :func:`append_csv`."""
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return []
    if "run_id" not in rows[0]:
        return rows
    last = rows[-1]["run_id"]
    return [r for r in rows if r["run_id"] == last]


def embeddings(n: int, d: int, seed: int = 0, rank: int = 32, clusters: int = 64,
               chunk: int = 65536) -> np.ndarray:
    """Clustered low-rank float32 rows plus isotropic noise, like pooled VLM hidden states.

    Rows are generated in chunks seeded by (seed, chunk index), so the first n rows are the same
    for every larger n: the scaling series measures the same distribution at every size.
    """
    base = np.random.default_rng([seed, 10**6])
    basis = (base.standard_normal((rank, d)) / np.sqrt(rank)).astype(np.float32)
    centers = (2.0 * base.standard_normal((clusters, rank))).astype(np.float32)
    out = np.empty((n, d), dtype=np.float32)
    for ci, start in enumerate(range(0, n, chunk)):
        rng = np.random.default_rng([seed, ci])
        m = min(chunk, n - start)
        z = centers[rng.integers(clusters, size=m)] + rng.standard_normal((m, rank), dtype=np.float32)
        # the product in float64, rounded once: a float32 GEMM gave other rows on other CPUs' BLAS
        # kernels, and the benchmarks and the selection pins need the same data everywhere
        out[start:start + m] = z.astype(np.float64) @ basis.astype(np.float64)
        out[start:start + m] += 0.3 * rng.standard_normal((m, d), dtype=np.float32)
    return out
