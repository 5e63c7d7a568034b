"""Block-FP8 checkpoints in the HF FineGrainedFP8 / DeepSeek-V3 safetensors layout.

    <prefix>.weight               float8_e4m3fn [N, K]
    <prefix>.weight_scale_inv     float32 | float8_e8m0fnu [ceil(N/128), ceil(K/128)]
    <prefix>.activation_scale     float32 [] (static activation scheme only)
    <experts>.gate_up_proj        float8_e4m3fn [E, N, K], with <experts>.gate_up_proj_scale_inv
                                  and <experts>.gate_up_proj_activation_scale [E] siblings
    (older) <experts>.{i}.gate_proj.weight / up_proj / down_proj (or w1 / w3 / w2) per expert

``save_quantized`` writes it (sharded, with an index, and config.json's quantization_config
for transformers models); ``load_quantized`` reads it straight into BlockFP8Tensor
parameters: fp8 codes go from the file to the parameter, never through bf16.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from fp8fx import reference
from fp8fx.api import expert_param_names
from fp8fx.tensor import BlockFP8Tensor

__all__ = ["save_quantized", "load_quantized", "LoadReport", "quantization_config_of"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_SCALE_DTYPES = (torch.float32, reference.E8M0_DTYPE)
# Per-expert checkpoint names -> (fused parameter, part). "gate"/"up" stack into gate_up_proj.
_PER_EXPERT = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}


def scale_key(name: str) -> str:
    return name[: -len("weight")] + "weight_scale_inv" if name.endswith(".weight") or name == "weight" else name + "_scale_inv"


def act_scale_key(name: str) -> str:
    return name[: -len("weight")] + "activation_scale" if name.endswith(".weight") or name == "weight" else name + "_activation_scale"


def _quantized_params(model: nn.Module):
    return [(n, p) for n, p in model.named_parameters() if isinstance(p, BlockFP8Tensor)]


def quantization_config_of(model: nn.Module) -> dict:
    """The ``quantization_config`` dict transformers and fp8fx read back for ``model``."""
    quantized = _quantized_params(model)
    if not quantized:
        raise ValueError("fp8fx: the model has no BlockFP8Tensor weights; run fp8fx.quantize_ first")
    fmts = {p.scale_fmt for _, p in quantized}
    blocks = {p.block_size for _, p in quantized}
    statics = {p.act_scale is not None for _, p in quantized}
    if len(fmts) > 1 or len(blocks) > 1 or len(statics) > 1:
        raise ValueError(
            f"fp8fx: the model mixes quantization settings (scale formats {fmts}, block sizes {blocks}, "
            f"static activation scales {statics}); one checkpoint config cannot describe it"
        )
    kept = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m.weight, BlockFP8Tensor)]
    config = {
        "quant_method": "fp8",
        "activation_scheme": "static" if statics.pop() else "dynamic",
        "weight_block_size": list(blocks.pop()),
        "modules_to_not_convert": kept,
    }
    if fmts.pop() == "ue8m0":
        config["scale_fmt"] = "ue8m0"
    return config


def _flat_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Checkpoint name -> plain tensor, and tied name -> the name it is stored under."""
    out: dict[str, torch.Tensor] = {}
    first_name: dict[int, str] = {}
    tied: dict[str, str] = {}
    persistent = set(model.state_dict(keep_vars=True).keys())
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        if name not in persistent:
            continue
        if id(t) in first_name:
            tied[name] = first_name[id(t)]
            continue
        first_name[id(t)] = name
        if isinstance(t, BlockFP8Tensor):
            out[name] = t.qdata
            out[scale_key(name)] = t.scale
            if t.act_scale is not None:
                out[act_scale_key(name)] = t.act_scale
        else:
            out[name] = t.detach()
    return out, tied


