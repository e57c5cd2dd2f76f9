"""Representations addressed by content: a cache shared between runs and datasets.

A sample's vector depends on the model (weights, config, tokenizer, chat template), the extraction
settings (layer, threshold, instruction mode, roles / vision tokens / pixels, dtype, max length,
image-size limit, device type, padding side, pooling code version) and the sample itself (its
messages and the bytes of its images) -- never on its id, file, position or shard. The cache key is
a sha256 over exactly that, so a dataset that is re-mixed (files added, dropped, reordered, ids
renamed) finds every vector it already paid for.

Layout (everything written through a temporary name + rename, so readers never see a part)::

    CACHE/
      cache.json                        format marker
      <context>/                        one folder per model + settings (its digest, 24 hex)
        context.json                    what the digest covers (model path, layer, ...), for `cache info`
        <batch>.vec.npy                 float32 (n, d): the pooled vectors, exactly as extracted
        <batch>.idx                     keys (n, 32) uint8, ok (n,) bool, crc (n,) uint32, vec_bytes
                                        (raw, see INDEX_MAGIC; ``.idx.npz`` before key version 2)

A batch is committed by its index file (written after its vector file): an index whose vector file is
missing or of another size is ignored, and every row read back is checked against its CRC32 (over the
key and the vector's bytes); a row that fails is a miss and is extracted again, never returned.
``ok = False`` records a sample the model saw but whose instruction tokens attend to no visual token,
so a rerun skips it without a forward pass.

Limits. The model's weight files enter the key by size + first and last MiB (as the run's resume
fingerprint; reading every byte of a 15 GB checkpoint on each run was judged too slow): a retrained
checkpoint identical in size, header and last MiB would be taken for the same model. An
``image_loader`` passed to the API is not part of the key (the image bytes are).

Two processes may share one cache without a lock: each writes batches under names of its own and
reads only committed batches; the worst case is a sample extracted twice (both copies are valid).

Not here: the representation store of a run (:mod:`scalselect_fast.store`), the loop that decides
what to look up (:mod:`.loop`).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import secrets
import stat
import time
import zlib
from pathlib import Path
from typing import Iterable

import numpy as np

from ..atomic import atomic_path, atomic_write_bytes, atomic_write_json

__all__ = ["RepCache", "CacheError", "model_digest", "sample_key", "messages_bytes", "POOL_VERSION", "KEY_VERSION",
           "cache_info", "verify_cache", "prune_cache"]

#: bump when encoding or pooling changes what vector a sample gets: every older entry then misses
POOL_VERSION = 1
#: bump when :func:`sample_key` hashes other bytes for the same sample; part of the context, so every
#: entry keyed the old way lives under another context folder and misses (never a wrong hit).
#: 1: messages as canonical JSON; 2: :func:`messages_bytes`
KEY_VERSION = 2
FORMAT = "scalselect-rep-cache"
VERSION = 1
#: entries buffered before a batch file is written (a crash loses at most these)
FLUSH_ROWS = 4096

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")


class CacheError(RuntimeError):
    """The cache directory cannot be used (not a cache, unwritable); the message says what to do."""


def model_digest(path: str | os.PathLike) -> str:
    """sha256 over a model directory: every config/tokenizer file whole, weights by size + head + tail.

    Big weight files are identified by size, first and last MiB without reading GBs, and without
    their modification time (unlike the input's digest), so a copied or re-downloaded checkpoint
    keeps its cache entries and run fingerprint.
    """
    from ..data.sources import hash_file

    p = Path(path)
    h = hashlib.sha256(b"model\0")
    files = sorted(f for f in (p.rglob("*") if p.is_dir() else [p]) if f.is_file() and not f.name.startswith("."))
    for f in files:
        hash_file(h, f.name, f.stat().st_size, lambda f=f: open(f, "rb"), whole=not f.name.endswith(_WEIGHT_SUFFIXES))
    return h.hexdigest()[:32]


_EMBEDDED = None


def _embedded_type():
    """:class:`~scalselect_fast.data.EmbeddedImage`, imported on first use (this module is also what
    ``scalselect cache info`` imports, which needs no dataset code) and then kept: per-sample imports
    were a measurable part of a cached rerun."""
    global _EMBEDDED
    if _EMBEDDED is None:
        from ..data.sample import EmbeddedImage

        _EMBEDDED = EmbeddedImage
    return _EMBEDDED


_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def _read_regular_file(path) -> tuple[bytes | None, os.stat_result | None]:
    """``(bytes, stat)`` of a regular file read whole, stat taken on the open descriptor before the read;
    ``(None, None)`` when it cannot be opened or read or is not a regular file (a FIFO or device named as
    an image must not hang the key: it is opened without blocking)."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except (OSError, ValueError):
        return None, None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, None
        # one read of size + 1 bytes: a short read is the end of a regular file; a full one means the
        # file grew since the stat, so read on to its end
        data = os.read(fd, st.st_size + 1)
        if len(data) > st.st_size:
            chunks = [data]
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            data = b"".join(chunks)
        return data, st
    except OSError:
        return None, None
    finally:
        os.close(fd)


def _read_image(img) -> tuple[bytes | None, os.stat_result | None]:
    """The bytes an image contributes to the key, and the file's stat when it is a file (else None);
    bytes None when it cannot be read (the sample then misses and the extraction reports it as it
    always does)."""
    if isinstance(img, _embedded_type()):  # (before PathLike: it has __fspath__, for its name)
        return bytes(img.data), None
    if isinstance(img, (str, os.PathLike)):
        return _read_regular_file(img)
    tobytes = getattr(img, "tobytes", None)  # an in-memory PIL image handed to the API
    if tobytes is not None and hasattr(img, "mode") and hasattr(img, "size"):
        return f"pil:{img.mode}:{img.size}\0".encode() + tobytes(), None
    return None, None


#: one encoder for messages that are not plain ``{"role", "content"}`` string pairs (see
#: :func:`messages_bytes`): ``json.dumps`` with options builds a new encoder per call
_MESSAGES_JSON = json.JSONEncoder(sort_keys=True, ensure_ascii=False, default=str)


def messages_bytes(messages: list) -> bytes:
    """The bytes a sample's messages contribute to its key: an unambiguous encoding of everything in them.

    Messages that are all ``{"role": str, "content": str}`` (what every reader yields) are written
    length-prefixed, ``b"L"`` then ``f"{len(role)}:{len(content)}:{role}{content}"`` per message
    (UTF-8, lone surrogates kept as themselves); anything else (other keys, non-string values) as
    ``b"J"`` + canonical JSON (sorted keys). The tag keeps the two forms from ever meeting: equal bytes
    mean equal messages. Four times cheaper than canonical JSON for every message (measured on the demo).
    """
    parts = []
    for m in messages:
        if type(m) is dict and len(m) == 2:
            role, content = m.get("role"), m.get("content")
            if type(role) is str and type(content) is str:
                parts.append(f"{len(role)}:{len(content)}:{role}{content}")
                continue
        return b"J" + _MESSAGES_JSON.encode(messages).encode("utf-8", "surrogatepass")
    return b"L" + "".join(parts).encode("utf-8", "surrogatepass")


@functools.lru_cache(maxsize=8)
def _context_hasher(context: bytes):
    """sha256 that has consumed the key's prefix for ``context``; copied per sample."""
    return hashlib.sha256(b"sample\0" + context)


def sample_key(context: bytes, sample, pinned: list | None = None, stats: list | None = None) -> bytes | None:
    """The 32-byte key of ``sample`` under ``context`` (see :meth:`RepCache.context_digest`).

    ``sha256(b"sample\\0" + context + messages_bytes(sample.messages) + f"\\0{n_images}\\0" +
    (len(image) as 8 little-endian bytes + image bytes) per image)``: the sample's messages
    (:func:`messages_bytes`) and each image's bytes, in order; not its id, index, file or source.
    None when an image cannot be read. ``pinned``, when given, receives the sample's images with every
    file replaced by the bytes just hashed (an ``EmbeddedImage`` of the same name), so what is
    extracted is exactly what the key names even if the file changes meanwhile. ``stats``, when given,
    receives one entry per image: the file's ``os.stat_result`` taken on the descriptor the bytes were
    read from, or None for an image that is not a file (the caller records size and mtime without a
    second ``stat``); it is complete only when the key is not None.
    """
    h = _context_hasher(context).copy()
    images = sample.images
    h.update(messages_bytes(sample.messages) + f"\0{len(images)}\0".encode())
    embedded = None
    for img in images:
        # a path string is what every file-based reader yields: read it without the type dispatch
        data, st = _read_regular_file(img) if type(img) is str else _read_image(img)
        if data is None:
            return None
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
        if stats is not None:
            stats.append(st)
        if pinned is not None:
            if st is not None:
                embedded = embedded or _embedded_type()
                img = embedded(data, os.fspath(img))
            pinned.append(img)
    return h.digest()


def _row_crc(key: bytes, vec: np.ndarray, ok: bool) -> int:
    return zlib.crc32(np.ascontiguousarray(vec, dtype=np.float32).tobytes(), zlib.crc32(key + (b"\1" if ok else b"\0")))


def _check_root(root: Path) -> None:
    marker = root / "cache.json"
    if marker.is_file():
        try:
            meta = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CacheError(f"--cache {root}: unreadable {marker.name} ({exc}); point --cache at another "
                             f"directory or delete this one") from exc
        if meta.get("format") != FORMAT:
            raise CacheError(f"--cache {root}: not a representation cache ({marker.name} says "
                             f"{meta.get('format')!r}); choose another directory")
        return
    if root.exists() and not root.is_dir():
        raise CacheError(f"--cache {root} is a file; pass a directory (created if missing)")
    if root.is_dir() and any(p for p in root.iterdir() if not p.name.startswith(".")):
        raise CacheError(f"--cache {root} is a non-empty directory that is not a representation cache; choose "
                         f"an empty or new directory")
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, {"format": FORMAT, "version": VERSION})


