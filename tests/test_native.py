"""Native block kernels vs the numpy fallback (the reference semantics) and a plain float64 reference.

Runs in both modes: with the extension built, ``native.*`` dispatches to C++ and the native-only
variants (portable vs AVX2/F16C decoders, worker/tile counts, direct argument checks) run too; with
``SCALSELECT_FORCE_FALLBACK=1`` (or no build) those variants skip and the dispatchers are checked
against the same references.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from conftest import bf16_bits
from scalselect_fast import native

N = native._native  # None in fallback mode
needs_native = pytest.mark.skipif(N is None, reason=f"native extension not in use: {native.FALLBACK_REASON}")


# ------------------------------------------------------------------------------------------------
# slow, obvious references
# ------------------------------------------------------------------------------------------------
def decode64(block: np.ndarray, bf16: bool) -> np.ndarray:
    """Exact float64 value of each stored element (bf16: the 16 bits are the top half of a float32)."""
    with np.errstate(invalid="ignore"):  # NaN payloads widen fine; numpy warns on the cast anyway
        if bf16:
            return (block.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        return block.astype(np.float64)


def ref_leverage(block, mean, W, inv_scale=None, l2=False, bf16=False) -> np.ndarray:
    z = decode64(block, bf16) - mean
    if inv_scale is not None:
        z = z * inv_scale
    if l2:
        for i in range(len(z)):
            nrm = np.sqrt(np.sum(z[i] * z[i]))
            z[i] = z[i] / nrm if nrm > 0 else 0.0
    p = z @ W
    return np.sum(p * p, axis=1)


def f32_leverage(block, mean, W, inv_scale=None, l2=False, bf16=False) -> np.ndarray:
    """Same-precision numpy pipeline: centre in float64, round to float32, float32 GEMM."""
    z = decode64(block, bf16) - mean
    if inv_scale is not None:
        z = z * inv_scale
    n2 = np.einsum("ij,ij->i", z, z)
    p = (z.astype(np.float32) @ W.astype(np.float32)).astype(np.float64)
    s = np.einsum("ij,ij->i", p, p)
    if l2:
        s = np.divide(s, n2, out=np.zeros_like(s), where=n2 > 0)
    return s


def ref_top_k(scores, offset, budget):
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:budget]
    return np.array([offset + i for i in order], np.int64), np.array([scores[i] for i in order], np.float64)


def make_block(rng, m, d, dtype, loc=0.0, spread=1.0):
    x = (loc + spread * rng.standard_normal((m, d))).astype(np.float32)
    if dtype == "bfloat16":
        return bf16_bits(x), True
    return x.astype(dtype), False


# ------------------------------------------------------------------------------------------------
# implementations under test
# ------------------------------------------------------------------------------------------------
@pytest.fixture(params=["dispatch", "native-simd", "native-portable"])
def simd_mode(request):
    """'dispatch' = whatever native.py picked; the others force one native decoder path."""
    if request.param == "dispatch":
        yield request.param
        return
    if N is None:
        pytest.skip(f"native extension not in use: {native.FALLBACK_REASON}")
    if request.param == "native-simd" and not N.cpu_features()["avx2"]:
        pytest.skip("CPU has no AVX2")
    N.set_simd_enabled(request.param == "native-simd")
    try:
        yield request.param
    finally:
        N.set_simd_enabled(True)


SHAPES = [(1, 1), (7, 33), (1003, 769), (513, 8), (2, 17)]
DTYPES = ["float16", "bfloat16", "float32", "float64"]


# ------------------------------------------------------------------------------------------------
# center_block
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("out_dtype", [np.float64, np.float32])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,d", SHAPES)
def test_center_block_matches_fallback_bit_for_bit(simd_mode, dtype, m, d, out_dtype):
    rng = np.random.default_rng(m * 1000 + d)
    block, bf16 = make_block(rng, m, d, dtype, loc=3.0, spread=2.0)
    shift = rng.standard_normal(d) * 5 + 3
    out = np.full((m, d), np.nan, out_dtype)
    res = native.center_block(block, shift, out, bf16)
    assert res is out
    want = native._center_block_py(block, shift, np.empty((m, d), out_dtype), bf16)
    np.testing.assert_array_equal(out, want)
    # and the plain float64 reference (rounded once for float32)
    np.testing.assert_array_equal(out, (decode64(block, bf16) - shift).astype(out_dtype))


@pytest.mark.parametrize("out_dtype", [np.float64, np.float32])
@pytest.mark.parametrize("bf16", [False, True])
def test_center_block_decodes_every_16bit_pattern(simd_mode, bf16, out_dtype):
    # all 65536 patterns: zeros, subnormals, normals, inf and NaN of fp16 / bf16
    bits = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    block = bits if bf16 else bits.view(np.float16)
    out = native.center_block(block, np.zeros(256), np.empty((256, 256), out_dtype), bf16)
    with np.errstate(invalid="ignore"):
        want = decode64(block, bf16).astype(out_dtype)
    np.testing.assert_array_equal(out, want)  # NaN positions compare equal
    assert np.array_equal(np.signbit(out), np.signbit(want))


def test_center_block_large_shift_is_exact_in_float64():
    # values 1e6 + small: a float32 subtraction of a rounded float32 shift would lose the digits
    x = (1e6 + np.arange(8) / 8).astype(np.float64)[None, :]
    shift = np.full(8, 1e6 + 1 / 3)
    out = native.center_block(x, shift, np.empty((1, 8), np.float32))
    np.testing.assert_array_equal(out, (x - shift).astype(np.float32))


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,d", [(3, 1), (5, 7), (9, 33), (31, 769)])
def test_center_block_streaming_stores_path(dtype, m, d):
    # large outputs use non-temporal stores with a per-row alignment peel: force it on small ones
    rng = np.random.default_rng(m + d)
    block, bf16 = make_block(rng, m, d, dtype)
    shift = rng.standard_normal(d)
    prev = N.stream_threshold_bytes()
    try:
        N.set_stream_threshold_bytes(0)
        for offset in (0, 1):  # also an output whose rows start off the 32-byte grid
            buf = np.empty(m * d + offset, np.float32)[offset:].reshape(m, d)
            native.center_block(block, shift, buf, bf16)
            np.testing.assert_array_equal(buf, native._center_block_py(block, shift, np.empty((m, d), np.float32), bf16))
    finally:
        N.set_stream_threshold_bytes(prev)


@needs_native
def test_center_block_threaded_equals_single_thread():
    rng = np.random.default_rng(1)
    block = rng.standard_normal((4099, 65)).astype(np.float16)
    shift = rng.standard_normal(65)
    a, b = np.empty((4099, 65), np.float32), np.empty((4099, 65), np.float32)
    prev = N.num_threads()
    try:
        N.set_num_threads(1)
        N.center_block(block, shift, a, False)
        N.set_num_threads(3)
        N.center_block(block, shift, b, False)
    finally:
        N.set_num_threads(prev)
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------
# leverage_block
# ------------------------------------------------------------------------------------------------
LEV_DTYPES = ["float16", "bfloat16", "float32", "float64"]


def assert_canonical(out, ref64, band=1e-10):
    """``out`` must be ``ref64`` rounded to the nearest float32, except where ``ref64`` lies within
    ``band`` (relative) of a rounding midpoint, where float64 noise may decide either way."""
    assert np.array_equal(out, out.astype(np.float32).astype(np.float64)), "not float32-representable"
    want = ref64.astype(np.float32).astype(np.float64)
    diff = np.flatnonzero(out != want)
    if diff.size:
        lo = np.nextafter(want[diff].astype(np.float32), np.float32(-np.inf)).astype(np.float64)
        hi = np.nextafter(want[diff].astype(np.float32), np.float32(np.inf)).astype(np.float64)
        mid = np.minimum(np.abs(ref64[diff] - (want[diff] + lo) / 2), np.abs(ref64[diff] - (want[diff] + hi) / 2))
        assert np.all(mid <= band * np.abs(ref64[diff])), (diff[:5], out[diff[:5]], want[diff[:5]])


@pytest.mark.parametrize("dtype", LEV_DTYPES)
@pytest.mark.parametrize("m,d,k,scaled,l2", [
    *[(m, d, k, s, l) for (m, d, k) in [(1, 1, 1), (7, 33, 1), (7, 33, 20), (1003, 769, 3), (300, 64, 64)]
      for (s, l) in [(False, False), (True, False), (False, True), (True, True)]],
    (1003, 769, 400, False, False), (1003, 769, 400, True, True),  # k > d/2 at full width
])
def test_leverage_block_matches_references(simd_mode, dtype, m, d, k, scaled, l2):
    # the canonical score: the float64 leverage rounded once to float32, from both builds
    rng = np.random.default_rng(7 * m + d + k)
    block, bf16 = make_block(rng, m, d, dtype, loc=2.0, spread=1.5)
    mean = decode64(block, bf16).mean(0) + 0.01 * rng.standard_normal(d)
    W = rng.standard_normal((d, k)) / np.sqrt(d)
    inv_scale = rng.uniform(0.5, 2.0, d) if scaled else None
    out = np.full(m, np.nan)
    res = native.leverage_block(block, mean, W, out, inv_scale, l2, bf16)
    assert res is out and out.dtype == np.float64
    ref = ref_leverage(block, mean, W, inv_scale, l2, bf16)
    fb = native._leverage_block_py(block, mean, W, np.empty(m), inv_scale, l2, bf16)
    assert_canonical(fb, ref)
    assert_canonical(out, ref)


@pytest.mark.parametrize("row,want", [
    ([1.0, 2.0 ** -12], 1.0),                                   # 1 + 2^-24: halfway, to even (down)
    ([1.0, 2.0 ** -12, 2.0 ** -20], 1.0 + 2.0 ** -23),           # just above halfway: up
    ([1.0, 2.0 ** -12, 2.0 ** -12, 2.0 ** -12], 1.0 + 2.0 ** -22),  # 1 + 1.5 ulp: halfway, to even (up)
    ([0.5, 0.25], 0.3125),                                      # representable: unchanged
])
def test_leverage_block_rounds_to_nearest_float32(simd_mode, row, want):
    # exact float64 scores (the products are by 1 and 0), so only the final rounding is tested
    d = len(row)
    block = np.array([row])
    for fn in (native.leverage_block, native._leverage_block_py):
        assert fn(block, np.zeros(d), np.eye(d), np.empty(1))[0] == want


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_leverage_block_big_mean_does_not_cancel(dtype):
    # |mean| >> spread: centring must happen before the product. Projecting raw rows in float32 and
    # subtracting mean @ W afterwards fails this tolerance by orders of magnitude (checked below).
    rng = np.random.default_rng(3)
    m, d, k = 257, 129, 10
    loc = 1000.0 if dtype == "float16" else 3e4
    block, bf16 = make_block(rng, m, d, dtype, loc=loc, spread=1.0)
    x = decode64(block, bf16)
    mean = x.mean(0)
    W = np.linalg.qr(rng.standard_normal((d, k)))[0]
    out = native.leverage_block(block, mean, W, np.empty(m), None, False, bf16)
    ref = ref_leverage(block, mean, W, bf16=bf16)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-6 * ref.max())
    naive = ((x.astype(np.float32) @ W.astype(np.float32)) - (mean @ W).astype(np.float32)).astype(np.float64)
    naive = np.einsum("ij,ij->i", naive, naive)
    assert np.abs(naive - ref).max() > 100 * np.abs(out - ref).max()


def test_leverage_block_zero_rows_under_l2(simd_mode):
    rng = np.random.default_rng(4)
    d, k = 33, 5
    mean = rng.standard_normal(d)
    block = rng.standard_normal((9, d))
    block[[0, 4, 8]] = mean  # centred rows are exactly zero
    W = rng.standard_normal((d, k))
    out = native.leverage_block(block, mean, W, np.empty(9), None, True, False)
    assert np.all(out[[0, 4, 8]] == 0.0)
    np.testing.assert_allclose(out, ref_leverage(block, mean, W, l2=True), rtol=2e-5, atol=1e-7)


def test_leverage_block_bf16_nan_rows_stay_nan(simd_mode):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((11, 40)).astype(np.float32)
    x[3, 7] = np.nan
    x[9, 0] = np.inf
    block = bf16_bits(x)
    mean, W = np.zeros(40), rng.standard_normal((40, 6))
    for l2 in (False, True):
        out = native.leverage_block(block, mean, W, np.empty(11), None, l2, True)
        fb = native._leverage_block_py(block, mean, W, np.empty(11), None, l2, True)
        assert not np.isfinite(out[[3, 9]]).any() and not np.isfinite(fb[[3, 9]]).any()
        ok = np.setdiff1d(np.arange(11), [3, 9])
        np.testing.assert_allclose(out[ok], fb[ok], rtol=2e-5)


def test_leverage_block_empty_and_degenerate():
    W = np.ones((4, 2))
    out = native.leverage_block(np.empty((0, 4), np.float32), np.zeros(4), W, np.empty(0))
    assert out.shape == (0,)
    out = native.leverage_block(np.ones((3, 4), np.float32), np.zeros(4), np.empty((4, 0)), np.full(3, 7.0))
    np.testing.assert_array_equal(out, 0.0)


def test_leverage_block_accepts_fortran_ordered_W():
    # W = components.T / sigma is naturally Fortran-ordered: the dispatcher makes it contiguous
    rng = np.random.default_rng(6)
    Vt = rng.standard_normal((5, 21))
    W = Vt.T / 2.0
    assert not W.flags.c_contiguous
    block = rng.standard_normal((10, 21)).astype(np.float32)
    out = native.leverage_block(block, np.zeros(21), W, np.empty(10))
    np.testing.assert_allclose(out, ref_leverage(block, np.zeros(21), W), rtol=2e-5)


@needs_native
@pytest.mark.parametrize("kw", [dict(threads=1), dict(threads=3, tile_rows=7), dict(tile_rows=1),
                                dict(tile_rows=5000), dict(gemm="float32"), dict(gemm="float32", threads=2, tile_rows=13)])
def test_leverage_block_workers_tiles_and_gemm_precision(kw):
    rng = np.random.default_rng(8)
    m, d, k = 1001, 97, 31
    block = (50 + rng.standard_normal((m, d))).astype(np.float16)
    mean = block.astype(np.float64).mean(0)
    W = rng.standard_normal((d, k)) / 10
    inv = rng.uniform(0.5, 2, d)
    ref = ref_leverage(block, mean, W, inv, True)
    out = np.empty(m)
    N.leverage_block(block, mean, W, out, inv, True, False, **kw)
    if kw.get("gemm") == "float32":  # the benchmark's knob: the float32 product's error, then rounded
        np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-7 * ref.max())
    else:
        assert_canonical(out, ref)
    # the BLAS thread count is restored after a multi-worker call
    assert N.blas_info()["num_threads"] >= 1


@needs_native
def test_leverage_block_bits_do_not_depend_on_thread_count():
    # workers take whole tiles, so a row's score depends on the block and tile size only
    rng = np.random.default_rng(10)
    m, d, k = 1501, 768, 150
    block = rng.standard_normal((m, d)).astype(np.float16)
    W, mean = rng.standard_normal((d, k)) / 30, np.zeros(d)
    outs = []
    for threads in (0, 2, 3, 5):
        o = np.empty(m)
        N.leverage_block(block, mean, W, o, threads=threads, tile_rows=64)
        outs.append(o)
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


@needs_native
def test_leverage_block_restores_blas_threads():
    before = N.blas_info()["num_threads"]
    rng = np.random.default_rng(9)
    N.leverage_block(rng.standard_normal((4000, 16)), np.zeros(16), np.ones((16, 2)), np.empty(4000), threads=2)
    assert N.blas_info()["num_threads"] == before


# ------------------------------------------------------------------------------------------------
# argument checks (both modes raise the same exception types)
# ------------------------------------------------------------------------------------------------
def _lev(block, out=None, mean=None, W=None, bf16=False, inv_scale=None):
    d = block.shape[-1] if block.ndim == 2 else 4
    mean = np.zeros(d) if mean is None else mean
    W = np.ones((d, 2)) if W is None else W
    out = np.empty(block.shape[0]) if out is None else out
    return native.leverage_block(block, mean, W, out, inv_scale, False, bf16)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: _lev(np.ones((6, 8), np.float32)[:, ::2]), ValueError, "contiguous"),
    (lambda: _lev(np.ones((3, 4), np.int32)), TypeError, "dtype"),
    (lambda: _lev(np.ones((3, 4), np.uint16)), TypeError, "bf16=True"),
    (lambda: _lev(np.ones((3, 4), np.float16), bf16=True), TypeError, "uint16"),
    (lambda: _lev(np.ones((3, 4), np.float32), out=np.empty(3, np.float32)), TypeError, "float64"),
    (lambda: _lev(np.ones((3, 4), np.float32), out=np.empty(2)), ValueError, "out"),
    (lambda: _lev(np.ones((3, 4), np.float32), mean=np.zeros(5)), ValueError, "mean"),
    (lambda: _lev(np.ones((3, 4), np.float32), W=np.ones((5, 2))), ValueError, "W"),
    (lambda: _lev(np.ones((3, 4), np.float32), inv_scale=np.ones(3)), ValueError, "inv_scale"),
    (lambda: _lev(np.ones(4, np.float32)), ValueError, "2-D"),
    (lambda: native.center_block(np.ones((3, 4), np.float16), np.zeros(4), np.empty((3, 4), np.float16), False),
     TypeError, "float"),
    (lambda: native.center_block(np.ones((3, 4), np.float16), np.zeros(4),
                                 np.empty((4, 3), np.float32).T, False), ValueError, "contiguous"),
    (lambda: native.center_block(np.ones((3, 4), np.float16), np.zeros(4), np.empty((3, 5), np.float32), False),
     ValueError, "shape"),
    (lambda: native.center_block(np.ones((3, 4), np.float16), np.zeros(3), np.empty((3, 4), np.float32), False),
     ValueError, "shift"),
    (lambda: native.center_block(np.ones((3, 8), np.float16)[:, ::2], np.zeros(4),
                                 np.empty((3, 4), np.float32), False), ValueError, "contiguous"),
    (lambda: native.center_block(np.ones((3, 4), np.int16), np.zeros(4), np.empty((3, 4), np.float32), False),
     TypeError, "dtype"),
])
def test_bad_arguments_raise_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@needs_native
@pytest.mark.parametrize("call,exc,match", [
    (lambda: N.leverage_block(np.ones((3, 4)), np.zeros(4), np.ones((4, 2), np.float32), np.empty(3)),
     TypeError, "W has dtype"),
    (lambda: N.leverage_block(np.ones((3, 4)), np.zeros(4), np.asfortranarray(np.ones((4, 2))), np.empty(3)),
     ValueError, "W must be C-contiguous"),
    (lambda: N.leverage_block(np.ones((3, 4)), np.zeros(8)[::2], np.ones((4, 2)), np.empty(3)),
     ValueError, "mean must be C-contiguous"),
    (lambda: N.leverage_block(np.ones((3, 4)), np.zeros(4), np.ones((4, 2)), np.empty(3), [1.0] * 4),
     TypeError, "inv_scale"),
    (lambda: N.leverage_block(np.ones((3, 4)), np.zeros(4), np.ones((4, 2)), np.empty(3), gemm="half"),
     ValueError, "gemm"),
    (lambda: N.center_block(np.ones((3, 4)), np.zeros(4, np.float32), np.empty((3, 4), np.float32)),
     TypeError, "shift has dtype"),
    (lambda: N.top_k_block(np.ones(3, np.float32), 0, 1), TypeError, "scores"),
    (lambda: N.top_k_merge([(np.arange(3),)], 1), TypeError, "pair"),
    (lambda: N.top_k_merge([(np.arange(3.0), np.ones(3))], 1), TypeError, "integer"),
])
def test_native_entry_points_check_their_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_read_only_out_is_rejected():
    out = np.empty(3)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="writeable|read-only"):
        _lev(np.ones((3, 4)), out=out)


# ------------------------------------------------------------------------------------------------
# top-k
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,budget", [(0, 0), (0, 5), (1, 1), (10, 0), (10, 3), (10, 10), (10, 25), (1001, 160)])
def test_top_k_block_matches_reference_with_ties(n, budget):
    rng = np.random.default_rng(n + budget)
    scores = np.round(rng.standard_normal(n), 1)  # many exact ties
    if n > 3:
        scores[[1, 2]] = np.inf
        scores[3] = -np.inf
    for f in (native.top_k_block, native._top_k_block_py):
        idx, val = f(scores, 100, budget)
        ridx, rval = ref_top_k(scores, 100, budget)
        assert idx.dtype == np.int64 and val.dtype == np.float64
        np.testing.assert_array_equal(idx, ridx)
        np.testing.assert_array_equal(val, rval)


def test_top_k_all_equal_scores_keep_lowest_indices():
    idx, _ = native.top_k_block(np.full(50, 0.25), 7, 5)
    np.testing.assert_array_equal(idx, [7, 8, 9, 10, 11])


@pytest.mark.parametrize("f", [native.top_k_block, native._top_k_block_py])
def test_top_k_block_rejects_nan_naming_the_row(f):
    s = np.arange(10.0)
    s[6] = np.nan
    with pytest.raises(ValueError, match=r"scores\[6\] \(global row 46\)"):
        f(s, 40, 3)
    with pytest.raises(ValueError, match="budget"):
        f(np.arange(3.0), 0, -1)


def test_top_k_merge_is_independent_of_part_order():
    rng = np.random.default_rng(11)
    n, budget = 2003, 300
    scores = np.round(rng.standard_normal(n), 2)
    cuts = np.sort(rng.choice(np.arange(1, n), 6, replace=False))
    bounds = [0, *cuts.tolist(), n]
    parts = [native.top_k_block(scores[a:b], a, budget) for a, b in zip(bounds[:-1], bounds[1:])]
    ridx, rval = ref_top_k(scores, 0, budget)
    for perm in itertools.islice(itertools.permutations(range(len(parts))), 0, 5040, 397):
        for merge in (native.top_k_merge, native._top_k_merge_py):
            idx, val = merge([parts[p] for p in perm], budget)
            np.testing.assert_array_equal(idx, ridx)
            np.testing.assert_array_equal(val, rval)
    # pairwise tree merges in different shapes agree too
    left = native.top_k_merge([native.top_k_merge(parts[:3], budget), native.top_k_merge(parts[3:], budget)], budget)
    np.testing.assert_array_equal(left[0], ridx)


@pytest.mark.parametrize("budget", [0, 1, 10**9])
def test_top_k_merge_budget_edges(budget):
    parts = [(np.array([5, 1], np.int64), np.array([1.0, 1.0])), (np.array([3], np.int64), np.array([2.0]))]
    want = ref_top_k(np.array([0, 1.0, 0, 2.0, 0, 1.0]), 0, budget)
    keep = [i for i in want[0] if i in (1, 3, 5)][:budget]
    for merge in (native.top_k_merge, native._top_k_merge_py):
        idx, val = merge(parts, budget)
        np.testing.assert_array_equal(idx, keep)
    for merge in (native.top_k_merge, native._top_k_merge_py):
        idx, val = merge([], budget)
        assert idx.shape == (0,) and idx.dtype == np.int64 and val.dtype == np.float64


@pytest.mark.parametrize("merge", [native.top_k_merge, native._top_k_merge_py])
def test_top_k_merge_rejects_nan_and_ragged_parts(merge):
    with pytest.raises(ValueError, match=r"parts\[1\].*global row 9"):
        merge([(np.array([1]), np.array([1.0])), (np.array([8, 9]), np.array([0.5, np.nan]))], 2)
    with pytest.raises(ValueError, match="equal length"):
        merge([(np.array([1, 2]), np.array([1.0]))], 2)
