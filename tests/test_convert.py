"""User workflows: convert a bf16 checkpoint, load it with fp8fx.from_pretrained, inspect it,
and read it back with transformers."""

import json
import subprocess
import sys

import pytest
import torch

import fp8fx
from conftest import rel_err
from fp8fx import BlockFP8Config, BlockFP8Tensor, reference as R
from fp8fx.convert import convert, inspect
from fp8fx.hf import from_pretrained


@pytest.fixture
def llama_ckpt(tiny_llama, tmp_path):
    src = tmp_path / "src"
    tiny_llama.save_pretrained(src, max_shard_size="300KB")  # several shards + an index
    return src


@pytest.fixture
def moe_ckpt(tiny_qwen3_moe, tmp_path):
    src = tmp_path / "moe_src"
    tiny_qwen3_moe.save_pretrained(src)
    return src


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "fp8fx", *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("scale_fmt", ["float32", "ue8m0"])
def test_convert_load_generate_llama(tiny_llama, llama_ckpt, tmp_path, scale_fmt):
    dst = tmp_path / "dst"
    summary = convert(llama_ckpt, dst, BlockFP8Config(scale_fmt=scale_fmt))
    assert len(summary.converted) == 14 and "lm_head.weight" in summary.kept
    assert not (tmp_path / "dst.partial").exists()
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["modules_to_not_convert"] == ["lm_head"]
    assert (dst / "generation_config.json").exists()

    model = from_pretrained(dst)
    w = model.model.layers[1].mlp.down_proj.weight
    assert isinstance(w, BlockFP8Tensor) and w.scale_fmt == scale_fmt and w.dtype == torch.bfloat16
    # Bit-identical to quantizing the in-memory model.
    q, _ = R.quantize_weight(tiny_llama.model.layers[1].mlp.down_proj.weight.detach(), scale_fmt=scale_fmt)
    assert torch.equal(w.qdata.view(torch.uint8), q.view(torch.uint8))
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    ids = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        ref = tiny_llama(ids).logits.float()
        out = model(ids).logits.float()
        gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert rel_err(out, ref) < 0.15
    assert gen.shape == (1, 12)


def test_transformers_reads_the_converted_checkpoint(llama_ckpt, tmp_path):
    pytest.importorskip("accelerate")
    from transformers import FineGrainedFP8Config, LlamaForCausalLM

    dst = tmp_path / "dst"
    convert(llama_ckpt, dst)
    hf = LlamaForCausalLM.from_pretrained(dst, quantization_config=FineGrainedFP8Config(dequantize=True), dtype=torch.bfloat16)
    ours = from_pretrained(dst)
    # fp8fx's dequantized weights are what transformers dequantizes, bit for bit...
    for name, p in ours.named_parameters():
        if isinstance(p, BlockFP8Tensor):
            assert torch.equal(p.dequantize(), hf.get_parameter(name)), name
            module_name, pname = name.rsplit(".", 1)
            setattr(ours.get_submodule(module_name), pname, torch.nn.Parameter(p.dequantize(), requires_grad=False))
    # ...so the dequantized fp8fx model computes exactly what transformers does.
    ids = torch.randint(0, 512, (2, 8))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, hf(ids).logits)


def test_convert_moe_and_per_expert_checkpoint(tiny_qwen3_moe, moe_ckpt, tmp_path):
    dst = tmp_path / "moe_dst"
    summary = convert(moe_ckpt, dst)
    # transformers v5 saves Qwen3-MoE experts per expert (the hub layout); they are converted
    # as 2-D weights and fused into gate_up_proj / down_proj on load.
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in summary.converted
    assert len([k for k in summary.converted if ".experts." in k]) == 2 * 4 * 3
    model = from_pretrained(dst, experts_implementation="eager")
    assert isinstance(model.model.layers[1].mlp.experts.down_proj, BlockFP8Tensor)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        assert rel_err(model(ids).logits.float(), tiny_qwen3_moe(ids).logits.float()) < 0.15


def test_cli_convert_inspect_and_errors(llama_ckpt, tmp_path):
    dst = tmp_path / "cli_dst"
    out = _cli("convert", llama_ckpt, dst, "--scale-fmt", "ue8m0", "--exclude", "model.layers.0.mlp.*")
    assert out.returncode == 0, out.stderr
    assert "11 weights to FP8" in out.stdout and "kept in high precision: model.layers.0.mlp.up_proj.weight" in out.stdout
    out = _cli("inspect", dst)
    assert out.returncode == 0, out.stderr
    assert "block-FP8 checkpoint" in out.stdout and "scales e8m0" in out.stdout
    assert "kept    lm_head.weight" in out.stdout
    out = _cli("inspect", llama_ckpt, "--trace")
    assert "would quantize model.layers.0.self_attn.q_proj.weight [256, 256]" in out.stdout
    # The traced graph: a bf16 checkpoint's linears are quantized at compile time.
    assert "14 GEMM weights rewritten to block-FP8" in out.stdout, out.stdout + out.stderr
    out = _cli("inspect", dst, "--trace")
    assert "11 GEMM weights rewritten to block-FP8" in out.stdout, out.stdout + out.stderr

    # A destination that exists, a missing source, a quantized source: clear, non-zero.
    out = _cli("convert", llama_ckpt, dst)
    assert out.returncode == 1 and "exists" in out.stderr and "Traceback" not in out.stderr
    out = _cli("convert", tmp_path / "missing", tmp_path / "x")
    assert out.returncode == 1 and "does not exist" in out.stderr
    out = _cli("convert", dst, tmp_path / "y")
    assert out.returncode == 1 and "already an FP8 checkpoint" in out.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_bad_sources(llama_ckpt, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((llama_ckpt / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no .safetensors"):
        convert(empty, tmp_path / "d1")
    # A truncated shard: a clear error, the source untouched, no destination left.
    shard = sorted(llama_ckpt.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 3])
    with pytest.raises(Exception, match="fp8fx|safetensors|incomplete|truncated"):
        convert(llama_ckpt, tmp_path / "d2")
    assert shard.read_bytes() == data[: len(data) // 3]
    assert not (tmp_path / "d2").exists() and not (tmp_path / "d2.partial").exists()
    cfg = json.loads((llama_ckpt / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (empty / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quant_method is 'awq'"):
        from_pretrained(empty)
    with pytest.raises(ValueError, match="no quantization_config"):
        from_pretrained(llama_ckpt)


def test_interrupted_convert_leaves_nothing_complete(llama_ckpt, tmp_path, monkeypatch):
    from fp8fx import convert as convert_mod

    calls = {"n": 0}
    real = convert_mod.quantize_weight_chunked

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_mod, "quantize_weight_chunked", flaky)
    with pytest.raises(KeyboardInterrupt):
        convert(llama_ckpt, tmp_path / "dst")
    assert not (tmp_path / "dst").exists() and not (tmp_path / "dst.partial").exists()
