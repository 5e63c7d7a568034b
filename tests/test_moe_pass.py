"""fp8fx.passes.moe: MoE expert GEMMs of unquantized (bf16) models -> fp8fx.grouped_linear at compile time.

Graph snapshots are expecttest ``assertExpectedInline`` strings of ``fp8fx.explain.format_graph``
(the post-grad graph, traced without code generation). To re-record after an intended change:
``EXPECTTEST_ACCEPT=1 python -m pytest tests/test_moe_pass.py``, then review the diff.
"""

import copy

import expecttest
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import fp8fx
from conftest import fresh_compile, rel_err
from fp8fx import BlockFP8Config, reference as R
from fp8fx.api import quantize_weight_chunked
from fp8fx.backend import backend, backend_with, last_report
from fp8fx.explain import explain, format_graph, post_grad_backend

BF16 = torch.bfloat16
H, I, E, TOPK = 256, 128, 4, 2  # hidden, expert intermediate, experts, experts per token


# -- models ---------------------------------------------------------------------------------------


def _config(name: str, impl: str, inter: int = I, dtype=BF16):
    import transformers

    common = dict(
        hidden_size=H, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
        num_experts_per_tok=TOPK, experts_implementation=impl, dtype=dtype,
    )
    if name == "qwen3":
        return transformers.Qwen3MoeConfig(intermediate_size=512, moe_intermediate_size=inter, num_experts=E, **common)
    if name == "mixtral":
        return transformers.MixtralConfig(intermediate_size=inter, num_local_experts=E, **common)
    if name == "deepseek_v3":
        return transformers.DeepseekV3Config(
            intermediate_size=512, moe_intermediate_size=inter, n_routed_experts=E, n_shared_experts=1, n_group=1,
            topk_group=1, first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=128, qk_rope_head_dim=32,
            qk_nope_head_dim=32, v_head_dim=64, **common,
        )
    if name == "gpt_oss":
        return transformers.GptOssConfig(intermediate_size=inter, num_local_experts=E, head_dim=64, **common)
    raise ValueError(name)


_EXPERTS = {
    "qwen3": "transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts",
    "mixtral": "transformers.models.mixtral.modeling_mixtral.MixtralExperts",
    "gpt_oss": "transformers.models.gpt_oss.modeling_gpt_oss.GptOssExperts",
}


def _experts(name: str, impl: str, inter: int = I, seed: int = 0, dtype=BF16) -> nn.Module:
    """A transformers v5 experts module alone, random weights (its model would initialize them)."""
    import importlib

    module, cls = _EXPERTS[name].rsplit(".", 1)
    torch.manual_seed(seed)
    experts = getattr(importlib.import_module(module), cls)(_config(name, impl, inter))
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0.0, 0.05)
    return experts.to(dtype).eval().requires_grad_(False)


def _routing(tokens: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, H, generator=g).to(BF16)
    ids = torch.stack([torch.randperm(E, generator=g)[:TOPK] for _ in range(tokens)])  # distinct per token
    weights = torch.rand(tokens, TOPK, generator=g).to(BF16)
    return x, ids, weights


class GptFastExperts(nn.Module):
    """Mixtral experts written as gpt-fast writes them: gathered weights and einsum.

    Legend: T tokens, A experts per token, D hidden, I expert intermediate, E experts.
    """

    def __init__(self, num_experts=E, dim=H, inter=I, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(num_experts, inter, dim, generator=g) * 0.05)  # [E, I, D]
        self.w2 = nn.Parameter(torch.randn(num_experts, dim, inter, generator=g) * 0.05)  # [E, D, I]
        self.w3 = nn.Parameter(torch.randn(num_experts, inter, dim, generator=g) * 0.05)  # [E, I, D]

    def forward(self, x, expert_indices):  # x: [T, D], expert_indices: [T, A]
        w1_weights = self.w1[expert_indices]  # [T, A, I, D]
        w3_weights = self.w3[expert_indices]  # [T, A, I, D]
        w2_weights = self.w2[expert_indices]  # [T, A, D, I]
        x1 = F.silu(torch.einsum("ti,taoi -> tao", x, w1_weights))  # [T, A, I]
        x3 = torch.einsum("ti, taoi -> tao", x, w3_weights)
        return torch.einsum("tao, taio -> tai", (x1 * x3), w2_weights)  # [T, A, D]


