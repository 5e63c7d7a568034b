"""fp8fx's torch.compile backend: Inductor with the fp8fx passes installed, scoped to one compile.

    model = torch.compile(model, backend=fp8fx.backend)                      # defaults
    model = torch.compile(model, backend=fp8fx.backend_with(mode="max-autotune"))

What a compile does, per Dynamo graph:
    1. (unquantized models) every eligible ``linear`` whose weight is a high-precision
       parameter is quantized now and replaced by ``fp8fx.linear`` on frozen fp8 constants
       (same rules and report as ``fp8fx.quantize_``), and every recognized MoE expert GEMM
       on a 3-D expert parameter by ``fp8fx.grouped_linear`` (fp8fx.passes.moe); see
       ``freeze_weights``. (quantized models) linears on BlockFP8Tensor weights read the
       weights' fp8 tensors directly and the subclass arguments are dropped from the call.
    2. Inductor's ``compile_fx`` with ``post_grad_custom_post_pass = fp8fx.passes.PostGradPass``
       (and the mode's options) patched in for this compile only: the pass splits each
       ``fp8fx.linear`` into aten act-quant, which Inductor fuses into the producer, and
       ``fp8fx.block_gemm``, which fp8fx.passes.lowering lowers to a Triton template or an
       extern kernel per shape.
"""

from __future__ import annotations

import dataclasses
import operator
import re
import warnings
import weakref
from typing import Any, Optional, Sequence

import torch
from torch import nn

from fp8fx import ops  # noqa: F401  (registers torch.ops.fp8fx.*)
from fp8fx.api import LayerRecord, QuantizeReport, _skip_reason, quantize_weight_chunked, unpacked_groups
from fp8fx.config import BlockFP8Config
from fp8fx.tensor import BlockFP8Tensor

__all__ = ["Backend", "backend", "backend_with", "freeze_weights", "last_report", "linear_weights"]