#: a batch's index file: ``INDEX_MAGIC``, then little-endian uint64 ``n`` and ``vec_bytes`` (the size of its
#: vector file), then the keys (n x 32 bytes), the flags (n bytes, 0/1) and the CRC32s (n x uint32 LE).
#: Read with one ``read`` and three ``frombuffer`` (an ``.npz`` took 0.46 ms per batch to open).
INDEX_SUFFIX = ".idx"
INDEX_MAGIC = b"SSCIDX1\n"
#: the index of batches written before (``np.savez`` of keys, ok, crc, vec_bytes); still read by
#: ``cache info|verify|prune`` (they live under key-version-1 contexts, which no run opens any more)
LEGACY_INDEX_SUFFIX = ".idx.npz"
_HEAD = len(INDEX_MAGIC) + 16


def _index_files(folder: Path) -> list[Path]:
    """The committed batches' index files of one context folder, in name order (both formats)."""
    return sorted(p for p in folder.iterdir() if p.name.endswith((INDEX_SUFFIX, LEGACY_INDEX_SUFFIX))
                  and not p.name.startswith("."))


def _vec_path(idx_path: Path) -> Path:
    name = idx_path.name
    stem = name[: -len(LEGACY_INDEX_SUFFIX)] if name.endswith(LEGACY_INDEX_SUFFIX) else name[: -len(INDEX_SUFFIX)]
    return idx_path.with_name(stem + ".vec.npy")


