"""fp8fx.backend and fp8fx.passes on CPU: graph snapshots, generated code, counters, numerics.

Graph snapshots are expecttest ``assertExpectedInline`` strings of ``fp8fx.explain.format_graph``
(the post-grad graph after fp8fx's pass, traced without code generation). To re-record after
an intended change: ``EXPECTTEST_ACCEPT=1 python -m pytest tests/test_backend.py``, then
review the diff.
"""

import copy
import re

import expecttest
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code
from torch.testing import FileCheck

import fp8fx
from conftest import compile_post_grad, fresh_compile, heavy_tailed, rel_err
from fp8fx import BlockFP8Config, BlockFP8Tensor, reference as R
from fp8fx.backend import Backend, backend, backend_with, last_report
from fp8fx.explain import explain, post_grad_backend
from fp8fx.passes import PostGradPass
from fp8fx.passes.linear import quantize_act_decomposed

BF16 = torch.bfloat16


# -- models (tiny; K a multiple of 128 unless a test says otherwise) ----------------------


class Proj(nn.Module):
    def __init__(self, k=256, n=384, bias=False):
        super().__init__()
        self.proj = nn.Linear(k, n, bias=bias)

    def forward(self, x):
        return self.proj(x)


class NormQKV(nn.Module):
    """RMSNorm -> q/k/v projections: the attention input of a decoder layer."""

    def __init__(self, h=256, kv=128):
        super().__init__()
        self.norm = nn.RMSNorm(h, eps=1e-6)
        self.q, self.k, self.v = nn.Linear(h, h, bias=False), nn.Linear(h, kv, bias=False), nn.Linear(h, kv, bias=False)

    def forward(self, x):
        h = self.norm(x)
        return self.q(h), self.k(h), self.v(h)


class SwiGLU(nn.Module):
    """(optional RMSNorm) -> gate/up -> silu(gate) * up -> down: a Llama MLP."""

    def __init__(self, h=256, i=512, norm=False):
        super().__init__()
        self.norm = nn.RMSNorm(h, eps=1e-6) if norm else nn.Identity()
        self.gate_proj, self.up_proj = nn.Linear(h, i, bias=False), nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x):
        h = self.norm(x)
        return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


