"""CUDA kernels and extern adapters for the fp8fx:: ops.

    act_quant.py   Triton activation quant (dynamic 1x128, static per tensor)
    block_gemm.py  Triton block-FP8 GEMM (split-K for small M, in-loop activation quant)
    cublas.py      torch._scaled_mm blockwise extern and its scale layouts
    deepgemm.py    DeepGEMM extern (when it loads) and its scale layouts
    gemv.py        Triton small-M (decode) GEMM streaming the weights, activation quant fused
    grouped_gemm.py  Triton grouped (MoE) block-FP8 GEMM, contiguous layout
    grouped_masked.py  Triton grouped GEMM, masked layout (per-expert padded batches)
    norm_quant.py  Triton (residual add +) RMSNorm + activation quant, one pass per row
    topk.py        Triton top-k over short rows (MoE routing), one launch
    dispatch.py    backend and config per shape class, from measurements
    bench.py       ``python -m fp8fx bench gemm``

``register()`` installs the CUDA implementations into ``fp8fx.ops._cuda_impl``; importing this
package does no work.
"""

from __future__ import annotations

import sys
import weakref

import torch

__all__ = [
    "register",
    "linear_cuda",
    "act_quant_cuda",
    "block_gemm_cuda",
    "block_gemm_cat_cuda",
    "linear_cat_cuda",
    "rms_norm_linear_cat_cuda",
    "silu_mul_linear_cat_cuda",
    "grouped_linear_cuda",
    "expert_linear_cuda",
    "prepared_weight_scale",
]

_BLOCK = [128, 128]


def _check_cuda(*tensors) -> None:
    for t in tensors:
        if t is not None and not t.is_cuda:
            raise RuntimeError(f"fp8fx: CUDA kernels got a tensor on {t.device}; move all inputs to one CUDA device")


# (The op implementations are named *_cuda so they never shadow the submodules.)

# Kernel-ready weight scales, built once per (weight scale tensor, backend) and reused while
# that tensor lives and is not modified in place.
_PREPARED: dict[tuple[int, str], tuple[weakref.ref, int, torch.Tensor]] = {}


def prepared_weight_scale(wscale: torch.Tensor, n: int, backend: str) -> torch.Tensor:
    key = (id(wscale), backend)
    # Inference tensors (made under torch.inference_mode) have no version counter.
    version = None if wscale.is_inference() else wscale._version
    hit = _PREPARED.get(key)
    if hit is not None and hit[0]() is wscale and hit[1] == version:
        return hit[2]
    from fp8fx.kernels import cublas, deepgemm

    if backend == "cublas":
        prepared = cublas.prepare_weight_scale(wscale)
    else:
        prepared = deepgemm.prepare_weight_scale(wscale, n, torch.cuda.get_device_capability(wscale.device)[0])
    ref = weakref.ref(wscale, lambda _, key=key: _PREPARED.pop(key, None))
    _PREPARED[key] = (ref, version, prepared)
    return prepared


def _gemm_extern(backend, xq, xs, qweight, wscale, bias, out_dtype, m):
    """xq[Mp, K] / xs[Mp, nK] column-major (Mp = M padded to 4) -> y[m, N] through an extern."""
    from fp8fx.kernels import cublas, deepgemm

    prepared = prepared_weight_scale(wscale, qweight.shape[0], backend)
    if backend == "cublas":
        return cublas.gemm(xq, xs, qweight, prepared, bias, out_dtype, m)
    return deepgemm.gemm(xq[:m], xs[:m], qweight, prepared, bias, out_dtype)