def _index_bytes(keys: np.ndarray, ok: np.ndarray, crc: np.ndarray, vec_bytes: int) -> bytes:
    return b"".join([INDEX_MAGIC, np.array([len(keys), vec_bytes], "<u8").tobytes(), keys.tobytes(),
                     ok.astype(np.uint8).tobytes(), crc.astype("<u4").tobytes()])


def _parse_index(data: bytes):
    """``(keys, ok, crc, vec_bytes)`` of an index file's bytes; ValueError when they are not one."""
    if data[:len(INDEX_MAGIC)] != INDEX_MAGIC or len(data) < _HEAD:
        raise ValueError("not a cache index (bad magic)")
    n, vec_bytes = (int(v) for v in np.frombuffer(data, "<u8", 2, len(INDEX_MAGIC)))
    if len(data) != _HEAD + 37 * n:
        raise ValueError(f"{len(data)} bytes for {n} entries, {_HEAD + 37 * n} expected")
    keys = np.frombuffer(data, np.uint8, 32 * n, _HEAD).reshape(n, 32)
    ok = np.frombuffer(data, np.uint8, n, _HEAD + 32 * n).astype(bool)
    crc = np.frombuffer(data, "<u4", n, _HEAD + 33 * n)
    return keys, ok, crc, vec_bytes


