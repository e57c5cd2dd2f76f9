"""Store repair: which committed shards of an extraction store must be extracted again, and why.

A shard is redone when its files are missing or damaged, or when the images of its records changed
since it was written (:class:`ImagesDigest`, recorded with each shard). Not here: the extraction
itself (:mod:`.loop` re-extracts what this takes off the manifest).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

__all__ = ["ImagesDigest", "repair_shards", "repair_store"]


class ImagesDigest:
    """What one shard's images were when it was extracted: sha256 over each sample's record index and,
    per image, the path with its size and modification time (``st_mtime_ns``).

    An image carried inside the dataset (:class:`~scalselect_fast.data.EmbeddedImage`) contributes only
    its name: its bytes are part of the dataset file, which the store's provenance fingerprints whole.
    ``files`` says whether any image was not embedded: a shard without such images has a digest the
    data fingerprint already decides, so a resume need not read the dataset again to recompute it.
    """

    def __init__(self):
        from ..data import EmbeddedImage

        self._h = hashlib.sha256()
        self.files = False
        self._embedded = EmbeddedImage  # imported once per shard, not per sample

    def add(self, sample, stats: list | None = None) -> None:
        """Record one sample's images. ``stats``, when given, holds one ``os.stat_result`` (or None) per
        image, taken when its bytes were read for the cache key (:func:`~.cache.sample_key`): a file
        with one is not stat'ed a second time."""
        parts = [str(sample.index)]
        for n, img in enumerate(sample.images):
            if isinstance(img, self._embedded):
                parts.append(f"embedded:{img.name}")
            elif isinstance(img, (str, os.PathLike)):
                self.files = True
                try:
                    st = stats[n] if stats is not None and stats[n] is not None else os.stat(img)
                    parts.append(f"file:{os.fspath(img)}:{st.st_size}:{st.st_mtime_ns}")
                except OSError as e:  # missing now: if it appears later the shard is redone
                    parts.append(f"file:{os.fspath(img)}:errno{e.errno}")
            else:  # an in-memory image handed to the API: nothing on disk to compare
                self.files = True
                parts.append(f"object:{type(img).__name__}")
        self._h.update("\0".join(parts).encode("utf-8", "surrogateescape") + b"\n")

    def hexdigest(self) -> str:
        return "sha256:" + self._h.hexdigest()


def _stale_shards(store: Path, records: dict[str, dict], data, image_root, format, id_field=None) -> dict[str, str]:
    """Which committed shards must be extracted again, and why: ``{name: reason}``.

    A shard is redone when its files are missing, or were changed since their commit (size or
    modification time) and fail their checksum, or when the images of its records changed since it was
    written (:class:`ImagesDigest`). Unchanged files are not re-read here: the fit's first read
    checks their CRC, and a run re-extracts a shard that fails it (:func:`scalselect_fast.run.run`).
    """
    import bisect

    from ..data import read_dataset
    from ..data.skiplog import DiscardSkips
    from ..store import StoreError, StoreSource, shard_file_stat

    bad: dict[str, str] = {}
    src = StoreSource(store)
    for shard in src.shards:
        rec = records.get(shard.name)
        if rec is None:
            continue
        if not all(Path(p).is_file() for p in (shard.path, shard.ids_path, shard.keys_path, shard.keys_context_path)
                   if p is not None):
            bad[shard.name] = "missing"
            continue
        if rec.get("stat") is not None and rec["stat"] == shard_file_stat(store, rec["rows_file"], rec["ids_file"],
                                                                          rec.get("keys_file")):
            continue  # untouched since its commit (its first full read still checks the CRC)
        try:
            src.check_shard(shard)
        except StoreError as exc:
            bad[shard.name] = f"corrupt ({str(exc).split('. ')[0]})"
    # shards whose images were all embedded: their digest follows from the records, which the data
    # fingerprint checked before this (the store's provenance, the run's state), so the dataset is not
    # read again for them (at 10M records that read is all the image bytes once more)
    spans = sorted((rec["range"][0], rec["range"][1], name) for name, rec in records.items()
                   if name not in bad and rec.get("image_files") is not False)
    if spans:
        starts = [a for a, _, _ in spans]
        digests = {name: ImagesDigest() for _, _, name in spans}
        for sample in read_dataset(data, image_root=image_root, format=format, skip_log=DiscardSkips(),
                                   id_field=id_field):
            if sample.index >= spans[-1][1]:
                break
            k = bisect.bisect_right(starts, sample.index) - 1
            if k >= 0 and sample.index < spans[k][1]:
                digests[spans[k][2]].add(sample)
        for a, b, name in spans:
            want = records[name].get("images")
            if want != digests[name].hexdigest():
                bad[name] = ("its images changed since it was extracted (size or modification time of an image "
                             "file)" if want else "it has no record of its images (written by an older version)")
    return bad


def repair_shards(store: Path, records: dict[str, dict], data, image_root, format, warn: Callable[[str], None],
            id_field=None) -> list[str]:
    """Take stale or damaged committed shards off the manifest (moving damaged files aside); say so."""
    from ..store import uncommit_shards

    bad = _stale_shards(store, records, data, image_root, format, id_field)
    for name, why in sorted(bad.items()):
        damaged = not why.startswith("its ")
        moved = uncommit_shards(store, [name], move_aside=damaged)
        a, b = records[name]["range"]
        aside = f"moved its files aside ({', '.join(p.name for p in moved)}) and " if moved else ""
        warn(f"shard {name} of {store} (records {a}-{b - 1}) {'is ' if damaged else 'changed: '}{why}; {aside}"
             f"re-extracting only that shard (every other shard is kept)")
    return sorted(bad)


def repair_store(store: str | os.PathLike, data: str | os.PathLike, *, image_root=None, format: str = "auto",
                 warn: Callable[[str], None] | None = None, id_field: str | None = None) -> list[str]:
    """Check every committed shard of an extraction store against its files and the dataset's images.

    Shards whose files are missing or fail their checksum are taken off the manifest and their
    files renamed to ``<file>.corrupt-<time>``; shards whose images changed since extraction (size or
    modification time) are taken off the manifest. Rerunning :func:`extract_to_store` then re-extracts
    exactly those shards and keeps the others.

    Parameters
    ----------
    store : path
        A store written by :func:`extract_to_store` (shard records carry their record range).
    data, image_root, format, id_field
        The dataset the store was extracted from, as passed to :func:`extract_to_store`.
    warn : callable, optional
        Receives one message per finding (default: ``logging.warning``).

    Returns
    -------
    list of str
        Names of the shards taken off the manifest (empty when everything is intact).
    """
    from ..store import MANIFEST

    store = Path(store)
    records = {r["name"]: r for r in json.loads((store / MANIFEST).read_text()).get("shards", []) if "range" in r}
    if not records:
        return []
    return repair_shards(store, records, data, image_root, format, warn or log.warning, id_field)
