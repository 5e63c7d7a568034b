"""fp8fx::rms_norm_quant ((residual add +) RMSNorm + activation quant in one pass): the Triton
kernel under TRITON_INTERPRET=1 against fp8fx.reference, the op on CPU, and the post-grad
rewrite (passes/norm_quant.py) on a transformers Llama decoder layer."""

import expecttest
import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from conftest import (INTERPRET_INNER, check_norm_quant, compile_post_grad, heavy_tailed, interpreted, norm_inputs, rel_err,
                      run_interpreted)
from fp8fx import reference as R
from fp8fx.backend import backend_with

BF16 = torch.bfloat16


@pytest.mark.skipif(INTERPRET_INNER, reason="this is the launcher")
def test_interpreted_suite():
    run_interpreted(__file__)


@interpreted
@pytest.mark.parametrize(
    "shape,residual,ue8m0,dtype",
    [((5, 256), True, False, BF16), ((2, 3, 384), True, True, BF16), ((7, 128), False, False, BF16),
     ((1, 1024), True, False, torch.float16), ((33, 640), False, True, BF16), ((0, 256), True, False, BF16)],
)
def test_kernel_matches_reference(shape, residual, ue8m0, dtype):
    from fp8fx.kernels.norm_quant import rms_norm_quant

    x, r, w = norm_inputs(shape, dtype, seed=sum(shape), residual=residual, zero_rows=(1,) if shape[0] > 1 else ())
    q, s, h = rms_norm_quant(x, r, w, 1e-6, ue8m0)
    check_norm_quant(q, s, h, x, r, w, 1e-6, ue8m0)


@interpreted
def test_kernel_strided_rows_and_large_eps():
    from fp8fx.kernels.norm_quant import rms_norm_quant

    base, r, w = norm_inputs((6, 512), BF16, seed=9)
    x = base[:, :256]  # rows 512 apart
    q, s, h = rms_norm_quant(x, r[:, 256:], w[:256], 0.5, False)
    check_norm_quant(q, s, h, x, r[:, 256:], w[:256], 0.5, False)


def test_op_on_cpu_is_the_reference_and_checks_its_arguments():
    x, r, w = norm_inputs((3, 4, 256), BF16, seed=4)
    eps = torch.tensor(1e-5, dtype=torch.float64)
    q, s, h = torch.ops.fp8fx.rms_norm_quant(x, r, w, eps, 0.0, False)
    q_ref, s_ref, h_ref = R.rms_norm_quant(x, r, w, 1e-5)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref) and torch.equal(h, h_ref)
    assert s.stride() == (4, 1, 12)
    torch.library.opcheck(torch.ops.fp8fx.rms_norm_quant.default, (x, r, w, None, 1e-6, True))
    torch.library.opcheck(torch.ops.fp8fx.rms_norm_quant.default, (x, None, w, eps, 0.0, False))
    xt, rt = x.transpose(0, 1), r.transpose(0, 1)  # strided rows: the outputs keep the fake's layouts
    torch.library.opcheck(torch.ops.fp8fx.rms_norm_quant.default, (xt, rt, w, eps, 0.0, False))
    with pytest.raises(ValueError, match="multiple of 128 and at most"):
        torch.ops.fp8fx.rms_norm_quant(x[..., :200], None, w[:200], None, 1e-6, False)
    with pytest.raises(TypeError, match="bf16/fp16 x"):
        torch.ops.fp8fx.rms_norm_quant(x.float(), None, w, None, 1e-6, False)
    with pytest.raises(ValueError, match="residual must match x"):
        torch.ops.fp8fx.rms_norm_quant(x, r[:2], w, None, 1e-6, False)
    with pytest.raises(ValueError, match="weight must be"):
        torch.ops.fp8fx.rms_norm_quant(x, r, w.float(), None, 1e-6, False)
    with pytest.raises(ValueError, match="0-dim floating-point CPU tensor"):
        torch.ops.fp8fx.rms_norm_quant(x, r, w, torch.ones(1), 1e-6, False)


# --- the rewrite ---------------------------------------------------------------------------


class ResidualNormProj(nn.Module):
    """h = x + delta; transformers' RMSNorm of h into a linear; h also returned (the stream)."""

    def __init__(self, k=256, n=384):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        self.norm = LlamaRMSNorm(k, eps=1e-5)
        self.proj = nn.Linear(k, n, bias=False)

    def forward(self, x, delta):
        h = x + delta
        return self.proj(self.norm(h)), h


class NormReadTwice(ResidualNormProj):
    """The normalized rows also leave the module: the norm must stay whole."""

    def forward(self, x, delta):
        y = self.norm(x + delta)
        return self.proj(y), y


def _model(cls, *args):
    import fp8fx

    torch.manual_seed(0)
    model = cls(*args).to(BF16).eval().requires_grad_(False)
    with torch.no_grad():
        model.norm.weight.copy_(1 + 0.3 * torch.randn_like(model.norm.weight))
    fp8fx.quantize_(model)
    return model


