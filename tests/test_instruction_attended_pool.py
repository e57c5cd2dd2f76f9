"""instruction_attended_pool (torch and Triton backends) vs an eager full-map reference.

The reference materialises the whole [B, H, L, L] softmax in float64 with repeated kv heads, exactly
as the authors' scripts read ``output_attentions``; both backends must match it to 1e-5 in fp32.
Triton runs under TRITON_INTERPRET=1 here when no CUDA device is present (see conftest.py).
"""
import importlib

import pytest
import torch

from scalselect_fast.ops import instruction_attended_pool, instruction_column_attention
from scalselect_fast.ops.instruction_attended_pool import _select_and_pool

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
BACKENDS = ["torch", "triton"]


# ------------------------------------------------------------------------------------------------
# Slow, obvious reference
# ------------------------------------------------------------------------------------------------
def reference_attention(q, k, query_mask, key_mask, attention_mask=None, scale=None):
    """Full map in float64 on CPU -> (a (B, L) float64 normalised over visual tokens, valid (B,) bool)."""
    q, k, query_mask, key_mask = q.cpu(), k.cpu(), query_mask.cpu(), key_mask.cpu()
    attention_mask = None if attention_mask is None else attention_mask.cpu()
    B, Hq, L, Dh = q.shape
    G = Hq // k.shape[1]
    if attention_mask is None:
        attention_mask = torch.ones(B, L, dtype=torch.bool, device=q.device)
    scale = Dh ** -0.5 if scale is None else scale
    kr = k.double().repeat_interleave(G, dim=1)
    s = torch.einsum("bhid,bhjd->bhij", q.double(), kr) * scale
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    visible = causal[None, None] & attention_mask[:, None, None, :]
    s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, dim=-1).mean(dim=1)  # (B, L, L), NaN rows only for keyless padding rows
    a = torch.zeros(B, L, dtype=torch.float64, device=q.device)
    valid = torch.zeros(B, dtype=torch.bool)
    for b in range(B):
        rows = query_mask[b] & attention_mask[b]
        cols = key_mask[b] & attention_mask[b]
        if not rows.any() or not cols.any():
            a[b] = float("nan")
            continue
        col_att = p[b][rows][:, cols].mean(dim=0)
        if col_att.sum() == 0:
            a[b] = float("nan")
            continue
        a[b, cols] = col_att / col_att.sum()
        valid[b] = True
    return a, valid


