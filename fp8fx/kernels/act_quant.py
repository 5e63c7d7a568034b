"""Activation quantization (Triton): x[T, K] high precision -> q[T, K] fp8 e4m3 + scales.

Legend: T tokens (rows), K in_features, G = 128 the group along K, nK = ceil(K / G),
Tp = T rounded up to ``pad_rows`` (padded rows are written as zeros).

    dynamic:  s[t, g] = max(amax(|x[t, gG:(g+1)G]|), 1e-12) / 448   (UE8M0: 2**ceil(log2 .))
              q[t, k] = fp8(clamp(x[t, k] / s[t, k // G], -448, 448))
    static:   q = fp8(clamp(x / s, -448, 448)) with one scalar s
    SwiGLU:   the dynamic quantization of x = silu(gate) * up, formed in the kernel in the
              inputs' dtype (``silu_mul_quant``; the prefill input of down_proj)

Bit-exact with fp8fx.reference.quantize_act / quantize_act_static: same fp32 amax, same
IEEE divisions (``div_rn``; Triton's plain ``/`` on fp32 is an approximate division), same
round-to-nearest-even fp8 cast. Scales can be written row-major (Tp, nK) or column-major
(strides (1, Tp)), the layout cuBLAS blockwise and DeepGEMM read (DESIGN.md).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from fp8fx import reference
from fp8fx.kernels.host import cdiv

__all__ = ["act_quant", "act_quant_static", "silu_mul_quant"]

_HP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def round_to_e4m3_grid(v):
    """RNE-round fp32 v (already clamped to +-448) onto the e4m3 value grid, in fp32.

    The cast that follows is then exact. Only used under TRITON_INTERPRET: the interpreter's
    fp32 -> fp8 cast drops the carry when rounding crosses a power of two (31.9 -> 16,
    triton 3.9); on the GPU the hardware cvt.rn.satfinite is already RNE.
    """
    bits = v.to(tl.int32, bitcast=True)
    # Normal e4m3 (|v| >= 2**-6): keep 3 mantissa bits, ties to even.
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    # Subnormal e4m3: multiples of 2**-9; adding 2**14 makes fp32's ulp 2**-9 (RNE add).
    sub = (tl.abs(v) + 16384.0) - 16384.0
    sub = (sub.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)
    return tl.where(tl.abs(v) < 0.015625, sub, normal)


@triton.jit
def to_dtype(v, dtype: tl.constexpr, EXACT_CAST: tl.constexpr):
    """fp32 v -> dtype, round to nearest even. Under TRITON_INTERPRET the bf16 cast truncates
    (Triton 3.9), so v is first RNE-rounded onto the bf16 grid in fp32, which the cast keeps."""
    if EXACT_CAST and dtype == tl.bfloat16:
        bits = v.to(tl.int32, bitcast=True)
        v = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def silu_mul(g, u, EXACT_CAST: tl.constexpr):
    """silu(g) * u in g's dtype, rounded after each op as eager torch: silu(g) = g / (1 + exp(-g))
    in fp32 (expf and an IEEE division, as torch's silu on CUDA), then the product."""
    dtype = g.dtype
    gf = g.to(tl.float32)
    if EXACT_CAST:  # the interpreter has no libdevice
        e = tl.exp(-gf)
    else:
        e = libdevice.exp(-gf)
    act = to_dtype(tl.math.div_rn(gf, e + 1.0), dtype, EXACT_CAST)
    return to_dtype(act.to(tl.float32) * u.to(tl.float32), dtype, EXACT_CAST)


@triton.jit
def quantize_tile(x, s, EXACT_CAST: tl.constexpr):
    """fp32 tile x / s (broadcast) -> fp8 e4m3 codes, as reference._to_fp8."""
    v = tl.math.div_rn(x, s)
    v = tl.minimum(tl.maximum(v, -448.0), 448.0)
    if EXACT_CAST:
        v = round_to_e4m3_grid(v)
    return v.to(tl.float8e4nv)


@triton.jit
def group_scale(x, UE8M0: tl.constexpr):
    """fp32 tile x[R, G] -> per-row dequantization scale s[R], as reference.amax_to_scale."""
    amax = tl.max(tl.abs(x), axis=1)
    s = tl.math.div_rn(tl.maximum(amax, 1e-12), 448.0)
    if UE8M0:
        bits = s.to(tl.int32, bitcast=True)
        exponent = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        s = (exponent << 23).to(tl.float32, bitcast=True)
    return s


@triton.jit
def _act_quant_kernel(
    # pointers (u_ptr: the up projection of SILU_MUL, else unused)
    x_ptr, u_ptr, q_ptr, s_ptr,
    # shapes
    T, TP, K,
    # strides
    stride_xt, stride_ut, stride_qt, stride_st, stride_sg,
    # meta-parameters
    SILU_MUL: tl.constexpr, UE8M0: tl.constexpr, EXACT_CAST: tl.constexpr,
    BLOCK_T: tl.constexpr, GROUP: tl.constexpr,
):
    # One program: BLOCK_T rows x one group of GROUP columns. Rows in [T, Tp) are padding:
    # their loads are masked to zero, so they get codes 0 and the AMAX_EPS scale.
    pid_t = tl.program_id(0)
    g = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = g * GROUP + tl.arange(0, GROUP)
    col_ok = cols[None, :] < K
    in_ok = (rows[:, None] < T) & col_ok
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows64 * stride_xt + cols[None, :], mask=in_ok, other=0.0)
    if SILU_MUL:
        u = tl.load(u_ptr + rows64 * stride_ut + cols[None, :], mask=in_ok, other=0.0)
        x = silu_mul(x, u, EXACT_CAST)
    x = x.to(tl.float32)
    s = group_scale(x, UE8M0)
    q = quantize_tile(x, s[:, None], EXACT_CAST)
    row_ok = rows < TP
    tl.store(q_ptr + rows64 * stride_qt + cols[None, :], q, mask=row_ok[:, None] & col_ok)
    tl.store(s_ptr + rows * stride_st + g * stride_sg, s, mask=row_ok)


