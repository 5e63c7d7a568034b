"""Grouped (MoE) block-FP8 GEMM, masked layout (Triton): per-expert padded batches, for decode.

Legend: E experts, M rows per expert (the capacity), N out_features, K in_features,
nK = ceil(K / 128), nN = ceil(N / 128), BM x BN the output tile, V[e] = masked_m[e].

    x[E, M, K] bf16/fp16/fp32, masked_m[E] int: rows :V[e] of expert e are valid
    a[E, M, K] fp8, sa[E, M, nK] fp32  = masked_act_quant(x)   (rows past V[e] are not written)
    b[E, N, K] fp8, sb[E, nN, nK] fp32 or e8m0
    y[e, :V[e]] = dequant(a[e]) @ dequant(b[e]).T,   y[e, V[e]:] = 0

This is the layout of DeepGEMM's ``m_grouped_fp8_gemm_nt_masked`` (and of DeepEP's
low-latency dispatch output): the host knows only the capacity M; the counts stay on the
device, so one CUDA graph serves every routing. Nothing here synchronises with the host.
The grid covers (M tiles, N tiles, E) for the worst case; a program whose first row is at or
past V[e] stores its zeros and returns before loading anything. Both kernels clamp V[e] to
[0, M], so an out-of-range count never reaches memory outside the batch
(fp8fx::grouped_linear_masked also asserts the range, asynchronously).

Rows past V[e] cannot reach the output, whatever they hold (NaN included): the Triton kernel
never reads them. From a capacity of dispatch.GROUPED_WGMMA_MIN_ROWS rows on an SM90 GPU,
grouped_linear_masked hands the GEMM to the warp-specialized Hopper kernel's masked mode
(grouped_wgmma.py), which computes the padding rows inside a tile and stores zeros in their
place (a row of the product depends on that row of a alone).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fp8fx import reference
from fp8fx.kernels.act_quant import group_scale, interpreting, quantize_tile
from fp8fx.kernels.grouped_gemm import scaled_dot_k_loop
from fp8fx.kernels.host import cdiv

__all__ = [
    "CONFIGS",
    "config_for",
    "masked_act_quant",
    "grouped_gemm_masked",
    "grouped_linear_masked",
    "grouped_linear_masked_cuda",
]

BLOCK_K = 128  # = the weight and activation scale granularity along K
_HP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# (BLOCK_M, BLOCK_N, num_warps, num_stages): the sweep list of ``bench moe --sweep``.
CONFIGS = [
    (16, 64, 4, 4),
    (16, 128, 4, 4),
    (32, 64, 4, 4),
    (64, 64, 4, 4),
    (64, 128, 4, 4),
    (64, 128, 4, 3),
    (128, 128, 8, 3),
    (128, 128, 8, 4),
]


@triton.jit
def _masked_act_quant_kernel(
    # pointers
    x_ptr, q_ptr, s_ptr, masked_m_ptr, act_ptr,
    # shapes
    M, K,
    # strides
    stride_xe, stride_xm, stride_qe, stride_qm, stride_se, stride_sm, stride_sg,
    # meta-parameters
    STATIC: tl.constexpr, UE8M0: tl.constexpr, EXACT_CAST: tl.constexpr,
    BLOCK_T: tl.constexpr, GROUP: tl.constexpr,
):
    # One program: BLOCK_T rows x one group of GROUP columns of one expert.
    pid_t = tl.program_id(0)
    g = tl.program_id(1)
    e = tl.program_id(2).to(tl.int64)
    valid = tl.minimum(tl.maximum(tl.load(masked_m_ptr + e), 0), M)
    if pid_t * BLOCK_T >= valid:  # nothing valid in these rows: leave them unwritten
        return
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = g * GROUP + tl.arange(0, GROUP)
    row_ok = rows < valid
    mask = row_ok[:, None] & (cols[None, :] < K)
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + e * stride_xe + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if STATIC:  # one calibrated scale per expert
        q = quantize_tile(x, tl.load(act_ptr + e).to(tl.float32), EXACT_CAST)
    else:
        s = group_scale(x, UE8M0)
        q = quantize_tile(x, s[:, None], EXACT_CAST)
        tl.store(s_ptr + e * stride_se + rows64 * stride_sm + g * stride_sg, s, mask=row_ok)
    tl.store(q_ptr + e * stride_qe + rows64[:, None] * stride_qm + cols[None, :], q, mask=mask)


@triton.jit
def _masked_gemm_kernel(
    # pointers
    a_ptr, sa_ptr, b_ptr, sb_ptr, c_ptr, masked_m_ptr,
    # shapes
    M, N, K,
    # strides
    stride_ae, stride_am, stride_sae, stride_sam, stride_sak,
    stride_be, stride_bn, stride_sbe, stride_sbn, stride_sbk,
    stride_ce, stride_cm,
    # meta-parameters
    B_SCALE_E8M0: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # M tiles vary fastest, so the programs sharing one weight tile run side by side (L2 reuse).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.program_id(2).to(tl.int64)
    valid = tl.minimum(tl.maximum(tl.load(masked_m_ptr + e), 0), M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + e * stride_ce + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if pid_m * BLOCK_M >= valid:  # a tile of padding rows: zeros, no loads
        tl.store(c_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=c_ptr.dtype.element_ty), mask=c_mask)
        return

    m_ok = offs_m < valid
    # Invalid rows read the tile's first row (valid, so finite) and are zeroed before the
    # store: the loads need no row mask, and padding memory is never touched.
    rm = tl.where(m_ok, offs_m, pid_m * BLOCK_M).to(tl.int64)
    rn = tl.where(offs_n < N, offs_n, 0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + e * stride_ae + rm[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + e * stride_be + rn[None, :] * stride_bn + offs_k[:, None]
    sa_ptrs = sa_ptr + e * stride_sae + rm * stride_sam
    # BLOCK_N divides 128: the tile sits in one weight block row.
    sb_ptrs = sb_ptr + e * stride_sbe + (pid_n * BLOCK_N // 128) * stride_sbn
    acc = scaled_dot_k_loop(a_ptrs, b_ptrs, sa_ptrs, sb_ptrs, K, stride_sak, stride_sbk,
                            B_SCALE_E8M0, BLOCK_M, BLOCK_N, BLOCK_K)
    acc = tl.where(m_ok[:, None], acc, 0.0)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def _check_device(t: torch.Tensor, what: str) -> None:
    if not (t.is_cuda or interpreting()):
        raise RuntimeError(f"fp8fx {what}: the Triton kernel needs CUDA tensors, got {t.device}")


def _check_masked_m(masked_m: torch.Tensor, e: int, what: str) -> torch.Tensor:
    if tuple(masked_m.shape) != (e,) or masked_m.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"fp8fx {what}: masked_m must be an int32/int64 tensor of shape ({e},), "
            f"got {masked_m.dtype} {tuple(masked_m.shape)}"
        )
    return masked_m.to(torch.int32)


def masked_act_quant(
    x: torch.Tensor,
    masked_m: torch.Tensor,
    ue8m0: bool = False,
    act_scale: torch.Tensor | None = None,
    mn_major: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token 1 x 128 quantization of the valid rows of x[E, M, K] -> q[E, M, K] fp8,
    s[E, M, nK] fp32 (rows past masked_m[e] left unwritten).

    ``act_scale[E]``: static per-expert scales; s is then act_scale broadcast (strides (1, 0, 0)).
    ``mn_major``: s with strides (nK * A(M), 1, A(M)), A(M) = M rounded up to 4 (DeepGEMM's
    SM90 sfa layout per expert)."""
    if x.dim() != 3 or x.dtype not in _HP_DTYPES:
        raise ValueError(
            f"fp8fx masked_act_quant: expected x[E, M, K] in float32/16/bf16, got {x.dtype} {tuple(x.shape)}"
        )
    e, m, k = x.shape
    masked_m = _check_masked_m(masked_m, e, "masked_act_quant")
    static = act_scale is not None
    if static and tuple(act_scale.shape) != (e,):
        raise ValueError(f"fp8fx masked_act_quant: act_scale must have shape ({e},), got {tuple(act_scale.shape)}")
    _check_device(x, "masked_act_quant")
    x = x if x.stride(-1) == 1 else x.contiguous()
    groups = cdiv(k, BLOCK_K)
    q = torch.empty(e, m, k, dtype=reference.FP8_DTYPE, device=x.device)
    if static:
        act = act_scale.float().contiguous()
        s = act[:, None, None].expand(e, m, groups)
    elif mn_major:
        s = torch.empty(e, groups, cdiv(m, 4) * 4, dtype=torch.float32, device=x.device)
        s = s.transpose(1, 2)[:, :m]
    else:
        s = torch.empty(e, m, groups, dtype=torch.float32, device=x.device)
    if e and m and k:
        block_t = 16 if m <= 16 else 32
        _masked_act_quant_kernel[(cdiv(m, block_t), groups, e)](
            x, q, s, masked_m, act if static else masked_m,
            m, k,
            x.stride(0), x.stride(1), q.stride(0), q.stride(1), s.stride(0), s.stride(1), s.stride(2),
            STATIC=static, UE8M0=ue8m0, EXACT_CAST=interpreting(),
            BLOCK_T=block_t, GROUP=BLOCK_K, num_warps=4,
        )
    return q, s


