"""Inductor lowering of fp8fx.block_gemm: a choice of kernels, picked per shape.

    fp8fx.block_gemm(xq[..., K], xs[..., nK], qweight[N, K], wscale[nN, nK], bias?, block, out_dtype)
        -> xq as [M, K] row-major, xs as [M, nK] column-major (the layout the quant kernel
           that Inductor fused into the producer writes directly; cuBLAS wants it, Triton
           reads it with coalesced loads)
        -> choices:
           "fp8fx" template  generated Triton, Inductor fuses epilogues (residual add, cast,
                             activation) into its store; the bias is added in fp32 before it
           extern auto       fp8fx.kernels' run-time dispatch on the real M (split-K / small-M
                             kernels, cuBLAS, DeepGEMM): one graph serves every token count
           extern cublas     torch._scaled_mm blockwise (static M % 4 == 0, ceil(K/128) % 4 == 0)
           extern triton     fp8fx's standalone Triton kernel (split-K for small M)
           extern deepgemm   when DeepGEMM imports
        -> max-autotune: Inductor benchmarks every choice at this shape and keeps the fastest;
           otherwise one choice from the measured table (fp8fx/kernels/dispatch.py) at the
           static M, or the run-time dispatch when M is dynamic.

The externs are plain Python functions the generated wrapper calls directly: no custom-op
dispatch per GEMM. CPU graphs (tests, CI) take the run-time extern, which runs the reference.
The op is never decomposed, so Inductor cannot hand a block-FP8 GEMM to its own blockwise
``_scaled_mm`` template (wrong results and illegal memory accesses on torch 2.11, DESIGN.md).
Static activation scales and block sizes other than 128 x 128 take the run-time extern.

fp8fx.block_gemm_cat (several weights on one input, decode; passes/linear.py) lowers to one
extern, ``fp8fx_block_gemm_cat``: a single gemv_cat launch on CUDA, the reference on CPU.
fp8fx.linear_cat (one or more weights on one high-precision input, decode) lowers to the
extern ``fp8fx_linear_cat``: a single gemv_cat launch that quantizes x in the kernel.
fp8fx.rms_norm_quant, fp8fx.rms_norm_linear_cat and fp8fx.silu_mul_linear_cat lower to
Inductor's fallback calling ``extern_kernels.fp8fx_<op>``: the kernel wrapper, directly.

Counters (torch._dynamo.utils.counters["fp8fx"]): block_gemm_lowered,
block_gemm_template_default, block_gemm_cublas_default, block_gemm_autotuned,
block_gemm_cat_lowered, linear_cat_lowered.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
from torch._dynamo.utils import counters

from fp8fx import kernels

__all__ = ["register", "block_gemm_extern", "block_gemm_cat_extern", "linear_cat_extern", "rms_norm_quant_extern",
           "rms_norm_linear_cat_extern", "silu_mul_linear_cat_extern", "template_configs"]

_BLOCK = [128, 128]
log = logging.getLogger(__name__)


def template_configs():
    """The template's max-autotune list: the standalone Triton kernel's sweep list
    (block_gemm.CONFIGS) without its small-M tiles, which split-K serves; BLOCK_K is 128."""
    from fp8fx.kernels.block_gemm import CONFIGS

    return [cfg for cfg in CONFIGS if cfg.block_m >= 64]


_TEMPLATE_SOURCE = r"""
{% if HAS_BIAS %}{{def_kernel("A", "AS", "B", "BS", "BIAS")}}{% else %}{{def_kernel("A", "AS", "B", "BS")}}{% endif %}
    M = {{size("A", 0)}}
    N = {{size("B", 0)}}
    K = {{size("A", 1)}}
    if M * N == 0:
        return
    stride_am = {{stride("A", 0)}}
    stride_sam = {{stride("AS", 0)}}
    stride_sak = {{stride("AS", 1)}}
    stride_bn = {{stride("B", 0)}}
    stride_sbn = {{stride("BS", 0)}}
    stride_sbk = {{stride("BS", 1)}}

    # GROUP_M row tiles share each sweep over the columns: weight tiles are reused from L2.
    pid = tl.program_id(0)
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
    rm = tl.where(m_ok, offs_m, 0).to(tl.int64)  # clamped: loads stay in bounds, the store masks
    rn = tl.where(n_ok, offs_n, 0).to(tl.int64)
    a_ptrs = A + rm[:, None] * stride_am + offs_k[None, :]
    b_ptrs = B + rn[None, :] * stride_bn + offs_k[:, None]
    sa_ptrs = AS + rm * stride_sam
    if BLOCK_N <= 128:
        sb_ptrs = BS + (pid_n * BLOCK_N // 128) * stride_sbn  # one weight block row per tile
    else:
        sb_ptrs = BS + (rn // 128) * stride_sbn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = kb * BLOCK_K + offs_k < K
        a = tl.load(a_ptrs + kb * BLOCK_K, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs + kb * BLOCK_K, mask=k_ok[:, None], other=0.0)
        sa = tl.load(sa_ptrs + kb * stride_sak)
        if B_SCALE_E8M0:  # e8m0 arrives as uint8: the exponent bits of an fp32 power of two
            sb = (tl.load(sb_ptrs + kb * stride_sbk).to(tl.int32) << 23).to(tl.float32, bitcast=True)
        else:
            sb = tl.load(sb_ptrs + kb * stride_sbk)
        partial = tl.dot(a, b)  # one 128-wide K block, promoted into fp32 with its scales
        if BLOCK_N <= 128:
            acc += partial * (sa * sb)[:, None]
        else:
            acc += partial * (sa[:, None] * sb[None, :])

    {% if HAS_BIAS %}
    acc += tl.load(BIAS + rn).to(tl.float32)[None, :]  # in fp32, before the one rounding
    {% endif %}
    idx_m = offs_m[:, None]
    idx_n = offs_n[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    {{store_output(("idx_m", "idx_n"), "acc", "mask", val_shape=("BLOCK_M", "BLOCK_N"))}}
"""


def block_gemm_extern(xq, xs, qweight, wscale, bias=None, *, out_dtype, backend="auto", block_size=_BLOCK):
    """What a compiled graph calls for an extern choice: xq[M, K] fp8, xs[M, nK] (or a static
    scale) -> y[M, N]. ``backend`` "auto" dispatches on the real M at run time; "cublas",
    "triton", "deepgemm" pin one. Shapes were checked at trace time by the op's fake."""
    if not xq.is_cuda:
        return torch.ops.fp8fx.block_gemm.default(xq, xs, qweight, wscale, bias, list(block_size), out_dtype)
    if backend == "auto":
        return kernels.block_gemm_cuda(xq, xs, qweight, wscale, bias, block_size, out_dtype)
    from fp8fx.kernels import dispatch

    with dispatch.preference(backend):
        return kernels.block_gemm_cuda(xq, xs, qweight, wscale, bias, block_size, out_dtype)


@functools.cache
def _extern_choice():
    from torch._inductor.select_algorithm import ExternKernelChoice

    return ExternKernelChoice(block_gemm_extern, name="fp8fx_block_gemm", has_out_variant=False)


@functools.cache
def _template():
    from torch._inductor.kernel.mm_common import mm_grid
    from torch._inductor.select_algorithm import TritonTemplate

    return TritonTemplate(name="fp8fx_block_gemm", grid=mm_grid, source=_TEMPLATE_SOURCE)


def _static_int(expr) -> Optional[int]:
    try:
        return int(expr)
    except TypeError:
        return None


def _max_autotune() -> bool:
    from torch._inductor import config

    return bool(config.max_autotune or config.max_autotune_gemm)


def _contiguous(t):
    from torch._inductor import ir

    return ir.ExternKernel.require_contiguous(ir.ExternKernel.realize_input(t))


def _act_inputs(xq, xs):
    """The quantized activations as the GEMM externs read them: xq[..., K] -> [M, K]
    row-major, xs[..., nK] -> [M, nK] column-major (or a static scale as is). Returns
    (xq2, xs2, lead, M, K, static_act)."""
    from torch._inductor import ir
    from torch._inductor.lowering import lowerings

    reshape = lowerings[torch.ops.aten.reshape.default]
    *lead, k = xq.get_size()
    m = functools.reduce(lambda a, b: a * b, lead, 1)
    static_act = len(xs.get_size()) == 0 or len(xs.get_size()) != len(xq.get_size())
    xq2 = _contiguous(reshape(xq, [m, k]))
    if static_act:
        xs2 = ir.ExternKernel.realize_input(xs)
    else:
        # Column-major [M, nK]: the fused quant kernel writes xs [*lead, nK] with nK outermost,
        # once for every GEMM that reads it (q/k/v, gate/up), and each reads a strided view.
        order = [len(lead) - 1 - i for i in range(len(lead))] + [len(lead)]
        xs2 = ir.ExternKernel.require_stride_order(ir.ExternKernel.realize_input(xs), order)
        if len(lead) > 1:  # a strided view [M, nK] of that buffer, no copy
            xs2 = ir.ExternKernel.require_stride_order(ir.ExternKernel.realize_input(reshape(xs2, [m, xs.get_size()[-1]])), [0, 1])
    return xq2, xs2, lead, m, k, static_act


def _weight_lists(operands, bias_slots):
    """The flattened (qweights, wscales, present biases) of a cat extern call -> three lists;
    ``bias_slots[i]`` says whether weight i has a bias."""
    count = len(bias_slots)
    present = iter(operands[2 * count:])
    return list(operands[:count]), list(operands[count:2 * count]), [next(present) if has else None for has in bias_slots]


def block_gemm_cat_extern(xq, xs, *operands, out_dtype, block_size, bias_slots):
    """What a compiled graph calls for fp8fx.block_gemm_cat: ``operands`` are the qweights,
    then their scales, then the biases that exist, flattened for the wrapper."""
    ws, ss, bs = _weight_lists(operands, bias_slots)
    if not xq.is_cuda:
        return torch.ops.fp8fx.block_gemm_cat.default(xq, xs, ws, ss, bs, list(block_size), out_dtype)
    return kernels.block_gemm_cat_cuda(xq, xs, ws, ss, bs, block_size, out_dtype)


def linear_cat_extern(x, *operands, block_size, bias_slots):
    """What a compiled graph calls for fp8fx.linear_cat (operands as block_gemm_cat_extern's)."""
    ws, ss, bs = _weight_lists(operands, bias_slots)
    if not x.is_cuda:
        return torch.ops.fp8fx.linear_cat.default(x, ws, ss, bs, list(block_size))
    return kernels.linear_cat_cuda(x, ws, ss, bs, block_size)


@functools.cache
def _cat_extern_choice():
    from torch._inductor.select_algorithm import ExternKernelChoice

    return ExternKernelChoice(block_gemm_cat_extern, name="fp8fx_block_gemm_cat", has_out_variant=False)


@functools.cache
def _linear_cat_extern_choice():
    from torch._inductor.select_algorithm import ExternKernelChoice

    return ExternKernelChoice(linear_cat_extern, name="fp8fx_linear_cat", has_out_variant=False)


def _weight_operands(qweights, wscales, biases):
    return [_contiguous(t) for t in (*qweights, *wscales, *(b for b in biases if b is not None))]


def _block_gemm_cat(xq, xs, qweights, wscales, biases, block_size, out_dtype):
    """fp8fx.block_gemm_cat (the pass emits it for decode-sized static M only): the extern,
    which takes one gemv_cat launch on CUDA."""
    from torch._inductor import ir
    from torch._inductor.lowering import lowerings

    counters["fp8fx"]["block_gemm_cat_lowered"] += 1
    xq2, xs2, lead, m, _, _ = _act_inputs(xq, xs)
    n = sum(w.get_size()[0] for w in qweights)
    layout = ir.FixedLayout(xq.get_device(), out_dtype, [m, n])
    node = _cat_extern_choice().bind(
        [xq2, xs2, *_weight_operands(qweights, wscales, biases)], layout, out_dtype=out_dtype,
        block_size=list(block_size), bias_slots=[b is not None for b in biases],
    ).output_node()
    return lowerings[torch.ops.aten.reshape.default](node, [*lead, n])


def _linear_cat(x, qweights, wscales, biases, block_size):
    """fp8fx.linear_cat (the pass emits it for decode-sized static M only): the extern, which
    takes one gemv_cat launch quantizing x in the kernel on CUDA. x is realized as [M, K]
    row-major in its own dtype: its producer (RMSNorm, SiLU * mul, the attention output)
    writes it as it would for a bf16 GEMM, and no quant kernel runs in between."""
    from torch._inductor import ir
    from torch._inductor.lowering import lowerings

    counters["fp8fx"]["linear_cat_lowered"] += 1
    *lead, k = x.get_size()
    m = functools.reduce(lambda a, b: a * b, lead, 1)
    x2 = _contiguous(lowerings[torch.ops.aten.reshape.default](x, [m, k]))
    n = sum(w.get_size()[0] for w in qweights)
    layout = ir.FixedLayout(x.get_device(), x.get_dtype(), [m, n])
    node = _linear_cat_extern_choice().bind(
        [x2, *_weight_operands(qweights, wscales, biases)], layout, block_size=list(block_size),
        bias_slots=[b is not None for b in biases],
    ).output_node()
    return lowerings[torch.ops.aten.reshape.default](node, [*lead, n])


def _block_gemm(xq, xs, qweight, wscale, bias, block_size, out_dtype):
    from torch._inductor import ir
    from torch._inductor.lowering import lowerings
    from torch._inductor.select_algorithm import autotune_select_algorithm

    from fp8fx import reference
    from fp8fx.kernels import cublas, dispatch

    counters["fp8fx"]["block_gemm_lowered"] += 1
    reshape = lowerings[torch.ops.aten.reshape.default]
    xq2, xs2, lead, m, k, static_act = _act_inputs(xq, xs)
    n = qweight.get_size()[0]
    device = xq.get_device()
    extern = _extern_choice()
    qweight, wscale = (_contiguous(t) for t in (qweight, wscale))
    if bias is not None:
        bias = _contiguous(bias)
    inputs = [xq2, xs2, qweight, wscale] + ([bias] if bias is not None else [])
    layout = ir.FixedLayout(device, out_dtype, [m, n])
    kw = dict(out_dtype=out_dtype, block_size=list(block_size))

    def finish(node):
        return reshape(node, [*lead, n])

    k_int, n_int, m_int = _static_int(k), _static_int(n), _static_int(m)
    template_ok = (
        device.type == "cuda"
        and list(block_size) == _BLOCK
        and not static_act
        and k_int is not None and k_int % 16 == 0
        and n_int is not None
        and out_dtype in (torch.bfloat16, torch.float16, torch.float32)
        and wscale.get_dtype() in (torch.float32, reference.E8M0_DTYPE)
    )
    cublas_ok = template_ok and m_int is not None and m_int % 4 == 0 and cublas.supports(k_int, out_dtype)

    def template_choice(choices, cfg):
        try:
            _template().maybe_append_choice(
                choices, input_nodes=inputs, layout=layout, num_stages=cfg.num_stages, num_warps=cfg.num_warps,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=128, GROUP_M=cfg.group_m, HAS_BIAS=bias is not None,
                B_SCALE_E8M0=wscale.get_dtype() == reference.E8M0_DTYPE,
            )
        except Exception as e:  # an Inductor that cannot generate it: the externs remain
            counters["fp8fx"]["block_gemm_template_failed"] += 1
            log.warning("fp8fx: the block-FP8 Triton template was not generated (%s: %s); using the extern", type(e).__name__, e)

    if not template_ok:
        return finish(extern.bind(inputs, layout, **kw).output_node())

    if _max_autotune():
        counters["fp8fx"]["block_gemm_autotuned"] += 1
        choices = [extern.bind(inputs, layout, backend="auto", **kw)]
        if m_int is None or m_int > 0:
            for cfg in template_configs():
                template_choice(choices, cfg)
            choices.append(extern.bind(inputs, layout, backend="triton", **kw))
        if cublas_ok:
            choices.append(extern.bind(inputs, layout, backend="cublas", **kw))
        from fp8fx.kernels import deepgemm

        if m_int is not None and deepgemm.supports(m_int, n_int, k_int, out_dtype, torch.device(device)):
            choices.append(extern.bind(inputs, layout, backend="deepgemm", **kw))
        return finish(autotune_select_algorithm("fp8fx_block_gemm", choices, inputs, layout))

    # Default: the measured table's choice at a static M (as the run-time dispatch would take).
    if m_int is not None and m_int > 0:
        from fp8fx.kernels.block_gemm import num_sms, pick_split_k

        choice = dispatch.choose(m_int, n_int, k_int, out_dtype, torch.device(device))
        if choice == "triton":
            cfg = dispatch.triton_config(m_int, n_int, k_int)
            if pick_split_k(m_int, n_int, k_int, cfg, num_sms(torch.device(device))) == 1:
                choices = []
                template_choice(choices, cfg)
                if choices:
                    counters["fp8fx"]["block_gemm_template_default"] += 1
                    return finish(autotune_select_algorithm("fp8fx_block_gemm", choices, inputs, layout))
        elif choice == "cublas" and cublas_ok:
            counters["fp8fx"]["block_gemm_cublas_default"] += 1
            return finish(extern.bind(inputs, layout, backend="cublas", **kw).output_node())
    return finish(extern.bind(inputs, layout, **kw).output_node())


def rms_norm_quant_extern(x, residual, weight, eps_tensor, eps, ue8m0):
    """What a compiled graph calls for fp8fx::rms_norm_quant: on CUDA, the kernel's wrapper
    itself, without the dispatcher and the argument checks the op's fake already made at
    trace time (a compiled prefill makes this call for every fused RMSNorm, on the host's
    critical path; see ``_fallback_to_extern``); elsewhere the op."""
    if not x.is_cuda:
        return torch.ops.fp8fx.rms_norm_quant.default(x, residual, weight, eps_tensor, eps, ue8m0)
    from fp8fx.kernels import norm_quant

    return norm_quant.rms_norm_quant(x, residual, weight, eps if eps_tensor is None else eps_tensor.item(), ue8m0)


def rms_norm_linear_cat_extern(x, residual, weight, eps_tensor, eps, qweights, wscales, biases, block_size):
    """What a compiled graph calls for fp8fx::rms_norm_linear_cat (as rms_norm_quant_extern)."""
    if not x.is_cuda:
        return torch.ops.fp8fx.rms_norm_linear_cat.default(x, residual, weight, eps_tensor, eps, qweights, wscales,
                                                           biases, block_size)
    eps = eps if eps_tensor is None else eps_tensor.item()
    return kernels.rms_norm_linear_cat_cuda(x, residual, weight, eps, qweights, wscales, biases, block_size)


def silu_mul_linear_cat_extern(gate, up, qweights, wscales, biases, block_size):
    """What a compiled graph calls for fp8fx::silu_mul_linear_cat (as rms_norm_quant_extern)."""
    if not gate.is_cuda:
        return torch.ops.fp8fx.silu_mul_linear_cat.default(gate, up, qweights, wscales, biases, block_size)
    return kernels.silu_mul_linear_cat_cuda(gate, up, qweights, wscales, biases, block_size)


@functools.cache
def _fallback_externs() -> dict:
    """op -> the extern its fallback calls (registered in extern_kernels by ExternKernelChoice)."""
    from torch._inductor.select_algorithm import ExternKernelChoice

    externs = (rms_norm_quant_extern, rms_norm_linear_cat_extern, silu_mul_linear_cat_extern)
    return {getattr(torch.ops.fp8fx, fn.__name__.removesuffix("_extern")).default:
            ExternKernelChoice(fn, name=f"fp8fx_{fn.__name__.removesuffix('_extern')}", has_out_variant=False)
            for fn in externs}


def _fallback_to_extern(op):
    """A lowering of ``op``: Inductor's fallback (its multi-output and list-argument handling),
    calling ``extern_kernels.<name>`` (_fallback_externs) instead of ``torch.ops.fp8fx.<op>``:
    no dispatcher and no argument checks per call (the op's fake made them at trace time)."""

    def lower(*args):
        from torch._inductor import ir
        from torch._inductor.lowering import fallback_handler

        outs = fallback_handler(op, add_to_fallback_set=False)(*args)
        node = outs[0] if isinstance(outs, (list, tuple)) else outs
        while not isinstance(node, (ir.MultiOutput, ir.FallbackKernel)) and hasattr(node, "data"):  # TensorBox / StorageBox
            node = node.data
        kernel = node.inputs[0] if isinstance(node, ir.MultiOutput) else node
        if isinstance(kernel, ir.FallbackKernel):  # otherwise the dispatcher's call stays
            kernel.python_kernel_name = f"extern_kernels.{_fallback_externs()[op].name}"
        return outs

    return lower


@functools.cache
def register() -> None:
    """Install the lowerings of the GEMM and norm ops and, on CUDA, the fp8fx kernels (once per process)."""
    from torch._inductor.lowering import lowerings, register_lowering

    op = torch.ops.fp8fx.block_gemm.default
    _extern_choice()  # the generated code (and a cached one) names extern_kernels.fp8fx_block_gemm
    _cat_extern_choice()
    _linear_cat_extern_choice()
    _fallback_externs()
    if op not in lowerings:
        register_lowering(op, type_promotion_kind=None)(_block_gemm)
    if torch.ops.fp8fx.block_gemm_cat.default not in lowerings:
        register_lowering(torch.ops.fp8fx.block_gemm_cat.default, type_promotion_kind=None)(_block_gemm_cat)
    if torch.ops.fp8fx.linear_cat.default not in lowerings:
        register_lowering(torch.ops.fp8fx.linear_cat.default, type_promotion_kind=None)(_linear_cat)
    for fallback_op in _fallback_externs():
        if fallback_op not in lowerings:
            register_lowering(fallback_op, type_promotion_kind=None)(_fallback_to_extern(fallback_op))
    if torch.cuda.is_available():
        kernels.register()
