"""The stages of ``scalselect run``: dataset in, selected dataset + manifest + report out.

Stages and what each one checkpoints (all under ``OUT/.scalselect/``)::

    extract   representation store reps/ (one shard per --shard-size samples, committed atomically
              by the extraction engine; a rerun resumes after the last committed shard)
    fit       fit/gram.npz: the running float64 Gram accumulator with the list of store shards it
              covers, replaced atomically every FIT_CHECKPOINT_SECONDS (env
              SCALSELECT_FIT_CHECKPOINT_S) and after the last shard (exact solver); the randomized solver
              and l2-normalised fits checkpoint at stage level only (they need several passes)
    score     scores/<shard>.npy: leverage scores of one store shard, written atomically
    select    recomputed on every run from the checkpoints (O(N log N), cheap); writes
              OUT/<input name> (the input's own format), manifest.parquet, report.json/.html,
              subspace.npz, all through temporary names + rename

``state.json`` records the fingerprints of the model, the data file and the configuration that
each stage depends on. A rerun whose fingerprints differ from the checkpoints' is refused with a
message naming what changed; ``--force`` discards the old checkpoints. Selection-only options
(budget, order, dedup, quota) may change between runs: the last stage is always recomputed.

Nothing here computes representations, subspaces or scores itself: it sequences
:mod:`scalselect_fast.extract`, :mod:`scalselect_fast.subspace`, :mod:`scalselect_fast.data` and
:mod:`scalselect_fast.postselect`, and makes the sequence durable.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from ..atomic import atomic_path, atomic_write_bytes
from ..data.sample import DatasetError
from ..data.skiplog import DiscardSkips
from ..paths import refuse_overwrite
from ..gcfreeze import loaded_objects_frozen
from ..lock import exclusive_lock
from ..store import StoreError
from .config import RunConfig, RunError
from .events import Events, json_progress
from .fingerprints import data_fingerprint, model_fingerprint, stage_fingerprints
from .state import CACHE, WORK, RunState, crashpoint

#: the extraction's reason code for a record without an image (``scalselect_fast.extract.REASON_TEXT_ONLY``,
#: not imported: the extract package pulls in torch)
REASON_TEXT_ONLY = "text_only"

__all__ = ["run", "RunResult"]

#: lock file inside --out held for the whole run (see :mod:`scalselect_fast.lock`)
RUN_LOCK = ".scalselect.lock"
#: seconds between two writes of the fit's Gram checkpoint (a crash loses at most this much fit work)
FIT_CHECKPOINT_SECONDS = 30.0


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a directory; choose a directory path (it is created "
                       f"if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        with open(probe, "wb") as fh:
            fh.write(b"x")
        probe.unlink()
    except OSError as exc:
        raise RunError(f"--out {out} is not writable ({exc.strerror or exc}); choose a directory you can "
                       f"write to") from exc


def quiet_libraries() -> None:
    """No transformers / hub progress bars or info warnings under --quiet and --log-json."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "datasets" in sys.modules:  # already imported to read the input: the env is read at import
        sys.modules["datasets"].disable_progress_bars()  # save_to_disk of the selection
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()


def _remove_stale_temps(out: Path) -> None:
    """Delete temporary files a killed run left behind (``.name.XXXX.tmp`` from the atomic writers).

    They were never renamed into place, so nothing refers to them; the run holds the --out lock,
    so no live writer owns them.
    """
    for d in (out, out / WORK, out / WORK / "fit", out / WORK / "scores", out / WORK / "reps"):
        if d.is_dir():
            for p in d.glob(".*.tmp"):
                with contextlib.suppress(OSError):
                    p.unlink()


def _disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@dataclasses.dataclass
class RunResult:
    """Where a finished run put its outputs, and the report dict."""

    out: Path
    selected_path: Path
    manifest_path: Path
    report_json: Path
    report_html: Path | None
    subspace_path: Path
    n_selected: int
    report: dict


def _store_dir(state: RunState) -> Path:
    return state.work / "reps"


def _cache_dir(cfg: RunConfig, out: Path) -> Path | None:
    """The representation cache a run uses: ``--cache DIR``, by default OUT/.scalselect/cache; None for
    ``--cache none``."""
    if cfg.cache is None:
        return out / WORK / CACHE
    if str(cfg.cache).lower() == "none":
        return None
    return Path(cfg.cache).expanduser()


class _FitCheckpoint:
    """The fit's on-disk checkpoint (``fit/gram.npz``) for :func:`~scalselect_fast.subspace.fit_subspace`.

    It holds the Gram pass's per-shard progress (the tree reduction's partials, the shards they
    cover, invalid rows found) and the fit fingerprint; a checkpoint of other settings is ignored.
    Written atomically every ``every`` seconds and after the last shard: the d×d partials can be
    larger than a 4096-row shard (d=4096: 128 MiB each vs 32 MiB read), so not after every shard.
    """

    def __init__(self, path: Path, fingerprint: str, every: float, update):
        self.path, self.fingerprint, self.every, self.update = path, fingerprint, every, update
        self.last = time.monotonic()
        self.shard_rows: dict[str, int] = {}

    def load(self, xp):
        from ..subspace.exact import GramProgress

        if not self.path.exists():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as z:
                progress, meta = GramProgress.from_arrays(z, xp)
        except (OSError, ValueError, KeyError) as exc:
            raise RunError(f"{self.path}: unreadable fit checkpoint ({exc}); rerun with --force") from exc
        if meta.get("fingerprint") != self.fingerprint:
            return None
        names = list(self.shard_rows)
        if progress.shards != names[:len(progress.shards)]:
            raise RunError(f"{self.path}: the fit checkpoint covers shards {progress.shards[:3]}... that do not "
                           f"match the representation store; rerun with --force")
        self.update(sum(self.shard_rows.get(name, 0) for name in progress.shards))
        return progress

    def save(self, progress, last: bool) -> None:
        if last or time.monotonic() - self.last >= self.every:
            with atomic_path(self.path) as tmp, open(tmp, "wb") as fh:
                np.savez(fh, **progress.to_arrays({"fingerprint": self.fingerprint}))
            self.last = time.monotonic()
        crashpoint("fit.shard")
        self.update(self.shard_rows.get(progress.shards[-1], 0))