def _build(cls, *args, quantize=True, config=None, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = cls(*args, **kwargs).to(BF16).eval().requires_grad_(False)
    if quantize:
        fp8fx.quantize_(model, config)
    return model


def _llama_layer(quantize=True):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(config, 0).to(BF16).eval().requires_grad_(False)
    if quantize:
        fp8fx.quantize_(layer)
    h = heavy_tailed(1, 9, 256, dtype=BF16, seed=1, outliers=False)
    cos, sin = LlamaRotaryEmbedding(config)(h, torch.arange(9)[None])
    return layer, h, {"position_embeddings": (cos, sin), "attention_mask": None}


# -- helpers --------------------------------------------------------------------------------


def post_grad(model, *args, config=None, dynamic=True, quant_in_gemv=True, **kwargs) -> str:
    """The normalized post-grad graph fp8fx.backend would compile (fullgraph, dynamic unless
    ``dynamic=False``: the static shapes of a decode graph)."""
    return compile_post_grad(model, *args, kwargs=kwargs, dynamic=dynamic, config=config, quant_in_gemv=quant_in_gemv)[1]


def compile_and_code(model, *args, b=backend, **kwargs):
    """Compile with fp8fx.backend, run once; (output, generated code of the one graph)."""
    compiled = torch.compile(model, backend=b, fullgraph=True, dynamic=True)
    with torch.no_grad():
        out, codes = run_and_get_code(compiled, *args, **kwargs)
    assert len(codes) == 1
    return out, codes[0]


def call_sequence(code: str) -> list[str]:
    """The generated ``call`` body as a list: 'kernel:<name>' for each fused kernel launch and
    'gemm' for each block-FP8 GEMM call (passes/lowering.py's externs, a packed group's
    fp8fx_block_gemm_cat included), in order."""
    body = code[code.index("def call(") :]
    seq = []
    for line in body.splitlines():
        if "extern_kernels.fp8fx_block_gemm(" in line or "extern_kernels.fp8fx_block_gemm_cat(" in line:
            seq.append("gemm")
        elif (m := re.match(r"\s+(cpp_fused\w*)\(", line)) is not None:
            seq.append("kernel:" + m.group(1))
    return seq


def kernel_source(code: str, name: str) -> str:
    start = code.index(f"{name} = async_compile")
    return code[start : code.index("''')", start)]


def codes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# -- graph snapshots --------------------------------------------------------------------------


class TestGraphs(expecttest.TestCase):
    maxDiff = None

    def test_plain_linear(self):
        g = post_grad(_build(Proj), torch.randn(5, 256, dtype=BF16))
        self.assertExpectedInline(g, """\
in0: f8e4m3[384, 256]
in1: f32[3, 2]
in2: s0
in3: bf16[s0, 256]
v4: f32[s0, 256] = prims.convert_element_type(in3, f32)
v5: f32[s0, 2, 128] = aten.view(v4, [s0, 2, 128])
v6: f32[s0, 2, 128] = aten.abs(v5)
v7: f32[s0, 2] = aten.amax(v6, [-1])
v8: f32[s0, 2] = aten.clamp_min(v7, 1e-12)
v9: f32[s0, 2] = aten.clamp_min(v8, 448.0)
v10: f32[s0, 2] = aten.clamp_max(v9, 448.0)
v11: f32[s0, 2] = aten.div(v8, v10)
v12: f32[s0, 2, 1] = aten.unsqueeze(v11, -1)
v13: f32[s0, 2, 128] = aten.div(v5, v12)
v14: f32[s0, 2, 128] = aten.clamp_min(v13, -448.0)
v15: f32[s0, 2, 128] = aten.clamp_max(v14, 448.0)
v16: f8e4m3[s0, 2, 128] = prims.convert_element_type(v15, f8e4m3)
v17: f8e4m3[s0, 256] = aten.view(v16, [s0, 256])
v18: bf16[s0, 384] = fp8fx.block_gemm(v17, v11, in0, in1, None, [128, 128], bf16)
return (v18,)""")

    def test_linear_bias_partial_group(self):
        # K = 320: the last activation group has 64 columns; fp8fx.act_quant stays an op call
        # (see quantize_act_decomposed) and the GEMM still becomes block_gemm.
        g = post_grad(_build(Proj, 320, 256, bias=True), torch.randn(5, 320, dtype=BF16))
        self.assertExpectedInline(g, """\
in0: f8e4m3[256, 320]
in1: f32[2, 3]
in2: bf16[256]
in3: s0
in4: bf16[s0, 320]
v5: (f8e4m3[s0, 320], f32[s0, 3]) = fp8fx.act_quant(in4, 128, False)
v6: f8e4m3[s0, 320] = getitem(v5, 0)
v7: f32[s0, 3] = getitem(v5, 1)
v8: bf16[s0, 256] = fp8fx.block_gemm(v6, v7, in0, in1, in2, [128, 128], bf16)
return (v8,)""")

    def test_rmsnorm_qkv(self):
        # One quantization of the normalized input, shared by the three GEMMs.
        g = post_grad(_build(NormQKV), torch.randn(5, 256, dtype=BF16))
        self.assertExpectedInline(g, """\
in0: f8e4m3[256, 256]
in1: f32[2, 2]
in2: f8e4m3[128, 256]
in3: f32[1, 2]
in4: f8e4m3[128, 256]
in5: f32[1, 2]
in6: bf16[256]
in7: s0
in8: bf16[s0, 256]
v9: f32[s0, 256] = prims.convert_element_type(in8, f32)
v10: f32[s0, 256] = aten.pow(v9, 2)
v11: f32[s0, 1] = aten.mean(v10, [1], True)
v12: f32[s0, 1] = aten.add(v11, 9.999999974752427e-07)
v13: f32[s0, 1] = aten.rsqrt(v12)
v14: f32[s0, 256] = aten.mul(v9, v13)
v15: f32[s0, 256] = aten.mul(v14, in6)
v16: bf16[s0, 256] = prims.convert_element_type(v15, bf16)
v17: f32[s0, 256] = prims.convert_element_type(v16, f32)
v18: f32[s0, 2, 128] = aten.view(v17, [s0, 2, 128])
v19: f32[s0, 2, 128] = aten.abs(v18)
v20: f32[s0, 2] = aten.amax(v19, [-1])
v21: f32[s0, 2] = aten.clamp_min(v20, 1e-12)
v22: f32[s0, 2] = aten.clamp_min(v21, 448.0)
v23: f32[s0, 2] = aten.clamp_max(v22, 448.0)
v24: f32[s0, 2] = aten.div(v21, v23)
v25: f32[s0, 2, 1] = aten.unsqueeze(v24, -1)
v26: f32[s0, 2, 128] = aten.div(v18, v25)
v27: f32[s0, 2, 128] = aten.clamp_min(v26, -448.0)
v28: f32[s0, 2, 128] = aten.clamp_max(v27, 448.0)
v29: f8e4m3[s0, 2, 128] = prims.convert_element_type(v28, f8e4m3)
v30: f8e4m3[s0, 256] = aten.view(v29, [s0, 256])
v31: bf16[s0, 256] = fp8fx.block_gemm(v30, v24, in0, in1, None, [128, 128], bf16)
v32: bf16[s0, 128] = fp8fx.block_gemm(v30, v24, in2, in3, None, [128, 128], bf16)
v33: bf16[s0, 128] = fp8fx.block_gemm(v30, v24, in4, in5, None, [128, 128], bf16)
return (v31, v32, v33)""")

    def test_rmsnorm_qkv_decode(self):
        # One token, static shapes (a decode graph): the three GEMMs of the normalized input
        # become one linear_cat (one gemv launch on CUDA quantizing in the kernel), sliced
        # back per GEMM; no quantization is left for the RMSNorm's kernel.
        g = post_grad(_build(NormQKV), torch.randn(1, 1, 256, dtype=BF16), dynamic=False)
        self.assertExpectedInline(g, """\
in0: f8e4m3[256, 256]
in1: f32[2, 2]
in2: f8e4m3[128, 256]
in3: f32[1, 2]
in4: f8e4m3[128, 256]
in5: f32[1, 2]
in6: bf16[256]
in7: bf16[1, 1, 256]
v8: f32[1, 1, 256] = prims.convert_element_type(in7, f32)
v9: f32[1, 1, 256] = aten.pow(v8, 2)
v10: f32[1, 1, 1] = aten.mean(v9, [2], True)
v11: f32[1, 1, 1] = aten.add(v10, 9.999999974752427e-07)
v12: f32[1, 1, 1] = aten.rsqrt(v11)
v13: f32[1, 1, 256] = aten.mul(v8, v12)
v14: f32[1, 1, 256] = aten.mul(v13, in6)
v15: bf16[1, 1, 256] = prims.convert_element_type(v14, bf16)
v16: bf16[1, 1, 512] = fp8fx.linear_cat(v15, [in0, in2, in4], [in1, in3, in5], [None, None, None], [128, 128])
v17: bf16[1, 1, 256] = aten.slice(v16, 2, 0, 256)
v18: bf16[1, 1, 128] = aten.slice(v16, 2, 256, 384)
v19: bf16[1, 1, 128] = aten.slice(v16, 2, 384, 512)
return (v17, v18, v19)""")

    def test_rmsnorm_qkv_decode_quant_in_producer(self):
        # quant_in_gemv=False: the quantization stays with the RMSNorm, and the three GEMMs of
        # the shared codes become one block_gemm_cat (one gemv launch on CUDA).
        g = post_grad(_build(NormQKV), torch.randn(1, 1, 256, dtype=BF16), dynamic=False, quant_in_gemv=False)
        self.assertExpectedInline(g, """\
in0: f8e4m3[256, 256]
in1: f32[2, 2]
in2: f8e4m3[128, 256]
in3: f32[1, 2]
in4: f8e4m3[128, 256]
in5: f32[1, 2]
in6: bf16[256]
in7: bf16[1, 1, 256]
v8: f32[1, 1, 256] = prims.convert_element_type(in7, f32)
v9: f32[1, 1, 256] = aten.pow(v8, 2)
v10: f32[1, 1, 1] = aten.mean(v9, [2], True)
v11: f32[1, 1, 1] = aten.add(v10, 9.999999974752427e-07)
v12: f32[1, 1, 1] = aten.rsqrt(v11)
v13: f32[1, 1, 256] = aten.mul(v8, v12)
v14: f32[1, 1, 256] = aten.mul(v13, in6)
v15: bf16[1, 1, 256] = prims.convert_element_type(v14, bf16)
v16: f32[1, 1, 256] = prims.convert_element_type(v15, f32)
v17: f32[1, 1, 2, 128] = aten.view(v16, [1, 1, 2, 128])
v18: f32[1, 1, 2, 128] = aten.abs(v17)
v19: f32[1, 1, 2] = aten.amax(v18, [-1])
v20: f32[1, 1, 2] = aten.clamp_min(v19, 1e-12)
v21: f32[1, 1, 2] = aten.clamp_min(v20, 448.0)
v22: f32[1, 1, 2] = aten.clamp_max(v21, 448.0)
v23: f32[1, 1, 2] = aten.div(v20, v22)
v24: f32[1, 1, 2, 1] = aten.unsqueeze(v23, -1)
v25: f32[1, 1, 2, 128] = aten.div(v17, v24)
v26: f32[1, 1, 2, 128] = aten.clamp_min(v25, -448.0)
v27: f32[1, 1, 2, 128] = aten.clamp_max(v26, 448.0)
v28: f8e4m3[1, 1, 2, 128] = prims.convert_element_type(v27, f8e4m3)
v29: f8e4m3[1, 1, 256] = aten.view(v28, [1, 1, 256])
v30: bf16[1, 1, 512] = fp8fx.block_gemm_cat(v29, v23, [in0, in2, in4], [in1, in3, in5], [None, None, None], [128, 128], bf16)
v31: bf16[1, 1, 256] = aten.slice(v30, 2, 0, 256)
v32: bf16[1, 1, 128] = aten.slice(v30, 2, 256, 384)
v33: bf16[1, 1, 128] = aten.slice(v30, 2, 384, 512)
return (v31, v32, v33)""")

    def test_swiglu_mlp(self):
        g = post_grad(_build(SwiGLU), torch.randn(2, 3, 256, dtype=BF16))
        self.assertExpectedInline(g, """\
in0: f8e4m3[512, 256]
in1: f32[4, 2]
in2: f8e4m3[512, 256]
in3: f32[4, 2]
in4: f8e4m3[256, 512]
in5: f32[2, 4]
in6: s0
in7: s1
in8: bf16[s0, s1, 256]
v9: f32[s0, s1, 256] = prims.convert_element_type(in8, f32)
v10: f32[s0, s1, 2, 128] = aten.view(v9, [s0, s1, 2, 128])
v11: f32[s0, s1, 2, 128] = aten.abs(v10)
v12: f32[s0, s1, 2] = aten.amax(v11, [-1])
v13: f32[s0, s1, 2] = aten.clamp_min(v12, 1e-12)
v14: f32[s0, s1, 2] = aten.clamp_min(v13, 448.0)
v15: f32[s0, s1, 2] = aten.clamp_max(v14, 448.0)
v16: f32[s0, s1, 2] = aten.div(v13, v15)
v17: f32[s0, s1, 2, 1] = aten.unsqueeze(v16, -1)
v18: f32[s0, s1, 2, 128] = aten.div(v10, v17)
v19: f32[s0, s1, 2, 128] = aten.clamp_min(v18, -448.0)
v20: f32[s0, s1, 2, 128] = aten.clamp_max(v19, 448.0)
v21: f8e4m3[s0, s1, 2, 128] = prims.convert_element_type(v20, f8e4m3)
v22: f8e4m3[s0, s1, 256] = aten.view(v21, [s0, s1, 256])
v23: bf16[s0, s1, 1024] = fp8fx.block_gemm_cat(v22, v16, [in0, in2], [in1, in3], [None, None], [128, 128], bf16)
v24: bf16[s0, s1, 512] = aten.slice(v23, 2, 0, 512)
v25: bf16[s0, s1, 512] = aten.slice(v23, 2, 512, 1024)
v26: f32[s0, s1, 512] = prims.convert_element_type(v24, f32)
v27: f32[s0, s1, 512] = aten.neg(v26)
v28: f32[s0, s1, 512] = aten.exp(v27)
v29: f32[s0, s1, 512] = aten.add(v28, 1)
v30: f32[s0, s1, 512] = aten.div(v26, v29)
v31: bf16[s0, s1, 512] = prims.convert_element_type(v30, bf16)
v32: bf16[s0, s1, 512] = aten.mul(v31, v25)
v33: f32[s0, s1, 512] = prims.convert_element_type(v32, f32)
v34: f32[s0, s1, 4, 128] = aten.view(v33, [s0, s1, 4, 128])
v35: f32[s0, s1, 4, 128] = aten.abs(v34)
v36: f32[s0, s1, 4] = aten.amax(v35, [-1])
v37: f32[s0, s1, 4] = aten.clamp_min(v36, 1e-12)
v38: f32[s0, s1, 4] = aten.clamp_min(v37, 448.0)
v39: f32[s0, s1, 4] = aten.clamp_max(v38, 448.0)
v40: f32[s0, s1, 4] = aten.div(v37, v39)
v41: f32[s0, s1, 4, 1] = aten.unsqueeze(v40, -1)
v42: f32[s0, s1, 4, 128] = aten.div(v34, v41)
v43: f32[s0, s1, 4, 128] = aten.clamp_min(v42, -448.0)
v44: f32[s0, s1, 4, 128] = aten.clamp_max(v43, 448.0)
v45: f8e4m3[s0, s1, 4, 128] = prims.convert_element_type(v44, f8e4m3)
v46: f8e4m3[s0, s1, 512] = aten.view(v45, [s0, s1, 512])
v47: bf16[s0, s1, 256] = fp8fx.block_gemm(v46, v40, in4, in5, None, [128, 128], bf16)
return (v47,)""")

    def test_ue8m0_scales(self):
        g = post_grad(_build(Proj, config=BlockFP8Config(scale_fmt="ue8m0")), torch.randn(5, 256, dtype=BF16))
        self.assertExpectedInline(g, """\
in0: f8e4m3[384, 256]
in1: e8m0[3, 2]
in2: s0
in3: bf16[s0, 256]
v4: f32[s0, 256] = prims.convert_element_type(in3, f32)
v5: f32[s0, 2, 128] = aten.view(v4, [s0, 2, 128])
v6: f32[s0, 2, 128] = aten.abs(v5)
v7: f32[s0, 2] = aten.amax(v6, [-1])
v8: f32[s0, 2] = aten.clamp_min(v7, 1e-12)
v9: f32[s0, 2] = aten.clamp_min(v8, 448.0)
v10: f32[s0, 2] = aten.clamp_max(v9, 448.0)
v11: f32[s0, 2] = aten.div(v8, v10)
v12: i32[s0, 2] = aten.view(v11, i32)
v13: i32[s0, 2] = aten.bitwise_right_shift(v12, 23)
v14: i32[s0, 2] = aten.bitwise_and(v13, 255)
v15: i32[s0, 2] = aten.bitwise_and(v12, 8388607)
v16: b8[s0, 2] = aten.ne(v15, 0)
v17: i32[s0, 2] = prims.convert_element_type(v16, i32)
v18: i32[s0, 2] = aten.add(v14, v17)
v19: i32[s0, 2] = aten.bitwise_left_shift(v18, 23)
v20: f32[s0, 2] = aten.view(v19, f32)
v21: f32[s0, 2, 1] = aten.unsqueeze(v20, -1)
v22: f32[s0, 2, 128] = aten.div(v5, v21)
v23: f32[s0, 2, 128] = aten.clamp_min(v22, -448.0)
v24: f32[s0, 2, 128] = aten.clamp_max(v23, 448.0)
v25: f8e4m3[s0, 2, 128] = prims.convert_element_type(v24, f8e4m3)
v26: f8e4m3[s0, 256] = aten.view(v25, [s0, 256])
v27: bf16[s0, 384] = fp8fx.block_gemm(v26, v20, in0, in1, None, [128, 128], bf16)
return (v27,)""")

    def test_static_activation_scale(self):
        model = _build(Proj, quantize=False)
        w = model.proj.weight
        qw = BlockFP8Tensor.from_hp(w, act_scale=torch.tensor(0.02))
        model.proj.weight = nn.Parameter(qw, requires_grad=False)
        g = post_grad(model, torch.randn(5, 256, dtype=BF16))
        self.assertExpectedInline(g, """\
in0: f8e4m3[384, 256]
in1: f32[3, 2]
in2: f32[]
in3: s0
in4: bf16[s0, 256]
v5: f32[s0, 256] = prims.convert_element_type(in4, f32)
v6: f32[s0, 256] = aten.div(v5, in2)
v7: f32[s0, 256] = aten.clamp_min(v6, -448.0)
v8: f32[s0, 256] = aten.clamp_max(v7, 448.0)
v9: f8e4m3[s0, 256] = prims.convert_element_type(v8, f8e4m3)
v10: bf16[s0, 384] = fp8fx.block_gemm(v9, in2, in0, in1, None, [128, 128], bf16)
return (v10,)""")

    def test_llama_decoder_layer(self):
        layer, h, kwargs = _llama_layer()
        g = post_grad(layer, h, **kwargs)
        self.assertExpectedInline(g, """\
in0: f8e4m3[256, 256]
in1: f32[2, 2]
in2: f8e4m3[128, 256]
in3: f32[1, 2]
in4: f8e4m3[128, 256]
in5: f32[1, 2]
in6: f8e4m3[256, 256]
in7: f32[2, 2]
in8: f8e4m3[512, 256]
in9: f32[4, 2]
in10: f8e4m3[512, 256]
in11: f32[4, 2]
in12: f8e4m3[256, 512]
in13: f32[2, 4]
in14: s0
in15: bf16[1, s0, 256]
in16: f64[]
in17: bf16[256]
in18: bf16[1, s0, 64]
in19: bf16[1, s0, 64]
in20: f64[]
in21: bf16[256]
v22: f32[1, s0, 256] = prims.convert_element_type(in15, f32)
v23: f32[1, s0, 256] = aten.pow(v22, 2)
v24: f32[1, s0, 1] = aten.mean(v23, [-1], True)
v25: f32[] = prims.convert_element_type(in16, f32)
v26: f32[1, s0, 1] = aten.add(v24, v25)
v27: f32[1, s0, 1] = aten.rsqrt(v26)
v28: f32[1, s0, 256] = aten.mul(v22, v27)
v29: bf16[1, s0, 256] = prims.convert_element_type(v28, bf16)
v30: bf16[1, s0, 256] = aten.mul(in17, v29)
v31: f32[1, s0, 256] = prims.convert_element_type(v30, f32)
v32: f32[1, s0, 2, 128] = aten.view(v31, [1, s0, 2, 128])
v33: f32[1, s0, 2, 128] = aten.abs(v32)
v34: f32[1, s0, 2] = aten.amax(v33, [-1])
v35: f32[1, s0, 2] = aten.clamp_min(v34, 1e-12)
v36: f32[1, s0, 2] = aten.clamp_min(v35, 448.0)
v37: f32[1, s0, 2] = aten.clamp_max(v36, 448.0)
v38: f32[1, s0, 2] = aten.div(v35, v37)
v39: f32[1, s0, 2, 1] = aten.unsqueeze(v38, -1)
v40: f32[1, s0, 2, 128] = aten.div(v32, v39)
v41: f32[1, s0, 2, 128] = aten.clamp_min(v40, -448.0)
v42: f32[1, s0, 2, 128] = aten.clamp_max(v41, 448.0)
v43: f8e4m3[1, s0, 2, 128] = prims.convert_element_type(v42, f8e4m3)
v44: f8e4m3[1, s0, 256] = aten.view(v43, [1, s0, 256])
v45: bf16[1, s0, 512] = fp8fx.block_gemm_cat(v44, v38, [in0, in2, in4], [in1, in3, in5], [None, None, None], [128, 128], bf16)
v46: bf16[1, s0, 256] = aten.slice(v45, 2, 0, 256)
v47: bf16[1, s0, 128] = aten.slice(v45, 2, 256, 384)
v48: bf16[1, s0, 128] = aten.slice(v45, 2, 384, 512)
v49: bf16[1, s0, 4, 64] = aten.view(v46, [1, in14, -1, 64])
v50: bf16[1, 4, s0, 64] = aten.permute(v49, [0, 2, 1, 3])
v51: bf16[1, 1, s0, 64] = aten.unsqueeze(in18, 1)
v52: bf16[1, 4, s0, 64] = aten.mul(v50, v51)
v53: bf16[1, 4, s0, 32] = aten.slice(v50, 3, 32, 9223372036854775807)
v54: bf16[1, 4, s0, 32] = aten.neg(v53)
v55: bf16[1, 4, s0, 32] = aten.slice(v50, 3, 0, 32)
v56: bf16[1, 4, s0, 64] = aten.cat([v54, v55], -1)
v57: bf16[1, 1, s0, 64] = aten.unsqueeze(in19, 1)
v58: bf16[1, 4, s0, 64] = aten.mul(v56, v57)
v59: bf16[1, 4, s0, 64] = aten.add(v52, v58)
v60: bf16[1, s0, 2, 64] = aten.view(v47, [1, in14, -1, 64])
v61: bf16[1, 2, s0, 64] = aten.permute(v60, [0, 2, 1, 3])
v62: bf16[1, 2, s0, 64] = aten.mul(v61, v51)
v63: bf16[1, 2, s0, 32] = aten.slice(v61, 3, 32, 9223372036854775807)
v64: bf16[1, 2, s0, 32] = aten.neg(v63)
v65: bf16[1, 2, s0, 32] = aten.slice(v61, 3, 0, 32)
v66: bf16[1, 2, s0, 64] = aten.cat([v64, v65], -1)
v67: bf16[1, 2, s0, 64] = aten.mul(v66, v57)
v68: bf16[1, 2, s0, 64] = aten.add(v62, v67)
v69: bf16[1, s0, 2, 64] = aten.view(v48, [1, in14, -1, 64])
v70: bf16[1, 2, s0, 64] = aten.permute(v69, [0, 2, 1, 3])
v71: (bf16[1, 4, s0, 64], f32[1, 4, s0]) = aten._scaled_dot_product_flash_attention_for_cpu(v59, v68, v70, 0.0, True, scale=0.125)
v72: bf16[1, 4, s0, 64] = getitem(v71, 0)
v73: bf16[1, s0, 4, 64] = aten.permute(v72, [0, 2, 1, 3])
v74: bf16[1, s0, 256] = aten.view(v73, [1, in14, -1])
v75: f32[1, s0, 256] = prims.convert_element_type(v74, f32)
v76: f32[1, s0, 2, 128] = aten.view(v75, [1, s0, 2, 128])
v77: f32[1, s0, 2, 128] = aten.abs(v76)
v78: f32[1, s0, 2] = aten.amax(v77, [-1])
v79: f32[1, s0, 2] = aten.clamp_min(v78, 1e-12)
v80: f32[1, s0, 2] = aten.clamp_min(v79, 448.0)
v81: f32[1, s0, 2] = aten.clamp_max(v80, 448.0)
v82: f32[1, s0, 2] = aten.div(v79, v81)
v83: f32[1, s0, 2, 1] = aten.unsqueeze(v82, -1)
v84: f32[1, s0, 2, 128] = aten.div(v76, v83)
v85: f32[1, s0, 2, 128] = aten.clamp_min(v84, -448.0)
v86: f32[1, s0, 2, 128] = aten.clamp_max(v85, 448.0)
v87: f8e4m3[1, s0, 2, 128] = prims.convert_element_type(v86, f8e4m3)
v88: f8e4m3[1, s0, 256] = aten.view(v87, [1, s0, 256])
v89: bf16[1, s0, 256] = fp8fx.block_gemm(v88, v82, in6, in7, None, [128, 128], bf16)
v90: bf16[1, s0, 256] = aten.add(in15, v89)
v91: f32[1, s0, 256] = prims.convert_element_type(v90, f32)
v92: f32[1, s0, 256] = aten.pow(v91, 2)
v93: f32[1, s0, 1] = aten.mean(v92, [-1], True)
v94: f32[] = prims.convert_element_type(in20, f32)
v95: f32[1, s0, 1] = aten.add(v93, v94)
v96: f32[1, s0, 1] = aten.rsqrt(v95)
v97: f32[1, s0, 256] = aten.mul(v91, v96)
v98: bf16[1, s0, 256] = prims.convert_element_type(v97, bf16)
v99: bf16[1, s0, 256] = aten.mul(in21, v98)
v100: f32[1, s0, 256] = prims.convert_element_type(v99, f32)
v101: f32[1, s0, 2, 128] = aten.view(v100, [1, s0, 2, 128])
v102: f32[1, s0, 2, 128] = aten.abs(v101)
v103: f32[1, s0, 2] = aten.amax(v102, [-1])
v104: f32[1, s0, 2] = aten.clamp_min(v103, 1e-12)
v105: f32[1, s0, 2] = aten.clamp_min(v104, 448.0)
v106: f32[1, s0, 2] = aten.clamp_max(v105, 448.0)
v107: f32[1, s0, 2] = aten.div(v104, v106)
v108: f32[1, s0, 2, 1] = aten.unsqueeze(v107, -1)
v109: f32[1, s0, 2, 128] = aten.div(v101, v108)
v110: f32[1, s0, 2, 128] = aten.clamp_min(v109, -448.0)
v111: f32[1, s0, 2, 128] = aten.clamp_max(v110, 448.0)
v112: f8e4m3[1, s0, 2, 128] = prims.convert_element_type(v111, f8e4m3)
v113: f8e4m3[1, s0, 256] = aten.view(v112, [1, s0, 256])
v114: bf16[1, s0, 1024] = fp8fx.block_gemm_cat(v113, v107, [in8, in10], [in9, in11], [None, None], [128, 128], bf16)
v115: bf16[1, s0, 512] = aten.slice(v114, 2, 0, 512)
v116: bf16[1, s0, 512] = aten.slice(v114, 2, 512, 1024)
v117: f32[1, s0, 512] = prims.convert_element_type(v115, f32)
v118: f32[1, s0, 512] = aten.neg(v117)
v119: f32[1, s0, 512] = aten.exp(v118)
v120: f32[1, s0, 512] = aten.add(v119, 1)
v121: f32[1, s0, 512] = aten.div(v117, v120)
v122: bf16[1, s0, 512] = prims.convert_element_type(v121, bf16)
v123: bf16[1, s0, 512] = aten.mul(v122, v116)
v124: f32[1, s0, 512] = prims.convert_element_type(v123, f32)
v125: f32[1, s0, 4, 128] = aten.view(v124, [1, s0, 4, 128])
v126: f32[1, s0, 4, 128] = aten.abs(v125)
v127: f32[1, s0, 4] = aten.amax(v126, [-1])
v128: f32[1, s0, 4] = aten.clamp_min(v127, 1e-12)
v129: f32[1, s0, 4] = aten.clamp_min(v128, 448.0)
v130: f32[1, s0, 4] = aten.clamp_max(v129, 448.0)
v131: f32[1, s0, 4] = aten.div(v128, v130)
v132: f32[1, s0, 4, 1] = aten.unsqueeze(v131, -1)
v133: f32[1, s0, 4, 128] = aten.div(v125, v132)
v134: f32[1, s0, 4, 128] = aten.clamp_min(v133, -448.0)
v135: f32[1, s0, 4, 128] = aten.clamp_max(v134, 448.0)
v136: f8e4m3[1, s0, 4, 128] = prims.convert_element_type(v135, f8e4m3)
v137: f8e4m3[1, s0, 512] = aten.view(v136, [1, s0, 512])
v138: bf16[1, s0, 256] = fp8fx.block_gemm(v137, v131, in12, in13, None, [128, 128], bf16)
v139: bf16[1, s0, 256] = aten.add(v90, v138)
return (v139,)""")

    def test_excluded_module(self):
        config = BlockFP8Config(modules_to_not_convert=("down_proj",))
        g = post_grad(_build(SwiGLU, config=config), torch.randn(3, 256, dtype=BF16))
        self.assertExpectedInline(g, """\
in0: f8e4m3[512, 256]
in1: f32[4, 2]
in2: f8e4m3[512, 256]
in3: f32[4, 2]
in4: s0
in5: bf16[s0, 256]
in6: bf16[256, 512]
v7: f32[s0, 256] = prims.convert_element_type(in5, f32)
v8: f32[s0, 2, 128] = aten.view(v7, [s0, 2, 128])
v9: f32[s0, 2, 128] = aten.abs(v8)
v10: f32[s0, 2] = aten.amax(v9, [-1])
v11: f32[s0, 2] = aten.clamp_min(v10, 1e-12)
v12: f32[s0, 2] = aten.clamp_min(v11, 448.0)
v13: f32[s0, 2] = aten.clamp_max(v12, 448.0)
v14: f32[s0, 2] = aten.div(v11, v13)
v15: f32[s0, 2, 1] = aten.unsqueeze(v14, -1)
v16: f32[s0, 2, 128] = aten.div(v8, v15)
v17: f32[s0, 2, 128] = aten.clamp_min(v16, -448.0)
v18: f32[s0, 2, 128] = aten.clamp_max(v17, 448.0)
v19: f8e4m3[s0, 2, 128] = prims.convert_element_type(v18, f8e4m3)
v20: f8e4m3[s0, 256] = aten.view(v19, [s0, 256])
v21: bf16[s0, 1024] = fp8fx.block_gemm_cat(v20, v14, [in0, in2], [in1, in3], [None, None], [128, 128], bf16)
v22: bf16[s0, 512] = aten.slice(v21, 1, 0, 512)
v23: bf16[s0, 512] = aten.slice(v21, 1, 512, 1024)
v24: f32[s0, 512] = prims.convert_element_type(v22, f32)
v25: f32[s0, 512] = aten.neg(v24)
v26: f32[s0, 512] = aten.exp(v25)
v27: f32[s0, 512] = aten.add(v26, 1)
v28: f32[s0, 512] = aten.div(v24, v27)
v29: bf16[s0, 512] = prims.convert_element_type(v28, bf16)
v30: bf16[s0, 512] = aten.mul(v29, v23)
v31: bf16[512, 256] = aten.permute(in6, [1, 0])
v32: bf16[s0, 256] = aten.mm(v30, v31)
return (v32,)""")

    def test_ineligible_shape(self):
        # N = 40 is not a multiple of 16: quantize_ keeps it in bf16 and the pass never sees it.
        model = _build(nn.Sequential, nn.Linear(256, 256), nn.Linear(256, 40))
        g = post_grad(model, torch.randn(3, 256, dtype=BF16))
        self.assertExpectedInline(g, """\
in0: f8e4m3[256, 256]
in1: f32[2, 2]
in2: bf16[256]
in3: s0
in4: bf16[s0, 256]
in5: bf16[40, 256]
in6: bf16[40]
v7: f32[s0, 256] = prims.convert_element_type(in4, f32)
v8: f32[s0, 2, 128] = aten.view(v7, [s0, 2, 128])
v9: f32[s0, 2, 128] = aten.abs(v8)
v10: f32[s0, 2] = aten.amax(v9, [-1])
v11: f32[s0, 2] = aten.clamp_min(v10, 1e-12)
v12: f32[s0, 2] = aten.clamp_min(v11, 448.0)
v13: f32[s0, 2] = aten.clamp_max(v12, 448.0)
v14: f32[s0, 2] = aten.div(v11, v13)
v15: f32[s0, 2, 1] = aten.unsqueeze(v14, -1)
v16: f32[s0, 2, 128] = aten.div(v8, v15)
v17: f32[s0, 2, 128] = aten.clamp_min(v16, -448.0)
v18: f32[s0, 2, 128] = aten.clamp_max(v17, 448.0)
v19: f8e4m3[s0, 2, 128] = prims.convert_element_type(v18, f8e4m3)
v20: f8e4m3[s0, 256] = aten.view(v19, [s0, 256])
v21: bf16[s0, 256] = fp8fx.block_gemm(v20, v14, in0, in1, in2, [128, 128], bf16)
v22: bf16[256, 40] = aten.permute(in5, [1, 0])
v23: bf16[s0, 40] = aten.addmm(in6, v21, v22)
return (v23,)""")

    def test_unquantized_model(self):
        # The bf16 model compiled directly: weights quantized at compile time as constants
        # (the first inputs), the bf16 weight inputs unread.
        g = post_grad(_build(NormQKV, quantize=False), torch.randn(5, 256, dtype=BF16))
        self.assertExpectedInline(g, """\
in0: f8e4m3[256, 256]
in1: f32[2, 2]
in2: f8e4m3[128, 256]
in3: f32[1, 2]
in4: f8e4m3[128, 256]
in5: f32[1, 2]
in6: bf16[256]
in7: s0
in8: bf16[s0, 256]
in9: bf16[256, 256]
in10: bf16[128, 256]
in11: bf16[128, 256]
v12: f32[s0, 256] = prims.convert_element_type(in8, f32)
v13: f32[s0, 256] = aten.pow(v12, 2)
v14: f32[s0, 1] = aten.mean(v13, [1], True)
v15: f32[s0, 1] = aten.add(v14, 9.999999974752427e-07)
v16: f32[s0, 1] = aten.rsqrt(v15)
v17: f32[s0, 256] = aten.mul(v12, v16)
v18: f32[s0, 256] = aten.mul(v17, in6)
v19: bf16[s0, 256] = prims.convert_element_type(v18, bf16)
v20: f32[s0, 256] = prims.convert_element_type(v19, f32)
v21: f32[s0, 2, 128] = aten.view(v20, [s0, 2, 128])
v22: f32[s0, 2, 128] = aten.abs(v21)
v23: f32[s0, 2] = aten.amax(v22, [-1])
v24: f32[s0, 2] = aten.clamp_min(v23, 1e-12)
v25: f32[s0, 2] = aten.clamp_min(v24, 448.0)
v26: f32[s0, 2] = aten.clamp_max(v25, 448.0)
v27: f32[s0, 2] = aten.div(v24, v26)
v28: f32[s0, 2, 1] = aten.unsqueeze(v27, -1)
v29: f32[s0, 2, 128] = aten.div(v21, v28)
v30: f32[s0, 2, 128] = aten.clamp_min(v29, -448.0)
v31: f32[s0, 2, 128] = aten.clamp_max(v30, 448.0)
v32: f8e4m3[s0, 2, 128] = prims.convert_element_type(v31, f8e4m3)
v33: f8e4m3[s0, 256] = aten.view(v32, [s0, 256])
v34: bf16[s0, 256] = fp8fx.block_gemm(v33, v27, in0, in1, None, [128, 128], bf16)
v35: bf16[s0, 128] = fp8fx.block_gemm(v33, v27, in2, in3, None, [128, 128], bf16)
v36: bf16[s0, 128] = fp8fx.block_gemm(v33, v27, in4, in5, None, [128, 128], bf16)
return (v34, v35, v36)""")


def _ops(graph_text: str) -> list[str]:
    """Ops and result types of a formatted graph, without names (inputs may be ordered differently)."""
    return [re.sub(r"\b(in|v)\d+\b", "_", line.split(": ", 1)[1]) for line in graph_text.splitlines() if line.startswith("v")]


def test_unquantized_path_gives_the_quantized_graph():
    x = torch.randn(5, 256, dtype=BF16)
    quantized = post_grad(_build(NormQKV), x)
    frozen = post_grad(_build(NormQKV, quantize=False), x)
    assert _ops(frozen) == _ops(quantized)
    # The bf16 weights are graph inputs Dynamo still passes, but nothing reads them.
    torch._dynamo.reset()
    graphs: list = []
    model = _build(NormQKV, quantize=False)
    with torch.no_grad():
        torch.compile(model, backend=post_grad_backend(None, graphs), fullgraph=True)(x)
    bf16_weights = [n for n in graphs[0].graph.find_nodes(op="placeholder") if n.meta["val"].shape in ((256, 256), (128, 256)) and n.meta["val"].dtype == BF16]
    assert len(bf16_weights) == 3 and all(not n.users for n in bf16_weights)


# -- generated code: the quantization is fused into its producer -------------------------------


def test_quant_fused_into_rmsnorm_and_silu_mul():
    model = _build(SwiGLU, norm=True)
    x = heavy_tailed(7, 256, dtype=BF16, seed=2, outliers=False)
    with fresh_compile():
        out, code = compile_and_code(model, x)
        assert counters["fp8fx"] == {"linear": 3, "act_quant_shared": 1, "act_quant_decomposed": 2, "block_gemm_cat": 1,
                                     "block_gemm_cat_members": 2, "block_gemm_cat_lowered": 1, "block_gemm_lowered": 1}
    # RMSNorm + quant in one kernel, the gate/up GEMM (packed by quantize_: one call), SiLU*mul +
    # quant in one kernel, down GEMM: no standalone quantization kernel between a producer and its GEMM.
    seq = call_sequence(code)
    assert [s if s == "gemm" else "kernel" for s in seq] == ["kernel", "gemm", "kernel", "gemm"], seq
    norm_kernel, silu_kernel = kernel_source(code, seq[0][7:]), kernel_source(code, seq[2][7:])
    FileCheck().check("rsqrt").check("abs").check("448.0").check("at::Float8_e4m3fn").run(norm_kernel)
    FileCheck().check("exp").check("abs").check("448.0").check("at::Float8_e4m3fn").run(silu_kernel)
    # Division by the scale, as the reference does, never a reciprocal multiply.
    FileCheck().check_not("reciprocal").run(norm_kernel + silu_kernel)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=0.02, atol=0.02)


