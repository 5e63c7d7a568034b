"""fp8fx.backend on a CUDA GPU: Triton fusion, numerics, max-autotune safety, CUDA graphs.

Run with ``python -m pytest -q -m gpu tests/test_backend_gpu.py``; skipped without CUDA.
(No expecttest here: the GPU machine does not have it.)
"""

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import fp8fx
from conftest import heavy_tailed, kernel_sources, rel_err
from fp8fx import BlockFP8Config, reference as R
from fp8fx.backend import backend, backend_with, last_report
from fp8fx.passes.linear import quantize_act_decomposed

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BF16 = torch.bfloat16


class NormMLP(nn.Module):
    """RMSNorm -> gate/up -> silu(gate) * up -> down."""

    def __init__(self, h=256, i=512):
        super().__init__()
        self.norm = nn.RMSNorm(h, eps=1e-6)
        self.gate_proj, self.up_proj = nn.Linear(h, i, bias=False), nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x):
        h = self.norm(x)
        return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


def _model(cls=NormMLP, *args, quantize=True, config=None):
    torch.manual_seed(0)
    model = cls(*args).to("cuda", BF16).eval().requires_grad_(False)
    if quantize:
        fp8fx.quantize_(model, config)
    return model


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    counters.clear()
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        yield
    torch._dynamo.reset()


@pytest.mark.parametrize("scale_fmt", ["float32", "ue8m0"])
def test_decomposed_quant_codes_match_reference(scale_fmt):
    x = heavy_tailed(67, 512, dtype=BF16, seed=3).cuda()
    x[5] = 0
    # Compiled with fp8fx.backend's Inductor settings (eager_numerics: IEEE division in Triton).
    fn = torch.compile(lambda t: quantize_act_decomposed(t, 128, scale_fmt == "ue8m0"), backend=backend, fullgraph=True, dynamic=True)
    q, s = fn(x)
    q_ref, s_ref = R.quantize_act(x, 128, scale_fmt)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("scale_fmt", ["float32", "ue8m0"])
def test_compiled_matches_eager(scale_fmt):
    model = _model(config=BlockFP8Config(scale_fmt=scale_fmt))
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for t in (2, 16, 130, 7):
            x = heavy_tailed(t, 256, dtype=BF16, seed=t, outliers=False).cuda()
            assert rel_err(compiled(x), model(x)) < 0.04  # two FP8 runs, rounding flips apart
    assert counters["fp8fx"]["linear"] == 3
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("quant_kernels", [False, True])
def test_quant_fused_into_triton_producers(quant_kernels):
    # quant_kernels=False: Inductor fuses each quantization into its producer's kernel. By
    # default the SwiGLU product's is fp8fx's kernel, which computes the product itself.
    from torch._inductor.utils import run_and_get_code

    model = _model()
    x = torch.randn(33, 256, dtype=BF16, device="cuda")
    compiled = torch.compile(model, backend=backend_with(quant_kernels=quant_kernels), fullgraph=True, dynamic=True)
    with torch.no_grad():
        _, codes = run_and_get_code(compiled, x)
    code = codes[0]
    body = code[code.index("def call(") :]
    seq = []
    for line in body.splitlines():
        if "extern_kernels.fp8fx_block_gemm(" in line or "extern_kernels.fp8fx_block_gemm_cat(" in line:
            seq.append("gemm")
        elif (m := re.search(r"\b((triton|_act_quant)_\w+)\.run\(", line)) is not None:
            seq.append(m.group(1))
    kernels = kernel_sources(code)
    writers = [name for name, src in kernels.items() if "float8e4nv" in src]
    # Each kernel that writes fp8 codes computes its producer too (RMSNorm's rsqrt, SiLU's exp):
    # no standalone quantization kernel reads a materialized activation.
    assert len(writers) == (1 if quant_kernels else 2), seq
    for name in writers:
        assert "rsqrt" in kernels[name] or "exp" in kernels[name], name
    if quant_kernels:
        assert "silu_mul(x, u, EXACT_CAST)" in code and sum(k.startswith("_act_quant_kernel") for k in seq) == 1, seq
    # gate/up (packed by quantize_) are one fp8fx_block_gemm_cat call, down one fp8fx_block_gemm.
    assert seq.count("gemm") == 2 and seq[-1] == "gemm" and "fp8fx_block_gemm_cat(" in body, seq
    assert "_scaled_mm" not in code  # the GEMM is fp8fx's op, never Inductor's blockwise template


