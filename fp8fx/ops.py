"""Every ``torch.ops.fp8fx.*`` custom op, with its fake (meta) implementation.

This is the only module that names ops. On CPU (and any non-CUDA device) each op runs the
pure-torch reference; on CUDA it runs ``fp8fx.kernels`` (Triton, cuBLAS, DeepGEMM), looked
up in ``_cuda_impl`` below.

Legend: T tokens, N out_features, K in_features, E experts.

    fp8fx::linear(x[..., K], qweight[N, K], wscale[nN, nK], bias[N]?, act_scale[]?, block_size)
        -> y[..., N]                        quantize x, block-FP8 GEMM, + bias (x's dtype)
    fp8fx::act_quant(x[..., K], group_size, ue8m0) -> (q[..., K] fp8, s[..., nK] fp32)
    fp8fx::block_gemm(xq[..., K], xs[..., nK] | [], qweight, wscale, bias?, block_size, out_dtype)
        -> y[..., N]                        GEMM of already quantized activations
    fp8fx::block_gemm_cat(xq[..., K], xs, qweights[i][N_i, K], wscales[i], biases[i]?, block_size,
        out_dtype) -> y[..., sum N_i]    block_gemm of several weights on one input, concatenated
                                        (q/k/v, gate/up: one decode launch on CUDA)
    fp8fx::linear_cat(x[..., K], qweights[i][N_i, K], wscales[i], biases[i]?, block_size)
        -> y[..., sum N_i]                 linear (dynamic scales) of several weights on one
                                        input, concatenated (decode: one gemv launch on CUDA
                                        that quantizes x in the kernel)
    fp8fx::grouped_linear(x[T, K], qweight[E, N, K], wscale[E, nN, nK], offs[E], act_scale[E]?,
        block_size) -> y[T, N]              MoE experts over tokens sorted by expert
    fp8fx::expert_linear(x[T, K], expert_ids[R] int, qweight[E, N, K], wscale[E, nN, nK],
        act_scale[E]?, block_size, check_ids=True) -> y[R, N]
                                        MoE experts unsorted (decode): row r is x[r // (R / T)]
                                        through expert expert_ids[r]; R a multiple of T
    fp8fx::grouped_linear_masked(x[E, M, K], qweight[E, N, K], wscale[E, nN, nK], masked_m[E] int,
        act_scale[E]?, block_size) -> y[E, M, N]
                                        MoE experts over per-expert padded batches (decode):
                                        rows :masked_m[e] of expert e are valid, the rest of
                                        y[e] is zeros; 0 <= masked_m[e] <= M
    fp8fx::rms_norm_quant(x[..., K], residual[..., K]?, weight[K], eps_tensor[]?, eps, ue8m0)
        -> (q[..., K] fp8, s[..., K / 128] fp32, h[..., K])
                                        h = x (+ residual); transformers' RMSNorm of h,
                                        quantized per 1 x 128 group; s column-major over the
                                        rows; h empty without a residual (on CUDA one
                                        Triton launch, kernels.norm_quant)
    fp8fx::rms_norm_linear_cat(x[..., K], residual[..., K]?, weight[K], eps_tensor[]?, eps, qweights,
        wscales, biases, block_size) -> (y[..., sum N_i], h[..., K])
                                        linear_cat of transformers' RMSNorm of h = x (+ residual);
                                        h empty without a residual (decode: on CUDA one gemv
                                        launch that normalizes, quantizes and multiplies)
    fp8fx::silu_mul_linear_cat(gate[..., K], up[..., K], qweights, wscales, biases, block_size)
        -> y[..., sum N_i]              linear_cat of silu(gate) * up (decode: one gemv launch)
    fp8fx::topk(x[..., C], k) -> (values[..., k], indices[..., k] int64)
                                        torch.topk(x, k, dim=-1): the k largest, largest
                                        first (MoE routing; on CUDA one Triton launch for
                                        C <= kernels.topk.MAX_COLS, k <= MAX_K)
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fp8fx import reference

__all__ = ["linear", "act_quant", "block_gemm", "block_gemm_cat", "linear_cat", "grouped_linear", "expert_linear", "grouped_linear_masked",
           "rms_norm_quant", "rms_norm_linear_cat", "silu_mul_linear_cat", "topk"]

_SCALE_DTYPES = (torch.float32, reference.E8M0_DTYPE)


def _check_weight(qweight: Tensor, wscale: Tensor, block_size: list[int], expert_dims: int) -> None:
    want_dim = 2 + expert_dims
    if qweight.dim() != want_dim:
        raise ValueError(f"fp8fx: qweight must have {want_dim} dims, got shape {tuple(qweight.shape)}")
    if qweight.dtype != reference.FP8_DTYPE:
        raise TypeError(f"fp8fx: qweight must be torch.float8_e4m3fn, got {qweight.dtype}")
    if wscale.dtype not in _SCALE_DTYPES:
        raise TypeError(f"fp8fx: weight scale must be float32 or float8_e8m0fnu, got {wscale.dtype}")
    *lead, n, k = qweight.shape
    expected = (*lead, *reference.scale_grid(n, k, block_size))
    if tuple(wscale.shape) != expected:
        raise ValueError(
            f"fp8fx: weight scale has shape {tuple(wscale.shape)}, expected {expected} for a "
            f"weight of shape {tuple(qweight.shape)} and block_size {tuple(block_size)}"
        )


def _check_same_device(**tensors: Optional[Tensor]) -> None:
    present = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(present.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in present.items())
        raise RuntimeError(f"fp8fx: all inputs must be on one device, got {listing}")


def _check_x(x: Tensor, k: int) -> None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"fp8fx: input must be float32, float16 or bfloat16, got {x.dtype}")
    if x.shape[-1] != k:
        raise ValueError(
            f"fp8fx: input has {x.shape[-1]} features (shape {tuple(x.shape)}), the weight expects {k}"
        )


def _check_bias(bias: Optional[Tensor], n: int) -> None:
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"fp8fx: bias must have shape ({n},), got {tuple(bias.shape)}")


def check_linear_args(x, qweight, wscale, bias, act_scale, block_size) -> None:
    """Validate fp8fx::linear inputs; shared by every implementation and the fake."""
    _check_weight(qweight, wscale, block_size, expert_dims=0)
    _check_x(x, qweight.shape[1])
    _check_bias(bias, qweight.shape[0])
    if act_scale is not None and act_scale.numel() != 1:
        raise ValueError(f"fp8fx: a static act_scale is one value per tensor, got shape {tuple(act_scale.shape)}")
    _check_same_device(input=x, qweight=qweight, wscale=wscale, bias=bias, act_scale=act_scale)


# CUDA implementations by op name ("linear", "act_quant", ...), filled by
# fp8fx.kernels.register() on the first CUDA call (importing Triton is not free).
_cuda_impl: dict[str, callable] = {}


def _cuda(name: str):
    if not _cuda_impl:
        from fp8fx import kernels

        kernels.register()
    return _cuda_impl.get(name)


@torch.library.custom_op("fp8fx::linear", mutates_args=())
def linear(
    x: Tensor,
    qweight: Tensor,
    wscale: Tensor,
    bias: Optional[Tensor],
    act_scale: Optional[Tensor],
    block_size: list[int],
) -> Tensor:
    check_linear_args(x, qweight, wscale, bias, act_scale, block_size)
    if x.is_cuda and _cuda("linear"):
        return _cuda("linear")(x, qweight, wscale, bias, act_scale, block_size)
    return reference.linear(x, qweight, wscale, bias, act_scale, tuple(block_size))


@linear.register_fake
def _(x, qweight, wscale, bias, act_scale, block_size):
    check_linear_args(x, qweight, wscale, bias, act_scale, block_size)
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def _linear_setup_context(ctx, inputs, output):
    x, qweight, wscale, bias, act_scale, block_size = inputs
    ctx.save_for_backward(qweight, wscale)
    ctx.block_size = tuple(block_size)
    ctx.has_bias = bias is not None


def _linear_backward(ctx, grad):
    # Straight-through for the activation quantization: dL/dx = dL/dy @ dequant(W).
    qweight, wscale = ctx.saved_tensors
    w = reference.dequantize_weight(qweight, wscale, ctx.block_size, grad.dtype)
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad @ w, None, None, grad_bias, None, None


linear.register_autograd(_linear_backward, setup_context=_linear_setup_context)


@torch.library.custom_op("fp8fx::act_quant", mutates_args=())
def act_quant(x: Tensor, group_size: int, ue8m0: bool) -> tuple[Tensor, Tensor]:
    if x.is_cuda and _cuda("act_quant"):
        return _cuda("act_quant")(x, group_size, ue8m0)
    return reference.quantize_act(x, group_size, "ue8m0" if ue8m0 else "float32")


@act_quant.register_fake
def _(x, group_size, ue8m0):
    groups = math.ceil(x.shape[-1] / group_size)
    q = x.new_empty(x.shape, dtype=reference.FP8_DTYPE)
    return q, x.new_empty(*x.shape[:-1], groups, dtype=torch.float32)


@torch.library.custom_op("fp8fx::block_gemm", mutates_args=())
def block_gemm(
    xq: Tensor,
    xs: Tensor,
    qweight: Tensor,
    wscale: Tensor,
    bias: Optional[Tensor],
    block_size: list[int],
    out_dtype: torch.dtype,
) -> Tensor:
    if xq.is_cuda and _cuda("block_gemm"):
        return _cuda("block_gemm")(xq, xs, qweight, wscale, bias, block_size, out_dtype)
    return reference.block_gemm(xq, xs, qweight, wscale, bias, tuple(block_size), out_dtype)


@block_gemm.register_fake
def _(xq, xs, qweight, wscale, bias, block_size, out_dtype):
    return xq.new_empty(*xq.shape[:-1], qweight.shape[0], dtype=out_dtype)


def _check_weight_list(op: str, k: int, qweights, wscales, biases, block_size) -> None:
    """One or more weights of in_features ``k``, one scale and one bias entry (or None)
    each, one scale dtype: the weight lists of block_gemm_cat and linear_cat."""
    if not qweights or len(wscales) != len(qweights) or len(biases) != len(qweights):
        raise ValueError(
            f"fp8fx: {op} needs one or more weights with one scale and one bias entry (or None) each; "
            f"got {len(qweights)} weights, {len(wscales)} scales, {len(biases)} biases"
        )
    for qweight, wscale, bias in zip(qweights, wscales, biases):
        _check_weight(qweight, wscale, block_size, expert_dims=0)
        if qweight.shape[1] != k:
            raise ValueError(f"fp8fx: {op} input has K = {k}, a weight has {tuple(qweight.shape)}")
        _check_bias(bias, qweight.shape[0])
    if len({s.dtype for s in wscales}) > 1:
        raise TypeError(f"fp8fx: {op} weights must share one scale dtype, got {[s.dtype for s in wscales]}")


def _check_list_devices(qweights, wscales, biases, **tensors) -> None:
    named = {f"{name}{i}": t for name, ts in (("qweight", qweights), ("wscale", wscales), ("bias", biases))
             for i, t in enumerate(ts)}
    _check_same_device(**tensors, **named)


def check_cat_args(xq, xs, qweights, wscales, biases, block_size) -> None:
    """Validate fp8fx::block_gemm_cat inputs: at least one weight, one scale and one bias
    entry (or None) per weight, every weight reading xq's K, one scale dtype."""
    if xq.dtype != reference.FP8_DTYPE:
        raise TypeError(f"fp8fx: block_gemm_cat takes quantized (float8_e4m3fn) activations, got {xq.dtype}")
    _check_weight_list("block_gemm_cat", xq.shape[-1], qweights, wscales, biases, block_size)
    _check_list_devices(qweights, wscales, biases, xq=xq, xs=xs)