@pytest.mark.parametrize("shape", [(7, 256), (2, 5, 256)])
def test_gemm_reads_scales_written_column_major(shape):
    # passes/lowering.py asks for [M, nK] scales with strides (1, M): the fused quant kernel
    # writes them in the layout cuBLAS takes, so no transpose copy runs per GEMM (gate/up, packed
    # by quantize_, are one fp8fx_block_gemm_cat call; two quantized inputs: two buffers).
    x = torch.randn(*shape, dtype=BF16)
    with fresh_compile():
        _, code = compile_and_code(_build(SwiGLU, norm=True), x)
    body = code[code.index("def call(") :]
    view = r"reinterpret_tensor\((\w+), \(([^)]*)\), \(([^)]*)\), \d+\)"
    calls = re.findall(rf"extern_kernels\.fp8fx_block_gemm(?:_cat)?\((?:{view}|\w+), (?:{view}|(\w+)),", body)
    assert len(calls) == 2 and "fp8fx_block_gemm_cat(" in body, body
    scale_bufs = set()
    for *_, vbuf, vsize, vstride, buf in calls:
        if vbuf:  # a strided view of the buffer: [M, nK] with strides (1, M)
            (rows, _), (stride0, stride1) = vsize.split(", "), vstride.split(", ")
            assert stride0 == "1" and stride1 == rows, (vsize, vstride)
            scale_bufs.add(vbuf)
        else:
            alloc = re.search(rf"{buf} = empty_strided_cpu\(\((\w+), (\d+)\), \((\d+), (\w+)\)", body)
            assert alloc is not None, (buf, body)
            rows, groups, stride0, stride1 = alloc.groups()
            assert stride0 == "1" and stride1 == rows, alloc.group(0)
            scale_bufs.add(buf)
    assert len(scale_bufs) == 2, body


