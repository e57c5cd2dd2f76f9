"""The extraction loop: samples -> one vector each -> the representation store, shard by shard.

:func:`extract_representations` is the streaming core (an iterator of ``(ids, vectors)`` per batch,
for pipelines that own their data loading); :func:`extract_to_store` wraps it with the dataset
reader, deterministic shard ranges, resume, per-rank slicing and ``skipped.jsonl``.

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

import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ..data.images import DEFAULT_MAX_IMAGE_PIXELS
from ..lock import exclusive_lock
from . import roles as R
from .model import VLM, load_vlm

log = logging.getLogger(__name__)

__all__ = ["extract_representations", "extract_to_store", "encode_and_pool", "data_fingerprint", "repair_store",
           "rank_range", "REASON_TEXT_ONLY", "REASON_TOO_LONG", "REASON_NO_ATTENTION", "REASON_ENCODE"]

REASON_TEXT_ONLY = "text_only"
REASON_TOO_LONG = "too_long"
REASON_NO_ATTENTION = "no_instruction_attention"
REASON_ENCODE = "encode_error"
STAGE = "extract"


@dataclass
class _Skip:
    sample_id: str | None
    index: int | None
    reason: str
    detail: str
    line: int | None = None


@dataclass
class BatchResult:
    """Outputs of one batch: kept ids/vectors (input order) and the samples skipped in it."""

    ids: list[str]
    vectors: np.ndarray
    skipped: list[_Skip] = field(default_factory=list)
    n_inputs: int = 0
    max_index: int | None = None
    indices: list = field(default_factory=list)  # record index of each kept row (merging cache hits)


def _classify(err: R.SampleError) -> str:
    msg = str(err)
    if "text-only" in msg:
        return REASON_TEXT_ONLY
    if "exceed the maximum length" in msg:
        return REASON_TOO_LONG
    return REASON_ENCODE


def _encode_one(encoder, item, loader):
    """Encode one packed sample; return an :class:`~.model.Encoded` or a :class:`_Skip`."""
    from ..data import ImageError

    sid, idx, line, images, messages = item
    try:
        if not images:
            raise R.SampleError(f"sample {sid}: text-only sample (no image); no visual tokens to pool")
        pix = [p if not isinstance(p, (str, os.PathLike)) else loader(p) for p in images]
        return encoder.encode(sid, messages, pix)
    except ImageError as e:
        return _Skip(sid, idx, getattr(e, "reason", "image_unreadable"), f"sample {sid}: {e}", line)
    except R.SampleError as e:
        return _Skip(sid, idx, _classify(e), str(e), line)
    except R.ExtractError:
        raise  # a model/template problem, not this sample's: already says what to fix
    except (ValueError, TypeError, KeyError, IndexError) as e:  # the processor/tokenizer refused this sample
        where = f"record {idx}" + (f", line {line}" if line is not None else "")
        raise R.ExtractError(f"sample {sid} ({where}) could not be encoded: {type(e).__name__}: {e}; "
                              f"fix or remove that record and rerun (finished shards are kept)") from e


def _pack(s):
    # only what encoding needs travels to workers (not the raw record)
    return (str(s.id), getattr(s, "index", None), getattr(s, "line", None), list(s.images), s.messages)


_WORKER: dict = {}


def _worker_encode(item):
    return _to_wire(_encode_one(_WORKER["encoder"], item, _WORKER["loader"]))


# Encoded samples come back from the workers as numpy arrays, not torch tensors: pickling a CPU
# tensor goes through torch's shared-memory file descriptors, and in a process forked from a parent
# with live threads (a Dask client, progress monitors) that hung forever inside _share_fd_cpu_.
def _to_wire(res):
    if not hasattr(res, "image_inputs"):
        return res  # a _Skip
    import torch

    wire = {}
    for k, v in res.image_inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu()
            # numpy has no bfloat16: its bits travel as int16 and are viewed back
            v = ("bf16", v.view(torch.int16).numpy()) if v.dtype == torch.bfloat16 else ("t", v.numpy())
        wire[k] = v
    res.image_inputs = wire
    return res


def _from_wire(res):
    if not hasattr(res, "image_inputs"):
        return res
    import torch

    out = {}
    for k, v in res.image_inputs.items():
        if isinstance(v, tuple) and len(v) == 2 and v[0] in ("t", "bf16"):
            t = torch.from_numpy(v[1])
            v = t.view(torch.bfloat16) if v[0] == "bf16" else t
        out[k] = v
    res.image_inputs = out
    return res


class _EncodePool:
    """Encodes batches in ``workers`` forked processes (0 = in this process, when the batch is run).

    With workers, batch k+1 is encoded while the model runs batch k (see :func:`_pipelined`).
    """

    def __init__(self, encoder, loader, workers: int = 0):
        import multiprocessing as mp

        self.encoder, self.loader, self.workers, self.pool = encoder, loader, int(workers), None
        if self.workers > 0:
            if "fork" not in mp.get_all_start_methods():
                raise ValueError("num_workers > 0 needs the 'fork' start method (Linux); use num_workers=0")
            # workers inherit the encoder and the loader by fork (the loader may be a closure)
            _WORKER.update(encoder=encoder, loader=loader)
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            self.pool = mp.get_context("fork").Pool(self.workers)

    def submit(self, samples):
        items = [_pack(s) for s in samples]
        if self.pool is None:
            return None, items
        chunk = max(1, len(items) // (2 * self.workers))
        return self.pool.map_async(_worker_encode, items, chunksize=chunk), items

    def results(self, handle):
        fut, items = handle
        if fut is None:
            return [_encode_one(self.encoder, it, self.loader) for it in items]
        return [_from_wire(r) for r in fut.get()]

    def close(self):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None
            _WORKER.clear()


def _pool_encoded(vlm: VLM, samples: list, results: list, threshold, instruction, padding_side,
                  backend) -> BatchResult:
    """Forward + pooling for one batch whose samples were encoded into ``results``."""
    import torch

    from ..ops import instruction_attended_pool

    encoded = [r for r in results if not isinstance(r, _Skip)]
    kept = [s for s, r in zip(samples, results) if not isinstance(r, _Skip)]
    skipped = [r for r in results if isinstance(r, _Skip)]
    max_index = max((getattr(s, "index", -1) for s in samples), default=None)
    if not encoded:
        return BatchResult([], np.zeros((0, vlm.hidden_size), np.float32), skipped, len(samples), max_index)
    batch = vlm.collate(encoded, padding_side)
    cap = vlm.forward_layer(batch["inputs"])
    dev = cap.query.device
    roles = batch["roles"].to(dev)
    mask = batch["mask"].to(dev)
    qmask = torch.from_numpy(R.instruction_mask(batch["roles"].numpy(), instruction)).to(dev)
    with torch.inference_mode():
        pooled, valid = instruction_attended_pool(
            cap.query, cap.key, cap.hidden.to(dev), qmask, roles == R.VISUAL, mask, threshold=threshold,
            scale=cap.scaling, backend=backend, return_valid=True)
    pooled = pooled.float().cpu().numpy()
    valid = valid.cpu().numpy() & np.isfinite(pooled).all(axis=1)
    ids = []
    indices = []
    for s, ok in zip(kept, valid):
        if ok:
            ids.append(str(s.id))
            indices.append(getattr(s, "index", None))
        else:
            skipped.append(_Skip(str(s.id), getattr(s, "index", None), REASON_NO_ATTENTION,
                                 f"sample {s.id}: no {instruction!r} instruction token attends to a visual token "
                                 f"at layer {vlm.layer} (instruction text only before the image?)",
                                 getattr(s, "line", None)))
    skipped.sort(key=lambda k: (k.index if k.index is not None else -1))
    return BatchResult(ids, np.ascontiguousarray(pooled[valid]), skipped, len(samples), max_index, indices)


def encode_and_pool(vlm: VLM, samples: list, threshold: float = 0.9, instruction: str = "all",
                    padding_side: str = "right", backend: str = "auto",
                    image_loader: Callable | None = None) -> BatchResult:
    """Encode ``samples``, run the truncated forward once for the batch and pool.

    Parameters
    ----------
    vlm : VLM
    samples : list of Sample-like
        Objects with ``id``, ``images`` (paths or PIL images), ``messages`` and optionally ``index``.
    threshold, instruction, padding_side, backend
        See :func:`extract_representations`.

    Returns
    -------
    BatchResult
        ``vectors`` float32 (n_kept, D) in input order; ``skipped`` lists the samples without one.
    """
    from ..data import load_image

    loader = image_loader or load_image
    results = [_encode_one(vlm.encoder, _pack(s), loader) for s in samples]
    return _pool_encoded(vlm, samples, results, threshold, instruction, padding_side, backend)


def _pipelined(vlm, items, pool: _EncodePool, threshold, instruction, padding_side, backend):
    """Map ``("batch", samples)`` items to ``("batch", BatchResult)``, encoding one batch ahead.

    Other items (end-of-shard markers) pass through in order.
    """
    pending: list = []  # [(kind, payload, handle)], oldest first

    def n_batches():
        return sum(1 for p in pending if p[0] == "batch")

    for kind, payload in items:
        pending.append((kind, payload, pool.submit(payload) if kind == "batch" else None))
        # emit everything except the newest batch, which keeps encoding while the older one runs
        while pending and (n_batches() > 1 or pending[0][0] != "batch"):
            k, pl, h = pending.pop(0)
            yield (k, _pool_encoded(vlm, pl, pool.results(h), threshold, instruction, padding_side, backend)
                   if k == "batch" else pl)
    for k, pl, h in pending:
        yield (k, _pool_encoded(vlm, pl, pool.results(h), threshold, instruction, padding_side, backend)
               if k == "batch" else pl)


def _batches(samples: Iterable, batch_size: int):
    buf = []
    for s in samples:
        buf.append(s)
        if len(buf) == batch_size:
            yield buf
            buf = []
    if buf:
        yield buf


def _image_loader(max_image_pixels: int | None) -> Callable:
    from ..data import load_image

    return functools.partial(load_image, max_pixels=max_image_pixels)


def _check_max_pixels(max_image_pixels) -> None:
    if max_image_pixels is not None and (isinstance(max_image_pixels, bool) or int(max_image_pixels) < 1):
        raise R.ExtractError(f"max_image_pixels must be a positive number of pixels or None, "
                             f"got {max_image_pixels!r}")


def _check_args(batch_size, threshold, instruction, padding_side):
    # ExtractError (a ValueError): the CLI prints it as one line, API callers may catch ValueError
    if int(batch_size) < 1:
        raise R.ExtractError(f"batch_size must be >= 1, got {batch_size}")
    if not 0.0 < float(threshold) <= 1.0:
        raise R.ExtractError(f"threshold must be in (0, 1], got {threshold}")
    if instruction not in ("all", "user"):
        raise R.ExtractError(f"instruction must be 'all' or 'user', got {instruction!r}")
    if padding_side not in ("left", "right"):
        raise R.ExtractError(f"padding_side must be 'left' or 'right', got {padding_side!r}")


def extract_representations(model, samples: Iterable, batch_size: int = 8, layer: int = 0,
                            threshold: float = 0.9, instruction: str = "all", dtype="fp32",
                            device: str | None = "auto", device_map=None, max_length: int | None = None,
                            padding_side: str = "right", backend: str = "auto", skip_log=None,
                            num_workers: int = 0, image_loader: Callable | None = None, roles: str | None = None,
                            vision_tokens: str | None = None, pixels: str | None = None,
                            max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
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
    batch_size : int
        Samples per forward pass.
    layer : int
        Decoder layer ℓ whose attention selects the visual tokens; vectors are the mean of the kept
        tokens' hidden states at the output of layer ℓ (``hidden_states[ℓ+1]``).
    threshold : float in (0, 1]
        Cumulative attention mass of the kept visual tokens.
    instruction : {"all", "user"}
        Attention rows averaged: every non-visual, non-answer token (default), or user text only.
    dtype : {"bf16", "fp16", "fp32"}
    device : {"auto", "cpu", "cuda"}
    device_map : optional, passed to ``from_pretrained``.
    max_length : int, optional
        Samples longer than this (in tokens, image tokens included) are skipped.
    padding_side : {"right", "left"}
        Batch padding; results do not depend on it (up to float rounding).
    backend : {"auto", "torch", "triton"}
        Pooling kernel backend (:func:`scalselect_fast.ops.instruction_attended_pool`).
    skip_log : SkipLog, optional
        Where skipped samples are recorded; without it each skip is logged as a warning.
    num_workers : int
        Processes encoding samples one batch ahead of the model (0: in this process).
    roles : {"reference", "label-mask"}, optional
        Answer tokens: the answer text itself (``"reference"``, the default: the authors' rule, the
        end-of-turn marker is an instruction token) or text + end-of-turn marker (``"label-mask"``).
    vision_tokens : {"reference", "pad-only"}, optional
        Visual tokens: image token + Qwen's vision start/end markers (``"reference"``, the default)
        or the image token only (``"pad-only"``).
    pixels : {"paper", "processor"} or "MIN:MAX", optional
        Qwen-VL image size range: the authors' 262,144..589,824 pixels (``"paper"``, the default),
        the checkpoint's own (``"processor"``), or explicit bounds.
        For these three, None means the default for a checkpoint path and the loaded model's own
        choice for a :class:`~.model.VLM`.
    image_loader : callable, optional
        ``loader(path) -> PIL.Image`` replacing :func:`~scalselect_fast.data.load_image`.
    max_image_pixels : int or None
        Images with more pixels (width × height, read from the header before any decoding) are
        skipped as ``image_too_large``; default 40,000,000. ``None``: only Pillow's own bomb limit.

    Yields
    ------
    ids : list of str
        Ids of the samples of this batch that produced a vector, in input order.
    vectors : ndarray, float32, shape (len(ids), hidden_size)
    """
    _check_args(batch_size, threshold, instruction, padding_side)
    from ..data.hf import is_hf_object

    _check_max_pixels(max_image_pixels)
    if is_hf_object(samples):  # a datasets.Dataset / IterableDataset: read it like a file
        from ..data import read_dataset

        samples = read_dataset(samples, skip_log=skip_log)
    vlm = load_vlm(model, layer=layer, dtype=dtype, device=device, device_map=device_map, max_length=max_length,
                   roles=roles, vision_tokens=vision_tokens, pixels=pixels)

    def on_skip(sk: _Skip):
        if skip_log is not None:
            skip_log.add(sk.sample_id, sk.index, sk.reason, sk.detail, line=sk.line, stage=STAGE)
        else:
            log.warning("skipped %s (%s): %s", sk.sample_id, sk.reason, sk.detail)

    pool = _EncodePool(vlm.encoder, image_loader or _image_loader(max_image_pixels), num_workers)
    try:
        items = (("batch", b) for b in _batches(samples, int(batch_size)))
        for _, res in _pipelined(vlm, items, pool, threshold, instruction, padding_side, backend):
            for sk in res.skipped:
                on_skip(sk)
            yield res.ids, res.vectors
    finally:
        pool.close()