@torch.library.custom_op("fp8fx::block_gemm_cat", mutates_args=())
def block_gemm_cat(
    xq: Tensor,
    xs: Tensor,
    qweights: list[Tensor],
    wscales: list[Tensor],
    biases: list[Optional[Tensor]],
    block_size: list[int],
    out_dtype: torch.dtype,
) -> Tensor:
    check_cat_args(xq, xs, qweights, wscales, biases, block_size)
    if xq.is_cuda and _cuda("block_gemm_cat"):
        return _cuda("block_gemm_cat")(xq, xs, qweights, wscales, biases, block_size, out_dtype)
    return reference.block_gemm_cat(xq, xs, qweights, wscales, biases, tuple(block_size), out_dtype)


@block_gemm_cat.register_fake
def _(xq, xs, qweights, wscales, biases, block_size, out_dtype):
    check_cat_args(xq, xs, qweights, wscales, biases, block_size)
    return xq.new_empty(*xq.shape[:-1], sum(w.shape[0] for w in qweights), dtype=out_dtype)


def check_linear_cat_args(x, qweights, wscales, biases, block_size) -> None:
    """Validate fp8fx::linear_cat inputs: a high-precision x and a weight list as block_gemm_cat's."""
    _check_x(x, qweights[0].shape[1] if qweights else x.shape[-1])
    _check_weight_list("linear_cat", x.shape[-1], qweights, wscales, biases, block_size)
    _check_list_devices(qweights, wscales, biases, input=x)