def test_kernel_count_vs_bf16_compiled():
    # fp8fx adds no kernels: the bf16 MLP needs the same two pointwise kernels (norm, silu*mul).
    x = torch.randn(7, 256, dtype=BF16)
    with fresh_compile():
        _, fp8_code = compile_and_code(_build(SwiGLU, norm=True), x)
        _, bf16_code = compile_and_code(_build(SwiGLU, norm=True, quantize=False), x, b="inductor")
    fp8_kernels = [s for s in call_sequence(fp8_code) if s != "gemm"]
    bf16_kernels = re.findall(r"^\s+(cpp_fused\w*)\(", bf16_code[bf16_code.index("def call(") :], re.M)
    assert len(fp8_kernels) <= len(bf16_kernels), (fp8_kernels, bf16_kernels)


# -- numerics ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_fmt", ["float32", "ue8m0"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decomposed_quant_codes_match_reference(scale_fmt, dtype):
    # Compiled by Inductor (C++): zero rows, heavy tails, outliers.
    x = heavy_tailed(33, 384, dtype=dtype, seed=4)
    x[3] = 0
    with fresh_compile():
        fn = torch.compile(lambda t: quantize_act_decomposed(t, 128, scale_fmt == "ue8m0"), fullgraph=True, dynamic=True)
        q, s = fn(x)
    q_ref, s_ref = R.quantize_act(x, 128, scale_fmt)
    assert codes_equal(q, q_ref) and torch.equal(s, s_ref)