# --------------------------------------------------------------------------------------------------
# store writing
# --------------------------------------------------------------------------------------------------
def data_fingerprint(data, format: str = "auto") -> dict:
    """Where the data a store was extracted from came from: its files, total size and digest.

    ``data`` is anything :func:`~scalselect_fast.data.sources.open_source` accepts; the digest is
    :meth:`~scalselect_fast.data.sources.DataSource.digest` (shared with the run's fingerprint).
    """
    from ..data.sources import open_source

    source = open_source(data, format)
    paths = source.input_paths()
    where = {"path": paths[0]} if source.single and paths else {"paths": paths, "label": source.label}
    return {**where, "container": source.container, "bytes": source.total_bytes(), "sha256": source.digest()}


def rank_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Records ``[lo, hi)`` owned by ``rank`` of ``world_size`` (contiguous, sizes differ by <= 1)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return rank * n // world_size, (rank + 1) * n // world_size


def _env_rank() -> tuple[int, int]:
    """(rank, world_size) from torchrun / accelerate environment variables, (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)
    return rank, world


class _RangeSkipLog:
    """Forward a reader's skip entries to the log only for records this rank owns."""

    def __init__(self, log, lo: int, hi: int, first: bool):
        self.log, self.lo, self.hi, self.first = log, lo, hi, first
        self._indices: set[int] = set()
        self.path = log.path  # named by the reader's "all records were skipped" message

    def add(self, sample_id, index, reason, detail="", **extra):
        mine = (self.lo <= index < self.hi) if index is not None else self.first
        if not mine:
            return False
        if index is not None:
            self._indices.add(int(index))
        return self.log.add(sample_id, index, reason, detail, **extra)

    def count(self, a: int, b: int) -> int:
        """Distinct records in [a, b) the reader refused during this run."""
        return sum(1 for i in self._indices if a <= i < b)

    def __contains__(self, key):
        return key in self.log


