"""transformers' RMSNorm feeding an activation quantization -> fp8fx.rms_norm_quant.

    h   = add(a, b)                                  (optional: the residual stream)
    h32 = convert_element_type(h, f32)
    y   = mul(w, convert_element_type(mul(h32, rsqrt(add(mean(pow(h32, 2), [-1], True), eps))), h.dtype))
    q, s = fp8fx.act_quant(y, 128, ue8m0)
==> q, s, h' = fp8fx.rms_norm_quant(a, b, w, eps_tensor?, eps, ue8m0)   (later users of h read h')
    or q, s, _ = fp8fx.rms_norm_quant(h, None, w, ...)                     (no add, or h read early)

Runs between the linear rewrite's grouping and the decomposition of the quantizations
(passes/linear.py): the act_quant nodes left then feed block GEMMs (prefill-sized M, or
decode with quant_in_gemv=False). Why: Inductor emits a hidden-4096 RMSNorm as a looped
reduction that writes y, and the per-group amax as a second kernel that reads y back; the op
is one Triton pass per row (fp8fx/kernels/norm_quant.py) that writes only h, q and s.

Only the exact form above is taken (weight applied after the cast to h's dtype, as Llama,
Qwen and DeepSeek-V3 write it); y must have no user besides the one quantization, the hidden
size a multiple of 128 up to kernels.norm_quant.MAX_K, and eps a constant or a CPU scalar
(Dynamo passes ``variance_epsilon`` as a 0-dim CPU tensor). Counters: norm_quant (one per
fused norm), norm_quant_residual (of which with the residual add), norm_quant_kept (a
quantized RMSNorm output left to Inductor).
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch._dynamo.utils import counters

from fp8fx.passes.linear import COUNTER, _call, _val

__all__ = ["rewrite"]

_aten = torch.ops.aten
_CONVERT = torch.ops.prims.convert_element_type.default


def _is(node, *targets) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def _eps(node) -> Optional[tuple[Optional[torch.fx.Node], float]]:
    """(eps_tensor node or None, eps float) from the add's second operand."""
    if isinstance(node, (int, float)):
        return None, float(node)
    if _is(node, _CONVERT) and node.args[1] == torch.float32:
        node = node.args[0]
    v = _val(node)
    if isinstance(v, torch.Tensor) and v.dim() == 0 and v.is_floating_point() and v.device.type == "cpu":
        return node, 0.0
    return None


def _match(y: torch.fx.Node):
    """(h, h32, w, eps_tensor, eps) when y is transformers' RMSNorm of h (h32: h in fp32), else None."""
    if not _is(y, _aten.mul.Tensor) or len(y.args) != 2:
        return None
    vy = _val(y)
    for w, n in (y.args, y.args[::-1]):
        vw = _val(w)
        if not (isinstance(vw, torch.Tensor) and vw.dim() == 1 and vw.dtype == vy.dtype and vw.shape[0] == vy.shape[-1]):
            continue
        if not (_is(n, _CONVERT) and n.args[1] == vy.dtype and _is(n.args[0], _aten.mul.Tensor)):
            continue
        c = n.args[0]
        for h32, r in (c.args, c.args[::-1]):
            if not (_is(h32, _CONVERT) and h32.args[1] == torch.float32 and _is(r, _aten.rsqrt.default)):
                continue
            d = r.args[0]
            if not (_is(d, _aten.add.Tensor, _aten.add.Scalar) and not d.kwargs and len(d.args) == 2):
                continue
            mean = d.args[0]
            eps = _eps(d.args[1])
            if eps is None or not (_is(mean, _aten.mean.dim) and _is(mean.args[0], _aten.pow.Tensor_Scalar)):
                continue
            dims, keep = mean.args[1], (mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False))
            pw = mean.args[0]
            if not keep or list(dims) not in ([-1], [vy.dim() - 1]) or pw.args[0] is not h32 or pw.args[1] != 2:
                continue
            h = h32.args[0]
            vh = _val(h)
            if isinstance(vh, torch.Tensor) and vh.dtype == vy.dtype and vh.shape == vy.shape:
                return h, h32, w, *eps
    return None


def _residual(h: torch.fx.Node, h32: torch.fx.Node, before: torch.fx.Node):
    """(a, b) when h = a + b of two tensors of h's shape and dtype and every other reader of h
    comes after ``before`` (they will read the op's h output instead), else None."""
    if not _is(h, _aten.add.Tensor) or h.kwargs or len(h.args) != 2:
        return None
    vh = _val(h)
    for t in h.args:
        vt = _val(t)
        if not (isinstance(vt, torch.Tensor) and vt.shape == vh.shape and vt.dtype == vh.dtype):
            return None
    others = set(h.users) - {h32}
    node = h
    while node is not before:  # the few nodes from h to ``before`` (the norm), in graph order
        node = node.next
        if node in others:
            return None
    return h.args


def rewrite(graph: torch.fx.Graph, devices: tuple[str, ...] = ("cuda",)) -> None:
    """Fuse every eligible RMSNorm -> act_quant on tensors of ``devices`` (see the module docstring)."""
    from fp8fx.kernels.norm_quant import MAX_K

    for node in list(graph.find_nodes(op="call_function", target=torch.ops.fp8fx.act_quant.default)):
        y, group_size, ue8m0 = node.args
        found = _match(y) if isinstance(y, torch.fx.Node) else None
        if found is None:
            continue
        h, h32, w, eps_node, eps = found
        vy = _val(y)
        if vy.device.type not in devices:
            continue
        k = vy.shape[-1]
        ok = group_size == 128 and isinstance(k, int) and k % 128 == 0 and k <= MAX_K and len(y.users) == 1
        if not ok:
            counters[COUNTER]["norm_quant_kept"] += 1
            continue
        pair = _residual(h, h32, y)
        with graph.inserting_after(y):
            args = (*(pair or (h, None)), w, eps_node, eps, bool(ue8m0))
            fused = _call(graph, torch.ops.fp8fx.rms_norm_quant.default, *args)
        parts = [fused]
        for i in range(3):  # getitems in output order
            with graph.inserting_after(parts[-1]):
                parts.append(_call(graph, operator.getitem, fused, i))
        parts = parts[1:]
        for use in list(node.users):  # getitem(act_quant, 0 / 1)
            use.replace_all_uses_with(parts[use.args[1]])
            graph.erase_node(use)
        graph.erase_node(node)
        if pair is not None:
            h.replace_all_uses_with(parts[2], delete_user_cb=lambda user: user is not h32)
            counters[COUNTER]["norm_quant_residual"] += 1
        counters[COUNTER]["norm_quant"] += 1
