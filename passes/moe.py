"""Expert GEMMs on high-precision 3-D expert weights -> fp8fx.grouped_linear on frozen fp8 constants.

Runs on the Dynamo graph (torch-level ops), from ``fp8fx.backend.freeze_weights``:

    W: [E, N, K] parameter (or [E, K, N], read transposed) -> Wq [E, N, K] fp8, Ws [E, nN, nK]

    grouped_mm      _grouped_mm(x, W.transpose(-2, -1), offs=offs)   transformers "grouped_mm"
                    (and its fp32 fallback op)
                    ==>  fp8fx.grouped_linear(x, Wq, Ws, offs)
    batched_mm      bmm(W[ids], x[S, K, 1])                           transformers "batched_mm"
    einsum          einsum("ti,taoi->tao", x, W[ids])                 gpt-fast's Mixtral
                    ==>  perm, inv, offs = route(ids)      # sort the pairs by expert, histc, cumsum
                         xs = x_rows[perm // r]            # r: pairs per row of x (top-k)
                         y = grouped_linear(xs, Wq, Ws, offs)[inv]
    indexed_linear  linear(x, W[e])                                   a loop over experts (int index)
                    ==>  fp8fx.linear(x, Wq[e], Ws[e])

``route`` is computed once per expert-id tensor and shared by the GEMMs that gather with it
(gate/up and down), ``xs`` once per input (gate and up projections of one x). No host
synchronisation: counts come from histc, offsets from cumsum, and out-of-range expert ids
trip a device-side assert (torch._assert_async), as in fp8fx.moe. grouped_mm keeps the
caller's offs, so transformers' own semantics (expert-parallel sentinels past offs[-1]) stand.

transformers' "eager" experts (a Python loop over ``nonzero()`` hits) do not trace under
``fullgraph=True``: Dynamo stops with a data-dependent error before any backend runs, and
without fullgraph the loop runs outside every compiled graph, in high precision. fp8fx cannot
rewrite what it never sees; ``fp8fx.explain`` lists such expert weights as skipped. Use
``model.set_experts_implementation("grouped_mm")`` (transformers' default) or "batched_mm".

A 3-D parameter counts as an expert weight when it reaches a GEMM through indexing or views.
It is quantized when every such use is one of the patterns above and it passes
``fp8fx.quantize_``'s eligibility rules; otherwise it stays as it is and is reported skipped.
Counters (torch._dynamo.utils.counters["fp8fx"]), one per rewritten GEMM: moe_grouped_mm,
moe_batched_mm, moe_einsum, moe_indexed_linear.
"""

from __future__ import annotations

import math
import operator
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch._dynamo.utils import counters

from fp8fx import ops  # noqa: F401  (registers torch.ops.fp8fx.*)
from fp8fx.api import LayerRecord, QuantizeReport, quantize_weight_chunked
from fp8fx.config import BlockFP8Config
from fp8fx.moe import sort_by_expert

__all__ = ["ExpertWeight", "Use", "find_expert_weights", "gather_sorted", "grouped_linear_unsorted", "rewrite", "route"]

COUNTER = "fp8fx"

_LINEARS = (torch._C._nn.linear, torch.nn.functional.linear)
_GROUPED_FUNCTIONS = tuple(
    f for f in (getattr(torch, "_grouped_mm", None), getattr(torch.nn.functional, "grouped_mm", None)) if f is not None
)
# Op names, not objects: transformers registers its fallback when it is imported, maybe after us.
_GROUPED_OPS = ("aten::_grouped_mm", "transformers::grouped_mm_fallback")
_GEMM_FUNCTIONS = {torch.bmm, torch.matmul, operator.matmul, torch.einsum, torch.mm, torch.baddbmm, *_LINEARS}
_GEMM_METHODS = {"bmm", "matmul", "mm", "__matmul__", "baddbmm"}
# Ops through which a 3-D parameter may travel to a GEMM (the candidate search, not the match).
_PASS_THROUGH_FUNCTIONS = {operator.getitem, torch.transpose, torch.permute, torch.index_select, torch.flatten}
_PASS_THROUGH_METHODS = {
    "transpose", "permute", "to", "contiguous", "view", "reshape", "index_select", "float", "bfloat16", "half", "type"
}


# -- what the rewritten graph calls (traced into aten ops by AOT autograd) ----------------------