def linear_cuda(x, qweight, wscale, bias, act_scale, block_size):
    """CUDA fp8fx::linear: x[..., K] -> y[..., N] in x's dtype."""
    from fp8fx import reference
    from fp8fx.kernels import dispatch
    from fp8fx.kernels.act_quant import act_quant as quant, act_quant_static
    from fp8fx.kernels.block_gemm import block_gemm as gemm

    _check_cuda(x, qweight, wscale, bias, act_scale)
    if list(block_size) != _BLOCK:
        return reference.linear(x, qweight, wscale, bias, act_scale, tuple(block_size))
    n, k = qweight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*lead, n)
    if k % 16:
        raise ValueError(f"fp8fx linear: K must be a multiple of 16 for fp8 tensor cores, got {k}")
    x2 = x2.contiguous()
    ue8m0 = wscale.dtype == reference.E8M0_DTYPE
    static = act_scale is not None
    backend = dispatch.choose(m, n, k, x.dtype, x.device, fused_quant=True, static_act=static)
    if backend == "gemv":  # small M: one launch, activation quant (dynamic or static) fused
        from fp8fx.kernels.gemv import gemv

        y = gemv(x2, act_scale, qweight, wscale, bias, x.dtype, act_ue8m0=ue8m0)
    elif static:
        y = gemm(act_quant_static(x2, act_scale), act_scale, qweight, wscale, bias, x.dtype)
    elif backend == "triton_fused":
        y = gemm(x2, None, qweight, wscale, bias, x.dtype, act_ue8m0=ue8m0)
    elif backend == "triton":
        xq, xs = quant(x2, ue8m0)
        y = gemm(xq, xs, qweight, wscale, bias, x.dtype)
    else:
        xq, xs = quant(x2, ue8m0, col_major=True, pad_rows=4)
        y = _gemm_extern(backend, xq, xs, qweight, wscale, bias, x.dtype, m)
    return y.reshape(*lead, n)


def act_quant_cuda(x, group_size, ue8m0):
    """CUDA fp8fx::act_quant: row-major q[..., K] fp8, s[..., nK] fp32."""
    from fp8fx import reference
    from fp8fx.kernels.act_quant import act_quant as quant

    _check_cuda(x)
    if group_size < 16 or group_size & (group_size - 1):
        return reference.quantize_act(x, group_size, "ue8m0" if ue8m0 else "float32")
    return quant(x, ue8m0, group_size)


# The cuBLAS calls a compiled prefill graph repeats. Per (id of the weight's codes, or of the
# first packed weight's, M, out dtype, kernel preference): what the call needs once a first
# call went through every check on the cuBLAS route with aligned rows and no bias: (weak
# references to the weight tensors (codes then scales), their data pointers, weak references
# to the codes and scale tensors the GEMM reads (the joint views of a packed group), the
# scale's version, the prepared scale, the scale blocks per row). A next call on the same
# tensors (same objects and addresses, scale not modified in place) with activations in the
# checked layout is one torch._scaled_mm. The GEMM wrapper's Python runs once per GEMM per
# forward, on the host's critical path at prefill. An entry goes when a weight tensor does.
_PLANS: dict[tuple, tuple] = {}
_MAX_ROUTES = 1 << 14


def _planned_gemm(members, xq, xs, out_dtype):
    """torch._scaled_mm on the recorded plan for the weight tensors ``members``, else None.
    (No imports here: a plan is only recorded once dispatch is loaded.)"""
    if not _PLANS or xq.dim() != 2:
        return None
    m = xq.shape[0]
    plan = _PLANS.get((id(members[0]), m, out_dtype, sys.modules["fp8fx.kernels.dispatch"]._preference))
    if plan is None:
        return None
    refs, ptrs, codes_ref, scale_ref, version, scale_b, nk = plan
    if len(refs) != len(members):
        return None
    for ref, t in zip(refs, members):
        if ref() is not t:
            return None
    codes, scale = codes_ref(), scale_ref()
    if codes is None or scale is None or tuple(map(torch.Tensor.data_ptr, members)) != ptrs:
        return None
    if version is not None and scale._version != version:
        return None
    # The layout the plan's first call was checked for: xq [M, K] row-major fp8, xs [M, nK]
    # fp32 column-major (the compiled graph's quant writes it so).
    if xs.shape != (m, nk) or xs.stride() != (1, m) or xs.dtype != torch.float32 or not xs.is_cuda:
        return None
    if xq.shape[1] != codes.shape[1] or xq.dtype != codes.dtype or not xq.is_contiguous():
        return None
    return torch._scaled_mm(xq, codes.t(), scale_a=xs, scale_b=scale_b, out_dtype=out_dtype)


def _cache_entry(cache: dict, key, members, value) -> None:
    """cache[key] = (weak references to ``members``, *value); the entry goes when one of them does."""
    if len(cache) >= _MAX_ROUTES:
        cache.clear()
    drop = lambda _, key=key: cache.pop(key, None)  # noqa: E731
    cache[key] = ([weakref.ref(t, drop) for t in members], *value)


