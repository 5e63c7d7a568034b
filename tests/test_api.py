"""quantize_ on real transformers models built from local configs."""

import pytest
import torch
from torch import nn

import fp8fx
from conftest import rel_err
from fp8fx import BlockFP8Config, BlockFP8Tensor, reference as R


def _ids(model, t=24, seed=0):
    return torch.randint(0, model.config.vocab_size, (2, t), generator=torch.Generator().manual_seed(seed))


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_llama_quantize_report_and_outputs(tiny_llama):
    model = tiny_llama
    ids = _ids(model)
    with torch.no_grad():
        ref = model(ids).logits.float()
    report = fp8fx.quantize_(model)
    # 2 layers x (q, k, v, o, gate, up, down); lm_head stays.
    assert len(report.converted) == 14
    assert [r.name for r in report.skipped] == ["lm_head.weight"]
    assert "output embedding" in report.skipped[0].reason
    assert isinstance(model.model.layers[0].self_attn.q_proj.weight, BlockFP8Tensor)
    assert not isinstance(model.lm_head.weight, BlockFP8Tensor)
    # bf16 -> fp8 codes + fp32 scales per 128x128 block: just over half.
    assert 0.5 < report.bytes_after / report.bytes_before < 0.51
    with torch.no_grad():
        out = model(ids).logits.float()
    assert rel_err(out, ref) < 0.15
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.6
    assert "converted 14 weights" in str(report)


def test_quantized_linear_is_exactly_the_reference(tiny_llama):
    proj = tiny_llama.model.layers[1].mlp.down_proj
    w = proj.weight.detach().clone()
    fp8fx.quantize_(tiny_llama, BlockFP8Config(scale_fmt="ue8m0"))
    x = torch.randn(5, w.shape[1], dtype=torch.bfloat16)
    q, s = R.quantize_weight(w, scale_fmt="ue8m0")
    assert torch.equal(proj.weight.qdata.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(proj(x), R.linear(x, q, s))


def test_moe_experts_quantized(tiny_qwen3_moe):
    model = tiny_qwen3_moe
    ids = _ids(model)
    with torch.no_grad():
        ref = model(ids).logits.float()
    report = fp8fx.quantize_(model)
    names = {r.name for r in report.converted}
    assert "model.layers.0.mlp.experts.gate_up_proj" in names
    assert "model.layers.1.mlp.experts.down_proj" in names
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (4, 256, 256) and isinstance(experts.gate_up_proj, BlockFP8Tensor)
    assert experts.gate_up_proj.scale.shape == (4, 2, 2)
    # The router is not a GEMM fp8fx converts; the tied lm_head/embedding stays too.
    assert not isinstance(model.model.layers[0].mlp.gate.weight, BlockFP8Tensor)
    skipped = {r.name: r.reason for r in report.skipped}
    assert "lm_head.weight" in skipped and not isinstance(model.lm_head.weight, BlockFP8Tensor)
    with torch.no_grad():
        out = model(ids).logits.float()
    assert rel_err(out, ref) < 0.15


def test_quantize_twice_is_a_noop_with_note(tiny_llama):
    fp8fx.quantize_(tiny_llama)
    before = _snapshot(tiny_llama)
    report = fp8fx.quantize_(tiny_llama)
    assert report.converted == []
    assert len(report.notes) == 14 and "already a BlockFP8Tensor" in report.notes[0]
    after = _snapshot(tiny_llama)
    for n in before:
        a, b = before[n], after[n]
        if isinstance(a, BlockFP8Tensor):
            assert torch.equal(a.qdata.view(torch.uint8), b.qdata.view(torch.uint8)) and torch.equal(a.scale, b.scale)


def test_exclusions_filter_and_ineligible_shapes():
    model = nn.Sequential()
    model.add_module("attn", nn.Linear(256, 256))
    model.add_module("odd", nn.Linear(100, 256))  # K = 100: not a multiple of 16
    model.add_module("narrow", nn.Linear(256, 8))  # N = 8
    model.add_module("keep", nn.Linear(256, 256))
    model.add_module("skipme", nn.Linear(256, 256))
    report = fp8fx.quantize_(
        model, BlockFP8Config(modules_to_not_convert=("keep",)), filter_fn=lambda m, name: name != "skipme"
    )
    assert [r.name for r in report.converted] == ["attn.weight"]
    reasons = {r.name: r.reason for r in report.skipped}
    assert "multiples of 16" in reasons["odd.weight"] and "multiples of 16" in reasons["narrow.weight"]
    assert "pattern 'keep'" in reasons["keep.weight"]
    assert reasons["skipme.weight"] == "excluded by filter_fn"


def test_tied_weights_stay_unquantized():
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    model[1].weight = model[0].weight
    report = fp8fx.quantize_(model)
    assert report.converted == []
    assert all("tied to" in r.reason for r in report.skipped)


def test_glob_pattern():
    cfg = BlockFP8Config(modules_to_not_convert=("model.layers.0.*",))
    assert cfg.excludes("model.layers.0.mlp.up_proj") == "model.layers.0.*"
    assert cfg.excludes("model.layers.1.mlp.up_proj") is None


def test_failure_leaves_model_unchanged(tiny_llama):
    before = _snapshot(tiny_llama)
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="model.layers.1.mlp.down_proj.weight contains NaN or Inf"):
        fp8fx.quantize_(tiny_llama)
    # Earlier layers were checked and not converted: nothing changed.
    for n, p in tiny_llama.named_parameters():
        assert not isinstance(p, BlockFP8Tensor), n
        if n != "model.layers.1.mlp.down_proj.weight":
            assert torch.equal(p, before[n])


