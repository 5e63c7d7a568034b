"""Grouped (MoE) block-FP8 GEMM over tokens sorted by expert, contiguous layout (Triton).

Legend: T rows (token-expert pairs, sorted by expert), E experts, N out_features,
K in_features, BM rows per tile, nK = ceil(K / 128).

    a[T, K] fp8 with sa[T, nK] fp32 (any strides: a static scale is a stride-0 view)
    b[E, N, K] fp8 with sb[E, ceil(N/128), nK] fp32 or e8m0
    offs[E] int32: cumulative end row of each expert; rows >= offs[-1] are written as zeros
    y[T, N] = for each expert e, rows offs[e-1]:offs[e]:  dequant(a) @ dequant(b[e]).T

No host synchronisation and no preparatory launches: each program derives its tile's
(expert, first row) from offs itself (expert_tile: one vector load, a cumsum over experts),
over a grid sized for the worst case, cdiv(T, BM) + min(E, T) + 1 row tiles; tiles past
the last one return at once. The tail past offs[-1] is one more pseudo-group whose tiles store zeros, so the
output needs no memset.

With the kernel preference "deepgemm" (BlockFP8Config(kernel="deepgemm")), ``grouped_linear``
hands the GEMM to DeepGEMM's contiguous grouped GEMM when it loads (deepgemm.py says how the
rows are padded to its alignment; that route has never run on our machines).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fp8fx import reference
from fp8fx.kernels import grouped_wgmma
from fp8fx.kernels.act_quant import act_quant, interpreting
from fp8fx.kernels.host import cdiv, next_power_of_2

__all__ = ["expert_tile", "grouped_gemm", "grouped_linear", "max_row_tiles", "scaled_dot_k_loop"]

BLOCK_K = 128


@triton.jit
def scaled_dot_k_loop(
    a_ptrs, b_ptrs, sa_ptrs, sb_ptrs, K, stride_sak, stride_sbk,
    B_SCALE_E8M0: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """sum over K blocks kb of dot(a[:, kb], b[kb, :]) * sa[:, kb] * sb[kb], in fp32, for a tile
    whose BLOCK_N columns lie in one 128-row weight block (one weight scale per K block).
    a_ptrs [BLOCK_M, BLOCK_K] / b_ptrs [BLOCK_K, BLOCK_N] point at K block 0 (K contiguous);
    sa_ptrs [BLOCK_M] and sb_ptrs (a scalar pointer) at its scales; e8m0 scales arrive as uint8."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = kb * BLOCK_K + offs_k < K
        a = tl.load(a_ptrs + kb * BLOCK_K, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs + kb * BLOCK_K, mask=k_ok[:, None], other=0.0)
        sa = tl.load(sa_ptrs + kb * stride_sak)
        if B_SCALE_E8M0:
            sb = (tl.load(sb_ptrs + kb * stride_sbk).to(tl.int32) << 23).to(tl.float32, bitcast=True)
        else:
            sb = tl.load(sb_ptrs + kb * stride_sbk)
        acc += tl.dot(a, b) * (sa * sb)[:, None]
    return acc


