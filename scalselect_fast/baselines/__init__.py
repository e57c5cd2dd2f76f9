"""Baseline selection methods, run on the same representations as ScalSelect.

Every method is a module with ``select(source, budget, seed=0, **opts) -> (budget,) int64``
(row indices, distinct, in the method's priority order); ``budget`` follows
:func:`scalselect_fast.resolve_budget`. Modules are imported on first use, so ``faiss`` is only
needed by the methods that cluster or search neighbours.

=====================  =======================================================  ==============
method                 what it does                                             cost
=====================  =======================================================  ==============
``random``             seeded uniform sample                                    O(N)
``kcenter``            greedy farthest-point coreset (Euclidean)                O(N·budget·d)
``facility_location``  lazy greedy facility location on cosine similarity       O(N²·d), N² mem
``semdedup``           faiss k-means + within-cluster near-duplicate removal    ~O(N^1.5·d)
``cluster_balanced``   faiss k-means, budget spread evenly over clusters        O(N·K·d)
=====================  =======================================================  ==============
"""
from __future__ import annotations

import importlib

import numpy as np

METHODS = ("random", "kcenter", "facility_location", "semdedup", "cluster_balanced")

__all__ = ["METHODS", "get", "select"]


def get(name: str):
    """The ``select`` function of baseline ``name``; ValueError listing the choices otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(METHODS)}")
    return importlib.import_module(f"{__name__}.{name}").select


def select(method: str, source, budget, seed: int = 0, **opts) -> np.ndarray:
    """Run baseline ``method``: ``get(method)(source, budget, seed=seed, **opts)``."""
    return get(method)(source, budget, seed=seed, **opts)