def _stage_fit(cfg: RunConfig, state: RunState, events: Events, src):
    """Fit the subspace with :func:`~scalselect_fast.subspace.fit_subspace` and every fit option;
    the exact solver's Gram pass is checkpointed per shard (resumed after a crash), other fits
    (randomized, l2-normalised: several passes) at stage level."""
    from ..devices import DeviceError, array_backend
    from ..subspace import Subspace, fit_subspace

    sub_path = state.work / "subspace.npz"
    if state.done("fit") and sub_path.exists():
        return Subspace.load(sub_path)
    try:
        xp_name = array_backend(cfg.fit_device)
    except DeviceError as exc:
        raise RunError(f"--fit-device {cfg.fit_device}: {exc}") from exc
    t0 = time.perf_counter()
    events.emit("stage_start", stage="fit", solver=cfg.solver)
    every = float(os.environ.get("SCALSELECT_FIT_CHECKPOINT_S", FIT_CHECKPOINT_SECONDS))
    with events.progress("fit", src.n, "rows") as update:
        checkpoint = _FitCheckpoint(state.work / "fit" / "gram.npz", state.fps["fit"], every, update)
        checkpoint.shard_rows = {s.name: s.count for s in src.shards}
        sub = fit_subspace(src, energy=cfg.energy, k=cfg.k, solver=cfg.solver, seed=cfg.seed,
                           standardize=bool(cfg.standardize), l2_normalize=bool(cfg.l2_normalize),
                           drop_invalid=bool(cfg.drop_invalid), array_backend=xp_name, checkpoint=checkpoint)
    sub.provenance = {**dict(src.provenance), "data_fingerprint": state.fps["data"],
                      "model_fingerprint": state.fps["model"], "layer": cfg.layer, "threshold": cfg.threshold,
                      "model": cfg.model}
    sub.save(sub_path)
    state.add_time("fit", time.perf_counter() - t0)
    state.mark("fit", k=int(sub.k), solver=sub.solver)
    events.emit("stage_done", stage="fit", k=int(sub.k), solver=sub.solver)
    return sub


def _stage_score(cfg: RunConfig, state: RunState, events: Events, src, sub) -> np.ndarray:
    """Leverage scores of every stored row, one checkpoint file per store shard."""
    from ..scoring import check_scores

    sdir = state.work / "scores"
    sdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    events.emit("stage_start", stage="score")
    out = np.empty(src.n, dtype=np.float64)
    with events.progress("score", src.n, "rows") as update:
        for shard in src.shards:
            p = sdir / f"{shard.name}.npy"
            s = None
            if p.exists():
                with contextlib.suppress(OSError, ValueError):
                    s = np.load(p, allow_pickle=False)
                if s is not None and s.shape != (shard.count,):
                    s = None
            if s is None:
                s = np.empty(shard.count, dtype=np.float64)
                # read into reused buffers (prefetch): a memory map of every shard would stay
                # resident, the whole store counted in this process's memory by the end
                for off, block in src.iter_shard_blocks(shard, verify=True, prefetch=2):
                    s[off - shard.offset: off - shard.offset + block.shape[0]] = sub.score(block, bf16=src.is_bf16)
                # NaN/inf rows: NaN scores (never selected) with --drop-invalid, else a clear error
                check_scores(src, s, shard.offset, bool(cfg.drop_invalid))
                buf = io.BytesIO()
                np.save(buf, s, allow_pickle=False)
                atomic_write_bytes(p, buf.getvalue())
                crashpoint("score.shard")
            out[shard.offset: shard.offset + shard.count] = s
            update(shard.count)
    if not state.done("score"):
        state.add_time("score", time.perf_counter() - t0)
        state.mark("score")
    events.emit("stage_done", stage="score")
    return out


#: rows of an Arrow batch turned into Python dicts at once by the record pass
_PYLIST_ROWS = 1 << 14


def _raw_records(cfg: RunConfig, fields: Iterable[str]) -> Iterator[tuple[Any, str | None]]:
    """Every raw record in order, with its id (None where it has no usable one); from Arrow inputs
    (Parquet, ``save_to_disk``) only the id, source and ``fields`` columns are read, and from
    WebDataset shards only the ``.json`` members, so the image bytes are not read a second time.
    A record without an id field is named by its position, as the readers name it
    (:class:`~scalselect_fast.data.records.IdRule`)."""
    from ..data.records import IdRule, position_id, source_columns
    from ..data.sources import open_dataset

    rule = IdRule(cfg.id_field)
    source = open_dataset(cfg.data, cfg.format)

    def named(rec, name, row):
        if rule.by_position(rec):
            return position_id(name, row)
        v = rec.get(rule.field) if isinstance(rec, dict) else None
        return None if v is None or isinstance(v, (dict, list)) else str(v)

    if source.container == "webdataset":
        from ..data.webdataset import iter_shard_fields

        for f in source.files:
            for rec in iter_shard_fields(f, rule.field):  # a record without an id is named by its key
                v = rec.get(rule.field)
                yield rec, None if v is None or isinstance(v, (dict, list)) else str(v)
    elif source.has_batches():
        for _index, batch, file, local in source.iter_batches(
                columns=[rule.field, *source_columns(cfg.source_field), *fields]):
            name = source.relative_name(file)
            # a slice at a time: a batch can be a whole row group (a million rows), and that many
            # dicts at once would leave their memory with the process long after the pass
            for a in range(0, batch.num_rows, _PYLIST_ROWS):
                for i, rec in enumerate(batch.slice(a, _PYLIST_ROWS).to_pylist(), start=a):
                    yield rec, named(rec, name, local + i)
    else:
        for _index, _line, rec, file, local in source.iter_records():
            yield rec, named(rec, source.relative_name(file), local)


