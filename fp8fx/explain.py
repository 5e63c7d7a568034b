"""fp8fx.explain(model, *example_inputs): what fp8fx.backend does to a model's GEMMs, without codegen.

    print(fp8fx.explain(model, input_ids))
    # fp8fx.explain: 1 graph, 8 GEMM weights rewritten to block-FP8, 1 skipped
    #   rewritten model.layers.0.self_attn.q_proj.weight [256, 256] (quantized at compile time)
    #   rewritten model.layers.0.mlp.experts.gate_up_proj [8, 256, 256] (quantized at compile time)
    #   skipped   lm_head.weight [512, 256]: output embedding (kept in high precision, ...)
    #   post-grad rewrites: act_quant_decomposed x4, act_quant_shared x3, linear x7

It traces the model with the same backend (Dynamo, the compile-time weight freeze, AOT
autograd, Inductor's post-grad passes with fp8fx's pass) and stops before code generation,
so it is fast on CPU and never runs the model's GEMMs. ``format_graph`` prints a post-grad
graph in the normalized form the graph snapshot tests compare.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from fp8fx.api import LayerRecord
from fp8fx.backend import Backend, _select_args, backend_with, linear_weights
from fp8fx.config import BlockFP8Config
from fp8fx.tensor import BlockFP8Tensor

__all__ = ["Explanation", "explain", "format_graph", "post_grad_backend"]

_DTYPES = {
    torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float8_e4m3fn: "f8e4m3",
    torch.float8_e8m0fnu: "e8m0", torch.float64: "f64", torch.int32: "i32", torch.int64: "i64",
    torch.bool: "b8",
}


@dataclass
class Explanation:
    rewritten: list[LayerRecord] = field(default_factory=list)  # reason: when it was quantized
    skipped: list[LayerRecord] = field(default_factory=list)
    patterns: Counter = field(default_factory=Counter)  # fp8fx pass counters for this trace
    graphs: list[str] = field(default_factory=list)  # format_graph of each post-grad graph

    def __str__(self) -> str:
        n = len(self.graphs)
        lines = [
            f"fp8fx.explain: {n} graph{'s' * (n != 1)}"
            + (" (graph breaks!)" if n > 1 else "")
            + f", {len(self.rewritten)} GEMM weights rewritten to block-FP8, {len(self.skipped)} skipped"
        ]
        lines += [f"  rewritten {r.name} {list(r.shape)} ({r.reason})" for r in self.rewritten]
        lines += [f"  skipped   {r.name} {list(r.shape)}: {r.reason}" for r in self.skipped]
        # MoE expert GEMMs are rewritten on the Dynamo graph (fp8fx.passes.moe), the rest post-grad.
        for label, moe in (("compile-time expert rewrites", True), ("post-grad rewrites", False)):
            found = sorted((k, v) for k, v in self.patterns.items() if k.startswith("moe_") == moe and v)
            if found:
                lines.append(f"  {label}: " + ", ".join(f"{k} x{v}" for k, v in found))
        return "\n".join(lines)


def _short_target(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}"
    return getattr(target, "__name__", str(target))


def _fmt_val(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"{_DTYPES.get(v.dtype, str(v.dtype))}[{', '.join(str(d) for d in v.shape)}]"
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(_fmt_val(x) for x in v) + ")"
    if isinstance(v, dict):  # a user-defined Triton kernel's outputs
        return "{" + ", ".join(f"{k}: {_fmt_val(x)}" for k, x in v.items()) + "}"
    return str(v)


def format_graph(graph: torch.fx.Graph | torch.fx.GraphModule) -> str:
    """A normalized, stable printout: ``name: dtype[shape] = op(args)``, one node a line.

    Nodes are numbered in order, symbolic sizes renamed s0, s1, ... in order of appearance,
    sym_size nodes folded into the size they stand for.
    """
    graph = getattr(graph, "graph", graph)
    names: dict[torch.fx.Node, str] = {}
    lines: list[str] = []

    def arg(a):
        if isinstance(a, torch.fx.Node):
            return names[a]
        if isinstance(a, (list, tuple)):
            inner = ", ".join(arg(x) for x in a)
            return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
        if isinstance(a, dict):
            return "{" + ", ".join(f"{k}: {arg(v)}" for k, v in a.items()) + "}"
        if isinstance(a, torch.dtype):
            return _DTYPES.get(a, str(a))
        return repr(a) if isinstance(a, str) else str(a)

    def kwargs(node):
        kw = dict(node.kwargs)
        if "kernel_idx" in kw and "triton_kernel_wrapper" in str(node.target):
            # a user-defined Triton kernel: its name, not its index in the process's side table
            # (which torch._dynamo.reset() clears: format a graph before resetting)
            from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

            kernel = kernel_side_table.id_to_kernel.get(kw["kernel_idx"])
            kw = {"kernel": getattr(getattr(kernel, "fn", kernel), "__name__", "?"),
                  **{k: v for k, v in kw.items() if k not in ("kernel_idx", "constant_args_idx")}}
        return kw

    for node in graph.nodes:
        val = node.meta.get("val")
        if node.op == "call_function" and node.target is torch.ops.aten.sym_size.int:
            names[node] = str(val)
            continue
        if node.op == "output":
            lines.append(f"return {arg(node.args[0])}")
            continue
        names[node] = f"{'in' if node.op == 'placeholder' else 'v'}{len(lines)}"
        if node.op == "placeholder":
            lines.append(f"{names[node]}: {_fmt_val(val)}")
        elif node.op == "get_attr":
            lines.append(f"{names[node]}: {_fmt_val(val)} = constant")
        else:
            args = ", ".join([arg(a) for a in node.args] + [f"{k}={arg(v)}" for k, v in kwargs(node).items()])
            lines.append(f"{names[node]}: {_fmt_val(val)} = {_short_target(node.target)}({args})")
    text = "\n".join(lines)
    symbols: dict[str, str] = {}
    return re.sub(r"\b[su]\d+\b", lambda m: symbols.setdefault(m.group(0), f"s{len(symbols)}"), text)


def _post_grad_only(gm: torch.fx.GraphModule, example_inputs, **_kwargs):
    """An Inductor inner compile that runs the post-grad passes (fp8fx's included) and no codegen."""
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._guards import detect_fake_mode
    from torch._inductor.fx_passes.post_grad import post_grad_passes
    from torch._inductor.virtualized import V

    fake_mode = detect_fake_mode(example_inputs)
    with V.set_fake_mode(fake_mode), torch.no_grad():
        post_grad_passes(gm, is_inference=True)
    _CAPTURED.append(gm)
    return make_boxed_func(gm.forward)


_CAPTURED: list[torch.fx.GraphModule] = []


def post_grad_backend(backend: Optional[Backend] = None, graphs: Optional[list] = None, reports: Optional[list] = None):
    """A torch.compile backend that does what ``backend`` does up to and including the post-grad
    passes, appends each rewritten post-grad GraphModule to ``graphs`` (and each Dynamo graph's
    (fqn, weight, status) rows to ``reports``), and runs the graph eagerly instead of compiling it."""
    from torch._inductor.compile_fx import compile_fx

    backend = backend or backend_with()

    def compile_fn(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]):
        from fp8fx.passes import moe

        rows = [(fqn, w) for fqn, w, _, _ in linear_weights(gm, example_inputs)]
        rows += [(e.fqn, e.value) for e in moe.find_expert_weights(gm, example_inputs)]
        report, gm, example_inputs, keep = backend.prepare(gm, example_inputs)
        start = len(_CAPTURED)
        # No cache hits: a cached graph would skip the passes this backend is here to observe.
        patches = {**backend.inductor_config(), "fx_graph_cache": False}
        try:
            with torch._functorch.config.patch(enable_autograd_cache=False):
                out = compile_fx(gm, example_inputs, inner_compile=_post_grad_only, config_patches=patches)
            # Recorded only once the compile went through: Dynamo may restart it.
            if reports is not None:
                reports.append((rows, report))
            if graphs is not None:
                graphs.extend(_CAPTURED[start:])
        finally:
            del _CAPTURED[start:]
        return out if keep is None else _select_args(out, keep)

    return compile_fn


