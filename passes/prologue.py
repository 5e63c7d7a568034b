"""Decode GEMMs that take their producer into the gemv's prologue.

    h = add(a, b)?;  y = transformers' RMSNorm of h (passes/norm_quant.py's form)
    out = fp8fx.linear_cat(y, qweights, wscales, biases, block)
==> out, h' = fp8fx.rms_norm_linear_cat(a, b, w, eps_tensor?, eps, qweights, wscales, biases, block)
    (later readers of h read h'; without the add: (h, None, ...), h' unused)

    g32 = convert_element_type(g, f32)
    p = mul(convert_element_type(div(g32, add(exp(neg(g32)), 1)), g.dtype), u)      (silu(g) * u)
    out = fp8fx.linear_cat(p, qweights, wscales, biases, block)
==> out = fp8fx.silu_mul_linear_cat(g, u, qweights, wscales, biases, block)

Runs last in the linear rewrite (passes/linear.py), once the grouping has made the decode
GEMMs linear_cat calls on their high-precision input and the dead quantizations are gone
(it counts each producer's readers). Why: at one or two tokens the RMSNorm (with
the residual add before it) and the SwiGLU product are each a kernel of their own whose
output only the gemv reads, and a decode step is a chain of short kernels where each
launch costs its own start-up; the gemv already loads its K range of that input before
its K loop, so it computes the norm (the whole row's sum of squares: 8 KB per row at
hidden 4096, from L2) or the product there, and the producer's kernel is gone.

Taken only where the kernel fuses it: a static M of 1 or 2 rows, and on CUDA where
gemv.prologue_fuses says the launch with the measured config quantizes before its K loop
(1-2 rows per program, at most 32 (row, K block) groups per split) and, for the norm, the
rows fit the whole-row load (gemv.NORM_MAX_ELEMS); the producer's output read by this
linear_cat alone. Counters: prologue_norm, prologue_norm_residual (of which with the
residual add), prologue_silu.
"""

from __future__ import annotations

import math
import operator

import torch
from torch._dynamo.utils import counters

from fp8fx.passes.linear import COUNTER, _call, _val
from fp8fx.passes.norm_quant import _is, _match, _residual

__all__ = ["rewrite"]

_aten = torch.ops.aten
_CONVERT = torch.ops.prims.convert_element_type.default
MAX_ROWS = 2  # the gemv quantizes before its K loop (where the prologue runs) at 1-2 rows per program


def _silu_of(node):
    """g when ``node`` is silu(g) in g's dtype as the post-grad graph writes it, else None."""
    if _is(node, _aten.silu.default):
        return node.args[0]
    if not (_is(node, _CONVERT) and _is(node.args[0], _aten.div.Tensor)):
        return None
    g32, den = node.args[0].args
    if not (_is(g32, _CONVERT) and g32.args[1] == torch.float32 and _is(den, _aten.add.Tensor, _aten.add.Scalar)):
        return None
    e, one = den.args
    if one != 1 or not (_is(e, _aten.exp.default) and _is(e.args[0], _aten.neg.default) and e.args[0].args[0] is g32):
        return None
    g = g32.args[0]
    vg = _val(g)
    return g if isinstance(vg, torch.Tensor) and vg.dtype == node.args[1] else None


def _silu_mul(p):
    """(g, u) when p = silu(g) * u, both of p's shape and dtype, else None."""
    if not (_is(p, _aten.mul.Tensor) and len(p.args) == 2):
        return None
    vp = _val(p)
    for s, u in (p.args, p.args[::-1]):
        g = _silu_of(s)
        vu = _val(u)
        if g is not None and isinstance(vu, torch.Tensor) and vu.shape == vp.shape and vu.dtype == vp.dtype \
                and _val(g).shape == vp.shape and len(s.users) == 1:
            return g, u
    return None


def _rows(x) -> int | None:
    lead = _val(x).shape[:-1]
    return math.prod(lead) if all(isinstance(d, int) for d in lead) else None


def _fuses(norm: bool, m: int, x, qweights) -> bool:
    """On CUDA, whether the gemv runs this producer in its prologue (otherwise the op would
    form the input in torch, slower than Inductor's kernel); elsewhere the reference runs."""
    from fp8fx.kernels.gemv import prologue_fuses

    vx = _val(x)
    n = sum(_val(w).shape[0] for w in qweights)
    return vx.device.type != "cuda" or prologue_fuses(m, n, vx.shape[-1], norm, vx.device)


def rewrite(graph: torch.fx.Graph, devices: tuple[str, ...] = ("cuda",)) -> None:
    """Fold every eligible producer into the linear_cat it feeds on ``devices``."""
    for node in list(graph.find_nodes(op="call_function", target=torch.ops.fp8fx.linear_cat.default)):
        x, qweights, wscales, biases, block_size = node.args
        vx = _val(x)
        m = _rows(x)
        if vx.device.type not in devices or m is None or not 0 < m <= MAX_ROWS or len(x.users) != 1:
            continue
        k = vx.shape[-1]
        found = _match(x)
        if found is not None:
            h, h32, w, eps_node, eps = found
            if k % 128 or not _fuses(True, m, x, qweights):
                continue
            pair = _residual(h, h32, node)
            with graph.inserting_before(node):
                fused = _call(graph, torch.ops.fp8fx.rms_norm_linear_cat.default, *(pair or (h, None)), w, eps_node, eps,
                              qweights, wscales, biases, block_size)
                out, h_out = (_call(graph, operator.getitem, fused, i) for i in range(2))
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            if pair is not None:
                h.replace_all_uses_with(h_out, delete_user_cb=lambda user: user is not h32)
                counters[COUNTER]["prologue_norm_residual"] += 1
            counters[COUNTER]["prologue_norm"] += 1
            continue
        pair = _silu_mul(x)
        if pair is not None and _fuses(False, m, x, qweights):
            with graph.inserting_before(node):
                fused = _call(graph, torch.ops.fp8fx.silu_mul_linear_cat.default, *pair, qweights, wscales, biases,
                              block_size)
            node.replace_all_uses_with(fused)
            graph.erase_node(node)
            counters[COUNTER]["prologue_silu"] += 1
