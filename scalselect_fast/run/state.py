"""Durable run state: ``OUT/.scalselect/state.json`` (fingerprints, finished stages, timings).

:func:`crashpoint` (the places the durability tests stop a run at) lives in :mod:`scalselect_fast.atomic`
and is re-exported here."""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_json, crashpoint
from .config import RunError
from .events import Events

__all__ = ["RunState", "crashpoint", "WORK"]

WORK = ".scalselect"
STATE = "state.json"
STATE_FORMAT = "scalselect-run"
STATE_VERSION = 1

#: the default representation cache inside the work folder: content-addressed, so it survives --force
CACHE = "cache"


def _clear_work(work: Path) -> None:
    """Discard every checkpoint in ``work`` except the representation cache (its entries are valid for
    any run: they are addressed by content)."""
    if not work.is_dir():
        return
    for p in work.iterdir():
        if p.name == CACHE and p.is_dir():
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _remove_fit_checkpoints(work: Path) -> None:
    for name in ("fit", "scores"):
        shutil.rmtree(work / name, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        (work / "subspace.npz").unlink()


class RunState:
    def __init__(self, out: Path, fps: dict, force: bool, events: Events, cache: bool = False):
        self.work = out / WORK
        self.path = self.work / STATE
        self.fps = fps
        self.data: dict[str, Any]
        old = None
        if self.path.exists():
            try:
                old = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError):
                old = None  # a state file is replaced atomically, so this means someone edited it
        if old is not None and old.get("format") == STATE_FORMAT:
            diff = [k for k in ("model", "data", "extract", "fit") if old.get("fingerprints", {}).get(k) != fps[k]]
            if cache and "data" in diff and old["fingerprints"].get("settings") == fps.get("settings"):
                # only the dataset changed: the representation cache keeps every vector already paid for
                events.warn(f"the dataset changed since the checkpoints in {self.work} were written: starting "
                            f"over, reusing the representation cache (only samples it does not hold are "
                            f"extracted)")
                _clear_work(self.work)
                old, diff = None, []
            if diff and not force:
                what = {"model": "the model files", "data": "the dataset file or image root",
                        "extract": "extraction settings (layer, threshold, instruction, max length, dtype, "
                                   "device, batch/shard size)",
                        "fit": "subspace settings (energy, k, solver, seed, standardize, l2-normalize, "
                               "drop-invalid, fit device)"}
                changed = [what[k] for k in diff if not (k == "extract" and ("model" in diff or "data" in diff))
                           and not (k == "fit" and len(diff) > 1)]
                raise RunError(
                    f"{out} holds checkpoints of a different run: {'; '.join(changed)} changed since they "
                    f"were written (fingerprints in {self.path}). Mixing stages from different runs would "
                    f"give a wrong selection. Rerun with --force to discard the affected checkpoints and "
                    f"recompute them, or choose another --out.")
            if diff == ["fit"]:
                # only the subspace settings changed: the representations are still valid, keep them
                events.warn(f"--force: discarding the fit and score checkpoints in {self.work} (subspace "
                            f"settings changed; the extracted representations are kept)")
                _remove_fit_checkpoints(self.work)
                for st in ("fit", "score"):
                    old["stages"].pop(st, None)
            elif diff:
                events.warn(f"--force: discarding all checkpoints in {self.work} (model, data or extraction "
                            f"settings changed)")
                _clear_work(self.work)
                old = None
            if old is not None:
                old["fingerprints"] = fps
        elif old is not None or (self.work.exists() and any(p.name != CACHE for p in self.work.iterdir())
                                   and not self.path.exists()):
            if not force:
                raise RunError(f"{self.work} exists but has no readable run state; rerun with --force to "
                               f"discard it, or choose another --out")
            _clear_work(self.work)
            old = None
        elif force and self.work.exists():
            _clear_work(self.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.data = old or {"format": STATE_FORMAT, "version": STATE_VERSION, "fingerprints": fps,
                            "stages": {}, "timings": {}}
        self.save()

    def forget(self, *stages: str) -> None:
        """Mark ``stages`` as not done; forgetting ``fit`` also deletes the fit and score checkpoints."""
        for st in stages:
            self.data["stages"].pop(st, None)
        if "fit" in stages:
            _remove_fit_checkpoints(self.work)
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, self.data)

    def done(self, stage: str) -> bool:
        return bool(self.data["stages"].get(stage, {}).get("done"))

    def mark(self, stage: str, **info) -> None:
        self.data["stages"][stage] = {"done": True, **info}
        self.save()

    def add_time(self, stage: str, seconds: float) -> None:
        t = self.data.setdefault("timings", {})
        t[stage] = float(t.get(stage, 0.0)) + float(seconds)
        self.save()