@pytest.mark.parametrize("m,n,k", [(128, 7168, 2048), (64, 2112, 7168), (1, 576, 7168)])
def test_max_autotune_is_safe(m, n, k):
    # DESIGN.md: Inductor's own blockwise scaled_mm template gave wrong results / illegal memory
    # accesses at these shapes on torch 2.11; fp8fx's lowering keeps the GEMM its own.
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=False).to("cuda", BF16).requires_grad_(False)
    fp8fx.quantize_(lin)
    x = torch.randn(m, k, dtype=BF16, device="cuda")
    compiled = torch.compile(lin, backend=backend_with(mode="max-autotune-no-cudagraphs"), fullgraph=True)
    with torch.no_grad():
        y = compiled(x)
    w = lin.weight
    expect = R.linear(x, w.qdata, w.scale, None, None, (128, 128))
    assert rel_err(y, expect) < 1e-2


def test_unquantized_model_on_gpu():
    import copy

    model = _model(quantize=False)
    eager_fp8 = copy.deepcopy(model)
    fp8fx.quantize_(eager_fp8)
    x = torch.randn(9, 256, dtype=BF16, device="cuda")
    with torch.no_grad():
        y = torch.compile(model, backend=backend, fullgraph=True, dynamic=True)(x)
        ref = eager_fp8(x)
    assert len(last_report().converted) == 3
    assert rel_err(y, ref) < 0.04


def test_cuda_graphs_decode_steps():
    model = _model()
    compiled = torch.compile(model, backend=backend_with(mode="reduce-overhead"), fullgraph=True)
    with torch.no_grad():
        for step in range(4):
            x = torch.randn(1, 256, dtype=BF16, device="cuda")
            y = compiled(x)
            assert rel_err(y, model(x)) < 0.02
    assert counters["stats"]["unique_graphs"] == 1


