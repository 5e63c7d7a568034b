"""Split fp8fx::linear so Inductor fuses the activation quantization into its producer.

    y = fp8fx.linear(x, qweight, wscale, bias?, act_scale?, block)
==> (1) split:      xq, s = fp8fx.act_quant(x, 128, ue8m0); y = fp8fx.block_gemm(xq, s, ...)
                    (static act_scale: the aten quant below directly)
    (2) share:      one act_quant per distinct x (q/k/v, gate/up read the same codes)
    (3) group:      prefill (any M): block_gemms of one act_quant whose weights are packed
                    into one buffer (quantize_ packs q/k/v and gate/up) -> one
                    fp8fx.block_gemm_cat, one GEMM over the packed rows, each GEMM a slice;
                    decode (static M at which the concatenated GEMM, or each GEMM alone, takes
                    the gemv route): the block_gemms of one act_quant (q/k/v, gate/up; o and
                    down alone) -> one fp8fx.linear_cat on x, each GEMM a column slice: a
                    gemv launch that quantizes x in the kernel (an M = 1 RMSNorm cannot take
                    the group amax in its own kernel, and the attention output has no
                    Inductor producer: each would need a quant kernel of its own);
                    with quant_in_gemv=False, block_gemm_cat on the codes (two or more GEMMs)
    (4) fuse norms: transformers' RMSNorm (after a residual add or not) feeding an act_quant
                    -> one fp8fx.rms_norm_quant (passes/norm_quant.py; CUDA graphs by default)
    (4b) kernels:   CUDA: the act_quant of silu(g) * u or of the attention output, and the
                    fused norms of (4) -> fp8fx's Triton kernels, which Inductor launches
                    (passes/quant_kernel.py)
    (5) decompose:  act_quant -> the aten ops below
    # dynamic: x[..., K] -> groups [..., G, 128] (K % 128 != 0 keeps fp8fx.act_quant, unfused)
    amax = x.float().abs().amax(-1)                   # per token, per 128-group
    s    = clamp(amax, 1e-12) / 448                   # UE8M0: 2 ** ceil(log2(s)), bit exact
                                                      # (448 as a tensor: no reciprocal on GPU)
    xq   = (x.float() / s).clamp(-448, 448).to(float8_e4m3fn)
    # static: xq = (x.float() / act_scale).clamp(-448, 448).to(float8_e4m3fn); s = act_scale
    y = fp8fx.block_gemm(xq, s, qweight, wscale, bias?, block, x.dtype)
    (6) prologues:  decode: the RMSNorm (+ residual add) or silu(g) * u feeding a linear_cat
                    -> one gemv launch with the producer in its prologue (passes/prologue.py)

The quantization is plain aten pointwise/reduction ops, so Inductor's scheduler fuses it
into the kernel that produces x (RMSNorm, SiLU * mul, residual add, a cast) and no
standalone quant kernel runs. The math is reference.quantize_act's, op for op: division
by the scale (never multiplication by its reciprocal), so the fp8 codes are bit-identical.

Legend: T tokens (any leading dims), K in_features, G = K / 128 groups.
Counters (torch._dynamo.utils.counters["fp8fx"]): linear, linear_bias, linear_static,
linear_static_bias, act_quant_shared, linear_cat and block_gemm_cat (one per group),
linear_cat_members, block_gemm_cat_members, act_quant_decomposed, act_quant_partial_group_kept.
"""

from __future__ import annotations

import functools
import math
import operator
from collections import defaultdict

import torch
from torch._dynamo.utils import counters
from torch._inductor.pattern_matcher import CallFunction, KeywordArg, Match, PatternMatcherPass, register_graph_pattern

from fp8fx import ops  # noqa: F401  (registers torch.ops.fp8fx.*)
from fp8fx import reference

__all__ = ["COUNTER", "group_gemms", "quantize_act_decomposed", "rewrite", "share_act_quant", "split_linear"]

COUNTER = "fp8fx"
_FP8 = reference.FP8_DTYPE
_FP8_MAX = reference.FP8_MAX