def _record_table(cfg: RunConfig, fields: Iterable[str], spill_dir: Path | None = None) -> dict:
    """One pass over the raw records: id, source and any quota field per record index, as compact
    columns (:class:`~scalselect_fast.rowmap.IdColumn`, :class:`~scalselect_fast.rowmap.CodedColumn`):
    no Python object per record is kept, and with ``spill_dir`` the ids go to a temporary file there
    (read back a chunk at a time) rather than memory."""
    from array import array

    from ..data import record_source
    from ..data.records import writable_text
    from ..rowmap import CodedColumn, IdColumn

    ids = IdColumn(spill_dir)
    fields = list(fields)
    codes = {f: array("i") for f in ["source", *fields]}
    tables: dict = {f: {} for f in codes}

    def one(v):
        if v is not None and not v.isascii():
            v = writable_text(v)  # a lone surrogate ("\ud800" in JSON) has no UTF-8 form for the manifest
        return v

    for rec, sid in _raw_records(cfg, fields):
        r = rec if isinstance(rec, dict) else {}
        if sid is not None and writable_text(sid) is not sid:  # skipped as invalid_id: it has no usable id
            sid = None
        ids.append(sid)
        src = one(record_source(r, cfg.source_field))
        t = tables["source"]
        codes["source"].append(t.setdefault(src, len(t)))
        for f in fields:
            if f == "source":
                continue
            v = None if r.get(f) is None else one(str(r.get(f)))
            t = tables[f]
            codes[f].append(t.setdefault(v, len(t)))
    cols = {f: CodedColumn.compact(c, list(tables[f])) for f, c in codes.items()}
    return {"ids": ids.finish(), "sources": cols["source"], "fields": {f: cols[f] for f in fields}}


def _resolve_budget(cfg: RunConfig, n_base: int, n_valid: int, skip_counts: Mapping[str, int],
                    skipped_path: Path, n_records: int) -> int:
    """The budget as a count; a fraction or percentage is of ``n_base``, the records that are not
    text-only (they have no representation by nature: a whole budget, ``1.0``, is every other row)."""
    from ..scoring import resolve_budget

    try:
        budget = resolve_budget(cfg.budget, n_base)
    except ValueError as exc:
        raise RunError(f"--budget {cfg.budget}: {exc}") from exc
    if budget > n_valid:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(skip_counts.items())) or "none"
        raise RunError(
            f"--budget {cfg.budget} asks for {budget} samples but only {n_valid} of the {n_records} records have "
            f"a representation (skipped: {why}; details in {skipped_path}). Lower --budget to at most "
            f"{n_valid}, or fix the skipped samples and rerun")
    if budget < 1:
        raise RunError(f"--budget {cfg.budget} selects no sample out of {n_records}; raise it")
    return budget


