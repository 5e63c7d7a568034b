"""cuBLAS blockwise FP8 GEMM through ``torch._scaled_mm`` (an extern, not a Triton kernel).

Legend: M tokens, Mp = M rounded up to 4, N out_features, K in_features,
nK = ceil(K / 128), L4 = nK rounded up to 4, nN = ceil(N / 128).

Layout rule measured on H100/H200, torch 2.11 + CUDA 13 (DESIGN.md):
    a        [Mp, K]   fp8 row-major            (cuBLAS refuses M % 4 != 0: pad rows)
    scale_a  [Mp, nK]  fp32 column-major, strides (1, Mp)        -> 1 x 128 blocks
    b        [K, N]    = w.t(), w [N, K] fp8 row-major
    scale_b  [L4, nN]  fp32, strides (1, L4): the weight scale transposed, K padded to 4
                                                                  -> 128 x 128 blocks
Omitting the L4 padding gave silent wrong results upstream, so ``prepare_weight_scale``
builds it once (callers cache it) and ``gemm`` checks it.
"""

from __future__ import annotations

import torch

from fp8fx import reference
from fp8fx.kernels.host import cdiv

__all__ = ["prepare_weight_scale", "gemm", "supports", "M_ALIGN"]

M_ALIGN = 4


def supports(k: int, out_dtype: torch.dtype) -> bool:
    """Measured on H200, torch 2.11: nK not a multiple of 4 (K = 272, 4480) raises "Invalid
    scaling configuration" even with scale_b padded; outputs other than bf16 are untested."""
    return cdiv(k, 128) % 4 == 0 and out_dtype == torch.bfloat16


def prepare_weight_scale(wscale: torch.Tensor) -> torch.Tensor:
    """wscale[nN, nK] fp32 or e8m0 -> fp32 [L4, nN] with strides (1, L4). Do this once per weight."""
    if wscale.dim() != 2 or wscale.dtype not in (torch.float32, reference.E8M0_DTYPE):
        raise ValueError(f"fp8fx cublas: expected a 2-D fp32/e8m0 weight scale, got {wscale.dtype} {tuple(wscale.shape)}")
    n_blocks, k_blocks = wscale.shape
    l4 = cdiv(k_blocks, 4) * 4
    padded = torch.zeros(n_blocks, l4, dtype=torch.float32, device=wscale.device)
    padded[:, :k_blocks] = wscale.float()
    return padded.t()


def gemm(
    xq: torch.Tensor,
    xs: torch.Tensor,
    w: torch.Tensor,
    wscale_prepared: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    m: int,
) -> torch.Tensor:
    """xq[Mp, K] fp8, xs[Mp, nK] column-major (as act_quant(col_major=True, pad_rows=4) writes),
    w[N, K] fp8, wscale_prepared from ``prepare_weight_scale`` -> y[m, N] in out_dtype."""
    mp, k = xq.shape
    n = w.shape[0]
    k_blocks = cdiv(k, 128)
    l4 = cdiv(k_blocks, 4) * 4
    if mp % M_ALIGN or xs.shape != (mp, k_blocks) or xs.stride() != (1, mp):
        raise ValueError(
            f"fp8fx cublas: activations must be padded to a multiple of {M_ALIGN} rows with "
            f"column-major scales; got xq {tuple(xq.shape)}, xs {tuple(xs.shape)} strides {xs.stride()}"
        )
    if wscale_prepared.shape != (l4, cdiv(n, 128)) or wscale_prepared.stride() != (1, l4):
        raise ValueError(
            "fp8fx cublas: weight scale is not in the prepared layout "
            f"(shape {(l4, cdiv(n, 128))}, strides (1, {l4})); call prepare_weight_scale once"
        )
    if bias is None:
        return torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=wscale_prepared, out_dtype=out_dtype)[:m]
    # Bias in fp32 before the one rounding to out_dtype, as the reference does (adding it to a
    # bf16 result rounds twice: ~1.4x the error, over the 2e-3 bound at small K).
    try:
        y = torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=wscale_prepared, out_dtype=torch.float32)[:m]
    except RuntimeError:  # no fp32 output for this recipe: accept the second rounding
        y = torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=wscale_prepared, out_dtype=out_dtype)[:m]
    return (y.float() + bias.float()).to(out_dtype)
