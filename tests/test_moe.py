"""MoE experts in block FP8 through transformers v5 experts modules (the "fp8fx" implementation)."""

import pytest
import torch

import fp8fx
from conftest import rel_err
from fp8fx import BlockFP8Tensor


def _qwen3_moe(experts_implementation=None, seed=0):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
        experts_implementation=experts_implementation,
    )
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(config).to(torch.bfloat16).eval()


@pytest.mark.parametrize("impl", [None, "eager", "batched_mm"])
def test_quantize_switches_experts_to_fp8_grouped(impl):
    model = _qwen3_moe(impl)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits.float()
    report = fp8fx.quantize_(model)
    assert any("experts_implementation='fp8fx'" in n for n in report.notes)
    assert model.config._experts_implementation == "fp8fx"
    with torch.no_grad():
        grouped = model(ids).logits.float()
        # The per-expert F.linear loop over the same FP8 weights computes the same thing.
        model.config._experts_implementation = "eager"
        looped = model(ids).logits.float()
    assert torch.equal(grouped, looped)
    assert rel_err(grouped, ref) < 0.15


def test_all_tokens_to_one_expert_and_one_token():
    model = _qwen3_moe()
    fp8fx.quantize_(model)
    experts = model.model.layers[0].mlp.experts
    w_up, w_down = experts.gate_up_proj, experts.down_proj
    for tokens, ids in ((5, torch.tensor([[3, 3]] * 5)), (1, torch.tensor([[7, 0]]))):
        x = torch.randn(tokens, 256, dtype=torch.bfloat16)
        weights = torch.rand(tokens, 2)
        out = experts(x, ids, weights)
        expect = torch.zeros(tokens, 256)
        for t in range(tokens):
            for j in range(2):
                e = ids[t, j].item()
                h = torch.nn.functional.linear(x[t : t + 1], w_up[e])
                gate, up = h.chunk(2, dim=-1)
                h = torch.nn.functional.silu(gate) * up
                expect[t] += weights[t, j] * torch.nn.functional.linear(h, w_down[e])[0].float()
        assert rel_err(out, expect) < 1e-2


def test_unsorted_decode_path_matches_sorted(monkeypatch):
    """Up to moe.UNSORTED_MAX_ROWS rows the experts skip the sort (fp8fx::expert_linear)."""
    from fp8fx import moe

    model = _qwen3_moe()
    fp8fx.quantize_(model)
    experts = model.model.layers[0].mlp.experts
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 256, generator=g).to(torch.bfloat16)
    ids = torch.tensor([[1, 4], [4, 1], [0, 7], [7, 6], [2, 3], [4, 5]])
    weights = torch.rand(6, 2, generator=g)
    unsorted = experts(x, ids, weights)
    monkeypatch.setattr(moe, "UNSORTED_MAX_ROWS", 0)
    assert rel_err(unsorted, experts(x, ids, weights)) < 1e-5


def test_unsorted_path_in_a_static_graph():
    """A graph compiled for a fixed small token count holds expert_linear and no sort; the
    dynamic graph (any count) keeps the sorted grouped path."""
    torch._dynamo.reset()
    model = _qwen3_moe()
    fp8fx.quantize_(model)
    block = model.model.layers[0].mlp
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm.code)
        return gm

    with torch.no_grad():
        for dynamic, t in ((False, 1), (True, 5)):
            torch._dynamo.reset()
            x = torch.randn(1, t, 256, dtype=torch.bfloat16)
            out = torch.compile(block, backend=backend, fullgraph=True, dynamic=dynamic)(x)
            assert rel_err(out, block(x)) < 1e-5
    static, dynamic = graphs
    assert "fp8fx.expert_linear" in static and "torch.sort" not in static
    assert "fp8fx.grouped_linear" in dynamic and "fp8fx.expert_linear" not in dynamic


def test_expert_linear_op_checks_and_reference():
    from fp8fx import reference as R

    q, s = R.quantize_weight(torch.randn(4, 64, 128) * 0.05)
    x = torch.randn(3, 128)
    ids = torch.tensor([2, 0, 2, 2, 3, 1])
    y = torch.ops.fp8fx.expert_linear(x, ids, q, s, None, [128, 128])
    for r in range(6):
        # the same codes and scales; fp32 matmuls of different row counts may round apart
        torch.testing.assert_close(y[r], R.linear(x[r // 2 : r // 2 + 1], q[ids[r]], s[ids[r]])[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="a multiple of T = 3"):
        torch.ops.fp8fx.expert_linear(x, ids[:5], q, s, None, [128, 128])
    with pytest.raises(ValueError, match="1-D int32/int64"):
        torch.ops.fp8fx.expert_linear(x, ids.float(), q, s, None, [128, 128])
    with pytest.raises(RuntimeError, match=r"expert ids must lie in \[0, 4\)"):
        torch.ops.fp8fx.expert_linear(x, torch.tensor([0, 1, 2, 3, 4, 0]), q, s, None, [128, 128])


def test_bad_routing_inputs():
    model = _qwen3_moe()
    fp8fx.quantize_(model)
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"expert ids must lie in \[0, 8\)"):
        experts(x, torch.tensor([[0, 9], [1, 2], [3, 4], [5, 6]]), torch.rand(4, 2))
    with pytest.raises(ValueError, match="routing weights have shape"):
        experts(x, torch.tensor([[0, 1], [1, 2], [3, 4], [5, 6]]), torch.rand(4, 3))


def test_excluded_experts_keep_transformers_path():
    model = _qwen3_moe()
    fp8fx.quantize_(model, fp8fx.BlockFP8Config(modules_to_not_convert=("model.layers.1.mlp.experts",)))
    assert not isinstance(model.model.layers[1].mlp.experts.gate_up_proj, BlockFP8Tensor)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 512, (1, 8))).logits).all()


def test_moe_block_compiles_fullgraph_without_recompiles():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = _qwen3_moe()
    fp8fx.quantize_(model)
    block = model.model.layers[0].mlp
    cnt = CompileCounterWithBackend("inductor")
    compiled = torch.compile(block, backend=cnt, fullgraph=True)
    with torch.no_grad():
        for t in (10, 7, 12, 3):
            x = torch.randn(1, t, 256, dtype=torch.bfloat16)
            assert rel_err(compiled(x), block(x)) < 0.05
    assert cnt.frame_count == 2  # static first call, then one dynamic graph


def test_mixtral_fused_experts():
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        hidden_size=256, intermediate_size=256, num_local_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
    )
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits.float()
    report = fp8fx.quantize_(model)
    assert any(".experts.gate_up_proj" in r.name for r in report.converted)
    with torch.no_grad():
        assert rel_err(model(ids).logits.float(), ref) < 0.15


class _ExpertMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w3, self.w2 = torch.nn.Linear(256, 128), torch.nn.Linear(256, 128), torch.nn.Linear(128, 256)

    def forward(self, x):
        return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))


def test_per_expert_module_list_experts():
    """Older Mixtral-style MoE: a ModuleList of per-expert MLPs (plain nn.Linear each)."""
    torch.manual_seed(0)
    experts = torch.nn.ModuleList([_ExpertMLP() for _ in range(4)]).to(torch.bfloat16)
    x = torch.randn(6, 256, dtype=torch.bfloat16)
    ref = torch.stack([e(x) for e in experts]).float()
    report = fp8fx.quantize_(experts)
    assert len(report.converted) == 12 and all(isinstance(e.w2.weight, BlockFP8Tensor) for e in experts)
    with torch.no_grad():
        assert rel_err(torch.stack([e(x) for e in experts]).float(), ref) < 0.1