def _stage_select(cfg: RunConfig, state: RunState, events: Events, src, sub, scores: np.ndarray,
                  out: Path, skipped_path: Path, report_extra=None, before_commit=None) -> RunResult:
    """The selection job (:func:`scalselect_fast.selection.run_selection`) over the run's checkpoints."""
    from ..data import read_skip_log
    from ..memory import release_freed
    from ..postselect import parse_quota
    from ..rowmap import Records, budget_base, locate_store_rows
    from ..selection import run_selection
    from ..stability import parse_seeds

    t0 = time.perf_counter()
    events.emit("stage_start", stage="select")
    quotas = [parse_quota(q) for q in cfg.quota]
    recs = _record_table(cfg, [q.field for q in quotas], spill_dir=state.work)  # ids on disk: 14 B/record less
    release_freed()  # the record pass's batches and dicts: not under the steps that follow
    n_records = len(recs["ids"])
    records = Records(path=cfg.data, ids=recs["ids"], sources=recs["sources"], fields=recs["fields"],
                      skip_reason={}, skip_counts={}, selected_name=_selected_name(cfg),
                      format=cfg.format, image_root=cfg.image_root, order=cfg.order, id_field=cfg.id_field,
                      keep_text_only=cfg.text_only == "keep")
    # stored rows → records by a merge of the two orders (no table of every id)
    records.stored_record, missing = locate_store_rows(src, records)
    release_freed()  # each shard's ids as strings
    if missing:
        raise RunError(f"the representation store holds ids not in {cfg.data} (e.g. {missing[:3]}); the "
                       f"dataset changed after extraction. Rerun with --force")
    skip_entries = read_skip_log(skipped_path)
    skip_reason: dict[int, str] = {}
    for e in skip_entries:
        if e.get("index") is not None:
            skip_reason.setdefault(int(e["index"]), f"{e.get('reason')}: {e.get('detail', '')}".strip(": "))
    skip_counts: dict[str, int] = {}
    for e in skip_entries:
        skip_counts[e.get("reason")] = skip_counts.get(e.get("reason"), 0) + 1
    n_valid = src.n - int(np.isnan(scores).sum())  # rows excluded by --drop-invalid have no score
    records.text_only = sorted(i for i, why in skip_reason.items() if why.split(":", 1)[0] == REASON_TEXT_ONLY)
    records.skip_reason, records.skip_counts = skip_reason, skip_counts
    budget = _resolve_budget(cfg, budget_base(src, records)["n"], n_valid, skip_counts, skipped_path, n_records)
    fps = state.fps
    timings = {k: v for k, v in state.data.get("timings", {}).items() if k != "select"}
    from ..output_check import RecordCheck  # selected records still what was extracted (issues 21, 22)

    def refuse(changed) -> None:
        if before_commit is not None:
            before_commit()  # an edited, added or removed dataset file is named as such
        again = ("the records whose content changed are extracted again (the representation cache keeps the "
                 "others)" if _cache_dir(cfg, out) is not None else "the shards of changed records are extracted again")
        raise RunError(f"{changed}; the selection was not written, as it would copy a record that is not the one its "
                       f"representation was computed from. Rerun the same command: {again}")

    check = RecordCheck(src, cfg.data, image_root=cfg.image_root, format=cfg.format, id_field=cfg.id_field,
                        refuse=refuse)

    def extra(kept_ids):
        more = {"config_hash": fps["config"],
                "cache": ({"reused": 0, "extracted": 0, **state.data.get("cache", {})}
                          if _cache_dir(cfg, out) is not None else None),
                "fingerprint": {k: fps[k] for k in ("model", "data", "config", "extract", "fit")},
                "config": _config_for_report(cfg), "output_check": check.summary}
        if report_extra is not None:
            more.update(report_extra(kept_ids))
        return more

    report = run_selection(
        src, out, budget, subspace=sub, scores=scores, records=records, quotas=quotas,
        dedup_eps=cfg.dedup_selected, stability_seeds=parse_seeds(cfg.stability_seeds), html=cfg.html,
        timings=timings, report_extra=extra, warn=events.warn, before_commit=before_commit, check_kept=check,
        metadata={"scalselect.fingerprint.model": fps["model"], "scalselect.fingerprint.data": fps["data"],
                  "scalselect.fingerprint.config": fps["config"], "scalselect.fingerprint.fit": fps["fit"]})
    state.data.setdefault("timings", {})["select"] = time.perf_counter() - t0  # recomputed each run
    state.save()
    outs = report["outputs"]
    events.emit("stage_done", stage="select", n_selected=int(report["n_selected"]))
    return RunResult(out=out, selected_path=Path(outs["selected"]), manifest_path=Path(outs["manifest"]),
                     report_json=Path(outs["report"]),
                     report_html=Path(outs["report_html"]) if outs.get("report_html") else None,
                     subspace_path=Path(outs["subspace"]), n_selected=int(report["n_selected"]), report=report)


def _config_for_report(cfg: RunConfig) -> dict:
    """The settings as JSON-able values; a ``datasets`` object given as ``data`` is named, not copied."""
    from ..data.sources import open_dataset

    conf = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if f.name not in ("quiet", "log_json", "force")}
    if not isinstance(conf["data"], (str, list)):
        conf["data"] = open_dataset(conf["data"]).label
    return conf


def _selected_name(cfg: RunConfig) -> str:
    """``selected.<ext>`` for one input file, ``selected`` (a directory) for shards / datasets folders."""
    from ..data import selected_name

    return selected_name(cfg.data, cfg.format)


def _model_options(cfg: RunConfig) -> dict:
    """How the run loads the model (:func:`~scalselect_fast.extract.model.load_vlm`'s keywords)."""
    return {"layer": cfg.layer, "dtype": cfg.dtype, "device": cfg.device, "max_length": cfg.max_length,
            "roles": cfg.roles, "vision_tokens": cfg.vision_tokens, "pixels": cfg.pixels}


def _batch_options(cfg: RunConfig) -> dict:
    """How the run encodes and pools each batch (shared by the extraction and the plan's calibration)."""
    return {"threshold": cfg.threshold, "instruction": cfg.instruction, "num_workers": cfg.num_workers,
            "max_image_pixels": cfg.max_image_pixels}


def _stage_extract(cfg: RunConfig, state: RunState, events: Events, source=None, group=None):
    """Representations into the run's store (the extraction engine resumes after its last shard).

    With several ``--devices``, one process per device extracts its rank's range of the one store;
    under torchrun (``group``) this process extracts rank 0's range and waits for the other ranks.
    Skipped samples (text-only, missing/corrupt images, bad records) go to ``reps/skipped.jsonl``.
    """
    from ..extract import extract_to_store, parse_devices, repair_store
    from ..store import StoreSource

    store = _store_dir(state)
    data = source if source is not None else cfg.data  # the run's resolved DataSource: files listed once
    if state.done("extract") and (store / "manifest.json").exists():
        # every rerun re-reads the shards it reuses: a damaged one, or one whose images changed since,
        # is extracted again (below) instead of being mixed in
        if not repair_store(store, data, image_root=cfg.image_root, format=cfg.format, warn=events.warn,
                            id_field=cfg.id_field):
            return StoreSource(store)
        events.warn(f"discarding the fit and score checkpoints in {state.work}: they depend on the shards "
                    f"being re-extracted")
        state.forget("extract", "fit", "score")
    if group is not None:
        return _finish_extract(cfg, state, events, *_extract_launched(cfg, events, data, store, group))
    devices = parse_devices(cfg.devices, cfg.device)
    _restart_store_of_other_world(cfg, state, events, store, len(devices))
    t0 = time.perf_counter()
    events.emit("stage_start", stage="extract", devices=devices)
    summary = extract_to_store(cfg.model, data, store, image_root=cfg.image_root, format=cfg.format,
                               batch_size=cfg.batch_size, **_model_options(cfg), **_batch_options(cfg),
                               warn=events.warn, id_field=cfg.id_field, store_dtype=cfg.store_dtype,
                               shard_size=cfg.shard_size, devices=devices if len(devices) > 1 else None,
                               cache=_cache_dir(cfg, state.work.parent),
                               # humans get the engine's own tqdm bar (rate + ETA), machines events
                               progress=not (cfg.quiet or events.log_json),
                               on_progress=json_progress(events, "extract") if events.log_json else None)
    return _finish_extract(cfg, state, events, store, summary, t0)


