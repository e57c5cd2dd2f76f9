"""A ``scalselect run`` launched by torchrun: every rank extracts its range, rank 0 selects.

Under ``torchrun --nproc-per-node 8 -m scalselect_fast run ...`` (``WORLD_SIZE`` > 1) each process
is one rank. Rank 0 owns the run (the ``--out`` lock, the state, the checkpoints); the ranks meet
twice on a gloo process group: after rank 0 has set the run's folder up (it tells the others whether
the store still needs extracting), and after every rank has committed its range of the store. Then
rank 0 fits, scores and writes the selection; the other ranks return.

A rank that dies makes torchrun stop the others (its default); committed shards stay, and rerunning
the same command resumes. Not here: the stages themselves (:mod:`.stages`).
"""
from __future__ import annotations

import datetime
import os

from .config import RunError

__all__ = ["RankGroup", "launched_group"]

#: how long a rank may wait for the others (a slow rank's whole extraction can lie in between)
WAIT = datetime.timedelta(days=7)


class RankGroup:
    """The meeting points of the ranks of one launched run.

    Parameters
    ----------
    rank, world : int
        This process's rank and the number of ranks (``RANK``, ``WORLD_SIZE``).
    """

    def __init__(self, rank: int, world: int):
        import torch.distributed as dist

        self.rank, self.world = rank, world
        self._dist = dist
        self._met = False
        if dist.is_initialized():  # the caller's own group (maybe NCCL): meet on a gloo one beside it
            self._group = dist.new_group(backend="gloo", timeout=WAIT)
        else:
            if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
                raise RunError(f"WORLD_SIZE={world} but MASTER_ADDR/MASTER_PORT are not set: launch the ranks with "
                               f"torchrun (e.g. torchrun --nproc-per-node 8 -m scalselect_fast run ...), or use "
                               f"--devices for one process per device")
            dist.init_process_group("gloo", rank=rank, world_size=world, timeout=WAIT)
            self._group = None

    def release(self, extract: bool) -> bool:
        """Rank 0: the run's folder is ready; tell every rank whether to extract. Other ranks: wait for
        that word and return it."""
        box = [bool(extract) if self.rank == 0 else None]
        self._dist.broadcast_object_list(box, src=0, group=self._group)
        return bool(box[0])

    def wait_all(self) -> None:
        """Return once every rank has finished its extraction (once per run)."""
        if not self._met:
            self._dist.barrier(group=self._group)
            self._met = True


def launched_group() -> RankGroup | None:
    """The :class:`RankGroup` of this process when torchrun launched several ranks, else None."""
    from ..extract.ranks import env_rank

    rank, world = env_rank()
    return RankGroup(rank, world) if world > 1 else None
