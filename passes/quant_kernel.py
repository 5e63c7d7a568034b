"""Prefill quantization kernels that Inductor launches: fp8fx's Triton kernels in the graph.

    q, s = fp8fx.act_quant(mul(silu(g), u), 128, ue8m0)      (the SwiGLU input of down_proj)
==> q, s = user kernel act_quant._act_quant_kernel(g, u, SILU_MUL=True)
    q, s = fp8fx.act_quant(view(clone(transpose(getitem(sdpa(...), 0)))), 128, ue8m0)
==> q, s = user kernel act_quant._act_quant_kernel(the attention output's rows, SILU_MUL=False)
    q, s, h = fp8fx.rms_norm_quant(x, residual?, w, eps_tensor?, eps, ue8m0)   (passes/norm_quant.py)
==> q, s, h = user kernel norm_quant._rms_norm_quant_kernel(x, residual?, w, eps, ...)
    (s column-major, strides (1, T): the layout the block GEMMs read)

Each kernel is inserted as ``triton_kernel_wrapper_functional`` (the node Dynamo makes for a
user-defined Triton kernel) writing fresh buffers: Inductor compiles it into its own output
code and launches it from the generated wrapper with its own launcher, with sizes from the
graph's symbols, so one graph serves every token count; its reinplacing pass drops the
clones. A 0-dim CPU eps input reaches the norm kernel as Inductor passes such inputs to its
own kernels: as its item().

Why: the two quantizations are the prefill's largest quant kernels, and Inductor's for each
is slower than fp8fx's (NVIDIA H200, scripts/probe_silu_quant.py, T = 2048):
- silu(g) * u at 2048 x 14336, where g and u are the gate and up GEMMs' outputs: Inductor's
  fused kernel 61 us in the model, kernels.act_quant.silu_mul_quant 52 us; it also rounds
  silu(g) and the product to bf16 as eager torch does, so its codes are eager's;
- the attention output at 2048 x 4096 (flash attention writes it token-major, so
  ``.transpose(1, 2).contiguous()`` only renames it): Inductor copies and quantizes it in one
  kernel, 10.6-13.9 us; act_quant reads the rows in place, 7.6 us.
And a compiled prefill is partly host-bound (scripts/prefill_gaps.py): fp8fx.rms_norm_quant
called from the wrapper costs a Python call and Triton's Python launch per norm; Inductor's
launcher costs what any of its kernels does.

Runs in the linear rewrite (passes/linear.py) after the RMSNorms are fused and before the
remaining quantizations are decomposed, on CUDA tensors only (Inductor's CPU backend
cannot run Triton), for 128-groups over a static K that is a multiple of 128 and rows at
static strides. The product or the attention output must have no other reader. Counters:
quant_kernel_silu, quant_kernel_attention, quant_kernel_norm.
"""

from __future__ import annotations

import functools
import operator

import torch
from torch._dynamo.utils import counters
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fp8fx.passes.linear import COUNTER, _call, _is_hp_tensor, _val
from fp8fx.passes.norm_quant import _is
from fp8fx.passes.prologue import _silu_mul

__all__ = ["BLOCK_T", "DEVICES", "NUM_WARPS", "rewrite"]

_aten = torch.ops.aten
BLOCK_T = 16  # rows per program: 52.0 us at 2048 x 14336 (t8w2 51.9, t32w8 52.2, t32w4 63.0)
NUM_WARPS = 4
_VIEWS = (_aten.view.default, _aten._unsafe_view.default, _aten.reshape.default)
# Where the rewrite applies. Inductor's CPU backend cannot run Triton; the CPU tests add "cpu"
# and run the rewritten graph eagerly under the Triton interpreter (tests/test_quant_kernel.py).
DEVICES = ("cuda",)


def _attention_ops() -> tuple:
    names = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_flash_attention_forward", "_efficient_attention_forward",
             "_scaled_dot_product_flash_attention_for_cpu")
    return tuple(getattr(_aten, name).default for name in names if hasattr(_aten, name))


@functools.cache
def _kernel(fn, num_warps: int):
    """Triton kernel ``fn`` with its launch config, as a one-config autotuner (how a
    user-defined Triton kernel carries num_warps into Inductor); one object per config, so
    the side table holds each once."""
    import triton

    return triton.autotune(configs=[triton.Config({}, num_warps=num_warps)], key=[])(fn)


def _row_major(v: torch.Tensor) -> bool:
    """v is laid out densely in row-major order (provably, for every value of its symbols)."""
    expected = 1
    for size, stride in reversed(list(zip(v.shape, v.stride()))):
        if not statically_known_true(size == 1) and not statically_known_true(stride == expected):
            return False
        expected = expected * size
    return True


