"""Atomic file writes: readers see either the old file or the complete new one, never a part.

Every writer in the package goes through :func:`atomic_path` (temporary name beside the target,
fsync, rename, fsync of the directory); outputs made of several files (dataset shards) go through
:func:`atomic_dir`, which commits a whole directory as one set. This module knows nothing about stores
or datasets. :class:`StagedOutputs` commits several outputs of one job as a set, with a marker file
(the selection's ``report.json``) written last. It also holds :func:`crashpoint`, the named places where
the durability tests kill a writer.

What the outputs are and how they are written is the caller's business: this module only names,
renames, fsyncs and deletes.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

__all__ = ["atomic_dir", "atomic_path", "atomic_write_bytes", "atomic_write_json", "fsync_dir", "crashpoint",
           "StagedOutputs"]


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
            _remove(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class StagedOutputs:
    """Temporary names for the outputs of one job, committed together with a marker file written last.

    ``path(final)`` hands out a fresh temporary path beside ``final`` (``.<name>.stage-XXXX.tmp``:
    the ``stage-`` tag keeps ``selected`` and ``selected.txt`` apart); ``commit(marker_path,
    marker)`` removes the old marker (so a reader knows the set is in flux), renames every staged file
    into place (directories too: an old one is moved aside and deleted after) and writes the marker
    as JSON atomically as the last step. On an exception every staged file is deleted and the
    previous outputs are left as they were, marker included.

    Parameters
    ----------
    out : Path
        The directory the outputs live in (fsynced around the renames).

    Examples
    --------
    >>> with StagedOutputs(out) as stage:                               # doctest: +SKIP
    ...     atomic_write_bytes(stage.path(out / "selected.txt"), b"a\\n")
    ...     stage.commit(out / "report.json", {"n_selected": 1})
    """

    def __init__(self, out: Path):
        self.out = Path(out)
        self.staged: list[tuple[Path, Path]] = []

    def __enter__(self):
        return self

    def path(self, final: Path) -> Path:
        """A fresh temporary path beside ``final``, renamed onto it by :meth:`commit`; not created."""
        final = Path(final)
        # left by a killed job: staged names, and the writers' own temporaries of those
        for pattern in (f".{final.name}.stage-*.tmp", f"..{final.name}.stage-*.tmp.*.tmp"):
            for old in final.parent.glob(pattern):
                _remove(old)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.stage-", suffix=".tmp", dir=final.parent)
        os.close(fd)
        os.unlink(tmp)  # the writers create it (file or directory) through their own atomic path
        self.staged.append((Path(tmp), final))
        return Path(tmp)

    def commit(self, marker_path: Path, marker) -> None:
        """Rename every staged output into place, then write ``marker`` (JSON-able) to ``marker_path``."""
        for tmp, _ in self.staged:
            if not tmp.exists():
                raise FileNotFoundError(f"staged output {tmp} was not written")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(marker_path)
        fsync_dir(self.out)
        for tmp, final in self.staged:
            if final.is_dir() and not final.is_symlink():
                aside = final.with_name(f".{final.name}.old.tmp")
                _remove(aside)
                os.replace(final, aside)
                os.replace(tmp, final)
                _remove(aside)
            else:
                os.replace(tmp, final)
            crashpoint("select.commit")  # the tests kill here after the n-th rename
        fsync_dir(self.out)
        self.staged = []
        atomic_write_json(marker_path, marker)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            for tmp, _ in self.staged:
                _remove(tmp)
        return False


def _remove(p: Path) -> None:
    """Delete a file, link or directory tree; a missing one is fine."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


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