def route(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the (token, expert) pairs by expert.

    expert_ids [*L] int -> perm [S] (pair order sorted by expert), inv [S] (perm's inverse),
    offs [E] int32 (cumulative end row of each expert's pairs), S = prod(L).
    """
    _, perm, offs = sort_by_expert(expert_ids, num_experts)
    inv = torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.shape[0], device=perm.device))
    return perm, inv, offs


def gather_sorted(x: torch.Tensor, expert_ids: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """The input row of each pair, in ``perm`` (expert) order: x [*P, K] -> [S, K].

    P is a prefix of L = expert_ids.shape: one row of x serves the r = prod(L[len(P):]) pairs
    that follow it (the top-k choices of a token), so pair p reads row p // r.
    """
    repeat = math.prod(expert_ids.shape[x.dim() - 1 :])
    rows = x.reshape(-1, x.shape[-1])  # [T, K]
    return rows[perm if isinstance(repeat, int) and repeat == 1 else perm // repeat]


def grouped_linear_unsorted(
    xs: torch.Tensor,
    expert_ids: torch.Tensor,
    inv: torch.Tensor,
    offs: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    block_size: list[int],
) -> torch.Tensor:
    """fp8fx.grouped_linear over the sorted rows xs [S, K], back in pair order: -> y [*L, N]."""
    y = torch.ops.fp8fx.grouped_linear(xs, qweight, wscale, offs, None, list(block_size))  # [S, N]
    return y[inv].view(*expert_ids.shape, qweight.shape[1])


# -- finding expert weights and their uses --------------------------------------------------------


@dataclass
class Use:
    """One expert GEMM reading W. kind: grouped_mm | batched_mm | einsum | indexed_linear.
    layout: "nk" when the GEMM reads W as [E, N, K] (out, in), "kn" when as [E, K, N]."""

    kind: str
    node: torch.fx.Node
    layout: str
    x: Optional[torch.fx.Node] = None  # the activation operand
    index: Any = None  # offs (grouped_mm), expert ids (batched_mm, einsum), the expert (indexed_linear)
    squeeze_dim: int = 0  # batched_mm: the unit dim of the bmm operand and result


@dataclass
class ExpertWeight:
    fqn: str
    value: Any  # the parameter (example input) itself
    placeholder: torch.fx.Node
    uses: list[Use] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # uses no pattern covers, described


def _val(node):
    return node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None


def _is_call(node, functions=(), methods=()) -> bool:
    if not isinstance(node, torch.fx.Node):
        return False
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def _is_grouped_mm(node) -> bool:
    """torch._grouped_mm / F.grouped_mm, or transformers' fallback op for non-bf16 weights."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return False
    target = node.target
    if target in _GROUPED_FUNCTIONS:
        return True
    if isinstance(target, torch._ops.OpOverload):
        target = target.overloadpacket
    return getattr(target, "_qualified_op_name", None) in _GROUPED_OPS


def _describe(node: torch.fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{target} ({node.name})"


def _reaches_gemm(node: torch.fx.Node, depth: int = 4) -> bool:
    for user in node.users:
        if _is_grouped_mm(user) or _is_call(user, _GEMM_FUNCTIONS, _GEMM_METHODS):
            return True
        passes_on = _is_call(user, _PASS_THROUGH_FUNCTIONS, _PASS_THROUGH_METHODS)
        if depth > 1 and passes_on and _reaches_gemm(user, depth - 1):
            return True
    return False


def _last_two_transposed(node: torch.fx.Node, src: torch.fx.Node) -> bool:
    """node is src transposed in its last two dims (src is 3-D)."""
    if _is_call(node, (torch.transpose,), ("transpose",)) and node.args[0] is src and len(node.args) == 3:
        dims = node.args[1:]
        return all(isinstance(d, int) for d in dims) and {d % 3 for d in dims} == {1, 2}
    if _is_call(node, (torch.permute,), ("permute",)) and node.args[0] is src:
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        return list(dims) in ([0, 2, 1], [0, -1, -2], [-3, -1, -2])
    return False


def _grouped_args(node: torch.fx.Node) -> dict[str, Any]:
    """(x, w, offs, bias, out_dtype) of a grouped-mm call, however they were passed."""
    aliases = {"mat_a": "x", "input": "x", "self": "x", "mat_b": "w", "weight": "w", "mat2": "w"}
    args = dict(zip(("x", "w", "offs", "bias", "out_dtype"), node.args))
    args.update({aliases.get(k, k): v for k, v in node.kwargs.items()})
    return args


def _grouped_use(node: torch.fx.Node, w: torch.fx.Node, layout: str) -> Use | str:
    args = _grouped_args(node)
    x, offs = args.get("x"), args.get("offs")
    if args.get("w") is not w or x is w:
        return f"{_describe(node)} with the weight not as its second operand"
    ov, wv = _val(offs), _val(w)
    if not isinstance(ov, torch.Tensor) or ov.dtype not in (torch.int32, torch.int64) or ov.dim() != 1:
        return f"{_describe(node)} without int32/int64 offs"
    if args.get("bias") is not None:
        return f"{_describe(node)} with a bias"
    if ov.shape[0] != wv.shape[0]:
        return f"{_describe(node)}: offs of {ov.shape[0]} groups for {wv.shape[0]} experts"
    xv = _val(x)
    if not isinstance(xv, torch.Tensor) or xv.dim() != 2 or not xv.is_floating_point():
        return f"{_describe(node)} on a non-2-D or non-float input"
    if args.get("out_dtype") not in (None, xv.dtype):
        return f"{_describe(node)} with out_dtype {args.get('out_dtype')}"
    return Use("grouped_mm", node, layout, x=x, index=offs)


def _is_int_tensor(v, min_dim: int) -> bool:
    if not isinstance(v, torch.Tensor) or v.is_floating_point() or v.is_complex() or v.dtype == torch.bool:
        return False
    return v.dim() >= min_dim


def _bmm_use(node: torch.fx.Node, gathered: torch.fx.Node, ids: torch.fx.Node) -> Use | str:
    a, b = node.args[:2] if len(node.args) >= 2 else (None, None)
    if _val(ids).dim() != 1 or len(node.args) != 2 or node.kwargs:
        return f"{_describe(node)} on gathered weights of {_val(ids).dim()}-D expert ids"
    other, layout, dim = (b, "nk", -1) if a is gathered else (a, "kn", 1)
    ov = _val(other)
    if other is gathered or not isinstance(ov, torch.Tensor) or ov.dim() != 3 or ov.shape[dim] != 1:
        return f"{_describe(node)}: not one row per (token, expert) pair"
    return Use("batched_mm", node, layout, x=other, index=ids, squeeze_dim=dim)


def _einsum_use(node: torch.fx.Node, gathered: torch.fx.Node, ids: torch.fx.Node) -> Use | str:
    eq, *operands = node.args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    bad = f"einsum {eq!r} ({node.name}): not a per-pair linear of the gathered weights"
    if not isinstance(eq, str) or len(operands) != 2 or node.kwargs or operands[0] is operands[1]:
        return bad
    if gathered not in operands:
        return bad
    eq = eq.replace(" ", "")
    if "->" not in eq or "." in eq:
        return bad
    lhs, out = eq.split("->")
    subs = lhs.split(",")
    if len(subs) != 2:
        return bad
    wpos = operands.index(gathered)
    wsub, xsub, x = subs[wpos], subs[1 - wpos], operands[1 - wpos]
    nl = _val(ids).dim()
    xv = _val(x)
    if len(wsub) != nl + 2 or not xsub or not isinstance(xv, torch.Tensor) or xv.dim() != len(xsub):
        return bad
    if len(set(wsub)) != len(wsub) or len(set(xsub)) != len(xsub) or len(set(out)) != len(out):
        return bad
    lsub, (a, b), c = wsub[:nl], wsub[nl:], xsub[-1]
    if c not in (a, b) or c in out or xsub[:-1] != lsub[: len(xsub) - 1]:
        return bad
    other = b if c == a else a
    if out != lsub + other or other in xsub:
        return bad
    return Use("einsum", node, "nk" if c == b else "kn", x=x, index=ids)


def _gathered_uses(gathered: torch.fx.Node, ids) -> tuple[list[Use], list[str]]:
    uses, unmatched = [], []
    for user in gathered.users:
        if _is_int_tensor(_val(ids), 1) and _is_call(user, (torch.bmm,), ("bmm",)):
            found = _bmm_use(user, gathered, ids)
        elif _is_int_tensor(_val(ids), 1) and _is_call(user, (torch.einsum,)):
            found = _einsum_use(user, gathered, ids)
        elif not _is_int_tensor(_val(ids), 1) and _is_call(user, _LINEARS) and user.args[1:2] == (gathered,):
            found = Use("indexed_linear", user, "nk", x=user.args[0], index=ids)
        else:
            found = _describe(user)
        (uses if isinstance(found, Use) else unmatched).append(found)
    return uses, unmatched


def _is_expert_index(idx) -> bool:
    """An index that selects experts: an int tensor (gather) or one int / SymInt / 0-d tensor (select)."""
    if isinstance(idx, (int, torch.SymInt)) and not isinstance(idx, bool):
        return True
    v = _val(idx)
    return isinstance(v, torch.SymInt) or _is_int_tensor(v, 0)


def _uses_of(w: torch.fx.Node) -> tuple[list[Use], list[str]]:
    uses, unmatched = [], []
    for user in w.users:
        if _is_grouped_mm(user):
            found = _grouped_use(user, w, "kn")
            (uses if isinstance(found, Use) else unmatched).append(found)
        elif _last_two_transposed(user, w):
            for gemm in user.users:
                found = _grouped_use(gemm, user, "nk") if _is_grouped_mm(gemm) else _describe(gemm)
                (uses if isinstance(found, Use) else unmatched).append(found)
        elif _is_call(user, (operator.getitem,)) and user.args[0] is w and _is_expert_index(user.args[1]):
            more, rest = _gathered_uses(user, user.args[1])
            uses += more
            unmatched += rest
        else:
            unmatched.append(_describe(user))
    return uses, unmatched


def find_expert_weights(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> list[ExpertWeight]:
    """Each 3-D module parameter of the Dynamo graph that reaches a GEMM, with its uses."""
    from fp8fx.backend import _param_fqn
    from fp8fx.tensor import BlockFP8Tensor

    found = []
    for node, value in zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs):
        if not isinstance(value, torch.Tensor) or value.dim() != 3 or _param_fqn(node) is None:
            continue
        if not isinstance(value, BlockFP8Tensor) and not _reaches_gemm(node):
            continue
        mname, pname = _param_fqn(node)
        entry = ExpertWeight(f"{mname}.{pname}" if mname else pname, value, node)
        if not isinstance(value, BlockFP8Tensor):
            entry.uses, entry.unmatched = _uses_of(node)
        found.append(entry)
    return found


# -- the rewrite --------------------------------------------------------------------------------


def _fake_mode(gm: torch.fx.GraphModule):
    """The fake mode of the graph's example values (the tracing context may hold another one)."""
    from torch._subclasses.fake_tensor import FakeTensor

    for node in gm.graph.find_nodes(op="placeholder"):
        if isinstance(node.meta.get("example_value"), FakeTensor):
            return node.meta["example_value"].fake_mode
    raise RuntimeError("fp8fx: the Dynamo graph has no fake example values to rewrite its expert GEMMs with")


class _Builder:
    """Inserts nodes with example values (the Dynamo graph's meta) computed on fake tensors."""

    def __init__(self, gm: torch.fx.GraphModule, like: torch.fx.Node):
        self.gm, self.graph, self.fake_mode = gm, gm.graph, _fake_mode(gm)
        self.meta = {k: like.meta[k] for k in ("stack_trace", "nn_module_stack") if k in like.meta}

    def _fake(self, arg):
        return torch.fx.map_arg(arg, lambda n: n.meta["example_value"])

    def call(self, target, *args) -> torch.fx.Node:
        node = self.graph.call_function(target, args)
        node.meta.update(self.meta)
        with self.fake_mode:
            node.meta["example_value"] = target(*self._fake(args))
        return node

    def constant(self, name: str) -> torch.fx.Node:
        node = self.graph.get_attr(name)
        node.meta["example_value"] = self.fake_mode.from_tensor(getattr(self.gm, name), static_shapes=True)
        return node


def _rewrite_use(gm, use: Use, attr: str, num_experts: int, block: list[int], cache: dict) -> None:
    """Replace one expert GEMM. ``cache`` holds the routes (per expert ids) and sorted inputs
    (per input and expert ids) made so far: uses come in graph order, so the first user of
    each creates it and it dominates the rest."""
    b = _Builder(gm, use.node)
    with gm.graph.inserting_before(use.node):
        q, s = b.constant(attr + "_qdata"), b.constant(attr + "_scale")
        if use.kind == "grouped_mm":
            new = b.call(torch.ops.fp8fx.grouped_linear.default, use.x, q, s, use.index, None, block)
        elif use.kind == "indexed_linear":
            bias = use.node.args[2] if len(use.node.args) > 2 else use.node.kwargs.get("bias")
            qe, se = b.call(operator.getitem, q, use.index), b.call(operator.getitem, s, use.index)
            new = b.call(torch.ops.fp8fx.linear.default, use.x, qe, se, bias, None, block)
        else:
            ids = use.index
            if (ids, num_experts) not in cache:
                r = b.call(route, ids, num_experts)
                cache[(ids, num_experts)] = tuple(b.call(operator.getitem, r, i) for i in range(3))
            perm, inv, offs = cache[(ids, num_experts)]
            key = (use.x, use.kind, ids, num_experts)
            if key not in cache:
                x = b.call(torch.squeeze, use.x, use.squeeze_dim) if use.kind == "batched_mm" else use.x
                cache[key] = b.call(gather_sorted, x, ids, perm)
            new = b.call(grouped_linear_unsorted, cache[key], ids, inv, offs, q, s, block)
            if use.kind == "batched_mm":
                new = b.call(torch.unsqueeze, new, use.squeeze_dim)
    use.node.replace_all_uses_with(new)
    gm.graph.erase_node(use.node)


# (compile context, counts) of the last rewrite: see _count.
_LAST_COUNT: list = [None, Counter()]


def _count(kinds: Counter) -> None:
    """Bump the pattern counters once per frame compile. When Dynamo restarts the analysis of a
    frame after calling the backend (e.g. from _tensorify_python_scalars), the backend runs
    again under the same CompileContext object; the abandoned attempt's counts are taken back."""
    from torch._guards import CompileContext

    ctx = CompileContext.try_get()
    if ctx is not None and ctx is _LAST_COUNT[0]:
        counters[COUNTER].subtract(_LAST_COUNT[1])
    _LAST_COUNT[:] = [ctx, kinds]  # holding ctx keeps its identity from being reused
    counters[COUNTER].update(kinds)


def rewrite(
    gm: torch.fx.GraphModule, experts: list[ExpertWeight], config: BlockFP8Config, report: QuantizeReport
) -> None:
    """Quantize each eligible expert weight into constants of ``gm`` and rewrite its GEMMs; the
    outcome of every weight goes to ``report`` (converted, or skipped with the reason)."""
    from fp8fx.backend import _add_constant, freeze_skip_reason, require_no_grad

    todo: list[tuple[ExpertWeight, str]] = []
    for ew in experts:
        w = ew.value
        layouts = {u.layout for u in ew.uses}
        unmatched = ew.unmatched or ([] if ew.uses else ["no GEMM"])
        if len(layouts) > 1:
            unmatched = unmatched + ["GEMMs that read it in both orientations"]
        shared = None
        if unmatched:
            shared = "used by " + ", ".join(unmatched[:3]) + ": no fp8fx expert GEMM pattern covers this use"
        reason = freeze_skip_reason(ew.fqn, w, config, shared)
        if reason is not None:
            report.skipped.append(LayerRecord(ew.fqn, tuple(w.shape), reason))
            continue
        require_no_grad(ew.fqn, w)
        todo.append((ew, layouts.pop()))

    uses = []
    for ew, layout in todo:
        w = ew.value.detach()
        w_nk = w if layout == "nk" else w.transpose(-2, -1)  # [E, N, K], the layout grouped_linear takes
        q, s = quantize_weight_chunked(w_nk, config.block_size, config.scale_fmt, ew.fqn)
        attr = "_fp8fx_" + re.sub(r"\W", "_", ew.fqn)
        _add_constant(gm, attr + "_qdata", q)
        _add_constant(gm, attr + "_scale", s)
        uses += [(use, attr, w.shape[0]) for use in ew.uses]
        report.converted.append(LayerRecord(ew.fqn, tuple(w.shape)))
        report.bytes_before += w.numel() * w.element_size()
        report.bytes_after += q.numel() * q.element_size() + s.numel() * s.element_size()
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    cache: dict = {}
    for use, attr, num_experts in sorted(uses, key=lambda u: order[u[0].node]):
        _rewrite_use(gm, use, attr, num_experts, list(config.block_size), cache)
    _count(Counter(f"moe_{use.kind}" for use, _, _ in uses))
    # Transposes and gathers of the high-precision weights that nothing reads any more.
    for ew, _ in todo:
        for user in list(ew.placeholder.users):
            if not user.users:
                gm.graph.erase_node(user)