class _ImagesDigest:
    """What one shard's images were when it was extracted: sha256 over each sample's record index and,
    per image, the path with its size and modification time (``st_mtime_ns``).

    An image carried inside the dataset (:class:`~scalselect_fast.data.EmbeddedImage`) contributes only
    its name: its bytes are part of the dataset file, which the store's provenance fingerprints whole.
    ``files`` says whether any image was not embedded: a shard without such images has a digest the
    data fingerprint already decides, so a resume need not read the dataset again to recompute it.
    """

    def __init__(self):
        self._h = hashlib.sha256()
        self.files = False

    def add(self, sample) -> None:
        from ..data import EmbeddedImage

        parts = [str(sample.index)]
        for img in sample.images:
            if isinstance(img, EmbeddedImage):
                parts.append(f"embedded:{img.name}")
            elif isinstance(img, (str, os.PathLike)):
                self.files = True
                try:
                    st = os.stat(img)
                    parts.append(f"file:{os.fspath(img)}:{st.st_size}:{st.st_mtime_ns}")
                except OSError as e:  # missing now: if it appears later the shard is redone
                    parts.append(f"file:{os.fspath(img)}:errno{e.errno}")
            else:  # an in-memory image handed to the API: nothing on disk to compare
                self.files = True
                parts.append(f"object:{type(img).__name__}")
        self._h.update("\0".join(parts).encode("utf-8", "surrogateescape") + b"\n")

    def hexdigest(self) -> str:
        return "sha256:" + self._h.hexdigest()