def quantize_act_decomposed(x: torch.Tensor, group_size: int, ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.quantize_act in fusable aten ops: x[..., K] -> (q[..., K] fp8, s[..., G] fp32).

    K must be a multiple of ``group_size``: with a partial last group, Inductor's CPU loop
    fusion of the [..., K] quotient with the [..., G, 128] amax reduction (torch 2.13) drops
    the columns past the last whole group, so the pass leaves such inputs to fp8fx.act_quant.
    """
    lead, k = x.shape[:-1], x.shape[-1]
    groups = k // group_size
    xg = x.float().reshape(*lead, groups, group_size)  # [..., G, 128]
    amax = xg.abs().amax(dim=-1).clamp(min=reference.AMAX_EPS)  # [..., G]
    # amax / 448, divided by a tensor equal to 448 rather than the literal: Inductor's GPU
    # lowering turns division by a constant into multiplication by its (inexact) reciprocal,
    # which moves some scales by 1 ulp. clamp(amax, 448, 448) is 448 for any non-NaN amax.
    s = amax / amax.clamp(_FP8_MAX, _FP8_MAX)
    if ue8m0:
        s = reference._pow2_ceil(s)
    # q is computed on the [..., G, 128] grid of the amax reduction, so Inductor can emit the
    # quotient in the reducing kernel itself (Triton: one persistent reduction per group);
    # passes/lowering.py realizes the viewed result once for all GEMMs that read it.
    q = (xg / s.unsqueeze(-1)).clamp(-_FP8_MAX, _FP8_MAX).to(_FP8)
    return q.reshape(*lead, k), s


def _val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _is_hp_tensor(node) -> bool:
    v = _val(node)
    return isinstance(v, torch.Tensor) and v.dtype in (torch.float32, torch.float16, torch.bfloat16)


def _call(graph: torch.fx.Graph, target, *args, **kwargs) -> torch.fx.Node:
    """A new node with a valid meta["val"]: ``target`` run on the arguments' fake values."""
    from torch._inductor.virtualized import V

    node = graph.call_function(target, args, kwargs)
    fake = lambda n: n.meta["val"]  # noqa: E731
    with V.fake_mode:
        node.meta["val"] = target(*torch.fx.map_arg(args, fake), **torch.fx.map_arg(kwargs, fake))
    return node


def _linear_ok(node: torch.fx.Node) -> bool:
    # Guard clauses: leave anything we cannot reason about to fp8fx::linear itself.
    x, qweight, wscale, bias, act_scale, block_size = node.args
    if not _is_hp_tensor(x):
        return False
    if not isinstance(_val(qweight), torch.Tensor) or _val(qweight).dim() != 2 or not isinstance(_val(wscale), torch.Tensor):
        return False
    return isinstance(block_size, (list, tuple)) and len(block_size) == 2


def _counter_name(bias, act_scale) -> str:
    name = "linear_static" if act_scale is not None else "linear"
    return name + ("_bias" if bias is not None else "")


def split_linear(graph: torch.fx.Graph) -> None:
    """fp8fx.linear -> fp8fx.act_quant (dynamic) or the static aten quant, + fp8fx.block_gemm.

    A direct rewrite, not a registered pattern: Inductor's pattern matcher skips nodes with
    an input dtype it cannot generate code for (fallback_node_due_to_unsupported_type), and
    float8_e8m0fnu weight scales are one.
    """
    aten, prims = torch.ops.aten, torch.ops.prims
    for node in graph.find_nodes(op="call_function", target=torch.ops.fp8fx.linear.default):
        if not _linear_ok(node):
            continue
        x, qweight, wscale, bias, act_scale, block_size = node.args
        block_size = list(block_size)
        with graph.inserting_before(node):
            if act_scale is None:
                ue8m0 = _val(wscale).dtype == reference.E8M0_DTYPE
                quant = _call(graph, torch.ops.fp8fx.act_quant.default, x, block_size[1], ue8m0)
                xq, xs = (_call(graph, operator.getitem, quant, i) for i in (0, 1))
            else:
                # reference.quantize_act_static: (x.float() / s).clamp(-448, 448).to(fp8)
                xs = act_scale
                if _val(xs).dtype != torch.float32:
                    xs = _call(graph, prims.convert_element_type.default, xs, torch.float32)
                if _val(xs).dim() != 0:
                    xs = _call(graph, aten.view.default, xs, [])
                xf = _call(graph, prims.convert_element_type.default, x, torch.float32)
                xq = _call(graph, aten.div.Tensor, xf, xs)
                xq = _call(graph, aten.clamp_min.default, xq, -_FP8_MAX)
                xq = _call(graph, aten.clamp_max.default, xq, _FP8_MAX)
                xq = _call(graph, prims.convert_element_type.default, xq, _FP8)
            gemm = _call(
                graph, torch.ops.fp8fx.block_gemm.default, xq, xs, qweight, wscale, bias, block_size, _val(x).dtype
            )
        gemm.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        node.replace_all_uses_with(gemm)
        graph.erase_node(node)
        counters[COUNTER][_counter_name(bias, act_scale)] += 1


def _act_quant_ok(match: Match) -> bool:
    x, group_size = match.kwargs["x"], match.kwargs["group_size"]
    if not _is_hp_tensor(x) or not isinstance(group_size, int):
        return False
    k = _val(x).shape[-1]
    if isinstance(k, int) and k % group_size == 0:
        return True
    counters[COUNTER]["act_quant_partial_group_kept"] += 1
    return False


def _rewrite_act_quant(match: Match, x, group_size, ue8m0):
    match.replace_by_example(lambda x_: quantize_act_decomposed(x_, group_size, ue8m0), [x])
    counters[COUNTER]["act_quant_decomposed"] += 1


def share_act_quant(graph: torch.fx.Graph) -> None:
    """One fp8fx.act_quant per distinct (x, group_size, ue8m0): q/k/v and gate/up projections
    of one normalized input read one set of fp8 codes instead of quantizing x three times."""
    first: dict[tuple, torch.fx.Node] = {}
    for node in graph.find_nodes(op="call_function", target=torch.ops.fp8fx.act_quant.default):
        key = (*node.args, *sorted(node.kwargs.items()))
        if key not in first:
            first[key] = node
            continue
        node.replace_all_uses_with(first[key])  # the first comes earlier, so it dominates
        graph.erase_node(node)
        counters[COUNTER]["act_quant_shared"] += 1


def _quant_source(xq, xs):
    """The act_quant node whose codes and scales xq and xs are, or None (static scales)."""
    if not all(isinstance(a, torch.fx.Node) and a.target is operator.getitem for a in (xq, xs)):
        return None
    (src, i), (src_s, j) = xq.args, xs.args
    ok = src is src_s and (i, j) == (0, 1) and src.target is torch.ops.fp8fx.act_quant.default
    return src if ok else None


def _one_launch(m, ns: tuple, k: int, out_dtype: torch.dtype, device: torch.device, fused_quant: bool = False) -> bool:
    """A static M at which the kernels run GEMMs of widths ``ns`` as one gemv_cat launch
    (``fused_quant``: quantizing high-precision activations in that launch)."""
    from fp8fx.kernels import dispatch

    return isinstance(m, int) and m > 0 and dispatch.cat_takes_gemv(m, ns, k, out_dtype, device, fused_quant=fused_quant)


def _quant_in_gemv_ok(src: torch.fx.Node, wscale_dtype, out_dtype) -> bool:
    """The act_quant ``src`` is what fp8fx.linear_cat's kernel computes: 128-groups of a
    high-precision x, UE8M0 exactly when the weight scales are, output in x's dtype."""
    x, group_size, ue8m0 = src.args[:3]
    return (_is_hp_tensor(x) and group_size == 128 and ue8m0 == (wscale_dtype == reference.E8M0_DTYPE)
            and _val(x).dtype == out_dtype)


def _packed(run: list[torch.fx.Node]) -> bool:
    """The run's weights and scales are back-to-back row ranges of one buffer each, in run
    order (api.pack_projections), with no biases: block_gemm_cat runs them as one GEMM."""
    from fp8fx.api import packed_rows

    if any(node.args[4] is not None for node in run):
        return False
    return all(packed_rows([_val(node.args[i]) for node in run]) for i in (2, 3))


def _replace_run(graph, run, target, args, lead_dims: int) -> None:
    """One ``target(*args)`` node before run[0] whose output is the run's outputs side by side;
    each member becomes its column slice."""
    first = run[0]
    with graph.inserting_before(first):
        cat = _call(graph, target, *args)
        cat.meta.update({k: v for k, v in first.meta.items() if k != "val"})
        col = 0
        for node in run:
            width = _val(node).shape[-1]
            piece = _call(graph, torch.ops.aten.slice.Tensor, cat, lead_dims, col, col + width)
            col += width
            node.replace_all_uses_with(piece)
    for node in run:
        graph.erase_node(node)


def group_gemms(graph: torch.fx.Graph, quant_in_gemv: bool = True) -> None:
    """Decode: fp8fx.block_gemm nodes reading one act_quant (q/k/v, gate/up), with one scale
    dtype, all or no biases and a static M at which the gemv route takes them:
    - ``quant_in_gemv`` and dispatch.cat_takes_gemv on the linear route -> one
      fp8fx.linear_cat on the act_quant's input (one launch that quantizes in the kernel; a
      single GEMM too), so no quant kernel runs after the producer; not under max-autotune,
      which benchmarks the block_gemm lowering's choices instead;
    - else, two or more on the GEMM route, or (prefill, any M) two or more whose weights
      pack_projections packed into one buffer -> one fp8fx.block_gemm_cat (one GEMM);
    sliced back per GEMM. Groups of more than gemv.MAX_CAT GEMMs are cut into runs of that size."""
    from fp8fx.kernels.gemv import MAX_CAT
    from fp8fx.passes.lowering import _max_autotune

    quant_in_gemv = quant_in_gemv and not _max_autotune()
    packed = not _max_autotune()  # max-autotune benchmarks each block_gemm's choices instead
    order = {node: i for i, node in enumerate(graph.nodes)}
    groups: dict[tuple, list[torch.fx.Node]] = defaultdict(list)
    for node in graph.find_nodes(op="call_function", target=torch.ops.fp8fx.block_gemm.default):
        xq, xs, qweight, wscale, bias, block_size, out_dtype = node.args
        src = _quant_source(xq, xs)
        if src is not None:
            groups[(src, tuple(block_size), out_dtype, _val(wscale).dtype, bias is None)].append(node)
    for (src, block_size, out_dtype, wscale_dtype, _), nodes in groups.items():
        nodes.sort(key=order.__getitem__)
        for start in range(0, len(nodes), MAX_CAT):
            run = nodes[start:start + MAX_CAT]
            first = run[0]
            xq, xs = first.args[:2]
            lead = _val(first).shape[:-1]
            m = math.prod(lead) if all(isinstance(d, int) for d in lead) else None
            ns = tuple(_val(node.args[2]).shape[0] for node in run)
            k, device = _val(xq).shape[-1], _val(xq).device
            # Weights, scales and biases must exist where the group's launch goes (first's place).
            if not all(order[a] < order[first] for node in run for a in node.args[2:5] if isinstance(a, torch.fx.Node)):
                continue
            weights = ([node.args[2] for node in run], [node.args[3] for node in run], [node.args[4] for node in run])
            if (quant_in_gemv and list(block_size) == [128, 128] and _quant_in_gemv_ok(src, wscale_dtype, out_dtype)
                    and _one_launch(m, ns, k, out_dtype, device, fused_quant=True)):
                _replace_run(graph, run, torch.ops.fp8fx.linear_cat.default, (src.args[0], *weights, list(block_size)),
                             len(lead))
                counters[COUNTER]["linear_cat"] += 1
                counters[COUNTER]["linear_cat_members"] += len(run)
            elif len(run) >= 2 and (_one_launch(m, ns, k, out_dtype, device) or packed and _packed(run)):
                _replace_run(graph, run, torch.ops.fp8fx.block_gemm_cat.default,
                             (xq, xs, *weights, list(block_size), out_dtype), len(lead))
                counters[COUNTER]["block_gemm_cat"] += 1
                counters[COUNTER]["block_gemm_cat_members"] += len(run)


@functools.cache
def decompose_patterns() -> PatternMatcherPass:
    """fp8fx.act_quant -> quantize_act_decomposed's aten ops, which Inductor fuses (built once)."""
    pass_dict = PatternMatcherPass(pass_name="fp8fx_decompose_act_quant")
    pattern = CallFunction(
        torch.ops.fp8fx.act_quant.default, KeywordArg("x"), KeywordArg("group_size"), KeywordArg("ue8m0")
    )
    register_graph_pattern(pattern, extra_check=_act_quant_ok, pass_dict=pass_dict)(_rewrite_act_quant)
    return pass_dict


def rewrite(graph: torch.fx.Graph, quant_in_gemv: bool = True, norm_devices: tuple[str, ...] = (),
            prologue_devices: tuple[str, ...] = (), quant_kernels: bool = False) -> None:
    """The whole linear rewrite: split, share quantizations of one input, group the decode
    GEMMs of one input (quantizing in the gemv: ``group_gemms``), fuse RMSNorms into the
    quantizations they feed on ``norm_devices`` (passes/norm_quant.py), with ``quant_kernels``
    quantize SwiGLU products and attention outputs, and launch the fused norms, on CUDA with
    fp8fx's Triton kernels (passes/quant_kernel.py), decompose the quantizations left, then
    move the RMSNorm or SwiGLU producers of the grouped decode GEMMs into the gemv on
    ``prologue_devices`` (passes/prologue.py)."""
    split_linear(graph)
    share_act_quant(graph)
    group_gemms(graph, quant_in_gemv)
    if norm_devices:
        from fp8fx.passes import norm_quant

        norm_quant.rewrite(graph, norm_devices)
    if quant_kernels:
        from fp8fx.passes import quant_kernel

        quant_kernel.rewrite(graph)
    decompose_patterns().apply(graph)
    graph.eliminate_dead_code()
    if prologue_devices:  # after the dead quantizations are gone: it counts each producer's readers
        from fp8fx.passes import prologue

        prologue.rewrite(graph, prologue_devices)
        graph.eliminate_dead_code()
