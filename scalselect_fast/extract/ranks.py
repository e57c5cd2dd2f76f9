"""Which records this process extracts: its rank's contiguous range and the device it runs on.

With ``world_size`` W and N records, rank r owns records ``[r*N//W, (r+1)*N//W)`` (see
:mod:`.loop` for how ranges become shards). Not here: the shards themselves.
"""
from __future__ import annotations

import os

__all__ = ["rank_range", "env_rank", "rank_device", "RangeSkipLog"]


def rank_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Records ``[lo, hi)`` owned by ``rank`` of ``world_size`` (contiguous, sizes differ by <= 1)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return rank * n // world_size, (rank + 1) * n // world_size


def env_rank() -> tuple[int, int]:
    """(rank, world_size) from torchrun / accelerate environment variables, (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)
    return rank, world


def rank_device(device, device_map, rank: int, world_size: int):
    """The device rank ``rank`` loads its model on: ``device`` as given, except that ``"auto"`` (or
    None) with several ranks and no ``device_map`` means one GPU per process, ``cuda:LOCAL_RANK``
    (torchrun/accelerate set it; the rank otherwise), or the CPU without CUDA."""
    if device not in (None, "auto") or device_map is not None or world_size == 1:
        return device
    import torch

    return f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}" if torch.cuda.is_available() else "cpu"


class RangeSkipLog:
    """Forward a reader's skip entries to the log only for records this rank owns."""

    def __init__(self, log, lo: int, hi: int, first: bool):
        self.log, self.lo, self.hi, self.first = log, lo, hi, first
        self._indices: set[int] = set()
        self.path = log.path  # named by the reader's "all records were skipped" message

    def add(self, sample_id, index, reason, detail="", **extra):
        mine = (self.lo <= index < self.hi) if index is not None else self.first
        if not mine:
            return False
        if index is not None:
            self._indices.add(int(index))
        return self.log.add(sample_id, index, reason, detail, **extra)

    def count(self, a: int, b: int) -> int:
        """Distinct records in [a, b) the reader refused during this run."""
        return sum(1 for i in self._indices if a <= i < b)

    def __contains__(self, key):
        return key in self.log