class _NoSkipLog:
    """Lets a re-read of the dataset continue past bad records without logging them a second time."""

    def add(self, *args, **kwargs) -> bool:
        return False


def _stale_shards(store: Path, records: dict[str, dict], data, image_root, format, id_field=None) -> dict[str, str]:
    """Which committed shards must be extracted again, and why: ``{name: reason}``.

    A shard is redone when its files are missing, or were changed since their commit (size or
    modification time) and fail their checksum, or when the images of its records changed since it was
    written (:class:`_ImagesDigest`). Unchanged files are not re-read here: the fit's first read
    checks their CRC, and a run re-extracts a shard that fails it (:func:`scalselect_fast.run.run`).
    """
    import bisect

    from ..data import read_dataset
    from ..store import StoreError, StoreSource, shard_file_stat

    bad: dict[str, str] = {}
    src = StoreSource(store)
    for shard in src.shards:
        rec = records.get(shard.name)
        if rec is None:
            continue
        if not (Path(shard.path).is_file() and Path(shard.ids_path).is_file()):
            bad[shard.name] = "missing"
            continue
        if rec.get("stat") is not None and rec["stat"] == shard_file_stat(store, rec["rows_file"], rec["ids_file"]):
            continue  # untouched since its commit (its first full read still checks the CRC)
        try:
            src.check_shard(shard)
        except StoreError as exc:
            bad[shard.name] = f"corrupt ({str(exc).split('. ')[0]})"
    # shards whose images were all embedded: their digest follows from the records, which the data
    # fingerprint checked before this (the store's provenance, the run's state), so the dataset is not
    # read again for them (at 10M records that read is all the image bytes once more)
    spans = sorted((rec["range"][0], rec["range"][1], name) for name, rec in records.items()
                   if name not in bad and rec.get("image_files") is not False)
    if spans:
        starts = [a for a, _, _ in spans]
        digests = {name: _ImagesDigest() for _, _, name in spans}
        for sample in read_dataset(data, image_root=image_root, format=format, skip_log=_NoSkipLog(),
                                   id_field=id_field):
            if sample.index >= spans[-1][1]:
                break
            k = bisect.bisect_right(starts, sample.index) - 1
            if k >= 0 and sample.index < spans[k][1]:
                digests[spans[k][2]].add(sample)
        for a, b, name in spans:
            want = records[name].get("images")
            if want != digests[name].hexdigest():
                bad[name] = ("its images changed since it was extracted (size or modification time of an image "
                             "file)" if want else "it has no record of its images (written by an older version)")
    return bad