class DenseLoopExperts(nn.Module):
    """Every expert on every token, mixed by dense gates: a loop over experts with a Python index."""

    def __init__(self, num_experts=2, dim=H, inter=I, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(num_experts, inter, dim, generator=g) * 0.05)  # [E, I, D]

    def forward(self, x, gates):  # x: [T, D], gates: [T, E]
        out = 0
        for e in range(self.w.shape[0]):
            out = out + gates[:, e, None] * F.linear(x, self.w[e])
        return out


# -- helpers --------------------------------------------------------------------------------------


def post_grad(model, *args, config=None, dynamic=True):
    """(output, normalized post-grad graph, freeze report) of fp8fx.backend's compile, fullgraph,
    the graph run eagerly instead of compiled; asserts one graph (no graph break)."""
    graphs, reports = [], []
    with fresh_compile(), torch.no_grad():
        b = post_grad_backend(backend_with(config), graphs, reports)
        out = torch.compile(model, backend=b, fullgraph=True, dynamic=dynamic)(*args)
    assert len(graphs) == 1 and len(reports) == 1
    return out, format_graph(graphs[0]), reports[0][1]


def _q(w: torch.Tensor, transposed: bool = False):
    """The (qdata, scale) the compile-time freeze makes of a 3-D expert weight."""
    w = w.detach().transpose(-2, -1) if transposed else w.detach()
    return quantize_weight_chunked(w, (128, 128), "float32", "w")


def _fp8(x, qs, e):
    """x [M, K] through expert e of quantized weights qs = (qdata, scale), fp8fx's reference."""
    q, s = qs
    return R.linear(x, q[e], s[e], None, None, (128, 128))


def _reference_experts(x, ids, weights, expert_fn):
    """sum_k weights[t, k] * expert_fn(e, x[t]) for every token t, experts grouped as fp8fx groups
    them (rows of one expert in one GEMM): the reference for a transformers experts module."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32)
    flat = ids.reshape(-1)
    for e in range(E):
        pairs = (flat == e).nonzero().flatten()
        if pairs.numel():
            y = expert_fn(e, x[pairs // TOPK]).float() * weights.reshape(-1)[pairs, None].float()
            out.index_add_(0, pairs // TOPK, y)
    return out


# -- graph snapshots ------------------------------------------------------------------------------


class TestGraphs(expecttest.TestCase):
    maxDiff = None

    def test_grouped_mm(self):
        _, g, report = post_grad(_experts("qwen3", "grouped_mm"), *_routing())
        assert [r.name for r in report.converted] == ["gate_up_proj", "down_proj"]
        assert counters["fp8fx"]["moe_grouped_mm"] == 2
        self.assertExpectedInline(g, """\