class _Batch:
    """One committed batch file pair, read lazily (the vectors are memory-mapped)."""

    def __init__(self, idx_path: Path, n: int, d: int, vec_bytes: int):
        self.idx_path = idx_path
        self.vec_path = _vec_path(idx_path)
        self.n, self.d, self.vec_bytes = n, d, vec_bytes
        self._vecs = None

    def vectors(self) -> np.ndarray:
        """(n, d) float32, mapped: the rows are the file's last n·d·4 bytes (its size was checked against
        the index when the cache was opened), so the ``.npy`` header need not be parsed; a damaged
        header or body shows as rows failing their CRC."""
        if self._vecs is None:
            offset = self.vec_bytes - self.n * self.d * 4
            if offset < 10:  # not even an .npy preamble before the rows
                raise ValueError(f"{self.vec_bytes} bytes cannot hold {self.n} rows of {self.d} float32")
            self._vecs = np.memmap(self.vec_path, dtype="<f4", mode="r", offset=offset, shape=(self.n, self.d))
        return self._vecs


def _load_index(idx_path: Path):
    """``((keys, ok, crc), vec_bytes)`` of a committed batch, or ``(None, reason)`` when it cannot be used."""
    try:
        if idx_path.name.endswith(LEGACY_INDEX_SUFFIX):
            with np.load(idx_path, allow_pickle=False) as z:
                keys, ok, crc, vec_bytes = z["keys"], z["ok"], z["crc"], int(z["vec_bytes"])
        else:
            keys, ok, crc, vec_bytes = _parse_index(idx_path.read_bytes())
    except Exception as exc:  # noqa: BLE001 - read/zip/npy errors of every kind mean "unusable"
        return None, f"unreadable index ({type(exc).__name__}: {exc})"
    try:
        size = _vec_path(idx_path).stat().st_size
    except OSError:
        return None, "its vector file is missing"
    if size != vec_bytes:
        return None, f"its vector file has {size} bytes, {vec_bytes} expected"
    if keys.ndim != 2 or keys.shape[1] != 32 or not (len(keys) == len(ok) == len(crc)):
        return None, "malformed index"
    return (keys, ok, crc), vec_bytes