@torch.library.custom_op("fp8fx::linear_cat", mutates_args=())
def linear_cat(
    x: Tensor,
    qweights: list[Tensor],
    wscales: list[Tensor],
    biases: list[Optional[Tensor]],
    block_size: list[int],
) -> Tensor:
    check_linear_cat_args(x, qweights, wscales, biases, block_size)
    if x.is_cuda and _cuda("linear_cat"):
        return _cuda("linear_cat")(x, qweights, wscales, biases, block_size)
    return reference.linear_cat(x, qweights, wscales, biases, tuple(block_size))


@linear_cat.register_fake
def _(x, qweights, wscales, biases, block_size):
    check_linear_cat_args(x, qweights, wscales, biases, block_size)
    return x.new_empty(*x.shape[:-1], sum(w.shape[0] for w in qweights))


def _check_per_expert(name: str, counts: Tensor, act_scale: Optional[Tensor], e: int) -> None:
    """The int32/int64 [E] row bookkeeping (offs or masked_m) and a static act_scale [E]."""
    if tuple(counts.shape) != (e,) or counts.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"fp8fx: {name} must be an int32/int64 tensor of shape ({e},), got {counts.dtype} {tuple(counts.shape)}"
        )
    if act_scale is not None and tuple(act_scale.shape) != (e,):
        raise ValueError(f"fp8fx: a static act_scale for {e} experts has shape ({e},), got {tuple(act_scale.shape)}")