in0: f8e4m3[4, 256, 256]
in1: f32[4, 2, 2]
in2: f8e4m3[4, 256, 128]
in3: f32[4, 2, 1]
in4: s0
in5: bf16[s0, 256]
in6: s1
in7: i64[s0, s1]
in8: bf16[s0, s1]
in9: bf16[4, 256, 256]
in10: bf16[4, 256, 128]
v11: i64[s0*s1] = aten.view(in7, [-1])
v12: (i64[s0*s1], i64[s0*s1]) = aten.sort(v11)
v13: i64[s0*s1] = getitem(v12, 0)
v14: i64[s0*s1] = getitem(v12, 1)
v15: i64[s0*s1] = aten.div(v14, in6, rounding_mode='floor')
v16: bf16[s0*s1, 256] = aten.index(in5, [v15])
v17: f32[s0*s1] = prims.convert_element_type(v13, f32)
v18: f32[4] = aten.histc(v17, 4, 0, 3)
v19: i32[4] = aten.cumsum(v18, 0, dtype=i32)
v20: bf16[s0*s1, 256] = fp8fx.grouped_linear(v16, in0, in1, v19, None, [128, 128])
v21: (bf16[s0*s1, 128], bf16[s0*s1, 128]) = aten.split(v20, 128, -1)
v22: bf16[s0*s1, 128] = getitem(v21, 0)
v23: bf16[s0*s1, 128] = getitem(v21, 1)
v24: f32[s0*s1, 128] = prims.convert_element_type(v22, f32)
v25: f32[s0*s1, 128] = aten.neg(v24)
v26: f32[s0*s1, 128] = aten.exp(v25)
v27: f32[s0*s1, 128] = aten.add(v26, 1)
v28: f32[s0*s1, 128] = aten.div(v24, v27)
v29: bf16[s0*s1, 128] = prims.convert_element_type(v28, bf16)
v30: bf16[s0*s1, 128] = aten.mul(v29, v23)
v31: bf16[s0*s1, 256] = fp8fx.grouped_linear(v30, in2, in3, v19, None, [128, 128])
v32: bf16[s0*s1] = aten.view(in8, [-1])
v33: bf16[s0*s1] = aten.index(v32, [v14])
v34: bf16[s0*s1, 1] = aten.unsqueeze(v33, -1)
v35: bf16[s0*s1, 256] = aten.mul(v31, v34)
v36: i64[s0*s1] = aten.empty([s0*s1], dtype=i64, layout=torch.strided, device=cpu, pin_memory=False)
v37: s0*s1 = mul(in4, in6)
v38: i64[s0*s1] = prims.iota(v37, start=0, step=1, dtype=i64, device=cpu, requires_grad=False)
v39: i64[s0*s1] = aten.index_put_(v36, [v14], v38)
v40: bf16[s0*s1, 256] = aten.index(v35, [v39])
v41: bf16[s0, s1, 256] = aten.view(v40, [in4, in6, 256])
v42: bf16[s0, 256] = aten.sum(v41, [1])
return (v42,)""")

    def test_batched_mm(self):
        _, g, report = post_grad(_experts("mixtral", "batched_mm"), *_routing())
        assert [r.name for r in report.converted] == ["gate_up_proj", "down_proj"]
        assert counters["fp8fx"]["moe_batched_mm"] == 2
        self.assertExpectedInline(g, """\
in0: f8e4m3[4, 256, 256]
in1: f32[4, 2, 2]
in2: f8e4m3[4, 256, 128]
in3: f32[4, 2, 1]
in4: s0
in5: s1
in6: i64[s0, s1]
in7: bf16[s0, 256]
in8: bf16[s0, s1]
in9: bf16[4, 256, 256]
in10: bf16[4, 256, 128]
v11: i64[s0*s1] = aten.view(in6, [-1])
v12: b8[s0*s1] = aten.ge(v11, 0)
v13: b8[s0*s1] = aten.lt(v11, 4)
v14: b8[s0*s1] = aten.bitwise_and(v12, v13)
v15: b8[s0*s1] = aten.logical_not(v14)
v16: b8[] = aten.any(v15)
v17: b8[] = aten.logical_not(v16)
v18: None = aten._assert_async(v17, 'fp8fx: expert ids must lie in [0, 4)')
v19: (i64[s0*s1], i64[s0*s1]) = aten.sort(v11)
v20: i64[s0*s1] = getitem(v19, 0)
v21: i64[s0*s1] = getitem(v19, 1)
v22: bf16[s0, 1, 256] = aten.unsqueeze(in7, 1)
v23: bf16[s0, s1, 256] = aten.expand(v22, [in4, in5, 256])
v24: bf16[s0, s1, 256] = aten.clone(v23, memory_format=torch.contiguous_format)
v25: s0*s1 = mul(in4, in5)
v26: bf16[s0*s1, 256] = aten.view(v24, [v25, 256])
v27: bf16[s0*s1, 256, 1] = aten.unsqueeze(v26, -1)
v28: bf16[s0*s1, 256] = aten.squeeze(v27, -1)
v29: bf16[s0*s1, 256] = aten.index(v28, [v21])
v30: f32[s0*s1] = prims.convert_element_type(v20, f32)
v31: f32[4] = aten.histc(v30, 4, 0, 3)
v32: i32[4] = aten.cumsum(v31, 0, dtype=i32)
v33: bf16[s0*s1, 256] = fp8fx.grouped_linear(v29, in0, in1, v32, None, [128, 128])
v34: i64[s0*s1] = aten.empty([v25], dtype=i64, layout=torch.strided, device=cpu, pin_memory=False)
v35: i64[s0*s1] = prims.iota(v25, start=0, step=1, dtype=i64, device=cpu, requires_grad=False)
v36: i64[s0*s1] = aten.scatter(v34, 0, v21, v35)
v37: bf16[s0*s1, 256] = aten.index(v33, [v36])
v38: bf16[s0*s1, 256, 1] = aten.unsqueeze(v37, -1)
v39: bf16[s0*s1, 256] = aten.squeeze(v38, -1)
v40: (bf16[s0*s1, 128], bf16[s0*s1, 128]) = aten.split(v39, 128, -1)
v41: bf16[s0*s1, 128] = getitem(v40, 0)
v42: bf16[s0*s1, 128] = getitem(v40, 1)
v43: f32[s0*s1, 128] = prims.convert_element_type(v41, f32)
v44: f32[s0*s1, 128] = aten.neg(v43)
v45: f32[s0*s1, 128] = aten.exp(v44)
v46: f32[s0*s1, 128] = aten.add(v45, 1)
v47: f32[s0*s1, 128] = aten.div(v43, v46)
v48: bf16[s0*s1, 128] = prims.convert_element_type(v47, bf16)
v49: bf16[s0*s1, 128] = aten.mul(v48, v42)
v50: bf16[s0*s1, 128, 1] = aten.unsqueeze(v49, -1)
v51: bf16[s0*s1, 128] = aten.squeeze(v50, -1)
v52: bf16[s0*s1, 128] = aten.index(v51, [v21])
v53: bf16[s0*s1, 256] = fp8fx.grouped_linear(v52, in2, in3, v32, None, [128, 128])
v54: bf16[s0*s1, 256] = aten.index(v53, [v36])
v55: bf16[s0*s1, 256, 1] = aten.unsqueeze(v54, -1)
v56: bf16[s0*s1, 256] = aten.squeeze(v55, -1)
v57: bf16[s0*s1] = aten.view(in8, [-1])
v58: bf16[s0*s1, 1] = aten.unsqueeze(v57, -1)
v59: bf16[s0*s1, 256] = aten.mul(v56, v58)
v60: bf16[s0, s1, 256] = aten.view(v59, [in4, in5, 256])
v61: bf16[s0, 256] = aten.sum(v60, [1])
return (v61,)""")

    def test_gpt_fast_einsum(self):
        x, ids, _ = _routing()
        _, g, report = post_grad(GptFastExperts().to(BF16).requires_grad_(False), x, ids)
        assert [r.name for r in report.converted] == ["w1", "w3", "w2"]
        assert counters["fp8fx"]["moe_einsum"] == 3
        self.assertExpectedInline(g, """\
