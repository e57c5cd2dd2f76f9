"""Instruction-attended representations from Hugging Face vision-language models (ScalSelect).

For each sample (image(s) + conversation) the model runs only up to decoder layer ℓ (default 0):
the attention of layer ℓ, averaged over heads and instruction tokens, picks the visual tokens holding
``threshold`` (0.9) of the attention mass, and their hidden states at the output of layer ℓ are
averaged into one vector. No attention map is built (see :mod:`scalselect_fast.ops`).

Modules: :mod:`.model` (loading, adapters, encoding, truncated forward), :mod:`.roles` (token roles
from the chat template), :mod:`.hook` (attention capture + early exit), :mod:`.options` (the
settings, validated once), :mod:`.batch` (one batch: encode, forward, pool), :mod:`.loop` (the loop
and the store writer), :mod:`.ranks` (which records a rank owns), :mod:`.launch`
(one process per device), :mod:`.repair` (stale shards),
:mod:`.cache` and :mod:`.cache_lookup` (the representation cache), :mod:`.tiny` (random-weight tiny
models for tests and the demo).
Importing this package is cheap; torch and transformers load on first use.
"""
from __future__ import annotations

_LAZY = {
    "extract_representations": "scalselect_fast.extract.loop",
    "extract_to_store": "scalselect_fast.extract.loop",
    "ExtractOptions": "scalselect_fast.extract.options",
    "encode_and_pool": "scalselect_fast.extract.batch",
    "repair_store": "scalselect_fast.extract.repair",
    "load_vlm": "scalselect_fast.extract.model",
    "VLM": "scalselect_fast.extract.model",
    "UnsupportedModelError": "scalselect_fast.extract.model",
    "KNOWN_FAMILIES": "scalselect_fast.extract.model",
    "build_tiny_model": "scalselect_fast.extract.tiny",
    "build_shaped_model": "scalselect_fast.extract.tiny",
    "ChatTemplateError": "scalselect_fast.extract.roles",
    "ExtractError": "scalselect_fast.extract.roles",
    "SampleError": "scalselect_fast.extract.roles",
    "parse_devices": "scalselect_fast.extract.launch",
    "DevicesError": "scalselect_fast.extract.launch",
    "WorkerError": "scalselect_fast.extract.launch",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'scalselect_fast.extract' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