_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclasses.dataclass(frozen=True)
class Backend:
    """A torch.compile backend: ``backend(gm, example_inputs) -> compiled callable``.

    Attributes:
        config: BlockFP8Config for weights quantized at compile time (unquantized models) and
            the GEMM kernel preference; models quantized beforehand keep their own format.
        mode: an Inductor mode ("default", "reduce-overhead", "max-autotune",
            "max-autotune-no-cudagraphs") or None.
        cudagraphs: force CUDA graphs on or off (None: what the mode says).
        options: further Inductor config entries, patched for this compile only.
        freeze: quantize high-precision linear weights found in the graph (step 1 above).
        eager_numerics: keep eager's bf16/fp16 roundings between fused ops
            (Inductor's ``emulate_precision_casts``) and IEEE division in Triton, so the fp8
            codes of a compiled model equal eager fp8fx's. Without it Inductor quantizes the
            unrounded fp32 value of a fused producer: slightly different codes.
        quant_in_gemv: decode GEMMs (static token count on the gemv route) read the
            high-precision activations and quantize them in the GEMM kernel (one gemv launch
            per group of GEMMs on one input), instead of in the producer's kernel: an M = 1
            RMSNorm then needs no second (group amax) kernel and the attention output no
            quant kernel. Same fp8 codes either way.
        fused_topk: top-k over at most 512 values per row (MoE routing) runs as fp8fx.topk,
            one Triton launch, instead of torch.topk's select and sort kernels. Same values
            and indices. Not FP8 work: it speeds up the routing around the FP8 experts.
        fused_norm: transformers' RMSNorm (with the residual add before it) feeding a
            quantization runs as fp8fx.rms_norm_quant, one Triton pass per row that writes
            the fp8 codes, instead of Inductor's RMSNorm kernel plus a group-amax kernel
            reading its output back (prefill; decode's gemv quantizes in the GEMM). None (the
            default): on CUDA graphs; True: on every device (the CPU runs the reference);
            False: off. Same fp8 codes but where the fp32 sum of squares, added in another
            order, moves a normalized value across a rounding boundary.
        gemv_prologue: at decode (1-2 tokens, the gemv route), an RMSNorm (with the residual
            add before it) or a SwiGLU product silu(gate) * up that feeds a GEMM is computed
            in the gemv's prologue, before it quantizes, instead of in a kernel of its own.
            None (the default): on CUDA graphs; True: on every device (the CPU runs the
            reference); False: off. Numerics as fused_norm's.
        quant_kernels: on CUDA, the quantization of a SwiGLU product silu(gate) * up (the
            input of down_proj) or of the attention output runs fp8fx's Triton kernel, which
            Inductor compiles and launches like its own, instead of Inductor's fused kernel:
            faster at prefill sizes, and the SwiGLU codes are eager's (the product rounded
            to bf16 as eager rounds it). The fused RMSNorms (fused_norm) launch the same way
            instead of through the op's Python wrapper, which costs the host more per call.
            False: Inductor's kernels and the norm op.
    """

    config: BlockFP8Config = BlockFP8Config()
    mode: Optional[str] = None
    cudagraphs: Optional[bool] = None
    options: tuple[tuple[str, Any], ...] = ()
    freeze: bool = True
    eager_numerics: bool = True
    quant_in_gemv: bool = True
    fused_topk: bool = True
    fused_norm: Optional[bool] = None
    gemv_prologue: Optional[bool] = None
    quant_kernels: bool = True

    def __post_init__(self):
        if self.mode not in _MODES:
            raise ValueError(f"fp8fx.backend_with: mode must be one of {_MODES}, got {self.mode!r}")
        if isinstance(self.options, dict):
            object.__setattr__(self, "options", tuple(sorted(self.options.items())))

    def inductor_config(self, packing: str = "") -> dict[str, Any]:
        """The Inductor config entries patched during this backend's compiles. ``packing``
        (packing_signature of the compile's inputs) enters the pass's uuid."""
        from torch._inductor import config as inductor_config, list_mode_options

        from fp8fx.passes import PostGradPass

        patches = dict(list_mode_options(self.mode)) if self.mode else {}
        if self.eager_numerics:
            patches["emulate_precision_casts"] = True
            if hasattr(inductor_config, "eager_numerics"):  # div_rn for fp32 x / s in Triton
                patches["eager_numerics.division_rounding"] = True
        if self.cudagraphs is not None:
            patches["triton.cudagraphs"] = self.cudagraphs
        patches.update(self.options)
        patches["post_grad_custom_post_pass"] = PostGradPass(self.config, self.quant_in_gemv, self.fused_topk, self.fused_norm,
                                                              self.gemv_prologue, self.quant_kernels, packing)
        return patches

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]):
        global _LAST_REPORT
        from torch._inductor.compile_fx import compile_fx

        from fp8fx.passes import lowering

        lowering.register()
        baked = baked_weights(gm, example_inputs) if self.freeze else []
        report, gm, example_inputs, keep = self.prepare(gm, example_inputs)
        baked = [(i, w) for node, i, w in baked if not node.users]  # the weights prepare moved into the graph
        patches = self.inductor_config(packing_signature(gm, example_inputs))
        if self.config.kernel == "auto":
            compiled = compile_fx(gm, example_inputs, config_patches=patches)
        else:  # the lowering's default choice follows the preference too
            from fp8fx.kernels import dispatch

            with dispatch.preference(self.config.kernel):
                compiled = compile_fx(gm, example_inputs, config_patches=patches)
        if report is not None:  # only once the compile went through (Dynamo may restart it)
            _LAST_REPORT = report
        if self.config.kernel != "auto" and torch.cuda.is_available():
            compiled = _with_kernel_preference(compiled, self.config.kernel)
        compiled = compiled if keep is None else _select_args(compiled, keep)
        if self.freeze:
            _note_baked(baked, example_inputs)
        return _check_weights(compiled, baked) if baked else compiled

    def guard_filter(self, entries) -> list[bool]:
        """A ``guard_filter_fn`` for torch.compile that drops the guards Dynamo puts on the
        inside of quantized weights this backend holds in its graphs:

            model = torch.compile(model, backend=fp8fx.backend,
                                  options={"guard_filter_fn": fp8fx.backend.guard_filter})

        Dynamo guards a BlockFP8Tensor parameter as a tensor (the guard a bf16 weight gets)
        and then its codes and scales as two more tensors, the list of its inner tensors and
        its metadata (the last two in Python): about 4x a bf16 weight's guard time, paid
        before the first kernel of every call. Those weights are constants of the compiled
        graph, and the compiled call checks that the weight passed holds the same codes,
        scales and activation scale objects (``_check_weights``), so the inner guards check
        nothing the call does not. The weight's own type and tensor guards stay. A
        ``freeze=False`` backend reads the weights on every call and keeps every guard, as
        does any weight this backend left as a graph input (3-D expert weights, weights with
        uses other than a linear)."""
        keep = [True] * len(entries)
        if not self.freeze:
            return keep
        outer = {e.name for e in entries if isinstance(e.value, BlockFP8Tensor) and _is_baked(e.value)}
        inner = {f"{n}.{a}" for n in outer for a in ("qdata", "scale", "act_scale", "__tensor_flatten__()[0]")}
        for i, e in enumerate(entries):
            if e.name in inner or (e.name in outer and e.guard_type == "TENSOR_SUBCLASS_METADATA_MATCH"):
                keep[i] = False
        return keep

    def prepare(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]):
        """Step 1 on the Dynamo graph: quantize/unwrap weights in place (``freeze_weights``), then
        drop the subclass inputs left unused. Returns (report or None, the GraphModule and example
        inputs to compile, the positions of the caller's arguments to pass on or None for all)."""
        if not self.freeze:
            return None, gm, example_inputs, None
        report = freeze_weights(gm, example_inputs, self.config)
        dropped = _drop_unused_subclass_inputs(gm, example_inputs)
        if dropped is None:
            return report, gm, example_inputs, None
        return (report, *dropped)