in0: f8e4m3[4, 128, 256]
in1: f32[4, 1, 2]
in2: f8e4m3[4, 128, 256]
in3: f32[4, 1, 2]
in4: f8e4m3[4, 256, 128]
in5: f32[4, 2, 1]
in6: bf16[4, 128, 256]
in7: s0
in8: s1
in9: i64[s0, s1]
in10: bf16[4, 128, 256]
in11: bf16[4, 256, 128]
in12: bf16[s0, 256]
v13: i64[s0*s1] = aten.view(in9, [-1])
v14: b8[s0*s1] = aten.ge(v13, 0)
v15: b8[s0*s1] = aten.lt(v13, 4)
v16: b8[s0*s1] = aten.bitwise_and(v14, v15)
v17: b8[s0*s1] = aten.logical_not(v16)
v18: b8[] = aten.any(v17)
v19: b8[] = aten.logical_not(v18)
v20: None = aten._assert_async(v19, 'fp8fx: expert ids must lie in [0, 4)')
v21: (i64[s0*s1], i64[s0*s1]) = aten.sort(v13)
v22: i64[s0*s1] = getitem(v21, 0)
v23: i64[s0*s1] = getitem(v21, 1)
v24: i64[s0*s1] = aten.div(v23, in8, rounding_mode='floor')
v25: bf16[s0*s1, 256] = aten.index(in12, [v24])
v26: f32[s0*s1] = prims.convert_element_type(v22, f32)
v27: f32[4] = aten.histc(v26, 4, 0, 3)
v28: i32[4] = aten.cumsum(v27, 0, dtype=i32)
v29: bf16[s0*s1, 128] = fp8fx.grouped_linear(v25, in0, in1, v28, None, [128, 128])
v30: i64[s0*s1] = aten.empty([s0*s1], dtype=i64, layout=torch.strided, device=cpu, pin_memory=False)
v31: s0*s1 = sub(s0*s1, 0)
v32: s0*s1 + 1 = add(v31, 1)
v33: s0*s1 = sub(v32, 1)
v34: s0*s1 = floordiv(v33, 1)
v35: i64[s0*s1] = prims.iota(v34, start=0, step=1, dtype=i64, device=cpu, requires_grad=False)
v36: i64[s0*s1] = aten.scatter(v30, 0, v23, v35)
v37: bf16[s0*s1, 128] = aten.index(v29, [v36])
v38: bf16[s0, s1, 128] = aten.view(v37, [in7, in8, 128])
v39: f32[s0, s1, 128] = prims.convert_element_type(v38, f32)
v40: f32[s0, s1, 128] = aten.neg(v39)
v41: f32[s0, s1, 128] = aten.exp(v40)
v42: f32[s0, s1, 128] = aten.add(v41, 1)
v43: f32[s0, s1, 128] = aten.div(v39, v42)
v44: bf16[s0, s1, 128] = prims.convert_element_type(v43, bf16)
v45: bf16[s0*s1, 128] = fp8fx.grouped_linear(v25, in2, in3, v28, None, [128, 128])
v46: bf16[s0*s1, 128] = aten.index(v45, [v36])
v47: bf16[s0, s1, 128] = aten.view(v46, [in7, in8, 128])
v48: bf16[s0, s1, 128] = aten.mul(v44, v47)
v49: bf16[s0*s1, 128] = aten.view(v48, [-1, 128])
v50: bf16[s0*s1, 128] = aten.index(v49, [v23])
v51: bf16[s0*s1, 256] = fp8fx.grouped_linear(v50, in4, in5, v28, None, [128, 128])
v52: bf16[s0*s1, 256] = aten.index(v51, [v36])
v53: bf16[s0, s1, 256] = aten.view(v52, [in7, in8, 256])
return (v53,)""")

    def test_indexed_linear(self):
        model = DenseLoopExperts().to(BF16).requires_grad_(False)
        x, gates = _routing()[0], torch.rand(7, 2, generator=torch.Generator().manual_seed(2)).to(BF16)
        y, g, report = post_grad(model, x, gates)
        assert [r.name for r in report.converted] == ["w"]
        assert counters["fp8fx"]["moe_indexed_linear"] == 2
        w = _q(model.w)
        assert rel_err(y, sum(gates[:, e, None] * _fp8(x, w, e) for e in range(2))) < 5e-3
        self.assertExpectedInline(g, """\
