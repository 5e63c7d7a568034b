"""quantize_(model): replace eligible weights with BlockFP8Tensor parameters, in place.

What is converted:
    nn.Linear.weight                          [N, K]      -> BlockFP8Tensor
    experts.{gate_up_proj, up_proj, down_proj} [E, N, K]  -> BlockFP8Tensor (transformers v5
                                                             experts modules, untransposed)
What stays in high precision (and is reported): the output embedding / lm_head, tied
weights, excluded modules, shapes an FP8 GEMM cannot take (N or K not a multiple of 16).

Projections of one input (q/k/v, gate/up: PROJECTION_GROUPS) are then packed: their codes
and scales become row ranges of one buffer each (pack_projections), so a compiled prefill
runs them as one GEMM (passes/linear.py, fp8fx::block_gemm_cat). Nothing is copied at run
time and no memory is added; eager calls read their own rows as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from fp8fx import reference
from fp8fx.config import BlockFP8Config
from fp8fx.tensor import BlockFP8Tensor

__all__ = [
    "quantize_",
    "plan_quantization",
    "QuantizationPlan",
    "QuantizeReport",
    "LayerRecord",
    "expert_param_names",
    "quantize_weight_chunked",
    "pack_projections",
    "PROJECTION_GROUPS",
]

EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj")
# Rows quantized at a time: bounds quantize_'s temporaries to a few of these, not a layer.
_CHUNK_ELEMS = 1 << 24
_GEMM_ALIGN = 16  # fp8 GEMMs need 16-byte rows: N and K multiples of 16
# Child linears of one module that read one input in transformers' models, in the order
# their weights are packed (the order the model calls them in).
PROJECTION_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass(eq=False)
class PackGroup:
    """What pack_projections packed together: the group's qualified name and its size. Each
    member weight holds (group, position) as ``pack_group``."""

    name: str
    size: int


@dataclass
class LayerRecord:
    name: str  # parameter's qualified name
    shape: tuple[int, ...]
    reason: str = ""


@dataclass
class QuantizeReport:
    converted: list[LayerRecord] = field(default_factory=list)
    skipped: list[LayerRecord] = field(default_factory=list)
    bytes_before: int = 0  # of the converted weights, in their original dtype
    bytes_after: int = 0  # of the same weights as fp8 codes + scales
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fp8fx: converted {len(self.converted)} weights, skipped {len(self.skipped)}"]
        if self.bytes_before:
            lines.append(
                f"  weight bytes: {self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB "
                f"({self.bytes_after / self.bytes_before:.1%})"
            )
        lines += [f"  skipped {r.name} {list(r.shape)}: {r.reason}" for r in self.skipped]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def expert_param_names(module: nn.Module) -> list[str]:
    """3-D expert weights of a transformers v5 experts module stored as [E, N, K]."""
    if getattr(module, "is_transposed", False):
        return []
    return [n for n in EXPERT_PARAMS if isinstance(getattr(module, n, None), torch.Tensor) and getattr(module, n).dim() == 3]


def quantize_weight_chunked(w: torch.Tensor, block_size, scale_fmt: str, name: str):
    """reference.quantize_weight over block-aligned row chunks (and experts one at a time),
    so temporaries stay far below one layer's size. Bit-identical to the unchunked call."""
    *lead, n, k = w.shape
    gn, gk = reference.scale_grid(n, k, block_size)
    q = torch.empty(w.shape, dtype=reference.FP8_DTYPE, device=w.device)
    scale_dtype = reference.E8M0_DTYPE if scale_fmt == "ue8m0" else torch.float32
    s = torch.empty(*lead, gn, gk, dtype=scale_dtype, device=w.device)
    rows = max(1, _CHUNK_ELEMS // max(1, k * block_size[0])) * block_size[0]
    flat_w, flat_q, flat_s = w.reshape(-1, n, k), q.view(-1, n, k), s.view(-1, gn, gk)
    for idx in range(flat_w.shape[0]):
        label = f"{name}[{idx}]" if lead else name
        for r0 in range(0, n, rows):
            qc, sc = reference.quantize_weight(flat_w[idx, r0 : r0 + rows], block_size, scale_fmt, name=label)
            b0 = r0 // block_size[0]
            flat_q[idx, r0 : r0 + rows] = qc
            flat_s[idx, b0 : b0 + sc.shape[0]] = sc
    return q, s


def _candidates(model: nn.Module):
    """(module_name, module, param_name) for every weight quantize_ considers."""
    for mname, module in model.named_modules():
        if isinstance(module, nn.Linear):
            yield mname, module, "weight"
        else:
            for pname in expert_param_names(module):
                yield mname, module, pname


def _output_embedding(model: nn.Module) -> Optional[nn.Module]:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def _skip_reason(model, mname, module, pname, w, config, filter_fn, aliases) -> Optional[str]:
    fqn = f"{mname}.{pname}" if mname else pname
    if isinstance(w, BlockFP8Tensor):
        return "already quantized"
    pattern = config.excludes(mname)
    if pattern is not None:
        return f"excluded by modules_to_not_convert pattern {pattern!r}"
    if filter_fn is not None and not filter_fn(module, mname):
        return "excluded by filter_fn"
    out_emb = _output_embedding(model)
    if module is out_emb or (out_emb is None and mname.split(".")[-1] == "lm_head"):
        return "output embedding (kept in high precision, as transformers does)"
    others = [a for a in aliases.get(id(w), []) if a != fqn]
    if others:
        return f"tied to {others[0]}"
    n, k = w.shape[-2:]
    if n % _GEMM_ALIGN or k % _GEMM_ALIGN:
        return f"shape {tuple(w.shape)}: FP8 GEMMs need out and in features that are multiples of {_GEMM_ALIGN}"
    return None


def _validate(fqn: str, w: torch.Tensor) -> None:
    if w.is_meta:
        raise ValueError(
            f"fp8fx.quantize_: {fqn} is on the meta device (no data to quantize); materialize the model "
            f"first, or load an FP8 checkpoint with fp8fx.load_quantized"
        )
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            f"fp8fx.quantize_: {fqn} has dtype {w.dtype}; only float32, float16 and bfloat16 weights can be quantized"
        )
    if not torch.isfinite(w).all():
        raise ValueError(f"fp8fx.quantize_: {fqn} contains NaN or Inf; block-FP8 quantization needs finite weights")


