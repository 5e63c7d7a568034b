"""Block-FP8 safetensors checkpoints: save/load round trips and the HF / DeepSeek-V3 layouts."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import fp8fx
from fp8fx import BlockFP8Config, BlockFP8Tensor, reference as R
from fp8fx.checkpoint import load_quantized, save_quantized


def _bits(t):
    return t.view(torch.uint8) if t.element_size() == 1 else t


def _assert_same_params(a: nn.Module, b: nn.Module):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for n in pa:
        x, y = pa[n], pb[n]
        assert type(x) is type(y), n
        if isinstance(x, BlockFP8Tensor):
            assert torch.equal(_bits(x.qdata), _bits(y.qdata)), n
            assert x.scale.dtype == y.scale.dtype and torch.equal(_bits(x.scale), _bits(y.scale)), n
            assert x.dtype == y.dtype
        else:
            assert torch.equal(x, y), n


@pytest.mark.parametrize("scale_fmt", ["float32", "ue8m0"])
def test_llama_round_trip_bit_exact(tiny_llama, tmp_path, scale_fmt):
    from transformers import LlamaForCausalLM

    fp8fx.quantize_(tiny_llama, BlockFP8Config(scale_fmt=scale_fmt))
    files = save_quantized(tiny_llama, tmp_path)
    assert {f.name for f in files} == {"model.safetensors", "config.json"}
    raw = load_file(tmp_path / "model.safetensors")
    q = raw["model.layers.0.self_attn.q_proj.weight"]
    s = raw["model.layers.0.self_attn.q_proj.weight_scale_inv"]
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 2)
    assert s.dtype == (torch.float8_e8m0fnu if scale_fmt == "ue8m0" else torch.float32)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == [128, 128]
    assert qc["activation_scheme"] == "dynamic" and qc["modules_to_not_convert"] == ["lm_head"]
    assert qc.get("scale_fmt") == ("ue8m0" if scale_fmt == "ue8m0" else None)

    torch.manual_seed(123)
    fresh = LlamaForCausalLM(tiny_llama.config).to(torch.bfloat16).eval()
    fp8fx.quantize_(fresh, BlockFP8Config(scale_fmt=scale_fmt))
    report = load_quantized(fresh, tmp_path)
    assert len(report.fp8_weights) == 14 and not report.missing and not report.unexpected
    _assert_same_params(tiny_llama, fresh)
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, tiny_llama(ids).logits)


def test_load_into_meta_model_never_materializes_hp_weights(tiny_llama, tmp_path):
    from transformers import LlamaForCausalLM

    fp8fx.quantize_(tiny_llama)
    save_quantized(tiny_llama, tmp_path)
    with torch.device("meta"):
        meta = LlamaForCausalLM(tiny_llama.config).to(torch.bfloat16)
    load_quantized(meta, tmp_path, strict=True)
    w = meta.model.layers[0].mlp.up_proj.weight
    assert isinstance(w, BlockFP8Tensor) and w.qdata.device.type == "cpu" and w.dtype == torch.bfloat16
    assert meta.lm_head.weight.device.type == "cpu"
    _assert_same_params(tiny_llama, meta)


def test_sharded_save_with_index_and_tied_weights(tiny_qwen3_moe, tmp_path):
    from transformers import Qwen3MoeForCausalLM

    fp8fx.quantize_(tiny_qwen3_moe)
    files = save_quantized(tiny_qwen3_moe, tmp_path, max_shard_size=200_000)
    shards = [f for f in files if f.suffix == ".safetensors"]
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["model.layers.0.mlp.experts.gate_up_proj_scale_inv"].startswith("model-")
    assert "lm_head.weight" not in index["weight_map"]  # tied to the embedding: stored once
    assert not list(tmp_path.glob("*.tmp"))

    torch.manual_seed(7)
    fresh = Qwen3MoeForCausalLM(tiny_qwen3_moe.config).to(torch.bfloat16).eval()
    fp8fx.quantize_(fresh)
    load_quantized(fresh, tmp_path)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    _assert_same_params(tiny_qwen3_moe, fresh)


class _DSV3Attn(nn.Module):
    """The DeepSeek-V3 projection with a partial edge block: 576 x 7168."""

    def __init__(self):
        super().__init__()
        self.kv_a_proj_with_mqa = nn.Linear(7168, 576, bias=False)
        self.q_a_proj = nn.Linear(7168, 1536, bias=False)
        self.norm = nn.LayerNorm(576)


def test_synthetic_deepseek_v3_checkpoint_e8m0(tmp_path):
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for name, (n, k) in {"kv_a_proj_with_mqa": (576, 7168), "q_a_proj": (1536, 7168)}.items():
        w = torch.randn(n, k, generator=g) * 0.02
        q, s = R.quantize_weight(w, scale_fmt="ue8m0")
        tensors[f"layers.0.self_attn.{name}.weight"] = q
        tensors[f"layers.0.self_attn.{name}.weight_scale_inv"] = s
    tensors["layers.0.self_attn.norm.weight"] = torch.ones(576)
    tensors["layers.0.self_attn.norm.bias"] = torch.zeros(576)
    save_file(tensors, str(tmp_path / "model.safetensors"))

    with torch.device("meta"):
        model = nn.Module()
        model.layers = nn.ModuleList([nn.Module()])
        model.layers[0].self_attn = _DSV3Attn()
    model = model.to(torch.bfloat16)
    load_quantized(model, tmp_path)
    proj = model.layers[0].self_attn.kv_a_proj_with_mqa
    assert proj.weight.scale.shape == (5, 56) and proj.weight.scale.dtype == torch.float8_e8m0fnu
    assert torch.equal(_bits(proj.weight.qdata), _bits(tensors["layers.0.self_attn.kv_a_proj_with_mqa.weight"]))
    x = torch.randn(3, 7168, dtype=torch.bfloat16)
    expect = R.linear(x, tensors["layers.0.self_attn.kv_a_proj_with_mqa.weight"],
                      tensors["layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"])
    assert torch.equal(proj(x), expect)


def test_per_expert_layout_loads_into_fused_experts(tiny_qwen3_moe, tmp_path):
    from transformers import Qwen3MoeForCausalLM

    model = tiny_qwen3_moe
    fp8fx.quantize_(model)
    save_quantized(model, tmp_path)
    # Rewrite the fused experts as an older per-expert checkpoint (with static act scales).
    raw = load_file(tmp_path / "model.safetensors")
    out = {}
    for key, t in raw.items():
        if ".experts.gate_up_proj" in key or ".experts.down_proj" in key:
            continue
        out[key] = t
    for layer in range(2):
        pre = f"model.layers.{layer}.mlp.experts"
        gu, gus = raw[f"{pre}.gate_up_proj"], raw[f"{pre}.gate_up_proj_scale_inv"]
        dn, dns = raw[f"{pre}.down_proj"], raw[f"{pre}.down_proj_scale_inv"]
        for e in range(4):
            out[f"{pre}.{e}.gate_proj.weight"], out[f"{pre}.{e}.up_proj.weight"] = gu[e, :128], gu[e, 128:]
            out[f"{pre}.{e}.gate_proj.weight_scale_inv"], out[f"{pre}.{e}.up_proj.weight_scale_inv"] = gus[e, :1], gus[e, 1:]
            out[f"{pre}.{e}.down_proj.weight"], out[f"{pre}.{e}.down_proj.weight_scale_inv"] = dn[e], dns[e]
            for proj, a in (("gate_proj", 0.5), ("up_proj", 0.75), ("down_proj", 0.25)):
                out[f"{pre}.{e}.{proj}.activation_scale"] = torch.tensor(a + e)
    per_expert = tmp_path / "per_expert"
    per_expert.mkdir()
    save_file({k: v.contiguous() for k, v in out.items()}, str(per_expert / "model.safetensors"))

    fresh = Qwen3MoeForCausalLM(model.config).to(torch.bfloat16).eval()
    load_quantized(fresh, per_expert)
    a, b = model.model.layers[1].mlp.experts, fresh.model.layers[1].mlp.experts
    for name in ("gate_up_proj", "down_proj"):
        assert torch.equal(_bits(getattr(a, name).qdata), _bits(getattr(b, name).qdata))
        assert torch.equal(getattr(a, name).scale, getattr(b, name).scale)
    # gate and up share one static scale per expert: the larger of the two.
    assert b.gate_up_proj.act_scale.tolist() == [0.75, 1.75, 2.75, 3.75]
    assert b.down_proj.act_scale.tolist() == [0.25, 1.25, 2.25, 3.25]


def _linear_ckpt(tmp_path, **overrides):
    q, s = R.quantize_weight(torch.randn(256, 256))
    tensors = {"0.weight": q, "0.weight_scale_inv": s, "0.bias": torch.zeros(256)}
    tensors.update(overrides)
    save_file({k: v for k, v in tensors.items() if v is not None}, str(tmp_path / "model.safetensors"))
    return nn.Sequential(nn.Linear(256, 256))


def test_bad_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_quantized(nn.Linear(16, 16), tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no .safetensors"):
        load_quantized(nn.Linear(16, 16), tmp_path)
    model = _linear_ckpt(tmp_path, **{"0.weight_scale_inv": None})
    with pytest.raises(ValueError, match="0.weight is float8_e4m3fn but 0.weight_scale_inv is missing"):
        load_quantized(model, tmp_path)
    model = _linear_ckpt(tmp_path, **{"0.weight_scale_inv": torch.ones(2, 3)})
    with pytest.raises(ValueError, match=r"0.weight_scale_inv has shape \(2, 3\).*needs \(2, 2\)"):
        load_quantized(model, tmp_path)
    model = _linear_ckpt(tmp_path, **{"0.weight_scale_inv": torch.ones(2, 2, dtype=torch.float16)})
    with pytest.raises(ValueError, match="accepted: float32, float8_e8m0fnu"):
        load_quantized(model, tmp_path)
    model = _linear_ckpt(tmp_path, extra=torch.ones(1))
    before = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        load_quantized(model, tmp_path)
    assert torch.equal(model[0].weight, before) and not isinstance(model[0].weight, BlockFP8Tensor)
    report = load_quantized(model, tmp_path, strict=False)
    assert report.unexpected == ["extra"] and isinstance(model[0].weight, BlockFP8Tensor)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(ValueError, match="cannot read"):
        load_quantized(model, tmp_path)


def test_save_requires_quantized_model(tmp_path):
    with pytest.raises(ValueError, match="quantize_ first"):
        save_quantized(nn.Linear(16, 16), tmp_path)