in0: f8e4m3[2, 128, 256]
in1: f32[2, 1, 2]
in2: bf16[2, 128, 256]
in3: s0
in4: s1
in5: bf16[s0, s1]
in6: bf16[s0, 256]
v7: bf16[s0] = aten.select(in5, 1, 0)
v8: bf16[s0, 1] = aten.unsqueeze(v7, 1)
v9: f8e4m3[128, 256] = aten.select(in0, 0, 0)
v10: f32[1, 2] = aten.select(in1, 0, 0)
v11: f32[s0, 256] = prims.convert_element_type(in6, f32)
v12: f32[s0, 2, 128] = aten.view(v11, [s0, 2, 128])
v13: f32[s0, 2, 128] = aten.abs(v12)
v14: f32[s0, 2] = aten.amax(v13, [-1])
v15: f32[s0, 2] = aten.clamp_min(v14, 1e-12)
v16: f32[s0, 2] = aten.clamp_min(v15, 448.0)
v17: f32[s0, 2] = aten.clamp_max(v16, 448.0)
v18: f32[s0, 2] = aten.div(v15, v17)
v19: f32[s0, 2, 1] = aten.unsqueeze(v18, -1)
v20: f32[s0, 2, 128] = aten.div(v12, v19)
v21: f32[s0, 2, 128] = aten.clamp_min(v20, -448.0)
v22: f32[s0, 2, 128] = aten.clamp_max(v21, 448.0)
v23: f8e4m3[s0, 2, 128] = prims.convert_element_type(v22, f8e4m3)
v24: f8e4m3[s0, 256] = aten.view(v23, [s0, 256])
v25: bf16[s0, 128] = fp8fx.block_gemm(v24, v18, v9, v10, None, [128, 128], bf16)
v26: bf16[s0, 128] = aten.mul(v8, v25)
v27: bf16[s0, 128] = aten.add(v26, 0)
v28: bf16[s0] = aten.select(in5, 1, 1)
v29: bf16[s0, 1] = aten.unsqueeze(v28, 1)
v30: f8e4m3[128, 256] = aten.select(in0, 0, 1)
v31: f32[1, 2] = aten.select(in1, 0, 1)
v32: bf16[s0, 128] = fp8fx.block_gemm(v24, v18, v30, v31, None, [128, 128], bf16)
v33: bf16[s0, 128] = aten.mul(v29, v32)
v34: bf16[s0, 128] = aten.add(v27, v33)
return (v34,)""")


# -- numerics (fullgraph; Inductor code, or the post-grad graph run eagerly) vs eager fp8fx / reference --


def test_grouped_mm_compiled_equals_quantized_eager():
    """transformers "grouped_mm" experts compiled from bf16 compute exactly what fp8fx.quantize_
    + the eager "fp8fx" experts implementation compute (same codes, same grouped GEMMs)."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    torch.manual_seed(0)
    block = Qwen3MoeSparseMoeBlock(_config("qwen3", "grouped_mm"))
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.05)
    block = block.to(BF16).eval().requires_grad_(False)
    eager = copy.deepcopy(block)
    fp8fx.quantize_(eager)
    assert eager.experts.config._experts_implementation == "fp8fx"
    x = torch.randn(1, 9, H, dtype=BF16)
    with fresh_compile(), torch.no_grad():
        compiled = torch.compile(block, backend=backend, fullgraph=True, dynamic=True)
        y = compiled(x)
        assert counters["fp8fx"]["moe_grouped_mm"] == 2 and counters["stats"]["unique_graphs"] == 1
        assert counters["fp8fx"]["topk"] == 1  # the router's top-k: fp8fx.topk, same picks
        assert torch.equal(y, eager(x))
        x2 = torch.randn(1, 5, H, dtype=BF16)
        assert torch.equal(compiled(x2), eager(x2))  # the same dynamic graph
        assert counters["stats"]["unique_graphs"] == 1
    report = last_report()
    assert [r.name for r in report.converted] == ["experts.gate_up_proj", "experts.down_proj"]
    assert [r.name for r in report.skipped] == ["gate.weight"]  # the router: 4 outputs, not a multiple of 16
    assert all(isinstance(p, torch.Tensor) and p.dtype == BF16 for p in block.parameters())  # model untouched