def grouped_gemm_masked(
    a: torch.Tensor,
    sa: torch.Tensor,
    b: torch.Tensor,
    sb: torch.Tensor,
    masked_m: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    block_m: int = 16,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 4,
) -> torch.Tensor:
    """a[E, M, K] fp8, sa[E, M, nK] fp32 (any strides), b[E, N, K] fp8, sb[E, nN, nK]
    fp32/e8m0, masked_m[E] -> y[E, M, N] (see the module docstring)."""
    # (1) check
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0]:
        raise ValueError(
            f"fp8fx grouped_gemm_masked: expected a[E, M, K] and b[E, N, K], got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    e, m, k = a.shape
    n = b.shape[1]
    if b.shape[2] != k or k % 16:
        raise ValueError(f"fp8fx grouped_gemm_masked: K must match ({k} vs {b.shape[2]}) and be a multiple of 16")
    if a.dtype != reference.FP8_DTYPE or b.dtype != reference.FP8_DTYPE:
        raise TypeError(f"fp8fx grouped_gemm_masked: expected fp8 e4m3 operands, got {a.dtype} and {b.dtype}")
    groups = cdiv(k, BLOCK_K)
    if tuple(sa.shape) != (e, m, groups) or sa.dtype != torch.float32:
        raise ValueError(
            f"fp8fx grouped_gemm_masked: activation scales must be fp32 {(e, m, groups)}, "
            f"got {sa.dtype} {tuple(sa.shape)}"
        )
    if tuple(sb.shape) != (e, *reference.scale_grid(n, k, (128, 128))):
        raise ValueError(
            f"fp8fx grouped_gemm_masked: weight scales of shape {tuple(sb.shape)} do not fit b {tuple(b.shape)}"
        )
    if 128 % block_n or block_m < 16 or block_n < 16:
        raise ValueError("fp8fx grouped_gemm_masked: block_n must divide 128; block_m, block_n >= 16")
    masked_m = _check_masked_m(masked_m, e, "grouped_gemm_masked")
    _check_device(a, "grouped_gemm_masked")
    a = a if a.stride(-1) == 1 else a.contiguous()
    b = b if b.stride(-1) == 1 else b.contiguous()
    e8m0 = sb.dtype == reference.E8M0_DTYPE
    sb_t = sb.view(torch.uint8) if e8m0 else sb.float()

    # (2) allocate
    out = torch.empty(e, m, n, dtype=out_dtype, device=a.device)
    if out.numel() == 0:
        return out

    # (3) launch: one program per (M tile, N tile, expert), padding tiles included
    grid = (cdiv(m, block_m), cdiv(n, block_n), e)
    _masked_gemm_kernel[grid](
        a, sa, b, sb_t, out, masked_m,
        m, n, k,
        a.stride(0), a.stride(1), sa.stride(0), sa.stride(1), sa.stride(2),
        b.stride(0), b.stride(1), sb_t.stride(0), sb_t.stride(1), sb_t.stride(2),
        out.stride(0), out.stride(1),
        B_SCALE_E8M0=e8m0, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK_K,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def config_for(m: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) by the capacity M (the counts are on the
    device). From ``bench moe --only masked --sweep`` (H200, torch 2.11, Triton 3.6,
    2026-11-22, two runs): capacity 16 (decode) wants the fp8 MMA minimum of 16 rows and
    narrow N tiles (69-76 TF vs 59-61 for 64 x 128); at capacity 64 one 64-row tile reads
    each weight tile once for the whole batch and beat 16-row tiles 1.2-1.6x (174-223 TF vs
    137-146: weight-bandwidth bound, the M tiles of one N tile re-read it); at 512-1024 rows
    64 x 128 (3 stages) beat the dense 128 x 128 x 8-warp tile by 1-15%."""
    if m <= 16:
        return 16, 64, 4, 4
    if m <= 256:
        return 64, 128, 4, 4
    return 64, 128, 4, 3


def grouped_linear_masked(x, qweight, wscale, masked_m, act_scale, block_size):
    """Quantize the valid rows of x per token (or per expert, static), masked grouped GEMM:
    the warp-specialized Hopper kernel (grouped_wgmma.py) from a capacity of
    dispatch.GROUPED_WGMMA_MIN_ROWS rows per expert on an SM90 GPU, the Triton kernel below."""
    from fp8fx.kernels import dispatch, grouped_wgmma

    ue8m0 = wscale.dtype == reference.E8M0_DTYPE
    xq, xs = masked_act_quant(x, masked_m, ue8m0, act_scale)
    if x.shape[1] >= dispatch.GROUPED_WGMMA_MIN_ROWS and grouped_wgmma.supports(xq.view(-1, xq.shape[-1]), qweight, x.dtype):
        try:
            return grouped_wgmma.grouped_gemm_masked_wgmma(xq, xs, qweight, wscale, masked_m, x.dtype)
        except grouped_wgmma.Unavailable:
            pass  # warned once; the Triton kernel below serves this and later calls
    bm, bn, warps, stages = config_for(x.shape[1])
    return grouped_gemm_masked(xq, xs, qweight, wscale, masked_m, x.dtype, bm, bn, warps, stages)


def _deepgemm_masked(x, qweight, wscale, masked_m):
    """The opt-in DeepGEMM route (never run here: DeepGEMM is not installed on our machines)."""
    from fp8fx.kernels import deepgemm, prepared_weight_scale

    arch = torch.cuda.get_device_capability(x.device)[0]
    ue8m0 = wscale.dtype == reference.E8M0_DTYPE
    xq, xs = masked_act_quant(x, masked_m, ue8m0, None, mn_major=True)
    sfb = prepared_weight_scale(wscale, qweight.shape[1], "deepgemm")
    return deepgemm.grouped_masked(xq, xs, qweight, sfb, masked_m, x.dtype, arch)


def grouped_linear_masked_cuda(x, qweight, wscale, masked_m, act_scale, block_size):
    """CUDA fp8fx::grouped_linear_masked: x[E, M, K] -> y[E, M, N] in x's dtype."""
    from fp8fx.kernels import _check_cuda, deepgemm, dispatch

    _check_cuda(x, qweight, wscale, masked_m, act_scale)
    if list(block_size) != [128, 128]:
        return reference.grouped_linear_masked(x, qweight, wscale, masked_m, act_scale, tuple(block_size))
    e, m, k = x.shape
    if k % 16:
        raise ValueError(f"fp8fx grouped_linear_masked: K must be a multiple of 16 for fp8 tensor cores, got {k}")
    masked_m = masked_m.to(torch.int32)
    ue8m0 = wscale.dtype == reference.E8M0_DTYPE
    n = qweight.shape[1]
    if (
        dispatch.get_preference() == "deepgemm"
        and act_scale is None
        and deepgemm.supports_grouped("masked", n, k, x.dtype, x.device, ue8m0)
    ):
        return _deepgemm_masked(x.contiguous(), qweight, wscale, masked_m)
    return grouped_linear_masked(x, qweight, wscale, masked_m, act_scale, block_size)