class RepCache:
    """A representation cache directory opened for one model + settings (its *context*).

    Parameters
    ----------
    root : path
        The cache directory (created; refused if it holds something else).
    context : dict
        Everything besides the sample that determines a vector (JSON-able); its digest names the
        folder the entries live in.
    d : int
        Vector width (the model's hidden size).
    warn : callable, optional
        Receives one message per unusable batch or entry (they are extracted again).
    about : dict, optional
        Descriptive fields (the model's path) written to ``context.json`` but not part of the digest:
        a model directory that moves keeps its entries.

    Notes
    -----
    The index of every committed batch of the context is read once when the cache is opened: keys
    are kept as a sorted uint64 prefix array with its order, the 32-byte keys and where each entry
    lives, its flag and CRC (61 bytes per entry: ~0.6 GB for 10M entries), so a lookup is a binary
    search. Batches committed by another process after that are not seen by this one.
    """

    def __init__(self, root: str | os.PathLike, context: dict, d: int, warn=None, about: dict | None = None):
        self.root = Path(root)
        _check_root(self.root)
        self.context = dict(context, pool_version=POOL_VERSION, key_version=KEY_VERSION, d=int(d))
        self.context_bytes = json.dumps(self.context, sort_keys=True, default=str).encode()
        self.digest = hashlib.sha256(self.context_bytes).hexdigest()[:24]
        self.dir = self.root / self.digest
        self.d = int(d)
        self.warn = warn or (lambda msg: None)
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.dir / "context.json").is_file():
            atomic_write_json(self.dir / "context.json", {**(about or {}), **self.context, "created": time.time()})
        self.reused = 0
        self.extracted = 0
        self._pending_keys: list[bytes] = []
        self._pending_vecs: list[np.ndarray] = []
        self._pending_ok: list[bool] = []
        self._load()

    # ---------------------------------------------------------------------------------------------
    def _load(self) -> None:
        self._batches: list[_Batch] = []
        keys, which, rows = [], [], []
        for p in _index_files(self.dir):
            got, vec_bytes_or_why = _load_index(p)
            if got is None:
                self.warn(f"cache batch {p} is unusable ({vec_bytes_or_why}); its samples are extracted again")
                continue
            k, ok, crc = got
            b = _Batch(p, len(k), self.d, vec_bytes_or_why)
            b.ok, b.crc = ok, crc
            keys.append(k)
            which.append(np.full(len(k), len(self._batches), np.int32))
            rows.append(np.arange(len(k), dtype=np.int32))
            self._batches.append(b)
        all_keys = np.concatenate(keys) if keys else np.zeros((0, 32), np.uint8)
        self._which = np.concatenate(which) if which else np.zeros(0, np.int32)
        self._rows = np.concatenate(rows) if rows else np.zeros(0, np.int32)
        prefix = np.ascontiguousarray(all_keys[:, :8]).view("<u8").ravel()
        self._order = np.argsort(prefix, kind="stable")
        self._prefix = prefix[self._order]
        self._keys = all_keys  # (n, 32) uint8: compared a lookup's worth at once
        self._key_bytes = all_keys.tobytes()  # byte-slice comparisons for the rare shared prefixes

    def __len__(self) -> int:
        return len(self._prefix)

    def context_digest(self) -> bytes:
        return self.context_bytes

    def key(self, sample, pinned: list | None = None, stats: list | None = None) -> bytes | None:
        """The sample's key under this cache's context (see :func:`sample_key`)."""
        return sample_key(self.context_bytes, sample, pinned, stats)

    def get(self, key: bytes | None):
        """``(found, ok, vector)``: a checked float32 copy of the entry for ``key``, if any.

        An entry whose CRC does not match (a flipped bit on disk) is reported once and treated as
        absent, so the caller extracts the sample again.
        """
        return self.get_many([key])[0]

    def get_many(self, keys: list) -> list:
        """:meth:`get` for many keys at once: one ``(found, ok, vector)`` per key, in order.

        One vectorised binary search for all keys and one gather per batch file, instead of a numpy
        call per key; every entry returned has passed its CRC like :meth:`get`'s.
        """
        out = [(False, False, None)] * len(keys)
        n = len(self._prefix)
        asked = [i for i, k in enumerate(keys) if k is not None and len(k) == 32]
        if not n or not asked:
            return out
        q = np.frombuffer(b"".join([keys[i] for i in asked]), np.uint8).reshape(-1, 32)
        qp = np.ascontiguousarray(q[:, :8]).view("<u8").ravel()
        at = self._prefix.searchsorted(qp)
        prefix = self._prefix
        found = at < n
        found[found] = prefix[at[found]] == qp[found]
        # a prefix held by more than one entry (a key stored twice after a corrupt copy, or a 64-bit
        # prefix collision) is rare: those keys walk their entries one by one below
        nxt = at + 1
        several = found & (nxt < n)
        several[several] = prefix[nxt[several]] == qp[several]
        single = found & ~several
        pos = self._order[at[single]]
        same = (self._keys[pos] == q[single]).all(axis=1)
        # every entry holding each key, in index order: (key position in `keys`, batch, row)
        candidates: list[tuple[int, int, int]] = list(zip(
            np.asarray(asked)[single][same].tolist(), self._which[pos[same]].tolist(),
            self._rows[pos[same]].tolist()))
        key_bytes = self._key_bytes
        for k in np.flatnonzero(several).tolist():
            i, a, qi = asked[k], int(at[k]), int(qp[k])
            key = keys[i]
            while a < n and int(prefix[a]) == qi:
                p = int(self._order[a])
                a += 1
                if key_bytes[p * 32:(p + 1) * 32] == key:
                    candidates.append((i, int(self._which[p]), int(self._rows[p])))
        by_batch: dict[int, list] = {}
        for c in candidates:
            by_batch.setdefault(c[1], []).append(c)
        checked: dict[tuple, tuple] = {}  # (key position, batch, row) -> (ok, vector) that passed
        for which, cs in by_batch.items():
            b = self._batches[which]
            rows = [r for _, _, r in cs]
            try:
                vecs = np.asarray(b.vectors())[rows].astype(np.float32, copy=False)
            except (OSError, ValueError, IndexError) as exc:
                self.warn(f"cache batch {b.vec_path} is unreadable ({exc}); extracting its samples again")
                continue
            for (i, _, r), vec, ok, crc in zip(cs, vecs, b.ok[rows].tolist(), b.crc[rows].tolist()):
                if _row_crc(keys[i], vec, ok) != crc:
                    self.warn(f"cache entry {keys[i].hex()[:16]} in {b.vec_path} fails its checksum; extracting "
                              f"it again")
                    continue
                checked[(i, which, r)] = (ok, vec)
        for c in candidates:
            if not out[c[0]][0] and c in checked:
                out[c[0]] = (True, *checked[c])
        return out

    def put(self, key: bytes | None, vector: np.ndarray | None) -> None:
        """Add an entry (``vector`` None: the sample has no representation, see the module notes);
        written with the next :meth:`flush`, or automatically every ``FLUSH_ROWS`` entries."""
        if key is None:
            return
        ok = vector is not None
        self._pending_keys.append(key)
        self._pending_vecs.append(np.asarray(vector, np.float32) if ok else np.zeros(self.d, np.float32))
        self._pending_ok.append(ok)
        if len(self._pending_keys) >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        """Commit the buffered entries as one batch: vectors first, then the index that names them."""
        if not self._pending_keys:
            return
        vecs = np.stack(self._pending_vecs).astype(np.float32, copy=False)
        ok = np.asarray(self._pending_ok, bool)
        keys = np.frombuffer(b"".join(self._pending_keys), np.uint8).reshape(-1, 32)
        crc = np.asarray([_row_crc(k, v, o) for k, v, o in zip(self._pending_keys, vecs, ok)], np.uint32)
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{secrets.token_hex(4)}"
        vec_path = self.dir / f"{name}.vec.npy"
        with atomic_path(vec_path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, vecs.astype("<f4", copy=False), allow_pickle=False)  # little-endian, as read back
        atomic_write_bytes(self.dir / f"{name}{INDEX_SUFFIX}", _index_bytes(keys, ok, crc, vec_path.stat().st_size))
        self._pending_keys, self._pending_vecs, self._pending_ok = [], [], []


