"""aten.topk over a short last dimension (MoE routing) -> fp8fx.topk.

    values, indices = aten.topk(x[..., C], k, -1, largest=True, sorted=True or False)
==> values, indices = fp8fx.topk(x, k)      fp32/bf16/fp16 x; C and k static,
                                            C <= kernels.topk.MAX_COLS, k <= MAX_K

On CUDA fp8fx.topk is one Triton launch, where torch.topk runs a radix select and a bitonic
sort of the picks (8.5 us per Qwen3-MoE decode layer on the H200, router [1, 128], k = 8).
The values and indices are torch.topk's (sorted, largest first; equal values by lower
column first, an order torch.topk leaves unspecified). Counter: topk, one per rewritten call;
topk_kept for calls left to aten (reported by the counter, nothing else changes).
"""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters

from fp8fx.passes.linear import COUNTER, _call, _val

__all__ = ["rewrite"]


def _arg(node: torch.fx.Node, i: int, name: str, default):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _eligible(node: torch.fx.Node) -> bool:
    from fp8fx.kernels import topk as kernel

    x, k = _arg(node, 0, "self", None), _arg(node, 1, "k", None)
    dim, largest = _arg(node, 2, "dim", -1), _arg(node, 3, "largest", True)
    v = _val(x)
    if not isinstance(v, torch.Tensor) or v.dim() == 0 or not isinstance(k, int) or largest is not True:
        return False
    if dim not in (-1, v.dim() - 1) or not isinstance(v.shape[-1], int):
        return False
    return kernel.supports(v, k)


def rewrite(graph: torch.fx.Graph) -> None:
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.topk.default:
            continue
        if not _eligible(node):
            counters[COUNTER]["topk_kept"] += 1
            continue
        with graph.inserting_before(node):
            new = _call(graph, torch.ops.fp8fx.topk.default, _arg(node, 0, "self", None), _arg(node, 1, "k", None))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        counters[COUNTER]["topk"] += 1
