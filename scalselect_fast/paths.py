"""Output/input path checks shared by every command: an output never replaces an input.

One function, :func:`refuse_overwrite`, called before any work with every path a command reads
and every path it writes. It is not a permission check (the writers report unwritable folders) and
it does not lock anything (the run's lock lives with the run).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

__all__ = ["OverwriteError", "refuse_overwrite"]

#: files of a directory input compared one by one (a store has two per shard); a folder with more
#: is still compared as a whole and by the files seen so far
_MAX_DIR_FILES = 200_000


class OverwriteError(ValueError):
    """An output path is (or would replace, or lies in a folder that holds) one of the inputs."""


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()  # follows symlinks: a link to an input is the input
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def _input_files(path: Path) -> Iterable[Path]:
    """``path`` itself and, for a directory, every file under it (a store's shards and ids)."""
    yield path
    if path.is_dir():
        seen = 0
        for root, _dirs, files in os.walk(path, followlinks=False):
            for name in files:
                yield Path(root) / name
                seen += 1
                if seen >= _MAX_DIR_FILES:
                    return


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def refuse_overwrite(outputs: Iterable[str | os.PathLike | None],
                     inputs: Iterable[str | os.PathLike | None], *, what: str = "--out") -> None:
    """Raise :class:`OverwriteError` if writing ``outputs`` could replace any of ``inputs``.

    Parameters
    ----------
    outputs : iterable of path-like or None
        Files the command creates or replaces, and folders it writes into. An existing folder
        stands for everything under it: no input may lie inside it (a folder that does not exist
        yet holds nothing). None entries are ignored.
    inputs : iterable of path-like or None
        Files and folders the command reads. A folder (a representation store, an image root)
        stands for itself and every file under it. None entries and paths that do not exist are
        compared by resolved path only.
    what : str
        How the message names the output (``"--out"``).

    Raises
    ------
    OverwriteError
        Naming the output, the input it would replace and what to do, in one line.

    Notes
    -----
    Two paths are the same file when their resolved paths (symlinks followed) are equal or when
    both exist with the same ``(st_dev, st_ino)``, which also catches hard links and bind mounts.
    Call it before any work: a refused command has read and written nothing.

    Examples
    --------
    >>> refuse_overwrite(["g.npy"], ["g.npy"])  # doctest: +SKIP
    Traceback (most recent call last):
    OverwriteError: --out g.npy is the input g.npy; ...
    """
    outs = [Path(os.fspath(o)) for o in outputs if o is not None]
    ins = [Path(os.fspath(i)) for i in inputs if i is not None]
    if not outs or not ins:
        return
    by_path: dict[Path, Path] = {}
    by_id: dict[tuple[int, int], Path] = {}
    for top in ins:
        for f in _input_files(top):
            by_path.setdefault(_resolved(f), f)
            ident = _identity(f)
            if ident is not None:
                by_id.setdefault(ident, f)
    for o in outs:
        ro = _resolved(o)
        hit = by_path.get(ro)
        if hit is None:
            ident = _identity(o)
            hit = by_id.get(ident) if ident is not None else None
        if hit is not None:
            raise OverwriteError(f"{what} {o} is the input {hit} (same file); writing it would destroy the "
                                 f"input. Choose another output path")
        if o.is_dir():
            for r, orig in by_path.items():
                if _within(r, ro):
                    raise OverwriteError(f"{what} {o} holds the input {orig}; the command writes into that "
                                         f"folder and could replace it. Choose an output folder that holds "
                                         f"no input")
