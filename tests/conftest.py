import contextlib

import pytest
import torch
from torch._dynamo.utils import counters

from fp8fx import reference


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def heavy_tailed(*shape, dtype=torch.float32, seed=0, outliers=True):
    """Student-t(2) values with a few planted outliers 1000x the typical magnitude."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*shape, generator=g)
    chi = torch.randn(*shape, 2, generator=g).pow(2).mean(-1).sqrt()
    x = z / chi.clamp_min(1e-3)
    if outliers:
        idx = torch.randint(0, x.numel(), (max(1, x.numel() // 1000),), generator=g)
        x.view(-1)[idx] *= 1000.0
    return x.to(dtype)


def topk_rows(shape, dtype, seed):
    """Heavy-tailed rows with ties, zeros of both signs, infinities and NaN planted."""
    if 0 in shape:
        return torch.empty(shape, dtype=dtype)
    x = heavy_tailed(*shape, seed=seed)
    flat = x.view(-1, shape[-1])
    c = shape[-1]
    if c >= 8:
        flat[0, 1] = flat[0, 5] = flat[0, 0]  # a three-way tie
        flat[0, 2], flat[0, 3] = 0.0, -0.0
    if flat.shape[0] > 1 and c >= 4:
        flat[1, 0], flat[1, 2], flat[1, 3] = float("inf"), float("-inf"), float("nan")
    if flat.shape[0] > 2:
        flat[2] = 0.0  # an all-zero row: every pick a tie
    return x.to(dtype)


def check_topk(values, indices, x, k):
    """torch.topk's answer, up to the order among equal values (torch leaves it open; fp8fx
    takes the lower column first): the same values bit for bit (NaN: in the same places;
    torch may return another NaN payload than x's), the indices of x's elements."""
    ref_v, _ = torch.topk(x, k, dim=-1)
    assert values.dtype == x.dtype and indices.dtype == torch.int64
    as_int = {2: torch.int16, 4: torch.int32}[x.element_size()]
    nan = values.isnan()
    assert torch.equal(nan, ref_v.isnan())
    assert torch.equal(values.view(as_int)[~nan], ref_v.view(as_int)[~nan])
    assert torch.equal(torch.gather(x, -1, indices).view(as_int), values.view(as_int))  # x's own bits
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all()  # distinct columns per row
    # Among equal values, lower columns first.
    same = values[..., 1:] == values[..., :-1]
    assert (indices[..., 1:] > indices[..., :-1])[same].all()


def make_tiny_llama(layers: int = 2):
    """A transformers LlamaForCausalLM (hidden 256, GQA 4/2 heads, vocab 512), bf16, seed 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(torch.bfloat16).eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_experts=4,
        num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=512, max_position_embeddings=256, experts_implementation="eager",
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(config).to(torch.bfloat16).eval()


def run_interpreted(test_file: str) -> None:
    """Re-run ``test_file`` in a fresh interpreter with TRITON_INTERPRET=1.

    Triton decides interpreted vs compiled when a kernel is decorated, i.e. at the first
    import of fp8fx.kernels, which another test file may already have done. The inner run
    sets FP8FX_INTERPRET_INNER=1; kernel tests there are marked with ``interpreted``.
    """
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", FP8FX_INTERPRET_INNER="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test_file],
        cwd=root, env=env, capture_output=True, text=True, timeout=900,
    )
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    summary = r.stdout.strip().splitlines()[-1]
    # Only launchers and CPU-device checks are skipped there; the kernel tests must all run.
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary


def kernel_sources(code: str) -> dict[str, str]:
    """Inductor's generated code -> {Triton kernel name: its source} (tests/test_backend_gpu.py,
    scripts/probe_persistent_norm.py)."""
    import re

    out = {}
    for name in re.findall(r"^(triton_\w+) = async_compile", code, re.M):
        src = code[code.index(name + " = async_compile") :]
        out[name] = src[: src.index("device_str")]
    return out


