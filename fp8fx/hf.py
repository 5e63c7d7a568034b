"""transformers models from local block-FP8 checkpoints: fp8fx.from_pretrained."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from fp8fx.checkpoint import load_quantized

__all__ = ["from_pretrained", "read_quantization_config", "build_meta_model"]


def read_quantization_config(path: Path) -> Optional[dict]:
    """The checkpoint's ``quantization_config`` (None when it has none), checked against
    what fp8fx supports."""
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"fp8fx: {path} has no config.json; a transformers checkpoint directory needs one")
    qc = json.loads(config_file.read_text()).get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method")
    if method != "fp8":
        raise ValueError(f"fp8fx: quantization_config.quant_method is {method!r}; fp8fx reads block-FP8 ('fp8') checkpoints only")
    block = qc.get("weight_block_size")
    if block is None or list(block) != [128, 128]:
        raise ValueError(
            f"fp8fx: weight_block_size {block} is not supported; fp8fx reads [128, 128] blocks "
            f"(per-tensor FP8 checkpoints have no weight_block_size)"
        )
    if qc.get("activation_scheme", "dynamic") not in ("dynamic", "static"):
        raise ValueError(f"fp8fx: activation_scheme {qc.get('activation_scheme')!r}; accepted: 'dynamic', 'static'")
    if qc.get("scale_fmt", "float32") not in ("float32", "ue8m0", None):
        raise ValueError(f"fp8fx: scale_fmt {qc.get('scale_fmt')!r}; accepted: 'float32', 'ue8m0'")
    return qc


def build_meta_model(path: Path, dtype: Optional[torch.dtype] = None, **config_kwargs) -> nn.Module:
    """The transformers causal-LM model for ``path``'s config.json, on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path), **config_kwargs)
    # fp8fx handles the quantization; transformers must not see a quantizer to apply.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = dtype or getattr(config, "dtype", None) or torch.bfloat16
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _materialize_buffers(model: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers (rotary inv_freq, ...) are not in checkpoints: allocate them and
    let the model's own initializer compute them, as transformers' loader does."""
    owners = {}
    for name, buf in model.named_buffers():
        if buf.is_meta:
            owner_name, _, bname = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            owner._buffers[bname] = torch.empty_like(buf, device=device)
            owners[owner_name] = owner
    init = getattr(model, "_init_weights", None)
    for owner in owners.values():
        if init is None:
            break
        with torch.no_grad():
            init(owner)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"fp8fx: no values for {left[:8]} after loading; the checkpoint does not cover the model")


def from_pretrained(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: Optional[torch.dtype] = None,
    **config_kwargs,
) -> nn.Module:
    """Build the transformers model of a local block-FP8 checkpoint directory and load it.

    The model is built on the meta device; FP8 weights go from the safetensors files straight
    into BlockFP8Tensor parameters on ``device`` (no bf16 copy is ever made), everything else
    loads as it is. ``dtype`` is the compute dtype (default: the config's, else bfloat16).
    ``config_kwargs`` go to ``AutoConfig.from_pretrained`` (e.g. experts_implementation="eager").
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"fp8fx: checkpoint directory {path} does not exist")
    qc = read_quantization_config(path)
    if qc is None:
        raise ValueError(
            f"fp8fx: {path} has no quantization_config: it is not an FP8 checkpoint. Convert it with "
            f"`python -m fp8fx convert {path} DST`, or load it with transformers and call fp8fx.quantize_"
        )
    model = build_meta_model(path, dtype, **config_kwargs)
    device = torch.device(device)
    load_quantized(model, path, strict=True, device=device, block_size=tuple(qc["weight_block_size"]))
    _materialize_buffers(model, device)
    from fp8fx.moe import use_fp8_experts

    use_fp8_experts(model)
    return model.eval()