@pytest.mark.parametrize("compiled", [False, True])
def test_linear_matches_eager_and_reference(compiled):
    model = _build(Proj, 320, 256, bias=True)
    x = heavy_tailed(2, 5, 320, dtype=BF16, seed=5)
    w = model.proj.weight
    expect = R.linear(x, w.qdata, w.scale, model.proj.bias, None, (128, 128))
    with fresh_compile(), torch.no_grad():
        fn = torch.compile(model, backend=backend, fullgraph=True, dynamic=True) if compiled else model
        y = fn(x)
    # Same fp8 codes, same GEMM implementation on CPU: bit-identical.
    assert torch.equal(y, expect)


def test_llama_layer_numerics_and_no_recompiles():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    layer, h, kwargs = _llama_layer()
    rope = LlamaRotaryEmbedding(layer.self_attn.config)

    def run(compiled, t):
        ht = heavy_tailed(1, t, 256, dtype=BF16, seed=t, outliers=False)
        cos, sin = rope(ht, torch.arange(t)[None])
        return compiled(ht, position_embeddings=(cos, sin), attention_mask=None)

    with fresh_compile(), torch.no_grad():
        compiled = torch.compile(layer, backend=backend, fullgraph=True, dynamic=True)
        y = compiled(h, **kwargs)
        assert counters["fp8fx"]["linear"] == 7
        assert rel_err(y, layer(h, **kwargs)) < 0.01
        for t in (4, 13, 2):  # prefill lengths: the one dynamic graph
            assert run(compiled, t).shape == (1, t, 256)
        assert counters["stats"]["unique_graphs"] == 1
        # A single token is a size Dynamo specializes (0/1): one decode graph, then no more.
        run(compiled, 1)
        run(compiled, 1)
        assert counters["stats"]["unique_graphs"] == 2


