"""(residual add +) RMSNorm + activation quantization in one pass over each row (Triton).

Legend: M rows (tokens), K hidden size (a multiple of 128), G = K / 128 groups.

    h  = x (+ r)                                   x's dtype (bf16/fp16), stored when r is given
    y  = w * (h.float() * rsqrt(mean(h.float()**2) + eps)).to(x.dtype)      (transformers' RMSNorm)
    s  = max(amax(|y| per 1 x 128 group), 1e-12) / 448        (UE8M0: 2**ceil(log2 .)), fp32
    q  = fp8(clamp(y / s, -448, 448))

The quantization is act_quant's (same helpers: IEEE division, RNE cast), applied to the y
this kernel computes; y itself is never written. Scales are written column-major,
strides (1, M), the layout fp8fx's GEMMs and cuBLAS read (DESIGN.md).

Why a kernel: at K = 4096 Inductor emits RMSNorm as a looped reduction that writes y,
and the per-group amax as a second kernel that reads y back (it cannot put two reductions
over different ranges in one kernel). Here each program holds its row in registers:
x (and r) are read once, and only h, q and s are written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from fp8fx import reference
from fp8fx.kernels.act_quant import group_scale, interpreting, quantize_tile, to_dtype
from fp8fx.kernels.host import next_power_of_2

__all__ = ["rms_norm_quant", "MAX_K"]

GROUP = 128
MAX_K = 16384  # one row in registers: 32 fp32 values per thread at 16 warps

def num_warps(k: int) -> int:
    """Warps per program (one row): scripts/bench_norm_quant.py, H200, residual add, 2048 rows:
    K = 4096 17.8 us at 16 warps (18.8 at 8; Inductor's two kernels 54.2), K = 7168 35.7 (37.3;
    94.1), K = 2048 (4096 rows) 16.9 at 8 (22.0 at 16)."""
    return 16 if k >= 4096 else 8 if k >= 2048 else 4


@triton.jit
def _rms_norm_quant_kernel(
    x_ptr, r_ptr, w_ptr, h_ptr, q_ptr, s_ptr,
    M, K, eps,
    stride_xm, stride_rm,
    HAS_RESIDUAL: tl.constexpr, UE8M0: tl.constexpr, EXACT_CAST: tl.constexpr,
    BLOCK_G: tl.constexpr, GROUP: tl.constexpr,
):
    # One row per program, held as a [BLOCK_G, GROUP] tile (group g in tile row g): the
    # group amax is a reduction along the tile's rows, the row's sum of squares over all of it.
    row = tl.program_id(0).to(tl.int64)
    groups = tl.arange(0, BLOCK_G)
    cols = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    g_ok = groups * GROUP < K
    ok = cols < K
    x = tl.load(x_ptr + row * stride_xm + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_rm + cols, mask=ok, other=0.0)
        h = to_dtype(x.to(tl.float32) + r.to(tl.float32), x.dtype, EXACT_CAST)
        tl.store(h_ptr + row * K + cols, h, mask=ok)
    else:
        h = x
    hf = h.to(tl.float32)
    var = tl.sum(tl.sum(hf * hf, axis=1), axis=0) / K
    if EXACT_CAST:  # the interpreter has no libdevice (and takes eps as a Python float)
        inv = tl.math.rsqrt(var + eps)
    else:
        # eps is float64 where Inductor passes a 0-dim CPU tensor's item() (passes/quant_kernel.py);
        # Inductor's analysis of which arguments the kernel writes types that input as a
        # pointer, and it must compile: a load there
        if eps.dtype.is_ptr():
            eps = tl.load(eps)
        inv = libdevice.rsqrt(var + eps.to(tl.float32))  # as Inductor and torch.rsqrt on CUDA
    n = to_dtype(hf * inv, x.dtype, EXACT_CAST)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    y = to_dtype(w.to(tl.float32) * n.to(tl.float32), x.dtype, EXACT_CAST).to(tl.float32)  # w * n in x's dtype
    s = group_scale(y, UE8M0)
    tl.store(q_ptr + row * K + cols, quantize_tile(y, s[:, None], EXACT_CAST), mask=ok)
    tl.store(s_ptr + groups.to(tl.int64) * M + row, s, mask=g_ok)


def rms_norm_quant(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                   ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x[..., K] bf16/fp16 (+ residual of the same shape and dtype), weight[K] of x's dtype ->
    (q[..., K] fp8, s[..., G] fp32 column-major, h[..., K] = x + residual or an empty tensor).
    fp8fx.ops.rms_norm_quant checks the arguments; this is its CUDA implementation."""
    k = x.shape[-1]
    m = x.numel() // k if k else 0
    q = torch.empty(x.shape, dtype=reference.FP8_DTYPE, device=x.device)
    s = scales_like(x)
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else x.new_empty(0)
    if m == 0:
        return q, s, h
    x2 = x.reshape(m, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    r2 = x2
    if residual is not None:
        r2 = residual.reshape(m, k)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
    block_g = next_power_of_2(k // GROUP)
    _rms_norm_quant_kernel[(m,)](
        x2, r2, weight.contiguous(), h, q, s,
        m, k, float(eps),
        x2.stride(0), r2.stride(0),
        HAS_RESIDUAL=residual is not None, UE8M0=ue8m0, EXACT_CAST=interpreting(),
        BLOCK_G=block_g, GROUP=GROUP, num_warps=num_warps(block_g * GROUP),
    )
    return q, s, h


def scales_like(x: torch.Tensor) -> torch.Tensor:
    """An fp32 [..., K / 128] scale tensor for x[..., K], column-major over the flattened rows
    (element (row, g) at g * M + row): the strides rms_norm_quant writes and its fake reports."""
    lead = list(x.shape[:-1])
    m = 1
    strides = []
    for size in reversed(lead):  # row-major over the leading dims, unit stride
        strides.insert(0, m)
        m = m * size
    return torch.empty_strided((*lead, x.shape[-1] // GROUP), (*strides, m), dtype=torch.float32, device=x.device)
