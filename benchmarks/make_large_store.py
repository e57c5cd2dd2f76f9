"""Generate a large synthetic representation store on disk (for bench_large / bench_dask).

    python benchmarks/make_large_store.py --n 10000000 --d 1024 --dtype float16 --out /data/reps10m

Rows look like pooled VLM features: a mean offset, a low-rank signal with a decaying (power-law)
spectrum and heavy-tailed per-row scale (a few rows far out, as real features have), plus full-rank
noise carrying ~10% of the energy, so k at 90% energy is a few dozen to a few hundred, not 1 or d.

Speed and memory: the signal is one (rows x rank) @ (rank x d) product per chunk (float64, rounded
once to float32 so the store has the same bits on every CPU), and the
noise is the sum of one row from each of two fixed pools of random rows (pool sizes are distinct
primes, so the pair of pool rows is unique for the first p1*p2 ~ 2.7e8 rows) instead of rows*d fresh normals, which would cost
more than everything else together. The float32 -> storage-dtype cast uses torch when it is
installed (about 3x numpy's), and a writer thread commits shard s (np.save + fsync via StoreWriter)
while shard s+1 is generated. Peak memory is about two shards plus one chunk (< 1.5 GiB at the
defaults). Everything is a function of (seed, chunk index), so the store is deterministic and an
interrupted run resumes: shards already committed with the same parameters are kept.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scalselect_fast.store import StoreWriter  # noqa: E402

try:  # optional: only for the fast float32 -> float16/bfloat16 cast
    import torch
except ImportError:  # pragma: no cover
    torch = None


def _next_prime(x: int) -> int:
    def is_prime(v):
        if v < 2:
            return False
        i = 2
        while i * i <= v:
            if v % i == 0:
                return False
            i += 1
        return True

    while not is_prime(x):
        x += 1
    return x


class Generator:
    """Deterministic row generator: ``rows(start, count)`` depends only on (seed, start, count).

    Parameters
    ----------
    d : int
        Row width.
    rank : int
        Rank of the signal part.
    decay : float
        Signal singular values ``s_j ∝ j**-decay``.
    noise : float
        Fraction of the expected total energy carried by the isotropic noise.
    seed : int
    pool_rows : int
        Approximate size of each noise pool (memory: 2 * pool_rows * d * 4 bytes).
    """

    def __init__(self, d: int, rank: int = 128, decay: float = 0.7, noise: float = 0.1, seed: int = 0,
                 pool_rows: int = 16384):
        rng = np.random.default_rng([seed, 0xB16])
        self.d, self.rank, self.seed = d, rank, seed
        rank = min(rank, d)
        q, _ = np.linalg.qr(rng.standard_normal((d, rank)))
        s = np.arange(1, rank + 1, dtype=np.float64) ** -decay
        s *= np.sqrt((1 - noise) / np.sum(s ** 2))  # signal energy per row = 1 - noise
        self.basis = np.ascontiguousarray((s[:, None] * q.T).astype(np.float32))  # (rank, d)
        self.basis64 = self.basis.astype(np.float64)
        self.mean = (0.5 * rng.standard_normal(d) / np.sqrt(d)).astype(np.float32)
        # two pools, each with half the noise energy per row
        self.p1, self.p2 = _next_prime(pool_rows), _next_prime(pool_rows + 17)
        sd = np.sqrt(noise / 2 / d)
        self.pool1 = (sd * rng.standard_normal((self.p1, d))).astype(np.float32)
        self.pool2 = (sd * rng.standard_normal((self.p2, d))).astype(np.float32)

    def rows(self, start: int, count: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``start .. start+count-1`` as float32, shape (count, d) (written into ``out``)."""
        rng = np.random.default_rng([self.seed, 1, start])
        z = rng.standard_normal((count, self.basis.shape[0]), dtype=np.float32)
        # heavy-tailed row scale: lognormal, so the leverage distribution has a real tail
        z *= np.exp(0.35 * rng.standard_normal((count, 1), dtype=np.float32))
        if out is None:
            out = np.empty((count, self.d), dtype=np.float32)
        # float64 product rounded once to float32: a float32 GEMM's bits depend on the CPU's BLAS
        # kernels, and the store must be the same everywhere (the selection tests read it)
        out[...] = z.astype(np.float64) @ self.basis64
        # row i gets pool1[i mod p1] + pool2[i mod p2]: by the Chinese remainder theorem the pair is
        # unique for i < p1*p2, and both are contiguous runs, so these are plain strided adds
        for pool, p in ((self.pool1, self.p1), (self.pool2, self.p2)):
            pos = 0
            while pos < count:
                a = (start + pos) % p
                m = min(p - a, count - pos)
                out[pos:pos + m] += pool[a:a + m]
                pos += m
        out += self.mean
        return out


