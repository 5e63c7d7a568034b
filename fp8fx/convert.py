"""Checkpoint tools: convert a bf16/fp16 HF checkpoint to block FP8, and inspect one.

convert streams shard by shard: it reads one tensor at a time from the source shard,
quantizes the GEMM weights that quantize_ would convert (decided on a meta-device model
built from config.json), and writes the shard into ``DST.partial`` before renaming the
finished directory to ``DST``. Peak memory is about one shard in and one shard out.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from fp8fx import reference
from fp8fx.api import plan_quantization, quantize_weight_chunked
from fp8fx.checkpoint import INDEX_NAME, SINGLE_NAME, act_scale_key, scale_key
from fp8fx.config import BlockFP8Config
from fp8fx.hf import build_meta_model, read_quantization_config

__all__ = ["convert", "inspect", "ConvertSummary"]

_PER_EXPERT_KEY = re.compile(r"^(?P<prefix>.+)\.\d+\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")


@dataclass
class ConvertSummary:
    converted: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason) of GEMM weights kept
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        lines = [
            f"fp8fx convert: {len(self.converted)} weights to FP8, {len(self.kept)} tensors kept as they are, "
            f"{self.seconds:.1f} s",
            f"  checkpoint bytes: {self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB",
        ]
        lines += [f"  kept in high precision: {n}: {r}" for n, r in self.skipped]
        return "\n".join(lines)


def _shards(src: Path) -> list[str]:
    if (src / INDEX_NAME).exists():
        weight_map = json.loads((src / INDEX_NAME).read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    files = sorted(p.name for p in src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"fp8fx: no .safetensors files in {src}")
    return files


def _open(path: Path):
    from safetensors import safe_open

    if not path.exists():
        raise FileNotFoundError(f"fp8fx: shard {path} is listed in the index but missing")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for corrupt or truncated headers
        raise ValueError(f"fp8fx: cannot read shard {path} (corrupt or truncated?): {e}") from e


def _targets(src: Path, config: BlockFP8Config):
    """Checkpoint names to quantize, and (name, reason) of the GEMM weights kept."""
    model = build_meta_model(src)
    plan = plan_quantization(model, config)
    names = {fqn for fqn, _, _ in plan.todo}
    expert_prefixes = {fqn.rsplit(".", 1)[0] for fqn, module, pname in plan.todo if pname != "weight"}
    return names, expert_prefixes, [(r.name, r.reason) for r in plan.skipped]


def _quantizable(key: str, t_shape, names, expert_prefixes) -> bool:
    if key in names:
        return True
    m = _PER_EXPERT_KEY.match(key)
    # Older per-expert checkpoints of a model whose experts are fused in transformers v5.
    return bool(m and m.group("prefix") in expert_prefixes and len(t_shape) == 2
                and t_shape[0] % 16 == 0 and t_shape[1] % 16 == 0)


def convert(
    src: str | Path,
    dst: str | Path,
    config: Optional[BlockFP8Config] = None,
    device: str = "cpu",
    progress: Optional[bool] = None,
) -> ConvertSummary:
    """Convert the bf16/fp16 transformers checkpoint directory ``src`` to block FP8 in ``dst``."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    config = config or BlockFP8Config()
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"fp8fx: source checkpoint directory {src} does not exist")
    if dst.exists():
        raise FileExistsError(f"fp8fx: destination {dst} exists; choose a new directory (nothing was written)")
    if read_quantization_config(src) is not None:
        raise ValueError(f"fp8fx: {src} is already an FP8 checkpoint (its config.json has quantization_config)")
    shards = _shards(src)
    handles = {name: _open(src / name) for name in shards}
    names, expert_prefixes, skipped = _targets(src, config)

    start = time.perf_counter()
    summary = ConvertSummary(skipped=skipped)
    partial = dst.with_name(dst.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # left by an interrupted run of ours; never looks complete
    partial.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    total = sum((src / s).stat().st_size for s in shards)
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc="fp8fx convert", disable=None if progress is None else not progress) as bar:
            for shard in shards:
                f = handles[shard]
                out: dict[str, torch.Tensor] = {}
                for key in f.keys():
                    t = f.get_tensor(key)
                    nbytes = t.numel() * t.element_size()
                    summary.bytes_before += nbytes
                    if t.is_floating_point() and t.dtype != reference.FP8_DTYPE and _quantizable(key, t.shape, names, expert_prefixes):
                        q, s = quantize_weight_chunked(t.to(device), config.block_size, config.scale_fmt, key)
                        out[key], out[scale_key(key)] = q.cpu(), s.cpu()
                        summary.converted.append(key)
                    else:
                        out[key] = t
                        summary.kept.append(key)
                    del t
                    bar.update(nbytes)
                summary.bytes_after += sum(v.numel() * v.element_size() for v in out.values())
                save_file(out, str(partial / shard), metadata={"format": "pt", "producer": "fp8fx convert"})
                weight_map.update({k: shard for k in out})
                del out
        if len(shards) > 1 or (src / INDEX_NAME).exists():
            index = {"metadata": {"total_size": summary.bytes_after}, "weight_map": weight_map}
            (partial / INDEX_NAME).write_text(json.dumps(index, indent=2))
        hf_config = json.loads((src / "config.json").read_text())
        converted_modules = {k.rsplit(".", 1)[0] for k in summary.converted}
        hf_config["quantization_config"] = {
            "quant_method": "fp8",
            "activation_scheme": "dynamic",
            "weight_block_size": list(config.block_size),
            "modules_to_not_convert": sorted({n.rsplit(".", 1)[0] for n, _ in skipped} - converted_modules),
            **({"scale_fmt": "ue8m0"} if config.scale_fmt == "ue8m0" else {}),
        }
        (partial / "config.json").write_text(json.dumps(hf_config, indent=2))
        for extra in src.iterdir():  # tokenizer, generation config, ...
            if extra.is_file() and extra.suffix != ".safetensors" and extra.name not in ("config.json", INDEX_NAME):
                shutil.copy2(extra, partial / extra.name)
        partial.rename(dst)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    summary.seconds = time.perf_counter() - start
    return summary