def reference_pool(q, k, hidden, query_mask, key_mask, attention_mask=None, threshold=0.9, scale=None):
    a, valid = reference_attention(q, k, query_mask, key_mask, attention_mask, scale)
    hidden, key_mask = hidden.cpu(), key_mask.cpu()
    attention_mask = None if attention_mask is None else attention_mask.cpu()
    B, L, D = hidden.shape
    am = torch.ones(B, L, dtype=torch.bool) if attention_mask is None else attention_mask
    out = torch.full((B, D), float("nan"), dtype=torch.float32)
    n_kept = torch.zeros(B, dtype=torch.int64)
    for b in range(B):
        if not valid[b]:
            continue
        pos = torch.nonzero(key_mask[b] & am[b]).flatten()
        order = torch.sort(a[b, pos], descending=True, stable=True).indices
        csum = torch.cumsum(a[b, pos][order], dim=0)
        above = torch.nonzero(csum > threshold).flatten()
        n = len(pos) if threshold >= 1.0 or len(above) == 0 else int(above[0]) + 1
        out[b] = hidden[b, pos[order[:n]]].float().mean(dim=0)
        n_kept[b] = n
    return out, valid, n_kept


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------
def make_case(B, Hq, Hkv, L, Dh, D, pad="none", seed=0, dtype=torch.float32, n_vis=None):
    """Random q/k/hidden with a per-sample layout: [pad] system | image | instruction [pad]."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, L, Dh, generator=g) * 1.5
    k = torch.randn(B, Hkv, L, Dh, generator=g) * 1.5
    hidden = torch.randn(B, L, D, generator=g)
    qm = torch.zeros(B, L, dtype=torch.bool)
    km = torch.zeros(B, L, dtype=torch.bool)
    am = torch.ones(B, L, dtype=torch.bool)
    for b in range(B):
        n_pad = 0 if pad == "none" or L < 4 else int(torch.randint(0, L // 3 + 1, (1,), generator=g))
        n_real = L - n_pad
        lo = n_pad if pad == "left" else 0
        if pad in ("left", "right"):
            am[b] = False
            am[b, lo:lo + n_real] = True
        if n_real == 1:
            qm[b, lo] = True  # one token: an instruction with nothing to look at
            continue
        nv = n_vis if n_vis is not None else max(1, n_real // 2)
        nv = min(nv, n_real - 1)
        n_sys = min(2, n_real - nv - 1)
        qm[b, lo:lo + n_sys] = True  # system/template tokens count as instruction rows
        km[b, lo + n_sys:lo + n_sys + nv] = True
        qm[b, lo + n_sys + nv:lo + n_real] = True
    # Roles on padding positions must be ignored: set them to garbage on purpose.
    qm |= ~am & (torch.rand(B, L, generator=g) < 0.5)
    km |= ~am & (torch.rand(B, L, generator=g) < 0.5)
    to = dict(device=DEVICE)
    return (q.to(dtype=dtype, **to), k.to(dtype=dtype, **to), hidden.to(**to), qm.to(**to), km.to(**to),
            am.to(**to))


def _assert_close_nan(actual, expected, atol, rtol=0.0):
    actual, expected = actual.cpu().double(), expected.cpu().double()
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), "NaN pattern differs"
    m = ~torch.isnan(expected)
    torch.testing.assert_close(actual[m], expected[m], atol=atol, rtol=rtol)


SHAPES = [
    # B, Hq, Hkv, L, Dh, D, pad
    (1, 2, 2, 1, 8, 5, "none"),
    (2, 2, 2, 7, 8, 6, "none"),
    (2, 4, 2, 37, 16, 12, "right"),
    (3, 6, 1, 37, 8, 10, "left"),
    (2, 4, 2, 129, 16, 9, "left"),
    (2, 3, 3, 66, 24, 7, "right"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}Hq{}Hkv{}L{}Dh{}D{}-{}".format(*s))
def test_matches_eager_reference_fp32(backend, shape):
    B, Hq, Hkv, L, Dh, D, pad = shape
    q, k, hidden, qm, km, am = make_case(B, Hq, Hkv, L, Dh, D, pad=pad, seed=L + Hq)
    a_ref, valid_ref = reference_attention(q.cpu(), k.cpu(), qm.cpu(), km.cpu(), am.cpu())
    a, valid = instruction_column_attention(q, k, qm, km, am, pool_impl=backend)
    assert a.dtype == torch.float32 and a.shape == (B, L)
    assert torch.equal(valid.cpu(), valid_ref)
    _assert_close_nan(a, a_ref, atol=1e-5)
    for threshold in (0.9, 0.5):
        ref, _, n_ref = reference_pool(q.cpu(), k.cpu(), hidden.cpu(), qm.cpu(), km.cpu(), am.cpu(), threshold)
        pooled, v, n = instruction_attended_pool(q, k, hidden, qm, km, am, threshold=threshold, pool_impl=backend,
                                                 return_valid=True, return_stats=True)
        assert pooled.dtype == torch.float32 and pooled.shape == (B, D)
        assert torch.equal(n.cpu(), n_ref)
        _assert_close_nan(pooled, ref, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_interleaved_images_multi_block(backend):
    """Several images separated by long text: later key blocks must skip (and only skip) the
    instruction rows before them, across many 16-row tiles and a G=3 head group (24+ packed-row tiles)."""
    B, Hq, Hkv, L, Dh, D = 2, 3, 1, 97, 8, 5
    q, k, hidden, qm, km, am = make_case(B, Hq, Hkv, L, Dh, D, seed=21)
    km[:] = False
    for lo, hi in ((3, 20), (40, 55), (70, 90)):
        km[:, lo:hi] = True
    km[1, 93:95] = True
    qm = ~km
    am[1, :9] = False  # left padding on the second sample
    a_ref, _ = reference_attention(q, k, qm, km, am)
    a, _ = instruction_column_attention(q, k, qm, km, am, pool_impl=backend)
    _assert_close_nan(a, a_ref, atol=1e-5)
    ref, _, n_ref = reference_pool(q, k, hidden, qm, km, am, 0.9)
    out, n = instruction_attended_pool(q, k, hidden, qm, km, am, pool_impl=backend, return_stats=True)
    assert torch.equal(n.cpu(), n_ref)
    _assert_close_nan(out, ref, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """q/k as transformers produces them before SDPA: (B, L, H, Dh) storage viewed as (B, H, L, Dh)."""
    q, k, hidden, qm, km, am = make_case(2, 4, 2, 29, 16, 6, pad="right", seed=17)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)
    assert not qt.is_contiguous() and not kt.is_contiguous()
    ref, _, _ = reference_pool(q, k, hidden, qm, km, am)
    out = instruction_attended_pool(qt, kt, hidden.transpose(0, 1).contiguous().transpose(0, 1), qm, km, am,
                                    pool_impl=backend)
    _assert_close_nan(out, ref, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_torch_chunks_and_custom_scale(backend):
    q, k, hidden, qm, km, am = make_case(2, 4, 2, 37, 8, 6, pad="left", seed=3)
    ref, _, _ = reference_pool(q.cpu(), k.cpu(), hidden.cpu(), qm.cpu(), km.cpu(), am.cpu(), 0.8, scale=0.05)
    kw = dict(chunk_size=3) if backend == "torch" else {}
    out = instruction_attended_pool(q, k, hidden, qm, km, am, threshold=0.8, scale=0.05, pool_impl=backend, **kw)
    _assert_close_nan(out, ref, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_samples_give_nan(backend):
    B, H, L, Dh, D = 4, 2, 9, 8, 4
    q, k, hidden, qm, km, am = make_case(B, H, H, L, Dh, D, seed=5)
    qm[0], km[0] = True, False  # text-only sample: no visual token
    qm[1], km[1] = False, True  # no instruction token
    qm[2, :], km[2, :] = False, False  # instructions strictly before the image: they cannot see it
    qm[2, :3], km[2, 3:] = True, True
    pooled, valid = instruction_attended_pool(q, k, hidden, qm, km, am, pool_impl=backend, return_valid=True)
    assert valid.tolist() == [False, False, False, True]
    assert torch.isnan(pooled[:3]).all() and torch.isfinite(pooled[3]).all()
    ref, _, _ = reference_pool(q.cpu(), k.cpu(), hidden.cpu(), qm.cpu(), km.cpu(), am.cpu())
    _assert_close_nan(pooled, ref, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_extremes(backend):
    q, k, hidden, qm, km, am = make_case(3, 2, 1, 23, 8, 5, pad="right", seed=11)
    all_vis, n_all = instruction_attended_pool(q, k, hidden, qm, km, am, threshold=1.0, pool_impl=backend,
                                                  return_stats=True)
    vis = km & am
    expected = torch.stack([hidden[b, vis[b]].mean(0) for b in range(3)])
    torch.testing.assert_close(all_vis, expected, atol=1e-6, rtol=0)
    assert n_all.tolist() == vis.sum(1).tolist()

    one, n_one = instruction_attended_pool(q, k, hidden, qm, km, am, threshold=1e-6, pool_impl=backend,
                                              return_stats=True)
    assert n_one.tolist() == [1, 1, 1]
    a, _ = instruction_column_attention(q, k, qm, km, am, pool_impl=backend)
    top = a.nan_to_num(-1.0).argmax(dim=1)
    torch.testing.assert_close(one, hidden[torch.arange(3, device=DEVICE), top], atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_ties_keep_lower_positions(backend):
    # q = 0 gives uniform rows, so visual tokens all placed before the instructions tie exactly.
    B, H, L, Dh, D = 1, 2, 10, 8, 3
    q = torch.zeros(B, H, L, Dh, device=DEVICE)
    k = torch.randn(B, H, L, Dh, device=DEVICE)
    hidden = torch.arange(B * L * D, dtype=torch.float32, device=DEVICE).view(B, L, D)
    km = torch.zeros(B, L, dtype=torch.bool, device=DEVICE)
    km[0, 1:5] = True
    qm = ~km
    pooled, n = instruction_attended_pool(q, k, hidden, qm, km, threshold=0.6, pool_impl=backend, return_stats=True)
    assert n.tolist() == [3]
    torch.testing.assert_close(pooled[0], hidden[0, 1:4].mean(0), atol=0, rtol=0)


def test_selection_tie_break_and_cutoff_unit():
    a = torch.tensor([[0.0, 0.25, 0.25, 0.25, 0.25, 0.0]])
    vmask = torch.tensor([[False, True, True, True, True, False]])
    hidden = torch.arange(6, dtype=torch.float32).view(1, 6, 1)
    valid = torch.tensor([True])
    # running sums 0.25, 0.5, 0.75, 1.0 (exact in binary): 0.5 does not exceed 0.5, 0.75 does.
    pooled, n = _select_and_pool(a, valid, vmask, hidden, 0.5)
    assert n.tolist() == [3] and pooled.item() == 2.0
    pooled, n = _select_and_pool(a, valid, vmask, hidden, 0.25)
    assert n.tolist() == [2] and pooled.item() == 1.5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_bounded_by_torch_same_dtype(backend, dtype):
    """flash-attention rule: |kernel - fp32 ref| <= 2 |same-dtype eager - fp32 ref| + small eps.

    The kept set can flip near the threshold in low precision, so the smooth column attention is
    compared, and the pooled vector only where the kept counts agree.
    """
    B, Hq, Hkv, L, Dh, D = 2, 4, 2, 45, 16, 8
    q, k, hidden, qm, km, am = make_case(B, Hq, Hkv, L, Dh, D, pad="left", seed=7, dtype=dtype)
    a_ref, _ = reference_attention(q.cpu().float(), k.cpu().float(), qm.cpu(), km.cpu(), am.cpu())
    # Same-dtype eager: logits, softmax, head/row means all in the low precision.
    G = Hq // Hkv
    s = (q.cpu() @ k.cpu().repeat_interleave(G, 1).transpose(-1, -2)) * Dh ** -0.5
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    s = s.masked_fill(~(causal[None, None] & am.cpu()[:, None, None, :]), float("-inf"))
    p = torch.softmax(s, dim=-1).mean(1)
    a_lp = torch.zeros(B, L, dtype=torch.float64)
    for b in range(B):
        rows, cols = qm[b].cpu() & am[b].cpu(), km[b].cpu() & am[b].cpu()
        col = p[b][rows][:, cols].mean(0)
        a_lp[b, cols] = (col / col.sum()).double()
    a, _ = instruction_column_attention(q, k, qm, km, am, pool_impl=backend)
    err_lp = (a_lp - a_ref).abs().max().item()
    err = (a.cpu().double() - a_ref).abs().max().item()
    assert err <= 2 * err_lp + 1e-5, (err, err_lp)

    pooled, n = instruction_attended_pool(q, k, hidden, qm, km, am, pool_impl=backend, return_stats=True)
    ref, _, n_ref = reference_pool(q.cpu().float(), k.cpu().float(), hidden.cpu(), qm.cpu(), km.cpu(), am.cpu())
    same = n.cpu() == n_ref
    assert same.any()
    _assert_close_nan(pooled.cpu()[same], ref[same], atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_right_and_left_padding_agree_with_unpadded(backend):
    """The same sample padded left or right yields the same vector as unpadded (positions just masked)."""
    H, L, Dh, D, P = 2, 13, 8, 4, 5
    q, k, hidden, qm, km, _ = make_case(1, H, H, L, Dh, D, seed=13)
    base = instruction_attended_pool(q, k, hidden, qm, km, pool_impl=backend)

    def padded(left):
        def pad(t, dim, value):
            shape = list(t.shape)
            shape[dim] = P
            z = torch.full(shape, value, dtype=t.dtype, device=t.device)
            return torch.cat([z, t] if left else [t, z], dim=dim)
        am = pad(torch.ones(1, L, dtype=torch.bool, device=DEVICE), 1, False)
        # Garbage values and roles on the padding: all must be ignored.
        return pad(q, 2, 7.0), pad(k, 2, 7.0), pad(hidden, 1, 7.0), pad(qm, 1, True), pad(km, 1, True), am

    for left in (False, True):
        out = instruction_attended_pool(*padded(left), pool_impl=backend)
        torch.testing.assert_close(out, base, atol=1e-5, rtol=0)


def test_validation_errors():
    q, k, hidden, qm, km, am = make_case(1, 4, 2, 9, 8, 4, seed=1)
    f = instruction_attended_pool
    with pytest.raises(ValueError, match="threshold"):
        f(q, k, hidden, qm, km, am, threshold=0.0)
    with pytest.raises(ValueError, match="threshold"):
        f(q, k, hidden, qm, km, am, threshold=1.5)
    with pytest.raises(ValueError, match="multiple"):
        f(q[:, :3], k, hidden, qm, km, am)
    with pytest.raises(ValueError, match="4-D"):
        f(q[0], k, hidden, qm, km, am)
    with pytest.raises(ValueError, match="does not match"):
        f(q, k[:, :, :5], hidden, qm, km, am)
    with pytest.raises(ValueError, match="hidden"):
        f(q, k, hidden[:, :5], qm, km, am)
    with pytest.raises(TypeError, match="bool"):
        f(q, k, hidden, qm.int(), km, am)
    with pytest.raises(ValueError, match="shape"):
        f(q, k, hidden, qm[:, :3], km, am)
    with pytest.raises(TypeError, match="share a dtype"):
        f(q, k.half(), hidden, qm, km, am)
    with pytest.raises(TypeError, match="float16"):
        f(q.double(), k.double(), hidden, qm, km, am)
    with pytest.raises(ValueError, match="pool_impl"):
        f(q, k, hidden, qm, km, am, pool_impl="cuda")
    with pytest.raises(ValueError, match="scale"):
        f(q, k, hidden, qm, km, am, scale=-1.0)


def test_old_backend_keyword_still_works_with_a_warning():
    q, k, hidden, qm, km, am = make_case(2, 2, 2, 9, 8, 4, seed=3)
    ref = instruction_attended_pool(q, k, hidden, qm, km, am, pool_impl="torch")
    with pytest.warns(DeprecationWarning, match="use pool_impl"):
        old = instruction_attended_pool(q, k, hidden, qm, km, am, backend="torch")
    torch.testing.assert_close(old, ref, rtol=0, atol=0, equal_nan=True)
    with pytest.warns(DeprecationWarning, match="use pool_impl"):
        a, _ = instruction_column_attention(q, k, qm, km, am, backend="torch")
    torch.testing.assert_close(a, instruction_column_attention(q, k, qm, km, am, pool_impl="torch")[0],
                               rtol=0, atol=0, equal_nan=True)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    if HAS_CUDA:
        pytest.skip("CPU-only check")
    q, k, hidden, qm, km, am = make_case(1, 2, 2, 5, 8, 4, seed=2)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        instruction_attended_pool(q, k, hidden, qm, km, am, pool_impl="triton")


def test_auto_backend_and_default_return():
    q, k, hidden, qm, km, am = make_case(2, 2, 2, 11, 8, 4, seed=4)
    out = instruction_attended_pool(q, k, hidden, qm, km, am)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 4) and out.dtype == torch.float32
    ref, _, _ = reference_pool(q.cpu(), k.cpu(), hidden.cpu(), qm.cpu(), km.cpu(), am.cpu())
    _assert_close_nan(out, ref, atol=1e-5)


def test_triton_autotune_wrappers_build():
    """The compiled-mode autotuner validates its key names against the kernel signature on
    construction; build both wrappers here so a renamed argument fails on CPU too."""
    # The package attribute of that name is the function; the module lives in sys.modules.
    mod = importlib.import_module("scalselect_fast.ops.instruction_attended_pool")
    if mod.triton is None:
        pytest.skip("triton not installed")
    cfgs = mod._autotune_configs()
    assert len(cfgs) >= 8 and all(c.kwargs["BLOCK_M"] >= 16 and c.kwargs["BLOCK_N"] >= 16 for c in cfgs)
    for kernel in (mod._row_lse_kernel, mod._visual_colsum_kernel):
        assert mod._tuned(kernel) is mod._tuned(kernel)


_COMPILE_SNIPPET = """
import importlib, sys, torch
mod = importlib.import_module("scalselect_fast.ops.instruction_attended_pool")
for kernel in (mod._row_lse_kernel, mod._visual_colsum_kernel):
    ck = mod._compile_offline(kernel, torch.bfloat16, 64, 64, head_dim=128, arch=int(sys.argv[1]), num_warps=4)
    assert len(ck.asm["cubin"]) > 0, "empty cubin"
    assert "mma" in ck.asm["ptx"], "no tensor-core instruction in the PTX"