def _record_plan(members, m, codes, scale, out_dtype):
    from fp8fx.kernels import dispatch

    version = None if scale.is_inference() else scale._version
    prepared = prepared_weight_scale(scale, codes.shape[0], "cublas")
    _cache_entry(_PLANS, (id(members[0]), m, out_dtype, dispatch._preference), members,
                 (tuple(t.data_ptr() for t in members), weakref.ref(codes), weakref.ref(scale), version, prepared,
                  scale.shape[1]))


def block_gemm_cuda(xq, xs, qweight, wscale, bias, block_size, out_dtype, plan=None):
    """CUDA fp8fx::block_gemm: xq[..., K] fp8 with xs[..., nK] (or a scalar) -> y[..., N].
    ``plan``: the weight tensors a cuBLAS plan is recorded for (default: qweight, wscale)."""
    if bias is None:
        y = _planned_gemm((qweight, wscale), xq, xs, out_dtype)
        if y is not None:
            return y
    from fp8fx import reference
    from fp8fx.kernels import cublas, dispatch
    from fp8fx.kernels.block_gemm import block_gemm as gemm
    from fp8fx.kernels.host import cdiv

    _check_cuda(xq, xs, qweight, wscale, bias)
    n, k = qweight.shape
    lead = xq.shape[:-1]
    if list(block_size) != _BLOCK:
        y = reference.dequantize_act(xq, xs, block_size[1]) @ reference.dequantize_weight(qweight, wscale, tuple(block_size)).t()
        return (y if bias is None else y + bias.float()).to(out_dtype)
    xq2 = xq.reshape(-1, k)
    m = xq2.shape[0]
    if m == 0:
        return xq.new_empty(*lead, n, dtype=out_dtype)
    static = xs.numel() == 1 and xs.dim() <= 1 or xs.dim() == 0
    xs2 = xs if static else xs.reshape(m, -1)
    backend = dispatch.choose(m, n, k, out_dtype, xq.device, static_act=static)
    if backend == "gemv":  # small M: reads the fp8 codes and [M, nK] scales in any layout
        from fp8fx.kernels.gemv import gemv

        y = gemv(xq2, xs2, qweight, wscale, bias, out_dtype)
    elif backend == "triton":
        y = gemm(xq2, xs2, qweight, wscale, bias, out_dtype)
    else:
        # The extern needs rows padded to 4 and column-major scales: a per-call copy here,
        # which fp8fx::linear avoids by quantizing straight into that layout. Aligned M
        # (prefill) copies only the [M, nK] scales.
        mp = cdiv(m, cublas.M_ALIGN) * cublas.M_ALIGN
        if mp == m:
            if backend == "cublas" and bias is None and xq.dim() == 2 and not static:
                _record_plan(plan or (qweight, wscale), m, qweight, wscale, out_dtype)
            xq_p = xq2.contiguous()
            xs_p = xs2.t().contiguous()
        else:
            xq_p = xq2.new_zeros(mp, k)
            xq_p[:m] = xq2
            xs_p = torch.ones(xs2.shape[1], mp, dtype=torch.float32, device=xs2.device)
            xs_p[:, :m] = xs2.t()
        y = _gemm_extern(backend, xq_p, xs_p.t(), qweight, wscale, bias, out_dtype, m)
    return y.reshape(*lead, n)


def _cat_rows(x, qweights, biases, block_size, out_dtype, **route) -> int:
    """Rows M of x[..., K] when the GEMMs of x with ``qweights`` run as one gemv_cat launch
    (128 x 128 blocks, at most MAX_CAT weights, all or no biases, and dispatch.cat_takes_gemv
    at M, with ``route``: static_act / fused_quant), else 0."""
    from fp8fx.kernels import dispatch
    from fp8fx.kernels.gemv import MAX_CAT

    k = x.shape[-1]
    m = x.numel() // k if k else 0
    ok = (
        list(block_size) == _BLOCK and m > 0 and len(qweights) <= MAX_CAT and len({b is None for b in biases}) == 1
        and dispatch.cat_takes_gemv(m, tuple(w.shape[0] for w in qweights), k, out_dtype, x.device, **route)
    )
    return m if ok else 0


# Packed weight lists (api.pack_projections) -> (codes, scales) spanning them, used while every
# member lives at the address it had: (weakrefs, data pointers, joint codes, joint scales). The
# joint views hold the packed buffer, not the members; an entry goes when a member does.
_JOINT: dict[tuple[int, ...], tuple[list, tuple[int, ...], torch.Tensor, torch.Tensor]] = {}


