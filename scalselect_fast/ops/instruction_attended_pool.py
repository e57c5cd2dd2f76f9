"""Instruction-attended pooling of one decoder layer's hidden states, without the attention map.

ScalSelect represents a sample by the mean hidden state of the visual tokens that the instruction
tokens attend to most in one decoder layer. The reference recipe asks the model for the full
``[B, H, L, L]`` attention map; this module computes the same vector from the layer's post-RoPE
``q``/``k`` with memory linear in ``L``:

* ``torch`` implementation: loops over chunks of instruction rows; per chunk it materialises the logits of
  those rows only (``H x chunk x L``, fp32), normalises each row over all its visible keys in place
  and accumulates the column sums over visual keys. Runs on CPU and CUDA.
* ``triton`` implementation: two kernels, :func:`_row_lse_kernel` (online log-sum-exp per instruction row over
  all visible keys) and :func:`_visual_colsum_kernel` (instruction->visual column sums of
  ``exp(q.k*scale - lse)``, one program per key block, no atomics), both accumulating in fp32.
  Runs compiled on CUDA and under ``TRITON_INTERPRET=1`` on CPU tensors (tests).

The final sort / threshold / mean-pool is O(L log L) per sample and done with torch on the host.
This module does not run models; :mod:`scalselect_fast.extract` feeds it the layer's ``q``, ``k`` and
output hidden states.
"""
from __future__ import annotations

import math
import os
import warnings

import torch

from ..devices import resolve_pool_impl

try:  # Triton is optional (Linux wheels only); the torch implementation works without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

__all__ = ["instruction_attended_pool", "instruction_column_attention"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Elements of fp32 logits one chunk of the torch implementation may hold (H x chunk x L); 4M = 16 MiB.
_TORCH_CHUNK_ELEMS = 1 << 22


# --------------------------------------------------------------------------------------------------
# Input validation and dispatch
# --------------------------------------------------------------------------------------------------
def _check_mask(name: str, m, B: int, L: int, device) -> torch.Tensor:
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of dtype bool with shape ({B}, {L}), got {type(m)!r}")
    if m.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool (True = token belongs to the set), got {m.dtype}")
    if tuple(m.shape) != (B, L):
        raise ValueError(f"{name} must have shape (batch, seqlen) = ({B}, {L}), got {tuple(m.shape)}")
    if m.device != device:
        raise ValueError(f"{name} is on {m.device} but q is on {device}; move all inputs to one device")
    return m


def _validate(q, k, query_mask, key_mask, attention_mask, scale, hidden=None, threshold=None):
    """Check shapes/dtypes/devices; return (B, Hq, Hkv, L, Dh, scale, qmask, vmask, amask)."""
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t)!r}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seqlen, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    B, Hq, L, Dh = q.shape
    Bk, Hkv, Lk, Dhk = k.shape
    if (Bk, Lk, Dhk) != (B, L, Dh):
        raise ValueError(
            f"k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)}: need the same batch, "
            "seqlen and head_dim (layout (batch, heads, seqlen, head_dim))"
        )
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv}) for GQA")
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must share a dtype, got q {q.dtype} and k {k.dtype}")
    if k.device != q.device:
        raise ValueError(f"k is on {k.device} but q is on {q.device}; move all inputs to one device")
    if hidden is not None:
        if not isinstance(hidden, torch.Tensor):
            raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden)!r}")
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != (B, L):
            raise ValueError(
                f"hidden must have shape (batch, seqlen, hidden_dim) = ({B}, {L}, D), got {tuple(hidden.shape)}"
            )
        if not hidden.is_floating_point():
            raise TypeError(f"hidden must be a floating-point tensor, got {hidden.dtype}")
        if hidden.device != q.device:
            raise ValueError(f"hidden is on {hidden.device} but q is on {q.device}; move all inputs to one device")
    if threshold is not None:
        t = float(threshold)
        if not (0.0 < t <= 1.0) or math.isnan(t):
            raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    if scale is None:
        scale = Dh ** -0.5
    else:
        scale = float(scale)
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a positive finite number or None (= head_dim**-0.5), got {scale!r}")
    _check_mask("query_mask", query_mask, B, L, q.device)
    _check_mask("key_mask", key_mask, B, L, q.device)
    if attention_mask is None:
        amask = torch.ones(B, L, dtype=torch.bool, device=q.device)
    else:
        amask = _check_mask("attention_mask", attention_mask, B, L, q.device)
    # Padding positions are never instruction rows nor visual keys, whatever the role masks say.
    qmask = query_mask & amask
    vmask = key_mask & amask
    return B, Hq, Hkv, L, Dh, scale, qmask, vmask, amask


