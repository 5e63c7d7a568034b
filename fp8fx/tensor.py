"""BlockFP8Tensor: a weight stored as block-FP8 codes plus per-block scales.

    w[..., N, K] ~= qdata[..., N, K] * scale[..., ceil(N/BN), ceil(K/BK)]   (block-expanded)

Used as an ``nn.Parameter``; ``F.linear(x, w)`` runs ``torch.ops.fp8fx.linear``.
"""

from __future__ import annotations

import hashlib

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from fp8fx import ops  # noqa: F401  (registers torch.ops.fp8fx.*)
from fp8fx import reference

__all__ = ["BlockFP8Tensor"]

aten = torch.ops.aten


class BlockFP8Tensor(torch.Tensor):
    """A block-FP8 quantized weight, reporting the shape and dtype of the original.

    Tensor attributes:
        qdata: float8_e4m3fn codes, [..., N, K] (a leading dim E for MoE experts)
        scale: float32 or float8_e8m0fnu dequantization scales ("weight_scale_inv"),
            [..., ceil(N/BN), ceil(K/BK)]
        act_scale: optional float32 static activation scale, [] (or [E] for experts)

    Non-tensor attributes:
        block_size: (BN, BK), the weight block; BK is also the activation group size
        orig_dtype: the dtype it reports and dequantizes to (the model's compute dtype)
        pack_group: (group, position) when api.pack_projections packed it with its siblings,
            else None; kept by copies and moves, so a compile can tell a group that a move
            unpacked (``backend.freeze_weights``)
    """

    qdata: torch.Tensor
    scale: torch.Tensor
    act_scale: Optional[torch.Tensor]
    block_size: tuple[int, int]
    orig_dtype: torch.dtype

    @staticmethod
    def __new__(cls, qdata, scale, block_size, orig_dtype, act_scale=None):
        return torch.Tensor._make_wrapper_subclass(
            cls, qdata.shape, dtype=orig_dtype, device=qdata.device, requires_grad=False
        )

    def __init__(self, qdata, scale, block_size, orig_dtype, act_scale=None):
        self.qdata = qdata
        self.scale = scale
        self.act_scale = act_scale
        self.block_size = tuple(block_size)
        self.orig_dtype = orig_dtype
        self.pack_group = None

    # -- construction / conversion ------------------------------------------------------

    @classmethod
    def from_hp(
        cls,
        w: torch.Tensor,
        block_size: tuple[int, int] = (128, 128),
        scale_fmt: str = "float32",
        act_scale: Optional[torch.Tensor] = None,
        name: str = "weight",
    ) -> "BlockFP8Tensor":
        """Quantize a high-precision weight [..., N, K] (see reference.quantize_weight)."""
        qdata, scale = reference.quantize_weight(w.detach(), block_size, scale_fmt, name=name)
        return cls(qdata, scale, block_size, w.dtype, act_scale)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return reference.dequantize_weight(self.qdata, self.scale, self.block_size, dtype or self.orig_dtype)

    @property
    def scale_fmt(self) -> str:
        return "ue8m0" if self.scale.dtype == reference.E8M0_DTYPE else "float32"

    def nbytes_fp8(self) -> int:
        """Bytes actually held: codes, scales and the static activation scale."""
        parts = [self.qdata, self.scale] + ([self.act_scale] if self.act_scale is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)

    def __repr__(self, *, tensor_contents=None) -> str:
        static = "" if self.act_scale is None else ", static_act_scale"
        return (
            f"BlockFP8Tensor(shape={tuple(self.shape)}, block_size={self.block_size}, "
            f"scale_fmt={self.scale_fmt}, orig_dtype={self.orig_dtype}, device={self.device}{static})"
        )

    # -- tracing: torch.compile sees the inner tensors ----------------------------------

    def _stable_hash_for_caching(self) -> str:
        # What a compiled graph depends on: metadata, never the values (torch's AOT cache hook).
        names, meta = self.__tensor_flatten__()
        inner = [(n, str(getattr(self, n).dtype), tuple(getattr(self, n).shape)) for n in names]
        key = repr((tuple(self.shape), meta[0], str(meta[1]), inner))
        return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()

    def __tensor_flatten__(self):
        names = ["qdata", "scale"] + (["act_scale"] if self.act_scale is not None else [])
        return names, (self.block_size, self.orig_dtype)

    @classmethod
    def __tensor_unflatten__(cls, inner, meta, outer_size, outer_stride):
        block_size, orig_dtype = meta
        return cls(inner["qdata"], inner["scale"], block_size, orig_dtype, inner.get("act_scale"))

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor], orig_dtype=None) -> "BlockFP8Tensor":
        """A new BlockFP8Tensor with ``fn`` applied to every inner tensor."""
        act = None if self.act_scale is None else fn(self.act_scale)
        out = BlockFP8Tensor(fn(self.qdata), fn(self.scale), self.block_size, orig_dtype or self.orig_dtype, act)
        out.pack_group = self.pack_group
        return out

    # -- op overrides ---------------------------------------------------------------------

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _TORCH_FUNCTIONS:
            return _TORCH_FUNCTIONS[func](*args, **kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ATEN_OPS:
            return _ATEN_OPS[func](*args, **kwargs)
        raise NotImplementedError(
            f"BlockFP8Tensor does not implement {func}. It supports F.linear (2-D weights), "
            f"expert selection along dim 0 of 3-D weights, copies, device moves and "
            f"detach/clone; call .dequantize() for anything else. (For transformers MoE models, "
            f'experts_implementation="eager" uses F.linear on selected experts.)'
        )


_TORCH_FUNCTIONS: dict = {}
_ATEN_OPS: dict = {}


def _implements(table: dict, *funcs):
    def decorator(fn):
        for f in funcs:
            table[f] = fn
        return fn

    return decorator


@_implements(_TORCH_FUNCTIONS, F.linear)
def _linear(input, weight, bias=None):
    if not isinstance(weight, BlockFP8Tensor) or isinstance(input, BlockFP8Tensor):
        raise NotImplementedError("fp8fx: F.linear takes a BlockFP8Tensor as the weight, not as the input")
    if weight.dim() != 2:
        raise ValueError(
            f"fp8fx: F.linear needs a 2-D weight; this BlockFP8Tensor has shape {tuple(weight.shape)} "
            f"(select an expert first)"
        )
    return torch.ops.fp8fx.linear(input, weight.qdata, weight.scale, bias, weight.act_scale, list(weight.block_size))


@_implements(_ATEN_OPS, aten.detach.default, aten.alias.default)
def _detach(t):
    return t._map(torch.Tensor.detach)


@_implements(_ATEN_OPS, aten.clone.default)
def _clone(t, memory_format=None):
    return t._map(torch.Tensor.clone)


@_implements(_ATEN_OPS, aten._to_copy.default)
def _to_copy(t, dtype=None, device=None, non_blocking=False, **_):
    # A dtype request changes the dtype the weight reports (model.to(torch.bfloat16) keeps
    # the fp8 codes); only floating dtypes make sense for it.
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"fp8fx: a BlockFP8Tensor can report a floating dtype only, not {dtype}")
    return t._map(lambda x: x.to(device=device, non_blocking=non_blocking) if device else x.clone(), dtype)