@pytest.mark.parametrize("quant_in_gemv", [True, False])
def test_decode_gemms_of_one_input_run_as_one_launch(quant_in_gemv):
    # A Llama layer at one token (static): q/k/v and gate/up are one launch each; with the
    # quantization in the gemv, o_proj and down_proj are linear_cat calls of one weight and
    # no kernel quantizes (no fp8 conversion in the generated code); else they stay
    # block_gemm. The output is eager fp8fx's.
    layer, h, kwargs = _llama_layer()
    cos, sin = kwargs["position_embeddings"]
    h1, kw1 = h[:, :1], {"position_embeddings": (cos[:, :1], sin[:, :1]), "attention_mask": None}
    with fresh_compile(), torch.no_grad():
        b = backend_with(quant_in_gemv=quant_in_gemv)
        compiled = torch.compile(layer, backend=b, fullgraph=True, dynamic=False)
        y, codes = run_and_get_code(compiled, h1, **kw1)
        body = codes[0][codes[0].index("def call(") :]
        if quant_in_gemv:
            assert counters["fp8fx"]["linear_cat"] == 4 and counters["fp8fx"]["linear_cat_members"] == 7
            assert counters["fp8fx"]["linear_cat_lowered"] == 4 and counters["fp8fx"]["block_gemm_lowered"] == 0
            assert body.count("extern_kernels.fp8fx_linear_cat(") == 4 and "fp8fx_block_gemm" not in body
            assert "Float8_e4m3fn" not in codes[0] and "act_quant" not in codes[0]
        else:
            assert counters["fp8fx"]["block_gemm_cat"] == 2 and counters["fp8fx"]["block_gemm_cat_members"] == 5
            assert counters["fp8fx"]["block_gemm_cat_lowered"] == 2 and counters["fp8fx"]["block_gemm_lowered"] == 2
            assert body.count("extern_kernels.fp8fx_block_gemm_cat(") == 2
            assert body.count("extern_kernels.fp8fx_block_gemm(") == 2
        y, expect = (t[0] if isinstance(t, tuple) else t for t in (y, layer(h1, **kw1)))
        assert rel_err(y, expect) < 1e-3


def test_max_autotune_keeps_block_gemm_at_decode():
    # Under max-autotune the decode GEMMs stay block_gemm (their lowering benchmarks the
    # choices) and q/k/v share one block_gemm_cat, as with quant_in_gemv=False.
    g = post_grad(_build(NormQKV), torch.randn(1, 1, 256, dtype=BF16), dynamic=False)
    assert "fp8fx.linear_cat(" in g
    with torch._inductor.config.patch(max_autotune=True):
        g = post_grad(_build(NormQKV), torch.randn(1, 1, 256, dtype=BF16), dynamic=False)
    assert "fp8fx.linear_cat(" not in g and g.count("fp8fx.block_gemm_cat(") == 1, g


def test_gemms_grouped_when_each_takes_the_gemv(monkeypatch):
    # Llama-3-8B q/k/v at M = 16: the concatenated shape measured faster on the Triton block
    # GEMM, but each GEMM alone takes the gemv, so one gemv_cat launch replaces three gemvs.
    # gate/up at M = 16 (each and together off the gemv) stay single.
    from fp8fx.kernels import dispatch

    cuda = torch.device("cuda")
    assert dispatch.choose(16, 6144, 4096, BF16, cuda) != "gemv"
    assert dispatch.cat_takes_gemv(16, (4096, 1024, 1024), 4096, BF16, cuda)
    assert not dispatch.cat_takes_gemv(16, (14336, 14336), 4096, BF16, cuda)
    assert not dispatch.cat_takes_gemv(64, (4096, 1024, 1024), 4096, BF16, cuda)
    # The linear route (quantizing in the kernel) measured the gemv at both at M = 16.
    assert dispatch.cat_takes_gemv(16, (14336, 14336), 4096, BF16, cuda, fused_quant=True)
    # The pass asks the same question: routes faked so that only single GEMMs take the gemv.
    real = dispatch.choose
    monkeypatch.setattr(dispatch, "choose", lambda m, n, k, *a, **kw: "gemv" if n <= 256 else real(64, n, k, *a, **kw))
    for quant_in_gemv, op in ((True, "fp8fx.linear_cat("), (False, "fp8fx.block_gemm_cat(")):
        g = post_grad(_build(NormQKV), torch.randn(1, 1, 256, dtype=BF16), quant_in_gemv=quant_in_gemv)
        cats = [line for line in g.splitlines() if op in line]
        assert len(cats) == 1 and "fp8fx.block_gemm(" not in g, g
    monkeypatch.setattr(dispatch, "choose", lambda m, n, k, *a, **kw: real(64, n, k, *a, **kw))
    g = post_grad(_build(NormQKV), torch.randn(1, 1, 256, dtype=BF16))
    assert "_cat(" not in g and g.count("fp8fx.block_gemm(") == 3, g