def _repair(store: Path, records: dict[str, dict], data, image_root, format, warn: Callable[[str], None],
            id_field=None) -> list[str]:
    """Take stale or damaged committed shards off the manifest (moving damaged files aside); say so."""
    from ..store import uncommit_shards

    bad = _stale_shards(store, records, data, image_root, format, id_field)
    for name, why in sorted(bad.items()):
        damaged = not why.startswith("its ")
        moved = uncommit_shards(store, [name], move_aside=damaged)
        a, b = records[name]["range"]
        aside = f"moved its files aside ({', '.join(p.name for p in moved)}) and " if moved else ""
        warn(f"shard {name} of {store} (records {a}-{b - 1}) {'is ' if damaged else 'changed: '}{why}; {aside}"
             f"re-extracting only that shard (every other shard is kept)")
    return sorted(bad)


def repair_store(store: str | os.PathLike, data: str | os.PathLike, *, image_root=None, format: str = "auto",
                 warn: Callable[[str], None] | None = None, id_field: str | None = None) -> list[str]:
    """Check every committed shard of an extraction store against its files and the dataset's images.

    Shards whose files are missing or fail their checksum are taken off the manifest and their
    files renamed to ``<file>.corrupt-<time>``; shards whose images changed since extraction (size or
    modification time) are taken off the manifest. Rerunning :func:`extract_to_store` then re-extracts
    exactly those shards and keeps the others.

    Parameters
    ----------
    store : path
        A store written by :func:`extract_to_store` (shard records carry their record range).
    data, image_root, format, id_field
        The dataset the store was extracted from, as passed to :func:`extract_to_store`.
    warn : callable, optional
        Receives one message per finding (default: ``logging.warning``).

    Returns
    -------
    list of str
        Names of the shards taken off the manifest (empty when everything is intact).
    """
    from ..store import MANIFEST

    store = Path(store)
    records = {r["name"]: r for r in json.loads((store / MANIFEST).read_text()).get("shards", []) if "range" in r}
    if not records:
        return []
    return _repair(store, records, data, image_root, format, warn or log.warning, id_field)


