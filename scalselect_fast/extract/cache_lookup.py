"""Extraction through the representation cache: open it for a model and settings, put a batch's new
vectors in, and merge a shard's cache hits back among its extracted rows in record order.

The cache itself (keys, files, integrity) is :mod:`.cache`; this module is what the extraction loop
does with it.
"""
from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np

from .batch import REASON_NO_ATTENTION, STAGE, BatchResult, no_attention_detail
from .model import VLM
from .options import ExtractOptions, extract_options

__all__ = ["open_cache", "cache_batch", "merge_hits"]

#: model digest of each loaded model, taken when a cache is first opened for it: the vectors come from
#: the weights in memory, so a later edit of the files on disk must not change the key either (and a
#: process that extracts many datasets with one model hashes its files once)
_MODEL_DIGESTS: "weakref.WeakKeyDictionary[VLM, str]" = weakref.WeakKeyDictionary()


def open_cache(root, vlm: VLM, *, options: ExtractOptions | None = None, warn=None, **settings):
    """The representation cache at ``root`` opened for ``vlm`` and these settings (see :mod:`.cache`).

    ``options`` (and ``settings``, fields of :class:`~.options.ExtractOptions` replacing its own) give
    the pooling settings: ``threshold``, ``instruction``, ``padding_side``, ``pool_impl`` and
    ``max_image_pixels``. The context digest covers the model directory's files
    (:func:`~.cache.model_digest`), its family, layer, dtype, max length and encoding options, the
    pooling settings, the image-size limit and the device type (CPU and GPU kernels round
    differently), not the model's path. The model's digest is taken once per loaded ``vlm``.
    """
    from .cache import RepCache, model_digest

    opts = extract_options(options, settings, "open_cache")
    try:
        device_type = next(vlm.model.parameters()).device.type
    except (AttributeError, StopIteration):
        device_type = str(vlm.device).split(":")[0]
    digest = _MODEL_DIGESTS.get(vlm)
    if digest is None:
        digest = _MODEL_DIGESTS[vlm] = model_digest(vlm.path)
    context = {"model_digest": digest, "family": vlm.family, "layer": vlm.layer,
               "dtype": str(vlm.dtype).replace("torch.", ""), "max_length": vlm.max_length, **vlm.options(),
               "threshold": float(opts.threshold), "instruction": opts.instruction,
               "padding_side": opts.padding_side,
               # the pooling implementation's key keeps its old name: the digest addresses existing caches
               "backend": opts.pool_impl, "max_image_pixels": opts.max_image_pixels, "device": device_type}
    return RepCache(root, context, vlm.hidden_size, warn=warn, about={"model": str(Path(vlm.path).resolve())})


def cache_batch(cache, keys: dict, res: BatchResult, counts: dict) -> None:
    """Add one batch's new vectors (and its no-attention samples) to the cache; count what ran."""
    for i, v in zip(res.indices, res.vectors):
        cache.put(keys.pop(i, None), v)
    counts["extracted"] += len(res.ids)
    for sk in res.skipped:
        key = keys.pop(sk.index, None)
        if sk.reason == REASON_NO_ATTENTION:  # the model ran and found nothing: remember that too
            cache.put(key, None)
            counts["extracted"] += 1


def merge_hits(hits: list, rows: list, ids: list, row_index: list, slog, layer: int, instruction: str) -> int:
    """Put the shard's cache hits among its extracted rows, in record order (lists changed in place);
    returns the number of hits that are no-attention skips (logged like a fresh one)."""
    n_skip = 0
    vecs = []
    for s, vec in hits:
        if vec is None:
            slog.add(str(s.id), s.index, REASON_NO_ATTENTION, no_attention_detail(s.id, instruction, layer),
                     line=getattr(s, "line", None), stage=STAGE)
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