def _extract_launched(cfg: RunConfig, events: Events, data, store: Path, group) -> tuple:
    """Rank 0 of a torchrun-launched run: its own range, then wait for the others; a range still not
    committed after that (a shard set aside as corrupt since) is extracted here, on this device."""
    import json

    from ..extract.ranks import rank_range

    t0 = time.perf_counter()
    events.emit("stage_start", stage="extract", ranks=group.world)
    summary = _extract_range(cfg, events, data, store, 0, group.world, progress=not (cfg.quiet or events.log_json),
                             on_progress=json_progress(events, "extract") if events.log_json else None)
    group.wait_all()
    n = int(json.loads((store / "manifest.json").read_text())["provenance"]["data"]["records"])
    for r in range(1, group.world):
        lo, hi = rank_range(n, r, group.world)
        if _committed_records(store, r) < hi - lo:
            _extract_range(cfg, events, data, store, r, group.world, progress=False)
    return store, summary, t0


def _committed_records(store: Path, rank: int) -> int:
    """Records of rank ``rank``'s range covered by committed shards of ``store``."""
    import json

    shards = json.loads((store / "manifest.json").read_text())["shards"]
    return sum(int(sh["range"][1]) - int(sh["range"][0]) for sh in shards
               if sh["name"].startswith(f"rank{rank:03d}-") and "range" in sh)


def _finish_extract(cfg: RunConfig, state: RunState, events: Events, store: Path, summary: dict, t0: float):
    """The finished store as a source; refused when no sample has a representation; the stage marked done."""
    from ..store import StoreSource

    src = StoreSource(store)
    if src.n == 0:
        from ..data.skiplog import summarize_skip_log

        published = _publish_skips(state)
        raise RunError(f"no sample of {cfg.data} produced a representation (skipped: "
                       f"{summarize_skip_log(published)}; every one is listed in {published}). ScalSelect needs "
                       f"samples with images: check the image paths and --image-root, or that the dataset is not "
                       f"text-only")
    state.add_time("extract", time.perf_counter() - t0)
    cache = _add_cache_counts(state, summary.get("cache"))
    state.mark("extract", n=int(src.n), d=int(src.d), shards=len(src.shards), cache=cache)
    events.emit("stage_done", stage="extract", n=int(src.n), d=int(src.d),
                shards_written=summary.get("shards_written"), shards_resumed=summary.get("shards_resumed"),
                cache=cache)
    return src


def _restart_store_of_other_world(cfg: RunConfig, state: RunState, events: Events, store: Path, world: int) -> None:
    """A partial store extracted by another number of processes is started again through the cache.

    Its ranks own other record ranges than this run's, so its shards cannot be resumed (nor mixed
    with new ones). With the representation cache (the default) every vector it holds is in the cache,
    so re-extracting costs lookups; without one the run is refused rather than throwing work away.
    """
    import json
    import shutil

    try:
        old = json.loads((store / "manifest.json").read_text()).get("provenance", {}).get("world_size")
    except (OSError, ValueError):
        return
    if old is None or int(old) == world:
        return
    cache = _cache_dir(cfg, state.work.parent)
    if cache is None:
        raise RunError(f"{store} holds a partial extraction by {old} process(es) and this run has {world} "
                       f"(--devices {cfg.devices}); their record ranges differ, so it cannot be resumed and "
                       f"there is no --cache to re-extract from. Rerun with {old} device(s) to resume it, or "
                       f"with --force to start over")
    events.warn(f"{store} holds a partial extraction by {old} process(es) and this run has {world}: their "
                f"record ranges differ, so the store is started again; samples already extracted are taken "
                f"from the representation cache {cache}")
    shutil.rmtree(store)
    state.forget("extract", "fit", "score")


def _add_cache_counts(state: RunState, counts: dict | None) -> dict | None:
    """This run's cache counts added to those of earlier attempts of the same extraction (a resume)."""
    if counts is None:
        return None
    before = state.data.setdefault("cache", {"reused": 0, "extracted": 0})
    total = {k: int(before.get(k, 0)) + int(counts[k]) for k in ("reused", "extracted")}
    state.data["cache"] = total
    return total


def _set_aside_failed_shard(exc: BaseException, state: RunState, events: Events) -> bool:
    """Take the run's store shard that failed its checksum off the manifest (files moved aside) and
    forget the stages built on it; False when ``exc`` is not about a shard of this run's store."""
    from ..store import MANIFEST, uncommit_shards

    store = _store_dir(state)
    name = getattr(exc, "shard", None)
    if name is None or not (store / MANIFEST).is_file():
        return False
    moved = uncommit_shards(store, [name])
    if not moved:
        return False
    events.warn(f"shard {name} of {store} is corrupt ({str(exc).split('. ')[0]}); moved its files aside "
                f"({', '.join(p.name for p in moved)}) and re-extracting only that shard, then redoing the fit "
                f"and scores (every other shard is kept)")
    state.forget("extract", "fit", "score")
    return True


def _publish_skips(state: RunState) -> Path:
    """Copy the extraction's skip log (``.scalselect/reps/skipped.jsonl``, appended to as shards are
    extracted) to ``<out>/skipped.jsonl``, where the outputs are documented, atomically (a reader
    never sees half of it); returns that path."""
    published = state.work.parent / "skipped.jsonl"
    live = _store_dir(state) / "skipped.jsonl"
    atomic_write_bytes(published, live.read_bytes() if live.exists() else b"")
    return published