# --------------------------------------------------------------------------------------------------
# maintenance: `scalselect cache info|verify|prune`
# --------------------------------------------------------------------------------------------------
def _contexts(root: Path) -> Iterable[Path]:
    if not (root / "cache.json").is_file():
        raise CacheError(f"{root} is not a representation cache (no cache.json)")
    return sorted(p for p in root.iterdir() if p.is_dir())


def cache_info(root: str | os.PathLike) -> dict:
    """Size, entries and batches per context (model + settings) of a cache directory."""
    root = Path(root)
    out = {"cache": str(root), "bytes": 0, "entries": 0, "contexts": []}
    for c in _contexts(root):
        try:
            ctx = json.loads((c / "context.json").read_text())
        except (OSError, json.JSONDecodeError):
            ctx = {}
        n = nb = size = 0
        newest = 0.0
        for p in c.iterdir():
            if p.is_file():
                size += p.stat().st_size
        for p in _index_files(c):
            got, _ = _load_index(p)
            nb += 1
            n += len(got[0]) if got else 0
            newest = max(newest, p.stat().st_mtime)
        out["contexts"].append({"context": c.name, "model": ctx.get("model"), "layer": ctx.get("layer"),
                                "entries": n, "batches": nb, "bytes": size, "last_write": newest})
        out["bytes"] += size
        out["entries"] += n
    out["bytes_per_entry"] = round(out["bytes"] / out["entries"], 1) if out["entries"] else None
    return out