def _joint_weight(qweights, wscales):
    """One [sum N, K] codes tensor and one scales tensor over ``qweights`` / ``wscales`` when
    each list is back-to-back row ranges of one buffer (api.pack_projections made them so),
    else None. The views are cached per list, so the GEMM's route and prepared scale caches
    see one tensor every call."""
    members = (*qweights, *wscales)
    key = tuple(map(id, members))
    ptrs = tuple(t.data_ptr() for t in members)
    hit = _JOINT.get(key)
    if hit is not None and hit[1] == ptrs and all(r() is t for r, t in zip(hit[0], members)):
        return hit[2], hit[3]
    from fp8fx.api import packed_rows

    if not (packed_rows(list(qweights)) and packed_rows(list(wscales))):
        return None
    k, nk = qweights[0].shape[1], wscales[0].shape[1]
    n, ns = sum(w.shape[0] for w in qweights), sum(s.shape[0] for s in wscales)
    codes, scales = qweights[0].as_strided((n, k), (k, 1)), wscales[0].as_strided((ns, nk), (nk, 1))
    _cache_entry(_JOINT, key, members, (ptrs, codes, scales))
    return codes, scales


def block_gemm_cat_cuda(xq, xs, qweights, wscales, biases, block_size, out_dtype):
    """CUDA fp8fx::block_gemm_cat: one gemv_cat launch when the weights fit one (_cat_rows,
    decode); else one GEMM over packed weights (api.pack_projections; prefill); otherwise
    block_gemm per weight, concatenated."""
    members = (*qweights, *wscales)
    no_bias = all(b is None for b in biases)
    if no_bias:
        # A packed group this M already took to cuBLAS (a prefill's second call on): its plan,
        # recorded on a call that went through the checks below, skips them.
        y = _planned_gemm(members, xq, xs, out_dtype)
        if y is not None:
            return y
    joint = _joint_weight(qweights, wscales) if no_bias else None
    from fp8fx.kernels.gemv import gemv_cat

    _check_cuda(xq, xs, *qweights, *wscales, *biases)
    static = xs.numel() == 1 and xs.dim() <= 1 or xs.dim() == 0
    m = _cat_rows(xq, qweights, biases, block_size, out_dtype, static_act=static)
    if not m:
        if joint is not None:
            return block_gemm_cuda(xq, xs, *joint, None, block_size, out_dtype, plan=members)
        return torch.cat([block_gemm_cuda(xq, xs, w, s, b, block_size, out_dtype)
                          for w, s, b in zip(qweights, wscales, biases)], -1)
    y = gemv_cat(xq.reshape(m, -1), xs if static else xs.reshape(m, -1), qweights, wscales, biases, out_dtype)
    return y.reshape(*xq.shape[:-1], -1)


def linear_cat_cuda(x, qweights, wscales, biases, block_size):
    """CUDA fp8fx::linear_cat: one gemv_cat launch quantizing x in the kernel when the weights
    fit one on the linear route (_cat_rows, decode); otherwise linear per weight (which
    refuses K not a multiple of 16 with its own error)."""
    from fp8fx import reference
    from fp8fx.kernels.gemv import gemv_cat

    _check_cuda(x, *qweights, *wscales, *biases)
    m = _cat_rows(x, qweights, biases, block_size, x.dtype, fused_quant=True) if x.shape[-1] % 16 == 0 else 0
    if not m:
        return torch.cat([linear_cuda(x, w, s, b, None, block_size) for w, s, b in zip(qweights, wscales, biases)], -1)
    ue8m0 = wscales[0].dtype == reference.E8M0_DTYPE
    y = gemv_cat(x.reshape(m, -1), None, qweights, wscales, biases, x.dtype, act_ue8m0=ue8m0)
    return y.reshape(*x.shape[:-1], -1)