def _preflight(cfg: RunConfig, out: Path, events: Events, plan_only: bool, source=None, started=None):
    """The plan of this run. ``plan_only`` (``--plan``) calibrates on the data and model (seconds of
    real extraction); the check before a real run does not, and budgets time by FLOPs and disk by layout."""
    from ..data import count_records
    from ..data.sources import open_dataset
    from ..plan import PlanError, calibrate, estimate_run, startup_seconds

    from ..scoring import resolve_budget

    source = open_dataset(source if source is not None else cfg.data, cfg.format)
    n = count_records(source)
    try:  # the budget the run will use, read the one way resolve_budget reads it
        frac = resolve_budget(cfg.budget, n) / max(n, 1)
    except ValueError:
        frac = 0.16
    cal, startup = None, 0.0
    if plan_only:
        startup = startup_seconds(started)
        if cfg.quiet or cfg.log_json:
            quiet_libraries()  # the calibration loads the model: no progress bars on a JSON stdout
        cal = calibrate(cfg.model, source, image_root=cfg.image_root, format=cfg.format, id_field=cfg.id_field,
                        source_field=cfg.source_field, batch_size=cfg.batch_size, extract_options=_batch_options(cfg),
                        model_options=_model_options(cfg))
    try:
        est = estimate_run(n, model=cfg.model, device=cfg.device, dtype=cfg.dtype, store_dtype=cfg.store_dtype,
                           batch_size=cfg.batch_size, layer=cfg.layer, out_dir=out,
                           data_bytes=source.total_bytes(), budget_fraction=frac, solver=cfg.solver,
                           calibration=cal, shard_size=cfg.shard_size, cache_dir=_cache_dir(cfg, out),
                           html=cfg.html, startup_seconds=startup, processes=_extract_processes(cfg))
    except PlanError as exc:
        raise RunError(str(exc)) from exc
    est.assumptions["input"] = (f"{source.container}, {len(source.files)} file(s)" if source.files
                                else f"{source.container} object")
    return est


def _extract_processes(cfg: RunConfig) -> int:
    """How many processes extract (the plan divides the extraction across them): the ranks torchrun
    launched, else one per ``--devices`` entry."""
    from ..extract.launch import parse_devices
    from ..extract.ranks import env_rank

    world = env_rank()[1]
    return world if world > 1 else len(parse_devices(cfg.devices, cfg.device))


def _resolve_auto_device(cfg: RunConfig) -> RunConfig:
    """``--device auto`` / ``--devices auto`` / ``--dtype auto`` made concrete before anything depends
    on them.

    auto devices = every GPU torch sees (one extraction process each), else one CPU process; the
    device is then their kind (``cuda`` or ``cpu``: how many processes ran does not change the
    representations, so it is not part of the fingerprints), or the one device. auto dtype = bf16 on a
    GPU that supports it, else fp32. The fingerprints, the plan and the report then name what
    actually ran, so a run resumed on a machine that resolves differently is refused instead of mixing
    precisions.
    """
    from ..extract.launch import parse_devices
    from ..extract.ranks import env_rank

    if env_rank()[1] > 1:  # launched by torchrun: this process is one rank (run.launched)
        if str(cfg.devices).lower() != "auto":
            raise RunError(f"--devices {cfg.devices} under torchrun: each launched process is one rank already "
                           f"(on cuda:LOCAL_RANK); leave --devices at auto, or run without torchrun")
        devices = ["cuda" if cfg.device in (None, "auto") and _cuda_count() else cfg.device or "auto"]
    else:
        devices = parse_devices(cfg.devices, cfg.device)
    changes = {}
    if len(devices) > 1 or str(cfg.devices).lower() != "auto":
        changes["devices"] = _devices_text(devices)
    if len(devices) > 1:
        changes["device"] = devices[0].split(":")[0]
    elif str(cfg.devices).lower() != "auto" and cfg.device in (None, "auto"):
        changes["device"] = devices[0]  # --devices cuda:1: that one GPU
    if any(getattr(cfg, k) != v for k, v in changes.items()):
        cfg = dataclasses.replace(cfg, **changes)
    if cfg.device not in (None, "auto") and str(cfg.dtype).lower() != "auto":
        return cfg
    from ..extract.model import resolve_device, resolve_dtype

    device = resolve_device(cfg.device) if cfg.device in (None, "auto") else cfg.device
    dtype = cfg.dtype
    if str(dtype).lower() == "auto":
        import torch

        dtype = "bf16" if resolve_dtype("auto", device) == torch.bfloat16 else "fp32"
    return dataclasses.replace(cfg, device=device, dtype=dtype)


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _devices_text(devices: list[str]) -> str:
    """The canonical ``--devices`` value of a device list: ``cpu:N`` or ``cuda:0,cuda:3``."""
    if devices[0] in ("cpu", "auto", "cuda"):
        return devices[0] if devices[0] != "cpu" else f"cpu:{len(devices)}"
    return ",".join(devices)