class TestRewrite(expecttest.TestCase):
    def test_residual_norm_proj(self):
        model = _model(ResidualNormProj)
        x, delta = heavy_tailed(5, 256, seed=1, outliers=False).to(BF16), heavy_tailed(5, 256, seed=2).to(BF16)
        (y, h), g = compile_post_grad(model, x, delta, fused_norm=True)
        self.assertExpectedInline(g, """\
in0: f8e4m3[384, 256]
in1: f32[3, 2]
in2: s0
in3: bf16[s0, 256]
in4: bf16[s0, 256]
in5: f64[]
in6: bf16[256]
v7: (f8e4m3[s0, 256], f32[s0, 2], bf16[s0, 256]) = fp8fx.rms_norm_quant(in3, in4, in6, in5, 0.0, False)
v8: f8e4m3[s0, 256] = getitem(v7, 0)
v9: f32[s0, 2] = getitem(v7, 1)
v10: bf16[s0, 256] = getitem(v7, 2)
v11: bf16[s0, 384] = fp8fx.block_gemm(v8, v9, in0, in1, None, [128, 128], bf16)
return (v11, v10)""")
        assert counters["fp8fx"]["norm_quant"] == 1 and counters["fp8fx"]["norm_quant_residual"] == 1
        y_ref, h_ref = model(x, delta)
        assert torch.equal(h, h_ref)
        assert rel_err(y, y_ref) < 1e-2  # the same codes but for rows whose fp32 sum order flips one

    def test_cuda_only_by_default_and_false_turns_it_off(self):
        model = _model(ResidualNormProj)
        x, delta = heavy_tailed(5, 256, seed=1).to(BF16), heavy_tailed(5, 256, seed=2).to(BF16)
        for options in ({}, {"fused_norm": False}, {"fused_norm": None}):
            _, g = compile_post_grad(model, x, delta, **options)
            assert "fp8fx.rms_norm_quant" not in g and "aten.amax" in g, options
            assert not counters["fp8fx"]["norm_quant"] and not counters["fp8fx"]["norm_quant_kept"], options


def test_norm_read_elsewhere_is_kept_and_reported():
    model = _model(NormReadTwice)
    x, delta = heavy_tailed(5, 256, seed=1).to(BF16), heavy_tailed(5, 256, seed=2).to(BF16)
    (y, n), g = compile_post_grad(model, x, delta, fused_norm=True)
    assert "fp8fx.rms_norm_quant" not in g and "aten.rsqrt" in g
    assert counters["fp8fx"]["norm_quant_kept"] == 1 and not counters["fp8fx"]["norm_quant"]
    y_ref, n_ref = model(x, delta)
    assert torch.equal(n, n_ref) and rel_err(y, y_ref) < 1e-2


def test_residual_add_folded_in_only_when_every_other_reader_comes_later():
    # The post-grad graphs of the models above put every other reader of the sum after the
    # norm; an earlier reader (which would read the op's output before it exists) is built
    # here by hand: then the op takes the sum as x and the add stays.
    from fp8fx.passes.norm_quant import _CONVERT, _residual

    aten = torch.ops.aten
    for early in (False, True):
        g = torch.fx.Graph()
        a, b = g.placeholder("a"), g.placeholder("b")
        h = g.call_function(aten.add.Tensor, (a, b))
        if early:
            g.call_function(aten.mul.Tensor, (h, 2))
        h32 = g.call_function(_CONVERT, (h, torch.float32))
        y = g.call_function(aten.neg.default, (h32,))
        g.output((y, g.call_function(aten.mul.Tensor, (h, 3))))
        for node in (a, b, h):
            node.meta["val"] = torch.empty(2, 256, dtype=BF16)
        assert _residual(h, h32, y) == (None if early else (a, b)), early


def test_llama_layer_both_norms_fused_and_matches_eager():
    from test_backend import _llama_layer

    layer, h, kwargs = _llama_layer()
    (out, g) = compile_post_grad(layer, h, kwargs=kwargs, fused_norm=True)
    # input_layernorm (no add before it in one layer) and post_attention_layernorm (after the
    # residual add, whose sum the layer's last add reads from the op)
    assert counters["fp8fx"]["norm_quant"] == 2 and counters["fp8fx"]["norm_quant_residual"] == 1
    assert g.count("fp8fx.rms_norm_quant") == 2 and "aten.rsqrt" not in g
    with torch.no_grad():
        ref = layer(h, **kwargs)
    ref = ref[0] if isinstance(ref, tuple) else ref
    out = out[0] if isinstance(out, tuple) else out
    assert rel_err(out, ref) < 2e-2
    # Compiled for real (Inductor's CPU code calls the op through its extern; its scale layout is
    # what the GEMM lowering wants, so no copy kernel sits between them).
    from test_backend import compile_and_code, fresh_compile

    with fresh_compile():
        out_c, code = compile_and_code(layer, h, b=backend_with(fused_norm=True), **kwargs)
    out_c = out_c[0] if isinstance(out_c, tuple) else out_c
    assert code.count("extern_kernels.fp8fx_rms_norm_quant(") == 2  # not through the dispatcher
    assert rel_err(out_c, ref) < 2e-2


def test_uuid_includes_fused_norm():
    from fp8fx.passes import PostGradPass

    uuids = {PostGradPass(fused_norm=v).uuid() for v in (None, True, False)}
    assert len(uuids) == 3