def _attention_rows(x: torch.fx.Node):
    """The node whose memory holds x's rows in place (x without its copy), when x is the
    attention output: views of a clone of (views of) an attention op's output 0, row-major."""
    node = x
    while _is(node, *_VIEWS):
        node = node.args[0]
    if _is(node, _aten.clone.default) and len(node.users) == 1:
        node = node.args[0]
    src = node
    while _is(src, _aten.transpose.int, _aten.permute.default, *_VIEWS):
        src = src.args[0]
    if not (_is(src, operator.getitem) and src.args[1] == 0 and _is(src.args[0], *_attention_ops())):
        return None
    v = _val(node)
    ok = isinstance(v, torch.Tensor) and _row_major(v) and statically_known_true(v.numel() == _val(x).numel())
    return node if ok else None


def _rows_stride(v: torch.Tensor):
    """The one static stride between consecutive K-rows of v [..., K] (unit column stride, the
    leading dims collapsing onto rows: a slice of a row-major tensor's columns), or None."""
    if v.dim() < 2 or v.stride(-1) != 1 or not isinstance(v.stride(-2), int):
        return None
    for d in range(v.dim() - 2):
        collapses = statically_known_true(v.stride(d) == v.stride(d + 1) * v.shape[d + 1])
        if not (statically_known_true(v.shape[d] == 1) or collapses):
            return None
    return v.stride(-2)


def _size(graph, size, source: torch.fx.Node):
    """``size`` (an int or a SymInt of x's shape) as an int or a sym_size node of ``source``,
    a kernel input that stays in the graph (not x: its node may be a product the rewrite drops);
    None when no dimension of source is that size."""
    if isinstance(size, int):
        return size
    for d, s in enumerate(_val(source).shape):
        if not isinstance(s, int) and statically_known_true(s == size):
            return _call(graph, _aten.sym_size.int, source, d)
    return None


def _mul(graph, a, b):
    if isinstance(a, int) and isinstance(b, int):
        return a * b
    if isinstance(a, int) and a == 1 or isinstance(b, int) and b == 1:
        return b if isinstance(a, int) else a
    return _call(graph, operator.mul, a, b)