def extract_to_store(model, data: str | os.PathLike, out: str | os.PathLike, *, image_root=None,
                     format: str = "auto", batch_size: int = 8, layer: int = 0, threshold: float = 0.9,
                     instruction: str = "all", dtype="fp32", device: str | None = "auto", device_map=None,
                     store_dtype: str = "float16", shard_size: int = 4096, max_length: int | None = None,
                     padding_side: str = "right", backend: str = "auto", rank: int | None = None,
                     world_size: int | None = None, force: bool = False, progress: bool = True,
                     num_workers: int = 0, on_progress: Callable[[int, int], None] | None = None,
                     image_loader: Callable | None = None, roles: str | None = None,
                     vision_tokens: str | None = None, pixels: str | None = None,
                     max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                     warn: Callable[[str], None] | None = None, id_field: str | None = None,
                     cache: str | os.PathLike | None = None) -> dict:
    """Extract every sample of a dataset file into a representation store (resumable, per-rank).

    Parameters
    ----------
    model : str, PathLike or VLM
        Checkpoint directory or a loaded :class:`~.model.VLM`.
    data : path
        Dataset: a file (LLaVA JSON, ShareGPT JSON, JSONL, Parquet, ...), directory, glob, URL, list
        of those, or a ``datasets`` object (see :func:`scalselect_fast.data.sources.open_source`).
    out : path
        Store directory; ``skipped.jsonl`` is written inside it.
    image_root : path, optional
        Directory relative image paths are joined to (paths escaping it are refused).
    store_dtype : {"float16", "bfloat16", "float32"}
        Storage dtype of the vectors.
    shard_size : int
        Records per shard (a shard's input range; skipped records still count).
    rank, world_size : int, optional
        Data-parallel slice; default from ``RANK`` / ``WORLD_SIZE`` (torchrun, accelerate launch).
    force : bool
        Discard an existing store from a different run instead of refusing.
    num_workers : int
        Processes that encode samples (chat template, tokenisation, image decoding and preprocessing)
        one batch ahead of the model; 0 encodes in this process.
    on_progress : callable, optional
        ``on_progress(done, total)`` after every batch and shard: records of this rank's range
        processed so far (committed shards included) and the range size, for machine-readable logs.
    warn : callable, optional
        Receives the messages about committed shards that are redone (default ``logging.warning``).
    id_field : str, optional
        The id column (see :func:`scalselect_fast.data.read_dataset`); ``None`` = ``id``, and records
        without an id field get their positional id. A named field is recorded in the provenance.
    cache : path, optional
        A representation cache directory (:mod:`.cache`): every record is looked up by its content
        first and only the misses reach the model; new vectors are added to it. Shared safely
        between runs, datasets and concurrent processes.
    Other parameters are those of :func:`extract_representations`; ``roles``, ``vision_tokens`` and
    ``pixels`` are recorded in the store's provenance, so a store made with other choices is refused.

    Returns
    -------
    dict
        ``{"store", "rank", "world_size", "range", "rows", "skipped", "shards_written",
        "shards_resumed", "shards_redone"}`` for this process, and with ``cache``
        ``"cache": {"dir", "reused", "extracted"}`` (samples taken from the cache / run through the model).

    Notes
    -----
    Resuming checks every committed shard first (see :func:`repair_store`): a shard whose files are
    missing, fail their checksum, or whose images changed since it was written is extracted again.
    """
    from ..data import count_records

    _check_args(batch_size, threshold, instruction, padding_side)
    _check_max_pixels(max_image_pixels)
    if int(shard_size) < 1:
        raise R.ExtractError(f"shard_size must be >= 1, got {shard_size}")
    env_rank, env_world = _env_rank()
    rank = env_rank if rank is None else int(rank)
    world = env_world if world_size is None else int(world_size)
    from ..data.sources import open_source

    data = open_source(data, format)  # resolved once: files sorted, container checked (DatasetError)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output {out} exists and is not a directory; choose another --out")
    n_records = count_records(data, format)
    lo, hi = rank_range(n_records, rank, world)
    if device not in (None, "auto") or device_map is not None or world == 1:
        dev = device
    else:  # one process per GPU: torchrun/accelerate set LOCAL_RANK
        import torch

        dev = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}" if torch.cuda.is_available() else "cpu"
    vlm = load_vlm(model, layer=layer, dtype=dtype, device=dev, device_map=device_map, max_length=max_length,
                   roles=roles, vision_tokens=vision_tokens, pixels=pixels)
    provenance = {
        "kind": "scalselect-extract",
        "model": {"path": str(Path(vlm.path).resolve()), "type": vlm.family, "depth": vlm.depth},
        "layer": vlm.layer, "threshold": float(threshold), "dtype": str(vlm.dtype).replace("torch.", ""),
        "instruction": instruction, "max_length": vlm.max_length, "max_image_pixels": max_image_pixels,
        **vlm.options(),  # roles, vision_tokens, pixels: another choice is refused on resume
        "data": {**data_fingerprint(data, format), "image_root": str(Path(image_root).resolve()) if image_root else None,
                 "format": format, "records": n_records},
        "shard_size": int(shard_size), "world_size": world,
    }
    if id_field is not None:  # only when named: stores made before the option still resume
        provenance["id_field"] = id_field
    rep_cache = None
    if cache is not None:
        rep_cache = open_cache(cache, vlm, threshold=threshold, instruction=instruction, padding_side=padding_side,
                               backend=backend, max_image_pixels=max_image_pixels, warn=warn or log.warning)
    out.mkdir(parents=True, exist_ok=True)
    # one writer per store (per rank: ranks write disjoint shards of one store)
    lock = out / (".extract.lock" if world == 1 else f".extract-rank{rank:03d}.lock")
    with exclusive_lock(lock, f"store {out}" + (f" (rank {rank})" if world > 1 else "")):
        return _extract_locked(vlm, data, out, provenance, image_root=image_root, format=format,
                               batch_size=batch_size, threshold=threshold, instruction=instruction,
                               store_dtype=store_dtype, shard_size=shard_size, padding_side=padding_side,
                               backend=backend, rank=rank, world=world, lo=lo, hi=hi, force=force,
                               progress=progress, num_workers=num_workers, on_progress=on_progress,
                               loader=image_loader or _image_loader(max_image_pixels), warn=warn or log.warning,
                               id_field=id_field, cache=rep_cache)


