"""One batch through the model: encode its samples, run the truncated forward once, pool.

Encoding (chat template, token roles, image decoding and preprocessing) runs in this process or in
forked workers one batch ahead of the model (:class:`EncodePool`, :func:`pipelined`); a sample that
cannot give a vector becomes a skip with a reason code, never an exception, unless the model or
template itself is at fault. Not here: datasets, shards and stores (:mod:`.loop`).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from . import roles as R
from .model import VLM
from .options import ExtractOptions, extract_options

__all__ = ["BatchResult", "EncodePool", "encode_and_pool", "pipelined", "batches", "image_loader_for",
           "no_attention_detail", "REASON_TEXT_ONLY", "REASON_TOO_LONG", "REASON_NO_ATTENTION",
           "REASON_ENCODE", "STAGE"]

REASON_TEXT_ONLY = "text_only"
REASON_TOO_LONG = "too_long"
REASON_NO_ATTENTION = "no_instruction_attention"
REASON_ENCODE = "encode_error"
#: the stage name skip-log entries written during extraction carry
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


class EncodePool:
    """Encodes batches in ``workers`` forked processes (0 = in this process, when the batch is run).

    With workers, batch k+1 is encoded while the model runs batch k (see :func:`pipelined`).
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


def _pool_encoded(vlm: VLM, samples: list, results: list, opts: ExtractOptions) -> BatchResult:
    """Forward + pooling for one batch whose samples were encoded into ``results``."""
    import torch

    from ..ops import instruction_attended_pool

    encoded = [r for r in results if not isinstance(r, _Skip)]
    kept = [s for s, r in zip(samples, results) if not isinstance(r, _Skip)]
    skipped = [r for r in results if isinstance(r, _Skip)]
    max_index = max((getattr(s, "index", -1) for s in samples), default=None)
    if not encoded:
        return BatchResult([], np.zeros((0, vlm.hidden_size), np.float32), skipped, len(samples), max_index)
    batch = vlm.collate(encoded, opts.padding_side)
    cap = vlm.forward_layer(batch["inputs"])
    dev = cap.query.device
    roles = batch["roles"].to(dev)
    mask = batch["mask"].to(dev)
    qmask = torch.from_numpy(R.instruction_mask(batch["roles"].numpy(), opts.instruction)).to(dev)
    with torch.inference_mode():
        pooled, valid = instruction_attended_pool(
            cap.query, cap.key, cap.hidden.to(dev), qmask, roles == R.VISUAL, mask, threshold=opts.threshold,
            scale=cap.scaling, pool_impl=opts.pool_impl, return_valid=True)
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
                                 no_attention_detail(s.id, opts.instruction, vlm.layer), getattr(s, "line", None)))
    skipped.sort(key=lambda k: (k.index if k.index is not None else -1))
    return BatchResult(ids, np.ascontiguousarray(pooled[valid]), skipped, len(samples), max_index, indices)


def no_attention_detail(sample_id, instruction: str, layer: int) -> str:
    """The skip-log detail of a sample whose instruction tokens attend to no visual token."""
    return (f"sample {sample_id}: no {instruction!r} instruction token attends to a visual token at layer "
            f"{layer} (instruction text only before the image?)")


def encode_and_pool(vlm: VLM, samples: list, *, options: ExtractOptions | None = None, **settings) -> BatchResult:
    """Encode ``samples``, run the truncated forward once for the batch and pool.

    Parameters
    ----------
    vlm : VLM
    samples : list of Sample-like
        Objects with ``id``, ``images`` (paths or PIL images), ``messages`` and optionally ``index``.
    options : ExtractOptions, optional
        Read here: ``threshold``, ``instruction``, ``padding_side``, ``pool_impl`` and
        ``image_loader``; the model's own settings come with ``vlm``.
    **settings
        Fields of :class:`~.options.ExtractOptions` replacing those of ``options``.

    Returns
    -------
    BatchResult
        ``vectors`` float32 (n_kept, D) in input order; ``skipped`` lists the samples without one.
    """
    from ..data import load_image

    opts = extract_options(options, settings, "encode_and_pool")
    loader = opts.image_loader or load_image
    results = [_encode_one(vlm.encoder, _pack(s), loader) for s in samples]
    return _pool_encoded(vlm, samples, results, opts)


def pipelined(vlm, items, pool: EncodePool, opts: ExtractOptions):
    """Map ``("batch", samples)`` items to ``("batch", BatchResult)``, encoding one batch ahead.

    Other items (end-of-shard markers) pass through in order.
    """
    pending: list = []  # [(kind, payload, handle)], oldest first

    def n_batches():
        return sum(1 for p in pending if p[0] == "batch")

    def finish(k, pl, h):
        return k, (_pool_encoded(vlm, pl, pool.results(h), opts) if k == "batch" else pl)

    for kind, payload in items:
        pending.append((kind, payload, pool.submit(payload) if kind == "batch" else None))
        # emit everything except the newest batch, which keeps encoding while the older one runs
        while pending and (n_batches() > 1 or pending[0][0] != "batch"):
            yield finish(*pending.pop(0))
    for item in pending:
        yield finish(*item)


def batches(samples: Iterable, batch_size: int):
    """Lists of ``batch_size`` consecutive samples (the last one shorter)."""
    buf = []
    for s in samples:
        buf.append(s)
        if len(buf) == batch_size:
            yield buf
            buf = []
    if buf:
        yield buf


def image_loader_for(max_image_pixels: int | None) -> Callable:
    """:func:`~scalselect_fast.data.load_image` refusing images over ``max_image_pixels``."""
    from ..data import load_image

    return functools.partial(load_image, max_pixels=max_image_pixels)