def explain(model: torch.nn.Module, *example_inputs, config: Optional[BlockFP8Config] = None, **kwargs) -> Explanation:
    """Trace ``model(*example_inputs, **kwargs)`` as ``fp8fx.backend_with(config)`` would compile it
    and report which GEMMs become block-FP8, which stay, and why. The model is not modified."""
    from torch._dynamo.utils import counters

    from fp8fx.passes.linear import COUNTER

    graphs: list[torch.fx.GraphModule] = []
    reports: list = []
    before = Counter(counters[COUNTER])
    compiled = torch.compile(model, backend=post_grad_backend(backend_with(config), graphs, reports), dynamic=True)
    with torch.no_grad():
        compiled(*example_inputs, **kwargs)
    result = Explanation(patterns=Counter(counters[COUNTER]) - before, graphs=[format_graph(g) for g in graphs])
    for rows, report in reports:
        converted = {r.name for r in (report.converted if report else [])}
        skipped = {r.name: r for r in (report.skipped if report else [])}
        for fqn, w in rows:
            if isinstance(w, BlockFP8Tensor):
                result.rewritten.append(LayerRecord(fqn, tuple(w.shape), "quantized before compile"))
            elif fqn in converted:
                result.rewritten.append(LayerRecord(fqn, tuple(w.shape), "quantized at compile time"))
            elif fqn in skipped:
                result.skipped.append(skipped[fqn])
            else:
                result.skipped.append(LayerRecord(fqn, tuple(getattr(w, "shape", ())), "high precision (freeze off)"))
    result.skipped += _experts_outside_graphs(model, {fqn for rows, _ in reports for fqn, _ in rows})
    return result


def _experts_outside_graphs(model: torch.nn.Module, seen: set[str]) -> list[LayerRecord]:
    """3-D expert weights of transformers experts modules that no traced graph read: their GEMMs
    ran outside torch.compile (transformers' "eager" experts loop over ``nonzero()`` does not trace)."""
    from fp8fx.api import EXPERT_PARAMS

    records = []
    for mname, module in model.named_modules():
        impl = getattr(getattr(module, "config", None), "_experts_implementation", None)
        for pname in EXPERT_PARAMS:
            w = getattr(module, pname, None)
            fqn = f"{mname}.{pname}" if mname else pname
            if not isinstance(w, torch.Tensor) or w.dim() != 3 or isinstance(w, BlockFP8Tensor) or fqn in seen:
                continue
            reason = "in no compiled graph: its GEMMs ran outside torch.compile, in high precision"
            if impl == "eager":
                reason += (
                    " (experts_implementation='eager' loops over nonzero() and does not trace; use "
                    "model.set_experts_implementation('grouped_mm') or 'batched_mm')"
                )
            records.append(LayerRecord(fqn, tuple(w.shape), reason))
    return records