def _with_kernel_preference(compiled, pref: str):
    # The GEMM backend is chosen per call from the real M (dispatch.py), under this preference.
    from fp8fx.kernels import dispatch

    def run(*args):
        with dispatch.preference(pref):
            return compiled(*args)

    return run


def backend_with(
    config: Optional[BlockFP8Config] = None,
    mode: Optional[str] = None,
    cudagraphs: Optional[bool] = None,
    options: Optional[dict[str, Any]] = None,
    freeze: bool = True,
    eager_numerics: bool = True,
    quant_in_gemv: bool = True,
    fused_topk: bool = True,
    fused_norm: Optional[bool] = None,
    gemv_prologue: Optional[bool] = None,
    quant_kernels: bool = True,
) -> Backend:
    """An fp8fx backend with options: ``torch.compile(m, backend=fp8fx.backend_with(mode="max-autotune"))``.

    ``mode`` and ``cudagraphs`` take the place of torch.compile's own ``mode=`` (which
    torch.compile only honours for its built-in Inductor backend).
    """
    return Backend(
        config or BlockFP8Config(), mode, cudagraphs, tuple(sorted((options or {}).items())), freeze, eager_numerics,
        quant_in_gemv, fused_topk, fused_norm, gemv_prologue, quant_kernels,
    )


backend = Backend()

# The report of the weights quantized while compiling the most recent graph.
_LAST_REPORT: Optional[QuantizeReport] = None


def last_report() -> Optional[QuantizeReport]:
    """The QuantizeReport of the most recent graph compiled by an fp8fx backend (freeze step);
    ``fp8fx.explain`` gives the same information without compiling."""
    return _LAST_REPORT


# -- step 1: quantize high-precision linear weights of an unquantized model ---------------

_MODULE_RE = re.compile(r"_modules\['([^']*)'\]")
_PARAM_RE = re.compile(r"_parameters\['([^']*)'\]")
_LINEARS = (torch._C._nn.linear, torch.nn.functional.linear)
_NO_MODULE = object()  # quantize_'s eligibility check wants a module; only its identity is read


def _param_fqn(node: torch.fx.Node) -> Optional[tuple[str, str]]:
    """(module name, parameter name) of a Dynamo placeholder that is a module parameter."""
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return None
    name = source.name() if callable(getattr(source, "name", None)) else str(getattr(source, "name", ""))
    params = _PARAM_RE.findall(name)
    if not params:
        return None
    return ".".join(_MODULE_RE.findall(name)), params[-1]


