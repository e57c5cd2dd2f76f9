"""Fingerprints of the model directory, the dataset and each stage's settings (for resume checks)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .config import RunConfig, RunError

__all__ = ["model_fingerprint", "data_fingerprint", "stage_fingerprints"]


def model_fingerprint(path: str | os.PathLike) -> str:
    """sha256 over a model directory: every config/tokenizer file whole, weights by size + head + tail."""
    p = Path(path)
    if not p.exists():
        raise RunError(f"--model {p}: no such file or directory; pass a local Hugging Face model directory "
                       f"(config.json + weights), e.g. a downloaded llava-hf/llava-1.5-7b-hf")
    from ..extract.cache import model_digest

    return model_digest(p)


def data_fingerprint(data, image_root: str | None, format: str = "auto") -> str:
    """Fingerprint of the dataset: every input file (see :meth:`~scalselect_fast.data.sources.DataSource.
    digest`) plus the resolved image root (image files are not hashed).

    ``data`` is anything ``--data`` accepts (file, directory, glob, URL, list, ``datasets`` object).
    """
    from ..data.sources import open_dataset

    h = hashlib.sha256(b"data\0")
    h.update(open_dataset(data, format).digest().encode())
    h.update(str(Path(image_root).resolve() if image_root else "").encode())
    return h.hexdigest()[:32]


def _hash_obj(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


def stage_fingerprints(cfg: RunConfig, model_fp: str, data_fp: str) -> dict:
    """Chained fingerprints: each stage's covers everything it depends on."""
    ex = _hash_obj({"model": model_fp, "data": data_fp, **cfg.settings(cfg.EXTRACT_KEYS)})
    fit = _hash_obj({"extract": ex, **cfg.settings(cfg.FIT_KEYS)})
    # the model and settings without the data: a dataset change alone can go through the cache
    settings = _hash_obj({"model": model_fp, **cfg.settings(cfg.EXTRACT_KEYS + cfg.FIT_KEYS)})
    return {"model": model_fp, "data": data_fp, "extract": ex, "fit": fit, "score": fit, "settings": settings,
            "config": _hash_obj(cfg.settings(cfg.EXTRACT_KEYS + cfg.FIT_KEYS + cfg.SELECT_KEYS))}

