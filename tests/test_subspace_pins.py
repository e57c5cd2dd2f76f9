"""The selections the fit gives on the bundled demo representations and on a sharded store, pinned.

Recorded (native kernels, OMP_NUM_THREADS=1 and 2) before issue 13 moved the fit into the ``subspace/`` package and made one exact-fit
finisher (local, Dask, SubspaceAccumulator and ``scalselect run`` all use it): the selected row
indices (top 16% by leverage) must stay exactly these. A hash of the int64 indices is compared, so
a single changed or reordered row fails the test.
"""
import hashlib
from pathlib import Path

import numpy as np
import pytest

import scalselect_fast as ss
from scalselect_fast import native
from scalselect_fast.scoring import leverage_scores, top_k
from scalselect_fast.store import StoreWriter, open_source
from scalselect_fast.subspace import GramAccumulator, Subspace, subspace_from_gram
from scalselect_fast.subspace.passes import _first_block_mean

DEMO = Path(ss.__file__).parent / "assets" / "demo_reps.npy"

# name -> (data, fit options, k, (digest with the native kernels, digest with the Python fallback)):
# sha256[:16] of the selected int64 indices, recorded on the pre-split code. The two builds round
# the fp16 decode and the scores differently, which reorders near-ties, so each has its own value.
PINNED = {
    "demo": ("demo", {}, 3, ("98005ae28d6d00fc", "a0dd2fc2a947805b")),
    "demo_std": ("demo", {"standardize": True}, 4, ("f17dc23936ee4f22", "f17dc23936ee4f22")),
    "demo_l2": ("demo", {"l2_normalize": True}, 4, ("b966366a451ff99e", "b966366a451ff99e")),
    "store": ("store", {}, 8, ("35bf4f2faf4ab51f", "35bf4f2faf4ab51f")),
    "store_std": ("store", {"standardize": True}, 8, ("04f378467d1cf7f1", "04f378467d1cf7f1")),
    "store_l2": ("store", {"l2_normalize": True}, 8, ("ad502700a23abd26", "d84bab5443384b9a")),
    "store_rand": ("store", {"solver": "randomized", "k": 8}, 8, ("35bf4f2faf4ab51f", "35bf4f2faf4ab51f")),
    # the benchmarks' data (benchmarks/_suite.embeddings), 40960×256 fp16 in 4096-row shards
    "bench": ("bench", {}, 24, ("ccf9b98966ab380f", "c14ae2e49924fc6d")),
    "bench_std": ("bench", {"standardize": True}, 25, ("1d6de66cccdd9107", "8f81b1d701a05a03")),
    "bench_l2": ("bench", {"l2_normalize": True}, 24, ("12ea1bc3c54d364b", "c5629878951399a7")),
    "bench_rand": ("bench", {"solver": "randomized"}, 24, ("41f5086fbdb65d16", "c14ae2e49924fc6d")),
}


def _hash(idx) -> str:
    return hashlib.sha256(np.asarray(idx, np.int64).tobytes()).hexdigest()[:16]


def _rows(n=20000, d=96, seed=7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    B = rng.standard_normal((12, d)) / 3
    Z = rng.standard_normal((n, 12)) * np.linspace(3, 0.5, 12)
    return (Z @ B + 0.2 * rng.standard_normal((n, d)) + 1.5).astype(np.float16)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """20000×96 fp16 rows in 4096-row shards (the shard size ``scalselect run`` writes)."""
    path = tmp_path_factory.mktemp("pin") / "s"
    X = _rows()
    w = StoreWriter(path, d=X.shape[1], dtype="float16")
    for a in range(0, X.shape[0], 4096):
        w.write_shard(X[a:a + 4096], [f"r{i}" for i in range(a, min(a + 4096, X.shape[0]))])
    return path


@pytest.fixture(scope="module")
def bench_store(tmp_path_factory):
    from benchmarks._suite import embeddings

    path = tmp_path_factory.mktemp("pin") / "bench"
    X = embeddings(40960, 256).astype(np.float16)
    w = StoreWriter(path, d=256, dtype="float16")
    for a in range(0, X.shape[0], 4096):
        w.write_shard(X[a:a + 4096], [f"r{i}" for i in range(a, a + 4096)])
    return path


@pytest.mark.parametrize("name", sorted(PINNED))
def test_selection_is_unchanged(name, store, bench_store):
    which, kw, k, (native_digest, fallback_digest) = PINNED[name]
    digest = native_digest if native.BACKEND == "native" else fallback_digest
    src = {"demo": DEMO, "store": store, "bench": bench_store}[which]
    sub = ss.fit_subspace(src, **kw)
    assert sub.k == k
    assert _hash(top_k(leverage_scores(src, sub), "16%")) == digest


def test_run_fit_selects_what_its_old_sequential_loop_selected(store):
    """``scalselect run`` used to sum the shards one by one into one accumulator; it now calls
    fit_subspace (per-shard partials, tree reduction). The selection is the same."""
    src = open_source(store)
    acc = GramAccumulator(src.d, _first_block_mean(src, 4096))
    for shard in src.shards:  # the old loop: every block of every shard into one accumulator, in order
        for _, block in src.iter_shard_blocks(shard, 16384, verify=True):
            acc.update_block(block, src.is_bf16)
    fields = subspace_from_gram(acc.centred_gram(), n=acc.n, mean=acc.mean, scale=None, l2_normalize=False,
                                energy=0.9, k=None)
    old = Subspace(solver="exact", passes=1, **fields)
    new = ss.fit_subspace(store)
    assert old.k == new.k
    np.testing.assert_allclose(new.singular_values, old.singular_values, rtol=1e-10)
    assert _hash(top_k(leverage_scores(store, old), "16%")) == _hash(top_k(leverage_scores(store, new), "16%"))