def packing_signature(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> str:
    """Which weights of a compile share a buffer, and where in it each starts
    (api.pack_projections): the tensors the graph module holds (``prepare`` puts quantized
    weights' codes and scales there) and its inputs (a BlockFP8Tensor's codes). The post-grad
    pass groups packed weights into one GEMM, but Inductor's FX graph cache keys tensors
    without their storage offsets: this enters the pass's uuid, so a graph compiled for packed
    weights is never reused for unpacked ones (nor the reverse). Empty when nothing shares."""
    named = [(f"input {i}", t.qdata if isinstance(t, BlockFP8Tensor) else t) for i, t in enumerate(example_inputs)]
    named += [(n.target, operator.attrgetter(n.target)(gm)) for n in gm.graph.nodes if n.op == "get_attr"]
    owners: dict[int, str] = {}
    parts = []
    for name, t in named:
        if isinstance(t, torch.Tensor) and not isinstance(t, BlockFP8Tensor) and t.numel():
            first = owners.setdefault(t.untyped_storage()._cdata, name)
            if first != name:
                parts.append(f"{name}:{first}:{t.storage_offset()}")
    return ",".join(parts)


def linear_weights(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]):
    """(fqn, weight value, placeholder, [linear nodes]) for each module parameter of the Dynamo
    graph that some ``linear`` call uses as its weight."""
    values = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs))
    uses: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _LINEARS and len(node.args) >= 2:
            w = node.args[1]
            if isinstance(w, torch.fx.Node) and w.op == "placeholder" and _param_fqn(w) is not None:
                uses.setdefault(w, []).append(node)
    for wnode, linears in uses.items():
        mname, pname = _param_fqn(wnode)
        yield (f"{mname}.{pname}" if mname else pname), values.get(wnode), wnode, linears


def _add_constant(gm: torch.fx.GraphModule, name: str, t: torch.Tensor) -> None:
    """Hold ``t`` as a buffer of ``gm``. AOT autograd lifts buffers to graph inputs and, for a
    Dynamo graph, wants a Source for each (it marks them static, as CUDA graphs need)."""
    from torch._dynamo.source import ConstantSource

    gm.register_buffer(name, t)
    if hasattr(gm, "_param_name_to_source"):
        gm._param_name_to_source[name] = ConstantSource(f"fp8fx_{name}")