def check_grouped_args(x, qweight, wscale, offs, act_scale, block_size) -> None:
    _check_weight(qweight, wscale, block_size, expert_dims=1)
    e, _, k = qweight.shape
    _check_x(x, k)
    if x.dim() != 2:
        raise ValueError(f"fp8fx: grouped_linear takes tokens as [T, K], got shape {tuple(x.shape)}")
    _check_per_expert("offs", offs, act_scale, e)
    _check_same_device(input=x, qweight=qweight, wscale=wscale, offs=offs, act_scale=act_scale)


@torch.library.custom_op("fp8fx::grouped_linear", mutates_args=())
def grouped_linear(
    x: Tensor,
    qweight: Tensor,
    wscale: Tensor,
    offs: Tensor,
    act_scale: Optional[Tensor],
    block_size: list[int],
) -> Tensor:
    check_grouped_args(x, qweight, wscale, offs, act_scale, block_size)
    if x.is_cuda and _cuda("grouped_linear"):
        return _cuda("grouped_linear")(x, qweight, wscale, offs, act_scale, block_size)
    return reference.grouped_linear(x, qweight, wscale, offs, act_scale, tuple(block_size))


@grouped_linear.register_fake
def _(x, qweight, wscale, offs, act_scale, block_size):
    check_grouped_args(x, qweight, wscale, offs, act_scale, block_size)
    return x.new_empty(x.shape[0], qweight.shape[1])