def _extract_locked(vlm, data, out: Path, provenance: dict, *, image_root, format, batch_size, threshold,
                    instruction, store_dtype, shard_size, padding_side, backend, rank, world, lo, hi, force,
                    progress, num_workers, on_progress, loader, warn, id_field=None, cache=None) -> dict:
    from ..data import SkipLog, read_dataset
    from ..store import StoreWriter

    writer = StoreWriter(out, d=vlm.hidden_size, dtype=store_dtype, provenance=provenance,
                         prefix="shard" if world == 1 else f"rank{rank:03d}-shard", force=force)
    skip_path = out / "skipped.jsonl"
    if force and skip_path.exists() and not writer.committed():
        skip_path.unlink()  # a discarded store's skip log must not leak into the new run
    ranges = [(s, min(hi, s + int(shard_size))) for s in range(lo, hi, int(shard_size))]
    committed = writer.committed()
    mine = {writer.shard_name(j): committed[writer.shard_name(j)] for j, (a, b) in enumerate(ranges)
            if committed.get(writer.shard_name(j), {}).get("range") == [a, b]}
    redone = _repair(out, mine, data, image_root, format, warn, id_field) if mine else []
    committed = writer.committed()
    todo = []
    resumed = 0
    for j, (a, b) in enumerate(ranges):
        rec = committed.get(writer.shard_name(j))
        if rec is not None and rec.get("range") == [a, b]:
            resumed += 1
        else:
            todo.append((j, a, b))
    summary = {"store": str(out), "rank": rank, "world_size": world, "range": [lo, hi], "rows": 0, "skipped": 0,
               "shards_written": 0, "shards_resumed": resumed, "shards_redone": redone}
    if cache is not None:
        summary["cache"] = {"dir": str(cache.root), "reused": 0, "extracted": 0}
    if not todo:
        return summary
    bar = None
    if progress:
        from tqdm.auto import tqdm

        done_records = sum(b - a for (a, b) in ranges) - sum(b - a for (_, a, b) in todo)
        bar = tqdm(total=hi - lo, initial=done_records, unit="sample", dynamic_ncols=True,
                   desc=f"extract{f' rank {rank}' if world > 1 else ''}", smoothing=0.1)

    with SkipLog(skip_path) as slog:
        reader_log = _RangeSkipLog(slog, lo, hi, first=rank == 0)
        first = todo[0][1]
        stream = _Peekable(s for s in read_dataset(data, image_root=image_root, format=format, skip_log=reader_log,
                                                   id_field=id_field)
                           if s.index >= first)

        keys: dict[int, bytes | None] = {}  # record index -> cache key, for the misses in flight

        def items():
            """("batch", samples) for each todo shard's records, then ("end", shard); never across shards.

            With a cache, records found in it are not batched: they travel with the shard's end marker
            as ``(sample, vector or None)`` and are merged back in record order."""
            for j, a, b in todo:
                batch: list = []
                images = _ImagesDigest()
                hits: list = []
                while (s := stream.peek()) is not None and s.index < b:
                    next(stream)
                    if s.index < a:  # inside an already committed shard
                        continue
                    images.add(s)
                    if cache is not None:
                        pinned: list = []
                        key = cache.key(s, pinned)
                        found, ok, vec = cache.get(key)
                        if found:
                            hits.append((s, vec if ok else None))
                            continue
                        keys[s.index] = key
                        if key is not None:  # extract the very bytes the key was made of (see sample_key)
                            s.images = pinned
                    batch.append(s)
                    if len(batch) == batch_size:
                        yield "batch", batch
                        batch = []
                if batch:
                    yield "batch", batch
                yield "end", (j, a, b, images, hits)

        pool = _EncodePool(vlm.encoder, loader, num_workers)
        rows: list[np.ndarray] = []
        ids: list[str] = []
        row_index: list = []
        n_skip = 0
        pos = todo[0][1]  # next record index not yet shown on the progress bar
        # records in shards finished (earlier runs included) and the start of the shard in progress
        done_before = sum(b - a for (a, b) in ranges) - sum(b - a for (_, a, b) in todo)
        shard_start = todo[0][1]
        try:
            for kind, res in _pipelined(vlm, items(), pool, threshold, instruction, padding_side, backend):
                if kind == "batch":
                    for sk in res.skipped:
                        slog.add(sk.sample_id, sk.index, sk.reason, sk.detail, line=sk.line, stage=STAGE)
                    n_skip += len(res.skipped)
                    if res.ids:
                        rows.append(res.vectors)
                        ids.extend(res.ids)
                        row_index.extend(res.indices)
                    if cache is not None:
                        _cache_batch(cache, keys, res, summary["cache"])
                    if bar is not None:
                        bar.update(max(res.max_index + 1 - pos, 0))
                        pos = max(pos, res.max_index + 1)
                        bar.set_postfix(rows=summary["rows"] + len(ids), skipped=summary["skipped"] + n_skip,
                                        refresh=False)
                    if on_progress is not None:
                        on_progress(done_before + max(res.max_index + 1 - shard_start, 0), hi - lo)
                    continue
                j, a, b, images, hits = res
                # Records the reader itself refused (bad fields, images outside the root) count as skipped.
                n_skip += reader_log.count(a, b)
                if hits:
                    n_skip += _merge_hits(hits, rows, ids, row_index, slog, vlm.layer, instruction)
                    summary["cache"]["reused"] += len(hits)
                if cache is not None:
                    cache.flush()  # before the shard commits: a vector the store holds is in the cache too
                mat = np.concatenate(rows) if rows else np.zeros((0, vlm.hidden_size), np.float32)
                writer.write_shard(mat, ids, index=j, extra={"range": [a, b], "skipped": n_skip, "rank": rank,
                                                                "images": images.hexdigest(),
                                                                "image_files": images.files})
                slog.sync()
                summary["rows"] += len(ids)
                summary["skipped"] += n_skip
                summary["shards_written"] += 1
                rows, ids, row_index, n_skip = [], [], [], 0
                if bar is not None:
                    bar.update(max(b - pos, 0))
                done_before += b - a
                if on_progress is not None:
                    on_progress(done_before, hi - lo)
                nxt = next((t for t in todo if t[0] > j), None)
                if nxt is not None:  # the next shard to do may follow committed ones (already counted)
                    shard_start = pos = nxt[1]
        finally:
            pool.close()
    if bar is not None:
        bar.close()
    return summary