def _llama_layer(tokens: int, seed: int):
    """A quantized transformers LlamaDecoderLayer (hidden 1024, GQA 8/2 heads, SDPA) on the
    GPU, a heavy-tailed input of ``tokens`` tokens and its forward kwargs."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=1, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=512, attn_implementation="sdpa")
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(config, 0).to("cuda", BF16).eval().requires_grad_(False)
    fp8fx.quantize_(layer)
    h = heavy_tailed(1, tokens, 1024, dtype=BF16, seed=seed, outliers=False).cuda()
    cos, sin = LlamaRotaryEmbedding(config, device="cuda")(h, torch.arange(tokens, device="cuda")[None])
    return layer, h, {"position_embeddings": (cos, sin), "attention_mask": None}


def _compiled_layer(layer, h, kw, b, dynamic: bool):
    """(the layer compiled with backend b, its output on h, eager fp8fx's output, the
    generated code of the first compile), fullgraph, under no_grad."""
    from torch._inductor.utils import run_and_get_code

    compiled = torch.compile(layer, backend=b, fullgraph=True, dynamic=dynamic)
    with torch.no_grad():
        y, codes = run_and_get_code(compiled, h, **kw)
        expect = layer(h, **kw)
    y, expect = (t[0] if isinstance(t, tuple) else t for t in (y, expect))
    return compiled, y, expect, codes[0]


@pytest.mark.parametrize("variant", ["prologue", "quant_in_gemv", "quant_in_producer"])
def test_decode_layer_gemms_grouped_and_graph_replay(variant):
    """A Llama decoder layer at one token, compiled with static shapes: q/k/v and gate/up run
    as two gemv_cat launches, with o and down one each, quantizing in the kernel; by default
    the two RMSNorms (the second with its residual add) and the SiLU * up product run in the
    prologues of the q/k/v, gate/up and down launches (no Triton kernel computes them);
    with gemv_prologue=False they are Inductor kernels feeding fp8fx_linear_cat; with
    quant_in_gemv=False the quantization is in the producers and the groups are
    fp8fx_block_gemm_cat. The output matches eager fp8fx, and a CUDA graph of the compiled
    step replays to the same values."""
    layer, h, kw = _llama_layer(tokens=1, seed=2)
    b = backend_with(quant_in_gemv=variant != "quant_in_producer", gemv_prologue=None if variant == "prologue" else False)
    compiled, y, expect, code = _compiled_layer(layer, h, kw, b, dynamic=False)
    with torch.no_grad():
        body = code[code.index("def call(") :]
        if variant == "prologue":
            assert body.count("extern_kernels.fp8fx_rms_norm_linear_cat(") == 2, body
            assert body.count("extern_kernels.fp8fx_silu_mul_linear_cat(") == 1, body
            assert body.count("extern_kernels.fp8fx_linear_cat(") == 1, body  # o_proj
            assert counters["fp8fx"]["prologue_norm_residual"] == 1 and counters["fp8fx"]["prologue_silu"] == 1
            assert "tl.float8" not in code and "rsqrt" not in code and "exp(" not in code, code
        elif variant == "quant_in_gemv":
            assert body.count("extern_kernels.fp8fx_linear_cat(") == 4, body
            assert counters["fp8fx"]["linear_cat_members"] == 7
            assert "tl.float8" not in code, code  # no Triton kernel quantizes
        else:
            assert body.count("extern_kernels.fp8fx_block_gemm_cat(") == 2, body
            assert counters["fp8fx"]["block_gemm_cat_members"] == 5
        assert rel_err(y, expect) < 0.02
        g = torch.cuda.CUDAGraph()
        static_h = h.clone()
        out = compiled(static_h, **kw)  # warm (tickets allocated outside the capture)
        with torch.cuda.graph(g):
            out = compiled(static_h, **kw)
        out = out[0] if isinstance(out, tuple) else out
        for seed in (3, 4):
            static_h.copy_(heavy_tailed(1, 1, 1024, dtype=BF16, seed=seed, outliers=False).cuda())
            g.replay()
            want = layer(static_h, **kw)
            want = want[0] if isinstance(want, tuple) else want
            assert rel_err(out, want) < 0.02


# -- the block_gemm lowering: Triton template, extern choices ---------------------------------


class Residual(nn.Module):
    def __init__(self, k, n, bias):
        super().__init__()
        self.proj = nn.Linear(k, n, bias=bias)

    def forward(self, x, r):
        return self.proj(x) + r


def _call_sequence(code: str) -> list[str]:
    body = code[code.index("def call(") :]
    seq = []
    for line in body.splitlines():
        if "extern_kernels.fp8fx_block_gemm(" in line:
            seq.append("extern")
        elif (m := re.search(r"\b(triton_\w+)\.run\(", line)) is not None:
            seq.append(m.group(1))
    return seq


@pytest.mark.parametrize("scale_fmt", ["float32", "ue8m0"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m,n,k", [(256, 384, 512), (200, 320, 272), (1000, 256, 768)])
def test_template_matches_reference_and_fuses_the_residual(m, n, k, bias, scale_fmt):
    from torch._inductor.utils import run_and_get_code

    config = BlockFP8Config(scale_fmt=scale_fmt, kernel="triton")
    torch.manual_seed(0)
    model = Residual(k, n, bias).to("cuda", BF16).eval().requires_grad_(False)
    fp8fx.quantize_(model, BlockFP8Config(scale_fmt=scale_fmt))
    x = heavy_tailed(m, k, dtype=BF16, seed=m).cuda()
    x[3] = 0
    r = torch.randn(m, n, dtype=BF16, device="cuda")
    compiled = torch.compile(model, backend=backend_with(config=config), fullgraph=True)
    with torch.no_grad():
        y, codes = run_and_get_code(compiled, x, r)
    assert counters["fp8fx"]["block_gemm_template_default"] == 1
    seq = _call_sequence(codes[0])
    # The quant kernel of x, then the template with the residual add fused into its store.
    assert "extern" not in seq and len(seq) == 2 and seq[1].startswith("triton_tem"), seq
    w = model.proj.weight
    expect = R.linear(x, w.qdata, w.scale, model.proj.bias, None, (128, 128)).float() + r.float()
    assert rel_err(y, expect) < 3e-3


@pytest.mark.parametrize("m,n,k", [(2048, 4096, 4096), (64, 2112, 7168), (7, 4096, 4096)])
def test_max_autotune_choices(m, n, k):
    torch.manual_seed(0)
    model = Residual(k, n, True).to("cuda", BF16).eval().requires_grad_(False)
    fp8fx.quantize_(model)
    x = torch.randn(m, k, dtype=BF16, device="cuda")
    r = torch.randn(m, n, dtype=BF16, device="cuda")
    compiled = torch.compile(model, backend=backend_with(mode="max-autotune-no-cudagraphs"), fullgraph=True)
    with torch.no_grad():
        y = compiled(x, r)
    assert counters["fp8fx"]["block_gemm_autotuned"] == 1
    assert counters["fp8fx"].get("block_gemm_template_failed", 0) == 0
    w = model.proj.weight
    expect = R.linear(x, w.qdata, w.scale, model.proj.bias, None, (128, 128)).float() + r.float()
    assert rel_err(y, expect) < 3e-3


def test_default_static_prefill_takes_cublas_extern():
    # Llama-3-8B's o_proj at 2048 tokens: the measured table says cuBLAS.
    model = Residual(4096, 4096, False).to("cuda", BF16).eval().requires_grad_(False)
    fp8fx.quantize_(model)
    x = torch.randn(2048, 4096, dtype=BF16, device="cuda")
    r = torch.randn(2048, 4096, dtype=BF16, device="cuda")
    with torch.no_grad():
        y = torch.compile(model, backend=backend, fullgraph=True)(x, r)
    assert counters["fp8fx"]["block_gemm_cublas_default"] == 1
    w = model.proj.weight
    assert rel_err(y, R.linear(x, w.qdata, w.scale, None, None, (128, 128)).float() + r.float()) < 3e-3


# -- fp8fx.rms_norm_quant: (residual add +) RMSNorm + quant in one kernel ----------------------


@pytest.mark.parametrize(
    "shape,residual,ue8m0,dtype",
    [((2048, 4096), True, False, BF16), ((3, 7168), False, True, BF16), ((1, 2048), True, False, torch.float16),
     ((5, 16384), True, False, BF16), ((2, 300, 1024), True, True, BF16)],
)
def test_rms_norm_quant_kernel_matches_reference(shape, residual, ue8m0, dtype):
    from conftest import check_norm_quant, norm_inputs
    from fp8fx.kernels.norm_quant import rms_norm_quant

    x, r, w = (t.cuda() if t is not None else None for t in norm_inputs(shape, dtype, seed=sum(shape), residual=residual,
                                                                        zero_rows=(1,)))
    q, s, h = rms_norm_quant(x, r, w, 1e-5, ue8m0)
    check_norm_quant(q, s, h, x, r, w, 1e-5, ue8m0)


@pytest.mark.parametrize("fused_norm,quant_kernels", [(None, True), (None, False), (False, True)])
def test_prefill_layer_norms_fused(fused_norm, quant_kernels):
    """A Llama decoder layer at 300 tokens (dynamic shapes, a prefill graph): by default
    (fused_norm=None: CUDA graphs) both RMSNorms run fp8fx.rms_norm_quant's kernel (the
    post-attention one with the residual add), so no Inductor kernel writing fp8 codes
    computes an RMSNorm: launched by Inductor as a user-defined kernel (its eps, a 0-dim CPU
    input under dynamic shapes, passed as a scalar), or with quant_kernels=False through the
    op's wrapper; the output matches eager fp8fx."""
    layer, h, kw = _llama_layer(tokens=300, seed=5)
    b = backend_with(fused_norm=fused_norm, quant_kernels=quant_kernels)
    _, y, expect, code = _compiled_layer(layer, h, kw, b, dynamic=True)
    fp8_writers = [src for name, src in kernel_sources(code).items() if "float8e4nv" in src]
    body = code[code.index("def call("):]
    if fused_norm is None:
        assert counters["fp8fx"]["norm_quant"] == 2 and counters["fp8fx"]["norm_quant_residual"] == 1
        assert not any("rsqrt" in src for src in fp8_writers)
        if quant_kernels:
            assert counters["fp8fx"]["quant_kernel_norm"] == 2 and "def _rms_norm_quant_kernel(" in code
            assert "fp8fx_rms_norm_quant" not in body and ".item()" in body, body
        else:
            assert body.count("extern_kernels.fp8fx_rms_norm_quant(") == 2  # the wrapper, not the dispatcher
    else:
        assert "rms_norm_quant" not in code and not counters["fp8fx"]["norm_quant"]
    assert rel_err(y, expect) < 0.02