def run(cfg: RunConfig, events: Events | None = None, plan_only: bool = False, report_extra=None):
    """Run (or resume) the whole job. Returns a :class:`RunResult` (or the plan with ``plan_only``).

    Raises
    ------
    RunError
        Bad configuration, fingerprints that do not match the checkpoints, a run that cannot fit,
        a full disk. Data and model problems surface as the data/extract layers' errors
        (``DatasetError``, ``UnsupportedModelError``, ...), whose messages name the file and sample.
    """
    if not isinstance(cfg, RunConfig):  # a dict or None would fail deep inside with an AttributeError
        raise TypeError(f"run(cfg): cfg must be a RunConfig, got {type(cfg).__name__}; build one with "
                        f"scalselect_fast.run.make_config(model=..., data=..., out=..., ...) or "
                        f"make_config('run.toml')")
    started = time.perf_counter()
    cfg.validate()
    cfg = _resolve_auto_device(cfg)
    events = events or Events(cfg.quiet, cfg.log_json)
    out = Path(cfg.out).expanduser()
    from ..data.sources import open_dataset

    # a file, directory, glob, URL or list; a missing input or a glob matching nothing is a DatasetError
    source = open_dataset(cfg.data, cfg.format)
    data = source.label
    # The run writes several files and a work folder into --out: it may hold no input (the model may
    # live there, as the demo's does: only the dataset is at risk of a same-named output).
    refuse_overwrite([out], [p for p in source.input_paths() if "://" not in p])
    model_fp = model_fingerprint(cfg.model)
    from ..extract.model import check_model

    check_model(cfg.model, cfg.layer)  # model type and --layer, before any stage (no weights loaded)
    from ..data import DatasetError, count_records
    from ..data.readers import check_unique_ids, format_mismatch_hint
    from ..data.sources import containers

    try:
        if containers()[source.container].ids is not None:
            # a duplicate id stops the run here, before any model work; the same pass counts the records
            check_unique_ids(source, id_field=cfg.id_field)
        n_records = count_records(source)
    except DatasetError as exc:  # a pretty-printed JSON list under --format jsonl: say so
        hint = format_mismatch_hint(source) if exc.reason == "malformed" else ""
        if not hint:
            raise
        raise DatasetError(f"{exc}{hint}", reason=exc.reason, path=exc.path, index=exc.index, line=exc.line,
                           sample_id=exc.sample_id) from None
    if n_records == 0:
        raise RunError(f"--data {data} is empty (no records); nothing to select from. Pass the dataset file "
                       f"that holds the samples")
    from ..scoring import resolve_budget

    try:  # a budget above the records is known now, before any stage (skips can only lower the usable)
        resolve_budget(cfg.budget, n_records)
    except ValueError as exc:
        _refuse_if_no_record_is_usable(source, cfg)  # then that is the problem, not the budget
        raise RunError(f"--budget {cfg.budget}: {exc}") from None
    if cfg.quota:
        _check_quota_fields(cfg, events, data)
    if plan_only:
        return _preflight(cfg, out, events, True, source, started=started)
    _check_out_dir(out)
    from .launched import launched_group

    group = launched_group()  # None unless torchrun launched several ranks
    if group is not None and group.rank != 0:
        return _run_as_rank(cfg, events, out, source, group)
    # one run per --out: a second one would interleave skipped.jsonl lines and contradict the report
    with exclusive_lock(out / RUN_LOCK, f"--out {out}"):
        return _run_locked(cfg, events, out, source, model_fp, report_extra, group)


def _rank_device(cfg: RunConfig) -> str:
    """The model device of this rank under torchrun: ``cuda:LOCAL_RANK`` for ``cuda``, else as set."""
    if cfg.device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', os.environ.get('RANK', '0')))}"
    return cfg.device


def _extract_range(cfg: RunConfig, events: Events, source, store: Path, rank: int, world: int, progress: bool,
                   on_progress=None) -> dict:
    """Rank ``rank`` of ``world``'s records into the run's store (resumes after its committed shards)."""
    from ..extract import extract_to_store

    return extract_to_store(cfg.model, source, store, image_root=cfg.image_root, format=cfg.format,
                            batch_size=cfg.batch_size, **{**_model_options(cfg), "device": _rank_device(cfg)},
                            **_batch_options(cfg), warn=events.warn, id_field=cfg.id_field,
                            store_dtype=cfg.store_dtype, shard_size=cfg.shard_size, rank=rank, world_size=world,
                            cache=_cache_dir(cfg, Path(cfg.out).expanduser()), progress=progress,
                            on_progress=on_progress)


def _run_as_rank(cfg: RunConfig, events: Events, out: Path, source, group) -> None:
    """A rank other than 0 of a torchrun-launched run: wait for rank 0 to set the run up, extract this
    rank's records into the run's store, wait for every rank, and return None (rank 0 selects)."""
    if group.release(False):
        _extract_range(cfg, events, source, out / WORK / "reps", group.rank, group.world, progress=False)
    group.wait_all()
    events.info(f"rank {group.rank} of {group.world}: extraction done; rank 0 fits, scores and writes the "
                f"selection to {out}")
    return None


def _check_quota_fields(cfg: RunConfig, events: Events, label: str) -> None:
    """Refuse a --quota field that no record has (every record would fall in one group, ``<none>``, and
    the quota would mean nothing); warn when only some records lack it. One pass over the raw records
    (only the id, source and quota columns of Arrow inputs), made only when --quota is given."""
    from ..data import record_source
    from ..postselect import PostSelectError, parse_quota

    fields = list(dict.fromkeys(parse_quota(q).field for q in cfg.quota))
    missing = dict.fromkeys(fields, 0)
    n = 0
    for rec, _sid in _raw_records(cfg, [f for f in fields if f != "source"]):
        n += 1
        r = rec if isinstance(rec, dict) else {}
        for f in fields:
            if (record_source(r, cfg.source_field) if f == "source" else r.get(f)) is None:
                missing[f] += 1
    for f, m in missing.items():
        if n and m == n:
            raise PostSelectError(f"--quota {f}=...: no record of {label} has a field {f!r} (all {n} lack it), so "
                                  f"every record would be one group; check the field name against the dataset's "
                                  f"records" + (" ('source' also reads dataset, data_source, task, task_type, "
                                               "category)" if f == "source" and cfg.source_field is None else ""))
        if m:
            events.warn(f"--quota {f}=...: {m} of {n} records have no field {f!r}; they form the group '<none>', "
                        f"bounded by the '*' rule if there is one")


