"""Naming sources and rows for error messages, and tracking invalid (NaN/inf) rows during a pass."""
from __future__ import annotations

import numpy as np

from ..store import MatrixSource, StoreError
from .backends import xp_module
from .result import InvalidRowsError

# --------------------------------------------------------------------------------------------------
# bad rows
# --------------------------------------------------------------------------------------------------
def describe_rows(src: MatrixSource, rows, limit: int = 5) -> str:
    """Human description of global rows: ``row 12 (id 'a', shard 'shard-00000'), ...``."""
    rows = np.asarray(rows, dtype=np.int64)
    parts = []
    ids_cache: dict[str, list[str]] = {}
    for r in rows[:limit]:
        shard = next(s for s in src.shards if s.offset <= r < s.offset + s.count)
        sid = str(r)
        try:
            if hasattr(src, "_ids") and getattr(src, "_ids") is not None:
                sid = src._ids[r]
            elif shard.ids_path is not None:
                if shard.name not in ids_cache:
                    from ..store import read_ids

                    ids_cache[shard.name] = read_ids(shard)
                sid = ids_cache[shard.name][r - shard.offset]
        except (OSError, StoreError):  # an id lookup must not hide the real error
            pass
        parts.append(f"row {int(r)} (id {sid!r}, shard {shard.name!r})")
    more = f" and {rows.size - limit} more" if rows.size > limit else ""
    return ", ".join(parts) + more


def bad_rows_in(buf: np.ndarray) -> np.ndarray:
    """Local indices of rows of ``buf`` with a non-finite value (only called when a sum was)."""
    if isinstance(buf, np.ndarray):
        return np.flatnonzero(~np.isfinite(buf).all(axis=1))
    xp = xp_module(type(buf).__module__.split(".")[0])  # device array: scan there, indices to host
    return np.asarray(xp.asnumpy(xp.flatnonzero(~xp.isfinite(buf).all(axis=1))), dtype=np.int64)


class InvalidTracker:
    """Collects invalid rows during the first pass; raises or drops per ``drop_invalid``."""

    def __init__(self, src: MatrixSource, drop: bool):
        self.src, self.drop = src, drop
        self.rows: list[np.ndarray] = []

    def found(self, offset: int, local: np.ndarray, record: bool) -> None:
        if record:
            self.rows.append(offset + local.astype(np.int64))
        if not self.drop:
            rows = offset + local.astype(np.int64)
            raise InvalidRowsError(
                f"{local.size} row(s) with NaN/inf (or values too large) in this block: "
                f"{describe_rows(self.src, rows)}. Fix or remove them at the source, or pass "
                f"drop_invalid=True (CLI: --drop-invalid) to exclude them from the fit and the "
                f"selection (they are then listed in the report).", rows)

    def all_rows(self) -> np.ndarray:
        """Every recorded row, sorted (shards may be scanned side by side)."""
        return np.sort(np.concatenate(self.rows)) if self.rows else np.empty(0, np.int64)


def source_name(src: MatrixSource) -> str:
    p = getattr(src, "path", None)
    if p is not None:
        return str(p)
    return src.shards[0].path or src.shards[0].name if src.shards else "source"