def check_expert_args(x, expert_ids, qweight, wscale, act_scale, block_size) -> None:
    """Validate fp8fx::expert_linear inputs (shapes and dtypes; the ids' values live on the
    device: out-of-range ids trip a device-side assert on CUDA, a ValueError on CPU)."""
    _check_weight(qweight, wscale, block_size, expert_dims=1)
    e, _, k = qweight.shape
    _check_x(x, k)
    if x.dim() != 2:
        raise ValueError(f"fp8fx: expert_linear takes tokens as [T, K], got shape {tuple(x.shape)}")
    t, r = x.shape[0], expert_ids.numel()
    if expert_ids.dim() != 1 or expert_ids.dtype not in (torch.int32, torch.int64) or (r % t if t else r):
        raise ValueError(
            f"fp8fx: expert_ids must be 1-D int32/int64 with a multiple of T = {t} entries (T * top_k), "
            f"got {expert_ids.dtype} {tuple(expert_ids.shape)}"
        )
    if act_scale is not None and tuple(act_scale.shape) != (e,):
        raise ValueError(f"fp8fx: a static act_scale for {e} experts has shape ({e},), got {tuple(act_scale.shape)}")
    _check_same_device(input=x, expert_ids=expert_ids, qweight=qweight, wscale=wscale, act_scale=act_scale)


@torch.library.custom_op("fp8fx::expert_linear", mutates_args=())
def expert_linear(
    x: Tensor,
    expert_ids: Tensor,
    qweight: Tensor,
    wscale: Tensor,
    act_scale: Optional[Tensor],
    block_size: list[int],
    check_ids: bool = True,
) -> Tensor:
    check_expert_args(x, expert_ids, qweight, wscale, act_scale, block_size)
    e = qweight.shape[0]
    if check_ids or not x.is_cuda:
        # No host sync on CUDA: a device-side assert (the kernel clamps ids meanwhile); on CPU
        # it raises here. check_ids=False: the caller asserted these ids already in its own
        # graph, where Inductor fuses the check (the experts forward does, once per layer).
        torch._assert_async(((expert_ids >= 0) & (expert_ids < e)).all(), f"fp8fx: expert ids must lie in [0, {e})")
    if x.is_cuda and _cuda("expert_linear"):
        return _cuda("expert_linear")(x, expert_ids, qweight, wscale, act_scale, block_size)
    return reference.expert_linear(x, expert_ids, qweight, wscale, act_scale, tuple(block_size))


@expert_linear.register_fake
def _(x, expert_ids, qweight, wscale, act_scale, block_size, check_ids=True):
    check_expert_args(x, expert_ids, qweight, wscale, act_scale, block_size)
    return x.new_empty(expert_ids.shape[0], qweight.shape[1])


def check_grouped_masked_args(x, qweight, wscale, masked_m, act_scale, block_size) -> None:
    """Validate fp8fx::grouped_linear_masked inputs (shapes and dtypes; the values of masked_m
    live on the device and are checked where they are read)."""
    _check_weight(qweight, wscale, block_size, expert_dims=1)
    e, _, k = qweight.shape
    _check_x(x, k)
    if x.dim() != 3 or x.shape[0] != e:
        raise ValueError(
            f"fp8fx: grouped_linear_masked takes per-expert batches x[E, M, K] with E = {e}, got shape {tuple(x.shape)}"
        )
    _check_per_expert("masked_m", masked_m, act_scale, e)
    _check_same_device(input=x, qweight=qweight, wscale=wscale, masked_m=masked_m, act_scale=act_scale)


@torch.library.custom_op("fp8fx::grouped_linear_masked", mutates_args=())
def grouped_linear_masked(
    x: Tensor,
    qweight: Tensor,
    wscale: Tensor,
    masked_m: Tensor,
    act_scale: Optional[Tensor],
    block_size: list[int],
) -> Tensor:
    check_grouped_masked_args(x, qweight, wscale, masked_m, act_scale, block_size)
    if x.is_cuda and _cuda("grouped_linear_masked"):
        # No host sync: a count outside [0, M] fails at a later CUDA call (the kernels clamp
        # it first, so memory outside the batch is never touched).
        m = x.shape[1]
        in_range = masked_m.clamp(0, m).eq(masked_m).all()  # few launches: this is decode latency
        torch._assert_async(in_range, f"fp8fx: grouped_linear_masked needs 0 <= masked_m <= M = {m}")
        return _cuda("grouped_linear_masked")(x, qweight, wscale, masked_m, act_scale, block_size)
    return reference.grouped_linear_masked(x, qweight, wscale, masked_m, act_scale, tuple(block_size))


@grouped_linear_masked.register_fake
def _(x, qweight, wscale, masked_m, act_scale, block_size):
    check_grouped_masked_args(x, qweight, wscale, masked_m, act_scale, block_size)
    return x.new_empty(x.shape[0], x.shape[1], qweight.shape[1])