def _renamed(pool_impl: str, backend) -> str:
    """``pool_impl``, or the value given under its old name ``backend`` (with a DeprecationWarning)."""
    if backend is None:
        return pool_impl
    warnings.warn("backend= is deprecated for the pooling kernel; use pool_impl= ('auto', 'torch' or 'triton')",
                  DeprecationWarning, stacklevel=3)
    return backend


# --------------------------------------------------------------------------------------------------
# torch implementation: chunked over instruction rows
# --------------------------------------------------------------------------------------------------
def _colsum_torch(q, k, qmask, vmask, amask, scale, chunk_size=None):
    """Un-normalised instruction->visual column sums with the torch implementation.

    Returns float64 ``(B, L)``: ``c[b, j] = sum_{h, i in instr(b)} p^h_ij`` for visual ``j``
    (0 elsewhere), with ``p^h_ij`` the causal, padding-masked softmax of ``q_i.k_j*scale`` in fp32.
    Peak extra memory per chunk: one ``Hq x chunk x L`` fp32 buffer (softmax done in place) plus
    one fp32 copy of ``k[b]`` when the inputs are half precision.
    """
    B, Hq, L, Dh = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    out = torch.zeros(B, L, dtype=torch.float64, device=q.device)
    if chunk_size is None:
        chunk_size = max(1, _TORCH_CHUNK_ELEMS // max(1, Hq * L))
    chunk_size = int(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    pos = torch.arange(L, device=q.device)
    for b in range(B):
        rows = torch.nonzero(qmask[b]).flatten()
        cols = torch.nonzero(vmask[b]).flatten()
        if rows.numel() == 0 or cols.numel() == 0:
            continue
        kb = k[b].float()  # (Hkv, L, Dh); a no-op for fp32 inputs
        pad_cols = torch.nonzero(~amask[b]).flatten()
        acc = torch.zeros(cols.numel(), dtype=torch.float64, device=q.device)
        for start in range(0, rows.numel(), chunk_size):
            r = rows[start:start + chunk_size]
            # Causality: these rows see keys < last_row + 1 only, so the logits stop there.
            n_keys = int(r[-1]) + 1
            n_cols = int(torch.searchsorted(cols, n_keys))
            if n_cols == 0:
                continue  # no visual key precedes these rows: they contribute nothing
            # Scale folded into the small query chunk instead of the big logits buffer.
            # GQA: the G query heads of a kv head are stacked as rows of one bmm (no k repeat).
            qc = (q[b][:, r, :].float() * scale).reshape(Hkv, G * r.numel(), Dh)
            logits = torch.bmm(qc, kb[:, :n_keys, :].transpose(1, 2))  # (Hkv, G*C, n_keys)
            lv = logits.view(Hkv, G, r.numel(), n_keys)
            # Causal mask only where it can bite: keys after the chunk's first row (a C-wide band
            # when instruction rows are contiguous), not the whole C x L block.
            band = int(r[0]) + 1
            if band < n_keys:
                lv[..., band:].masked_fill_(pos[None, band:n_keys] > r[:, None], float("-inf"))
            if pad_cols.numel():
                lv.index_fill_(-1, pad_cols[pad_cols < n_keys], float("-inf"))
            # Softmax in place on the one big buffer: exp(l - rowmax), then every row's weight
            # 1 / rowsum is folded into a single GEMV that sums the rows per key column.
            # Each row sees itself, so rowmax is finite and rowsum >= 1.
            logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
            e = logits.view(-1, n_keys)
            inv_rowsum = e.sum(dim=-1).reciprocal_()
            col = inv_rowsum[None, :] @ e  # (1, n_keys): sum_rows p_ij over all heads and rows
            acc[:n_cols] += col[0, cols[:n_cols]].double()
            del logits, lv, e, qc, col
        out[b, cols] = acc
    return out


# --------------------------------------------------------------------------------------------------
# Triton implementation: row log-sum-exp, then instruction->visual column sums
# --------------------------------------------------------------------------------------------------
# Layout shared by both kernels. Instruction rows of sample b are listed in ROWS[b, :n_rows[b]]
# (ascending positions) and visual keys in COLS[b, :n_cols[b]]. The host packs the instruction rows
# of q as QP[b, g, v] with "virtual rows" v = row * G + head_in_group for kv head g: one program then
# reads each k tile once for its whole head group (GQA without repeating k), and q tiles are plain
# contiguous block loads (no per-row indirection), which the compiler can pipeline with cp.async.
# The packed copy holds only instruction rows: B * Hq * n_rows * Dh elements, O(L * D).
_LOG2E = 1.4426950408889634

if triton is not None:

    @triton.jit
    def _row_lse_kernel(
        QP, K, ROWS, NROWS, AMASK, LSE,
        stride_qb, stride_qg, stride_qv, stride_qd,
        stride_kb, stride_kh, stride_kl, stride_kd,
        stride_rb, stride_ab, stride_lb, stride_lh,
        L, G, HEAD_DIM, qk_scale_log2,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ):
        """Base-2 log-sum-exp of each packed instruction row over all keys it can see.

        ``LSE[b, g, v] = log2 sum_{j <= pos(v), amask[b, j]} 2^(s_vj)``, ``s_vj = q_v . k_j * scale * log2(e)``,
        computed with an online softmax over key blocks (running max and rescaled sum in fp32; the
        dot products accumulate in fp32, in IEEE fp32 for fp32 inputs). Keys past the block's last
        row are never loaded (causality).
        """
        pid_m = tl.program_id(0)
        g = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        n_virtual = tl.load(NROWS + b) * G
        v = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        v_ok = v < n_virtual
        pos = tl.load(ROWS + b * stride_rb + v // G, mask=v_ok, other=0)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q = tl.load(QP + b * stride_qb + g * stride_qg + v[:, None] * stride_qv + d[None, :] * stride_qd,
                    mask=v_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST_DOT:
            q = q.to(tl.float32)
        k_base = K + b * stride_kb + g * stride_kh
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        n_keys = tl.max(tl.where(v_ok, pos, -1)) + 1
        for start in range(0, n_keys, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = n < L
            real = tl.load(AMASK + b * stride_ab + n, mask=n_ok, other=0) != 0
            kt = tl.load(k_base + n[None, :] * stride_kl + d[:, None] * stride_kd,
                         mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            if UPCAST_DOT:
                kt = kt.to(tl.float32)
            s = tl.dot(q, kt, input_precision=INPUT_PRECISION) * qk_scale_log2
            seen = (n[None, :] <= pos[:, None]) & real[None, :]
            s = tl.where(seen, s, -1.0e30)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # where() and not a finite fill alone: a row with no visible key yet has m_new = -1e30.
            p = tl.where(seen, tl.exp2(s - m_new[:, None]), 0.0)
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(p, 1)
            m_i = m_new
        lse = m_i + tl.log2(tl.where(v_ok, l_i, 1.0))
        tl.store(LSE + b * stride_lb + g * stride_lh + v, lse, mask=v_ok)

    @triton.jit
    def _visual_colsum_kernel(
        QP, K, ROWS, NROWS, COLS, NCOLS, NBEFORE, LSE, OUT,
        stride_qb, stride_qg, stride_qv, stride_qd,
        stride_kb, stride_kh, stride_kl, stride_kd,
        stride_rb, stride_cb, stride_lb, stride_lh, stride_ob, stride_oh,
        G, HEAD_DIM, qk_scale_log2,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ):
        """Column sums of the instruction rows' probabilities over one block of visual keys.

        ``OUT[b, g, c] = sum_{v packed rows of kv head g, pos(v) >= pos(c)} 2^(s_vc - LSE[b, g, v])``
        accumulated in fp32 registers. Each program owns one key block of one (sample, kv head), so
        the result is written once, without atomics (deterministic). Rows that precede the block's
        first key are skipped: ``NBEFORE[b, c]`` counts instruction rows before visual key ``c``.
        """
        pid_n = tl.program_id(0)
        g = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        n_cols = tl.load(NCOLS + b)
        n_virtual = tl.load(NROWS + b) * G
        c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        c_ok = c < n_cols
        cpos = tl.load(COLS + b * stride_cb + c, mask=c_ok, other=0)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        kt = tl.load(K + b * stride_kb + g * stride_kh + cpos[None, :] * stride_kl + d[:, None] * stride_kd,
                     mask=c_ok[None, :] & d_ok[:, None], other=0.0)
        if UPCAST_DOT:
            kt = kt.to(tl.float32)
        # Causality: rows before the first (lowest-position) key of the block contribute nothing.
        first_row = tl.load(NBEFORE + b * stride_cb + pid_n * BLOCK_N, mask=pid_n * BLOCK_N < n_cols,
                            other=0)
        first_row = tl.where(pid_n * BLOCK_N < n_cols, first_row, n_virtual)  # empty tile: no work
        start_v = (first_row * G // BLOCK_M) * BLOCK_M
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for vs in range(start_v, n_virtual, BLOCK_M):
            v = vs + tl.arange(0, BLOCK_M)
            v_ok = v < n_virtual
            pos = tl.load(ROWS + b * stride_rb + v // G, mask=v_ok, other=0)
            q = tl.load(QP + b * stride_qb + g * stride_qg + v[:, None] * stride_qv + d[None, :] * stride_qd,
                        mask=v_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST_DOT:
                q = q.to(tl.float32)
            lse = tl.load(LSE + b * stride_lb + g * stride_lh + v, mask=v_ok, other=0.0)
            s = tl.dot(q, kt, input_precision=INPUT_PRECISION) * qk_scale_log2
            seen = v_ok[:, None] & c_ok[None, :] & (cpos[None, :] <= pos[:, None])
            p = tl.where(seen, tl.exp2(s - lse[:, None]), 0.0)
            acc += tl.sum(p, 0)
        tl.store(OUT + b * stride_ob + g * stride_oh + c, acc, mask=c_ok)


def _triton_launch_config(head_dim: int, dtype: torch.dtype, interpret: bool):
    """The one place that picks tile sizes and warps; returns (fixed launch kwargs or None, BLOCK_D).

    Under the interpreter every program is simulated in numpy, so one small fixed tile keeps tests
    fast. Compiled, ``triton.autotune`` picks among :func:`_autotune_configs` (keyed on head_dim,
    group size and dtype; ``None`` is returned then), except for head_dim < 64 (toy/test models, where
    tuning would only add compile time) or when ``SCALSELECT_TRITON_AUTOTUNE=0``: then a fixed
    64 x 64 tile, 4 warps, 3 stages (one of the screened candidates).
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    if interpret:
        return dict(BLOCK_M=16, BLOCK_N=16), block_d
    if head_dim < 64 or os.environ.get("SCALSELECT_TRITON_AUTOTUNE", "1") == "0":
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3), block_d
    return None, block_d


# (BLOCK_M, BLOCK_N, num_warps, num_stages). Screened with `bench_instruction_attended_pool.py --compile-check` (offline
# sm_80/sm_90 cubins, bf16, head_dim 128, 40 candidates): none spills; these 8 use <= 97 KiB of
# shared memory on sm_80 (so also fit sm_86's 99 KiB) and <= 113 KiB on sm_90, and <= 203
# registers/thread; 4 warps only on the small tiles. Not yet timed on a GPU (no device here): the
# autotuner makes the final pick at run time. Eight keep first-call tuning (compile + benchmark each,
# per head_dim/G/dtype) short.
_CANDIDATES = (
    (64, 32, 4, 3), (64, 64, 4, 3), (64, 64, 8, 3), (64, 128, 8, 2),
    (128, 32, 8, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2),
)


def _autotune_configs():
    """Hopper/Ampere candidates for both kernels (tuned separately, keyed on head_dim, G, dtype)."""
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=st) for bm, bn, w, st in _CANDIDATES]


_TUNED = {}


def _tuned(kernel):
    """Autotuned wrapper of a kernel (compiled mode only), built once."""
    if kernel not in _TUNED:
        # Both kernels overwrite their outputs (no accumulation into them), so benchmarking
        # candidate configs needs no reset hooks.
        key = ["HEAD_DIM", "G", "INPUT_PRECISION", "UPCAST_DOT"]
        _TUNED[kernel] = triton.autotune(configs=_autotune_configs(), key=key)(kernel)
    return _TUNED[kernel]


_PTR_ARGS = {"ROWS": "*i32", "NROWS": "*i32", "COLS": "*i32", "NCOLS": "*i32", "NBEFORE": "*i32",
             "AMASK": "*i8", "LSE": "*fp32", "OUT": "*fp32"}


def _compile_offline(kernel, dtype, block_m, block_n, head_dim=128, arch=90, num_warps=4, num_stages=2):
    """Compile one kernel config to a cubin for ``sm_<arch>`` without a GPU (ptxas ships in the
    triton wheel); the process must have been started without ``TRITON_INTERPRET=1``. Used by the tests and by ``bench_instruction_attended_pool.py --compile-check`` to catch errors of
    compiled mode and to read shared-memory / register use of each autotune candidate.

    Returns the ``CompiledKernel`` (``.asm["cubin"]``, ``.metadata.shared``).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from triton.runtime.autotuner import Autotuner

    if _is_interpreted():
        # Triton's own standard library is interpreted too in such a process: compile elsewhere.
        raise RuntimeError("offline compilation needs a process started without TRITON_INTERPRET=1")
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    tname = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}[dtype]
    consts = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                  INPUT_PRECISION="ieee" if dtype == torch.float32 else None, UPCAST_DOT=False)
    # Mirror what the JIT launcher specialises for contiguous (B, H, L, Dh) inputs: unit head_dim
    # strides become constants, pointers and multiple-of-16 strides carry tt.divisibility=16
    # (without these the loads are scalar gathers and never pipelined).
    consts.update(stride_qd=1, stride_kd=1)
    aligned = set()
    if head_dim % 16 == 0:
        aligned = {"stride_qb", "stride_qg", "stride_qv", "stride_kb", "stride_kh", "stride_kl", "HEAD_DIM"}
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        if name in ("QP", "K"):
            sig[name] = tname
        elif name in _PTR_ARGS:
            sig[name] = _PTR_ARGS[name]
        elif name == "qk_scale_log2":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
        if sig[name].startswith("*") or name in aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(n),): v for n, v in consts.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def _is_interpreted() -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - triton without the interpreter module
        return False
    return isinstance(_row_lse_kernel, InterpretedFunction)


def _gather_positions(mask):
    """bool (B, L) -> (int32 (B, M) ascending positions of True padded with 0, int32 (B,) counts, M)."""
    counts = mask.sum(dim=1)
    m = int(counts.max()) if mask.numel() else 0
    # Stable sort of (not mask) puts True positions first, in ascending order.
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :max(m, 1)]
    keep = torch.arange(order.shape[1], device=mask.device)[None, :] < counts[:, None]
    return torch.where(keep, order, 0).to(torch.int32).contiguous(), counts.to(torch.int32).contiguous(), m


def _colsum_triton(q, k, qmask, vmask, amask, scale):
    """Un-normalised instruction->visual column sums with the Triton kernels; float64 (B, L).

    Launches :func:`_row_lse_kernel` on grid ``(ceil(G*n_rows/BLOCK_M), Hkv, B)`` then
    :func:`_visual_colsum_kernel` on ``(ceil(n_cols/BLOCK_N), Hkv, B)``; extra memory is
    the packed instruction rows of q (``B x Hq x n_rows x Dh`` in q's dtype) plus
    ``O(B * (Hq * n_rows + Hkv * n_cols))`` fp32, never ``[B, H, L, L]``.
    """
    if triton is None:
        raise RuntimeError("pool_impl='triton' needs the triton package (pip install triton); use pool_impl='torch'")
    interpret = _is_interpreted()
    if q.device.type == "cpu" and not interpret:
        raise RuntimeError(
            "pool_impl='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before scalselect_fast.ops is first imported (or use pool_impl='torch')"
        )
    B, Hq, L, Dh = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    out = torch.zeros(B, L, dtype=torch.float64, device=q.device)
    rows, n_rows, mq = _gather_positions(qmask)
    cols, n_cols, nk = _gather_positions(vmask)
    if mq == 0 or nk == 0:
        return out
    # Instruction rows strictly before each visual key: lets a key block skip rows it cannot see.
    before = torch.cumsum(qmask.to(torch.int32), dim=1) - qmask.to(torch.int32)
    n_before = torch.gather(before, 1, cols.long()).to(torch.int32).contiguous()
    am8 = amask.to(torch.int8).contiguous()
    # (B, mq, Hq, Dh) gather -> (B, Hkv, mq * G, Dh): row-major virtual rows per kv head.
    qp = q[torch.arange(B, device=q.device)[:, None], :, rows.long()]
    qp = qp.view(B, mq, Hkv, G, Dh).permute(0, 2, 1, 3, 4).reshape(B, Hkv, mq * G, Dh)
    lse = torch.empty(B, Hkv, G * mq, dtype=torch.float32, device=q.device)
    part = torch.empty(B, Hkv, nk, dtype=torch.float32, device=q.device)
    # The Triton 3.9 interpreter computes bf16 x bf16 dots wrongly (values off by 1e10), so under the
    # interpreter bf16 tiles are widened to fp32 first (exact: bf16 -> fp32 is lossless). Compiled
    # kernels use the native bf16/fp16 MMA with fp32 accumulation.
    upcast = interpret and q.dtype == torch.bfloat16
    # fp32 inputs: IEEE products (TF32 would cost ~1e-3 relative); 16-bit inputs: the default MMA.
    precision = "ieee" if q.dtype == torch.float32 or upcast else None
    fixed, block_d = _triton_launch_config(Dh, q.dtype, interpret)
    qk_scale_log2 = float(scale) * _LOG2E
    common = dict(BLOCK_D=block_d, INPUT_PRECISION=precision, UPCAST_DOT=upcast)
    if fixed is None:
        lse_kernel, colsum_kernel = _tuned(_row_lse_kernel), _tuned(_visual_colsum_kernel)
    else:
        lse_kernel, colsum_kernel = _row_lse_kernel, _visual_colsum_kernel
        common.update(fixed)

    def grid_rows(meta):
        return (triton.cdiv(G * mq, meta["BLOCK_M"]), Hkv, B)

    def grid_cols(meta):
        return (triton.cdiv(nk, meta["BLOCK_N"]), Hkv, B)

    lse_kernel[grid_rows](
        qp, k, rows, n_rows, am8, lse,
        *qp.stride(), *k.stride(),
        rows.stride(0), am8.stride(0), lse.stride(0), lse.stride(1),
        L, G, Dh, qk_scale_log2, **common,
    )
    colsum_kernel[grid_cols](
        qp, k, rows, n_rows, cols, n_cols, n_before, lse, part,
        *qp.stride(), *k.stride(),
        rows.stride(0), cols.stride(0), lse.stride(0), lse.stride(1), part.stride(0), part.stride(1),
        G, Dh, qk_scale_log2, **common,
    )
    # Heads of different kv groups summed here, in a fixed order (deterministic).
    colsum = part.sum(dim=1, dtype=torch.float64)  # (B, nk)
    valid = torch.arange(nk, device=q.device)[None, :] < n_cols[:, None]
    out.scatter_add_(1, cols.long(), torch.where(valid, colsum, torch.zeros((), dtype=torch.float64, device=q.device)))
    return out


# --------------------------------------------------------------------------------------------------
# Host selection + pooling
# --------------------------------------------------------------------------------------------------
def _normalise(colsum, qmask, vmask):
    """Column sums (B, L) -> attention over visual tokens a (B, L) float32, valid (B,) bool."""
    colsum = torch.where(vmask, colsum.double(), torch.zeros((), dtype=torch.float64, device=colsum.device))
    total = colsum.sum(dim=1)
    # A sample is usable only if it has instruction rows, visual tokens, and the instruction rows
    # put some mass on them (all instruction tokens before the image would give an all-zero row).
    valid = qmask.any(dim=1) & vmask.any(dim=1) & (total > 0)
    a = colsum / torch.where(valid, total, torch.ones_like(total))[:, None]
    a = a.float()
    a[~valid] = float("nan")
    return a, valid


def _select_and_pool(a, valid, vmask, hidden, threshold):
    """Per sample: sort visual attention descending (ties -> lower position), keep the shortest
    prefix whose running sum exceeds ``threshold`` (>= 1 token, <= all), mean-pool ``hidden`` there.

    The ranking and cut-off are batched (one sort over ``(B, L)``, float64 running sums) so a CUDA
    batch costs two host syncs, not several per sample; the mean is taken per sample over only the
    kept rows (``n_kept x D``, fp32 result of a float64 sum), so hidden is never copied whole.
    """
    B, L = a.shape
    D = hidden.shape[-1]
    pooled = torch.full((B, D), float("nan"), dtype=torch.float32, device=hidden.device)
    vmask = vmask & valid[:, None]
    # Non-visual (and invalid) positions get -1 < any attention value, so they sort last.
    key = torch.where(vmask, a.double().nan_to_num(0.0), torch.full((), -1.0, dtype=torch.float64, device=a.device))
    vals, order = torch.sort(key, dim=1, descending=True, stable=True)
    n_vis = vmask.sum(dim=1)
    if threshold >= 1.0:
        # The running sum of a normalised vector never exceeds 1 in exact arithmetic: keep all
        # (decided here so float rounding of the cumsum cannot cut the tail).
        n_kept = n_vis
    else:
        csum = torch.cumsum(vals.clamp_min(0.0), dim=1)
        # Count of prefixes not yet above the threshold, +1 for the one that crosses it.
        n_kept = torch.minimum((csum <= threshold).sum(dim=1) + 1, n_vis)
    n_kept = n_kept.to(torch.int64)
    for b, n in enumerate(n_kept.tolist()):
        if n > 0:
            pooled[b] = hidden[b].index_select(0, order[b, :n]).double().mean(dim=0).float()
    return pooled, n_kept


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
def instruction_column_attention(q, k, query_mask, key_mask, attention_mask=None, scale=None,
                                 pool_impl="auto", *, chunk_size=None, backend=None):
    """Visual-token attention of the instruction tokens, normalised over visual tokens.

    Computes, for every visual token ``j`` of each sample,

    ``a_j = c_j / sum_{j' visual} c_j'``,  ``c_j = sum_h sum_{i instr} softmax_j'(s^h_ij')``,

    with ``s^h_ij = scale * q[b, h, i] . k[b, h // (Hq/Hkv), j]`` for visible keys ``j <= i`` that are
    not padding (``-inf`` otherwise). The head mean and instruction-row mean of the paper cancel in the
    normalisation. This is the intermediate of :func:`instruction_attended_pool`, exposed so low-
    precision kernels can be compared on a smooth quantity (the kept set can flip near the threshold).

    Parameters
    ----------
    q : Tensor, (batch, q_heads, seqlen, head_dim), float16 / bfloat16 / float32
        Post-RoPE queries of the layer.
    k : Tensor, (batch, kv_heads, seqlen, head_dim), same dtype as ``q``
        Post-RoPE keys; ``q_heads % kv_heads == 0`` (GQA: query head h uses kv head h // (q_heads/kv_heads)).
    query_mask : Tensor, (batch, seqlen), bool
        Instruction tokens (the softmax rows to average).
    key_mask : Tensor, (batch, seqlen), bool
        Visual tokens (the columns to score).
    attention_mask : Tensor, (batch, seqlen), bool, optional
        True for real tokens, False for padding (left or right). Default: no padding.
    scale : float, optional
        Softmax scale; default ``head_dim ** -0.5``.
    pool_impl : {"auto", "torch", "triton"}
        Implementation; ``auto`` = Triton on CUDA, torch otherwise (see :mod:`scalselect_fast.devices`).
    chunk_size : int, optional
        torch implementation only: instruction rows per chunk (default: ~16 MiB of fp32 logits).
    backend : str, optional
        Deprecated name of ``pool_impl``.

    Returns
    -------
    a : Tensor, (batch, seqlen), float32
        Normalised attention on visual tokens (sums to 1 per valid sample), 0 on other tokens,
        NaN rows for invalid samples.
    valid : Tensor, (batch,), bool
        False where a sample has no instruction token, no visual token, or no instruction token that
        can see a visual token (all instructions precede the image).

    Notes
    -----
    Softmax statistics and column sums are accumulated in fp32 (torch: per-chunk sums added into
    fp64; Triton: fp32 per key block, heads summed on the host in fp32), whatever the input dtype.
    """
    B, Hq, Hkv, L, Dh, scale, qmask, vmask, amask = _validate(q, k, query_mask, key_mask, attention_mask, scale)
    if resolve_pool_impl(_renamed(pool_impl, backend), q.device.type, triton is not None) == "torch":
        colsum = _colsum_torch(q, k, qmask, vmask, amask, scale, chunk_size)
    else:
        colsum = _colsum_triton(q, k, qmask, vmask, amask, scale)
    return _normalise(colsum, qmask, vmask)


def instruction_attended_pool(q, k, hidden, query_mask, key_mask, attention_mask=None, threshold=0.9,
                              scale=None, pool_impl="auto", *, return_valid=False, return_stats=False,
                              chunk_size=None, backend=None):
    """Mean hidden state of the visual tokens the instruction tokens attend to most (ScalSelect).

    For each sample: compute the normalised visual attention ``a`` of
    :func:`instruction_column_attention` (layer attention averaged over heads and instruction rows,
    normalised over visual tokens); sort it descending (ties -> lower position first); keep the
    tokens up to and including the first whose running sum exceeds ``threshold`` (at least one,
    at most all; ``threshold == 1`` keeps all); return the fp32 mean of ``hidden`` over the kept tokens.
    No ``[B, H, L, L]`` tensor is ever built.

    Parameters
    ----------
    q : Tensor, (batch, q_heads, seqlen, head_dim), float16 / bfloat16 / float32
        Post-RoPE queries of the layer.
    k : Tensor, (batch, kv_heads, seqlen, head_dim), same dtype as ``q``
        Post-RoPE keys, ``q_heads % kv_heads == 0``.
    hidden : Tensor, (batch, seqlen, hidden_dim), any float dtype
        Hidden states at the OUTPUT of the layer (``hidden_states[layer + 1]``).
    query_mask : Tensor, (batch, seqlen), bool
        Instruction tokens.
    key_mask : Tensor, (batch, seqlen), bool
        Visual tokens.
    attention_mask : Tensor, (batch, seqlen), bool, optional
        True = real token, False = padding (left or right); positions stay causal by index.
    threshold : float in (0, 1], default 0.9
        Cumulative attention mass to keep.
    scale : float, optional
        Softmax scale, default ``head_dim ** -0.5``.
    pool_impl : {"auto", "torch", "triton"}
        Implementation: ``auto`` picks Triton on CUDA and torch elsewhere; ``triton`` on CPU needs
        ``TRITON_INTERPRET=1`` (see :mod:`scalselect_fast.devices`).
    return_valid : bool, default False
        Also return the ``(batch,)`` bool validity mask.
    return_stats : bool, default False
        Also return the ``(batch,)`` int64 number of kept visual tokens (0 for invalid samples).
    chunk_size : int, optional
        torch implementation: instruction rows per chunk.
    backend : str, optional
        Deprecated name of ``pool_impl``.

    Returns
    -------
    pooled : Tensor, (batch, hidden_dim), float32
        NaN rows where a sample has no visual token, no instruction token, or no instruction token
        that sees a visual token. Followed by ``valid`` and/or ``n_kept`` when requested, in that order.

    Examples
    --------
    >>> B, H, L, Dh, D = 1, 2, 6, 4, 8
    >>> q, k = torch.randn(B, H, L, Dh), torch.randn(B, H, L, Dh)
    >>> vis = torch.tensor([[False, True, True, True, False, False]])
    >>> pooled = instruction_attended_pool(q, k, torch.randn(B, L, D), ~vis, vis, pool_impl="torch")
    >>> pooled.shape, pooled.dtype
    (torch.Size([1, 8]), torch.float32)
    """
    _validate(q, k, query_mask, key_mask, attention_mask, scale, hidden=hidden, threshold=threshold)
    a, valid = instruction_column_attention(q, k, query_mask, key_mask, attention_mask, scale,
                                            _renamed(pool_impl, backend),
                                            chunk_size=chunk_size)
    vmask = key_mask if attention_mask is None else key_mask & attention_mask
    pooled, n_kept = _select_and_pool(a, valid, vmask, hidden, float(threshold))
    if not (return_valid or return_stats):
        return pooled
    out = (pooled,)
    if return_valid:
        out += (valid,)
    if return_stats:
        out += (n_kept,)
    return out
