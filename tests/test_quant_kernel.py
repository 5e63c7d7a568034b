"""The SwiGLU quantization kernel (kernels.act_quant.silu_mul_quant) and the rewrite that puts
fp8fx's quant and RMSNorm kernels into the graph as user-defined Triton kernels
(passes/quant_kernel.py).

Inductor's CPU backend cannot run Triton, so the rewrite is CUDA-only; here the tests add "cpu"
to ``quant_kernel.DEVICES`` and run the rewritten post-grad graph eagerly under
TRITON_INTERPRET=1 (the kernel runs in the interpreter), against eager fp8fx and the
reference. test_backend_gpu.py compiles it with Inductor on the GPU."""

import re

import expecttest
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

from conftest import INTERPRET_INNER, compile_post_grad, heavy_tailed, interpreted, rel_err, run_interpreted
from fp8fx import reference as R

BF16 = torch.bfloat16


@pytest.mark.skipif(INTERPRET_INNER, reason="this is the launcher")
def test_interpreted_suite():
    run_interpreted(__file__)


def _swiglu_inputs(lead, k, dtype, seed):
    """(gate, up): the halves of one heavy-tailed [*lead, 2K] tensor (rows 2K apart), with
    outliers, a zero row and a zero gate group."""
    gu = heavy_tailed(*lead, 2 * k, seed=seed, outliers=0 not in lead).to(dtype) * 4
    rows = gu.view(-1, 2 * k)
    if rows.shape[0] > 1:
        rows[1] = 0
        rows[0, :128] = 0
    return gu[..., :k], gu[..., k:]


@interpreted
@pytest.mark.parametrize(
    "lead,k,dtype,ue8m0,col_major",
    [((33,), 384, BF16, False, True), ((2, 7), 256, BF16, True, False), ((1,), 128, BF16, False, True),
     ((17,), 512, torch.float16, False, False), ((5,), 256, torch.float32, True, True), ((0,), 256, BF16, False, True)],
)
def test_silu_mul_quant_matches_reference(lead, k, dtype, ue8m0, col_major):
    from fp8fx.kernels.act_quant import silu_mul_quant

    g, u = _swiglu_inputs(lead, k, dtype, seed=sum(lead) + k)
    q, s = silu_mul_quant(g, u, ue8m0=ue8m0, col_major=col_major)
    q_ref, s_ref = R.quantize_act(F.silu(g) * u, 128, "ue8m0" if ue8m0 else "float32")
    assert q.shape == q_ref.shape and s.shape == s_ref.shape and q.dtype == R.FP8_DTYPE
    if col_major:
        assert s.stride() == (1, max(lead[0], 1))
    assert torch.equal(s, s_ref)
    # eager's silu in float32 (CPU expf) and the interpreter's numpy exp may differ in the
    # last bit, which can move a rounded product; every other code is eager's.
    differ = (q.view(torch.uint8) != q_ref.view(torch.uint8)).sum().item()
    assert differ <= (0 if dtype == BF16 else q.numel() // 1000)


@interpreted
def test_silu_mul_quant_rejects_bad_input():
    from fp8fx.kernels.act_quant import silu_mul_quant

    g, u = _swiglu_inputs((4,), 256, BF16, seed=1)
    with pytest.raises(ValueError, match="up must match gate's shape"):
        silu_mul_quant(g, u[:2])
    with pytest.raises(ValueError, match="up must match gate's shape, dtype"):
        silu_mul_quant(g, u.half())
    with pytest.raises(ValueError, match="multiple of 128"):
        silu_mul_quant(g[:, :200], u[:, :200])
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        silu_mul_quant(g.to(torch.int32), u.to(torch.int32))
    with pytest.raises(ValueError, match="col_major needs 2-D"):
        silu_mul_quant(g[None], u[None], col_major=True)


# --- the rewrite ---------------------------------------------------------------------------


class SwiGLU(nn.Module):
    def __init__(self, h=256, i=384, read_product=False):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(h, i, bias=False), nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)
        self.read_product = read_product

    def forward(self, x):
        p = F.silu(self.gate_proj(x)) * self.up_proj(x)
        y = self.down_proj(p)
        return (y, p) if self.read_product else y


def _quantized(module):
    import fp8fx

    torch.manual_seed(0)
    module = module.to(BF16).eval().requires_grad_(False)
    fp8fx.quantize_(module)
    return module


@pytest.fixture
def cpu_rewrite(monkeypatch):
    from fp8fx.passes import quant_kernel

    monkeypatch.setattr(quant_kernel, "DEVICES", ("cuda", "cpu"))