def check_rms_norm_quant_args(x, residual, weight, eps_tensor, op: str = "rms_norm_quant") -> None:
    from fp8fx.kernels.norm_quant import MAX_K

    if x.dtype not in (torch.bfloat16, torch.float16) or x.dim() == 0:
        raise TypeError(f"fp8fx: {op} needs a bf16/fp16 x with a last dimension, got {x.dtype} {tuple(x.shape)}")
    k = x.shape[-1]
    if k % 128 or not 0 < k <= MAX_K:
        raise ValueError(f"fp8fx: {op} needs a hidden size that is a multiple of 128 and at most {MAX_K}, got {k}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"fp8fx: {op}'s residual must match x ({x.dtype} {tuple(x.shape)}), "
                         f"got {residual.dtype} {tuple(residual.shape)}")
    if tuple(weight.shape) != (k,) or weight.dtype != x.dtype:
        raise ValueError(f"fp8fx: {op}'s weight must be {x.dtype} ({k},), got {weight.dtype} {tuple(weight.shape)}")
    if eps_tensor is not None and (eps_tensor.dim() != 0 or eps_tensor.device.type != "cpu" or not eps_tensor.is_floating_point()):
        raise ValueError(f"fp8fx: {op}'s eps_tensor must be a 0-dim floating-point CPU tensor, got "
                         f"{eps_tensor.dtype} {tuple(eps_tensor.shape)} on {eps_tensor.device}")
    _check_same_device(x=x, residual=residual, weight=weight)


# Defined with torch.library.Library rather than custom_op: a compiled prefill graph calls it
# once per RMSNorm, and custom_op's Python layer cost about 30 us of host time per call
# (H200 host: 75 us per call against 46 for the same kernel behind a plain op;
# scripts/bench_norm_quant.py), which an as-called prefill partly pays.
_LIB = torch.library.Library("fp8fx", "FRAGMENT")
_LIB.define(
    "rms_norm_quant(Tensor x, Tensor? residual, Tensor weight, Tensor? eps_tensor, float eps, bool ue8m0)"
    " -> (Tensor, Tensor, Tensor)"
)


def _rms_norm_quant(x, residual, weight, eps_tensor, eps, ue8m0):
    check_rms_norm_quant_args(x, residual, weight, eps_tensor)
    from fp8fx.kernels.norm_quant import scales_like

    eps_value = float(eps_tensor) if eps_tensor is not None else eps  # a CPU scalar: no sync
    if x.is_cuda and _cuda("rms_norm_quant"):
        return _cuda("rms_norm_quant")(x, residual, weight, eps_value, ue8m0)
    q, s, h = reference.rms_norm_quant(x, residual, weight, eps_value, 128, "ue8m0" if ue8m0 else "float32")
    # The layouts the fake reports: q and h contiguous, s column-major over the rows.
    return q.contiguous(), scales_like(x).copy_(s), h.contiguous() if residual is not None else x.new_empty(0)


_LIB.impl("rms_norm_quant", _rms_norm_quant, "CompositeExplicitAutograd")


@torch.library.register_fake("fp8fx::rms_norm_quant")
def _(x, residual, weight, eps_tensor, eps, ue8m0):
    check_rms_norm_quant_args(x, residual, weight, eps_tensor)
    from fp8fx.kernels.norm_quant import scales_like

    h = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else x.new_empty(0)
    return x.new_empty(x.shape, dtype=reference.FP8_DTYPE), scales_like(x), h


rms_norm_quant = torch.ops.fp8fx.rms_norm_quant


# The decode GEMMs with their producer in the gemv's prologue (passes/prologue.py): plain
# library definitions as rms_norm_quant's.
_LIB.define(
    "rms_norm_linear_cat(Tensor x, Tensor? residual, Tensor weight, Tensor? eps_tensor, float eps, Tensor[] qweights,"
    " Tensor[] wscales, Tensor?[] biases, int[] block_size) -> (Tensor, Tensor)"
)
_LIB.define(
    "silu_mul_linear_cat(Tensor gate, Tensor up, Tensor[] qweights, Tensor[] wscales, Tensor?[] biases,"
    " int[] block_size) -> Tensor"
)