def _atomic_write(path: Path, write) -> None:
    # Write beside the target and rename: an interrupted save never leaves a file that looks
    # complete under the final name.
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_quantized(model: nn.Module, path: str | os.PathLike, max_shard_size: int = 5 * 2**30) -> list[Path]:
    """Save ``model`` (after quantize_) to directory ``path`` in the HF FineGrainedFP8 layout.

    Writes model.safetensors, or model-0000i-of-0000n.safetensors shards plus
    model.safetensors.index.json when larger than ``max_shard_size`` bytes, and for
    transformers models config.json with ``quantization_config``. Returns the files written.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, tied = _flat_tensors(model)
    qconfig = quantization_config_of(model)

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        t = t.contiguous().cpu()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a row range of a packed buffer (pack_projections): safetensors saves whole storages
        shards[-1][name] = t
        size += nbytes

    metadata = {"format": "pt", "producer": "fp8fx", "tied": json.dumps(tied)}
    written = []
    names = [SINGLE_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    for fname, shard in zip(names, shards):
        _atomic_write(path / fname, lambda p, shard=shard: save_file(shard, str(p), metadata=metadata))
        written.append(path / fname)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {k: fname for fname, shard in zip(names, shards) for k in shard},
        }
        _atomic_write(path / INDEX_NAME, lambda p: p.write_text(json.dumps(index, indent=2)))
        written.append(path / INDEX_NAME)
    hf_config = getattr(model, "config", None)
    if hf_config is not None and hasattr(hf_config, "to_dict"):
        config = hf_config.to_dict()
        config["quantization_config"] = qconfig
        _atomic_write(path / "config.json", lambda p: p.write_text(json.dumps(config, indent=2, default=str)))
        written.append(path / "config.json")
    return written


@dataclass
class LoadReport:
    fp8_weights: list[str] = field(default_factory=list)
    plain_tensors: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    packed: list[str] = field(default_factory=list)  # api.pack_projections' groups


class _Checkpoint:
    """Key -> shard file for a checkpoint directory or a single .safetensors file."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        if not path.exists():
            raise FileNotFoundError(f"fp8fx: checkpoint {path} does not exist")
        if path.is_file():
            files = [path]
        elif (path / INDEX_NAME).exists():
            weight_map = json.loads((path / INDEX_NAME).read_text())["weight_map"]
            files = sorted({path / f for f in weight_map.values()})
        else:
            files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"fp8fx: no .safetensors files in {path}")
        self.handles = {}
        self.where: dict[str, Path] = {}
        for f in files:
            try:
                self.handles[f] = safe_open(str(f), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise ValueError(f"fp8fx: cannot read {f}: {e}") from e
            for k in self.handles[f].keys():
                self.where[k] = f
        self.unused = set(self.where)

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str, device) -> torch.Tensor:
        self.unused.discard(key)
        return self.handles[self.where[key]].get_tensor(key).to(device)


def _check_fp8_pair(name: str, q: torch.Tensor, s: torch.Tensor, block_size, expert_dims: int) -> None:
    if q.dtype != reference.FP8_DTYPE:
        raise ValueError(f"fp8fx: {name} has dtype {q.dtype} next to a weight scale; expected torch.float8_e4m3fn")
    if s.dtype not in _SCALE_DTYPES:
        raise ValueError(f"fp8fx: {scale_key(name)} has dtype {s.dtype}; accepted: float32, float8_e8m0fnu")
    *lead, n, k = q.shape
    grid = (*lead, *reference.scale_grid(n, k, block_size))
    if tuple(s.shape) != grid:
        raise ValueError(
            f"fp8fx: {scale_key(name)} has shape {tuple(s.shape)}; a {tuple(q.shape)} weight with "
            f"block_size {tuple(block_size)} needs {grid}"
        )
    if len(lead) != expert_dims:
        raise ValueError(f"fp8fx: {name} has shape {tuple(q.shape)}; expected {2 + expert_dims} dims")


def _load_fp8(ckpt: _Checkpoint, name: str, device, block_size, expert_dims: int):
    """(qdata, scale, act_scale) for ``name`` stored in fused form, or None."""
    if scale_key(name) not in ckpt:
        return None
    q, s = ckpt.get(name, device), ckpt.get(scale_key(name), device)
    _check_fp8_pair(name, q, s, block_size, expert_dims)
    a = ckpt.get(act_scale_key(name), device).float() if act_scale_key(name) in ckpt else None
    return q, s, a


def _load_per_expert(ckpt: _Checkpoint, experts_prefix: str, pname: str, num_experts: int, device, block_size):
    """Assemble a fused [E, N, K] expert weight from per-expert ``experts.{i}.<proj>.weight``."""
    parts = ["gate", "up"] if pname == "gate_up_proj" else [pname.removesuffix("_proj")]
    pattern = re.compile(re.escape(experts_prefix) + r"\.(\d+)\.(\w+)\.weight$")
    found: dict[tuple[int, str], str] = {}
    for key in ckpt.where:
        m = pattern.match(key)
        if m and _PER_EXPERT.get(m.group(2)) in parts:
            found[(int(m.group(1)), _PER_EXPERT[m.group(2)])] = key
    if not found:
        return None
    qs, ss, acts = [], [], []
    for e in range(num_experts):
        q_parts, s_parts = [], []
        for part in parts:
            key = found.get((e, part))
            if key is None:
                raise ValueError(f"fp8fx: per-expert checkpoint lacks the {part} projection of expert {e} under {experts_prefix}")
            if scale_key(key) not in ckpt:
                raise ValueError(f"fp8fx: {key} has no {scale_key(key)}; the checkpoint is not block-FP8")
            q, s = ckpt.get(key, device), ckpt.get(scale_key(key), device)
            _check_fp8_pair(key, q, s, block_size, 0)
            if len(parts) > 1 and q.shape[0] % block_size[0]:
                raise ValueError(
                    f"fp8fx: cannot fuse {key} ({q.shape[0]} rows) into gate_up_proj: its row count is not a "
                    f"multiple of {block_size[0]}, so its scale blocks would straddle gate and up"
                )
            q_parts.append(q)
            s_parts.append(s)
            if act_scale_key(key) in ckpt:
                acts.append(ckpt.get(act_scale_key(key), device).float().reshape(()))
        qs.append(torch.cat(q_parts))
        ss.append(torch.cat(s_parts))
    act = None
    if acts:
        # One static scale per expert: the larger of gate's and up's keeps both in range.
        act = torch.stack(acts).reshape(num_experts, -1).amax(dim=1)
    return torch.stack(qs), torch.stack(ss), act