print("ok")
"""


@pytest.mark.slow
def test_triton_kernels_compile_for_hopper_offline():
    """Compiled mode is not exercised by the interpreter: compile both kernels (bf16, head_dim 128,
    one autotune candidate) to an sm_90 cubin with the triton wheel's ptxas, no GPU needed. Runs in
    a subprocess because this process has Triton in interpreter mode."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    mod = importlib.import_module("scalselect_fast.ops.instruction_attended_pool")
    if mod.triton is None:
        pytest.skip("triton not installed")
    if not (Path(mod.triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("the triton wheel has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", _COMPILE_SNIPPET, "90"], capture_output=True, text=True,
                         env=env, cwd=root, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (compiled Triton at a realistic size)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # fp16 shares bf16's code path
def test_triton_compiled_realistic_size(dtype):
    """Compiled kernels (autotuned tiles, GQA 32/8, head_dim 128, left padding) vs the torch backend,
    which was pinned to the float64 eager map above; low precision bounded by the same-dtype eager
    map's own error (flash-attention rule)."""
    B, Hq, Hkv, L, Dh, D = 2, 32, 8, 1536, 128, 64
    q, k, hidden, qm, km, am = make_case(B, Hq, Hkv, L, Dh, D, pad="left", seed=99, dtype=dtype)
    a_ref, _ = instruction_column_attention(q.float(), k.float(), qm, km, am, pool_impl="torch")
    a, valid = instruction_column_attention(q, k, qm, km, am, pool_impl="triton")
    assert valid.all()
    err = (a - a_ref).abs().max().item()
    if dtype == torch.float32:
        assert err <= 1e-5, err
    else:
        G = Hq // Hkv
        s = (q @ k.repeat_interleave(G, 1).transpose(-1, -2)) * Dh ** -0.5
        causal = torch.ones(L, L, dtype=torch.bool, device=DEVICE).tril()
        s = s.masked_fill(~(causal[None, None] & am[:, None, None, :]), float("-inf"))
        # same-dtype eager map; a left-padded query row sees no key, its all -inf row gives NaN
        # (and NaN * 0 stays NaN in the einsum below), so it is zeroed as the kernel ignores it
        p = torch.softmax(s, dim=-1).nan_to_num(0.0).mean(1)
        rows = (qm & am).to(p.dtype)
        col = torch.einsum("bi,bij->bj", rows, p) * (km & am)
        a_lp = col.float() / col.float().sum(1, keepdim=True)
        err_lp = (a_lp - a_ref).abs().max().item()
        assert err <= 2 * err_lp + 1e-5, (err, err_lp)
    pooled = instruction_attended_pool(q, k, hidden, qm, km, am, pool_impl="triton")
    assert torch.isfinite(pooled).all()
