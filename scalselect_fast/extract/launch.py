"""One extraction process per device: ``--devices`` (``auto``, ``cuda:0,cuda:3``, ``cpu:N``).

:func:`parse_devices` turns the setting into a list of torch devices; :func:`extract_on_devices`
starts one child process per device, each running :func:`~.loop.extract_to_store` as rank ``r`` of
``W`` (the torchrun layout: ``rankNNN-shard-*`` shards of one store, see :mod:`.ranks`), draws one
progress bar for all of them, and watches them: when one dies (a Python error, ``kill -9``, the
kernel's OOM killer, a CUDA fault) the others are stopped and :class:`WorkerError` names the device,
the rank and how it ended. Committed shards stay, so rerunning the same command resumes. The children
die with their parent (``PR_SET_PDEATHSIG`` on Linux, plus a parent watchdog), so a ``kill -9`` of the
parent leaves no extraction running.

Children are fresh interpreters (``python -m scalselect_fast.extract.launch``), not forks: CUDA cannot
be used in a forked child, and a fresh process has no copy of the parent's loaded state. Each gets its
job as a pickle on stdin and reports on a pipe of its own, one JSON line per event.

Not here: which records a rank owns (:mod:`.ranks`) and the extraction itself (:mod:`.loop`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickle
import selectors
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..atomic import crashpoint
from .options import ExtractOptions
from .roles import ExtractError

__all__ = ["DevicesError", "WorkerError", "parse_devices", "plan_devices", "extract_on_devices"]

#: seconds a stopped child gets to exit after SIGTERM before it is killed
STOP_GRACE_S = 10.0


class DevicesError(ExtractError):
    """A ``devices`` setting that cannot be used; the message names the value and what is accepted."""


class WorkerError(RuntimeError):
    """An extraction process died; the message names its device and rank and how it ended.

    Attributes
    ----------
    device : str
        The torch device the process ran on.
    rank : int
        Its rank (the records it owned are ``rank_range(n, rank, world_size)``).
    returncode : int
        Its exit status (negative: killed by that signal).
    """

    def __init__(self, message: str, device: str, rank: int, returncode: int):
        super().__init__(message)
        self.device, self.rank, self.returncode = device, rank, returncode


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_devices(spec, device: str | None = "auto") -> list[str]:
    """The devices one extraction runs on, one process each.

    Parameters
    ----------
    spec : str, list of str or None
        ``"auto"`` (None): every visible CUDA device, else one CPU process; when ``device`` names a
        device (``"cpu"``, ``"cuda:1"``), that one device. ``"cuda:0,cuda:3"`` (or a list): those
        devices. ``"cpu:N"``: N processes on the CPU. ``"cpu"`` / ``"cuda:N"``: one process.
    device : str, optional
        The single-device setting (``--device``); with an explicit ``spec`` it may only name the same
        device or its kind (``"cuda"`` with ``cuda:0,cuda:1``).

    Returns
    -------
    list of str
        Torch device strings, one per process (``"cpu"`` repeated N times for ``cpu:N``).

    Raises
    ------
    DevicesError
        A malformed value, a repeated or missing CUDA device, CPU mixed with CUDA, or a ``device``
        that contradicts ``spec``.
    """
    dev = None if device in (None, "auto") else str(device)
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "auto"):
        if dev is not None:
            return [dev]
        n = _cuda_count()
        return [f"cuda:{i}" for i in range(n)] if n else ["cpu"]
    items = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    items = [str(s).strip().lower() for s in items]
    hint = "use auto, a list such as cuda:0,cuda:3, or cpu:N (N CPU processes)"
    if not items or any(not s for s in items):
        raise DevicesError(f"--devices {spec!r}: empty entry; {hint}")
    out: list[str] = []
    for s in items:
        kind, _, num = s.partition(":")
        if kind not in ("cpu", "cuda") or (num and not num.isdigit()):
            raise DevicesError(f"--devices {spec!r}: {s!r} is not a device; {hint}")
        if kind == "cpu":
            count = int(num) if num else 1
            if count < 1:
                raise DevicesError(f"--devices {spec!r}: cpu:N needs N >= 1")
            out += ["cpu"] * count
        else:
            out.append(f"cuda:{int(num)}" if num else "cuda:0")
    kinds = {d.split(":")[0] for d in out}
    if len(kinds) > 1:
        raise DevicesError(f"--devices {spec!r}: CPU and CUDA processes cannot share one extraction (they "
                           f"compute in different dtypes); {hint}")
    if "cuda" in kinds:
        dup = sorted({d for d in out if out.count(d) > 1})
        if dup:
            raise DevicesError(f"--devices {spec!r}: {dup[0]} is listed twice; list each GPU once")
        n = _cuda_count()
        missing = [d for d in out if int(d.split(":")[1]) >= n]
        if missing:
            raise DevicesError(f"--devices {spec!r}: {missing[0]} is not visible (torch sees {n} CUDA "
                               f"device(s)); check CUDA_VISIBLE_DEVICES or use --devices auto")
    if dev is not None and dev != out[0].split(":")[0] and [dev] != out:
        raise DevicesError(f"--device {dev} and --devices {spec!r} disagree; give only --devices (or only "
                           f"--device for one process)")
    return out


def plan_devices(opts: ExtractOptions) -> list[str] | None:
    """The devices an :func:`~.loop.extract_to_store` call extracts on, one process each, or None when
    this process extracts alone as configured (a ``device_map``, or a rank of a job launched by torchrun
    or given ``rank``/``world_size``)."""
    from .ranks import env_rank

    launched = opts.rank is not None or opts.world_size is not None or env_rank()[1] > 1
    if launched or opts.device_map is not None:
        if opts.devices not in (None, "auto") and launched:
            raise DevicesError(f"--devices {opts.devices!r} under torchrun/accelerate (or with rank/world_size): "
                               f"each launched process is one rank already; leave --devices at auto")
        return None
    return parse_devices(opts.devices, opts.device)


def _threads_each(world: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // world)


def _signal_name(code: int) -> str:
    with contextlib.suppress(ValueError):
        return signal.Signals(-code).name
    return f"signal {-code}"


def _how_it_ended(label: str, code: int, error: dict | None) -> str:
    if error is not None:
        return f"{label} failed: {error['type']}: {error['message']}"
    if code < 0:
        why = " (out of memory? the kernel's OOM killer sends SIGKILL; see dmesg)" if code == -signal.SIGKILL else ""
        return f"{label} was killed by {_signal_name(code)}{why}"
    return f"{label} exited with status {code} without finishing"


class _Child:
    """One extraction process: its rank, device, pipe and what it reported."""

    def __init__(self, rank: int, device: str, proc: subprocess.Popen, fd: int):
        self.rank, self.device, self.proc, self.fd = rank, device, proc, fd
        self.buf = b""
        self.done = 0
        self.summary: dict | None = None
        self.error: dict | None = None

    @property
    def label(self) -> str:
        return f"{self.device} (rank {self.rank})"


def extract_on_devices(model, data, out, devices: list[str], opts: ExtractOptions) -> dict:
    """Extract ``data`` into the store ``out`` with one process per entry of ``devices``.

    Parameters
    ----------
    model : str or PathLike
        Checkpoint directory (each process loads its own copy; a loaded VLM cannot be shared).
    data : anything :func:`~scalselect_fast.data.sources.open_dataset` accepts
    out : path
        The store; rank r writes ``rank{r:03d}-shard-*`` into it.
    devices : list of str, len >= 2
        From :func:`parse_devices`.
    opts : ExtractOptions
        The settings; ``progress`` draws one bar here, ``on_progress(done, total)`` counts the records of
        every rank, ``warn`` receives each child's messages once.

    Returns
    -------
    dict
        ``{"store", "world_size", "devices", "rows", "skipped", "shards_written", "shards_resumed",
        "shards_redone", "ranks"}`` (``ranks``: each process's own summary) and, with a cache, ``"cache"``
        with the counts added up.

    Raises
    ------
    WorkerError
        A process died; the others were stopped, committed shards are kept (rerun to resume).
    DevicesError
        ``model`` is a loaded model, a setting cannot be sent to another process, or the store holds a
        job of another process count.
    """
    from ..data import count_records
    from ..data.sources import open_dataset

    if not isinstance(model, (str, os.PathLike)):
        raise DevicesError("several devices need the model as a checkpoint path (each process loads its own "
                           "copy), not a loaded VLM; pass the path, or one device")
    world = len(devices)
    out = Path(out)
    _check_store_world(out, world, opts.force)
    n_records = count_records(open_dataset(data, opts.format), opts.format)
    warn = opts.warn or (lambda m: print(f"warning: {m}", file=sys.stderr, flush=True))
    threads = _threads_each(world)
    child_opts = dataclasses.replace(opts, devices=None, device_map=None, progress=False, on_progress=None,
                                     warn=None, force=False)
    children: list[_Child] = []
    sel = selectors.DefaultSelector()
    bar = None
    try:
        for rank, dev in enumerate(devices):
            job = {"model": os.fspath(model), "data": data, "out": str(out),
                   "options": dataclasses.replace(child_opts, rank=rank, world_size=world, device=dev),
                   "threads": threads, "parent": os.getpid()}
            try:
                payload = pickle.dumps(job)
            except (pickle.PicklingError, TypeError, AttributeError) as exc:
                raise DevicesError(f"a setting cannot be sent to the extraction processes ({exc}); an image_loader "
                                   f"must be a module-level function for several devices") from None
            r, w = os.pipe()
            env = dict(os.environ, SCALSELECT_WORKER_FD=str(w))
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
                env.setdefault(var, str(threads))  # no library oversubscribes the cores the others use
            root = str(Path(__file__).resolve().parents[2])
            env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            proc = subprocess.Popen([sys.executable, "-m", "scalselect_fast.extract.launch"], stdin=subprocess.PIPE,
                                    env=env, pass_fds=(w,))
            os.close(w)
            child = _Child(rank, dev, proc, r)
            children.append(child)
            sel.register(r, selectors.EVENT_READ, child)
            proc.stdin.write(payload)
            proc.stdin.close()
        if opts.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_records, unit="sample", dynamic_ncols=True, smoothing=0.1,
                       desc=f"extract x{world}", file=sys.stderr)
        _watch(children, sel, bar, opts.on_progress, n_records, warn)
    finally:
        _stop(children)
        sel.close()
        for c in children:
            with contextlib.suppress(OSError):
                os.close(c.fd)
        if bar is not None:
            bar.close()
    return _merge([c.summary for c in children], out, devices)


def _check_store_world(out: Path, world: int, force: bool) -> None:
    """Refuse a store written by another number of processes (its ranks own other record ranges):
    mixing them would lose or repeat records. ``force`` discards it instead."""
    mpath = out / "manifest.json"
    if not mpath.is_file():
        return
    try:
        old = json.loads(mpath.read_text()).get("provenance", {}).get("world_size")
    except (OSError, ValueError):
        old = None  # not a store manifest: the store writer names the problem
    if old is not None and int(old) != world and not force:
        raise DevicesError(f"store {out} was written by {old} process(es) and this job has {world}: their "
                           f"record ranges differ, so the shards cannot be mixed. Rerun with {old} device(s) "
                           f"to resume it, or with --force to discard it")
    if force:
        import shutil

        shutil.rmtree(out)  # the children must not each decide to reset a store the others write


def _watch(children: list[_Child], sel, bar, on_progress, total: int, warn) -> None:
    """Read the children's reports until all have finished; raise at the first one that dies."""
    seen: set[str] = set()

    def handle(c: _Child, chunk: bytes) -> None:
        c.buf += chunk
        *lines, c.buf = c.buf.split(b"\n")
        for line in lines:
            msg = json.loads(line)
            if msg["k"] == "p":
                c.done = int(msg["done"])
                done = sum(x.done for x in children)
                if bar is not None:
                    bar.update(done - bar.n)
                if on_progress is not None:
                    on_progress(done, total)
                crashpoint("devices.parent")  # the tests kill the parent here
            elif msg["k"] == "w" and msg["m"] not in seen:
                seen.add(msg["m"])
                warn(msg["m"])
            elif msg["k"] == "s":
                c.summary = msg["summary"]
            elif msg["k"] == "e":
                c.error = msg

    running = list(children)
    while running:
        for key, _ in sel.select(timeout=1.0):
            c: _Child = key.data
            chunk = os.read(c.fd, 65536)
            if chunk:
                handle(c, chunk)
            else:
                sel.unregister(c.fd)
        for c in list(running):
            code = c.proc.poll()
            if code is None:
                continue
            with contextlib.suppress(OSError):  # its last reports may still be in the pipe
                while _readable(c.fd) and (chunk := os.read(c.fd, 65536)):
                    handle(c, chunk)
            if code == 0 and c.summary is not None:
                running.remove(c)
                continue
            others = [x for x in children if x is not c and x.proc.poll() is None]
            _stop(others)
            then = ("shards already committed are kept" if c.error is not None else
                    "shards already committed are kept: rerun the same command to resume")
            raise WorkerError(f"{_how_it_ended(c.label, code, c.error)}; stopped the other {len(others)} "
                              f"process(es); {then}", c.device, c.rank, code)


def _readable(fd: int) -> bool:
    import select

    return bool(select.select([fd], [], [], 0)[0])


def _stop(children: list[_Child]) -> None:
    """SIGTERM the children still running, then SIGKILL those that did not exit in time."""
    live = [c for c in children if c.proc.poll() is None]
    for c in live:
        with contextlib.suppress(ProcessLookupError):
            c.proc.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for c in live:
        try:
            c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            c.proc.kill()
            c.proc.wait()


def _merge(summaries: list[dict], out: Path, devices: list[str]) -> dict:
    total = {"store": str(out), "world_size": len(devices), "devices": list(devices), "rows": 0, "skipped": 0,
             "shards_written": 0, "shards_resumed": 0, "shards_redone": [], "ranks": summaries}
    for s in summaries:
        for k in ("rows", "skipped", "shards_written", "shards_resumed"):
            total[k] += int(s.get(k, 0))
        total["shards_redone"] += list(s.get("shards_redone") or [])
        if s.get("cache") is not None:
            c = total.setdefault("cache", {"dir": s["cache"]["dir"], "reused": 0, "extracted": 0})
            c["reused"] += int(s["cache"]["reused"])
            c["extracted"] += int(s["cache"]["extracted"])
    return total


# --------------------------------------------------------------------------------------------------
# the child side
# --------------------------------------------------------------------------------------------------
def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent goes (Linux), and a watchdog for where that is missing."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    def watchdog():
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(1.0)

    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)
    threading.Thread(target=watchdog, daemon=True, name="parent-watchdog").start()


def _child_main() -> int:
    job = pickle.loads(sys.stdin.buffer.read())
    _die_with_parent(job["parent"])
    fd = int(os.environ.pop("SCALSELECT_WORKER_FD"))
    os.set_inheritable(fd, False)  # the encoding workers must not hold the parent's pipe open
    pipe = os.fdopen(fd, "wb", buffering=0)
    lock = threading.Lock()

    def send(**msg):
        with lock:
            pipe.write(json.dumps(msg, default=str).encode() + b"\n")

    opts: ExtractOptions = job["options"]
    rank = opts.rank
    import torch

    torch.set_num_threads(job["threads"])
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # one bar: the parent's
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()

    def progress(done, total):
        send(k="p", done=done, total=total)
        crashpoint(f"devices.rank{rank}")  # the tests kill one worker here

    from .loop import extract_to_store

    try:
        summary = extract_to_store(job["model"], job["data"], job["out"], options=dataclasses.replace(
            opts, on_progress=progress, warn=lambda m: send(k="w", m=m)))
    except BaseException as exc:  # noqa: BLE001  (reported to the parent, which names the device)
        send(k="e", type=type(exc).__name__, message=" ".join(str(exc).split()))
        return 1
    send(k="s", summary=summary)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