@triton.jit
def _act_quant_static_kernel(
    x_ptr, q_ptr, scale_ptr,
    numel,
    EXACT_CAST: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(scale_ptr).to(tl.float32)
    tl.store(q_ptr + offs, quantize_tile(x, s, EXACT_CAST), mask=mask)


def _check_input(x: torch.Tensor) -> None:
    if x.dtype not in _HP_DTYPES:
        raise TypeError(f"fp8fx act_quant: expected float32/float16/bfloat16 input, got {x.dtype}")
    if not (x.is_cuda or interpreting()):
        raise RuntimeError(
            f"fp8fx act_quant: the Triton kernel needs a CUDA tensor, got one on {x.device}; "
            "use fp8fx.reference.quantize_act on CPU"
        )


def act_quant(
    x: torch.Tensor,
    ue8m0: bool = False,
    group_size: int = 128,
    col_major: bool = False,
    pad_rows: int = 1,
    block_t: int | None = None,
    num_warps: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token, per-group quantization of x[..., K].

    Returns q[..., K] fp8 and s[..., nK] fp32 (UE8M0 values are powers of two). With
    ``col_major`` (2-D x only), s has strides (1, Tp); with ``pad_rows`` > 1 (2-D x only) both
    q and s have Tp = ceil(T / pad_rows) * pad_rows rows, the padding rows zero.
    """
    _check_input(x)
    if group_size < 16 or group_size & (group_size - 1):
        raise ValueError(f"fp8fx act_quant: group_size must be a power of two >= 16, got {group_size}")
    if (col_major or pad_rows > 1) and x.dim() != 2:
        raise ValueError("fp8fx act_quant: col_major / pad_rows need a 2-D input [T, K]")
    return _launch(x, None, ue8m0, group_size, col_major, pad_rows, block_t, num_warps)


def silu_mul_quant(gate: torch.Tensor, up: torch.Tensor, ue8m0: bool = False, col_major: bool = False,
                   block_t: int | None = None, num_warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """act_quant(silu(gate) * up) in one pass: gate and up [..., K] bf16/fp16/fp32 of one shape
    and dtype (any row strides: the halves of a gate/up GEMM's output), K a multiple of 128.
    The product is formed in the inputs' dtype as eager torch rounds it, and never written."""
    _check_input(gate)
    if up.shape != gate.shape or up.dtype != gate.dtype or up.device != gate.device:
        raise ValueError(f"fp8fx silu_mul_quant: up must match gate's shape, dtype and device, got "
                         f"{tuple(up.shape)} {up.dtype} {up.device} for {tuple(gate.shape)} {gate.dtype} {gate.device}")
    if gate.shape[-1] % 128:
        raise ValueError(f"fp8fx silu_mul_quant: K must be a multiple of 128, got {gate.shape[-1]}")
    if col_major and gate.dim() != 2:
        raise ValueError("fp8fx silu_mul_quant: col_major needs 2-D inputs [T, K]")
    return _launch(gate, up, ue8m0, 128, col_major, 1, block_t, num_warps)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x[..., K] as [T, K] with unit column stride (a view where it can be)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch(x, up, ue8m0, group_size, col_major, pad_rows, block_t, num_warps):
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = _rows(x)
    u2 = x2 if up is None else _rows(up)
    t = x2.shape[0]
    tp = cdiv(t, pad_rows) * pad_rows
    groups = cdiv(k, group_size)
    q = torch.empty(tp, k, dtype=reference.FP8_DTYPE, device=x.device)
    if col_major:
        s = torch.empty(groups, tp, dtype=torch.float32, device=x.device).t()
    else:
        s = torch.empty(tp, groups, dtype=torch.float32, device=x.device)
    if tp > 0 and k > 0:
        block_t = block_t or (32 if group_size <= 128 else 16)
        grid = (cdiv(tp, block_t), groups)
        _act_quant_kernel[grid](
            x2, u2, q, s,
            t, tp, k,
            x2.stride(0), u2.stride(0), q.stride(0), s.stride(0), s.stride(1),
            SILU_MUL=up is not None, UE8M0=ue8m0, EXACT_CAST=interpreting(),
            BLOCK_T=block_t, GROUP=group_size, num_warps=num_warps,
        )
    if pad_rows > 1 or col_major:
        return q, s
    return q.reshape(*lead, k), s.reshape(*lead, groups)


def act_quant_static(x: torch.Tensor, act_scale: torch.Tensor) -> torch.Tensor:
    """Static per-tensor quantization: x[...] / act_scale (one value) -> fp8 codes."""
    _check_input(x)
    if act_scale.numel() != 1:
        raise ValueError(f"fp8fx act_quant_static: act_scale must hold one value, got {tuple(act_scale.shape)}")
    if act_scale.device != x.device:
        raise RuntimeError(f"fp8fx act_quant_static: act_scale on {act_scale.device}, input on {x.device}")
    xc = x.contiguous()
    q = torch.empty(x.shape, dtype=reference.FP8_DTYPE, device=x.device)
    n = xc.numel()
    if n:
        block = 4096
        _act_quant_static_kernel[(cdiv(n, block),)](
            xc, q, act_scale.reshape(()).float(), n,
            EXACT_CAST=interpreting(), BLOCK=block, num_warps=8,
        )
    return q