def _cdiv(graph, a, b: int):
    if isinstance(a, int):
        return -(-a // b)
    return _call(graph, operator.floordiv, _call(graph, operator.add, a, b - 1), b)


def _outputs(graph, like: torch.fx.Node, source: torch.fx.Node):
    """(lead sizes, rows T, q, s) for a quantization shaped like ``like`` [..., K]: q fp8 [..., K],
    s fp32 [..., K / 128] column-major over the flattened rows (kernels.norm_quant.scales_like),
    the sizes taken from ``source``; None when one cannot be."""
    vl = _val(like)
    k, device = vl.shape[-1], vl.device
    lead = [_size(graph, size, source) for size in vl.shape[:-1]]
    if None in lead:
        return None
    strides, t = [], 1
    for size in reversed(lead):
        strides.insert(0, t)
        t = _mul(graph, t, size)
    q = _call(graph, _aten.empty.memory_format, [*lead, k], dtype=torch.float8_e4m3fn, device=device)
    s = _call(graph, _aten.empty_strided.default, [*lead, k // 128], [*strides, t], dtype=torch.float32,
              device=device)
    return lead, t, q, s


def _hop(graph, fn, num_warps: int, grid: tuple, args: dict, outputs: list[str]) -> list[torch.fx.Node]:
    """A triton_kernel_wrapper_functional node launching Triton kernel ``fn`` on ``args`` (nodes,
    ints, floats, bools), writing the fresh buffers ``outputs``; their getitem nodes."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table, triton_kernel_wrapper_functional
    from torch._inductor.virtualized import V

    hop = dict(kernel_idx=kernel_side_table.add_kernel(_kernel(fn, num_warps)),
               constant_args_idx=kernel_side_table.add_constant_args({}), grid=[grid], tma_descriptor_metadata={},
               kwargs=args, tensors_to_clone=outputs)
    node = graph.call_function(triton_kernel_wrapper_functional, (), hop)
    with V.fake_mode:
        node.meta["val"] = triton_kernel_wrapper_functional(**torch.fx.map_arg(hop, lambda n: n.meta["val"]))
    return [_call(graph, operator.getitem, node, out) for out in outputs]


def _act_quant(graph, like: torch.fx.Node, x, x_stride: int, u, u_stride: int, ue8m0: bool):
    """Nodes quantizing rows x (silu(x) * u where u is not x) shaped like ``like``: (q, s) or None."""
    from fp8fx.kernels.act_quant import _act_quant_kernel, interpreting

    out = _outputs(graph, like, x)
    if out is None:
        return None
    _, t, q, s = out
    k = _val(like).shape[-1]
    args = dict(x_ptr=x, u_ptr=u, q_ptr=q, s_ptr=s, T=t, TP=t, K=k, stride_xt=x_stride, stride_ut=u_stride,
                stride_qt=k, stride_st=1, stride_sg=t, SILU_MUL=x is not u, UE8M0=bool(ue8m0),
                EXACT_CAST=interpreting(), BLOCK_T=BLOCK_T, GROUP=128)
    grid = (_cdiv(graph, t, BLOCK_T), k // 128, 1)
    return _hop(graph, _act_quant_kernel, NUM_WARPS, grid, args, ["q_ptr", "s_ptr"])


def _rms_norm_quant(graph, node: torch.fx.Node):
    """Nodes for fp8fx.rms_norm_quant's kernel: (q, s, h or None), or None where its launch
    cannot be expressed (strides that are not static, an eps that is not a graph input)."""
    from fp8fx.kernels.act_quant import interpreting
    from fp8fx.kernels.host import next_power_of_2
    from fp8fx.kernels.norm_quant import GROUP, _rms_norm_quant_kernel, num_warps

    x, residual, weight, eps_tensor, eps, ue8m0 = node.args
    vx, vw = _val(x), _val(weight)
    k = vx.shape[-1]
    strides = [_rows_stride(_val(t)) for t in (x, residual) if t is not None]
    if None in strides or vw.stride(0) != 1:
        return None
    if eps_tensor is not None:
        # Inductor passes a 0-dim CPU graph input to a Triton kernel as its item() (a float64
        # scalar); the interpreter would pass the tensor, so the CPU tests keep the op there.
        if eps_tensor.op != "placeholder" or interpreting():
            return None
        eps = eps_tensor
    out = _outputs(graph, x, x)
    if out is None:
        return None
    lead, t, q, s = out
    h = None
    if residual is not None:
        h = _call(graph, _aten.empty.memory_format, [*lead, k], dtype=vx.dtype, device=vx.device)
    block_g = next_power_of_2(k // GROUP)
    args = dict(x_ptr=x, r_ptr=residual if residual is not None else x, w_ptr=weight, h_ptr=h if h is not None else x,
                q_ptr=q, s_ptr=s, M=t, K=k, eps=eps, stride_xm=strides[0], stride_rm=strides[-1],
                HAS_RESIDUAL=residual is not None, UE8M0=bool(ue8m0), EXACT_CAST=interpreting(), BLOCK_G=block_g,
                GROUP=GROUP)
    outs = _hop(graph, _rms_norm_quant_kernel, num_warps(block_g * GROUP), (t, 1, 1), args,
                ["q_ptr", "s_ptr"] + (["h_ptr"] if h is not None else []))
    return outs[0], outs[1], outs[2] if h is not None else None


def _empty(v: torch.Tensor) -> bool:
    """A static size 0 (symbolic sizes are at least 2: Dynamo specializes 0 and 1)."""
    return any(isinstance(d, int) and d == 0 for d in v.shape)


def _replace(graph, node: torch.fx.Node, outs) -> None:
    """Readers of getitem(node, i) read outs[i]; the getitems and node go (an unread getitem
    may have no replacement, None)."""
    for use in list(node.users):
        if outs[use.args[1]] is not None:
            use.replace_all_uses_with(outs[use.args[1]])
        graph.erase_node(use)
    graph.erase_node(node)


def rewrite(graph: torch.fx.Graph) -> None:
    """Quantize SwiGLU products and attention outputs on CUDA with fp8fx's kernel, and launch
    the fused RMSNorms' kernel from Inductor (module docstring)."""
    for node in list(graph.find_nodes(op="call_function", target=torch.ops.fp8fx.rms_norm_quant.default)):
        vx = _val(node.args[0])
        if vx.device.type not in DEVICES or _empty(vx):
            continue
        with graph.inserting_before(node):
            out = _rms_norm_quant(graph, node)
        if out is None or (out[2] is None and any(use.args[1] == 2 and use.users for use in node.users)):
            continue
        _replace(graph, node, out)  # without a residual, getitem 2 is unread
        counters[COUNTER]["quant_kernel_norm"] += 1
    for node in list(graph.find_nodes(op="call_function", target=torch.ops.fp8fx.act_quant.default)):
        x, group_size, ue8m0 = node.args
        if not _is_hp_tensor(x) or group_size != 128 or len(x.users) != 1:
            continue
        vx = _val(x)
        k = vx.shape[-1]
        if vx.device.type not in DEVICES or not isinstance(k, int) or k % 128 or _empty(vx):
            continue
        with graph.inserting_before(node):
            pair = _silu_mul(x)
            if pair is not None:
                g, u = pair
                strides = (_rows_stride(_val(g)), _rows_stride(_val(u)))
                if None in strides or _val(g).dtype != vx.dtype:
                    continue
                out = _act_quant(graph, x, g, strides[0], u, strides[1], ue8m0)
                kind = "quant_kernel_silu"
            else:
                rows = _attention_rows(x)
                if rows is None:
                    continue
                out = _act_quant(graph, x, rows, k, rows, k, ue8m0)
                kind = "quant_kernel_attention"
        if out is None:
            continue
        _replace(graph, node, out)
        counters[COUNTER][kind] += 1
