"""Read-ahead block streaming (store.BlockReader, ``iter_blocks(prefetch=...)``).

Reference: the plain ``prefetch=0`` path, and the shard files loaded whole with ``np.load``.
"""
import threading

import numpy as np
import pytest

from scalselect_fast.store import ArraySource, BlockReader, StoreError, StoreWriter, open_source


def _make_store(path, dtype, counts, d=13, seed=0):
    rng = np.random.default_rng(seed)
    w = StoreWriter(path, d=d, dtype=dtype)
    full = []
    for i, c in enumerate(counts):
        rows = rng.standard_normal((c, d)).astype(np.float32)
        rec = w.write_shard(rows, [f"s{i}-{j}" for j in range(c)])
        full.append(np.load(path / rec["rows_file"]))
    return open_source(path), np.concatenate(full)


def _collect(it):
    # Blocks from the reader live in reused buffers: copy before asking for the next one.
    return [(off, np.array(b, copy=True)) for off, b in it]


def _as_matrix(blocks, n, d, dtype):
    out = np.empty((n, d), dtype=dtype)
    expect = 0
    for off, b in blocks:
        assert off == expect
        out[off:off + b.shape[0]] = b
        expect += b.shape[0]
    assert expect == n
    return out


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("block_rows,prefetch", [(7, 1), (64, 3), (1000, 2)])
def test_prefetch_matches_plain_path(tmp_path, dtype, block_rows, prefetch):
    src, full = _make_store(tmp_path / "st", dtype, counts=[50, 1, 33])
    plain = _collect(src.iter_blocks(block_rows))
    fast = _collect(src.iter_blocks(block_rows, prefetch=prefetch))
    assert [o for o, _ in plain] == [o for o, _ in fast]
    for (_, a), (_, b) in zip(plain, fast):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(_as_matrix(fast, src.n, src.d, full.dtype), full)


def test_blocks_never_span_shards_and_buffers_are_reused(tmp_path):
    src, _ = _make_store(tmp_path / "st", "float16", counts=[40, 25, 40, 3])
    bases = set()
    ends = {s.offset + s.count for s in src.shards}
    starts = {s.offset for s in src.shards}
    for off, b in BlockReader(src, block_rows=16, prefetch=2):
        # a block starting inside a shard must end at or before that shard's end
        shard = max((s for s in src.shards if s.offset <= off), key=lambda s: s.offset)
        assert off + b.shape[0] <= shard.offset + shard.count
        assert off in starts or (off - shard.offset) % 16 == 0
        bases.add(id(b.base))
    assert len(bases) <= 3, "one buffer per block in flight, allocated once"
    assert max(ends) == src.n


def test_iter_shard_blocks_prefetch_one_shard(tmp_path):
    src, full = _make_store(tmp_path / "st", "float32", counts=[10, 21])
    shard = src.shards[1]
    got = _collect(src.iter_shard_blocks(shard, block_rows=8, prefetch=2))
    assert [o for o, _ in got] == [10, 18, 26]
    np.testing.assert_array_equal(np.concatenate([b for _, b in got]), full[10:31])


@pytest.mark.parametrize("prefetch", [0, 2])
def test_checksum_mismatch_names_the_shard(tmp_path, prefetch):
    src, _ = _make_store(tmp_path / "st", "float16", counts=[20, 20])
    path = src.shards[1].path
    raw = bytearray(open(path, "rb").read())
    raw[-3] ^= 0xFF  # flip bits in the payload's last row
    open(path, "wb").write(bytes(raw))
    src = open_source(tmp_path / "st")
    with pytest.raises(StoreError, match="shard-00001"):
        for _ in src.iter_blocks(8, verify=True, prefetch=prefetch):
            pass
    # the default verifies a shard on its first read: a fresh source refuses it too
    with pytest.raises(StoreError, match="shard-00001"):
        for _ in open_source(tmp_path / "st").iter_blocks(8, prefetch=prefetch):
            pass
    # only an explicit verify=False streams the damaged data
    assert sum(b.shape[0] for _, b in src.iter_blocks(8, verify=False, prefetch=prefetch)) == 40


def test_early_break_stops_the_thread(tmp_path):
    src, _ = _make_store(tmp_path / "st", "float16", counts=[100, 100])
    before = threading.active_count()
    it = src.iter_blocks(5, prefetch=2)
    next(it)
    next(it)
    assert threading.active_count() == before + 1
    it.close()
    assert threading.active_count() == before


def test_array_sources_memmap_npy_and_in_memory(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((37, 9)).astype(np.float16)
    np.save(tmp_path / "x.npy", a)
    for src in (open_source(tmp_path / "x.npy"),                       # file: readinto
                ArraySource(np.load(tmp_path / "x.npy", mmap_mode="r")[3:30]),  # sliced mapping: copy
                ArraySource(a)):                                       # in memory: views
        ref = np.asarray(src.shard_array(src.shards[0]))
        got = _collect(src.iter_blocks(8, prefetch=2))
        np.testing.assert_array_equal(_as_matrix(got, src.n, src.d, a.dtype), ref)


def test_error_in_reader_is_raised_in_caller(tmp_path):
    src, _ = _make_store(tmp_path / "st", "float32", counts=[30, 30])
    # truncate the second shard's payload after the store was opened and the file mapped lazily
    path = src.shards[1].path
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:-13 * 4 * 5])
    src = open_source(tmp_path / "st")
    with pytest.raises(StoreError, match="shard-00001"):
        for _ in src.iter_blocks(8, prefetch=2):
            pass


def test_bad_arguments(tmp_path):
    src, _ = _make_store(tmp_path / "st", "float16", counts=[5])
    with pytest.raises(ValueError):
        BlockReader(src, block_rows=0)
    with pytest.raises(ValueError):
        BlockReader(src, prefetch=0)