@triton.jit
def expert_tile(offs_ptr, tile, T, E, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
    """(g, row0, row_end) of row tile ``tile`` over rows sorted by expert: expert e owns
    cdiv(rows_e, BLOCK_M) tiles, in order, from offs[E] (cumulative ends) in one vector load;
    g == E is the tail (rows offs[E-1]:T, no expert's) and g > E a tile past the last one.
    The tiles number at most cdiv(T, BLOCK_M) + min(E, T) + 1 (see max_row_tiles)."""
    e_ids = tl.arange(0, E_POW2)
    ends = tl.load(offs_ptr + e_ids, mask=e_ids < E, other=0)
    ends = tl.where(e_ids == E, T, ends)
    starts = tl.load(offs_ptr + e_ids - 1, mask=(e_ids > 0) & (e_ids <= E), other=0)
    starts = tl.where(e_ids == E, tl.load(offs_ptr + E - 1), starts)
    tiles = tl.where(e_ids <= E, tl.cdiv(tl.maximum(ends - starts, 0), BLOCK_M), 0)
    tile_end = tl.cumsum(tiles, 0)
    g = tl.sum((tile_end <= tile).to(tl.int32), 0)  # groups wholly before this tile
    pick = e_ids == g
    first_tile = tl.sum(tl.where(pick, tile_end - tiles, 0), 0)
    row0 = tl.sum(tl.where(pick, starts, 0), 0) + (tile - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(pick, ends, 0), 0)
    return g, row0, row_end


def max_row_tiles(rows: int, experts: int, block_m: int) -> int:
    """Row tiles that expert_tile may number for ``rows`` rows over ``experts`` experts:
    each non-empty expert (at most min(E, T) of them) adds at most one partial tile, and
    the tail one more. The grid's row dimension; tiles past the last one return at once."""
    if block_m == 1:
        return rows + 1
    return cdiv(rows, block_m) + min(experts, rows) + 1


@triton.jit
def _grouped_gemm_kernel(
    # pointers
    a_ptr, sa_ptr, b_ptr, sb_ptr, c_ptr, offs_ptr,
    # shapes
    T, N, K, E,
    # strides
    stride_am, stride_sam, stride_sak,
    stride_be, stride_bn, stride_sbe, stride_sbn, stride_sbk,
    stride_cm,
    # meta-parameters
    B_SCALE_E8M0: tl.constexpr, E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Tile order (a 1-D grid over ROW_TILES x N tiles): GROUP_M consecutive row tiles share
    # each sweep over the columns, so their a rows are read from DRAM once and each expert's
    # weight tile is reused from L2 by its row tiles in the group. (Row tiles fastest, as a
    # 2-D grid gives, streams all of a once per column tile.)
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    row_tiles = tl.num_programs(0) // tiles_n
    group = GROUP_M * tiles_n
    first_m = (pid // group) * GROUP_M
    rows_in_group = min(row_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % rows_in_group
    pid_n = (pid % group) // rows_in_group
    g, row0, row_end = expert_tile(offs_ptr, pid_m, T, E, E_POW2, BLOCK_M)
    if g > E:  # past the last tile of this batch
        return
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < row_end
    n_ok = offs_n < N
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    c_mask = m_ok[:, None] & n_ok[None, :]
    if g == E:  # rows no expert owns
        tl.store(c_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=c_ptr.dtype.element_ty), mask=c_mask)
        return

    offs_k = tl.arange(0, BLOCK_K)
    rm = tl.where(m_ok, offs_m, row0).to(tl.int64)
    rn = tl.where(n_ok, offs_n, 0).to(tl.int64)
    a_ptrs = a_ptr + rm[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + g.to(tl.int64) * stride_be + rn[None, :] * stride_bn + offs_k[:, None]
    sa_ptrs = sa_ptr + rm * stride_sam
    # BLOCK_N <= 128 and a multiple of it divides 128: the tile sits in one weight block row.
    sb_ptrs = sb_ptr + g * stride_sbe + (pid_n * BLOCK_N // 128) * stride_sbn
    acc = scaled_dot_k_loop(a_ptrs, b_ptrs, sa_ptrs, sb_ptrs, K, stride_sak, stride_sbk,
                            B_SCALE_E8M0, BLOCK_M, BLOCK_N, BLOCK_K)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def grouped_gemm(
    a: torch.Tensor,
    sa: torch.Tensor,
    b: torch.Tensor,
    sb: torch.Tensor,
    offs: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    block_m: int = 64,
    block_n: int = 128,
    num_warps: int = 4,
    num_stages: int = 4,
    group_m: int = 8,
) -> torch.Tensor:
    """a[T, K] fp8, sa[T, nK] fp32, b[E, N, K] fp8,
    sb[E, nN, nK] fp32/e8m0, offs[E] -> y[T, N] (see the module docstring)."""
    # (1) check
    if a.dim() != 2 or b.dim() != 3:
        raise ValueError(f"fp8fx grouped_gemm: expected a[T, K] and b[E, N, K], got {tuple(a.shape)}, {tuple(b.shape)}")
    t, k = a.shape
    e, n, _ = b.shape
    if b.shape[2] != k or k % 16:
        raise ValueError(f"fp8fx grouped_gemm: K must match ({k} vs {b.shape[2]}) and be a multiple of 16")
    if a.dtype != reference.FP8_DTYPE or b.dtype != reference.FP8_DTYPE:
        raise TypeError(f"fp8fx grouped_gemm: expected fp8 e4m3 operands, got {a.dtype} and {b.dtype}")
    if tuple(offs.shape) != (e,):
        raise ValueError(f"fp8fx grouped_gemm: offs must have shape ({e},), got {tuple(offs.shape)}")
    if 128 % block_n:
        raise ValueError("fp8fx grouped_gemm: block_n must divide 128")
    if tuple(sa.shape) != (t, cdiv(k, BLOCK_K)) or sa.dtype != torch.float32:
        raise ValueError(
            f"fp8fx grouped_gemm: activation scales must be fp32 ({t}, {cdiv(k, BLOCK_K)}), got {sa.dtype} {tuple(sa.shape)}"
        )
    if not (a.is_cuda or interpreting()):
        raise RuntimeError(f"fp8fx grouped_gemm: the Triton kernel needs CUDA tensors, got {a.device}")
    a = a if a.stride(-1) == 1 else a.contiguous()
    b = b if b.stride(-1) == 1 else b.contiguous()
    e8m0 = sb.dtype == reference.E8M0_DTYPE
    sb_t = sb.view(torch.uint8) if e8m0 else sb.float()

    # (2) allocate
    out = torch.empty(t, n, dtype=out_dtype, device=a.device)
    if t == 0 or n == 0:
        return out
    offs = offs.to(torch.int32)

    # (3) launch
    grid = (max_row_tiles(t, e, block_m) * cdiv(n, block_n),)
    _grouped_gemm_kernel[grid](
        a, sa, b, sb_t, out, offs,
        t, n, k, e,
        a.stride(0), sa.stride(0), sa.stride(1),
        b.stride(0), b.stride(1), sb_t.stride(0), sb_t.stride(1), sb_t.stride(2),
        out.stride(0),
        B_SCALE_E8M0=e8m0, E_POW2=next_power_of_2(e + 1), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK_K,
        GROUP_M=group_m, num_warps=num_warps, num_stages=num_stages,
    )
    return out


def config_for(rows: int, experts: int) -> tuple[int, int, int]:
    """(BLOCK_M, num_warps, num_stages) by rows per expert. Few rows (decode) waste most of a
    large tile (16 is the fp8 MMA minimum); many rows want the dense large-M tile
    (128 x 128, 8 warps, as dispatch.TRITON_DEFAULTS["large"]). Up to 256 rows per expert
    the 64-row tile wins: a Qwen3-30B-A3B MoE block at 4096 tokens (256 rows per expert,
    scripts/sweep_grouped_layer.py, H200) took 1.307 ms with it against 1.377 with 128 x 8
    warps, and 1.52x vs 1.35x bf16 at 1024 tokens (64 per expert)."""
    per_expert = rows / max(experts, 1)
    if per_expert <= 16:
        return 16, 4, 4
    if per_expert <= 48:
        return 32, 4, 4
    if per_expert <= 256:
        return 64, 4, 4
    return 128, 8, 4


def _deepgemm_contiguous(x, qweight, wscale, offs, ue8m0):
    """The opt-in DeepGEMM route (never run here: DeepGEMM is not installed on our machines)."""
    from fp8fx.kernels import deepgemm, prepared_weight_scale

    xq, xs = act_quant(x, ue8m0=ue8m0)
    sfb = prepared_weight_scale(wscale, qweight.shape[1], "deepgemm")
    arch = torch.cuda.get_device_capability(x.device)[0]
    return deepgemm.grouped_contiguous(xq, xs, qweight, sfb, offs, x.dtype, arch)


def _use_deepgemm(x, qweight, act_scale, ue8m0) -> bool:
    """Only when the user asked for DeepGEMM (kernel="deepgemm") and it loads and fits."""
    from fp8fx.kernels import deepgemm, dispatch

    if dispatch.get_preference() != "deepgemm" or act_scale is not None or not x.is_cuda:
        return False
    _, n, k = qweight.shape
    return deepgemm.supports_grouped("contiguous", n, k, x.dtype, x.device, ue8m0)


def grouped_linear(x, qweight, wscale, offs, act_scale, block_size):
    """CUDA implementation of fp8fx::grouped_linear: up to dispatch.GROUPED_GEMV_MAX_ROWS rows,
    the grouped gemv (quantizing in the kernel); beyond, quantize x per token and run a
    tiled grouped GEMM: the warp-specialized Hopper kernel with many rows per expert, the
    Triton kernel otherwise (DeepGEMM's contiguous grouped GEMM instead when the user opted
    in and it loads)."""
    from fp8fx.kernels import dispatch

    ue8m0 = wscale.dtype == reference.E8M0_DTYPE
    if _use_deepgemm(x, qweight, act_scale, ue8m0):
        return _deepgemm_contiguous(x, qweight, wscale, offs, ue8m0)
    if act_scale is None and tuple(block_size) == (BLOCK_K, BLOCK_K) and x.shape[0] <= dispatch.GROUPED_GEMV_MAX_ROWS:
        from fp8fx.kernels.gemv import grouped_gemv  # few rows per expert: stream each expert's weights once

        return grouped_gemv(x, qweight, wscale, offs, x.dtype, act_ue8m0=ue8m0)
    hopper = _use_wgmma(x, qweight)
    if act_scale is None:
        # the Hopper kernel reads 64 rows' scales of a K block at a time: column-major scales
        xq, xs = act_quant(x, ue8m0=ue8m0, group_size=block_size[1], col_major=hopper)
    else:
        # Static per-expert scales: each row is quantized with its expert's scale.
        rows = torch.arange(x.shape[0], device=x.device, dtype=offs.dtype)
        expert_of_row = torch.searchsorted(offs, rows, right=True).clamp_max(offs.numel() - 1)
        row_scale = act_scale.float()[expert_of_row]
        xq = (x.float() / row_scale[:, None]).clamp(-reference.FP8_MAX, reference.FP8_MAX).to(reference.FP8_DTYPE)
        xs = row_scale[:, None].expand(-1, cdiv(x.shape[1], BLOCK_K))
    if hopper and grouped_wgmma.supports(xq, qweight, x.dtype):
        try:
            return grouped_wgmma.run_contiguous(xq, xs, qweight, wscale, offs, x.dtype,
                                                grouped_wgmma.block_n_for(qweight.shape[1]))
        except grouped_wgmma.Unavailable:
            pass  # warned once; the Triton kernel below serves this and later calls
    bm, warps, stages = config_for(x.shape[0], qweight.shape[0])
    return grouped_gemm(xq, xs, qweight, wscale, offs, x.dtype, block_m=bm, num_warps=warps, num_stages=stages)


def _use_wgmma(x, qweight) -> bool:
    """The warp-specialized Hopper kernel (grouped_wgmma.py) for many rows per expert, where
    it is faster than the Triton kernel (dispatch.GROUPED_WGMMA_MIN_ROWS), on an SM90 GPU
    with a Triton that compiles it (the operands are checked after quantization)."""
    from fp8fx.kernels import dispatch

    return x.shape[0] >= dispatch.GROUPED_WGMMA_MIN_ROWS * qweight.shape[0] and grouped_wgmma.available(x.device)
