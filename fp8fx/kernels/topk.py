"""Top-k along a short last dimension in one Triton launch (MoE routing: 8 of 128 experts).

    x[..., C] fp32/bf16/fp16, C <= MAX_COLS, k <= MAX_K
    -> values[..., k] (x's dtype), indices[..., k] int64: the k largest of each row, largest
       first; equal values by lower column first; NaN above every number (as torch.topk)

torch.topk on CUDA runs a radix select and then a bitonic sort of the k picks: two kernels,
8.5 us per Qwen3-MoE decode layer on the H200 (router [1, 128], k = 8). Here one program
holds BLOCK_R rows whole and takes k rounds of a row maximum over integer sort keys (the
float's bits, order-preserving: negative values get their magnitude bits flipped); each pick's
value is read back from x, so it is x's element bit for bit (-0.0 and NaN payloads included).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fp8fx.kernels.act_quant import interpreting
from fp8fx.kernels.host import cdiv, next_power_of_2

__all__ = ["MAX_COLS", "MAX_K", "supports", "topk"]

MAX_COLS = 512  # a row lives in registers
MAX_K = 32  # rounds per launch
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _topk_kernel(x_ptr, v_ptr, i_ptr, R, C, K, stride_xr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    r_ok = rows < R
    c_ok = cols < C
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xr + cols[None, :], mask=r_ok[:, None] & c_ok[None, :])
    xf = x.to(tl.float32)
    bits = xf.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed int order == float order
    key = tl.where(xf != xf, 0x7FFFFFFF, key)  # any NaN: above +inf
    # Columns past C are never picked: below every key (-inf's is -0x7F800001).
    taken = -2147483647 - 1
    key = tl.where(c_ok[None, :], key, taken)
    out = rows.to(tl.int64) * K
    for j in range(0, K):
        best = tl.max(key, axis=1)
        idx = tl.min(tl.where(key == best[:, None], cols[None, :], BLOCK_C), axis=1)
        val = tl.load(x_ptr + rows.to(tl.int64) * stride_xr + idx, mask=r_ok)  # x's element, bit for bit
        tl.store(v_ptr + out + j, val, mask=r_ok)
        tl.store(i_ptr + out + j, idx.to(tl.int64), mask=r_ok)
        key = tl.where(cols[None, :] == idx[:, None], taken, key)


def supports(x: torch.Tensor, k: int) -> bool:
    """Whether ``topk`` takes x (any device; the launch needs CUDA or the interpreter)."""
    return x.dtype in _DTYPES and x.dim() >= 1 and 0 < x.shape[-1] <= MAX_COLS and 0 <= k <= min(MAX_K, x.shape[-1])


def topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(x, k, dim=-1) (largest, sorted) for rows of at most MAX_COLS values."""
    if not supports(x, k):
        raise ValueError(
            f"fp8fx topk: takes fp32/bf16/fp16 x[..., C] with 1 <= C <= {MAX_COLS} and 0 <= k <= min(C, {MAX_K}), "
            f"got {x.dtype} {tuple(x.shape)} and k = {k}"
        )
    if not (x.is_cuda or interpreting()):
        raise RuntimeError(f"fp8fx topk: the Triton kernel needs a CUDA tensor, got {x.device}")
    c = x.shape[-1]
    values = x.new_empty(*x.shape[:-1], k)
    indices = torch.empty(*x.shape[:-1], k, dtype=torch.int64, device=x.device)
    rows = x.numel() // c
    if rows == 0 or k == 0:
        return values, indices
    x2 = x.reshape(rows, c)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    block_c = next_power_of_2(c)
    block_r = min(next_power_of_2(rows), max(1, 2048 // block_c))
    _topk_kernel[(cdiv(rows, block_r),)](
        x2, values, indices, rows, c, k, x2.stride(0),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=1 if block_r * block_c <= 512 else 4,
    )
    return values, indices
