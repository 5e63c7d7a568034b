"""Inductor lowering of fp8fx.block_gemm.

    fp8fx.block_gemm(xq, xs, qweight, wscale, bias?, block, out_dtype)
        -> realize xq, xs once (contiguous), then an extern call of the custom op
        -> CUDA: fp8fx.kernels.block_gemm_cuda -> dispatch.choose(M, N, K): Triton | cuBLAS | DeepGEMM
           CPU:  the pure-torch reference

Realizing the inputs in the lowering (rather than through Inductor's default custom-op
stride constraint, which copies an unrealized input once per consumer) lets q/k/v or
gate/up GEMMs share one buffer of fp8 codes and one of scales.

The op is never decomposed, so Inductor cannot hand a block-FP8 GEMM to its own blockwise
``_scaled_mm`` template (wrong results and illegal memory accesses on torch 2.11, DESIGN.md).
The kernel is picked at run time from the actual M by the kernels' measured table
(fp8fx/kernels/dispatch.py), so one compiled graph serves every token count. Not yet:
autotuned choices under max-autotune and Triton templates with fused epilogues.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["register"]


def _block_gemm(xq, xs, qweight, wscale, bias, block_size, out_dtype):
    from torch._inductor import ir
    from torch._inductor.lowering import fallback_handler

    xq, xs = (ir.ExternKernel.require_contiguous(ir.ExternKernel.realize_input(t)) for t in (xq, xs))
    return fallback_handler(torch.ops.fp8fx.block_gemm.default, add_to_fallback_set=False)(
        xq, xs, qweight, wscale, bias, block_size, out_dtype
    )


@functools.cache
def register() -> None:
    """Install the block_gemm lowering and, on CUDA, the fp8fx kernels (once per process)."""
    from torch._inductor.lowering import lowerings, register_lowering

    op = torch.ops.fp8fx.block_gemm.default
    if op not in lowerings:
        register_lowering(op, type_promotion_kind=None)(_block_gemm)
    if torch.cuda.is_available():
        from fp8fx import kernels

        kernels.register()