@pytest.mark.parametrize("quant_kernels", [True, False])
def test_prefill_quant_kernels(quant_kernels):
    """A Llama decoder layer at 300 tokens (dynamic shapes): by default the SwiGLU product's
    and the attention output's quantizations run fp8fx's Triton kernel, compiled into
    Inductor's code and launched from its wrapper (passes/quant_kernel.py): no Inductor kernel
    writing fp8 codes computes the SiLU. The output matches eager fp8fx, at 300 tokens and at
    77 through the same graph."""
    layer, h, kw = _llama_layer(tokens=300, seed=7)
    compiled, y, expect, code = _compiled_layer(layer, h, kw, backend_with(quant_kernels=quant_kernels), dynamic=True)
    fp8_writers = [src for name, src in kernel_sources(code).items() if "float8e4nv" in src]
    body = code[code.index("def call("):]
    if quant_kernels:
        assert counters["fp8fx"]["quant_kernel_silu"] == 1 and counters["fp8fx"]["quant_kernel_attention"] == 1
        assert counters["fp8fx"]["quant_kernel_norm"] == 2
        assert "def _act_quant_kernel(" in code and body.count("_act_quant_kernel") >= 2, body
        assert not any("exp" in src for src in fp8_writers)
    else:
        assert "_act_quant_kernel" not in code and not counters["fp8fx"]["quant_kernel_silu"]
    _, h2, kw2 = _llama_layer(tokens=77, seed=8)
    with torch.no_grad():
        y2, e2 = compiled(h2, **kw2), layer(h2, **kw2)
    y2, e2 = (t[0] if isinstance(t, tuple) else t for t in (y2, e2))
    errs = rel_err(y, expect), rel_err(y2, e2)
    assert max(errs) < 0.02, errs


