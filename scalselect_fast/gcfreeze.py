"""Keep the objects a process loaded (torch, transformers, a model: ~400k of them) out of the cyclic
garbage collector's full collections while a long per-record loop runs.

Such loops allocate a few objects per record that outlive the young generations (pending lookups,
rows of a shard in progress, a batch of parsed records), so a full collection comes every ~10k
records and walks every object of the process: ~0.2 s each, a third of a fully cached extraction's
CPU time on the 2-core box (``benchmarks/bench_cache.py``, part 3b, prints both with and without).
"""
from __future__ import annotations

import contextlib
import gc

__all__ = ["loaded_objects_frozen"]


@contextlib.contextmanager
def loaded_objects_frozen():
    """Context manager: ``gc.freeze()`` on entry, ``gc.unfreeze()`` on exit (also on an error).

    The objects tracked on entry move to the permanent generation and return to the oldest one on
    exit, so garbage among them is still found later; objects made inside are collected as usual. A
    caller that froze objects itself (e.g. before forking workers) keeps its own freeze: nothing is
    frozen or unfrozen then, and nested uses are no-ops. Nothing happens with the collector disabled.
    """
    if not gc.isenabled() or gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