def _replace_linears(gm: torch.fx.GraphModule, linears, attr: str, parts: dict, block_size) -> None:
    """Each ``linear(x, W, b)`` in ``linears`` -> ``fp8fx.linear(x, qdata, scale, b, act_scale,
    block)`` on the tensors ``parts`` (held by ``gm`` under ``attr`` + suffix)."""
    for suffix, t in parts.items():
        _add_constant(gm, attr + suffix, t)
    for lin in linears:
        x, bias = lin.args[0], (lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias"))
        with gm.graph.inserting_before(lin):
            q, s, act = (gm.graph.get_attr(attr + k) if k in parts else None for k in ("_qdata", "_scale", "_act_scale"))
            new = gm.graph.call_function(torch.ops.fp8fx.linear.default, (x, q, s, bias, act, list(block_size)))
        new.meta.update(lin.meta)
        lin.replace_all_uses_with(new)
        gm.graph.erase_node(lin)


def _unwrap_quantized(gm: torch.fx.GraphModule, found) -> None:
    """Linears on BlockFP8Tensor weights read the weights' fp8 codes and scales directly.

    The tensors are the parameters' own (aliases: in-place updates are seen, no memory is
    added); the subclass placeholders are left without users, and ``Backend`` drops them from
    the compiled call. Otherwise AOT autograd flattens every subclass input on every call, in
    Python (on the H200, compiled fp8fx decode in reduce-overhead mode spent ~0.2 ms more host
    time per step than bf16 with 14 quantized linears; this was the suspected cause).
    """
    changed = False
    for fqn, w, wnode, linears in found:
        if not isinstance(w, BlockFP8Tensor) or w.dim() != 2 or any(u not in linears for u in wnode.users):
            continue
        parts = {"_qdata": w.qdata, "_scale": w.scale}
        if w.act_scale is not None:
            parts["_act_scale"] = w.act_scale
        _replace_linears(gm, linears, "_fp8fx_" + re.sub(r"\W", "_", fqn), parts, w.block_size)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()


def _drop_unused_subclass_inputs(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]):
    """A copy of ``gm`` without the placeholders of BlockFP8Tensor inputs nothing reads (after
    ``_unwrap_quantized``): (the copy, its example inputs, their positions), or None.
    Dynamo's own GraphModule keeps its placeholders: it passes the arguments they name."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        return None
    drop = {i for i, (n, v) in enumerate(zip(placeholders, example_inputs)) if isinstance(v, BlockFP8Tensor) and not n.users}
    if not drop:
        return None
    graph = torch.fx.Graph()
    value_map: dict = {}
    graph.output(graph.graph_copy(gm.graph, value_map))
    for old in placeholders:  # Dynamo's annotations on placeholders, which AOT autograd reads
        for attr, val in vars(old).items():
            if attr.startswith("_dynamo"):
                setattr(value_map[old], attr, val)
    for i in drop:
        graph.erase_node(value_map[placeholders[i]])
    copy = torch.fx.GraphModule(gm, graph)
    copy.meta = gm.meta
    if hasattr(gm, "_param_name_to_source"):
        copy._param_name_to_source = gm._param_name_to_source
    keep = [i for i in range(len(example_inputs)) if i not in drop]
    return copy, [example_inputs[i] for i in keep], keep


def baked_weights(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> list:
    """(placeholder, position, value) of each tensor input of Dynamo's graph, before
    ``prepare``. Those whose placeholder prepare leaves unused are the weights it put into the
    graph as constants (quantized bf16 weights, or a quantized model's codes and scales)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        return []
    return [(n, i, v) for i, (n, v) in enumerate(zip(placeholders, example_inputs))
            if isinstance(v, torch.Tensor) and n.users]


# BlockFP8Tensor weights some compile put into its graph as constants, whose call checks them
# (_check_weights): the weights Backend.guard_filter may drop inner guards for. id -> weak
# reference (a WeakSet would compare tensors with ==, which a BlockFP8Tensor refuses).
_BAKED: dict[int, weakref.ref] = {}


def _is_baked(w) -> bool:
    ref = _BAKED.get(id(w))
    return ref is not None and ref() is w


def _note_baked(baked: list, inputs: Sequence[Any]) -> None:
    """Record the quantized weights ``baked`` ((position, value) pairs) in _BAKED; a weight
    that this compile reads as a graph input instead (``inputs``) leaves it."""
    for _, w in baked:
        if isinstance(w, BlockFP8Tensor) and not _is_baked(w):
            _BAKED[id(w)] = weakref.ref(w, lambda _, key=id(w): _BAKED.pop(key, None))
    for t in inputs:
        if isinstance(t, BlockFP8Tensor):
            _BAKED.pop(id(t), None)


def _check_weights(compiled, baked: list):
    """``compiled`` after a check that Dynamo passes the weights the graph holds as constants.
    Dynamo reuses a compiled graph for any module of the same class whose tensors pass its
    shape guards (a second instance, weights replaced or moved after the compile); the
    constants would then be the first model's, a wrong answer. A BlockFP8Tensor must bring
    the codes, scales and activation scale the graph holds (the same objects: another weight,
    or the same one repacked or given new scales, brings others); a weight quantized at
    compile time must be the same object (a weak reference: the check keeps no bf16 weight
    alive)."""
    parts = [(i, w.qdata, w.scale, w.act_scale) for i, w in baked if isinstance(w, BlockFP8Tensor)]
    plain = [(i, weakref.ref(w)) for i, w in baked if not isinstance(w, BlockFP8Tensor)]

    def run(*args):
        for i, q, s, a in parts:
            w = args[i]
            if w.qdata is not q or w.scale is not s or w.act_scale is not a:
                _stale(i, w)
        for i, ref in plain:
            if args[i] is not ref():
                _stale(i, args[i])
        return compiled(*args)

    return run


def _stale(i: int, w) -> None:
    raise RuntimeError(
        "fp8fx.backend: this compiled graph holds the fp8 weights of the module it was compiled for, and was "
        f"called with other weight tensors (argument {i}, {tuple(w.shape)}): another instance of the same class, "
        "or weights replaced, moved (.to) or repacked after the compile. Compile each model after "
        "torch._dynamo.reset(), recompile after changing weights, or (for a model quantized with fp8fx.quantize_) "
        "use fp8fx.backend_with(freeze=False), which reads the weights on every call.")


def _select_args(compiled, keep: list[int]):
    """``compiled`` called with only the arguments at positions ``keep`` (Dynamo calls a
    backend's result with the graph's arguments, positionally)."""

    def run(*args):
        return compiled(*[args[i] for i in keep])

    return run


def freeze_skip_reason(fqn: str, w, config: BlockFP8Config, shared: Optional[str]) -> Optional[str]:
    """Why the compile-time freeze keeps parameter ``fqn`` in high precision (None: quantize it).
    ``shared`` is the reason to give when the graph uses the weight in ways the rewrite does not
    cover (None when it does not). Eligibility is ``fp8fx.quantize_``'s."""
    mname, pname = fqn.rpartition(".")[::2]
    aliases = {id(w): [fqn, "another use"]} if shared else {}
    reason = _skip_reason(nn.Module(), mname, _NO_MODULE, pname, w, config, None, aliases)
    if reason is None and w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        reason = f"dtype {w.dtype} cannot be quantized"
    if reason is None and type(w) not in (torch.Tensor, nn.Parameter):
        reason = f"a {type(w).__name__} weight is left to its own implementation"
    if reason is not None and reason.startswith("tied to"):
        reason = shared
    return reason


def require_no_grad(fqn: str, w: torch.Tensor) -> None:
    if w.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"fp8fx.backend: {fqn} requires grad and grad mode is on. Compiling an unquantized "
            f"model with fp8fx quantizes its weights as frozen inference constants; call "
            f"model.requires_grad_(False) or compile under torch.no_grad()/inference_mode(), "
            f"or quantize first with fp8fx.quantize_(model)"
        )