def verify_cache(root: str | os.PathLike) -> dict:
    """Read every entry and check its CRC; returns counts and the unusable batches / entries."""
    root = Path(root)
    rep = {"entries": 0, "bad_entries": 0, "bad_batches": []}
    for c in _contexts(root):
        for p in _index_files(c):
            got, why = _load_index(p)
            if got is None:
                rep["bad_batches"].append({"batch": str(p), "why": why})
                continue
            keys, ok, crc = got
            vec_bytes = why
            try:  # the rows as a run reads them: the file's last n·d·4 bytes, d from the context
                d = int(json.loads((c / "context.json").read_text())["d"])
                vecs = _Batch(p, len(keys), d, vec_bytes).vectors()
            except (OSError, ValueError, KeyError, TypeError) as exc:
                rep["bad_batches"].append({"batch": str(p), "why": f"unreadable vectors ({exc})"})
                continue
            for i in range(len(keys)):
                rep["entries"] += 1
                if _row_crc(keys[i].tobytes(), vecs[i], bool(ok[i])) != int(crc[i]):
                    rep["bad_entries"] += 1
    return rep


def prune_cache(root: str | os.PathLike, *, older_than_days: float | None = None, model: str | None = None,
                dry_run: bool = False) -> dict:
    """Delete batches written more than ``older_than_days`` ago, and/or every context whose model
    path or context digest contains ``model``. Returns what was (or would be) removed."""
    import shutil

    root = Path(root)
    if older_than_days is None and model is None:
        raise CacheError("prune needs --older-than DAYS and/or --model NAME (nothing is removed otherwise)")
    removed = {"contexts": [], "batches": 0, "bytes": 0}
    now = time.time()
    for c in _contexts(root):
        ctx = {}
        try:
            ctx = json.loads((c / "context.json").read_text())
        except (OSError, json.JSONDecodeError):
            pass
        if model is not None and (model in str(ctx.get("model", "")) or c.name.startswith(model)):
            removed["contexts"].append(c.name)
            removed["bytes"] += sum(p.stat().st_size for p in c.iterdir() if p.is_file())
            removed["batches"] += len(_index_files(c))
            if not dry_run:
                shutil.rmtree(c)
            continue
        if older_than_days is not None:
            for p in _index_files(c):
                if now - p.stat().st_mtime > older_than_days * 86400:
                    vec = _vec_path(p)
                    removed["batches"] += 1
                    removed["bytes"] += p.stat().st_size + (vec.stat().st_size if vec.exists() else 0)
                    if not dry_run:
                        p.unlink()  # the index first: the batch is uncommitted before its vectors go
                        vec.unlink(missing_ok=True)
    # temporary files of writers killed mid-write (never renamed into place, so never read)
    for c in _contexts(root):
        for p in c.glob(".*.tmp"):
            if now - p.stat().st_mtime > 86400:
                removed["bytes"] += p.stat().st_size
                if not dry_run:
                    p.unlink(missing_ok=True)
    return removed
