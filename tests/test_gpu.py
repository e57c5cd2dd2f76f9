"""GPU paths against their CPU references. Every test here skips cleanly without CUDA.

Run on a GPU node with ``bash benchmarks/gpu_check.sh`` (which also runs the GPU benchmarks).
"""
import numpy as np
import pytest

from scalselect_fast.devices import DeviceError, array_device as resolve_device
from scalselect_fast.gpu import cuda_available

HAVE_CUDA, WHY = cuda_available()
gpu = pytest.mark.skipif(not HAVE_CUDA, reason=f"no CUDA: {WHY}")


def _torch_cuda():
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _structured(n, d, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    r = min(d, 24)
    U = rng.standard_normal((n, r))
    s = 10.0 / (1 + np.arange(r)) ** 1.2
    V = np.linalg.qr(rng.standard_normal((d, r)))[0]
    X = (U * s) @ V.T + 0.05 * rng.standard_normal((n, d)) + 3.0
    return X.astype(dtype)


# ---------------------------------------------------------------- device resolution (runs anywhere)
def test_cpu_always_resolves():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device(None) == "cpu"


def test_unknown_device_is_a_clear_error():
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("tpu")


@pytest.mark.skipif(HAVE_CUDA, reason="checks the no-GPU behaviour")
def test_cuda_without_gpu_refuses_and_auto_falls_back():
    with pytest.raises(DeviceError, match="--device cpu"):
        resolve_device("cuda")
    assert resolve_device("auto") == "cpu"


def test_one_resolver_names_each_choice():
    """scalselect_fast.devices: fit device -> array backend, name translation, pooling implementation."""
    from scalselect_fast import devices, gpu

    assert not hasattr(gpu, "resolve_device")  # one resolver: scalselect_fast.devices
    assert devices.array_backend("cpu") == devices.array_backend(None) == "numpy"
    for name, want in (("numpy", "numpy"), ("cpu", "numpy"), (None, "numpy"), ("cupy", "cupy"), ("cuda", "cupy"),
                       ("GPU", "cupy")):
        assert devices.array_backend(name, check=False) == want  # names only: no GPU probed
    with pytest.raises(DeviceError, match="unknown array backend"):
        devices.array_backend("tpu", check=False)
    assert devices.resolve_pool_impl("auto", "cpu", triton_available=True) == "torch"
    assert devices.resolve_pool_impl("auto", "cuda", triton_available=True) == "triton"
    assert devices.resolve_pool_impl("auto", "cuda", triton_available=False) == "torch"
    with pytest.raises(ValueError, match="pool_impl"):
        devices.resolve_pool_impl("cupy", "cpu", triton_available=True)


def test_model_device_refuses_what_torch_lacks():
    pytest.importorskip("torch")
    from scalselect_fast.devices import model_device
    from scalselect_fast.extract.model import UnsupportedModelError, resolve_device as resolve_model_device

    assert model_device("cpu") == "cpu" and model_device(None) == model_device("auto")
    with pytest.raises(DeviceError, match="is not a device"):
        model_device("nonsense")
    with pytest.raises(UnsupportedModelError, match="use cpu, cuda, cuda:N or auto"):  # extraction's error type
        resolve_model_device("meta")


def test_old_backend_keyword_of_fit_subspace_still_works_with_a_warning():
    import scalselect_fast as ss

    X = _structured(300, 12)
    ref = ss.fit_subspace(X, solver="exact", array_backend="numpy")
    with pytest.warns(DeprecationWarning, match="array_backend"):
        old = ss.fit_subspace(X, solver="exact", backend="numpy")
    np.testing.assert_array_equal(old.components, ref.components)
    np.testing.assert_array_equal(old.singular_values, ref.singular_values)


def test_copy_rows_splits_exactly():
    from concurrent.futures import ThreadPoolExecutor

    from scalselect_fast.gpu import copy_rows

    src = np.arange(7 * 5, dtype=np.float16).reshape(7, 5)
    with ThreadPoolExecutor(3) as pool:
        for parts in (1, 3, 7, 20):
            dst = np.zeros_like(src)
            copy_rows(dst, src, pool, parts)
            np.testing.assert_array_equal(dst, src)
    with pytest.raises(ValueError, match="into"):
        copy_rows(np.zeros((7, 4), np.float16), src)


# ---------------------------------------------------------------- CuPy fit / scoring vs numpy
@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("opts", [{}, {"standardize": True}, {"l2_normalize": True}])
def test_cupy_fit_and_scores_match_numpy(dtype, opts):
    import scalselect_fast as ss

    X = _structured(5003, 96, dtype=dtype)
    cpu = ss.fit_subspace(X, solver="exact", **opts)
    dev = ss.fit_subspace(X, solver="exact", array_backend="cupy", **opts)
    assert dev.k == cpu.k
    s_cpu = ss.leverage_scores(X, cpu)
    s_dev = ss.leverage_scores(X, dev, device="cuda")
    np.testing.assert_allclose(s_dev, s_cpu, rtol=1e-6 if dtype == np.float32 else 1e-5, atol=1e-9)
    np.testing.assert_array_equal(ss.top_k(s_dev, 500), ss.top_k(s_cpu, 500))


@gpu
def test_cupy_fit_many_blocks_and_shards_matches_numpy(tmp_path):
    """Blocks of unequal size cycle through both pinned slots; shards are reduced as on the CPU."""
    import scalselect_fast as ss
    from scalselect_fast.store import StoreWriter

    X = _structured(7001, 80, dtype=np.float16)
    w = StoreWriter(tmp_path / "s", d=80, dtype="float16")
    for a, b in ((0, 3000), (3000, 3001), (3001, 7001)):
        w.write_shard(X[a:b], [str(i) for i in range(a, b)])
    cpu = ss.fit_subspace(tmp_path / "s", solver="exact", block_rows=700)
    dev = ss.fit_subspace(tmp_path / "s", solver="exact", array_backend="cupy", block_rows=700)
    assert dev.k == cpu.k
    np.testing.assert_allclose(dev.singular_values, cpu.singular_values, rtol=1e-6)
    np.testing.assert_allclose(ss.leverage_scores(tmp_path / "s", dev, device="cuda", block_rows=700),
                               ss.leverage_scores(tmp_path / "s", cpu), rtol=1e-5, atol=1e-9)


@gpu
@pytest.mark.parametrize("drop", [False, True])
def test_cupy_fit_finds_invalid_rows_like_numpy(drop):
    """The device pass checks finiteness once per shard; a bad shard is re-read and reported by row."""
    import scalselect_fast as ss
    from scalselect_fast.subspace import InvalidRowsError

    X = _structured(4000, 48)
    X[[7, 2500]] = np.nan
    X[3999, 3] = np.inf
    if not drop:
        for backend in ("numpy", "cupy"):
            with pytest.raises(InvalidRowsError) as err:
                ss.fit_subspace(X, solver="exact", array_backend=backend)
            assert sorted(err.value.rows.tolist()) == [7, 2500, 3999]
        return
    cpu = ss.fit_subspace(X, solver="exact", drop_invalid=True)
    dev = ss.fit_subspace(X, solver="exact", array_backend="cupy", drop_invalid=True)
    assert dev.n == cpu.n == 3997 and dev.k == cpu.k
    assert sorted(dev.info["invalid_rows"]) == [7, 2500, 3999]
    np.testing.assert_allclose(dev.singular_values, cpu.singular_values, rtol=1e-6)


@gpu
def test_device_gram_products_agree_with_numpy(monkeypatch):
    """The device accumulator's syrk and gemm chunk products give numpy's float64-accumulated Gram."""
    import cupy as cp

    from scalselect_fast.subspace import GRAM_CHUNK_ROWS, GramAccumulator

    X = _structured(2 * GRAM_CHUNK_ROWS + 123, 72)
    shift = X[:100].astype(np.float64).mean(0)
    ref = GramAccumulator(72, shift).update(X - shift.astype(np.float32))
    for mode in ("gemm", "syrk"):
        monkeypatch.setenv("SCALSELECT_GPU_GRAM", mode)
        dev = GramAccumulator(72, shift, xp=cp).update(cp.asarray(X - shift.astype(np.float32)))
        np.testing.assert_allclose(cp.asnumpy(dev.gram), ref.gram, rtol=1e-5, atol=1e-6 * np.abs(ref.gram).max())
        np.testing.assert_allclose(cp.asnumpy(dev.colsum), ref.colsum, rtol=1e-5, atol=1e-3)
        assert dev.n == ref.n


@gpu
def test_cupy_scores_bf16_store(tmp_path):
    import scalselect_fast as ss
    from scalselect_fast.store import StoreWriter

    X = _structured(3001, 64)
    w = StoreWriter(tmp_path / "s", d=64, dtype="bfloat16")
    w.write_shard(X[:2000], [str(i) for i in range(2000)])
    w.write_shard(X[2000:], [str(i) for i in range(2000, 3001)])
    sub = ss.fit_subspace(tmp_path / "s", solver="exact")
    np.testing.assert_allclose(ss.leverage_scores(tmp_path / "s", sub, device="cuda"),
                               ss.leverage_scores(tmp_path / "s", sub), rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- compiled Triton vs torch path
@pytest.mark.skipif(not _torch_cuda(), reason="no CUDA for torch")
@pytest.mark.parametrize("dtype,atol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_triton_pool_compiled_matches_torch(dtype, atol):
    import torch

    from scalselect_fast.ops import instruction_attended_pool

    g = torch.Generator(device="cuda").manual_seed(0)
    B, Hq, Hkv, L, Dh, D = 3, 8, 2, 333, 64, 128
    dt = getattr(torch, dtype)
    q = torch.randn(B, Hq, L, Dh, device="cuda", generator=g).to(dt)
    k = torch.randn(B, Hkv, L, Dh, device="cuda", generator=g).to(dt)
    h = torch.randn(B, L, D, device="cuda", generator=g).to(dt)
    vis = torch.zeros(B, L, dtype=torch.bool, device="cuda")
    vis[:, 10:150] = True
    ins = ~vis
    ins[:, 300:] = False
    att = torch.ones(B, L, dtype=torch.bool, device="cuda")
    att[1, :20] = False  # left padding
    ins &= att
    vis &= att
    ref = instruction_attended_pool(q.float(), k.float(), h.float(), ins, vis, att, pool_impl="torch")
    out = instruction_attended_pool(q, k, h, ins, vis, att, pool_impl="triton")
    if dtype == "float32":
        torch.testing.assert_close(out, ref, atol=atol, rtol=1e-5)
    else:  # the kept set may flip at the threshold in bf16; compare where it did not
        close = (out - ref).abs().amax(dim=1) <= atol * ref.abs().amax(dim=1).clamp_min(1)
        assert close.float().mean() >= 2 / 3


@pytest.mark.skipif(HAVE_CUDA, reason="checks the no-GPU behaviour")
def test_cli_device_cuda_without_gpu_is_a_clear_error(tmp_path, capsys):
    from scalselect_fast.cli import main

    np.save(tmp_path / "x.npy", _structured(200, 16))
    rc = main(["select", str(tmp_path / "x.npy"), "--budget", "10%", "--out", str(tmp_path / "o"),
               "--device", "cuda"])
    assert rc == 2
    assert "--device cpu" in capsys.readouterr().err
    rc = main(["select", str(tmp_path / "x.npy"), "--budget", "10%", "--out", str(tmp_path / "o"),
               "--device", "auto", "--stability-seeds", "none"])
    assert rc == 0 and (tmp_path / "o" / "report.json").exists()