@pytest.mark.parametrize("case", ["dynamic", "m64", "mixed_bias", "static_act"])
def test_gemms_not_grouped(case):
    # Grouping needs a static M that takes the gemv route, one act_quant (dynamic scales) and
    # the same bias presence: prefill graphs (dynamic M), M = 64 (the block GEMM's class) and
    # static activation scales keep one block_gemm per linear; mixed biases group by presence
    # (quantizing in the gemv, q alone is a linear_cat of one weight).
    model, x, dynamic = _build(NormQKV), torch.randn(1, 1, 256, dtype=BF16), False
    if case == "dynamic":
        x, dynamic = torch.randn(1, 3, 256, dtype=BF16), True
    elif case == "m64":
        x = torch.randn(1, 64, 256, dtype=BF16)
    elif case == "mixed_bias":
        model = _build(NormQKV, quantize=False)
        model.q.bias = nn.Parameter(torch.randn(256, dtype=BF16), requires_grad=False)
        fp8fx.quantize_(model)
    else:
        model = _build(NormQKV, quantize=False)
        for lin in (model.q, model.k, model.v):
            lin.weight = nn.Parameter(BlockFP8Tensor.from_hp(lin.weight, act_scale=torch.tensor(0.02)), requires_grad=False)
    for quant_in_gemv in (True, False):
        g = post_grad(model, x, dynamic=dynamic, quant_in_gemv=quant_in_gemv)
        cats = [line for line in g.splitlines() if "_cat(" in line]
        singles = [line for line in g.splitlines() if "fp8fx.block_gemm(" in line]
        if case == "mixed_bias" and quant_in_gemv:  # k and v grouped (no bias), q (with bias) alone
            assert len(cats) == 2 and not singles, g
            assert "[None, None]" in cats[1] and "bf16[1, 1, 256]" in cats[1], g
            assert "bf16[1, 1, 256] = fp8fx.linear_cat" in cats[0] and "[None]" not in cats[0], g
        elif case == "mixed_bias":
            assert len(cats) == 1 and "[None, None]" in cats[0] and "bf16[1, 1, 256]" in cats[0], g
            assert len(singles) == 1 and "bf16[1, 1, 256] = " in singles[0] and ", None, [128, 128]" not in singles[0], g
        else:
            assert not cats and len(singles) == 3, g


def test_block_gemm_cat_op():
    # The op is torch.cat of block_gemm per weight (CPU: the reference), checked up front.
    xq, xs = R.quantize_act(heavy_tailed(3, 256, seed=7))
    ws = [R.quantize_weight(torch.randn(n, 256), (128, 128)) for n in (256, 128, 16)]
    biases = [torch.randn(256), None, torch.randn(16)]
    y = torch.ops.fp8fx.block_gemm_cat(xq, xs, [w for w, _ in ws], [s for _, s in ws], biases, [128, 128], torch.float32)
    expect = torch.cat([R.block_gemm(xq, xs, w, s, b, (128, 128), torch.float32) for (w, s), b in zip(ws, biases)], -1)
    assert torch.equal(y, expect) and y.shape == (3, 400)
    # Compiled, the op lowers to one extern call that takes the biases that exist.
    with fresh_compile():
        fn = torch.compile(lambda *a: torch.ops.fp8fx.block_gemm_cat(*a, [128, 128], torch.float32), backend=backend,
                           fullgraph=True)
        y_c, codes = run_and_get_code(fn, xq, xs, [w for w, _ in ws], [s for _, s in ws], biases)
        assert counters["fp8fx"]["block_gemm_cat_lowered"] == 1 and "fp8fx_block_gemm_cat(" in codes[0]
    assert torch.equal(y_c, expect)
    (w0, s0), (w1, s1) = ws[:2]
    with pytest.raises(ValueError, match="one or more weights"):
        torch.ops.fp8fx.block_gemm_cat(xq, xs, [], [], [], [128, 128], BF16)
    with pytest.raises(ValueError, match="one or more weights"):
        torch.ops.fp8fx.block_gemm_cat(xq, xs, [w0, w1], [s0], [None, None], [128, 128], BF16)
    with pytest.raises(TypeError, match="quantized"):
        torch.ops.fp8fx.block_gemm_cat(xq.float(), xs, [w0], [s0], [None], [128, 128], BF16)
    with pytest.raises(ValueError, match="K = 128"):
        torch.ops.fp8fx.block_gemm_cat(xq[:, :128], xs[:, :1], [w0], [s0], [None], [128, 128], BF16)
    with pytest.raises(ValueError, match="bias must have shape"):
        torch.ops.fp8fx.block_gemm_cat(xq, xs, [w0], [s0], [torch.zeros(3)], [128, 128], BF16)
    with pytest.raises(TypeError, match="share one scale dtype"):
        e8 = R.quantize_weight(torch.randn(128, 256), (128, 128), "ue8m0")
        torch.ops.fp8fx.block_gemm_cat(xq, xs, [w0, e8[0]], [s0, e8[1]], [None, None], [128, 128], BF16)


@pytest.mark.parametrize("scale_fmt", ["float32", "ue8m0"])
def test_linear_cat_op(scale_fmt):
    # The op is fp8fx.linear per weight, concatenated (CPU: the reference): x quantized once
    # with the weights' scale format, heavy tails, outliers and a zero row.
    x = heavy_tailed(3, 256, seed=8)
    x[1] = 0
    ws = [R.quantize_weight(torch.randn(n, 256), (128, 128), scale_fmt) for n in (256, 128, 16)]
    biases = [torch.randn(256), None, torch.randn(16)]
    args = (x, [w for w, _ in ws], [s for _, s in ws], biases)
    y = torch.ops.fp8fx.linear_cat(*args, [128, 128])
    expect = torch.cat([R.linear(x, w, s, b) for (w, s), b in zip(ws, biases)], -1)
    assert torch.equal(y, expect) and y.shape == (3, 400) and y.dtype == x.dtype
    # Compiled, the op lowers to one extern call that takes the biases that exist.
    with fresh_compile():
        fn = torch.compile(lambda *a: torch.ops.fp8fx.linear_cat(*a, [128, 128]), backend=backend, fullgraph=True)
        y_c, codes = run_and_get_code(fn, *args)
        assert counters["fp8fx"]["linear_cat_lowered"] == 1 and "fp8fx_linear_cat(" in codes[0]
    assert torch.equal(y_c, expect)
    (w0, s0), (w1, s1) = ws[:2]
    with pytest.raises(ValueError, match="one or more weights"):
        torch.ops.fp8fx.linear_cat(x, [], [], [], [128, 128])
    with pytest.raises(ValueError, match="one or more weights"):
        torch.ops.fp8fx.linear_cat(x, [w0, w1], [s0], [None, None], [128, 128])
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        torch.ops.fp8fx.linear_cat(x.to(R.FP8_DTYPE), [w0], [s0], [None], [128, 128])
    with pytest.raises(ValueError, match="the weight expects 256"):
        torch.ops.fp8fx.linear_cat(x[:, :128], [w0], [s0], [None], [128, 128])
    with pytest.raises(ValueError, match="bias must have shape"):
        torch.ops.fp8fx.linear_cat(x, [w0], [s0], [torch.zeros(3)], [128, 128])


def test_unquantized_model_compiles_to_fp8():
    x = heavy_tailed(6, 256, dtype=BF16, seed=6)
    model = _build(NormQKV, quantize=False)
    eager_fp8 = copy.deepcopy(model)
    fp8fx.quantize_(eager_fp8)
    with fresh_compile(), torch.no_grad():
        y = torch.compile(model, backend=backend, fullgraph=True, dynamic=True)(x)
        assert counters["fp8fx"]["linear"] == 3
    report = last_report()
    assert [r.name for r in report.converted] == ["q.weight", "k.weight", "v.weight"]
    assert report.bytes_after < 0.52 * report.bytes_before
    ref = eager_fp8(x)
    for a, b in zip(y, ref):
        assert rel_err(a, b) < 0.01
    assert all(not isinstance(p, BlockFP8Tensor) for p in model.parameters())  # the model is untouched