def compile_post_grad(model, *args, kwargs=None, dynamic=True, **options):
    """(model's output, the normalized post-grad graph fp8fx.backend_with(**options) compiles)
    under fullgraph, ``dynamic`` shapes and no_grad; fresh Dynamo state and counters."""
    from torch._dynamo.utils import counters

    from fp8fx.backend import backend_with
    from fp8fx.explain import format_graph, post_grad_backend

    graphs: list = []
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        out = torch.compile(model, backend=post_grad_backend(backend_with(**options), graphs), fullgraph=True,
                            dynamic=dynamic)(*args, **(kwargs or {}))
    assert len(graphs) == 1
    text = format_graph(graphs[0])  # before the reset, which clears the user-kernel side table
    torch._dynamo.reset()
    return out, text


INTERPRET_INNER = __import__("os").environ.get("FP8FX_INTERPRET_INNER") == "1"
interpreted = pytest.mark.skipif(not INTERPRET_INNER, reason="runs in the TRITON_INTERPRET=1 subprocess")


# -- fp8fx::rms_norm_quant (tests/test_norm_quant.py, tests/test_backend_gpu.py) ------------


def norm_inputs(shape, dtype, seed, residual=True, zero_rows=()):
    """(x, residual or None, weight) for an RMSNorm over shape[-1]: heavy-tailed x with
    outliers, the rows ``zero_rows`` zero in x and the residual."""
    x = heavy_tailed(*shape, seed=seed, outliers=0 not in shape).to(dtype)  # Student-t with planted outliers
    rows = x.numel() // shape[-1] if shape[-1] else 0
    zero_rows = [i for i in zero_rows if i < rows]
    for i in zero_rows:
        x.view(-1, shape[-1])[i] = 0
    r = heavy_tailed(*shape, seed=seed + 1, outliers=False).to(dtype) if residual else None
    if r is not None:
        for i in zero_rows:
            r.view(-1, shape[-1])[i] = 0
    w = (1 + 0.5 * torch.randn(shape[-1], generator=torch.Generator().manual_seed(seed + 2))).to(dtype)
    return x, r, w


def check_norm_quant(q, s, h, x, r, w, eps, ue8m0):
    """fp8fx::rms_norm_quant's outputs against reference.rms_norm_quant: h exactly; the scales and codes
    exactly but for rows whose fp32 sum of squares (summed in another order) moved a
    normalized value across a rounding boundary; those rows stay within fp8 resolution."""
    q_ref, s_ref, h_ref = reference.rms_norm_quant(x, r, w, eps, 128, "ue8m0" if ue8m0 else "float32")
    k = x.shape[-1]
    assert q.shape == x.shape and q.dtype == reference.FP8_DTYPE and s.shape == (*x.shape[:-1], k // 128)
    m = x.numel() // k
    assert s.stride(-1) == m and (m <= 1 or s.reshape(m, k // 128).stride() == (1, m))  # column-major over the rows
    if r is not None:
        assert torch.equal(h, h_ref)
    else:
        assert h.numel() == 0
    if m == 0:
        return
    rows_q = (q.view(torch.uint8) != q_ref.view(torch.uint8)).reshape(m, -1).any(-1)
    rows_s = (s != s_ref).reshape(m, -1).any(-1)
    assert (rows_q | rows_s).float().mean().item() <= 0.1, "most rows are bit-exact"
    y = reference.rms_norm(h_ref, w, eps)
    assert rel_err(reference.dequantize_act(q, s), y) < 0.04  # fp8 e4m3: ~2**-4 relative per value
    assert rel_err(reference.dequantize_act(q, s), reference.dequantize_act(q_ref, s_ref)) < 0.02


@contextlib.contextmanager
def fresh_compile():
    """No FX-graph / AOT cache hits (they would skip the passes whose counters we check),
    fresh counters and Dynamo state; config restored on exit."""
    torch._dynamo.reset()
    counters.clear()
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        yield
    torch._dynamo.reset()