def cast_rows(x: np.ndarray, dtype: str, out: np.ndarray) -> np.ndarray:
    """float32 ``x`` -> storage dtype into ``out`` (uint16 bits for bfloat16; RNE rounding)."""
    if torch is not None:
        tdt = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
        t = torch.from_numpy(x).to(tdt)
        out[...] = t.view(torch.int16).numpy().view(out.dtype) if dtype == "bfloat16" else t.numpy()
        return out
    if dtype == "bfloat16":
        bits = x.view(np.uint32)
        out[...] = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        return out
    out[...] = x
    return out


def make_store(out: str | Path, n: int, d: int, dtype: str = "float16", shard_rows: int | None = None,
               chunk_rows: int = 32768, rank: int = 128, decay: float = 0.7, noise: float = 0.1,
               seed: int = 0, force: bool = False, verbose: bool = True) -> dict:
    """Write an (n, d) synthetic store to ``out``; returns timing info. See the module docstring."""
    itemsize = {"float16": 2, "bfloat16": 2, "float32": 4}[dtype]
    if shard_rows is None:  # ~512 MiB shards: enough parallelism for Dask, bounded memory here
        shard_rows = max(chunk_rows, (512 << 20) // (d * itemsize) // chunk_rows * chunk_rows)
    gen = Generator(d, rank=rank, decay=decay, noise=noise, seed=seed)
    prov = {"generator": "benchmarks/make_large_store.py", "generator_version": 2, "n": n, "d": d, "seed": seed, "rank": rank,
            "decay": decay, "noise": noise, "shard_rows": shard_rows}
    writer = StoreWriter(out, d=d, dtype=dtype, provenance=prov, force=force)
    done = writer.committed()
    store_dt = np.uint16 if dtype == "bfloat16" else np.dtype(dtype)
    n_shards = (n + shard_rows - 1) // shard_rows
    t0 = time.perf_counter()
    chunk = np.empty((chunk_rows, d), dtype=np.float32)
    buffers = [np.empty((shard_rows, d), dtype=store_dt) for _ in range(2)]
    pending: threading.Thread | None = None
    errors: list[BaseException] = []
    gen_s = 0.0

    def commit(rows, ids, index):
        try:
            writer.write_shard(rows, ids, index=index)
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    for s in range(n_shards):
        start, count = s * shard_rows, min(shard_rows, n - s * shard_rows)
        if writer.shard_name(s) in done and done[writer.shard_name(s)]["count"] == count:
            continue  # resumed: identical parameters regenerate identical rows
        buf = buffers[s % 2][:count]
        tg = time.perf_counter()
        for c in range(0, count, chunk_rows):
            m = min(chunk_rows, count - c)
            gen.rows(start + c, m, out=chunk[:m])
            cast_rows(chunk[:m], dtype, buf[c:c + m])
        ids = [f"r{i:010d}" for i in range(start, start + count)]
        gen_s += time.perf_counter() - tg
        if pending is not None:  # the other buffer must be written before we reuse it next round
            pending.join()
            if errors:
                raise errors[0]
        pending = threading.Thread(target=commit, args=(buf, ids, s))
        pending.start()
        if verbose:
            el = time.perf_counter() - t0
            print(f"  shard {s + 1}/{n_shards}: {start + count:,} rows generated, {el:.1f}s", flush=True)
    if pending is not None:
        pending.join()
        if errors:
            raise errors[0]
    wall = time.perf_counter() - t0
    nbytes = n * d * itemsize
    return {"n": n, "d": d, "dtype": dtype, "shards": n_shards, "bytes": nbytes, "wall_s": wall,
            "generate_s": gen_s, "write_GBps": nbytes / wall / 1e9}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shard-rows", type=int, default=None, help="rows per shard (default: ~512 MiB)")
    ap.add_argument("--chunk-rows", type=int, default=32768)
    ap.add_argument("--rank", type=int, default=128, help="rank of the signal part")
    ap.add_argument("--decay", type=float, default=0.7, help="signal singular values ~ j**-decay")
    ap.add_argument("--noise", type=float, default=0.1, help="fraction of energy in isotropic noise")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="replace a store made with other parameters")
    a = ap.parse_args(argv)
    info = make_store(a.out, a.n, a.d, a.dtype, a.shard_rows, a.chunk_rows, a.rank, a.decay, a.noise,
                      a.seed, a.force)
    print(f"wrote {info['n']:,} x {info['d']} {info['dtype']} ({info['bytes'] / 1e9:.2f} GB, "
          f"{info['shards']} shards) to {a.out} in {info['wall_s']:.1f}s "
          f"({info['write_GBps']:.2f} GB/s; generation {info['generate_s']:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