@interpreted
@pytest.mark.usefixtures("cpu_rewrite")
class TestRewrite(expecttest.TestCase):
    def test_swiglu_mlp(self):
        # The product's quantization is the kernel, launched on g and u where the gate and up
        # GEMMs wrote them, with sizes from the graph's symbol; Inductor's reinplacing turns it
        # into the mutating form on fresh buffers (no copies). The scales come out column-major,
        # and the output equals eager fp8fx's (whose CPU linear quantizes with the reference).
        model = _quantized(SwiGLU())
        x = heavy_tailed(1, 37, 256, dtype=BF16, seed=3)
        out, g = compile_post_grad(model, x, dynamic=True)
        self.assertEqual(counters["fp8fx"]["quant_kernel_silu"], 1)
        self.assertExpectedInline(g, """\
in0: f8e4m3[384, 256]
in1: f32[3, 2]
in2: f8e4m3[384, 256]
in3: f32[3, 2]
in4: f8e4m3[256, 384]
in5: f32[2, 3]
in6: s0
in7: bf16[1, s0, 256]
v8: f32[1, s0, 256] = prims.convert_element_type(in7, f32)
v9: f32[1, s0, 2, 128] = aten.view(v8, [1, s0, 2, 128])
v10: f32[1, s0, 2, 128] = aten.abs(v9)
v11: f32[1, s0, 2] = aten.amax(v10, [-1])
v12: f32[1, s0, 2] = aten.clamp_min(v11, 1e-12)
v13: f32[1, s0, 2] = aten.clamp_min(v12, 448.0)
v14: f32[1, s0, 2] = aten.clamp_max(v13, 448.0)
v15: f32[1, s0, 2] = aten.div(v12, v14)
v16: f32[1, s0, 2, 1] = aten.unsqueeze(v15, -1)
v17: f32[1, s0, 2, 128] = aten.div(v9, v16)
v18: f32[1, s0, 2, 128] = aten.clamp_min(v17, -448.0)
v19: f32[1, s0, 2, 128] = aten.clamp_max(v18, 448.0)
v20: f8e4m3[1, s0, 2, 128] = prims.convert_element_type(v19, f8e4m3)
v21: f8e4m3[1, s0, 256] = aten.view(v20, [1, s0, 256])
v22: bf16[1, s0, 768] = fp8fx.block_gemm_cat(v21, v15, [in0, in2], [in1, in3], [None, None], [128, 128], bf16)
v23: bf16[1, s0, 384] = aten.slice(v22, 2, 0, 384)
v24: bf16[1, s0, 384] = aten.slice(v22, 2, 384, 768)
v25: f8e4m3[1, s0, 384] = aten.empty([1, s0, 384], dtype=f8e4m3, device=cpu)
v26: f32[1, s0, 3] = aten.empty_strided([1, s0, 3], [s0, 1, s0], dtype=f32, device=cpu)
v27: s0 + 15 = add(s0, 15)
v28: ((s0 + 15)//16) = floordiv(v27, 16)
v29: {q_ptr: f8e4m3[1, s0, 384], s_ptr: f32[1, s0, 3]} = triton_kernel_wrapper_mutation(kernel='_act_quant_kernel', grid=[(v28, 3, 1)], tma_descriptor_metadata={}, kwargs={x_ptr: v23, u_ptr: v24, q_ptr: v25, s_ptr: v26, T: s0, TP: s0, K: 384, stride_xt: 768, stride_ut: 768, stride_qt: 384, stride_st: 1, stride_sg: s0, SILU_MUL: True, UE8M0: False, EXACT_CAST: True, BLOCK_T: 16, GROUP: 128})
v30: bf16[1, s0, 256] = fp8fx.block_gemm(v25, v26, in4, in5, None, [128, 128], bf16)
return (v30,)""")
        with torch.no_grad():
            self.assertTrue(torch.equal(out, model(x)))

    def test_llama_layer(self):
        # A prefill decoder layer: the SwiGLU product and the attention output are quantized by
        # the kernel (the attention output read where SDPA wrote it); the output matches eager.
        from test_backend import _llama_layer

        layer, h, kwargs = _llama_layer()
        out, g = compile_post_grad(layer, h, kwargs=kwargs, dynamic=True, fused_norm=True)
        self.assertEqual(counters["fp8fx"]["quant_kernel_silu"], 1)
        # dynamic shapes: eps is a 0-dim CPU input, which the interpreter cannot take as a
        # scalar, so the norms stay fp8fx.rms_norm_quant here (the GPU tests launch them)
        self.assertEqual(counters["fp8fx"]["quant_kernel_norm"], 0)
        self.assertEqual(g.count("fp8fx.rms_norm_quant("), 2)
        self.assertEqual(counters["fp8fx"]["quant_kernel_attention"], 1)
        self.assertEqual(g.count("(kernel='_act_quant_kernel'"), 2)
        # the attention rows as SDPA wrote them: its output 0, token-major, no copy
        rows = re.search(r"^(v\d+): bf16\[1, s0, 4, 64\] = aten.permute\((v\d+), \[0, 2, 1, 3\]\)$", g, re.M)
        self.assertIn(f"{rows[2]}: bf16[1, 4, s0, 64] = getitem(", g)
        self.assertIn(f"kwargs={{x_ptr: {rows[1]}, u_ptr: {rows[1]},", g)
        with torch.no_grad():
            expect = layer(h, **kwargs)
        out, expect = (t[0] if isinstance(t, tuple) else t for t in (out, expect))
        self.assertLess(rel_err(out, expect), 1e-2)

    def test_llama_layer_norms_static(self):
        # Static shapes at 150 tokens (eps a constant): both fused RMSNorms launch
        # rms_norm_quant's kernel, the second with its residual add (h written by the kernel),
        # the first reading x for the unused residual / h pointers; output equals eager's.
        from test_backend import _llama_layer
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        layer, _, _ = _llama_layer()
        h = heavy_tailed(1, 150, 256, dtype=BF16, seed=2, outliers=False)
        cos, sin = LlamaRotaryEmbedding(layer.self_attn.config)(h, torch.arange(150)[None])
        kwargs = {"position_embeddings": (cos, sin), "attention_mask": None}
        out, g = compile_post_grad(layer, h, kwargs=kwargs, dynamic=False, fused_norm=True)
        self.assertEqual(counters["fp8fx"]["quant_kernel_norm"], 2)
        self.assertNotIn("fp8fx.rms_norm_quant", g)
        norms = [line for line in g.splitlines() if "_rms_norm_quant_kernel" in line]
        self.assertIn("kwargs={x_ptr: in14, r_ptr: in14, w_ptr: in15, h_ptr: in14,", norms[0])
        self.assertIn("HAS_RESIDUAL: False", norms[0])
        self.assertIn("{h_ptr: bf16[1, 150, 256], q_ptr: f8e4m3[1, 150, 256], s_ptr: f32[1, 150, 2]}", norms[1])
        self.assertIn("eps: 1e-06, stride_xm: 256, stride_rm: 256, HAS_RESIDUAL: True", norms[1])
        with torch.no_grad():
            expect = layer(h, **kwargs)
        out, expect = (t[0] if isinstance(t, tuple) else t for t in (out, expect))
        self.assertTrue(torch.equal(out, expect))

    def test_product_read_elsewhere_is_left_to_inductor(self):
        model = _quantized(SwiGLU(read_product=True))
        x = heavy_tailed(1, 5, 256, dtype=BF16, seed=4)
        _, g = compile_post_grad(model, x, dynamic=True)
        self.assertNotIn("triton_kernel_wrapper", g)
        self.assertEqual(counters["fp8fx"]["quant_kernel_silu"], 0)


def test_cuda_only_by_default_and_off_with_false():
    # On CPU tensors (the default DEVICES) and with quant_kernels=False the quantization stays
    # Inductor's decomposed form; the output is eager fp8fx's either way.
    model = _quantized(SwiGLU())
    x = heavy_tailed(1, 6, 256, dtype=BF16, seed=5)
    for options in ({}, {"quant_kernels": False}):
        out, g = compile_post_grad(model, x, dynamic=True, **options)
        assert "triton_kernel_wrapper" not in g and "aten.amax" in g
        assert not counters["fp8fx"]["quant_kernel_silu"]
        with torch.no_grad():
            assert rel_err(out, model(x)) < 1e-2


def test_uuid_includes_quant_kernels():
    # the option, and the kernel sources the rewrite puts into compiled graphs (a cached graph
    # must not outlive an edit to them)
    from fp8fx.kernels import act_quant, norm_quant
    from fp8fx.passes import PostGradPass, _sources

    assert PostGradPass(quant_kernels=True).uuid() != PostGradPass(quant_kernels=False).uuid()
    assert act_quant.__file__ in _sources() and norm_quant.__file__ in _sources()
