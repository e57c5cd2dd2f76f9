"""Representation store: shards, block streaming, checksums and the errors users will hit."""
import json

import numpy as np
import pytest

from scalselect_fast.store import StoreError, StoreWriter, open_source, to_float32
from scalselect_fast.subspace import fit_subspace


def make_store(path, X, sizes, dtype="float32"):
    w = StoreWriter(path, d=X.shape[1], dtype=dtype, provenance={"model": "test"})
    a = 0
    for s in sizes:
        w.write_shard(X[a:a + s], [f"id{i}" for i in range(a, a + s)])
        a += s
    return w


@pytest.mark.parametrize("block_rows", [1, 7, 100, 10_000])
def test_blocks_cover_rows_in_order(tmp_path, block_rows):
    X = np.random.default_rng(0).standard_normal((251, 5)).astype(np.float32)
    make_store(tmp_path / "s", X, [100, 1, 150])
    src = open_source(tmp_path / "s")
    assert (src.n, src.d, src.dtype, len(src.shards)) == (251, 5, "float32", 3)
    got = np.empty_like(X)
    seen = []
    for off, block in src.iter_blocks(block_rows, verify=True):
        assert block.flags.c_contiguous and block.shape[0] <= block_rows
        shard = next(s for s in src.shards if s.offset <= off < s.offset + s.count)
        assert off + block.shape[0] <= shard.offset + shard.count  # never spans shards
        got[off:off + block.shape[0]] = block
        seen.append(off)
    assert seen == sorted(seen)
    np.testing.assert_array_equal(got, X)
    assert src.ids()[:2] == ["id0", "id1"] and len(src.ids()) == 251
    np.testing.assert_array_equal(src.read_rows([250, 0, 100]), X[[250, 0, 100]])


def test_store_fit_equals_array_fit(tmp_path):
    X = np.random.default_rng(1).standard_normal((600, 12)).astype(np.float16)
    make_store(tmp_path / "s", X, [250, 350], dtype="float16")
    a = fit_subspace(tmp_path / "s", block_rows=99)
    b = fit_subspace(X, block_rows=600)
    assert a.k == b.k
    np.testing.assert_allclose(a.singular_values, b.singular_values, rtol=1e-6)
    assert a.provenance == {"model": "test"}


def test_bf16_roundtrip(tmp_path):
    X = np.array([[1.0, -2.5, 3.140625], [0.0, 1e-3, 65504.0]], dtype=np.float32)
    make_store(tmp_path / "s", X, [2], dtype="bfloat16")
    src = open_source(tmp_path / "s")
    assert src.is_bf16
    back = src.to_array()
    np.testing.assert_allclose(back, X, rtol=2 ** -8)
    np.testing.assert_array_equal(back[0], [1.0, -2.5, 3.140625])  # exactly representable


def test_checksum_mismatch_named(tmp_path):
    X = np.random.default_rng(2).standard_normal((50, 4)).astype(np.float32)
    make_store(tmp_path / "s", X, [20, 30])
    arr = np.load(tmp_path / "s" / "shard-00001.npy", mmap_mode="r+")
    arr[3, 1] += 1.0
    arr.flush()
    del arr
    with pytest.raises(StoreError, match=r"checksum mismatch in shard 'shard-00001'"):
        fit_subspace(tmp_path / "s")


def test_mismatched_shard_shape_and_dtype(tmp_path):
    X = np.random.default_rng(3).standard_normal((40, 6)).astype(np.float32)
    make_store(tmp_path / "s", X, [20, 20])
    np.save(tmp_path / "s" / "shard-00001.npy", np.zeros((20, 5), np.float32))
    with pytest.raises(StoreError, match=r"shard 'shard-00001'.*d=6 dtype=float32.*cannot be mixed"):
        fit_subspace(tmp_path / "s")
    np.save(tmp_path / "s" / "shard-00001.npy", np.zeros((20, 6), np.float16))
    with pytest.raises(StoreError, match=r"shard 'shard-00001'.*dtype float16"):
        fit_subspace(tmp_path / "s")
    with pytest.raises(StoreError, match="different run"):
        StoreWriter(tmp_path / "s", d=7, dtype="float32", provenance={"model": "test"})


def test_unreadable_paths(tmp_path):
    with pytest.raises(StoreError, match="no such file or directory"):
        fit_subspace(tmp_path / "missing.npy")
    (tmp_path / "bad.npy").write_bytes(b"garbage")
    with pytest.raises(StoreError, match="cannot read as .npy"):
        fit_subspace(tmp_path / "bad.npy")
    (tmp_path / "dir").mkdir()
    with pytest.raises(StoreError, match="not a representation store"):
        fit_subspace(tmp_path / "dir")
    (tmp_path / "x.txt").write_text("1 2 3")
    with pytest.raises(StoreError, match="expected a .npy matrix"):
        fit_subspace(tmp_path / "x.txt")
    X = np.ones((10, 3), np.float32)
    make_store(tmp_path / "s", X, [10])
    (tmp_path / "s" / "shard-00000.npy").unlink()
    with pytest.raises(StoreError, match=r"shard 'shard-00000': .*cannot read"):
        fit_subspace(tmp_path / "s")
    with pytest.raises(StoreError, match="dtype int64 is not supported"):
        fit_subspace(np.zeros((4, 2), np.int64))


def test_truncated_ids_file(tmp_path):
    X = np.random.default_rng(4).standard_normal((10, 3)).astype(np.float32)
    make_store(tmp_path / "s", X, [10])
    (tmp_path / "s" / "shard-00000.ids.txt").write_text("a\nb\n")
    with pytest.raises(StoreError, match="holds 2 ids but the matrix has 10 rows"):
        open_source(tmp_path / "s").ids()


def test_uncommitted_shard_is_ignored(tmp_path):
    X = np.random.default_rng(5).standard_normal((10, 3)).astype(np.float32)
    make_store(tmp_path / "s", X, [10])
    np.save(tmp_path / "s" / "shard-00001.npy", X)  # written but never committed to the manifest
    assert open_source(tmp_path / "s").n == 10
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert [s["name"] for s in m["shards"]] == ["shard-00000"]


def test_to_float32_bf16_exact():
    bits = np.array([0x3F80, 0xC020, 0x0000, 0x7F80], dtype=np.uint16)
    np.testing.assert_array_equal(to_float32(bits, True), [1.0, -2.5, 0.0, np.inf])


def test_atomic_writes_get_the_umask_mode_not_mkstemps_0600(tmp_path, monkeypatch):
    import os

    from scalselect_fast import atomic as store

    old = os.umask(0o027)
    try:
        assert store._read_umask() == 0o027 and os.umask(0o027) == 0o027  # read, and left as it was
    finally:
        os.umask(old)
    monkeypatch.setattr(store, "_UMASK", 0o022)
    store.atomic_write_bytes(tmp_path / "f.bin", b"x")
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o644 and (tmp_path / "f.bin").read_bytes() == b"x"
    monkeypatch.setattr(store, "_UMASK", 0o077)
    store.atomic_write_bytes(tmp_path / "g.bin", b"y")
    assert (tmp_path / "g.bin").stat().st_mode & 0o777 == 0o600