def rms_norm_linear_cat_cuda(x, residual, weight, eps, qweights, wscales, biases, block_size):
    """CUDA fp8fx::rms_norm_linear_cat -> (y, h): one gemv_cat launch with the RMSNorm (and
    the residual add) in its prologue when the weights fit one on the linear route
    (_cat_rows); otherwise the norm in torch and linear_cat_cuda."""
    from fp8fx import reference
    from fp8fx.kernels.gemv import gemv_cat_rms_norm

    _check_cuda(x, residual, weight, *qweights, *wscales, *biases)
    k = x.shape[-1]
    m = _cat_rows(x, qweights, biases, block_size, x.dtype, fused_quant=True) if k % 16 == 0 else 0
    if not m:
        h = x if residual is None else x + residual
        y = linear_cat_cuda(reference.rms_norm(h, weight, eps), qweights, wscales, biases, block_size)
        return y, h if residual is not None else x.new_empty(0)
    ue8m0 = wscales[0].dtype == reference.E8M0_DTYPE
    y, h = gemv_cat_rms_norm(x.reshape(m, k), None if residual is None else residual.reshape(m, k), weight, eps,
                             qweights, wscales, biases, act_ue8m0=ue8m0)
    return y.reshape(*x.shape[:-1], -1), h.reshape(x.shape) if residual is not None else h


def silu_mul_linear_cat_cuda(gate, up, qweights, wscales, biases, block_size):
    """CUDA fp8fx::silu_mul_linear_cat: one gemv_cat launch forming silu(gate) * up in its
    prologue when the weights fit one on the linear route (_cat_rows); otherwise the product
    in torch and linear_cat_cuda."""
    from fp8fx import reference
    from fp8fx.kernels.gemv import gemv_cat_silu_mul

    _check_cuda(gate, up, *qweights, *wscales, *biases)
    k = gate.shape[-1]
    m = _cat_rows(gate, qweights, biases, block_size, gate.dtype, fused_quant=True) if k % 16 == 0 else 0
    if not m:
        return linear_cat_cuda(torch.nn.functional.silu(gate) * up, qweights, wscales, biases, block_size)
    ue8m0 = wscales[0].dtype == reference.E8M0_DTYPE
    y = gemv_cat_silu_mul(gate.reshape(m, k), up.reshape(m, k), qweights, wscales, biases, act_ue8m0=ue8m0)
    return y.reshape(*gate.shape[:-1], -1)


def grouped_linear_cuda(x, qweight, wscale, offs, act_scale, block_size):
    """CUDA fp8fx::grouped_linear: tokens sorted by expert -> y[T, N] in x's dtype."""
    from fp8fx import reference
    from fp8fx.kernels.grouped_gemm import grouped_linear

    _check_cuda(x, qweight, wscale, offs, act_scale)
    if list(block_size) != _BLOCK:
        return reference.grouped_linear(x, qweight, wscale, offs, act_scale, tuple(block_size))
    return grouped_linear(x.contiguous(), qweight, wscale, offs, act_scale, block_size)


def expert_linear_cuda(x, expert_ids, qweight, wscale, act_scale, block_size):
    """CUDA fp8fx::expert_linear: the gemv kernel reading each row's expert id (dynamic
    activation scales); static scales or other blocks sort the rows and run grouped_linear."""
    from fp8fx.kernels.gemv import expert_gemv
    from fp8fx.moe import sort_by_expert

    _check_cuda(x, expert_ids, qweight, wscale, act_scale)
    if act_scale is None and list(block_size) == _BLOCK:
        ue8m0 = wscale.dtype == torch.float8_e8m0fnu
        return expert_gemv(x.contiguous(), expert_ids, qweight, wscale, act_ue8m0=ue8m0)
    per_token = expert_ids.numel() // max(x.shape[0], 1)
    _, perm, offs = sort_by_expert(expert_ids, qweight.shape[0])
    y = grouped_linear_cuda(x[perm // per_token], qweight, wscale, offs, act_scale, block_size)
    return torch.empty_like(y).index_copy_(0, perm, y)


def register() -> None:
    """Install the CUDA implementations into fp8fx.ops._cuda_impl (idempotent)."""
    from fp8fx import ops
    from fp8fx.kernels.grouped_masked import grouped_linear_masked_cuda
    from fp8fx.kernels.norm_quant import rms_norm_quant
    from fp8fx.kernels.topk import topk

    ops._cuda_impl.update(
        linear=linear_cuda, act_quant=act_quant_cuda, block_gemm=block_gemm_cuda, block_gemm_cat=block_gemm_cat_cuda,
        linear_cat=linear_cat_cuda, grouped_linear=grouped_linear_cuda,
        rms_norm_linear_cat=rms_norm_linear_cat_cuda, silu_mul_linear_cat=silu_mul_linear_cat_cuda,
        expert_linear=expert_linear_cuda, grouped_linear_masked=grouped_linear_masked_cuda, topk=topk,
        rms_norm_quant=rms_norm_quant,
    )
