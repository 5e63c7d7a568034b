"""Decode producers in the gemv's prologue (passes/prologue.py): the RMSNorm (with the residual
add before it) and the SwiGLU product silu(gate) * up feeding a decode linear_cat become
fp8fx.rms_norm_linear_cat / fp8fx.silu_mul_linear_cat. On CPU the ops run the reference, so
these tests check the rewrite (graph snapshot, what is left alone, counters), the ops'
contracts and numerics against eager fp8fx; the kernel is checked in
test_kernels_interpret.py (interpreter) and test_kernels_gpu.py / test_backend_gpu.py."""

import expecttest
import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from conftest import compile_post_grad, heavy_tailed, norm_inputs, rel_err
from fp8fx import reference as R
from fp8fx.backend import backend_with

BF16 = torch.bfloat16


def _decode_layer():
    """test_backend's tiny quantized Llama decoder layer at one token (static shapes)."""
    from test_backend import _llama_layer

    layer, h, kwargs = _llama_layer()
    cos, sin = kwargs["position_embeddings"]
    return layer, h[:, :1], {"position_embeddings": (cos[:, :1], sin[:, :1]), "attention_mask": None}


class TestGraphs(expecttest.TestCase):
    def test_llama_decode_layer(self):
        # Both RMSNorms and the SwiGLU product move into the GEMMs they feed; the second
        # norm takes the residual add, and the layer's last add reads its sum from the op.
        layer, h, kwargs = _decode_layer()
        out, g = compile_post_grad(layer, h, kwargs=kwargs, dynamic=False, gemv_prologue=True)
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
in14: bf16[1, 1, 256]
in15: bf16[256]
in16: bf16[1, 1, 64]
in17: bf16[1, 1, 64]
in18: bf16[256]
v19: (bf16[1, 1, 512], bf16[0]) = fp8fx.rms_norm_linear_cat(in14, None, in15, None, 1e-06, [in0, in2, in4], [in1, in3, in5], [None, None, None], [128, 128])
v20: bf16[1, 1, 512] = getitem(v19, 0)
v21: bf16[1, 1, 256] = aten.slice(v20, 2, 0, 256)
v22: bf16[1, 1, 128] = aten.slice(v20, 2, 256, 384)
v23: bf16[1, 1, 128] = aten.slice(v20, 2, 384, 512)
v24: bf16[1, 1, 4, 64] = aten.view(v21, [1, 1, -1, 64])
v25: bf16[1, 4, 1, 64] = aten.permute(v24, [0, 2, 1, 3])
v26: bf16[1, 1, 1, 64] = aten.unsqueeze(in16, 1)
v27: bf16[1, 4, 1, 64] = aten.mul(v25, v26)
v28: bf16[1, 4, 1, 32] = aten.slice(v25, 3, 32, 9223372036854775807)
v29: bf16[1, 4, 1, 32] = aten.neg(v28)
v30: bf16[1, 4, 1, 32] = aten.slice(v25, 3, 0, 32)
v31: bf16[1, 4, 1, 64] = aten.cat([v29, v30], -1)
v32: bf16[1, 1, 1, 64] = aten.unsqueeze(in17, 1)
v33: bf16[1, 4, 1, 64] = aten.mul(v31, v32)
v34: bf16[1, 4, 1, 64] = aten.add(v27, v33)
v35: bf16[1, 1, 2, 64] = aten.view(v22, [1, 1, -1, 64])
v36: bf16[1, 2, 1, 64] = aten.permute(v35, [0, 2, 1, 3])
v37: bf16[1, 2, 1, 64] = aten.mul(v36, v26)
v38: bf16[1, 2, 1, 32] = aten.slice(v36, 3, 32, 9223372036854775807)
v39: bf16[1, 2, 1, 32] = aten.neg(v38)
v40: bf16[1, 2, 1, 32] = aten.slice(v36, 3, 0, 32)
v41: bf16[1, 2, 1, 64] = aten.cat([v39, v40], -1)
v42: bf16[1, 2, 1, 64] = aten.mul(v41, v32)
v43: bf16[1, 2, 1, 64] = aten.add(v37, v42)
v44: bf16[1, 1, 2, 64] = aten.view(v23, [1, 1, -1, 64])
v45: bf16[1, 2, 1, 64] = aten.permute(v44, [0, 2, 1, 3])
v46: (bf16[1, 4, 1, 64], f32[1, 4, 1]) = aten._scaled_dot_product_flash_attention_for_cpu(v34, v43, v45, scale=0.125)
v47: bf16[1, 4, 1, 64] = getitem(v46, 0)
v48: bf16[1, 1, 4, 64] = aten.permute(v47, [0, 2, 1, 3])
v49: bf16[1, 1, 256] = aten.view(v48, [1, 1, -1])
v50: bf16[1, 1, 256] = fp8fx.linear_cat(v49, [in6], [in7], [None], [128, 128])
v51: bf16[1, 1, 256] = aten.slice(v50, 2, 0, 256)
v52: (bf16[1, 1, 1024], bf16[1, 1, 256]) = fp8fx.rms_norm_linear_cat(in14, v51, in18, None, 1e-06, [in8, in10], [in9, in11], [None, None], [128, 128])
v53: bf16[1, 1, 1024] = getitem(v52, 0)
v54: bf16[1, 1, 256] = getitem(v52, 1)
v55: bf16[1, 1, 512] = aten.slice(v53, 2, 0, 512)
v56: bf16[1, 1, 512] = aten.slice(v53, 2, 512, 1024)
v57: bf16[1, 1, 256] = fp8fx.silu_mul_linear_cat(v55, v56, [in12], [in13], [None], [128, 128])
v58: bf16[1, 1, 256] = aten.slice(v57, 2, 0, 256)
v59: bf16[1, 1, 256] = aten.add(v54, v58)
return (v59,)""")
        c = counters["fp8fx"]
        assert (c["prologue_norm"], c["prologue_norm_residual"], c["prologue_silu"]) == (2, 1, 1)
        with torch.no_grad():
            ref = layer(h, **kwargs)
        assert rel_err(out[0] if isinstance(out, tuple) else out, ref[0] if isinstance(ref, tuple) else ref) < 1e-2


def test_compiled_layer_calls_the_externs_and_matches_eager():
    # Inductor's CPU code calls the two ops' externs (not the dispatcher) and computes neither
    # the norms nor the SiLU; the output is eager fp8fx's up to a flipped code.
    from torch._inductor.utils import run_and_get_code

    from test_backend import fresh_compile

    layer, h, kwargs = _decode_layer()
    with fresh_compile(), torch.no_grad():
        compiled = torch.compile(layer, backend=backend_with(gemv_prologue=True), fullgraph=True, dynamic=False)
        out, codes = run_and_get_code(compiled, h, **kwargs)
        ref = layer(h, **kwargs)
    body = codes[0][codes[0].index("def call("):]
    assert body.count("extern_kernels.fp8fx_rms_norm_linear_cat(") == 2, body
    assert body.count("extern_kernels.fp8fx_silu_mul_linear_cat(") == 1, body
    assert body.count("extern_kernels.fp8fx_linear_cat(") == 1, body  # o_proj
    assert "rsqrt" not in codes[0] and "exp(" not in codes[0]
    assert rel_err(out[0] if isinstance(out, tuple) else out, ref[0] if isinstance(ref, tuple) else ref) < 1e-2


def test_cuda_only_by_default_and_false_turns_it_off():
    layer, h, kwargs = _decode_layer()
    for options in ({}, {"gemv_prologue": False}, {"gemv_prologue": False, "fused_norm": True}):
        _, g = compile_post_grad(layer, h, kwargs=kwargs, dynamic=False, **options)
        assert "_linear_cat(" not in g.replace("fp8fx.linear_cat(", "") and g.count("fp8fx.linear_cat(") == 4, options
        assert not counters["fp8fx"]["prologue_norm"] and not counters["fp8fx"]["prologue_silu"], options


class NormMLP(nn.Module):
    """h = x + delta -> RMSNorm -> gate/up -> silu * up -> down, with knobs that give the
    producers other readers."""

    def __init__(self, k=256, i=384, norm_out=False, act_out=False, early_h=False):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        self.norm = LlamaRMSNorm(k, eps=1e-5)
        self.gate_proj, self.up_proj = nn.Linear(k, i, bias=False), nn.Linear(k, i, bias=False)
        self.down_proj = nn.Linear(i, k, bias=False)
        self.norm_out, self.act_out, self.early_h = norm_out, act_out, early_h

    def forward(self, x, delta):
        h = x + delta
        early = h * 2 if self.early_h else None
        y = self.norm(h)
        act = nn.functional.silu(self.gate_proj(y)) * self.up_proj(y)
        out = self.down_proj(act) + h
        extra = tuple(t for t, keep in ((y, self.norm_out), (act, self.act_out), (early, self.early_h)) if keep)
        return (out, *extra)


def _mlp(**knobs):
    import fp8fx

    torch.manual_seed(0)
    model = NormMLP(**knobs).to(BF16).eval().requires_grad_(False)
    with torch.no_grad():
        model.norm.weight.copy_(1 + 0.3 * torch.randn_like(model.norm.weight))
    fp8fx.quantize_(model)
    return model


@pytest.mark.parametrize("knob,expect", [
    ({}, (1, 1, 1)),  # the norm with its residual add, and the SwiGLU product
    ({"norm_out": True}, (0, 0, 1)),  # the normalized rows leave the model: the norm stays whole
    ({"act_out": True}, (1, 1, 0)),  # the product leaves the model: it stays an Inductor kernel
    # (a reader of the sum before the norm takes the op's x instead of its add: passes/norm_quant's
    # _residual, tested in test_norm_quant.py; post-grad graphs put such readers after the norm)
    ({"early_h": True}, (1, 1, 1)),
])
def test_what_moves_into_the_prologue(knob, expect):
    model = _mlp(**knob)
    x, delta = heavy_tailed(2, 256, seed=1, outliers=False).to(BF16), heavy_tailed(2, 256, seed=2).to(BF16)
    out, g = compile_post_grad(model, x, delta, dynamic=False, gemv_prologue=True)
    c = counters["fp8fx"]
    assert (c["prologue_norm"], c["prologue_norm_residual"], c["prologue_silu"]) == expect, g
    with torch.no_grad():
        ref = model(x, delta)
    for got, want in zip(out, ref):
        assert rel_err(got, want) < 1e-2


def test_only_one_or_two_rows():
    # The gemv quantizes before its K loop (where the prologue runs) at 1-2 rows per program:
    # 3 rows and dynamic shapes (prefill) keep the linear_cat / block_gemm graphs.
    model = _mlp()
    for rows, dynamic in ((3, False), (5, True)):
        x, delta = heavy_tailed(rows, 256, seed=1).to(BF16), heavy_tailed(rows, 256, seed=2).to(BF16)
        _, g = compile_post_grad(model, x, delta, dynamic=dynamic, gemv_prologue=True)
        assert "rms_norm_linear_cat" not in g and "silu_mul_linear_cat" not in g, (rows, g)


def test_ops_on_cpu_are_the_reference_and_check_their_arguments():
    x, r, w = norm_inputs((1, 2, 256), BF16, seed=4)
    eps = torch.tensor(1e-5, dtype=torch.float64)
    weights = [R.quantize_weight(torch.randn(n, 256), (128, 128)) for n in (256, 128)]
    qw, ws = [q for q, _ in weights], [s for _, s in weights]
    bias = [torch.randn(256, dtype=BF16), torch.randn(128, dtype=BF16)]
    y, h = torch.ops.fp8fx.rms_norm_linear_cat(x, r, w, eps, 0.0, qw, ws, bias, [128, 128])
    y_ref, h_ref = R.rms_norm_linear_cat(x, r, w, 1e-5, qw, ws, bias)
    assert torch.equal(y, y_ref) and torch.equal(h, h_ref) and y.shape == (1, 2, 384)
    y_ref2 = R.linear_cat(R.rms_norm(x + r, w, 1e-5), qw, ws, bias)
    assert torch.equal(y, y_ref2)
    _, h0 = torch.ops.fp8fx.rms_norm_linear_cat(x, None, w, None, 1e-5, qw, ws, [None, None], [128, 128])
    assert h0.numel() == 0
    g, u = x, r
    y = torch.ops.fp8fx.silu_mul_linear_cat(g, u, qw, ws, [None, None], [128, 128])
    assert torch.equal(y, R.linear_cat(nn.functional.silu(g) * u, qw, ws, [None, None]))
    # The fakes against the ops (opcheck's schema test compares fp8 inputs with ops CPU lacks).
    checks = ("test_faketensor", "test_aot_dispatch_static")
    torch.library.opcheck(torch.ops.fp8fx.rms_norm_linear_cat.default, (x, r, w, eps, 0.0, qw, ws, bias, [128, 128]),
                          test_utils=checks)
    torch.library.opcheck(torch.ops.fp8fx.rms_norm_linear_cat.default, (x, None, w, None, 1e-6, qw, ws, [None, None],
                          [128, 128]), test_utils=checks)
    torch.library.opcheck(torch.ops.fp8fx.silu_mul_linear_cat.default, (g, u, qw, ws, [None, None], [128, 128]),
                          test_utils=checks)
    with pytest.raises(ValueError, match="rms_norm_linear_cat's residual must match x"):
        torch.ops.fp8fx.rms_norm_linear_cat(x, r[:, :1], w, None, 1e-5, qw, ws, [None, None], [128, 128])
    with pytest.raises(ValueError, match="multiple of 128"):
        torch.ops.fp8fx.rms_norm_linear_cat(x[..., :200], None, w[:200], None, 1e-5, qw, ws, [None, None], [128, 128])
    with pytest.raises(ValueError, match="the weight expects 512"):
        torch.ops.fp8fx.rms_norm_linear_cat(x, r, w, None, 1e-5, [R.quantize_weight(torch.randn(128, 512))[0]],
                                            [R.quantize_weight(torch.randn(128, 512))[1]], [None], [128, 128])
    with pytest.raises(TypeError, match="bf16/fp16 gate and up"):
        torch.ops.fp8fx.silu_mul_linear_cat(g, u.float(), qw, ws, [None, None], [128, 128])
    with pytest.raises(ValueError, match="one scale and one bias entry"):
        torch.ops.fp8fx.silu_mul_linear_cat(g, u, qw, ws[:1], [None, None], [128, 128])


def test_uuid_includes_gemv_prologue():
    from fp8fx.passes import PostGradPass

    assert len({PostGradPass(gemv_prologue=v).uuid() for v in (None, True, False)}) == 3


def test_prologue_fuses_agrees_with_the_launch(monkeypatch):
    # What the pass asks on CUDA (gemv.prologue_fuses) is the launch's own decision: the
    # measured linear config's split leaves at most 32 (row, K block) groups per program and
    # the norm's rows fit NORM_MAX_ELEMS; otherwise the op would form the input in torch.
    from fp8fx.kernels import gemv

    monkeypatch.setattr(gemv, "num_sms", lambda device: 132)  # an H200, without CUDA
    cuda = torch.device("cuda")
    llama = [(1, 6144, 4096, True), (1, 28672, 4096, True), (1, 4096, 14336, False), (2, 6144, 4096, True)]
    assert all(gemv.prologue_fuses(m, n, k, norm, cuda) for m, n, k, norm in llama)
    assert not gemv.prologue_fuses(2, 28672, 4096, True, cuda)  # 2 rows x 16 K blocks per split
    assert not gemv.prologue_fuses(1, 1024, 16384, True, cuda)  # a row over NORM_MAX_ELEMS
    assert gemv.prologue_fuses(1, 1024, 16384, False, cuda)  # the product needs its K range only
    assert not gemv.prologue_fuses(3, 6144, 4096, False, cuda)  # 16 rows per program
    monkeypatch.setattr(gemv, "PRE_QUANT", False)
    assert not gemv.prologue_fuses(1, 6144, 4096, True, cuda)
