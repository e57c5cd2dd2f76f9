"""The extraction loop: samples -> one vector each -> the representation store, shard by shard.

:func:`extract_representations` is the streaming core (an iterator of ``(ids, vectors)`` per batch,
for pipelines that own their data loading); :func:`extract_to_store` wraps it with the dataset
reader, deterministic shard ranges, resume, per-rank slicing and ``skipped.jsonl``. Both take their
settings as one :class:`~.options.ExtractOptions` (or as keyword arguments that build it).

The jobs around the loop live in their own modules: :mod:`.batch` (one batch: encode, forward,
pool), :mod:`.ranks` (which records a rank owns), :mod:`.repair` (which committed shards must be
redone) and :mod:`.cache_lookup` (the representation cache seen from the loop).

Shard ranges. Records are numbered by their position in the dataset file (``Sample.index``, counting
records the reader skips). With ``world_size`` W and N records, rank r owns records
``[r*N//W, (r+1)*N//W)``, cut into consecutive shards of ``shard_size`` records; the shard record in
the manifest stores its ``range``. A shard is committed only when its whole range is processed, so a
rerun skips the committed ranges and redoes the rest; since ranks take contiguous ranges and shard
names sort by rank, the merged store has the same rows in the same order as a one-process run.

Skipped samples never vanish: text-only samples, unreadable images, over-long samples and samples
whose instruction tokens see no visual token are recorded in ``<store>/skipped.jsonl`` (one line per
sample: id, index, reason code, detail) and counted in the shard record.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..atomic import crashpoint
from ..gcfreeze import loaded_objects_frozen
from ..lock import exclusive_lock
from .batch import (REASON_ENCODE, REASON_NO_ATTENTION, REASON_TEXT_ONLY, REASON_TOO_LONG, STAGE, EncodePool,
                    batches, encode_and_pool, image_loader_for, pipelined)
from .cache import sample_key
from .cache_lookup import cache_batch, merge_hits, open_cache
from .launch import extract_on_devices, plan_devices
from .model import VLM, load_vlm
from .options import ExtractOptions, extract_options
from .ranks import RangeSkipLog, env_rank, rank_device, rank_range
from .repair import ImagesDigest, repair_shards, repair_store

log = logging.getLogger(__name__)

#: records whose cache keys are looked up together (their pinned image bytes are held meanwhile)
LOOKUP_CHUNK = 256
#: shards taken whole from the cache that may wait for one manifest update (a crash redoes them: from
#: the cache again, at lookup cost)
DEFERRED_SHARDS = 16
#: the context of the stored rows' content keys under ``cache=None`` (with a cache, the cache's own keys
#: are stored): the keys only have to match themselves when the run's output is checked
#: (:mod:`scalselect_fast.output_check`), so no model digest is needed
STORE_KEY_CONTEXT = b"scalselect-store-keys/1"

# encode_and_pool, repair_store, rank_range and the reason codes moved to their own modules; they are
# still importable from here
__all__ = ["extract_representations", "extract_to_store", "ExtractOptions", "encode_and_pool", "data_provenance",
           "repair_store", "rank_range", "REASON_TEXT_ONLY", "REASON_TOO_LONG", "REASON_NO_ATTENTION",
           "REASON_ENCODE"]


def extract_representations(model, samples: Iterable, batch_size: int | None = None, *,
                            options: ExtractOptions | None = None, skip_log=None, **settings
                            ) -> Iterator[tuple[list[str], np.ndarray]]:
    """Yield ``(ids, vectors)`` for each batch of ``samples`` (the ScalSelect representation).

    Parameters
    ----------
    model : str, PathLike or VLM
        Checkpoint directory, or a :class:`~.model.VLM` from :func:`~.model.load_vlm` (then ``layer``,
        ``dtype``, ``device``, ``device_map`` and ``max_length`` are taken from it).
    samples : iterable of Sample, or datasets.Dataset / IterableDataset
        ``scalselect_fast.data.Sample`` objects (or anything with ``id``, ``images`` = paths,
        ``EmbeddedImage`` or PIL images, ``messages`` = ``[{"role", "content"}]`` with one
        ``<image>`` per image); a Hugging Face ``datasets`` object is read with
        :func:`~scalselect_fast.data.read_dataset`.
    batch_size : int, optional
        Samples per forward pass (default 8; the one setting also taken by position).
    options : ExtractOptions, optional
        The settings (see :class:`~.options.ExtractOptions` for each one, its constraints and
        default); the store-writing ones are ignored here.
    skip_log : SkipLog, optional
        Where skipped samples are recorded; without it each skip is logged as a warning.
    **settings
        Fields of :class:`~.options.ExtractOptions` (``layer``, ``threshold``, ``instruction``,
        ``dtype``, ``device``, ``pool_impl``, ``num_workers``, ``max_image_pixels``, ...) replacing
        those of ``options``.

    Yields
    ------
    ids : list of str
        Ids of the samples of this batch that produced a vector, in input order.
    vectors : ndarray, float32, shape (len(ids), hidden_size)

    Raises
    ------
    ExtractError
        A setting outside its constraints (before any model is loaded).
    """
    if batch_size is not None:
        settings["batch_size"] = batch_size
    opts = extract_options(options, settings, "extract_representations")
    from ..data.hf import is_hf_object

    if is_hf_object(samples):  # a datasets.Dataset / IterableDataset: read it like a file
        from ..data import read_dataset

        samples = read_dataset(samples, skip_log=skip_log)
    vlm = _load(model, opts, opts.device)

    def on_skip(sk):
        if skip_log is not None:
            skip_log.add(sk.sample_id, sk.index, sk.reason, sk.detail, line=sk.line, stage=STAGE)
        else:
            log.warning("skipped %s (%s): %s", sk.sample_id, sk.reason, sk.detail)

    pool = EncodePool(vlm.encoder, opts.image_loader or image_loader_for(opts.max_image_pixels), opts.num_workers)
    try:
        items = (("batch", b) for b in batches(samples, int(opts.batch_size)))
        for _, res in pipelined(vlm, items, pool, opts):
            for sk in res.skipped:
                on_skip(sk)
            yield res.ids, res.vectors
    finally:
        pool.close()


def _load(model, opts: ExtractOptions, device) -> VLM:
    return load_vlm(model, layer=opts.layer, dtype=opts.dtype, device=device, device_map=opts.device_map,
                    max_length=opts.max_length, roles=opts.roles, vision_tokens=opts.vision_tokens,
                    pixels=opts.pixels)


def data_provenance(data, format: str = "auto") -> dict:
    """Where the data a store was extracted from came from: its files, total size and digest.

    A dict (the store provenance's ``"data"`` entry), not the run's one-string
    :func:`scalselect_fast.run.fingerprints.data_fingerprint`, which also covers the image root.

    ``data`` is anything :func:`~scalselect_fast.data.sources.open_dataset` accepts; the digest is
    :meth:`~scalselect_fast.data.sources.DataSource.digest` (shared with the run's fingerprint).
    """
    from ..data.sources import open_dataset

    source = open_dataset(data, format)
    paths = source.input_paths()
    where = {"path": paths[0]} if source.single and paths else {"paths": paths, "label": source.label}
    return {**where, "container": source.container, "bytes": source.total_bytes(), "sha256": source.digest()}


def extract_to_store(model, data: str | os.PathLike, out: str | os.PathLike, *,
                     options: ExtractOptions | None = None, **settings) -> dict:
    """Extract every sample of a dataset file into a representation store (resumable, per-rank).

    Parameters
    ----------
    model : str, PathLike or VLM
        Checkpoint directory or a loaded :class:`~.model.VLM`.
    data : path
        Dataset: a file (LLaVA JSON, ShareGPT JSON, JSONL, Parquet, ...), directory, glob, URL, list
        of those, or a ``datasets`` object (see :func:`scalselect_fast.data.sources.open_dataset`).
    out : path
        Store directory; ``skipped.jsonl`` is written inside it.
    options : ExtractOptions, optional
        The settings (see :class:`~.options.ExtractOptions`: those of
        :func:`extract_representations` plus ``image_root``, ``format``, ``store_dtype``,
        ``shard_size``, ``rank``, ``world_size``, ``force``, ``progress``, ``on_progress``, ``warn``,
        ``id_field`` and ``cache``).
    **settings
        Fields of :class:`~.options.ExtractOptions` replacing those of ``options``.

    ``roles``, ``vision_tokens`` and ``pixels`` are recorded in the store's provenance, so a store made
    with other choices is refused; a named ``id_field`` is recorded too. With ``cache``, every record
    is looked up by its content first and only the misses reach the model; new vectors are added to
    it (shared safely between runs, datasets and concurrent processes).

    With several ``devices`` (``"cpu:2"``, ``"cuda:0,cuda:3"``, or ``"auto"`` on a multi-GPU machine),
    one process per device extracts its rank's records into this store and the call returns their
    summaries added up (:func:`~.launch.extract_on_devices`; a dying process raises
    :class:`~.launch.WorkerError` naming its device).

    Returns
    -------
    dict
        ``{"store", "rank", "world_size", "range", "rows", "skipped", "shards_written",
        "shards_resumed", "shards_redone"}`` for this process, and with ``cache``
        ``"cache": {"dir", "reused", "extracted"}`` (samples taken from the cache / run through the model).

    Raises
    ------
    ExtractError
        A setting outside its constraints (before the data is opened or a model loaded).

    Notes
    -----
    Resuming checks every committed shard first (see :func:`~.repair.repair_store`): a shard whose
    files are missing, fail their checksum, or whose images changed since it was written is extracted
    again.
    """
    from ..data import count_records
    from ..data.sources import open_dataset

    opts = extract_options(options, settings, "extract_to_store")
    devices = plan_devices(opts)  # several: one process each (see .launch); None: this process alone
    if devices is not None and len(devices) > 1:
        return extract_on_devices(model, data, out, devices, opts)
    if devices is not None and opts.devices not in (None, "auto"):
        opts = dataclasses.replace(opts, device=devices[0])  # --devices cuda:1: one process, on that GPU
    env_r, env_world = env_rank()
    rank = env_r if opts.rank is None else int(opts.rank)
    world = env_world if opts.world_size is None else int(opts.world_size)
    data = open_dataset(data, opts.format)  # resolved once: files sorted, container checked (DatasetError)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output {out} exists and is not a directory; choose another --out")
    with loaded_objects_frozen():  # the counting pass parses every record too
        n_records = count_records(data, opts.format)
    lo, hi = rank_range(n_records, rank, world)
    vlm = _load(model, opts, rank_device(opts.device, opts.device_map, rank, world))
    image_root = opts.image_root
    provenance = {
        "kind": "scalselect-extract",
        "model": {"path": str(Path(vlm.path).resolve()), "type": vlm.family, "depth": vlm.depth},
        "layer": vlm.layer, "threshold": float(opts.threshold), "dtype": str(vlm.dtype).replace("torch.", ""),
        "instruction": opts.instruction, "max_length": vlm.max_length, "max_image_pixels": opts.max_image_pixels,
        **vlm.options(),  # roles, vision_tokens, pixels: another choice is refused on resume
        "data": {**data_provenance(data, opts.format),
                 "image_root": str(Path(image_root).resolve()) if image_root else None,
                 "format": opts.format, "records": n_records},
        "shard_size": int(opts.shard_size), "world_size": world,
    }
    if opts.id_field is not None:  # only when named: stores made before the option still resume
        provenance["id_field"] = opts.id_field
    warn = opts.warn or log.warning
    rep_cache = None
    if opts.cache is not None:
        rep_cache = open_cache(opts.cache, vlm, options=opts, warn=warn)
    out.mkdir(parents=True, exist_ok=True)
    # one writer per store (per rank: ranks write disjoint shards of one store)
    lock = out / (".extract.lock" if world == 1 else f".extract-rank{rank:03d}.lock")
    with exclusive_lock(lock, f"store {out}" + (f" (rank {rank})" if world > 1 else "")), loaded_objects_frozen():
        return _extract_locked(vlm, data, out, provenance, opts, _Slice(rank, world, lo, hi), warn, rep_cache)

@dataclass(frozen=True)
class _Slice:
    """This process's part of the job: rank ``rank`` of ``world`` owns records ``[lo, hi)``."""

    rank: int
    world: int
    lo: int
    hi: int


def _extract_locked(vlm, data, out: Path, provenance: dict, opts: ExtractOptions, sl: _Slice, warn,
                    cache) -> dict:
    """The store job once the store is locked: plan the shards, then extract the ones to do in order."""
    from ..data import SkipLog, read_dataset
    from ..store import StoreWriter

    writer = StoreWriter(out, d=vlm.hidden_size, dtype=opts.store_dtype, provenance=provenance,
                         prefix="shard" if sl.world == 1 else f"rank{sl.rank:03d}-shard", force=opts.force)
    skip_path = out / "skipped.jsonl"
    if opts.force and skip_path.exists() and not writer.committed():
        skip_path.unlink()  # a discarded store's skip log must not leak into the new run
    ranges, todo, resumed, redone = _plan_shards(writer, out, data, opts, sl, warn)
    summary = {"store": str(out), "rank": sl.rank, "world_size": sl.world, "range": [sl.lo, sl.hi], "rows": 0,
               "skipped": 0, "shards_written": 0, "shards_resumed": resumed, "shards_redone": redone}
    if cache is not None:
        summary["cache"] = {"dir": str(cache.root), "reused": 0, "extracted": 0}
    if not todo:
        return summary
    # records in shards finished (earlier runs included)
    done_records = sum(b - a for (a, b) in ranges) - sum(b - a for (_, a, b) in todo)
    bar = None
    if opts.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sl.hi - sl.lo, initial=done_records, unit="sample", dynamic_ncols=True,
                   desc=f"extract{f' rank {sl.rank}' if sl.world > 1 else ''}", smoothing=0.1)

    with SkipLog(skip_path) as slog:
        reader_log = RangeSkipLog(slog, sl.lo, sl.hi, first=sl.rank == 0)
        first = todo[0][1]
        # from the first record to extract: a rank, or a resumed run, does not read the files before it
        stream = _Peekable(read_dataset(data, image_root=opts.image_root, format=opts.format, skip_log=reader_log,
                                        id_field=opts.id_field, start=first))
        job = _ShardJob(vlm, writer, opts, sl, todo, done_records, summary, cache, slog, reader_log, bar)
        pool = EncodePool(vlm.encoder, opts.image_loader or image_loader_for(opts.max_image_pixels),
                          opts.num_workers)
        try:
            for kind, res in pipelined(vlm, job.items(stream), pool, opts):
                if kind == "batch":
                    job.add_batch(res)
                else:
                    job.commit_shard(*res)
            job.finish()
        finally:
            pool.close()
    if bar is not None:
        bar.close()
    return summary


class _ShardJob:
    """One rank's remaining shards, extracted in order: the rows of the shard in progress, the cache
    keys of the records in flight, the progress shown, and the ``summary`` it fills in."""

    def __init__(self, vlm, writer, opts: ExtractOptions, sl: _Slice, todo: list, done_records: int,
                 summary: dict, cache, slog, reader_log: RangeSkipLog, bar):
        self.vlm, self.writer, self.opts, self.sl, self.todo = vlm, writer, opts, sl, todo
        self.summary, self.cache, self.slog, self.reader_log, self.bar = summary, cache, slog, reader_log, bar
        self.keys: dict[int, bytes | None] = {}  # record index -> cache key, for the misses in flight
        # record index -> content key, for every record in flight (stored beside its row)
        self.row_keys: dict[int, bytes | None] = {}
        self.key_context = cache.context_digest() if cache is not None else STORE_KEY_CONTEXT
        self.rows: list[np.ndarray] = []
        self.ids: list[str] = []
        self.row_index: list = []
        self.n_skip = 0
        self.uncommitted: list[dict] = []  # records of shards written, waiting for one manifest update
        self.pos = todo[0][1]  # next record index not yet shown on the progress bar
        # records in finished shards and the start of the shard in progress
        self.done_before = done_records
        self.shard_start = todo[0][1]

    def items(self, stream):
        """("batch", samples) for each todo shard's records, then ("end", shard); never across shards.

        With a cache, records found in it are not batched: they travel with the shard's end marker
        as ``(sample, vector or None)`` and are merged back in record order, with the number of the
        shard's records that may reach the model (misses with an image). Records are looked up ``LOOKUP_CHUNK`` at a time (one
        vectorised search and one read per cache batch file)."""
        batch_size = self.opts.batch_size
        for j, a, b in self.todo:
            batch: list = []
            images = ImagesDigest()
            hits: list = []
            pending: list = []  # (sample, key, pinned images) waiting for their lookup
            fresh = 0  # records of this shard that may reach the model
            while (s := stream.peek()) is not None and s.index < b:
                next(stream)
                if s.index < a:  # inside an already committed shard
                    continue
                if self.cache is None:
                    batch.append(self._keyed(s, images)[0])
                    fresh += 1
                else:
                    pending.append(self._keyed(s, images))
                    if len(pending) < LOOKUP_CHUNK:
                        continue
                    fresh += self._look_up(pending, hits, batch)
                    pending = []
                while len(batch) >= batch_size:
                    yield "batch", batch[:batch_size]
                    batch = batch[batch_size:]
            if pending:
                fresh += self._look_up(pending, hits, batch)
            while batch:
                yield "batch", batch[:batch_size]
                batch = batch[batch_size:]
            yield "end", (j, a, b, images, hits, fresh)

    def finish(self) -> None:
        """Commit the shards written and not yet committed, after their skips are on disk."""
        if self.uncommitted:
            self.slog.sync()
            self.writer.commit(self.uncommitted)
            self.uncommitted = []

    def _keyed(self, s, images: ImagesDigest) -> tuple:
        """``(s, key, pinned images)``; records ``s``'s images with the stats the key's reads took."""
        pinned: list = []
        stats: list = []
        if self.cache is not None:
            key = self.cache.key(s, pinned, stats)
        else:
            key = sample_key(self.key_context, s, pinned, stats)
        images.add(s, stats if key is not None else None)
        self.row_keys[s.index] = key
        # no lookup: extract the very bytes the stored key is made of, unless the caller's own image_loader
        # expects the paths (the rows are then read again: an image edited meanwhile has a key of its old
        # bytes, so the output check withholds it)
        if self.cache is None and key is not None and self.opts.image_loader is None:
            s.images = pinned
        return s, key, pinned

    def _look_up(self, pending: list, hits: list, batch: list) -> int:
        """Sort ``pending`` into cache hits and records to extract (appended to ``batch``); returns how
        many of those may reach the model. A text-only record is batched only to be skipped there as
        always: no model work, so a shard of hits and text-only records still counts as taken whole
        from the cache (its commit may wait, see :meth:`commit_shard`)."""
        fresh = 0
        for (s, key, pinned), (found, ok, vec) in zip(pending, self.cache.get_many([k for _, k, _ in pending])):
            if found:
                hits.append((s, vec if ok else None))
                continue
            self.keys[s.index] = key
            if key is not None:  # extract the very bytes the key was made of (see sample_key)
                s.images = pinned
            fresh += bool(s.images)
            batch.append(s)
        return fresh

    def add_batch(self, res) -> None:
        """Keep one pooled batch's rows, log its skips, feed the cache, show the progress."""
        for sk in res.skipped:
            self.slog.add(sk.sample_id, sk.index, sk.reason, sk.detail, line=sk.line, stage=STAGE)
        self.n_skip += len(res.skipped)
        if res.ids:
            self.rows.append(res.vectors)
            self.ids.extend(res.ids)
            self.row_index.extend(res.indices)
        if self.cache is not None:
            cache_batch(self.cache, self.keys, res, self.summary["cache"])
        if self.bar is not None:
            self.bar.update(max(res.max_index + 1 - self.pos, 0))
            self.pos = max(self.pos, res.max_index + 1)
            self.bar.set_postfix(rows=self.summary["rows"] + len(self.ids),
                                 skipped=self.summary["skipped"] + self.n_skip, refresh=False)
        if self.opts.on_progress is not None:
            self.opts.on_progress(self.done_before + max(res.max_index + 1 - self.shard_start, 0),
                                  self.sl.hi - self.sl.lo)

    def commit_shard(self, j: int, a: int, b: int, images: ImagesDigest, hits: list, fresh: int) -> None:
        """Write shard ``j`` (records ``[a, b)``): its rows with the cache hits merged in, its skips.

        A shard taken whole from the cache (``fresh == 0``) is written but committed later, with the
        next shard that ran the model, every ``DEFERRED_SHARDS`` shards, or at the end (:meth:`finish`):
        one manifest update and directory fsync for many, and redoing one after a crash costs only
        lookups. A shard that ran the model commits at once (with those waiting).
        """
        summary, cache = self.summary, self.cache
        # Records the reader itself refused (bad fields, images outside the root) count as skipped.
        self.n_skip += self.reader_log.count(a, b)
        if hits:
            self.n_skip += merge_hits(hits, self.rows, self.ids, self.row_index, self.slog, self.vlm.layer,
                                      self.opts.instruction)
            summary["cache"]["reused"] += len(hits)
        if cache is not None:
            cache.flush()  # before the shard commits: a vector the store holds is in the cache too
        mat = np.concatenate(self.rows) if self.rows else np.zeros((0, self.vlm.hidden_size), np.float32)
        keys = [self.row_keys.pop(i, None) for i in self.row_index]
        self.row_keys = {i: k for i, k in self.row_keys.items() if i >= b}  # the next shard's, read ahead
        self.uncommitted.append(self.writer.write_shard(
            mat, self.ids, index=j, commit=False, keys=keys, key_context=self.key_context,
            extra={"range": [a, b], "skipped": self.n_skip, "rank": self.sl.rank, "images": images.hexdigest(),
                   "image_files": images.files}))
        crashpoint("extract.shard")  # the tests kill here: a shard written, maybe not yet committed
        if fresh or cache is None or len(self.uncommitted) >= DEFERRED_SHARDS:
            self.finish()
        summary["rows"] += len(self.ids)
        summary["skipped"] += self.n_skip
        summary["shards_written"] += 1
        self.rows, self.ids, self.row_index, self.n_skip = [], [], [], 0
        if self.bar is not None:
            self.bar.update(max(b - self.pos, 0))
        self.done_before += b - a
        if self.opts.on_progress is not None:
            self.opts.on_progress(self.done_before, self.sl.hi - self.sl.lo)
        nxt = next((t for t in self.todo if t[0] > j), None)
        if nxt is not None:  # the next shard to do may follow committed ones (already counted)
            self.shard_start = self.pos = nxt[1]


def _plan_shards(writer, out: Path, data, opts: ExtractOptions, sl: _Slice, warn):
    """This rank's shard ranges and which of them to extract: ``(ranges, todo, resumed, redone)``.

    ``ranges`` are the ``[a, b)`` record ranges of its shards, ``todo`` the ``(index, a, b)`` of those
    not committed (or taken off the manifest by :func:`~.repair.repair_shards` because they are stale
    or damaged: ``redone`` names them), ``resumed`` counts the committed ones kept.
    """
    size = int(opts.shard_size)
    ranges = [(s, min(sl.hi, s + size)) for s in range(sl.lo, sl.hi, size)]
    committed = writer.committed()
    mine = {writer.shard_name(j): committed[writer.shard_name(j)] for j, (a, b) in enumerate(ranges)
            if committed.get(writer.shard_name(j), {}).get("range") == [a, b]}
    redone = repair_shards(out, mine, data, opts.image_root, opts.format, warn, opts.id_field) if mine else []
    committed = writer.committed()
    todo = []
    resumed = 0
    for j, (a, b) in enumerate(ranges):
        rec = committed.get(writer.shard_name(j))
        if rec is not None and rec.get("range") == [a, b]:
            resumed += 1
        else:
            todo.append((j, a, b))
    return ranges, todo, resumed, redone


class _Peekable:
    def __init__(self, it):
        self._it = iter(it)
        self._head = self._fill()

    def _fill(self):
        return next(self._it, None)

    def peek(self):
        return self._head

    def __iter__(self):
        return self

    def __next__(self):
        if self._head is None:
            raise StopIteration
        head, self._head = self._head, self._fill()
        return head
