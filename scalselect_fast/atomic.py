"""Atomic file writes: readers see either the old file or the complete new one, never a part.

Every writer in the package goes through :func:`atomic_path` (temporary name beside the target,
fsync, rename, fsync of the directory); outputs made of several files (dataset shards) go through
:func:`atomic_dir`, which commits a whole directory as one set. This module knows nothing about stores
or datasets. It also holds :func:`crashpoint`, the named places where the durability tests kill a writer.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

__all__ = ["atomic_dir", "atomic_path", "atomic_write_bytes", "atomic_write_json", "fsync_dir", "crashpoint"]


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; restored at once, at import (single-threaded)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, sync_dir: bool = True):
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    The file's data is fsynced before the rename; with ``sync_dir`` False the directory is not, and the
    caller makes the rename durable itself (one :func:`fsync_dir` after several renames in one folder).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        # mkstemp makes the file 0600; give it the mode a plain open() would (others may read
        # a store or a selection written by this user)
        os.chmod(tmp, 0o666 & ~_UMASK)
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        if sync_dir:
            fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, sync_dir: bool = True) -> None:
    """Write ``data`` to ``path`` so readers see either the old file or the complete new one
    (``sync_dir``: see :func:`atomic_path`)."""
    with atomic_path(path, sync_dir) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """Atomically write ``obj`` as indented JSON (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary directory beside ``path``; if the block succeeds it becomes ``path`` as a whole.

    Every file under it is fsynced, then it is renamed into place: readers see the previous complete
    directory or the new complete one, never a mix of shards. A previous ``path`` is first renamed
    aside and deleted after the new one is in place (POSIX cannot rename a directory over a
    non-empty one), so a crash between the two renames leaves no ``path`` and the old copy under a
    ``.<name>.*.old`` name, never a partial one. On failure the temporary directory is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)
        yield tmp
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb+") as fh:
                    os.fsync(fh.fileno())
            fsync_dir(Path(root))
        old = None
        if path.exists() or path.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.rmdir(old)
            os.rename(path, old)
        os.rename(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_CRASH_COUNTS: dict[str, int] = {}


def crashpoint(name: str) -> None:
    """``SCALSELECT_CRASH_AT=name:n`` kills this process with SIGKILL on the n-th time ``name`` is hit.

    Used by the tests to stop a writer at an exact place (between two checkpoint commits, or after
    a temporary file is written but before it is renamed) and prove that a rerun recovers.
    """
    spec = os.environ.get("SCALSELECT_CRASH_AT")
    if not spec:
        return
    want, _, nth = spec.partition(":")
    if want != name:
        return
    _CRASH_COUNTS[name] = _CRASH_COUNTS.get(name, 0) + 1
    if _CRASH_COUNTS[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
