"""Fingerprints of the model directory, the dataset and each stage's settings (for resume checks)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .config import RunConfig, RunError

__all__ = ["model_fingerprint", "data_fingerprint", "stage_fingerprints"]


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
_EDGE = 1 << 20


def _hash_file(h, path: Path, whole: bool) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}\0{size}\0".encode())
    with open(path, "rb") as fh:
        if whole or size <= 4 * _EDGE:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        else:
            # big weight files: header + tail + size identify a checkpoint without reading GBs
            h.update(fh.read(_EDGE))
            fh.seek(size - _EDGE)
            h.update(fh.read(_EDGE))


def model_fingerprint(path: str | os.PathLike) -> str:
    """sha256 over a model directory: every config/tokenizer file whole, weights by size + head + tail."""
    p = Path(path)
    if not p.exists():
        raise RunError(f"--model {p}: no such file or directory; pass a local Hugging Face model directory "
                       f"(config.json + weights), e.g. a downloaded llava-hf/llava-1.5-7b-hf")
    h = hashlib.sha256(b"model\0")
    files = sorted(f for f in (p.rglob("*") if p.is_dir() else [p]) if f.is_file() and not f.name.startswith("."))
    for f in files:
        _hash_file(h, f, whole=not f.name.endswith(_WEIGHT_SUFFIXES))
    return h.hexdigest()[:32]


def data_fingerprint(data, image_root: str | None, format: str = "auto") -> str:
    """Fingerprint of the dataset: every input file (see :meth:`~scalselect_fast.data.sources.DataSource.
    digest`) plus the resolved image root (image files are not hashed).

    ``data`` is anything ``--data`` accepts (file, directory, glob, URL, list, ``datasets`` object).
    """
    from ..data.sources import open_source

    h = hashlib.sha256(b"data\0")
    h.update(open_source(data, format).digest().encode())
    h.update(str(Path(image_root).resolve() if image_root else "").encode())
    return h.hexdigest()[:32]


def _hash_obj(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


def stage_fingerprints(cfg: RunConfig, model_fp: str, data_fp: str) -> dict:
    """Chained fingerprints: each stage's covers everything it depends on."""
    ex = _hash_obj({"model": model_fp, "data": data_fp, **cfg.settings(cfg.EXTRACT_KEYS)})
    fit = _hash_obj({"extract": ex, **cfg.settings(cfg.FIT_KEYS)})
    return {"model": model_fp, "data": data_fp, "extract": ex, "fit": fit, "score": fit,
            "config": _hash_obj(cfg.settings(cfg.EXTRACT_KEYS + cfg.FIT_KEYS + cfg.SELECT_KEYS))}