def _refuse_if_no_record_is_usable(source, cfg: RunConfig) -> None:
    """Raise read_dataset's own :class:`DatasetError` (naming the skip reasons and the first skipped
    record) when no record of ``source`` parses into a sample; return at the first one that does.

    Called only when a run is refused anyway, so its reading pass costs nothing on the way to success.
    """
    from ..data import read_dataset

    for _sample in read_dataset(source, image_root=cfg.image_root, format=cfg.format, skip_log=DiscardSkips()):
        return


class _InputsUnchanged:
    """The dataset files' digests when the run started (read with its data fingerprint); called before
    the outputs are committed, it refuses them if a file was edited, added or removed since, as the
    selected dataset copies records that must be the ones the representations were computed from."""

    def __init__(self, cfg: RunConfig, source):
        self.cfg = cfg
        self.start = source.read_digests if source.read_digests is not None else source.file_digests()

    def __call__(self) -> None:
        from ..data import DatasetError
        from ..data.sources import open_dataset

        cfg = self.cfg
        try:
            now_source = open_dataset(cfg.data, cfg.format)
            added = sorted({f.path for f in now_source.files} - set(self.start))
            removed = sorted(set(self.start) - {f.path for f in now_source.files})
            now = now_source.file_digests() if not (added or removed) else {}
        except DatasetError as exc:  # a file gone or unreadable now
            raise RunError(f"--data {cfg.data}: an input file cannot be read any more ({exc}); it changed while "
                           f"this run used it, so the selection was not written. Restore it, or rerun with "
                           f"--force to start over on the new data") from None
        edited = sorted(p for p in self.start if p in now and now[p] != self.start[p])
        for how, paths in (("edited", edited), ("added", added), ("removed", removed)):
            if paths:
                more = f" (and {len(paths) - 1} more)" if len(paths) > 1 else ""
                raise RunError(f"{paths[0]}{more} was {how} while this run used --data {cfg.data}: the selected "
                               f"records would not be the text their representations were computed from, so the "
                               f"selection was not written. Rerun with --force to start over on the new data (or "
                               f"restore the file and rerun the same command)")


def _run_locked(cfg: RunConfig, events: Events, out: Path, source, model_fp: str, report_extra, group=None):
    fps = stage_fingerprints(cfg, model_fp, data_fingerprint(source, cfg.image_root))
    inputs_unchanged = _InputsUnchanged(cfg, source) if source.dataset is None else None
    if cfg.plan_check:
        est = _preflight(cfg, out, events, False, source)
        if not est.ok:
            raise RunError("this run cannot fit on this machine:\n  - " + "\n  - ".join(est.problems)
                           + "\n(see `scalselect run --plan ...`; --no-plan-check skips this check)")
    t_run = time.perf_counter()
    events.emit("run_start", out=str(out), fingerprints=fps)
    _remove_stale_temps(out)
    if cfg.quiet or cfg.log_json:
        quiet_libraries()
    try:
        stage = "setup"
        state = RunState(out, fps, cfg.force, events, cache=_cache_dir(cfg, out) is not None)
        if group is not None:  # torchrun: the folder is ready, the other ranks may write their ranges
            store = _store_dir(state)
            extract = not (state.done("extract") and (store / "manifest.json").exists())
            if extract:
                _restart_store_of_other_world(cfg, state, events, store, group.world)
            group.release(extract)
            if not extract:
                group.wait_all()
        for attempt in (1, 2):
            try:
                stage = "extract"
                try:
                    src = _stage_extract(cfg, state, events, source, group)
                except DatasetError as exc:
                    if exc.reason != "empty":
                        raise
                    # every record was refused while reading: name the published copy of the log
                    published, live = _publish_skips(state), str(_store_dir(state) / "skipped.jsonl")
                    msg = str(exc)
                    msg = (msg.replace(live, str(published)) if live in msg
                           else f"{msg}; every one is listed in {published}")
                    raise DatasetError(msg, reason=exc.reason, path=exc.path) from None
                _publish_skips(state)
                stage = "fit"
                sub = _stage_fit(cfg, state, events, src)
                stage = "score"
                scores = _stage_score(cfg, state, events, src, sub)
                break
            except StoreError as exc:
                # a shard that rotted without its file changing fails its CRC only when read: re-extract
                # it (once) and redo what depended on it, instead of asking for a manual repair
                if attempt == 2 or not _set_aside_failed_shard(exc, state, events):
                    raise
        stage = "select"
        skipped_out = out / "skipped.jsonl"  # published after the extraction stage (_publish_skips)
        with loaded_objects_frozen():  # (the extraction freezes its own, the model loaded by then)
            result = _stage_select(cfg, state, events, src, sub, scores, out, skipped_out, report_extra,
                                   before_commit=inputs_unchanged)
    except OSError as exc:
        if _disk_full(exc):
            where = exc.filename or f"under {out}"
            raise RunError(
                f"disk full in the '{stage}' stage while writing {where} ({exc.strerror}); nothing partial "
                f"was kept (files are written to temporary names and renamed). Free space on {out} or "
                f"choose another --out, then rerun the same command: finished stages and shards are "
                f"reused") from exc
        raise
    events.emit("done", seconds=round(time.perf_counter() - t_run, 3), selected=str(result.selected_path),
                manifest=str(result.manifest_path), report=str(result.report_json),
                report_html=None if result.report_html is None else str(result.report_html),
                n_selected=result.n_selected)
    return result