def check_rms_norm_linear_cat_args(x, residual, weight, eps_tensor, qweights, wscales, biases, block_size) -> None:
    check_rms_norm_quant_args(x, residual, weight, eps_tensor, op="rms_norm_linear_cat")
    check_linear_cat_args(x, qweights, wscales, biases, block_size)


def check_silu_mul_linear_cat_args(gate, up, qweights, wscales, biases, block_size) -> None:
    if gate.dtype not in (torch.bfloat16, torch.float16) or up.shape != gate.shape or up.dtype != gate.dtype:
        raise TypeError(f"fp8fx: silu_mul_linear_cat needs bf16/fp16 gate and up of one shape and dtype, got "
                        f"{gate.dtype} {tuple(gate.shape)} and {up.dtype} {tuple(up.shape)}")
    check_linear_cat_args(gate, qweights, wscales, biases, block_size)
    _check_same_device(gate=gate, up=up)


def _rms_norm_linear_cat(x, residual, weight, eps_tensor, eps, qweights, wscales, biases, block_size):
    check_rms_norm_linear_cat_args(x, residual, weight, eps_tensor, qweights, wscales, biases, block_size)
    eps_value = float(eps_tensor) if eps_tensor is not None else eps
    if x.is_cuda and _cuda("rms_norm_linear_cat"):
        return _cuda("rms_norm_linear_cat")(x, residual, weight, eps_value, qweights, wscales, biases, block_size)
    y, h = reference.rms_norm_linear_cat(x, residual, weight, eps_value, qweights, wscales, biases, tuple(block_size))
    return y, h.contiguous() if residual is not None else x.new_empty(0)


def _silu_mul_linear_cat(gate, up, qweights, wscales, biases, block_size):
    check_silu_mul_linear_cat_args(gate, up, qweights, wscales, biases, block_size)
    if gate.is_cuda and _cuda("silu_mul_linear_cat"):
        return _cuda("silu_mul_linear_cat")(gate, up, qweights, wscales, biases, block_size)
    return reference.silu_mul_linear_cat(gate, up, qweights, wscales, biases, tuple(block_size))


_LIB.impl("rms_norm_linear_cat", _rms_norm_linear_cat, "CompositeExplicitAutograd")
_LIB.impl("silu_mul_linear_cat", _silu_mul_linear_cat, "CompositeExplicitAutograd")


@torch.library.register_fake("fp8fx::rms_norm_linear_cat")
def _(x, residual, weight, eps_tensor, eps, qweights, wscales, biases, block_size):
    check_rms_norm_linear_cat_args(x, residual, weight, eps_tensor, qweights, wscales, biases, block_size)
    h = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else x.new_empty(0)
    return x.new_empty(*x.shape[:-1], sum(w.shape[0] for w in qweights)), h


@torch.library.register_fake("fp8fx::silu_mul_linear_cat")
def _(gate, up, qweights, wscales, biases, block_size):
    check_silu_mul_linear_cat_args(gate, up, qweights, wscales, biases, block_size)
    return gate.new_empty(*gate.shape[:-1], sum(w.shape[0] for w in qweights))


rms_norm_linear_cat = torch.ops.fp8fx.rms_norm_linear_cat
silu_mul_linear_cat = torch.ops.fp8fx.silu_mul_linear_cat


def _check_topk(x: Tensor, k: int) -> None:
    if x.dim() == 0 or not 0 <= k <= x.shape[-1]:
        raise ValueError(f"fp8fx: topk needs x with a last dimension and 0 <= k <= x.shape[-1], "
                         f"got k = {k} for shape {tuple(x.shape)}")


@torch.library.custom_op("fp8fx::topk", mutates_args=())
def topk(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    _check_topk(x, k)
    if x.is_cuda and _cuda("topk"):
        from fp8fx.kernels import topk as kernel

        if kernel.supports(x, k):
            return _cuda("topk")(x, k)
    values, indices = torch.topk(x, k, dim=-1)
    return values, indices


@topk.register_fake
def _(x, k):
    _check_topk(x, k)
    return x.new_empty(*x.shape[:-1], k), x.new_empty(*x.shape[:-1], k, dtype=torch.int64)
