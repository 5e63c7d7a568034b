"""Small-M block-FP8 linear (Triton, SM90): weight streaming for decode, M <= 16 tokens.

Legend: M tokens, N out_features, K in_features, BK = 128 (one scale group along K),
nK = ceil(K / 128), BN the output columns of one program, S split-K factor,
BM the token rows of one program: the next power of two >= M, at most 16 (16 once M > 2
when the kernel quantizes).

    x[M, K] bf16/fp16/fp32, quantized here per 1 x 128 group (dynamic) or by one static scale,
        or x[M, K] fp8 with sx[M, nK] fp32 (or a scalar) already quantized
    w[N, K] fp8, sw[nN, nK] fp32, or e8m0 read as uint8 and rebuilt as fp32 bits << 23
    program (n tile, k split, m tile):
        for each K block kb of its split:  acc[BN, BM] += (w[BN, kb] @ xq[BM, kb].T) * sw * sx
        S == 1: y = acc (+ bias), cast, stored
        S > 1:  fp32 partial stored; the last of the S programs of a tile to arrive (atomic
                ticket) sums the S partials in split order, adds bias, casts and stores

At M <= 16 the product is a few FLOPs per weight byte: the kernel's job is to stream w at
HBM speed. Swap-AB: the weight tile is the MMA's M side (BN rows, K-contiguous 16-byte loads
pipelined ``num_stages`` deep, ``kb_iter`` K blocks per loop iteration), the tokens its N
side. ``tl.dot`` needs 16 columns, so the BM quantized rows are repeated 16 / BM times (no
padding rows to quantize; column j holds token j // (16 / BM)). ``use_dot=False`` (M = 1
only) multiplies in fp32 registers instead and reduces over K once at the end.

Activation codes and scales are computed with act_quant's functions, bit for bit as
fp8fx.reference.quantize_act (IEEE division); with UE8M0 scales the division by 2**e is the
exact multiplication by 2**-e.

Launch overhead: with ``pdl`` the kernel is launched as a programmatic dependent launch
(SM90): it may start while the previous kernel in the stream finishes, lets the next one do
the same, and waits (griddepcontrol.wait) before it reads anything a previous kernel may
have written (x, scales, bias, tickets). Before that wait, ``prefetch`` > 0 asks L2 for each
program's first ``prefetch`` weight K blocks: weights are never written by the kernels
around a linear, and an L2 prefetch returns nothing to the program, so it is safe.

TMA (``tma`` configs): the weight tile is one bulk tensor copy from a host-built descriptor
(expert weights: one descriptor over their [E * N, K] rows), zero-filled past N and K, so the
loop has no weight address math or masks. Used when the launch is captured into a CUDA
graph (see TMA_EAGER for why); the sums equal the pointer loads'.

Split-K is one launch and deterministic: the partial sums are added in split order whichever
program arrives last. The tickets (one int32 per tile) live in a per-device buffer that the
last program of each tile sets back to zero, so it stays zeroed between launches on one
stream. Two streams running split gemvs at the same time would share it: not supported.
The buffer is allocated once, from a helper thread, because the caching allocator puts the
calling thread's allocations into a CUDA-graph pool while one is being recorded (cudagraph
trees' warm-up included), where a buffer that outlives the graph must not live; when the
first split gemv of a device is itself being captured, that call zeroes fresh tickets in
the graph instead.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from fp8fx import reference
from fp8fx.kernels.act_quant import group_scale, interpreting, round_to_e4m3_grid, silu_mul, to_dtype
from fp8fx.kernels.block_gemm import check_operands, num_sms
from fp8fx.kernels.grouped_gemm import expert_tile, max_row_tiles
from fp8fx.kernels.host import cdiv, next_power_of_2

__all__ = ["GemvConfig", "CONFIGS", "GROUPED_CONFIG", "LAUNCH_VARIANTS", "MAX_CAT", "expert_gemv", "gemv", "gemv_cat",
           "gemv_cat_rms_norm", "gemv_cat_silu_mul", "grouped_block_m", "grouped_gemv", "pick_split"]

BLOCK_K = 128  # = the weight and activation scale granularity along K
DOT_COLS = 16  # tl.dot's smallest N


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    num_warps: int
    num_stages: int
    split_k: int = 0  # 0: from the shape (pick_split); else the factor used
    use_dot: bool = True  # False: fp32 FMAs in registers, M = 1 and block_n <= 128 only
    pdl: bool = False  # programmatic dependent launch (see the module docstring)
    prefetch: int = 0  # weight K blocks per program prefetched into L2 first (0 or a power of two)
    kb_iter: int = 1  # K blocks per loop iteration (tensor-core path); FMA path: > 1 double-buffers
    tma: bool = False  # weight tiles through TMA descriptors (tensor-core path; when captured, see TMA_EAGER)

    def __str__(self) -> str:
        extra = ("t" if self.tma else "") + ("p" if self.pdl else "") + (f"f{self.prefetch}" if self.prefetch else "")
        extra += f"i{self.kb_iter}" if self.kb_iter > 1 else ""
        return f"{'dot' if self.use_dot else 'fma'}n{self.block_n}w{self.num_warps}s{self.num_stages}k{self.split_k}{extra}"


# The sweep list, in one place: bench.py --small-m --sweep times every entry x split-K
# factors per shape, then the best three with each LAUNCH_VARIANTS entry (pdl, prefetch);
# dispatch.GEMV_MEASURED holds the winners. (H200 sweeps, NOTES.md: block_n 32 and 6-stage
# variants never won; the double-buffered FMA path, the last entry, lost everywhere.)
CONFIGS = [
    GemvConfig(64, 4, 4),
    GemvConfig(128, 4, 3),
    GemvConfig(128, 4, 4),
    GemvConfig(128, 8, 4),
    GemvConfig(256, 8, 3),
    GemvConfig(64, 4, 4, use_dot=False),
    GemvConfig(128, 8, 3, use_dot=False),
    GemvConfig(128, 4, 3, kb_iter=2),
    GemvConfig(128, 8, 3, kb_iter=2),
    GemvConfig(128, 8, 3, use_dot=False, kb_iter=2),
    GemvConfig(64, 4, 3, tma=True),
    GemvConfig(64, 4, 4, tma=True),
    GemvConfig(128, 4, 3, tma=True),
    GemvConfig(128, 4, 4, tma=True),
]
LAUNCH_VARIANTS = [(True, 0), (False, 4), (True, 4)]


@triton.jit
def _quantize_rows(x, s, UE8M0: tl.constexpr, EXACT_CAST: tl.constexpr):
    """fp32 x[R, G] / s[R] -> fp8 e4m3 codes, as reference._to_fp8 (act_quant.quantize_tile)."""
    if UE8M0:
        # s = 2**e exactly, so x * 2**-e is the correctly rounded x / s (one rounding either way).
        inv = ((254 - ((s.to(tl.int32, bitcast=True) >> 23) & 0xFF)) << 23).to(tl.float32, bitcast=True)
        v = x * inv[:, None]
    else:
        v = tl.math.div_rn(x, s[:, None])
    v = tl.minimum(tl.maximum(v, -448.0), 448.0)
    if EXACT_CAST:
        v = round_to_e4m3_grid(v)
    return v.to(tl.float8e4nv)


@triton.jit
def _prefetch_l2(w_ptr, rn, stride_wn, kb_start, kb_end, PREFETCH: tl.constexpr, BLOCK_K: tl.constexpr):
    # One prefetch per 128-byte line: rows rn, K blocks kb_start .. kb_start + PREFETCH - 1
    # (blocks past kb_end fold back onto kb_start: in bounds, redundant).
    kbs = kb_start + tl.arange(0, PREFETCH)
    kbs = tl.where(kbs < kb_end, kbs, kb_start)
    ptrs = w_ptr + rn[:, None] * stride_wn + kbs[None, :].to(tl.int64) * BLOCK_K
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _grid_dependency(WAIT: tl.constexpr):
    # griddepcontrol (PTX ISA 7.8, SM90): a no-op unless the kernel was launched with PDL.
    if WAIT:
        tl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def _row_rsqrt(x_ptr, r_ptr, row0, row_end, K, eps, stride_xm, stride_rm, HAS_RES: tl.constexpr,
               EXACT_CAST: tl.constexpr, BLOCK_M: tl.constexpr, KB_ALL: tl.constexpr, BLOCK_K: tl.constexpr):
    # rsqrt(mean(h**2) + eps) of each of the BM rows, h = x (+ r) rounded to x's dtype: the
    # whole row as a [BM * KB_ALL, BK] tile (one load per operand), as kernels/norm_quant.
    full = tl.arange(0, BLOCK_M * KB_ALL)
    f_m = row0 + full // KB_ALL
    f_k = (full % KB_ALL)[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    f_mask = (f_m < row_end)[:, None] & (f_k < K)
    h = tl.load(x_ptr + f_m[:, None].to(tl.int64) * stride_xm + f_k, mask=f_mask, other=0.0)
    if HAS_RES:
        r = tl.load(r_ptr + f_m[:, None].to(tl.int64) * stride_rm + f_k, mask=f_mask, other=0.0)
        h = to_dtype(h.to(tl.float32) + r.to(tl.float32), h.dtype, EXACT_CAST)
    hf = h.to(tl.float32)
    var = tl.sum(tl.reshape(tl.sum(hf * hf, axis=1), (BLOCK_M, KB_ALL)), axis=1) / K
    if EXACT_CAST:  # the interpreter has no libdevice
        return tl.math.rsqrt(var + eps)
    return libdevice.rsqrt(var + eps)  # as Inductor and torch.rsqrt on CUDA


@triton.jit
def _prologue(x, x_ptr, r_ptr, nw_ptr, h_ptr, pre_m, pre_k, pre_mask, pid_n, row0, row_end, K, eps,
              stride_xm, stride_rm, PROLOGUE: tl.constexpr, HAS_RES: tl.constexpr, EXACT_CAST: tl.constexpr,
              BLOCK_M: tl.constexpr, KB_ALL: tl.constexpr, KB_PRE: tl.constexpr, BLOCK_K: tl.constexpr):
    # x [BM * KB_PRE, BK]: the program's K range of its rows of x_ptr, as loaded. Returns
    # the fp32 values the GEMM quantizes, rounded to x's dtype after each op as eager torch:
    #   PROLOGUE 1: w * (h.float() * rsqrt(mean(h.float()**2) + eps)).to(dtype), h = x (+ r)
    #               (transformers' RMSNorm); with r, the first N tile's programs store h
    #   PROLOGUE 2: silu(x) * r (the SwiGLU product; x the gate, r the up projection)
    dtype = x.dtype
    if PROLOGUE == 1:
        # The program's own operands are loaded first, the whole rows' reduction after them.
        if HAS_RES:
            r = tl.load(r_ptr + pre_m[:, None].to(tl.int64) * stride_rm + pre_k, mask=pre_mask, other=0.0)
        w = tl.load(nw_ptr + pre_k, mask=pre_k < K, other=0.0)
        inv = _row_rsqrt(x_ptr, r_ptr, row0, row_end, K, eps, stride_xm, stride_rm, HAS_RES, EXACT_CAST,
                         BLOCK_M, KB_ALL, BLOCK_K)
        # each pre row's factor: inv[(pre_m - row0)] through a [BM * KB_PRE, BM] select
        sel = (pre_m - row0)[:, None] == tl.arange(0, BLOCK_M)[None, :]
        inv_pre = tl.sum(tl.where(sel, inv[None, :], 0.0), axis=1)
        if HAS_RES:
            x = to_dtype(x.to(tl.float32) + r.to(tl.float32), dtype, EXACT_CAST)
            if pid_n == 0:
                tl.store(h_ptr + pre_m[:, None].to(tl.int64) * K + pre_k, x, mask=pre_mask)
        n = to_dtype(x.to(tl.float32) * inv_pre[:, None], dtype, EXACT_CAST)
        x = to_dtype(w.to(tl.float32) * n.to(tl.float32), dtype, EXACT_CAST)
    else:
        u = tl.load(r_ptr + pre_m[:, None].to(tl.int64) * stride_rm + pre_k, mask=pre_mask, other=0.0)
        x = silu_mul(x, u, EXACT_CAST)
    return x.to(tl.float32)


@triton.jit
def _store_tile(acc, tok, col_ok, offs_n, n_ok, bias_ptr, y_ptr, stride_ym, HAS_BIAS: tl.constexpr):
    # acc[BN, C] fp32; column c is token tok[c] (stored where col_ok[c]).
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    y_ptrs = y_ptr + tok[None, :].to(tl.int64) * stride_ym + offs_n[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & col_ok[None, :])


@triton.jit
def _gemv_kernel(
    # pointers
    x_ptr, sx_ptr, w_ptr, sw_ptr, bias_ptr, y_ptr, part_ptr, ticket_ptr, offs_ptr,
    w1_ptr, sw1_ptr, bias1_ptr, w2_ptr, sw2_ptr, bias2_ptr, xq_ptr, sxq_ptr, r_ptr, nw_ptr, h_ptr,
    # shapes and scalars
    M, N, K, KB_PER_SPLIT, SPLIT_K, E, N_A, N_B, eps,
    # strides
    stride_xm, stride_sxm, stride_sxk, stride_we, stride_wn, stride_swe, stride_swn, stride_swk,
    stride_ym, stride_ps, stride_rm,
    # meta-parameters
    X_FP8: tl.constexpr, STATIC_ACT: tl.constexpr, ACT_UE8M0: tl.constexpr,
    W_SCALE_E8M0: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    USE_DOT: tl.constexpr, EXACT_CAST: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr,
    KB_ITER: tl.constexpr, W_DOUBLE_BUFFER: tl.constexpr, GROUPED: tl.constexpr, E_POW2: tl.constexpr,
    ROW_IDS: tl.constexpr, ROW_DIV: tl.constexpr, NUM_W: tl.constexpr, W_TMA: tl.constexpr,
    X_PRE: tl.constexpr, KB_PRE: tl.constexpr, PROLOGUE: tl.constexpr, HAS_RES: tl.constexpr, KB_ALL: tl.constexpr,
    FIN_UNROLL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, COLS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)

    # NUM_W > 1 (gemv_cat): the N tiles walk weight 0's (N_A rows), then weight 1's (N_B),
    # then weight 2's (the rest of N), each written at its column offset of y[M, N]. A tile
    # never straddles two weights: tile_n and n_here are the tile and row count in its weight.
    tile_n = pid_n
    n_here = N
    w_row0 = 0  # W_TMA: the descriptor row of this weight's row 0
    if NUM_W > 1:
        tiles_a = tl.cdiv(N_A, BLOCK_N)
        n_here = N_A
        if pid_n >= tiles_a:
            tile_n = pid_n - tiles_a
            n_here = N_B
            y_ptr += N_A
            part_ptr += N_A
            w_ptr = w1_ptr
            sw_ptr = sw1_ptr
            bias_ptr = bias1_ptr
            if NUM_W > 2:
                tiles_b = tl.cdiv(N_B, BLOCK_N)
                if tile_n >= tiles_b:
                    tile_n = tile_n - tiles_b
                    n_here = N - N_A - N_B
                    y_ptr += N_B
                    part_ptr += N_B
                    w_ptr = w2_ptr
                    sw_ptr = sw2_ptr
                    bias_ptr = bias2_ptr

    # Columns of the accumulator: COLS = 16 (tl.dot) holding each of the BM token rows
    # COLS / BM times, or COLS = BM = 1 for the FMA path.
    cols = tl.arange(0, COLS)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < n_here
    if ROW_IDS:
        # One row per program (expert_gemv): its expert id, clamped into range (the wrapper
        # asserts the ids on the device; memory stays in bounds before that fires).
        g = tl.minimum(tl.maximum(tl.load(offs_ptr + pid_m).to(tl.int32), 0), E - 1)
        row0 = pid_m
        row_end = pid_m + 1
    elif GROUPED:
        # Rows sorted by expert (grouped_gemv): this row tile's expert g and rows row0:row_end.
        g, row0, row_end = expert_tile(offs_ptr, pid_m, M, E, E_POW2, BLOCK_M)
        if g > E:  # past the last tile
            return
    else:
        row0 = pid_m * BLOCK_M
        row_end = M
    tok = row0 + cols // (COLS // BLOCK_M)
    col_ok = (cols % (COLS // BLOCK_M) == 0) & (tok < row_end)
    if GROUPED:
        if g == E:  # rows no expert owns: zeros, stored by the first split
            if pid_k == 0:
                _store_tile(tl.zeros((BLOCK_N, COLS), dtype=tl.float32), tok, col_ok, offs_n, n_ok,
                            bias_ptr, y_ptr, stride_ym, False)
            return
    if ROW_IDS or GROUPED:  # expert g's weights and scales
        if W_TMA:  # one descriptor over the [E * N, K] rows: expert g's start at g * N
            w_row0 = g * N
        else:
            w_ptr += g.to(tl.int64) * stride_we
        sw_ptr += g.to(tl.int64) * stride_swe
    offs_m = row0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < row_end
    # Weight rows past N are clamped to row 0 (in bounds, never stored): only K is masked.
    # W_TMA: w_ptr is the weight's TMA descriptor, which fills rows and columns past its
    # [N, K] with zeros (3-D expert weights: past N an expert's tile reads the next
    # expert's rows, never stored).
    rn = tl.where(n_ok, offs_n, 0).to(tl.int64)
    if not W_TMA:
        w_ptrs = w_ptr + rn[:, None] * stride_wn + offs_k[None, :]  # [BN, BK]
    x_ptrs = x_ptr + (offs_m // ROW_DIV)[:, None].to(tl.int64) * stride_xm + offs_k[None, :]  # [BM, BK]
    sx_ptrs = sx_ptr + offs_m * stride_sxm
    if BLOCK_N <= 128:
        sw_ptrs = sw_ptr + (tile_n * BLOCK_N // 128) * stride_swn  # one weight block row
    else:
        sw_ptrs = sw_ptr + (rn // 128) * stride_swn

    kb_start = pid_k * KB_PER_SPLIT
    kb_end = min(kb_start + KB_PER_SPLIT, tl.cdiv(K, BLOCK_K))
    if PDL:
        _grid_dependency(False)  # the next kernel may launch now; it waits for our completion
    if PREFETCH > 0:
        _prefetch_l2(w_ptr, rn, stride_wn, kb_start, kb_end, PREFETCH, BLOCK_K)
    if PDL:
        _grid_dependency(True)  # everything earlier kernels wrote is visible from here on
    stride_sxk_loop = stride_sxk
    if X_PRE:
        # Quantize this program's K range of its rows once, before the K loop, into scratch
        # codes xq [M, K] and scales [M, nK] (every N tile of this split writes the same
        # values), then read them back as fp8 input: the group amax, the division and the
        # cast leave each K block's critical path. Same codes as quantizing per K block.
        pre = tl.arange(0, BLOCK_M * KB_PRE)
        pre_m = row0 + pre // KB_PRE
        pre_kb = kb_start + pre % KB_PRE
        pre_ok = (pre_m < row_end) & (pre_kb < kb_end)
        pre_k = pre_kb[:, None] * BLOCK_K + offs_k[None, :]
        pre_mask = pre_ok[:, None] & (pre_k < K)
        x_pre = tl.load(x_ptr + pre_m[:, None].to(tl.int64) * stride_xm + pre_k, mask=pre_mask, other=0.0)
        if PROLOGUE:
            x_pre = _prologue(x_pre, x_ptr, r_ptr, nw_ptr, h_ptr, pre_m, pre_k, pre_mask, pid_n, row0, row_end, K, eps,
                              stride_xm, stride_rm, PROLOGUE, HAS_RES, EXACT_CAST, BLOCK_M, KB_ALL, KB_PRE, BLOCK_K)
        x_pre = x_pre.to(tl.float32)
        s_pre = group_scale(x_pre, ACT_UE8M0)
        tl.store(xq_ptr + pre_m[:, None].to(tl.int64) * K + pre_k, _quantize_rows(x_pre, s_pre, ACT_UE8M0, EXACT_CAST),
                 mask=pre_mask)
        n_kb = tl.cdiv(K, BLOCK_K)
        tl.store(sxq_ptr + pre_m * n_kb + pre_kb, s_pre, mask=pre_ok)
        tl.debug_barrier()  # this program's codes are written before any thread reads them
        x_ptrs = xq_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
        sx_ptrs = sxq_ptr + offs_m * n_kb
        stride_sxk_loop = 1
    if KB_ITER > 1 or W_DOUBLE_BUFFER:
        k_lim = min(kb_end * BLOCK_K, K)  # this split's K columns end here
    else:
        k_lim = K  # kb < kb_end always (keeps K's divisibility by 16 visible to the compiler)
    if USE_DOT:
        acc = tl.zeros((BLOCK_N, COLS), dtype=tl.float32)
    else:
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if W_DOUBLE_BUFFER:
        # The FMA path loads straight into registers (no cp.async ring): double-buffered by
        # hand, the next K block's load issued before this one's FMAs (more registers).
        w_next = tl.load(w_ptrs + kb_start * BLOCK_K, mask=(kb_start * BLOCK_K + offs_k < k_lim)[None, :], other=0.0)
    for kb0 in range(kb_start, kb_end, KB_ITER):
        for j in tl.static_range(KB_ITER):
            kb = kb0 + j
            k_ok = kb * BLOCK_K + offs_k < k_lim  # past kb_end: zeros, adds nothing
            if KB_ITER > 1:
                kb_s = tl.minimum(kb, kb_end - 1)  # scale index kept in bounds
            else:
                kb_s = kb
            if W_TMA:
                w = w_ptr.load([w_row0 + tile_n * BLOCK_N, kb * BLOCK_K])
            elif not W_DOUBLE_BUFFER:
                w = tl.load(w_ptrs + kb * BLOCK_K, mask=k_ok[None, :], other=0.0)
            else:
                w = w_next
                nxt_ok = (kb + 1) * BLOCK_K + offs_k < k_lim
                w_next = tl.load(w_ptrs + (kb + 1) * BLOCK_K, mask=nxt_ok[None, :], other=0.0)
            x_mask = m_ok[:, None] & k_ok[None, :]
            # Activation codes xq[BM, BK] and scales sx[BM].
            if X_FP8 or X_PRE:
                xq = tl.load(x_ptrs + kb * BLOCK_K, mask=x_mask, other=0.0)
                sx = tl.load(sx_ptrs + kb_s * stride_sxk_loop, mask=m_ok, other=1.0)
            else:
                x = tl.load(x_ptrs + kb * BLOCK_K, mask=x_mask, other=0.0).to(tl.float32)
                if STATIC_ACT:
                    sx = tl.load(sx_ptrs, mask=m_ok, other=1.0)  # strides 0: the one static scale
                    xq = _quantize_rows(x, sx, False, EXACT_CAST)
                else:
                    sx = group_scale(x, ACT_UE8M0)
                    xq = _quantize_rows(x, sx, ACT_UE8M0, EXACT_CAST)
            if W_SCALE_E8M0:
                sw = (tl.load(sw_ptrs + kb_s * stride_swk).to(tl.int32) << 23).to(tl.float32, bitcast=True)
            else:
                sw = tl.load(sw_ptrs + kb_s * stride_swk)
            if USE_DOT:
                if COLS > BLOCK_M:
                    xq = tl.reshape(tl.broadcast_to(xq[:, None, :], (BLOCK_M, COLS // BLOCK_M, BLOCK_K)), (COLS, BLOCK_K))
                    sx = tl.reshape(tl.broadcast_to(sx[:, None], (BLOCK_M, COLS // BLOCK_M)), (COLS,))
                part = tl.dot(w, tl.trans(xq))  # [BN, 16] fp32
                if BLOCK_N <= 128:
                    acc += part * (sx * sw)[None, :]
                else:
                    acc += part * (sw[:, None] * sx[None, :])
            else:
                # M = 1: fold both scales into the activation row, one FMA per weight element.
                acc2 += w.to(tl.float32) * (xq.to(tl.float32) * (sx * sw)[:, None])
    if not USE_DOT:
        acc = tl.sum(acc2, axis=1)[:, None]  # [BN, 1]

    if SPLIT:
        # Partials [S, M, N] fp32; the program that takes the last ticket of this tile reduces.
        p_ptrs = part_ptr + tok[None, :].to(tl.int64) * N + offs_n[:, None]
        p_mask = n_ok[:, None] & col_ok[None, :]
        tl.store(p_ptrs + pid_k * stride_ps, acc, mask=p_mask)
        tl.debug_barrier()  # every thread's partial is written before the (release) ticket
        ticket = tl.atomic_add(ticket_ptr + pid_m * tl.num_programs(0) + pid_n, 1, sem="acq_rel", scope="gpu")
        if ticket == SPLIT_K - 1:
            acc = tl.zeros((BLOCK_N, COLS), dtype=tl.float32)
            # Fixed order (deterministic); FIN_UNROLL independent loads per step are issued
            # together instead of one L2 round trip per split.
            for s0 in range(0, SPLIT_K, FIN_UNROLL):
                for j in tl.static_range(FIN_UNROLL):
                    s = s0 + j
                    s_ok = (tl.zeros((1, 1), dtype=tl.int32) + s) < SPLIT_K
                    acc += tl.load(p_ptrs + s * stride_ps, mask=p_mask & s_ok, other=0.0, cache_modifier=".cg")
            _store_tile(acc, tok, col_ok, offs_n, n_ok, bias_ptr, y_ptr, stride_ym, HAS_BIAS)
            tl.store(ticket_ptr + pid_m * tl.num_programs(0) + pid_n, 0)  # zeroed for the next launch
    else:
        _store_tile(acc, tok, col_ok, offs_n, n_ok, bias_ptr, y_ptr, stride_ym, HAS_BIAS)


_TICKETS_PER_DEVICE = 1 << 16  # tiles (token tiles x N tiles) one split gemv may have
_TICKETS: dict[torch.device, torch.Tensor] = {}
_TICKETS_LOCK = threading.Lock()


def _zeros_off_graph(device: torch.device) -> torch.Tensor:
    result = []

    def alloc():
        with torch.cuda.device(device):
            result.append(torch.zeros(_TICKETS_PER_DEVICE, dtype=torch.int32, device=device))
            torch.cuda.current_stream(device).synchronize()

    thread = threading.Thread(target=alloc)
    thread.start()
    thread.join()
    if not result:
        raise RuntimeError("fp8fx gemv: could not allocate the split-K tickets")
    return result[0]


def _tickets(device: torch.device, count: int) -> torch.Tensor:
    """A zeroed int32[count] the kernel leaves zeroed (see the module docstring)."""
    buf = _TICKETS.get(device)
    if buf is not None and count <= buf.numel():
        return buf
    if count > _TICKETS_PER_DEVICE or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return torch.zeros(count, dtype=torch.int32, device=device)
    with _TICKETS_LOCK:
        if device not in _TICKETS:
            if device.type == "cuda":
                _TICKETS[device] = _zeros_off_graph(device)
            else:  # the interpreter
                _TICKETS[device] = torch.zeros(_TICKETS_PER_DEVICE, dtype=torch.int32, device=device)
    return _TICKETS[device]


def pick_split(m: int, n: int, k: int, cfg: GemvConfig, sms: int, row_tiles: int | None = None) -> int:
    """Split-K factor: ``cfg.split_k``, or about two programs per SM with >= 2 K blocks each
    (the first H200 sweep's winners at every Llama-3-8B shape were at or next to this).
    ``row_tiles``: the programs along M (default cdiv(m, 16)). Normalized so that no split
    is empty."""
    k_blocks = cdiv(k, BLOCK_K)
    split = cfg.split_k
    if not split:
        tiles = cdiv(n, cfg.block_n) * (row_tiles or cdiv(m, 16))
        split = max(1, min(cdiv(2 * sms, tiles), k_blocks // 2))
    split = min(split, k_blocks)
    return cdiv(k_blocks, cdiv(k_blocks, split))


def gemv(
    x: torch.Tensor,
    sx: torch.Tensor | None,
    w: torch.Tensor,
    sw: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    config: GemvConfig | None = None,
    act_ue8m0: bool = False,
) -> torch.Tensor:
    """y[M, N] = x[M, K] @ w[N, K].T, block-FP8, for small M.

    x bf16/fp16/fp32 with sx None: quantized here per 1 x 128 group (UE8M0 scales when
    ``act_ue8m0``); x bf16/fp16/fp32 with sx one value: static per-tensor quantization;
    x fp8 with sx[M, nK] fp32 (any strides) or one value: already quantized.
    w fp8 with sw[nN, nK] fp32 or e8m0. Any M works; it is made for M <= 16.
    """
    return _gemv("gemv", x, sx, [w], [sw], [bias], out_dtype, config, act_ue8m0)


MAX_CAT = 3  # weights one gemv_cat launch takes


def _check_cat_lists(name, ws, sws, biases):
    biases = [None] * len(ws) if biases is None else list(biases)
    if not 1 <= len(ws) <= MAX_CAT or len(sws) != len(ws) or len(biases) != len(ws):
        raise ValueError(f"fp8fx {name}: 1 to {MAX_CAT} weights with one scale and one bias entry each, "
                         f"got {len(ws)}, {len(sws)} and {len(biases)}")
    if len({b is None for b in biases}) > 1:
        raise ValueError(f"fp8fx {name}: give a bias for every weight or for none")
    if len({sw.dtype for sw in sws}) > 1:
        raise TypeError(f"fp8fx {name}: the weight scales must share one dtype, got {[sw.dtype for sw in sws]}")
    return biases


def gemv_cat(
    x: torch.Tensor,
    sx: torch.Tensor | None,
    ws: list[torch.Tensor],
    sws: list[torch.Tensor],
    biases: list[torch.Tensor | None] | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    config: GemvConfig | None = None,
    act_ue8m0: bool = False,
) -> torch.Tensor:
    """y[M, N0 + N1 (+ N2)] = torch.cat([gemv(x, sx, ws[i], sws[i], biases[i]) ...], -1) in
    one launch: 1 to MAX_CAT weights that read the same activations (q/k/v, gate/up), each
    tile streaming one weight's rows and writing its columns of y. Same inputs as gemv; the
    weights share K and the scale dtype, and every bias is given or none is. The config
    and split-K are those of the concatenated shape (M, sum N_i, K)."""
    biases = _check_cat_lists("gemv_cat", ws, sws, biases)
    return _gemv("gemv_cat", x, sx, ws, sws, biases, out_dtype, config, act_ue8m0)


# The fused RMSNorm reads a program's rows whole into registers for the sum of squares (BM x K
# values, BM <= 2): up to this many per program (hidden 8192 at one token, 4096 at two).
NORM_MAX_ELEMS = 8192


def _check_pair(name, x, other, what):
    if x.dtype not in (torch.bfloat16, torch.float16) or x.dim() != 2:
        raise TypeError(f"fp8fx {name}: x must be a bf16/fp16 [M, K] tensor, got {x.dtype} {tuple(x.shape)}")
    if other is not None and (other.shape != x.shape or other.dtype != x.dtype or other.device != x.device):
        raise ValueError(f"fp8fx {name}: {what} must match x ({x.dtype} {tuple(x.shape)} on {x.device}), "
                         f"got {other.dtype} {tuple(other.shape)} on {other.device}")


def gemv_cat_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    ws: list[torch.Tensor],
    sws: list[torch.Tensor],
    biases: list[torch.Tensor | None] | None = None,
    config: GemvConfig | None = None,
    act_ue8m0: bool = False,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gemv_cat(rms_norm(h), ...), h) with h = x (+ residual), x[M, K] bf16/fp16, in one
    launch: each program normalizes its rows (transformers' RMSNorm: fp32 sum of squares of
    the whole row, cast back to x's dtype, times norm_weight[K] in that dtype) before
    quantizing its K range; the first N tile's programs store h. h is an empty tensor
    without a residual; y is in ``out_dtype`` (default x's). Launches that cannot run the
    prologue (prologue_fuses: more than 2 rows per program, rows over NORM_MAX_ELEMS,
    PRE_QUANT off) normalize first, in torch."""
    biases = _check_cat_lists("gemv_cat_rms_norm", ws, sws, biases)
    _check_pair("gemv_cat_rms_norm", x, residual, "residual")
    if tuple(norm_weight.shape) != (x.shape[1],) or norm_weight.dtype != x.dtype:
        raise ValueError(f"fp8fx gemv_cat_rms_norm: norm_weight must be {x.dtype} ({x.shape[1]},), "
                         f"got {norm_weight.dtype} {tuple(norm_weight.shape)}")
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else x.new_empty(0)
    prologue = (1, _unit_stride(residual), norm_weight.contiguous(), h, float(eps))
    y = _gemv("gemv_cat_rms_norm", x, None, ws, sws, biases, out_dtype or x.dtype, config, act_ue8m0, prologue)
    return y, h


def gemv_cat_silu_mul(
    gate: torch.Tensor,
    up: torch.Tensor,
    ws: list[torch.Tensor],
    sws: list[torch.Tensor],
    biases: list[torch.Tensor | None] | None = None,
    config: GemvConfig | None = None,
    act_ue8m0: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """gemv_cat(silu(gate) * up, ...) in one launch, gate and up [M, K] bf16/fp16 (any row
    strides, e.g. the two halves of a gate/up GEMM's output): each program computes its
    K range of the product, rounded to the inputs' dtype after the SiLU and after the
    product as eager torch, before quantizing it. Where the fused prologue cannot run, the
    product is formed first, in torch."""
    biases = _check_cat_lists("gemv_cat_silu_mul", ws, sws, biases)
    _check_pair("gemv_cat_silu_mul", gate, up, "up")
    return _gemv("gemv_cat_silu_mul", gate, None, ws, sws, biases, out_dtype or gate.dtype, config, act_ue8m0,
                 (2, _unit_stride(up), None, None, 0.0))


def _unit_stride(t: torch.Tensor | None) -> torch.Tensor | None:
    """t with unit stride along its last dim (the kernel reads rows through one row stride)."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _unfused_prologue(x, prologue):
    """The prologue's GEMM input in torch (shapes the kernel's prologue does not take)."""
    kind, r, nw, h, eps = prologue
    if kind == 1:
        hh = x if r is None else h.copy_(x + r)
        return reference.rms_norm(hh, nw, eps)
    return torch.nn.functional.silu(x) * r


def _plan(m: int, n: int, k: int, x_fp8: bool, config: GemvConfig | None, device: torch.device):
    """(config, rows per program, tensor-core path, split-K factor) of a dense launch."""
    from fp8fx.kernels import dispatch  # the measured config per shape lives there

    cfg = config or dispatch.gemv_config(m, n, k, x_fp8)
    # Tokens per program, a power of two <= 16. Quantizing in the kernel, 4 or 8 rows
    # repeated 4 or 2 times to fill tl.dot's 16 columns were measured 1.3x and 2x slower
    # than 16 rows with the unused ones masked (H200, Triton 3.6; NOTES.md).
    block_m = min(16, next_power_of_2(m))
    if not x_fp8 and block_m > 2:
        block_m = 16
    use_dot = cfg.use_dot or m > 1 or cfg.block_n > 128  # the FMA path is M = 1 only
    if not use_dot:
        block_m = 1
    return cfg, block_m, use_dot, pick_split(m, n, k, cfg, num_sms(device))


def _prologue_fuses(norm: bool, block_m: int, n_kb: int, split: int) -> bool:
    """The launch quantizes before its K loop, where the prologue runs; RMSNorm rows fit."""
    return _pre_quant(block_m, n_kb, split, dense=True) and (
        not norm or block_m * next_power_of_2(n_kb) * BLOCK_K <= NORM_MAX_ELEMS)


def prologue_fuses(m: int, n: int, k: int, norm: bool, device: torch.device) -> bool:
    """Whether gemv_cat_rms_norm (``norm``) / gemv_cat_silu_mul at M x N x K with the
    measured linear config runs its prologue in the kernel (else it forms the input in
    torch first); passes/prologue.py asks before it rewrites."""
    if m <= 0 or n <= 0 or k <= 0:
        return False
    _, block_m, _, split = _plan(m, n, k, False, None, device)
    return _prologue_fuses(norm, block_m, cdiv(k, BLOCK_K), split)


def _gemv(name, x, sx, ws, sws, biases, out_dtype, config, act_ue8m0, prologue=None) -> torch.Tensor:
    # (1) check
    for w, sw, bias in zip(ws, sws, biases):
        m, _, k = check_operands(name, x, w, sw, bias, sx)
    n = sum(w.shape[0] for w in ws)
    x_fp8 = x.dtype == reference.FP8_DTYPE
    if not x_fp8 and x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"fp8fx {name}: x must be fp8 e4m3 or bf16/fp16/fp32, got {x.dtype}")
    if x_fp8 and sx is None:
        raise ValueError(f"fp8fx {name}: fp8 x needs its scales sx")
    n_kb = cdiv(k, BLOCK_K)
    # One value is a static per-tensor scale, unless it is fp8 x's [1, 1] per-group scale.
    static = sx is not None and sx.numel() == 1 and not (x_fp8 and tuple(sx.shape) == (m, n_kb))
    if sx is None:
        sx_t, stride_sxm, stride_sxk = x, 0, 0  # unused
    elif static:
        sx_t, stride_sxm, stride_sxk = sx.reshape(()).float(), 0, 0
    else:
        if not x_fp8 or tuple(sx.shape) != (m, n_kb) or sx.dtype != torch.float32:
            raise ValueError(f"fp8fx {name}: activation scale must be fp32 ({m}, {n_kb}) for fp8 x, or one static value; got {sx.dtype} {tuple(sx.shape)}")
        sx_t, stride_sxm, stride_sxk = sx, sx.stride(0), sx.stride(1)
    _check_device(name, x)
    x = _unit_stride(x)
    e8m0 = sws[0].dtype == reference.E8M0_DTYPE
    # K-contiguous weights; for several, fully contiguous ones (one set of strides for all).
    dense = (lambda t: t.contiguous()) if len(ws) > 1 else (lambda t: t if t.stride(-1) == 1 else t.contiguous())
    parts = [(dense(w), dense(sw.view(torch.uint8) if e8m0 else sw), None if bias is None else bias.contiguous())
             for w, sw, bias in zip(ws, sws, biases)]

    # (2) allocate
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if prologue is not None and (m == 0 or n == 0 or k == 0):  # no launch: h (gemv_cat_rms_norm) is still written
        _unfused_prologue(x, prologue)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_() if biases[0] is None else out.copy_(torch.cat(biases).expand(m, n))
    cfg, block_m, use_dot, split = _plan(m, n, k, x_fp8, config, x.device)
    if prologue is not None and not _prologue_fuses(prologue[0] == 1, block_m, n_kb, split):
        x, prologue = _unfused_prologue(x, prologue), None
    (w, sw_t, bias), more = parts[0], parts[1:]
    _launch(x, sx_t, (stride_sxm, stride_sxk), w, sw_t, bias, out, cfg, split, block_m, cdiv(m, block_m),
            use_dot=use_dot, x_fp8=x_fp8, static=static and not x_fp8, act_ue8m0=act_ue8m0, e8m0=e8m0, more=more,
            prologue=prologue)
    return out


def _pre_quant(block_m: int, n_kb: int, split: int, dense: bool) -> bool:
    """Whether the kernel quantizes each program's whole K range before the K loop (X_PRE):
    PRE_QUANT, dense weights with dynamic scales of high-precision x (``dense``), 1-2 rows
    per program and at most 32 (row, K block) groups (registers). H200, in a compiled decode
    step: Llama-3-8B at M = 1, the layer's four GEMMs 83.7 -> 78.5 us; Qwen3-MoE attention at
    M = 16 (16 rows x 2 K blocks) slower (0.694 -> 0.726 ms per 2-layer step), hence the row
    bound."""
    return PRE_QUANT and dense and block_m <= 2 and block_m * next_power_of_2(cdiv(n_kb, split)) <= 32


def _launch(x, sx_t, sx_strides, w, sw_t, bias, out, cfg, split, block_m, tiles_m, *, use_dot, x_fp8, static,
            act_ue8m0, e8m0, offs=None, row_ids=False, more=(), prologue=None):
    """One _gemv_kernel launch; w [N, K] / sw_t [nN, nK], or with ``offs`` [E] (grouped)
    w [E, N, K] / sw_t [E, nN, nK] and ``tiles_m`` the grid's row-tile bound; ``row_ids``:
    ``offs`` is instead each output row's expert id (out has M rows, x M / ROW_DIV).
    ``more``: up to two further (w, sw_t, bias) of dense weights (gemv_cat), with the same
    strides as w / sw_t, whose outputs follow w's in out's columns. ``prologue``: (kind, r,
    norm weight, h, eps) of gemv_cat_rms_norm (kind 1) or gemv_cat_silu_mul (kind 2); the
    caller checked that the launch quantizes before the loop (_pre_quant)."""
    m, k = out.shape[0], x.shape[1]
    n = out.shape[1]
    grouped = offs is not None
    n_kb = cdiv(k, BLOCK_K)
    per_split = cdiv(n_kb, split)
    tiles_n = sum(cdiv(wi.shape[-2], cfg.block_n) for wi in (w, *(p[0] for p in more)))  # [E,] N, K
    (w1, sw1, b1), (w2, sw2, b2) = (list(more) + [(w, sw_t, bias)] * 2)[:2]
    if split > 1:
        part = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
        tickets = _tickets(x.device, tiles_m * tiles_n)
    else:
        part, tickets = out, out  # unused
    kb_pre = next_power_of_2(per_split)
    pre = _pre_quant(block_m, n_kb, split, dense=not (x_fp8 or static or grouped or row_ids))
    kind, r, nw, h, eps = prologue or (0, None, None, None, 0.0)
    if kind and not pre:
        raise AssertionError("fp8fx gemv: a fused prologue needs the quantization before the K loop")
    if pre:
        xq_s = torch.empty(m, k, dtype=reference.FP8_DTYPE, device=x.device)
        sx_s = torch.empty(m, n_kb, dtype=torch.float32, device=x.device)
    else:
        xq_s, sx_s = out, out  # unused
    we, swe = (w.stride(0), sw_t.stride(0)) if grouped else (0, 0)
    # PDL and the L2 prefetch run before the grid-dependency wait, but a grouped program
    # needs offs (written by the kernel before) to know its expert's weights: neither there.
    pdl = cfg.pdl and not interpreting() and not grouped
    wa, wb, wc = w, w1, w2
    if grouped:  # expert weights [E, N, K] as the rows of one [E * N, K] descriptor
        wa = wb = wc = w.view(-1, w.shape[-1]) if w.is_contiguous() else w
    tma = cfg.tma and use_dot and cfg.kb_iter == 1 and _tma_launch() and all(map(_tma_ok, (wa, wb, wc)))
    if tma:  # one descriptor per distinct weight (w1 and w2 stand in for missing ones)
        descs = {}
        for t in (wa, wb, wc):
            if id(t) not in descs:
                descs[id(t)] = _descriptor(t, cfg.block_n)
        wa, wb, wc = descs[id(wa)], descs[id(wb)], descs[id(wc)]
    _gemv_kernel[(tiles_n, split, tiles_m)](
        x, sx_t, wa, sw_t, bias if bias is not None else out, out, part, tickets, offs if grouped else out,
        wb, sw1, b1 if b1 is not None else out, wc, sw2, b2 if b2 is not None else out, xq_s, sx_s,
        x if r is None else r, x if nw is None else nw, x if h is None or h.numel() == 0 else h,
        m, n, k, per_split, split, w.shape[0] if grouped else 0,
        w.shape[-2], w1.shape[-2] if more else 0, eps,
        x.stride(0), sx_strides[0], sx_strides[1], we, w.stride(-2), swe, sw_t.stride(-2), sw_t.stride(-1),
        out.stride(0), part.stride(0) if split > 1 else 0, 0 if r is None else r.stride(0),
        X_FP8=x_fp8, STATIC_ACT=static, ACT_UE8M0=act_ue8m0,
        W_SCALE_E8M0=e8m0, HAS_BIAS=bias is not None, SPLIT=split > 1,
        USE_DOT=use_dot, EXACT_CAST=interpreting(),
        PDL=pdl, PREFETCH=0 if interpreting() or grouped or tma else cfg.prefetch,
        KB_ITER=cfg.kb_iter if use_dot else 1, W_DOUBLE_BUFFER=not use_dot and cfg.kb_iter > 1,
        GROUPED=grouped and not row_ids, E_POW2=next_power_of_2(w.shape[0] + 1) if grouped else 1,
        ROW_IDS=row_ids, ROW_DIV=m // x.shape[0] if row_ids else 1, NUM_W=1 + len(more), W_TMA=tma,
        FIN_UNROLL=min(FINISH_UNROLL, next_power_of_2(split)),
        X_PRE=pre, KB_PRE=kb_pre if pre else 1, PROLOGUE=kind, HAS_RES=kind == 1 and r is not None,
        KB_ALL=next_power_of_2(n_kb) if kind == 1 else 1,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=BLOCK_K, COLS=DOT_COLS if use_dot else 1,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **({"launch_pdl": True} if pdl else {}),
    )


# TMA descriptors cost host time at every launch: Triton 3.6's launcher encodes each
# descriptor argument anew (scripts/host_cost_tma.py, H200 host: an eager gemv call 78-87 us
# with pointer loads, 105-111 us with a descriptor; gemv_cat of 3 weights 102-124 vs 143-174).
# A CUDA graph pays that once, at capture, so TMA configs load through descriptors
# when the launch is being captured (and in the interpreter, where the tests check them
# against the pointer loads), and through pointers otherwise: the same sums either way.
# TMA_EAGER = True takes descriptors on eager launches too (the GPU tests).
TMA_EAGER = False

# The split-K finish loads this many partials at a time (unrolled; the sum order stays
# split 0, 1, 2, ...): one L2 round trip per group of splits instead of per split. H200,
# M = 1 linears alone (scripts/probe_prologue.py), one at a time / 4 / 8: q/k/v (split 8)
# 10.20 / 10.14 / 9.83 us, o (8) 9.21 / 8.77 / 8.53, down (16) 21.18 / 20.20 / 20.16.
FINISH_UNROLL = 8

# bf16 activations of a dense gemv (dynamic scales) are quantized once per program, before
# the K loop, into a scratch the loop reads as fp8 input (see _gemv_kernel); False quantizes
# each K block inside the loop.
PRE_QUANT = True


def _tma_launch() -> bool:
    return TMA_EAGER or interpreting() or torch.cuda.is_current_stream_capturing()


def _tma_ok(w: torch.Tensor) -> bool:
    """A TMA descriptor can address w[N, K] fp8: 16-byte aligned start and row stride."""
    return w.dim() == 2 and w.stride(1) == 1 and w.stride(0) % 16 == 0 and w.data_ptr() % 16 == 0


def _descriptor(w: torch.Tensor, block_n: int):
    """Host-side TMA descriptor of w[N, K] fp8 for [block_n, BLOCK_K] tiles (zero-filled
    past N and K). Under a CUDA graph it is encoded once, at capture."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(w, list(w.shape), list(w.stride()), [block_n, BLOCK_K])


# Grouped: the default tile (the usual M <= 2 winner of the dense sweeps, NOTES.md).
GROUPED_CONFIG = GemvConfig(128, 4, 3)


def grouped_block_m(rows: int, experts: int) -> int:
    """Rows per program for ``rows`` rows over ``experts`` experts: from the expected rows per
    active expert under uniform routing (rows / (E * (1 - (1 - 1/E)**rows))). 1 when experts
    mostly get one row (decode at batch 1: top-k experts are distinct), 2 when about two,
    else 16 (the in-kernel quant's better layout, as gemv's rule)."""
    active = experts * (1.0 - (1.0 - 1.0 / experts) ** rows) if experts > 1 else 1.0
    per_expert = rows / max(active, 1.0)
    return 1 if per_expert <= 1.3 else 2 if per_expert <= 2.6 else 16


def _expert_operands(name: str, x, w, sw, index):
    """The checks and operand preparation the per-expert wrappers share: x[T, K] bf16/fp16/fp32
    (quantized in the kernel), w[E, N, K] fp8 with sw[E, nN, nK] fp32/e8m0, ``index`` (offs or
    ids) on the same device. Returns (x, w, sw_t, e8m0) with K-contiguous x and w and the
    scales as the kernel reads them. The caller checks its index, then _check_device."""
    if x.dim() != 2 or w.dim() != 3 or w.shape[0] == 0:
        raise ValueError(f"fp8fx {name}: expected x[T, K] and w[E, N, K] with E >= 1, got {tuple(x.shape)}, {tuple(w.shape)}")
    e = w.shape[0]
    if sw.dim() != 3 or sw.shape[0] != e:
        raise ValueError(f"fp8fx {name}: weight scales must be [E, nN, nK] with E = {e}, got {tuple(sw.shape)}")
    check_operands(name, x, w[0], sw[0], None, index)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"fp8fx {name}: x must be bf16/fp16/fp32 (it is quantized in the kernel), got {x.dtype}")
    e8m0 = sw.dtype == reference.E8M0_DTYPE
    return (x if x.stride(-1) == 1 else x.contiguous(), w if w.stride(-1) == 1 else w.contiguous(),
            sw.view(torch.uint8) if e8m0 else sw.float(), e8m0)