def test_prefill_packed_projections():
    """quantize_ packs q/k/v and gate/up into one buffer each, so a prefill (dynamic shapes)
    runs each group as one fp8fx_block_gemm_cat call, which runs one GEMM over the packed rows
    (kernels._joint_weight). The output matches eager fp8fx at 300 and 64 tokens. With
    freeze=False (weights read on every call), a weight replaced by a copy after the compile
    (no longer packed) makes the same graph run a GEMM per weight, still matching."""
    from fp8fx import kernels

    layer, h, kw = _llama_layer(tokens=300, seed=11)
    _, h2, kw2 = _llama_layer(tokens=64, seed=12)
    attn = layer.self_attn
    qkv = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
    for b in (backend, backend_with(freeze=False)):
        torch._dynamo.reset()
        counters.clear()
        kernels._JOINT.clear()
        compiled, y, expect, code = _compiled_layer(layer, h, kw, b, dynamic=True)
        body = code[code.index("def call("):]
        assert body.count("extern_kernels.fp8fx_block_gemm_cat(") == 2, body
        assert counters["fp8fx"]["block_gemm_cat_members"] == 5
        joint = kernels._joint_weight([w.qdata for w in qkv], [w.scale for w in qkv])
        assert joint is not None and joint[0].shape == (1024 + 2 * 256, 1024) and len(kernels._JOINT) == 2
        assert rel_err(y, expect) < 0.02
    with torch.no_grad():
        w = attn.k_proj.weight
        w.qdata, w.scale = w.qdata.clone(), w.scale.clone()
        assert kernels._joint_weight([w.qdata for w in qkv], [w.scale for w in qkv]) is None
        for inp, kwargs in ((h2, kw2), (h, kw)):
            got, want = compiled(inp, **kwargs), layer(inp, **kwargs)
            got, want = (t[0] if isinstance(t, tuple) else t for t in (got, want))
            assert rel_err(got, want) < 0.02


def test_user_kernels_write_only_their_outputs(monkeypatch):
    """Inductor analyses which arguments a user-defined Triton kernel writes (and treats every
    argument as written when the analysis fails: the norm's eps, a 0-dim CPU input, once made
    it fail). For each kernel passes/quant_kernel.py inserts, only its fresh outputs are."""
    from torch._higher_order_ops import triton_kernel_wrap as W

    found = []
    name = "identify_accessed_tensors" if hasattr(W, "identify_accessed_tensors") else "identify_mutated_tensors"
    analyse = getattr(W, name)

    def spy(kernel, kwargs, *args, **kw):
        out = analyse(kernel, kwargs, *args, **kw)
        writes = sorted(dep.name for dep in out.read_writes.writes) if hasattr(out, "read_writes") else sorted(out)
        found.append((kernel.fn.__name__, tuple(writes), "h_ptr" in kwargs and kwargs["HAS_RESIDUAL"]))
        return out

    monkeypatch.setattr(W, name, spy)
    layer, h, kw = _llama_layer(tokens=300, seed=9)
    _compiled_layer(layer, h, kw, backend, dynamic=True)
    expected = {("_act_quant_kernel", ("q_ptr", "s_ptr"), False), ("_rms_norm_quant_kernel", ("q_ptr", "s_ptr"), False),
                ("_rms_norm_quant_kernel", ("h_ptr", "q_ptr", "s_ptr"), True)}
    assert set(found) == expected, found