def _describe_dtype(dtype: str) -> str:
    return {"F8_E4M3": "fp8 e4m3", "F8_E8M0": "e8m0", "F32": "fp32", "BF16": "bf16", "F16": "fp16"}.get(dtype, dtype)


def inspect(path: str | Path) -> list[str]:
    """Lines describing what a checkpoint directory holds and what fp8fx does with each GEMM."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"fp8fx: checkpoint directory {path} does not exist")
    qc = read_quantization_config(path) if (path / "config.json").exists() else None
    info: dict[str, tuple[str, list[int], int]] = {}
    for shard in _shards(path):
        f = _open(path / shard)
        for key in f.keys():
            sl = f.get_slice(key)
            shape, dtype = sl.get_shape(), sl.get_dtype()
            size = {"F8_E4M3": 1, "F8_E8M0": 1, "BF16": 2, "F16": 2, "F32": 4, "I64": 8, "I32": 4}.get(dtype, 4)
            n = 1
            for d in shape:
                n *= d
            info[key] = (dtype, shape, n * size)
    lines = [f"{path}: {len(info)} tensors, {sum(v[2] for v in info.values()) / 2**20:.1f} MiB, "
             + (f"block-FP8 checkpoint ({json.dumps(qc)})" if qc else "not quantized")]
    fp8 = [k for k in info if scale_key(k) in info]
    for k in fp8:
        dtype, shape, _ = info[k]
        sdtype, sshape, _ = info[scale_key(k)]
        static = ", static act scale" if act_scale_key(k) in info else ""
        lines.append(f"  fp8     {k} {shape} scales {_describe_dtype(sdtype)} {sshape}{static}")
    if (path / "config.json").exists():
        model = build_meta_model(path)
        plan = plan_quantization(model, BlockFP8Config(modules_to_not_convert=tuple((qc or {}).get("modules_to_not_convert") or ())))
        for fqn, _, _ in plan.todo:
            if fqn not in fp8 and not qc:
                lines.append(f"  would quantize {fqn} {list(info.get(fqn, ('', [], 0))[1])}")
        for r in plan.skipped:
            lines.append(f"  kept    {r.name} {list(r.shape)}: {r.reason}")
    fp8_bytes = sum(info[k][2] + info[scale_key(k)][2] for k in fp8)
    lines.append(f"  totals: {len(fp8)} fp8 weights ({fp8_bytes / 2**20:.1f} MiB with scales), "
                 f"{len(info) - 2 * len(fp8)} other tensors")
    return lines
