"""One writer per output: an exclusive ``flock`` on a lock file inside the directory a job writes.

``scalselect run --out D`` holds ``D/.scalselect.lock`` and an extraction into store ``S`` holds
``S/.extract.lock`` (``S/.extract-rank003.lock`` per rank of a data-parallel job, since ranks write
disjoint shards of one store) for as long as they run. A second job on the same directory does
not wait: it stops at once with :class:`LockError` naming the holder's PID. The kernel releases
the lock when the holder exits, however it exits (``kill -9`` included), so a stale lock file
never blocks anyone. The holder removes the file when it finishes (while still holding the lock; a
contender that locked the removed file notices the inode changed and locks the new one).

Not a distributed lock: ``flock`` is per host (and unreliable on some network file systems).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from typing import Iterator

__all__ = ["LockError", "exclusive_lock"]


class LockError(RuntimeError):
    """Another process holds the lock on an output directory; the message names its PID."""

    def __init__(self, message: str, pid: int | None = None):
        super().__init__(message)
        self.pid = pid


#: descriptors of the locks this process holds; a forked child (an encoding worker) closes its copies,
#: so a worker orphaned by a ``kill -9`` of its parent cannot keep the lock alive
_HELD: set[int] = set()


def _close_in_child() -> None:
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)  # only this copy: the parent's descriptor still holds the lock
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


def _holder(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    return None


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold an exclusive, non-blocking ``flock`` on ``path`` (created if missing) for the block.

    Parameters
    ----------
    path : path
        The lock file (its directory must exist).
    what : str
        How to name the locked thing in the error, e.g. ``"--out runs/a"``.

    Raises
    ------
    LockError
        Another process holds the lock; the message names its PID (written into the file by the
        holder) and what to do.
    """
    path = Path(path)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            pid = _holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            who = f"PID {pid}" if pid is not None else "another process (PID not yet recorded)"
            raise LockError(f"{what} is in use by another scalselect process ({who}, lock {path}); wait for "
                            f"it to finish or stop it, then rerun: finished work is kept", pid=pid) from None
        # The holder we raced with may have removed the file after we opened it: then we locked an
        # orphan inode and must lock the file that is there now.
        mine = os.fstat(fd)
        try:
            now = os.stat(path)
        except FileNotFoundError:
            now = None
        if now is not None and (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD.add(fd)
        try:
            yield path
        finally:
            _HELD.discard(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)  # while still holding it, so nothing is left behind (see the loop above)
    finally:
        os.close(fd)  # closing the last descriptor releases the flock