def test_gpt_fast_einsum_compiled_matches_reference():
    model = GptFastExperts().to(BF16).requires_grad_(False)
    x, ids, _ = _routing(tokens=9)
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=True)
    with fresh_compile(), torch.no_grad():
        y = compiled(x, ids)
        assert counters["fp8fx"]["moe_einsum"] == 3
        # Out-of-range expert ids trip the device-side assert in the compiled code.
        bad = ids.clone()
        bad[3, 1] = E
        with pytest.raises(RuntimeError, match=r"expert ids must lie in \[0, 4\)"):
            compiled(x, bad)
        assert counters["stats"]["unique_graphs"] == 1
    w1, w2, w3 = (_q(w) for w in (model.w1, model.w2, model.w3))
    expect = torch.empty(9, TOPK, H)
    for t in range(9):
        for a in range(TOPK):
            e = ids[t, a].item()
            h = F.silu(_fp8(x[t : t + 1], w1, e)) * _fp8(x[t : t + 1], w3, e)
            expect[t, a] = _fp8(h, w2, e)[0].float()
    assert rel_err(y, expect) < 5e-3
    assert rel_err(y, model(x, ids)) < 0.1  # and close to the bf16 model


@pytest.mark.parametrize(
    "name,impl,dynamic,dtype",
    [
        ("mixtral", "batched_mm", True, BF16),
        ("gpt_oss", "grouped_mm", True, BF16),
        ("gpt_oss", "batched_mm", False, BF16),
        ("qwen3", "grouped_mm", False, torch.float32),  # transformers' grouped_mm_fallback op
    ],
    ids=["mixtral-batched_mm", "gpt_oss-grouped_mm", "gpt_oss-batched_mm", "qwen3-fp32-grouped_mm_fallback"],
)
def test_experts_match_reference(name, impl, dynamic, dtype):
    """transformers experts modules (Mixtral batched_mm; GPT-OSS: [E, K, N] weights read
    transposed, with biases; fp32 weights) against per-expert reference GEMMs on the same fp8 weights."""
    experts = _experts(name, impl, dtype=dtype)
    x, ids, weights = (t.to(dtype) if t.is_floating_point() else t for t in _routing())
    y, g, report = post_grad(experts, x, ids, weights, dynamic=dynamic)
    assert y.dtype == dtype
    assert [r.name for r in report.converted] == ["gate_up_proj", "down_proj"]
    # Counted once, although GPT-OSS's float gate constants make Dynamo restart a dynamic
    # compile after the backend ran (_tensorify_python_scalars).
    assert counters["fp8fx"] == {f"moe_{impl}": 2}
    assert g.count("fp8fx.grouped_linear") == 2 and "bmm" not in g and "grouped_mm" not in g
    transposed = getattr(experts, "is_transposed", False)
    up, down = _q(experts.gate_up_proj, transposed), _q(experts.down_proj, transposed)
    up_b, down_b = (getattr(experts, n, None) for n in ("gate_up_proj_bias", "down_proj_bias"))

    def expert(e, rows):
        h = experts._apply_gate(_fp8(rows, up, e) + (0 if up_b is None else up_b[e]))
        return _fp8(h, down, e) + (0 if down_b is None else down_b[e])

    assert rel_err(y, _reference_experts(x, ids, weights, expert)) < 5e-3
    with torch.no_grad():
        assert rel_err(y, experts(x, ids, weights)) < 0.1