def freeze_weights(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], config: BlockFP8Config) -> QuantizeReport:
    """Quantize the high-precision weights of the Dynamo graph's linears and expert GEMMs, in the graph.

    Each eligible ``linear(x, W, b)`` whose weight W is a module parameter becomes
    ``fp8fx.linear(x, qdata, scale, b, None, block)`` on fp8 constants held by ``gm``; the
    placeholder W stays (Dynamo still passes it) but nothing reads it, so the compiled
    artifact holds no high-precision copy. 3-D expert weights and their GEMMs go the same way
    through ``fp8fx.passes.moe`` (into ``fp8fx.grouped_linear``). Eligibility is
    ``fp8fx.quantize_``'s. A graph with any BlockFP8Tensor weight comes from a model quantized
    with ``quantize_``: it is left as it is (its high-precision weights were kept on purpose).
    """
    from fp8fx.passes import moe

    report = QuantizeReport()
    found = list(linear_weights(gm, example_inputs))
    experts = moe.find_expert_weights(gm, example_inputs)
    weights = [(fqn, w) for fqn, w, _, _ in found] + [(e.fqn, e.value) for e in experts]
    if config.activation_scheme == "static" and not any(isinstance(w, BlockFP8Tensor) for _, w in weights):
        raise ValueError(
            "fp8fx.backend: activation_scheme='static' needs calibrated activation scales, which a "
            "compile-time quantization cannot compute; load a checkpoint that carries them"
        )
    if any(isinstance(w, BlockFP8Tensor) for _, w in weights):
        # A model that went through fp8fx.quantize_: its choices (exclusions, filter_fn) stand.
        for fqn, w in weights:
            if not isinstance(w, BlockFP8Tensor) and isinstance(w, torch.Tensor):
                report.skipped.append(LayerRecord(fqn, tuple(w.shape), "kept in high precision by fp8fx.quantize_"))
        lost = unpacked_groups([w for _, w in weights])
        if lost:
            msg = (f"fp8fx.backend: {len(lost)} group(s) of projections that fp8fx packed into one buffer are not "
                   f"packed any more (e.g. {lost[0]}): moving the model to another device (model.to) or replacing "
                   "weights copies each weight on its own. A prefill then runs one GEMM per weight instead of one per group; call "
                   "fp8fx.api.pack_projections(model) again before compiling.")
            report.notes.append(msg)
            warnings.warn(msg, stacklevel=2)
        _unwrap_quantized(gm, found)
        return report
    for fqn, w, wnode, linears in found:
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            continue
        other_users = [u for u in wnode.users if u not in linears]
        shared = "used by more than a linear (tied or shared weight)" if other_users else None
        reason = freeze_skip_reason(fqn, w, config, shared)
        if reason is not None:
            report.skipped.append(LayerRecord(fqn, tuple(w.shape), reason))
            continue
        require_no_grad(fqn, w)
        q, s = quantize_weight_chunked(w.detach(), config.block_size, config.scale_fmt, fqn)
        _replace_linears(gm, linears, "_fp8fx_" + re.sub(r"\W", "_", fqn), {"_qdata": q, "_scale": s}, config.block_size)
        report.converted.append(LayerRecord(fqn, tuple(w.shape)))
        report.bytes_before += w.numel() * w.element_size()
        report.bytes_after += q.numel() * q.element_size() + s.numel() * s.element_size()
    moe.rewrite(gm, experts, config, report)
    if report.converted:
        gm.graph.lint()
        gm.recompile()
    elif not report.skipped:
        report.notes.append("no high-precision linear or expert weights in this graph")
    return report