@_implements(_ATEN_OPS, aten.copy_.default)
def _copy_(dst, src, non_blocking=False):
    if not isinstance(dst, BlockFP8Tensor):
        raise NotImplementedError("fp8fx: copying a BlockFP8Tensor into a plain tensor; call .dequantize()")
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(f"fp8fx: copy_ from shape {tuple(src.shape)} into a BlockFP8Tensor of shape {tuple(dst.shape)}")
    if not isinstance(src, BlockFP8Tensor):
        # A high-precision state dict loaded into a quantized model is quantized on the way in.
        src = BlockFP8Tensor.from_hp(src, dst.block_size, dst.scale_fmt, dst.act_scale)
    if src.block_size != dst.block_size:
        raise ValueError(f"fp8fx: copy_ between block sizes {src.block_size} and {dst.block_size}")
    if (src.act_scale is None) != (dst.act_scale is None):
        raise ValueError("fp8fx: copy_ between a BlockFP8Tensor with a static activation scale and one without")
    dst.qdata.copy_(src.qdata, non_blocking)
    if dst.scale.dtype != src.scale.dtype:
        dst.scale = src.scale.to(dst.scale.device)
    else:
        dst.scale.copy_(src.scale, non_blocking)
    if dst.act_scale is not None:
        dst.act_scale.copy_(src.act_scale, non_blocking)
    return dst


def _expert_view(t: BlockFP8Tensor, fn) -> BlockFP8Tensor:
    if t.dim() != 3:
        raise NotImplementedError(
            f"fp8fx: only 3-D expert weights [E, N, K] can be indexed (along dim 0); got shape {tuple(t.shape)}"
        )
    act = None if t.act_scale is None else fn(t.act_scale)
    return BlockFP8Tensor(fn(t.qdata), fn(t.scale), t.block_size, t.orig_dtype, act)


@_implements(_ATEN_OPS, aten.select.int)
def _select(t, dim, index):
    if dim != 0:
        raise NotImplementedError(f"fp8fx: BlockFP8Tensor selects along the expert dim 0 only, got dim={dim}")
    return _expert_view(t, lambda x: x.select(0, index))


@_implements(_ATEN_OPS, aten.index.Tensor)
def _index(t, indices):
    if len(indices) != 1 or indices[0] is None:
        raise NotImplementedError("fp8fx: BlockFP8Tensor indexes along the expert dim 0 only (w[expert_ids])")
    return _expert_view(t, lambda x: x[indices[0]])


@_implements(_ATEN_OPS, aten.slice.Tensor)
def _slice(t, dim=0, start=None, end=None, step=1):
    if dim != 0:
        raise NotImplementedError(f"fp8fx: BlockFP8Tensor slices along the expert dim 0 only, got dim={dim}")
    return _expert_view(t, lambda x: x[start:end:step])


@_implements(_ATEN_OPS, aten.is_same_size.default)
def _is_same_size(a, b):
    return tuple(a.shape) == tuple(b.shape)


torch.serialization.add_safe_globals([BlockFP8Tensor])