def _check_device(name: str, x: torch.Tensor) -> None:
    if not (x.is_cuda or interpreting()):
        raise RuntimeError(f"fp8fx {name}: the Triton kernel needs CUDA tensors, got {x.device}")


def grouped_gemv(
    x: torch.Tensor,
    w: torch.Tensor,
    sw: torch.Tensor,
    offs: torch.Tensor,
    out_dtype: torch.dtype | None = None,
    config: GemvConfig | None = None,
    act_ue8m0: bool = False,
    block_m: int | None = None,
) -> torch.Tensor:
    """y[T, N]: rows offs[e-1]:offs[e] of x[T, K] times expert e's w[e] (N x K).T, block-FP8,
    for few rows per expert (MoE decode): the contiguous layout of grouped_gemm.grouped_gemm
    (rows past offs[-1] are zeros), computed by the gemv kernel, which streams each active
    expert's weights once per row tile (``block_m`` rows; default grouped_block_m) with
    split-K, quantizing x (bf16/fp16/fp32) per 1 x 128 group in the kernel.
    w fp8 [E, N, K], sw fp32 or e8m0 [E, ceil(N/128), ceil(K/128)], offs int [E]."""
    x, w, sw_t, e8m0 = _expert_operands("grouped_gemv", x, w, sw, offs)
    (t, k), (e, n, _) = x.shape, w.shape
    if tuple(offs.shape) != (e,) or offs.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"fp8fx grouped_gemv: offs must be int32/int64 of shape ({e},), got {offs.dtype} {tuple(offs.shape)}")
    _check_device("grouped_gemv", x)
    out = torch.empty(t, n, dtype=out_dtype or x.dtype, device=x.device)
    if t == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    cfg = config or GROUPED_CONFIG
    bm = block_m or grouped_block_m(t, e)
    if bm not in (1, 2, 4, 8, 16):
        raise ValueError(f"fp8fx grouped_gemv: block_m must be 1, 2, 4, 8 or 16, got {bm}")
    tiles_m = max_row_tiles(t, e, bm)
    expected_tiles = min(tiles_m, cdiv(t, bm) + (0 if bm == 1 else min(e, t) // 2))
    split = pick_split(t, n, k, cfg, num_sms(x.device), row_tiles=expected_tiles)
    _launch(x, x, (0, 0), w, sw_t, None, out, cfg, split, bm, tiles_m, use_dot=True, x_fp8=False, static=False,
            act_ue8m0=act_ue8m0, e8m0=e8m0, offs=offs.to(torch.int32))
    return out


def expert_gemv(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    w: torch.Tensor,
    sw: torch.Tensor,
    out_dtype: torch.dtype | None = None,
    config: GemvConfig | None = None,
    act_ue8m0: bool = False,
) -> torch.Tensor:
    """y[R, N]: row r is x[r // (R / T)] (x [T, K] bf16/fp16/fp32, quantized in the kernel)
    times expert expert_ids[r]'s w (N x K).T, block-FP8; rows unsorted, one program per row
    and N tile (with split-K): MoE decode without sorting the routing (fp8fx::expert_linear).
    An expert picked by several rows is streamed once per row: for a handful of rows only.
    Ids are clamped into [0, E) in the kernel; fp8fx::expert_linear asserts them first."""
    if expert_ids.dim() != 1:
        raise ValueError(f"fp8fx expert_gemv: expert_ids must be 1-D, got shape {tuple(expert_ids.shape)}")
    x, w, sw_t, e8m0 = _expert_operands("expert_gemv", x, w, sw, expert_ids)
    (t, k), n, r = x.shape, w.shape[1], expert_ids.numel()
    if (r % t if t else r) or expert_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"fp8fx expert_gemv: expert_ids must be int32/int64 with a multiple of T = {t} entries, "
                         f"got {expert_ids.dtype} {tuple(expert_ids.shape)}")
    _check_device("expert_gemv", x)
    out = torch.empty(r, n, dtype=out_dtype or x.dtype, device=x.device)
    if r == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    from fp8fx.kernels import dispatch  # the measured config lives there

    cfg = config or dispatch.expert_gemv_config(r, n, k)
    split = pick_split(r, n, k, cfg, num_sms(x.device), row_tiles=r)
    _launch(x, x, (0, 0), w, sw_t, None, out, cfg, split, 1, r, use_dot=True, x_fp8=False, static=False,
            act_ue8m0=act_ue8m0, e8m0=e8m0, offs=expert_ids.contiguous(), row_ids=True)
    return out