def test_deepseek_v3_moe_block():
    """DeepSeek-V3's MoE: routed experts (grouped_mm) and the shared experts' linears, together."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    torch.manual_seed(0)
    block = DeepseekV3MoE(_config("deepseek_v3", "grouped_mm"))
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.05)
    block = block.to(BF16).eval().requires_grad_(False)
    eager = copy.deepcopy(block)
    fp8fx.quantize_(eager)
    x = torch.randn(1, 6, H, dtype=BF16)
    y, g, report = post_grad(block, x)
    assert counters["fp8fx"]["moe_grouped_mm"] == 2 and counters["fp8fx"]["linear"] == 3
    shared = [f"shared_experts.{n}_proj.weight" for n in ("gate", "up", "down")]
    assert sorted(r.name for r in report.converted) == sorted(["experts.gate_up_proj", "experts.down_proj"] + shared)
    with torch.no_grad():
        assert rel_err(y, eager(x)) < 5e-3


# -- what stays in high precision, and says so ----------------------------------------------------


class TwoExpertLayers(nn.Module):
    def __init__(self, impl="grouped_mm"):
        super().__init__()
        self.layers = nn.ModuleList([_experts("qwen3", impl, seed=i) for i in range(2)])

    def forward(self, x, ids, weights):
        return self.layers[1](self.layers[0](x, ids, weights), ids, weights)


def test_excluded_experts_stay_bf16_and_are_reported():
    model = TwoExpertLayers()
    config = BlockFP8Config(modules_to_not_convert=("layers.1",))
    _, g, report = post_grad(model, *_routing(), config=config)
    assert counters["fp8fx"]["moe_grouped_mm"] == 2
    # Layer 1's experts keep their bf16 grouped GEMMs; layer 0's are fp8.
    assert g.count("fp8fx.grouped_linear") == 2 and g.count("aten._grouped_mm") == 2
    # The same decisions, for the same reasons, as fp8fx.quantize_.
    expected = fp8fx.quantize_(copy.deepcopy(model), config)
    assert [r.name for r in report.converted] == [r.name for r in expected.converted]
    assert [(r.name, r.reason) for r in report.skipped] == [(r.name, r.reason) for r in expected.skipped]
    with fresh_compile():
        text = str(explain(model, *_routing(), config=config))
    expecttest.assert_expected_inline(text, """\