def open_cache(root, vlm: VLM, *, threshold, instruction, padding_side="right", backend="auto",
               max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS, warn=None):
    """The representation cache at ``root`` opened for ``vlm`` and these settings (see :mod:`.cache`).

    The context digest covers the model directory's files (:func:`~.cache.model_digest`), its family,
    layer, dtype, max length and encoding options, the pooling settings, the image-size limit and the
    device type (CPU and GPU kernels round differently), not the model's path.
    """
    from .cache import RepCache, model_digest

    try:
        device_type = next(vlm.model.parameters()).device.type
    except (AttributeError, StopIteration):
        device_type = str(vlm.device).split(":")[0]
    context = {"model_digest": model_digest(vlm.path), "family": vlm.family, "layer": vlm.layer,
               "dtype": str(vlm.dtype).replace("torch.", ""), "max_length": vlm.max_length, **vlm.options(),
               "threshold": float(threshold), "instruction": instruction, "padding_side": padding_side,
               "backend": backend, "max_image_pixels": max_image_pixels, "device": device_type}
    return RepCache(root, context, vlm.hidden_size, warn=warn, about={"model": str(Path(vlm.path).resolve())})


def _cache_batch(cache, keys: dict, res: BatchResult, counts: dict) -> None:
    """Add one batch's new vectors (and its no-attention samples) to the cache; count what ran."""
    for i, v in zip(res.indices, res.vectors):
        cache.put(keys.pop(i, None), v)
    counts["extracted"] += len(res.ids)
    for sk in res.skipped:
        key = keys.pop(sk.index, None)
        if sk.reason == REASON_NO_ATTENTION:  # the model ran and found nothing: remember that too
            cache.put(key, None)
            counts["extracted"] += 1


def _merge_hits(hits: list, rows: list, ids: list, row_index: list, slog, layer: int, instruction: str) -> int:
    """Put the shard's cache hits among its extracted rows, in record order (lists changed in place);
    returns the number of hits that are no-attention skips (logged like a fresh one)."""
    n_skip = 0
    vecs = []
    for s, vec in hits:
        if vec is None:
            slog.add(str(s.id), s.index, REASON_NO_ATTENTION,
                     f"sample {s.id}: no {instruction!r} instruction token attends to a visual token at layer "
                     f"{layer} (instruction text only before the image?)", line=getattr(s, "line", None), stage=STAGE)
            n_skip += 1
            continue
        vecs.append(vec)
        ids.append(str(s.id))
        row_index.append(s.index)
    if vecs:
        rows.append(np.stack(vecs).astype(np.float32, copy=False))
    mat = np.concatenate(rows) if rows else None
    order = np.argsort(np.asarray(row_index, np.int64), kind="stable")
    rows[:] = [] if mat is None else [mat[order]]
    ids[:] = [ids[k] for k in order]
    row_index[:] = [row_index[k] for k in order]
    return n_skip


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
