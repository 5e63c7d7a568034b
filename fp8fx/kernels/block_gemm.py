"""Block-FP8 GEMM (Triton, SM90): y[M, N] = dequant(a, sa) @ dequant(b, sb).T (+ bias).

Legend: M tokens, N out_features, K in_features, BK = 128 (one scale group along K),
nK = ceil(K / 128), nN = ceil(N / 128), S split-K factor.

    a[M, K] fp8, sa[M, nK] fp32 (any strides; strides (0, 0) = one static per-tensor scale)
    b[N, K] fp8, sb[nN, nK] fp32, or e8m0 read as uint8 and rebuilt as fp32 bits << 23
    for each K block kb:  acc += dot(a[:, kb], b[:, kb].T) * (sa[:, kb, None] * sb[None, kb])

The per-block dot runs in fp32 on the tensor cores and is promoted into the fp32 accumulator
once per 128-wide K block, as DeepGEMM does. ``A_HP`` makes a read high-precision activations
and quantize them inside the K loop (per token, per 128 columns: exactly one K block), with
the same codes as fp8fx.reference.quantize_act. Split-K (S > 1) writes fp32 partials
[S, M, N] that a second small kernel sums, adds bias to and casts: deterministic, no atomics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fp8fx import reference
from fp8fx.kernels.act_quant import group_scale, interpreting, quantize_tile
from fp8fx.kernels.host import cdiv

__all__ = ["GemmConfig", "CONFIGS", "block_gemm", "check_operands", "num_sms"]

BLOCK_K = 128  # = the weight and activation scale granularity along K


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    split_k: int = 0  # 0: chosen from the shape (fill the SMs); else the factor used
    group_m: int = 8

    def __str__(self) -> str:
        return f"m{self.block_m}n{self.block_n}w{self.num_warps}s{self.num_stages}k{self.split_k}"


# The autotune/sweep list, in one place. bench.py --sweep times every entry per shape class;
# dispatch.py holds the defaults picked from those measurements.
CONFIGS = [
    # small M (decode): weight-bandwidth bound, split-K fills the SMs
    GemmConfig(16, 64, 4, 4),
    GemmConfig(16, 128, 4, 4),
    GemmConfig(32, 64, 4, 4),
    GemmConfig(64, 64, 4, 4),
    GemmConfig(64, 128, 4, 4),
    GemmConfig(64, 128, 4, 3),
    # large M: compute bound
    GemmConfig(128, 128, 8, 3),
    GemmConfig(128, 128, 8, 4),
    GemmConfig(128, 128, 4, 4),
    GemmConfig(128, 256, 8, 3),
    GemmConfig(64, 256, 4, 3),
]


@triton.jit
def _block_gemm_kernel(
    # pointers
    a_ptr, sa_ptr, b_ptr, sb_ptr, bias_ptr, c_ptr,
    # shapes
    M, N, K, K_BLOCKS_PER_SPLIT,
    # strides
    stride_am, stride_sam, stride_sak,
    stride_bn, stride_sbn, stride_sbk,
    stride_cs, stride_cm,
    # meta-parameters
    A_HP: tl.constexpr, ACT_UE8M0: tl.constexpr, B_SCALE_E8M0: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, EXACT_CAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Tile order: GROUP_M row tiles share each column sweep, so b tiles are reused from L2.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * tiles_n
    first_m = (pid // group) * GROUP_M
    rows_in_group = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % rows_in_group
    pid_n = (pid % group) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    # Clamp rows/cols for loads (always in bounds); the store masks them.
    rm = tl.where(m_ok, offs_m, 0).to(tl.int64)
    rn = tl.where(n_ok, offs_n, 0).to(tl.int64)
    a_ptrs = a_ptr + rm[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + rn[None, :] * stride_bn + offs_k[:, None]
    sa_ptrs = sa_ptr + rm * stride_sam
    if BLOCK_N <= 128:
        # The whole tile lies inside one 128-row weight block: one scale per K block.
        sb_ptrs = sb_ptr + (pid_n * BLOCK_N // 128) * stride_sbn
    else:
        sb_ptrs = sb_ptr + (rn // 128) * stride_sbn

    kb_start = pid_k * K_BLOCKS_PER_SPLIT
    kb_end = min(kb_start + K_BLOCKS_PER_SPLIT, tl.cdiv(K, BLOCK_K))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb_start, kb_end):
        k_ok = kb * BLOCK_K + offs_k < K
        b = tl.load(b_ptrs + kb * BLOCK_K, mask=k_ok[:, None], other=0.0)
        if A_HP:
            x = tl.load(a_ptrs + kb * BLOCK_K, mask=k_ok[None, :], other=0.0).to(tl.float32)
            sa = group_scale(x, ACT_UE8M0)
            a = quantize_tile(x, sa[:, None], EXACT_CAST)
        else:
            a = tl.load(a_ptrs + kb * BLOCK_K, mask=k_ok[None, :], other=0.0)
            sa = tl.load(sa_ptrs + kb * stride_sak)
        if B_SCALE_E8M0:
            sb = (tl.load(sb_ptrs + kb * stride_sbk).to(tl.int32) << 23).to(tl.float32, bitcast=True)
        else:
            sb = tl.load(sb_ptrs + kb * stride_sbk)
        partial = tl.dot(a, b)
        if BLOCK_N <= 128:
            acc += partial * (sa * sb)[:, None]
        else:
            acc += partial * (sa[:, None] * sb[None, :])

    c_mask = m_ok[:, None] & n_ok[None, :]
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)
    else:
        tl.store(c_ptrs + pid_k * stride_cs, acc, mask=c_mask)


@triton.jit
def _split_k_reduce_kernel(
    # pointers
    p_ptr, bias_ptr, c_ptr,
    # shapes and strides
    MN, N, stride_ps,
    # meta-parameters
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.load(p_ptr + offs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(p_ptr + s * stride_ps + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(c_ptr + offs, acc.to(c_ptr.dtype.element_ty), mask=mask)


_NUM_SMS: dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


def pick_split_k(m: int, n: int, k: int, cfg: GemmConfig, sms: int) -> int:
    """Split K until the grid covers the SMs about twice (small M), keeping >= 4 K blocks each."""
    if cfg.split_k:
        return cfg.split_k
    tiles = cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)
    k_blocks = cdiv(k, BLOCK_K)
    split = 1
    while split < 16 and tiles * split < 2 * sms and k_blocks // (split * 2) >= 4:
        split *= 2
    return split


def check_operands(name: str, a: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, bias, *others) -> tuple[int, int, int]:
    """The checks every dense wrapper (block_gemm, gemv) makes before its own: a[M, K] and
    b[N, K] fp8 with sb[nN, nK] fp32/e8m0, bias[N], all (with ``others``) on one device.
    Returns (M, N, K)."""
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"fp8fx {name}: expected a[M, K] and b[N, K], got {tuple(a.shape)}, {tuple(b.shape)}")
    m, k = a.shape
    n = b.shape[0]
    if b.shape[1] != k:
        raise ValueError(f"fp8fx {name}: a has K={k}, b has K={b.shape[1]}")
    if k % 16:
        raise ValueError(f"fp8fx {name}: K must be a multiple of 16 for fp8 tensor cores, got {k}")
    if b.dtype != reference.FP8_DTYPE:
        raise TypeError(f"fp8fx {name}: expected an fp8 e4m3 weight, got {b.dtype}")
    grid_shape = reference.scale_grid(n, k, (128, 128))
    if tuple(sb.shape) != grid_shape or sb.dtype not in (torch.float32, reference.E8M0_DTYPE):
        raise ValueError(f"fp8fx {name}: weight scale must be fp32/e8m0 {grid_shape}, got {sb.dtype} {tuple(sb.shape)}")
    tensors = [t for t in (a, b, sb, bias, *others) if t is not None]
    if len({t.device for t in tensors}) > 1:
        raise RuntimeError(f"fp8fx {name}: inputs on several devices: {[str(t.device) for t in tensors]}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"fp8fx {name}: bias must have shape ({n},), got {tuple(bias.shape)}")
    return m, n, k


def block_gemm(
    a: torch.Tensor,
    sa: torch.Tensor | None,
    b: torch.Tensor,
    sb: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    config: GemmConfig | None = None,
    act_ue8m0: bool = False,
) -> torch.Tensor:
    """a[M, K] fp8 with sa[M, nK] fp32 (or a scalar static scale), or a[M, K] bf16/fp16/fp32
    with sa=None (quantized in the K loop; UE8M0 activation scales when ``act_ue8m0``);
    b[N, K] fp8 with sb[nN, nK] fp32 or e8m0 -> y[M, N] in ``out_dtype``."""
    from fp8fx.kernels import dispatch  # the default config per shape class lives there

    # (1) check
    a_hp = sa is None
    m, n, k = check_operands("block_gemm", a, b, sb, bias, sa)
    if not a_hp and a.dtype != reference.FP8_DTYPE:
        raise TypeError(f"fp8fx block_gemm: expected fp8 e4m3 activations with their scales, got {a.dtype}")
    if a_hp and a.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"fp8fx block_gemm: in-kernel quantization takes bf16/fp16/fp32, got {a.dtype}")
    if not (a.is_cuda or interpreting()):
        raise RuntimeError(f"fp8fx block_gemm: the Triton kernel needs CUDA tensors, got {a.device}")
    a = a if a.stride(-1) == 1 else a.contiguous()
    b = b if b.stride(-1) == 1 else b.contiguous()
    bias = None if bias is None else bias.contiguous()
    if a_hp:
        sa_t, stride_sam, stride_sak = a, 0, 0  # unused
    elif sa.numel() == 1 and tuple(sa.shape) != (m, cdiv(k, BLOCK_K)):
        sa_t, stride_sam, stride_sak = sa.reshape(()).float(), 0, 0  # static per-tensor
    else:
        if tuple(sa.shape) != (m, cdiv(k, BLOCK_K)) or sa.dtype != torch.float32:
            raise ValueError(f"fp8fx block_gemm: activation scale must be fp32 ({m}, {cdiv(k, BLOCK_K)}), got {sa.dtype} {tuple(sa.shape)}")
        sa_t, stride_sam, stride_sak = sa, sa.stride(0), sa.stride(1)
    e8m0 = sb.dtype == reference.E8M0_DTYPE
    sb_t = sb.view(torch.uint8) if e8m0 else sb

    # (2) allocate
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand(m, n))
    cfg = config or dispatch.triton_config(m, n, k, a_hp)
    split = pick_split_k(m, n, k, cfg, num_sms(a.device))
    k_blocks = cdiv(k, BLOCK_K)
    per_split = cdiv(k_blocks, split)
    split = cdiv(k_blocks, per_split)  # no empty splits
    c = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=a.device)

    # (3) launch
    grid = (cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n), split)
    _block_gemm_kernel[grid](
        a, sa_t, b, sb_t, bias if bias is not None else out, c,
        m, n, k, per_split,
        a.stride(0), stride_sam, stride_sak,
        b.stride(0), sb_t.stride(0), sb_t.stride(1),
        c.stride(0) if split > 1 else 0, c.stride(-2),
        A_HP=a_hp, ACT_UE8M0=act_ue8m0, B_SCALE_E8M0=e8m0,
        HAS_BIAS=bias is not None, SPLIT_K=split, EXACT_CAST=interpreting(),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=BLOCK_K, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split > 1:
        block = 1024
        _split_k_reduce_kernel[(cdiv(m * n, block),)](
            c, bias if bias is not None else out, out,
            m * n, n, c.stride(0),
            SPLIT_K=split, HAS_BIAS=bias is not None, BLOCK=block, num_warps=4,
        )
    return out