@dataclass
class QuantizationPlan:
    """What quantize_ would do with each weight of a model, decided from shapes and names
    alone (works on a meta-device model): ``todo`` holds (qualified name, module, param name)."""

    todo: list[tuple[str, nn.Module, str]] = field(default_factory=list)
    skipped: list[LayerRecord] = field(default_factory=list)
    already: list[str] = field(default_factory=list)


def plan_quantization(
    model: nn.Module,
    config: Optional[BlockFP8Config] = None,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
) -> QuantizationPlan:
    """Which weights of ``model`` quantize_ converts, and why it keeps the others."""
    config = config or BlockFP8Config()
    plan = QuantizationPlan()
    aliases: dict[int, list[str]] = {}
    for fqn, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(fqn)
    for mname, module, pname in _candidates(model):
        w = getattr(module, pname)
        fqn = f"{mname}.{pname}" if mname else pname
        reason = _skip_reason(model, mname, module, pname, w, config, filter_fn, aliases)
        if reason is None:
            plan.todo.append((fqn, module, pname))
        elif reason == "already quantized":
            plan.already.append(fqn)
        else:
            plan.skipped.append(LayerRecord(fqn, tuple(w.shape), reason))
    return plan


def _packable(weights: list) -> bool:
    """BlockFP8Tensor 2-D weights of one K, block, scale dtype, dtype and device, with no
    static activation scale, each N a whole number of weight blocks (so the scale rows split
    where the code rows do)."""
    if not all(isinstance(w, BlockFP8Tensor) and w.dim() == 2 and w.act_scale is None for w in weights):
        return False
    first = weights[0]
    return all(
        w.shape[1] == first.shape[1] and w.block_size == first.block_size and w.scale.dtype == first.scale.dtype
        and w.orig_dtype == first.orig_dtype and w.device == first.device and w.shape[0] % w.block_size[0] == 0
        and w.scale.shape == (w.shape[0] // w.block_size[0], first.scale.shape[1])
        for w in weights
    )


def packed_rows(tensors: list) -> bool:
    """``tensors`` are contiguous row ranges of one buffer, back to back in list order (what
    pack_projections makes of codes and of scales). Works on fake tensors."""
    first = tensors[0]
    offset = first.storage_offset()
    for t in tensors:
        if (t.dim() != 2 or not t.is_contiguous() or t.shape[1] != first.shape[1] or t.storage_offset() != offset
                or t.untyped_storage()._cdata != first.untyped_storage()._cdata):
            return False
        offset += t.numel()
    return True


def _weights_packed(weights: list) -> bool:
    """The BlockFP8Tensors' codes, and their scales, are back-to-back row ranges of one buffer each."""
    return packed_rows([w.qdata for w in weights]) and packed_rows([w.scale for w in weights])


def _cat_bytes(tensors: list) -> torch.Tensor:
    """torch.cat along rows through uint8 views: float8 codes and e8m0 scales need no cat
    kernel of their own dtype."""
    return torch.cat([t.contiguous().view(torch.uint8) for t in tensors]).view(tensors[0].dtype)


def pack_projections(model: nn.Module, groups=PROJECTION_GROUPS) -> list[str]:
    """Pack the quantized weights of each group of sibling linears (a module's q_proj, k_proj,
    v_proj; gate_proj, up_proj) into one codes buffer and one scales buffer, in place: each
    weight keeps its object and values, its ``qdata`` and ``scale`` become row ranges of the
    joint buffers. A compiled prefill then runs the group as one GEMM; eager calls and
    state_dict are unchanged. Groups that are not all quantized alike are left as they are.
    Returns the packed groups' qualified names ("model.layers.0.self_attn.{q,k,v}_proj").

    Moving the model afterwards (``model.to``) copies each weight on its own, which unpacks
    it (and a graph compiled before the move refuses the moved weights: recompile). Call this
    again after a move; a compile of a model whose groups a move unpacked warns (each packed
    weight keeps its group as ``pack_group``, see ``unpacked_groups``)."""
    packed = []
    for mname, module in model.named_modules():
        for names in groups:
            children = [module._modules.get(n) for n in names]
            if any(c is None or not isinstance(getattr(c, "weight", None), BlockFP8Tensor) for c in children):
                continue
            weights = [c.weight for c in children]
            if not _packable(weights) or len({id(w) for w in weights}) != len(weights):
                continue
            prefix = f"{mname}." if mname else ""
            group = PackGroup(prefix + "{" + ",".join(names) + "}", len(weights))
            for i, w in enumerate(weights):
                w.pack_group = (group, i)
            if _weights_packed(weights):
                continue  # already packed
            with torch.no_grad():
                codes, scales = _cat_bytes([w.qdata for w in weights]), _cat_bytes([w.scale for w in weights])
                row = srow = 0
                for w in weights:
                    n, ns = w.qdata.shape[0], w.scale.shape[0]
                    w.qdata, w.scale = codes[row:row + n], scales[srow:srow + ns]
                    row, srow = row + n, srow + ns
            packed.append(group.name)
    return packed


def unpacked_groups(weights) -> list[str]:
    """Names of the groups pack_projections packed whose members are all among ``weights``
    (BlockFP8Tensors) but no longer share one buffer (a move to another device unpacks them)."""
    groups: dict[int, list] = {}
    for w in weights:
        if isinstance(w, BlockFP8Tensor) and w.pack_group is not None:
            groups.setdefault(id(w.pack_group[0]), []).append(w)
    lost = []
    for members in groups.values():
        group = members[0].pack_group[0]
        members = sorted({id(w): w for w in members}.values(), key=lambda w: w.pack_group[1])
        if len(members) == group.size and not _weights_packed(members):
            lost.append(group.name)
    return lost


def quantize_(
    model: nn.Module,
    config: Optional[BlockFP8Config] = None,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    progress: Optional[bool] = None,
    pack: bool = True,
) -> QuantizeReport:
    """Replace eligible weights of ``model`` with block-FP8 ``BlockFP8Tensor`` parameters.

    Args:
        model: any nn.Module (transformers models included); modified in place.
        config: a BlockFP8Config (defaults: 128x128 blocks, float32 scales, dynamic activations).
        filter_fn: ``filter_fn(module, qualified_name) -> bool``; False keeps a module as it is.
        progress: show a progress bar (default: when stderr is a terminal).
        pack: pack sibling projections (q/k/v, gate/up) into one buffer each
            (pack_projections), so a compiled prefill runs each group as one GEMM.

    Every weight is checked before any is changed, so a failure leaves the model as it was.
    Weights are converted one at a time; the original is released right after.
    """
    from tqdm.auto import tqdm

    config = config or BlockFP8Config()
    if config.activation_scheme == "static":
        raise ValueError(
            "fp8fx.quantize_: activation_scheme='static' needs calibrated activation scales, which "
            "quantize_ does not compute; load a checkpoint that carries them (fp8fx.load_quantized) "
            "or use activation_scheme='dynamic'"
        )
    if config.kernel != "auto":
        from fp8fx.kernels import dispatch

        dispatch.set_preference(config.kernel)  # process-wide: kernels are chosen per call
    plan = plan_quantization(model, config, filter_fn)
    report = QuantizeReport(skipped=plan.skipped)
    report.notes += [f"{fqn} is already a BlockFP8Tensor; left as it is" for fqn in plan.already]
    for fqn, module, pname in plan.todo:
        _validate(fqn, getattr(module, pname))

    todo = plan.todo
    for fqn, module, pname in tqdm(todo, desc="fp8fx quantize", unit="weight", disable=None if progress is None else not progress):
        w = getattr(module, pname)
        q, s = quantize_weight_chunked(w.detach(), config.block_size, config.scale_fmt, fqn)
        new = BlockFP8Tensor(q, s, config.block_size, w.dtype)
        report.converted.append(LayerRecord(fqn, tuple(w.shape)))
        report.bytes_before += w.numel() * w.element_size()
        report.bytes_after += new.nbytes_fp8()
        setattr(module, pname, nn.Parameter(new, requires_grad=False))
        del w
    if not todo and not report.notes:
        report.notes.append("nothing eligible to quantize; the model is unchanged")
    packed = pack_projections(model) if pack else []
    if packed:
        report.notes.append(f"{len(packed)} groups of projections of one input packed into one buffer each "
                            f"(one GEMM per group at prefill), e.g. {packed[0]}")
    if any(pname != "weight" for _, _, pname in todo):
        from fp8fx.moe import use_fp8_experts

        switched = use_fp8_experts(model)
        if switched:
            report.notes.append(
                f"{len(switched)} experts modules now use experts_implementation='fp8fx' (grouped block-FP8 GEMMs)"
            )
    return report
