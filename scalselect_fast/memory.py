"""Give freed memory back to the operating system between the steps of a long job.

A step that reads a shard's ids or a row group as Python strings frees them when it is done, but the
C allocator keeps the pages (glibc returns heap memory only from the top of the heap unless asked) and
so does Arrow's pool; the next step then runs on top of the last one's garbage, and the process's
peak grows with every step. :func:`release_freed` asks both to return what is free. It frees nothing
that is in use, changes no result, and is a no-op where the C library has no ``malloc_trim``.

This module does not decide when memory is released: the job's steps call it between themselves.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["release_freed"]

_trim = None


def _malloc_trim():
    global _trim
    if _trim is None:
        _trim = False
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _trim = libc.malloc_trim
            _trim.argtypes, _trim.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError):  # not glibc (macOS, musl without it): nothing to ask
            _trim = False
    return _trim


def release_freed() -> None:
    """Return the freed pages of Arrow's default pool and of the C heap to the operating system."""
    pa = sys.modules.get("pyarrow")
    if pa is not None:
        pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim:
        trim(0)