fp8fx.explain: 1 graph, 2 GEMM weights rewritten to block-FP8, 2 skipped
  rewritten layers.0.gate_up_proj [4, 256, 256] (quantized at compile time)
  rewritten layers.0.down_proj [4, 256, 128] (quantized at compile time)
  skipped   layers.1.gate_up_proj [4, 256, 256]: excluded by modules_to_not_convert pattern 'layers.1'
  skipped   layers.1.down_proj [4, 256, 128]: excluded by modules_to_not_convert pattern 'layers.1'
  compile-time expert rewrites: moe_grouped_mm x2""")


def test_ineligible_expert_dims_stay_bf16_and_are_reported():
    # moe_intermediate_size 40: down_proj [E, 256, 40] has K = 40, not a multiple of 16.
    experts = _experts("qwen3", "grouped_mm", inter=40)
    x, ids, weights = _routing()
    y, g, report = post_grad(experts, x, ids, weights)
    assert [r.name for r in report.converted] == ["gate_up_proj"]
    assert [(r.name, r.shape) for r in report.skipped] == [("down_proj", (4, 256, 40))]
    assert "multiples of 16" in report.skipped[0].reason
    assert g.count("fp8fx.grouped_linear") == 1 and g.count("aten._grouped_mm") == 1
    up = _q(experts.gate_up_proj)

    def expert(e, rows):
        return F.linear(experts._apply_gate(_fp8(rows, up, e)), experts.down_proj[e])

    assert rel_err(y, _reference_experts(x, ids, weights, expert)) < 5e-3


def test_unrecognized_use_stays_bf16_and_is_reported():
    class Peek(GptFastExperts):
        def forward(self, x, expert_indices):
            return super().forward(x, expert_indices), self.w2.sum()  # w2 read outside a GEMM too

    model = Peek().to(BF16).requires_grad_(False)
    _, g, report = post_grad(model, *_routing()[:2])
    assert [r.name for r in report.converted] == ["w1", "w3"]
    assert [r.name for r in report.skipped] == ["w2"]
    assert "sum" in report.skipped[0].reason and "no fp8fx expert GEMM pattern covers" in report.skipped[0].reason
    assert g.count("fp8fx.grouped_linear") == 2 and counters["fp8fx"]["moe_einsum"] == 2


def test_requires_grad_raises():
    experts = _experts("qwen3", "grouped_mm").requires_grad_(True)
    with fresh_compile(), pytest.raises(Exception, match="gate_up_proj requires grad"):
        torch.compile(experts, backend=backend, fullgraph=True)(*_routing())


def test_out_of_range_expert_ids_trip_the_device_assert():
    x, ids, weights = _routing()
    ids[3, 1] = -1
    with pytest.raises(RuntimeError, match=r"expert ids must lie in \[0, 4\)"):
        post_grad(_experts("mixtral", "batched_mm"), x, ids, weights)


# -- transformers' "eager" experts: no traceable graph, said so -------------------------------------


def test_eager_experts_do_not_trace_fullgraph():
    """Documented behaviour (passes/moe.py): the "eager" experts loop over nonzero() stops Dynamo
    under fullgraph=True, before any backend runs; nothing is compiled, nothing is presented as FP8."""
    experts = _experts("qwen3", "eager")
    with fresh_compile(), pytest.raises(torch._dynamo.exc.UserError, match="data-dependent"):
        torch.compile(experts, backend=backend, fullgraph=True)(*_routing())


def test_explain_reports_eager_experts_outside_graphs():
    experts = _experts("qwen3", "eager")
    with fresh_compile():
        text = str(explain(experts, *_routing()))
    expecttest.assert_expected_inline(text, """\
fp8fx.explain: 2 graphs (graph breaks!), 0 GEMM weights rewritten to block-FP8, 2 skipped
  skipped   gate_up_proj [4, 256, 256]: in no compiled graph: its GEMMs ran outside torch.compile, in high precision (experts_implementation='eager' loops over nonzero() and does not trace; use model.set_experts_implementation('grouped_mm') or 'batched_mm')
  skipped   down_proj [4, 256, 128]: in no compiled graph: its GEMMs ran outside torch.compile, in high precision (experts_implementation='eager' loops over nonzero() and does not trace; use model.set_experts_implementation('grouped_mm') or 'batched_mm')""")
    # The remedy the report names works: the same module with grouped_mm experts is rewritten.
    experts.config._experts_implementation = "grouped_mm"
    with fresh_compile():
        e = explain(experts, *_routing())
    assert len(e.graphs) == 1 and counters["fp8fx"]["moe_grouped_mm"] == 2
    assert [r.name for r in e.rewritten] == ["gate_up_proj", "down_proj"] and not e.skipped