def _checkpoint_block_size(path: Path, default) -> tuple[int, int]:
    config = path / "config.json" if path.is_dir() else None
    if config is not None and config.exists():
        qc = json.loads(config.read_text()).get("quantization_config") or {}
        if "weight_block_size" in qc:
            return tuple(qc["weight_block_size"])
    return tuple(default)


def load_quantized(
    model: nn.Module,
    path: str | os.PathLike,
    strict: bool = True,
    device: Optional[torch.device | str] = None,
    block_size: tuple[int, int] = (128, 128),
    pack: bool = True,
) -> LoadReport:
    """Load a block-FP8 checkpoint into ``model`` (materialized or on the meta device).

    Weights with a ``*_scale_inv`` sibling become BlockFP8Tensor parameters, everything else
    loads as it is. Tied parameters stay tied. ``device`` is where tensors go for a model on
    the meta device (default: CPU); otherwise each tensor goes where its parameter is.
    With ``strict``, missing and unexpected keys are errors. With ``pack``, sibling
    projections (q/k/v, gate/up) are then packed into one buffer each
    (fp8fx.api.pack_projections; skipped while any parameter is still on the meta device).
    """
    path = Path(path)
    ckpt = _Checkpoint(path)
    block_size = _checkpoint_block_size(path, block_size)
    report = LoadReport()
    expert_names = {
        f"{mname}.{p}" if mname else p: module.__dict__.get("num_experts") or getattr(module, p).shape[0]
        for mname, module in model.named_modules()
        for p in expert_param_names(module)
    }

    # Group names by parameter object so tied parameters get one new tensor.
    groups: dict[int, list[tuple[str, nn.Module, str, torch.Tensor, bool]]] = {}
    persistent = set(model.state_dict(keep_vars=True).keys())
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, t in list(module._parameters.items()) + list(module._buffers.items()):
            fqn = f"{mname}.{pname}" if mname else pname
            if t is None or fqn not in persistent:
                continue
            groups.setdefault(id(t), []).append((fqn, module, pname, t, pname in module._parameters))

    assignments = []
    for entries in groups.values():
        names = [e[0] for e in entries]
        _, _, _, old, is_param = entries[0]
        target = device if old.is_meta else old.device
        target = torch.device(target or "cpu")
        new = None
        for name in names:
            dims = 1 if name in expert_names else 0
            loaded = _load_fp8(ckpt, name, target, block_size, dims)
            if loaded is None and dims:
                prefix, pname = name.rsplit(".", 1)
                loaded = _load_per_expert(ckpt, prefix, pname, expert_names[name], target, block_size)
            if loaded is not None:
                q, s, a = loaded
                if tuple(q.shape) != tuple(old.shape):
                    raise ValueError(f"fp8fx: {name} has shape {tuple(q.shape)} in the checkpoint, the model expects {tuple(old.shape)}")
                new = BlockFP8Tensor(q, s, block_size, old.dtype, a)
                report.fp8_weights.append(name)
                break
            if name in ckpt:
                t = ckpt.get(name, target)
                if t.dtype == reference.FP8_DTYPE:
                    raise ValueError(f"fp8fx: {name} is float8_e4m3fn but {scale_key(name)} is missing from the checkpoint")
                if tuple(t.shape) != tuple(old.shape):
                    raise ValueError(f"fp8fx: {name} has shape {tuple(t.shape)} in the checkpoint, the model expects {tuple(old.shape)}")
                new = t.to(old.dtype)
                report.plain_tensors.append(name)
                break
        if new is None:
            report.missing.extend(names)
            continue
        if is_param:
            new = nn.Parameter(new, requires_grad=old.requires_grad and not isinstance(new, BlockFP8Tensor))
        assignments.append((entries, new))

    report.unexpected = sorted(ckpt.unused)
    if strict and (report.missing or report.unexpected):
        raise ValueError(
            f"fp8fx: checkpoint {path} does not match the model: missing {report.missing[:8]}"
            f"{' ...' if len(report.missing) > 8 else ''}, unexpected {report.unexpected[:8]}"
            f"{' ...' if len(report.unexpected) > 8 else ''}"
        )
    # Every tensor was read and checked before this point: a bad checkpoint changes nothing.
    for entries, new in assignments:
        for _, module, pname, _, is_param in entries:
            (module._parameters if is_param else module._buffers)[pname] = new
    if pack and not any(t.is_meta for t in model.parameters()):
        from fp8fx.api import pack_projections

        report.packed = pack_projections(model)
    return report