def test_unquantized_model_rules_match_quantize_():
    config = BlockFP8Config(modules_to_not_convert=("up_proj",))
    model = nn.Sequential(SwiGLU(), nn.Linear(256, 40)).to(BF16).requires_grad_(False)
    with fresh_compile(), torch.no_grad():
        torch.compile(model, backend=backend_with(config), fullgraph=True)(torch.randn(3, 256, dtype=BF16))
    report = last_report()
    expected = fp8fx.quantize_(copy.deepcopy(model), config)
    assert [r.name for r in report.converted] == [r.name for r in expected.converted]
    assert [(r.name, r.reason) for r in report.skipped] == [(r.name, r.reason) for r in expected.skipped]


def test_unquantized_model_with_grad_raises():
    model = Proj().to(BF16)  # parameters require grad, grad mode on
    with fresh_compile(), pytest.raises(Exception, match="requires grad"):
        torch.compile(model, backend=backend, fullgraph=True)(torch.randn(3, 256, dtype=BF16))


def test_nothing_eligible_runs_unchanged():
    model = _build(Proj, 256, 40)  # N = 40: skipped by quantize_
    x = torch.randn(3, 256, dtype=BF16)
    with fresh_compile(), torch.no_grad():
        y = torch.compile(model, backend=backend, fullgraph=True)(x)
        assert not counters["fp8fx"]
    torch.testing.assert_close(y, model(x))
    text = str(explain(model, x))
    assert "0 GEMM weights rewritten" in text and "multiples of 16" in text


# -- backend plumbing -------------------------------------------------------------------------


def test_explain_reports_rewritten_and_skipped():
    config = BlockFP8Config(modules_to_not_convert=("down_proj",))
    e = explain(_build(SwiGLU, quantize=False), torch.randn(3, 256, dtype=BF16), config=config)
    expecttest.assert_expected_inline(str(e), """\
fp8fx.explain: 1 graph, 2 GEMM weights rewritten to block-FP8, 1 skipped
  rewritten gate_proj.weight [512, 256] (quantized at compile time)
  rewritten up_proj.weight [512, 256] (quantized at compile time)
  skipped   down_proj.weight [256, 512]: excluded by modules_to_not_convert pattern 'down_proj'
  post-grad rewrites: act_quant_decomposed x1, act_quant_shared x1, linear x2""")


def test_inductor_config_scoped():
    from torch._inductor import config as inductor_config

    before = (inductor_config.post_grad_custom_post_pass, inductor_config.emulate_precision_casts, inductor_config.max_autotune)
    with fresh_compile(), torch.no_grad():
        torch.compile(_build(Proj), backend=backend_with(options={"max_autotune": False}), fullgraph=True)(torch.randn(3, 256, dtype=BF16))
    assert (inductor_config.post_grad_custom_post_pass, inductor_config.emulate_precision_casts, inductor_config.max_autotune) == before


def test_backend_options():
    assert isinstance(backend, Backend) and backend.config == BlockFP8Config()
    b = backend_with(mode="max-autotune", cudagraphs=False, options={"coordinate_descent_tuning": False})
    patches = b.inductor_config()
    assert patches["max_autotune"] and patches["triton.cudagraphs"] is False and patches["coordinate_descent_tuning"] is False
    assert isinstance(patches["post_grad_custom_post_pass"], PostGradPass)
    assert patches["emulate_precision_casts"]
    with pytest.raises(ValueError, match="mode must be one of"):
        backend_with(mode="fastest")


def test_pass_uuid():
    assert PostGradPass().uuid() == PostGradPass().uuid()
    assert PostGradPass().uuid() != PostGradPass(BlockFP8Config(scale_fmt="ue8m0")).uuid()
    assert PostGradPass().uuid() != PostGradPass(quant_in_gemv=False).uuid()
    assert isinstance(PostGradPass().uuid(), bytes)
    from fp8fx.kernels import dispatch

    # The kernel preference changes the decode grouping and the lowering: part of the key.
    with dispatch.preference("auto"):
        auto = PostGradPass().uuid()
    with dispatch.preference("cublas"):
        assert PostGradPass().uuid() != auto


def test_graph_with_baked_weights_refuses_other_weights():
    """The backend puts a quantized model's codes and scales (and a bf16 model's quantized
    weights) into the graph as constants. Dynamo reuses a compiled graph for another instance
    of the same class (its guards check shapes, not identity): the call must fail with a
    clear error instead of computing with the first model's weights. freeze=False reads the
    weights on every call and serves both."""
    x = torch.randn(5, 256, dtype=BF16)
    for quantize in (True, False):
        a, b = _build(SwiGLU, quantize=quantize, seed=0), _build(SwiGLU, quantize=quantize, seed=1)
        with fresh_compile(), torch.no_grad():
            torch.testing.assert_close(torch.compile(a, backend=backend)(x), a(x) if quantize else _frozen_ref(a, x))
            with pytest.raises(RuntimeError, match="compiled for.*other weight tensors"):
                torch.compile(b, backend=backend)(x)
    a, b = _build(SwiGLU, seed=0), _build(SwiGLU, seed=1)
    with fresh_compile(), torch.no_grad():
        loose = fp8fx.backend_with(freeze=False)
        ya, yb = torch.compile(a, backend=loose)(x), torch.compile(b, backend=loose)(x)
        assert torch.equal(ya, a(x)) and torch.equal(yb, b(x)) and not torch.equal(ya, yb)
    with fresh_compile(), torch.no_grad():  # a weight replaced after the compile
        compiled = torch.compile(a, backend=backend)
        compiled(x)
        a.down_proj.weight = b.down_proj.weight
        with pytest.raises(RuntimeError, match="replaced, moved"):
            compiled(x)


def test_guard_filter_drops_the_inner_guards_of_held_weights():
    """backend.guard_filter drops the guards Dynamo puts on the inside of the quantized weights
    the graph holds (codes, scales, the inner-tensor list, the metadata), keeps each weight's
    own type and tensor guards, and keeps every guard for freeze=False. Without the inner
    guards, the compiled call's own check still refuses a weight given new scales."""
    x = torch.randn(5, 256, dtype=BF16)
    m = _build(SwiGLU, seed=0)
    seen = {}
    for be in (backend, fp8fx.backend_with(freeze=False)):
        def filt(entries, be=be):
            keep = be.guard_filter(entries)
            seen[be.freeze] = [(e.name, e.guard_type, k) for e, k in zip(entries, keep)]
            return keep

        with fresh_compile(), torch.no_grad():
            compiled = torch.compile(m, backend=be, options={"guard_filter_fn": filt})
            torch.testing.assert_close(compiled(x), m(x), rtol=0, atol=0)
            compiled(x)
            assert counters["stats"]["unique_graphs"] == 1
    assert all(k for *_, k in seen[False])
    dropped = [(n, t) for n, t, k in seen[True] if not k]
    for proj in ("gate_proj", "up_proj", "down_proj"):
        w = next(n for n, t, _ in seen[True] if n.endswith(f"['{proj}']._parameters['weight']") and t == "TENSOR_MATCH")
        assert sorted(d for d in dropped if d[0].startswith(w)) == sorted([
            (w, "TENSOR_SUBCLASS_METADATA_MATCH"), (w + ".__tensor_flatten__()[0]", "EQUALS_MATCH"),
            (w + ".qdata", "TENSOR_MATCH"), (w + ".scale", "TENSOR_MATCH")])
        assert {(w, "TYPE_MATCH", True), (w, "TENSOR_MATCH", True)} <= set(seen[True])
    assert len(dropped) == 12
    with fresh_compile(), torch.no_grad():
        compiled = torch.compile(m, backend=backend, options={"guard_filter_fn": backend.guard_filter})
        compiled(x)
        m.down_proj.weight.scale = m.down_proj.weight.scale.clone()
        with pytest.raises(RuntimeError, match="replaced, moved"):
            compiled(x)


def _frozen_ref(model, x):
    q = copy.deepcopy(model)
    fp8fx.quantize_(q)
    return q(x)


def test_baked_weight_check_keeps_no_bf16_weight_alive():
    import gc
    import weakref

    from fp8fx.backend import _check_weights

    w = torch.randn(256, 256, dtype=BF16)
    check = _check_weights(lambda *args: "ran", [(1, w)])
    assert check(None, w) == "ran"
    with pytest.raises(RuntimeError, match="argument 1"):
        check(None, w.clone())
    ref = weakref.ref(w)
    del w
    gc.collect()
    assert ref() is None  # the compiled call does not hold the high-precision weight
