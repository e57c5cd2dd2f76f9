"""scalselect-fast: training-free, linear-time data selection (ScalSelect) at scale.

The public API is small::

    import scalselect_fast as ss
    sub = ss.fit_subspace(source, energy=0.9)     # streaming fit of the dominant subspace
    scores = ss.leverage_scores(source, sub)      # ||U_k[i]||², float64 (N,)
    idx = ss.top_k(scores, "16%")                 # int64, descending score, ties -> lower index

``source`` is an ndarray, a memory-mapped ``.npy`` or a representation store directory
(see :mod:`scalselect_fast.store`). Representations are extracted from a vision-language model by
:mod:`scalselect_fast.extract`.
"""
from __future__ import annotations

__version__ = "0.1.0"

# Names resolved lazily so `import scalselect_fast` stays cheap (no torch, no faiss).
_LAZY = {
    "fit_subspace": "scalselect_fast.subspace",
    "Subspace": "scalselect_fast.subspace",
    "leverage_scores": "scalselect_fast.scoring",
    "top_k": "scalselect_fast.scoring",
    "resolve_budget": "scalselect_fast.scoring",
    "open_source": "scalselect_fast.store",
    "StoreWriter": "scalselect_fast.store",
    "StoreError": "scalselect_fast.store",
    "SubspaceAccumulator": "scalselect_fast.subspace",
    "extract_representations": "scalselect_fast.extract",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'scalselect_fast' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