def test_bad_inputs():
    with pytest.raises(ValueError, match="block_size"):
        BlockFP8Config(block_size=(64, 64))
    with pytest.raises(ValueError, match="scale_fmt"):
        BlockFP8Config(scale_fmt="e4m3")
    with pytest.raises(ValueError, match="kernel"):
        BlockFP8Config(kernel="cutlass")
    with torch.device("meta"):
        meta = nn.Linear(256, 256)
    with pytest.raises(ValueError, match="weight is on the meta device"):
        fp8fx.quantize_(nn.Sequential(meta))
    ints = nn.Linear(256, 256)
    ints.weight = nn.Parameter(torch.ones(256, 256, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="0.weight has dtype torch.int8"):
        fp8fx.quantize_(nn.Sequential(ints))
    with pytest.raises(ValueError, match="static"):
        fp8fx.quantize_(nn.Sequential(nn.Linear(256, 256)), BlockFP8Config(activation_scheme="static"))


def test_nothing_eligible_reports_so():
    report = fp8fx.quantize_(nn.Sequential(nn.Linear(10, 10), nn.ReLU()))
    assert report.converted == [] and "nothing eligible" in report.notes[0]


def test_chunked_quantization_is_bit_identical(monkeypatch):
    from fp8fx import api

    monkeypatch.setattr(api, "_CHUNK_ELEMS", 128 * 256)  # one block row per chunk
    w = torch.randn(3, 400, 256, dtype=torch.bfloat16)
    for fmt in ("float32", "ue8m0"):
        q, s = api.quantize_weight_chunked(w, (128, 128), fmt, "w")
        q0, s0 = R.quantize_weight(w, scale_fmt=fmt)
        assert torch.equal(q.view(torch.uint8), q0.view(torch.uint8)) and torch.equal(s.float(), s0.float())


def test_kernel_preference_is_applied():
    from fp8fx.kernels import dispatch

    before = dispatch.get_preference()
    try:
        fp8fx.quantize_(nn.Sequential(nn.Linear(256, 256)), BlockFP8Config(kernel="cublas"))
        assert dispatch.get_preference() == "cublas"
        assert dispatch.choose(4096, 4096, 4096, torch.bfloat16, torch.device("cuda")) == "cublas"
        # K = 4480 (ceil(K/128) = 35, not a multiple of 4): cuBLAS refuses it, Triton takes it.
        assert dispatch.choose(4096, 4096, 4480, torch.bfloat16, torch.device("cuda")) == "triton"
    finally:
        dispatch.set_preference(before)
