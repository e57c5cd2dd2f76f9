"""Plain JSON values from what reports, manifests' metadata and saved subspaces hold.

One conversion for the package: numpy scalars and arrays become Python numbers and lists, paths
strings, mappings dicts with string keys. Not a serializer: callers write the result with ``json``.
"""
from __future__ import annotations

import math
from pathlib import PurePath
from typing import Any, Mapping

import numpy as np

__all__ = ["to_jsonable"]


def to_jsonable(obj: Any, nonfinite: str = "string") -> Any:
    """``obj`` with every numpy scalar/array and path replaced by plain JSON types, recursively.

    Parameters
    ----------
    obj : any
        Nested mappings, lists and tuples of numbers, strings, numpy values and paths.
    nonfinite : {"string", "keep"}
        ``"string"``: NaN and ±inf become ``"nan"``, ``"inf"``, ``"-inf"`` (valid JSON for any reader,
        as report.json needs); ``"keep"``: they stay floats (``json`` writes ``NaN``/``Infinity``, which
        ``json`` reads back as floats; what a saved subspace's metadata needs to round-trip).

    Returns
    -------
    Any
        dicts, lists, str, int, float, bool and None only.
    """
    if nonfinite not in ("string", "keep"):
        raise ValueError(f"nonfinite={nonfinite!r}: use 'string' or 'keep'")
    return _convert(obj, nonfinite == "string")


def _convert(obj: Any, stringify: bool) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _convert(v, stringify) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_convert(v, stringify) for v in obj]
    if isinstance(obj, np.ndarray):
        return _convert(obj.tolist(), stringify)
    if isinstance(obj, (np.generic, float)):
        v = obj.item() if isinstance(obj, np.generic) else obj
        if isinstance(v, float) and stringify and not math.isfinite(v):
            return str(v)
        return v
    if isinstance(obj, PurePath):
        return str(obj)
    return obj
