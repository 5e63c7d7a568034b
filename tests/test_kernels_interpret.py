"""fp8fx.kernels on CPU: Triton kernels under TRITON_INTERPRET=1 against fp8fx.reference.

Triton picks interpreted or compiled when a kernel is decorated, i.e. when fp8fx.kernels is
first imported; another test file may already have imported it. So one launcher test re-runs
this file in a fresh interpreter with TRITON_INTERPRET=1, where the kernel tests run (and
check that they really are interpreted). Layout, dispatch and bad-input tests need no kernel
launch and run in both processes.

Legend: M tokens, N out_features, K in_features.
"""

import pytest
import torch

from conftest import INTERPRET_INNER as INNER, interpreted, run_interpreted
from fp8fx import reference


@pytest.mark.skipif(INNER, reason="this is the launcher")
def test_interpreted_suite():
    run_interpreted(__file__)


def _x(m, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-3, 2, k)[torch.randperm(k, generator=g)]
    if m > 2:
        x[1] = 0.0  # an all-zero token: AMAX_EPS scale, zero codes
        x[2, :: max(1, k // 7)] *= 300.0  # outliers
    return x.to(dtype)


def _bits(q):
    return q.view(torch.uint8)


# --- kernels, interpreted -------------------------------------------------------------------


@interpreted
def test_really_interpreted():
    from triton.runtime.interpreter import InterpretedFunction

    from fp8fx.kernels import act_quant, block_gemm, gemv

    assert isinstance(act_quant._act_quant_kernel, InterpretedFunction)
    assert isinstance(block_gemm._block_gemm_kernel, InterpretedFunction)
    assert isinstance(gemv._gemv_kernel, InterpretedFunction)


@interpreted
@pytest.mark.parametrize("m,k", [(1, 16), (5, 272), (33, 128), (3, 400)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_act_quant_bit_exact(m, k, dtype, ue8m0):
    from fp8fx.kernels.act_quant import act_quant

    x = _x(m, k, dtype, seed=m * 1000 + k)
    q, s = act_quant(x, ue8m0)
    q_ref, s_ref = reference.quantize_act(x, 128, "ue8m0" if ue8m0 else "float32")
    assert torch.equal(_bits(q), _bits(q_ref))
    assert torch.equal(s.view(torch.int32), s_ref.view(torch.int32))


@interpreted
@pytest.mark.parametrize("m", [1, 5, 8])
def test_act_quant_padded_col_major(m):
    from fp8fx.kernels.act_quant import act_quant

    x = _x(m, 272, torch.bfloat16, seed=m)
    q, s = act_quant(x, False, col_major=True, pad_rows=4)
    mp = (m + 3) // 4 * 4
    assert q.shape == (mp, 272) and s.shape == (mp, 3) and s.stride() == (1, mp)
    q_ref, s_ref = reference.quantize_act(x)
    assert torch.equal(_bits(q[:m]), _bits(q_ref)) and torch.equal(s[:m], s_ref)
    assert (_bits(q[m:]) == 0).all()
    assert torch.equal(s[m:], torch.full_like(s[m:], reference.amax_to_scale(torch.zeros(())).item()))


@interpreted
def test_act_quant_leading_dims_and_noncontiguous():
    from fp8fx.kernels.act_quant import act_quant

    x = _x(6, 288, torch.bfloat16, seed=7)[:, :272].reshape(2, 3, 272)  # row stride 288
    q, s = act_quant(x, True)
    q_ref, s_ref = reference.quantize_act(x, 128, "ue8m0")
    assert q.shape == (2, 3, 272) and s.shape == (2, 3, 3)
    assert torch.equal(_bits(q), _bits(q_ref)) and torch.equal(s, s_ref)


@interpreted
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_act_quant_static_bit_exact(dtype):
    from fp8fx.kernels.act_quant import act_quant_static

    x = _x(5, 272, dtype, seed=3)
    scale = torch.tensor(0.037)
    assert torch.equal(_bits(act_quant_static(x, scale)), _bits(reference.quantize_act_static(x, scale)))


def _weight(n, k, scale_fmt, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-2, 1, n).unsqueeze(1)
    return reference.quantize_weight(w, (128, 128), scale_fmt)


def _exact(xq, xs, wq, ws, bias):
    y = reference.dequantize_act(xq, xs).double() @ reference.dequantize_weight(wq, ws).double().t()
    return y if bias is None else y + bias.double()


def _rel(y, ref):
    return ((y.double() - ref).norm() / ref.norm().clamp(min=1e-30)).item()


GEMM_SHAPES = [(1, 16, 16), (5, 144, 272), (33, 144, 128), (33, 16, 272)]


@interpreted
@pytest.mark.parametrize("m,n,k", GEMM_SHAPES)
@pytest.mark.parametrize("scale_fmt", ["float32", "ue8m0"])
@pytest.mark.parametrize("cfg_name", ["m16n32", "m16n256_split2"])
def test_block_gemm(m, n, k, scale_fmt, cfg_name):
    from fp8fx.kernels.block_gemm import GemmConfig, block_gemm

    cfg = {"m16n32": GemmConfig(16, 32, 4, 1, split_k=1), "m16n256_split2": GemmConfig(16, 256, 4, 1, split_k=2)}[cfg_name]
    wq, ws = _weight(n, k, scale_fmt, seed=n + k)
    x = _x(m, k, torch.bfloat16, seed=m)
    xq, xs = reference.quantize_act(x, 128, scale_fmt)
    bias = torch.randn(n)
    y = torch.full((m, n), float("nan"))
    y = block_gemm(xq, xs, wq, ws, bias, torch.float32, config=cfg)
    assert torch.isfinite(y).all()
    assert _rel(y, _exact(xq, xs, wq, ws, bias)) < 1e-5
    yb = block_gemm(xq, xs, wq, ws, None, torch.bfloat16, config=cfg)
    # The interpreter casts fp32 -> bf16 toward zero (triton 3.9, even with
    # fp_downcast_rounding="rtne"): up to one bf16 ulp, 2**-7 relative. The GPU test holds 2e-3.
    assert yb.dtype == torch.bfloat16 and _rel(yb, _exact(xq, xs, wq, ws, None)) < 2**-7


@interpreted
@pytest.mark.parametrize("m,n,k", GEMM_SHAPES)
@pytest.mark.parametrize("scale_fmt", ["float32", "ue8m0"])
def test_block_gemm_fused_quant(m, n, k, scale_fmt):
    from fp8fx.kernels.block_gemm import GemmConfig, block_gemm

    wq, ws = _weight(n, k, scale_fmt, seed=k)
    x = _x(m, k, torch.bfloat16, seed=m + 1)
    y = block_gemm(x, None, wq, ws, None, torch.float32, config=GemmConfig(16, 64, 4, 1, split_k=1),
                   act_ue8m0=scale_fmt == "ue8m0")
    # Same codes as the reference quantizer, so the same exact product.
    xq, xs = reference.quantize_act(x, 128, scale_fmt)
    assert _rel(y, _exact(xq, xs, wq, ws, None)) < 1e-5
    ref = reference.linear(x.float(), wq, ws)
    assert _rel(y, ref.double()) < 1e-5


@interpreted
def test_block_gemm_static_scale_and_m0():
    from fp8fx.kernels.block_gemm import GemmConfig, block_gemm

    wq, ws = _weight(144, 272, "float32", seed=1)
    x = _x(5, 272, torch.float32, seed=2)
    a = torch.tensor(0.02)
    xq = reference.quantize_act_static(x, a)
    y = block_gemm(xq, a, wq, ws, None, torch.float32, config=GemmConfig(16, 32, 4, 1, split_k=1))
    assert _rel(y, _exact(xq, a, wq, ws, None)) < 1e-5
    assert block_gemm(xq[:0], a, wq, ws, None, torch.float32).shape == (0, 144)


@interpreted
def test_block_gemm_auto_split_k():
    from fp8fx.kernels.block_gemm import GemmConfig, block_gemm, pick_split_k

    cfg = GemmConfig(16, 64, 4, 1)
    assert pick_split_k(1, 64, 1024, cfg, 132) == 2  # 8 K blocks, >= 4 per split
    wq, ws = _weight(64, 1024, "ue8m0", seed=5)
    x = _x(1, 1024, torch.bfloat16, seed=5)
    xq, xs = reference.quantize_act(x, 128, "ue8m0")
    bias = torch.randn(64).bfloat16()
    y = block_gemm(xq, xs, wq, ws, bias, torch.float32, config=cfg)
    assert _rel(y, _exact(xq, xs, wq, ws, bias.float())) < 1e-5


# --- gemv (small M), interpreted -------------------------------------------------------------

# Dot with one program per N tile; dot with split-K 3 (ticketed reduction); a 256-wide tile
# (two weight scale rows per tile); the fp32-FMA path (M = 1; larger M takes the dot); two K
# blocks per iteration (K = 272 -> 3 blocks: the second split's second block is masked off);
# the FMA path with double-buffered weight loads; weight tiles through TMA descriptors (zero
# fill past N and K instead of masks), split and 256 wide.
GEMV_CONFIGS = {
    "dot_n64": dict(block_n=64, num_warps=4, num_stages=1, split_k=1),
    "dot_n32_split3": dict(block_n=32, num_warps=4, num_stages=1, split_k=3),
    "dot_n256_split2": dict(block_n=256, num_warps=4, num_stages=1, split_k=2),
    "fma_n32_split2": dict(block_n=32, num_warps=4, num_stages=1, split_k=2, use_dot=False),
    "dot_n64_split2_kbiter2": dict(block_n=64, num_warps=4, num_stages=1, split_k=2, kb_iter=2),
    "fma_n64_split2_double_buffer": dict(block_n=64, num_warps=4, num_stages=1, split_k=2, use_dot=False, kb_iter=2),
    "tma_n64_split2": dict(block_n=64, num_warps=4, num_stages=1, split_k=2, tma=True),
    "tma_n256": dict(block_n=256, num_warps=4, num_stages=1, split_k=1, tma=True),
}


def _gemv_x(m, k, dtype, seed):
    """Heavy-tailed tokens with planted outliers; token 1 all zeros (AMAX_EPS scale)."""
    from conftest import heavy_tailed

    x = heavy_tailed(m, k, seed=seed)
    if m > 1:
        x[1] = 0.0
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
    return x.to(dtype)


def _identity_weight(k):
    # w = I with UE8M0 scales: codes 256 on the diagonal, scale 2**-8, so every output is
    # exactly one activation code times its scale: y == reference.dequantize_act(q, s), bit
    # for bit, iff the kernel's codes and scales are the reference's.
    return reference.quantize_weight(torch.eye(k), (128, 128), "ue8m0")


@interpreted
@pytest.mark.parametrize("m,pre_quant", [(1, True), (1, False), (3, True), (16, True)])
@pytest.mark.parametrize("scale_fmt", ["float32", "ue8m0"])
@pytest.mark.parametrize("cfg_name,dtype", [(c, torch.bfloat16) for c in GEMV_CONFIGS]
                         + [("dot_n32_split3", torch.float16), ("dot_n32_split3", torch.float32)])
def test_gemv_quant_bit_exact(m, pre_quant, scale_fmt, cfg_name, dtype, monkeypatch):
    # M = 1 quantizes the program's K range before the K loop (gemv.PRE_QUANT), or per K block
    # in the loop; M = 3 and 16 (16 rows per program) always in the loop.
    from fp8fx.kernels import gemv as gemv_mod
    from fp8fx.kernels.gemv import GemvConfig, gemv

    monkeypatch.setattr(gemv_mod, "PRE_QUANT", pre_quant)

    k = 272  # 2 full K blocks + 16
    wq, ws = _identity_weight(k)
    x = _gemv_x(m, k, dtype, seed=m * 7 + len(cfg_name))
    y = gemv(x, None, wq, ws, None, torch.float32, config=GemvConfig(**GEMV_CONFIGS[cfg_name]),
             act_ue8m0=scale_fmt == "ue8m0")
    q_ref, s_ref = reference.quantize_act(x, 128, scale_fmt)
    # Value equality (a -0 code comes out of the sum as +0), every value exactly.
    assert torch.equal(y, reference.dequantize_act(q_ref, s_ref))


@interpreted
@pytest.mark.parametrize("m", [1, 16])
def test_gemv_static_quant_bit_exact(m):
    from fp8fx.kernels.gemv import GemvConfig, gemv

    wq, ws = _identity_weight(272)
    x = _gemv_x(m, 272, torch.bfloat16, seed=m) * 0.01
    a = torch.tensor(0.037)
    for cfg in (GemvConfig(64, 4, 1, split_k=1), GemvConfig(32, 4, 1, split_k=2, use_dot=False)):
        y = gemv(x, a, wq, ws, None, torch.float32, config=cfg)
        ref = reference.dequantize_act(reference.quantize_act_static(x, a), a)
        assert torch.equal(y, ref), cfg


def _elementwise_ok(y, xd, wd, bias, rtol):
    # |y - exact| <= rtol * (|x| @ |w|.T): a flipped activation code moves one product by
    # >= 1/16 of itself, far above this bound for these K.
    exact = xd.double() @ wd.double().t() + (0 if bias is None else bias.double())
    bound = rtol * (xd.double().abs() @ wd.double().abs().t()) + 1e-30
    return bool(((y.double() - exact).abs() <= bound).all()), _rel(y, exact)


@interpreted
@pytest.mark.parametrize("m,n,k", [(1, 144, 272), (3, 200, 400), (16, 16, 128)])
@pytest.mark.parametrize("scale_fmt", ["float32", "ue8m0"])
@pytest.mark.parametrize("cfg_name", list(GEMV_CONFIGS))
def test_gemv_linear(m, n, k, scale_fmt, cfg_name):
    from fp8fx.kernels.gemv import GemvConfig, gemv

    cfg = GemvConfig(**GEMV_CONFIGS[cfg_name])
    wq, ws = _weight(n, k, scale_fmt, seed=n + k)
    x = _gemv_x(m, k, torch.bfloat16, seed=m + n)
    bias = torch.randn(n) if m % 2 else None
    ue8m0 = scale_fmt == "ue8m0"
    xq, xs = reference.quantize_act(x, 128, scale_fmt)
    xd, wd = reference.dequantize_act(xq, xs), reference.dequantize_weight(wq, ws)
    y = gemv(x, None, wq, ws, bias, torch.float32, config=cfg, act_ue8m0=ue8m0)
    ok, rel = _elementwise_ok(y, xd, wd, bias, 1e-5)
    assert ok and rel < 1e-5, rel
    assert torch.isfinite(y).all()
    if m != 3:
        return
    yb = gemv(x, None, wq, ws, bias.bfloat16() if bias is not None else None, torch.bfloat16, config=cfg, act_ue8m0=ue8m0)
    # The interpreter casts fp32 -> bf16 toward zero (see test_block_gemm): 2**-7.
    assert yb.dtype == torch.bfloat16 and yb.shape == (m, n)
    assert _rel(yb, _exact(xq, xs, wq, ws, None if bias is None else bias.bfloat16().float())) < 2**-7


@interpreted
@pytest.mark.parametrize("cfg_name", ["dot_n64", "dot_n32_split3", "fma_n32_split2"])
def test_gemv_fp8_input(cfg_name):
    """Pre-quantized activations (the block_gemm route): row- and column-major scales, static."""
    from fp8fx.kernels.gemv import GemvConfig, gemv

    cfg = GemvConfig(**GEMV_CONFIGS[cfg_name])
    for m in (1, 3):
        wq, ws = _weight(144, 400, "float32", seed=m)
        x = _gemv_x(m, 400, torch.float32, seed=m)
        xq, xs = reference.quantize_act(x)
        for scales in (xs, xs.t().contiguous().t()):
            y = gemv(xq, scales, wq, ws, None, torch.float32, config=cfg)
            assert _rel(y, _exact(xq, xs, wq, ws, None)) < 1e-5
        a = torch.tensor(0.02)
        xq_s = reference.quantize_act_static(x * 0.01, a)
        y = gemv(xq_s, a, wq, ws, None, torch.float32, config=cfg)
        assert _rel(y, _exact(xq_s, a, wq, ws, None)) < 1e-5


@interpreted
def test_gemv_auto_config_and_edges():
    from fp8fx.kernels import dispatch
    from fp8fx.kernels.gemv import GemvConfig, gemv, pick_split

    assert pick_split(1, 4096, 4096, GemvConfig(128, 4, 4), 132) == 8  # 32 tiles -> 256 programs
    assert pick_split(1, 576, 7168, GemvConfig(128, 4, 4), 132) == 28  # 5 tiles, 2 K blocks each
    assert pick_split(1, 4096, 4096, GemvConfig(128, 4, 4, split_k=3), 132) == 3
    assert pick_split(1, 4096, 4096, GemvConfig(128, 4, 4, split_k=9), 132) == 8  # no empty split
    assert pick_split(1, 4096, 256, GemvConfig(128, 4, 4, split_k=5), 132) == 2
    wq, ws = _weight(64, 1024, "ue8m0", seed=5)
    x = _gemv_x(2, 1024, torch.bfloat16, seed=5)
    y = gemv(x, None, wq, ws, None, torch.float32, act_ue8m0=True)  # dispatch.gemv_config
    xq, xs = reference.quantize_act(x, 128, "ue8m0")
    assert isinstance(dispatch.gemv_config(2, 64, 1024, False), GemvConfig)
    assert _rel(y, _exact(xq, xs, wq, ws, None)) < 1e-5
    assert gemv(x[:0], None, wq, ws, None).shape == (0, 64)
    # M > 16: several token tiles
    x = _gemv_x(20, 1024, torch.bfloat16, seed=6)
    xq, xs = reference.quantize_act(x)
    wq, ws = _weight(64, 1024, "float32", seed=6)
    y = gemv(x, None, wq, ws, None, torch.float32, config=GemvConfig(64, 4, 1, split_k=2))
    assert _rel(y, _exact(xq, xs, wq, ws, None)) < 1e-5
    # Split-K tickets: the last program of each tile zeroes its ticket for the next launch.
    from fp8fx.kernels import gemv as gemv_mod

    assert gemv_mod._TICKETS[x.device].count_nonzero().item() == 0


@interpreted
@pytest.mark.parametrize("ns", [(144, 16, 200), (64, 144)])
@pytest.mark.parametrize("cfg_name", ["dot_n64", "dot_n32_split3", "dot_n256_split2", "fma_n32_split2", "tma_n64_split2"])
@pytest.mark.parametrize("scale_fmt", ["float32", "ue8m0"])
def test_gemv_cat(ns, cfg_name, scale_fmt):
    """One launch over 2-3 weights (q/k/v, gate/up) is torch.cat of the single gemvs, bit for
    bit (same config and split: every tile computes the same sums), for fp8 input with
    column-major scales and bf16 input quantized in the kernel; N not multiples of BLOCK_N."""
    from fp8fx.kernels.gemv import GemvConfig, gemv, gemv_cat

    cfg = GemvConfig(**GEMV_CONFIGS[cfg_name])
    k = 400
    weights = [_weight(n, k, scale_fmt, seed=n + i) for i, n in enumerate(ns)]
    ws, ss = [w for w, _ in weights], [s for _, s in weights]
    for m in (1, 3) if cfg.use_dot else (1,):
        x = _gemv_x(m, k, torch.bfloat16, seed=m + len(ns))
        xq, xs = reference.quantize_act(x, 128, scale_fmt)
        biases = [torch.randn(n) for n in ns] if m == 3 else None
        for xin, sin in ((xq, xs.t().contiguous().t()), (x, None)):
            y = gemv_cat(xin, sin, ws, ss, biases, torch.float32, config=cfg, act_ue8m0=scale_fmt == "ue8m0")
            parts = [gemv(xin, sin, w, s, None if biases is None else biases[i], torch.float32, config=cfg,
                          act_ue8m0=scale_fmt == "ue8m0") for i, (w, s) in enumerate(weights)]
            assert y.shape == (m, sum(ns))
            assert torch.equal(y, torch.cat(parts, -1)), (m, xin.dtype)
            exact = torch.cat([_exact(xq, xs, w, s, None if biases is None else biases[i])
                               for i, (w, s) in enumerate(weights)], -1)
            assert _rel(y, exact) < 1e-5
    from fp8fx.kernels import gemv as gemv_mod

    if cfg.split_k > 1:
        assert gemv_mod._TICKETS[x.device].count_nonzero().item() == 0


def _prologue_ref(kind, x, r, nw, eps):
    """The GEMM input of gemv_cat_rms_norm / gemv_cat_silu_mul in eager torch, and h."""
    if kind == "silu":
        return torch.nn.functional.silu(x) * r, None
    h = x if r is None else x + r
    return reference.rms_norm(h, nw, eps), h


def _prologue_inputs(kind, m, k, seed, dtype=torch.bfloat16):
    from conftest import norm_inputs

    x, r, nw = norm_inputs((m, k), dtype, seed=seed, residual=kind != "norm", zero_rows=(1,))
    if kind == "silu":  # gate and up as the two halves of one [M, 2K] GEMM output (strided rows)
        gu = torch.cat([x, r], -1)
        return gu[:, :k], gu[:, k:], None
    return x, r, nw


@interpreted
@pytest.mark.parametrize("kind", ["norm", "norm_residual", "silu"])
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("cfg_name,dtype", [(c, torch.bfloat16) for c in
                                            ("dot_n64", "dot_n32_split3", "fma_n32_split2", "tma_n64_split2")]
                         + [("dot_n32_split3", torch.float16)])
@pytest.mark.parametrize("scale_fmt", ["float32", "ue8m0"])
def test_gemv_cat_prologue_codes(kind, m, cfg_name, dtype, scale_fmt):
    """The fused RMSNorm (with and without the residual add) and SiLU * up prologues quantize
    what eager torch computes: through an identity weight the output is the dequantized
    codes, bit-exact with the reference but where the norm's fp32 sum of squares (added in
    another order) or the interpreter's exp moves a value across a rounding boundary; h
    exactly. Rows of heavy-tailed values with outliers, row 1 zeros; bf16 and fp16."""
    from fp8fx.kernels.gemv import GemvConfig, gemv, gemv_cat_rms_norm, gemv_cat_silu_mul

    if "fma" in cfg_name and m > 1:
        pytest.skip("the FMA path is M = 1 only")
    cfg = GemvConfig(**GEMV_CONFIGS[cfg_name])
    k, ue8m0 = 384, scale_fmt == "ue8m0"
    wq, ws = _identity_weight(k)
    x, r, nw = _prologue_inputs(kind, m, k, seed=m + len(cfg_name), dtype=dtype)
    if kind == "silu":
        y = gemv_cat_silu_mul(x, r, [wq], [ws], config=cfg, act_ue8m0=ue8m0, out_dtype=torch.float32)
        h = None
    else:
        y, h = gemv_cat_rms_norm(x, r, nw, 1e-5, [wq], [ws], config=cfg, act_ue8m0=ue8m0, out_dtype=torch.float32)
    xin, h_ref = _prologue_ref(kind, x, r, nw, 1e-5)
    q_ref, s_ref = reference.quantize_act(xin, 128, scale_fmt)
    ref = reference.dequantize_act(q_ref, s_ref)
    assert (y == ref).float().mean().item() >= 0.97, (y - ref).abs().max()
    assert _rel(y, ref.double()) < 0.02 and _rel(y, xin.double()) < 0.04
    if kind == "norm_residual":
        assert torch.equal(h, h_ref)
    elif kind == "norm":
        assert h.numel() == 0
    # The same launch through a real weight against the unfused input (gemv on eager's
    # product): within fp8 resolution.
    wq2, ws2 = _weight(144, k, scale_fmt, seed=3)
    y2 = (gemv_cat_silu_mul(x, r, [wq2], [ws2], config=cfg, act_ue8m0=ue8m0, out_dtype=torch.float32) if kind == "silu"
          else gemv_cat_rms_norm(x, r, nw, 1e-5, [wq2], [ws2], config=cfg, act_ue8m0=ue8m0, out_dtype=torch.float32)[0])
    unfused = gemv(xin, None, wq2, ws2, None, torch.float32, config=cfg, act_ue8m0=ue8m0)
    assert _rel(y2, unfused.double()) < 0.02


@interpreted
def test_gemv_cat_prologue_unfused_shapes_and_edges(monkeypatch):
    """Where the prologue cannot be fused (3+ rows: 16 rows per program; PRE_QUANT off; a
    row longer than NORM_MAX_ELEMS) the input is formed in torch first: same results as the
    reference composition, h written. Several weights with biases; no rows; no weights."""
    from fp8fx.kernels import gemv as gemv_mod
    from fp8fx.kernels.gemv import GemvConfig, gemv_cat, gemv_cat_rms_norm, gemv_cat_silu_mul

    cfg = GemvConfig(64, 4, 1, split_k=2)
    k = 256
    weights = [_weight(n, k, "float32", seed=n) for n in (144, 64)]
    ws, ss = [w for w, _ in weights], [s for _, s in weights]
    biases = [torch.randn(144), torch.randn(64)]
    for m, pre, max_elems in ((3, True, 8192), (1, False, 8192), (2, True, 256), (1, True, 8192)):
        monkeypatch.setattr(gemv_mod, "PRE_QUANT", pre)
        monkeypatch.setattr(gemv_mod, "NORM_MAX_ELEMS", max_elems)
        x, r, nw = _prologue_inputs("norm_residual", m, k, seed=m)
        y, h = gemv_cat_rms_norm(x, r, nw, 1e-6, ws, ss, biases, config=cfg, out_dtype=torch.float32)
        xin, h_ref = _prologue_ref("norm", x, r, nw, 1e-6)
        assert torch.equal(h, h_ref)
        assert _rel(y, gemv_cat(xin, None, ws, ss, biases, torch.float32, config=cfg).double()) < 0.02
        g, u, _ = _prologue_inputs("silu", m, k, seed=m)
        y = gemv_cat_silu_mul(g, u, ws, ss, biases, config=cfg)
        assert y.dtype == torch.bfloat16 and y.shape == (m, 208)
        xin, _ = _prologue_ref("silu", g, u, None, 0.0)
        assert _rel(y, gemv_cat(xin, None, ws, ss, biases, torch.float32, config=cfg).double()) < 0.02
    x, r, nw = _prologue_inputs("norm_residual", 2, k, seed=9)
    y, h = gemv_cat_rms_norm(x[:0], r[:0], nw, 1e-6, ws, ss)
    assert y.shape == (0, 208) and h.shape == (0, k)
    empty_w, empty_s = _weight(0, k, "float32", seed=1)
    y, h = gemv_cat_rms_norm(x, r, nw, 1e-6, [empty_w], [empty_s])
    assert y.shape == (2, 0) and torch.equal(h, x + r)
    with pytest.raises(ValueError, match="residual must match x"):
        gemv_cat_rms_norm(x, r[:1], nw, 1e-6, ws, ss)
    with pytest.raises(ValueError, match="norm_weight must be"):
        gemv_cat_rms_norm(x, r, nw.float(), 1e-6, ws, ss)
    with pytest.raises(TypeError, match="bf16/fp16"):
        gemv_cat_silu_mul(x.float(), r.float(), ws, ss)
    with pytest.raises(ValueError, match="1 to 3 weights"):
        gemv_cat_silu_mul(x, r, ws * 2, ss * 2)


@interpreted
def test_gemv_tma_route_and_fallback(monkeypatch):
    """tma configs load weight tiles through descriptors where TMA can address the weight
    (16-byte aligned start and row stride; a column slice of a wider weight too) and fall
    back to masked pointer loads where it cannot (an 8-byte aligned start); both give the
    pointer path's sums."""
    from fp8fx.kernels import gemv as gemv_mod
    from fp8fx.kernels.gemv import GemvConfig, gemv

    made = []
    real = gemv_mod._descriptor
    monkeypatch.setattr(gemv_mod, "_descriptor", lambda w, bn: made.append(tuple(w.stride())) or real(w, bn))
    tma, plain = GemvConfig(64, 4, 1, split_k=2, tma=True), GemvConfig(64, 4, 1, split_k=2)
    wide, wide_s = _weight(144, 416, "float32", seed=5)
    cases = [(*_weight(144, 400, "float32", seed=4), [(400, 1)]),
             (wide[:, :400], wide_s[:, :4], [(416, 1)]),  # strided rows: still TMA
             (wide[:, 8:408], wide_s[:, :4], [])]  # start 8 bytes off alignment: pointers
    for wq, ws, expect in cases:
        x = _gemv_x(3, 400, torch.bfloat16, seed=len(expect))
        made.clear()
        y = gemv(x, None, wq, ws, None, torch.float32, config=tma)
        assert made == expect
        assert torch.equal(y, gemv(x, None, wq, ws, None, torch.float32, config=plain))
        assert _rel(y, _exact(*reference.quantize_act(x), wq, ws, None)) < 1e-5


@interpreted
def test_gemv_cat_default_config_and_edges():
    from fp8fx.kernels.gemv import gemv_cat

    (w0, s0), (w1, s1) = _weight(256, 512, "float32", seed=1), _weight(128, 512, "float32", seed=2)
    x = _gemv_x(2, 512, torch.bfloat16, seed=3)
    xq, xs = reference.quantize_act(x)
    y = gemv_cat(xq, xs, [w0, w1], [s0, s1], None, torch.bfloat16)  # dispatch.gemv_config of (2, 384, 512)
    exact = torch.cat([_exact(xq, xs, w0, s0, None), _exact(xq, xs, w1, s1, None)], -1)
    assert y.dtype == torch.bfloat16 and _rel(y, exact) < 2**-7
    assert gemv_cat(xq[:0], xs[:0], [w0, w1], [s0, s1]).shape == (0, 384)
    y1 = gemv_cat(xq, xs, [w0], [s0], None, torch.float32)  # one weight: gemv
    assert _rel(y1, _exact(xq, xs, w0, s0, None)) < 1e-5


# --- no kernel launch: both processes -------------------------------------------------------


def test_cublas_weight_scale_layout():
    from fp8fx.kernels import cublas

    _, ws = _weight(576, 4480, "ue8m0", seed=0)  # nN = 5, nK = 35 -> L4 = 36
    p = cublas.prepare_weight_scale(ws)
    assert p.shape == (36, 5) and p.stride() == (1, 36) and p.dtype == torch.float32
    assert torch.equal(p[:35], ws.float().t()) and (p[35:] == 0).all()


def test_deepgemm_sm90_layouts():
    from fp8fx.kernels import deepgemm

    xs = torch.rand(5, 3)
    a = deepgemm.mn_major_tma_aligned(xs)
    assert a.shape == (5, 3) and a.stride() == (1, 8) and torch.equal(a, xs)
    assert deepgemm.prepare_act_scale(a) is a
    _, ws = _weight(256, 384, "ue8m0", seed=0)
    b = deepgemm.prepare_weight_scale(ws, 256, arch_major=9)
    assert b.dtype == torch.float32 and b.is_contiguous() and torch.equal(b, ws.float())


def test_deepgemm_sm100_ue8m0_packing():
    from fp8fx.kernels import deepgemm

    _, xs = reference.quantize_act(_x(7, 700, torch.float32, seed=1), 128, "ue8m0")  # 6 groups
    packed = deepgemm.pack_ue8m0_mn_major(xs)
    assert packed.dtype == torch.int32 and packed.shape == (7, 2) and packed.stride() == (1, 8)
    word = packed[2, 1].item() & 0xFFFFFFFF
    assert [(word >> (8 * j)) & 0xFF for j in range(2)] == [
        (xs[2, 4 + j].view(torch.int32).item() >> 23) & 0xFF for j in range(2)
    ]
    assert torch.equal(deepgemm.unpack_ue8m0_mn_major(packed, 6), xs)
    with pytest.raises(ValueError, match="power-of-two"):
        deepgemm.pack_ue8m0_mn_major(torch.full((2, 2), 0.3))
    # Weights: each block scale broadcast over its 128 rows (partial last block), then packed.
    n, k = 300, 640
    _, ws = _weight(n, k, "ue8m0", seed=2)
    sfb = deepgemm.prepare_weight_scale(ws, n, arch_major=10)
    expanded = reference.dequantize_weight(torch.ones(n, k, dtype=reference.FP8_DTYPE), ws)[:, ::128]
    assert torch.equal(deepgemm.unpack_ue8m0_mn_major(sfb, 5), expanded)


def test_deepgemm_load_fails_fast_offline(monkeypatch):
    import time

    from fp8fx.kernels import deepgemm

    deepgemm.load.cache_clear()
    monkeypatch.delenv("FP8FX_HUB_DOWNLOAD", raising=False)
    t0 = time.monotonic()
    first = deepgemm.load()
    assert time.monotonic() - t0 < 30
    if first is None:
        t0 = time.monotonic()
        assert deepgemm.load() is None and time.monotonic() - t0 < 0.01  # memoized
    assert not deepgemm.supports(128, 4096, 7168, torch.bfloat16, torch.device("cpu"))
    deepgemm.load.cache_clear()


def test_dispatch():
    from fp8fx.kernels import dispatch

    cpu = torch.device("cpu")
    for m in (1, 16, 64, 128, 300, 4096):
        assert dispatch.choose(m, 4096, 7168, torch.bfloat16, cpu) in ("gemv", "triton", "cublas")
        assert dispatch.choose(m, 4096, 7168, torch.bfloat16, cpu, fused_quant=True) in ("gemv", "triton", "triton_fused", "cublas")
    assert dispatch.choose(4096, 4096, 7168, torch.float32, cpu, pref="cublas") == "triton"
    assert dispatch.choose(4096, 4096, 7168, torch.bfloat16, cpu, static_act=True, pref="cublas") == "triton"
    assert dispatch.choose(4096, 4096, 7168, torch.bfloat16, cpu, pref="deepgemm") == "cublas"  # not loadable on CPU
    # Static activation scales: the gemv or the plain Triton GEMM (cuBLAS blockwise cannot).
    assert dispatch.choose(1, 4096, 7168, torch.bfloat16, cpu, static_act=True, fused_quant=True) in ("gemv", "triton")
    with dispatch.preference("triton"):
        assert dispatch.choose(4096, 4096, 7168, torch.bfloat16, cpu) == "triton"
        # The Triton family's decode route is the small-M kernel, GEMM alone and linear alike.
        assert dispatch.choose(1, 4096, 7168, torch.bfloat16, cpu) == "gemv"
        assert dispatch.choose(16, 4096, 7168, torch.float32, cpu, fused_quant=True, static_act=True) == "gemv"
        assert dispatch.choose(64, 4096, 7168, torch.bfloat16, cpu, fused_quant=True) == "triton"
    with dispatch.preference("cublas"):  # cuBLAS cannot take static scales: the Triton family
        assert dispatch.choose(1, 4096, 7168, torch.bfloat16, cpu, static_act=True, fused_quant=True) == "gemv"
    # The measured gemv configs: one (GEMM alone, linear) pair per small-M shape.
    from fp8fx.kernels.gemv import GemvConfig

    for (m, n, k), (gemm_cfg, linear_cfg) in dispatch.GEMV_MEASURED.items():
        assert m <= 16 and isinstance(gemm_cfg, GemvConfig) and isinstance(linear_cfg, GemvConfig)
        assert dispatch.gemv_config(m, n, k, True) == gemm_cfg and dispatch.gemv_config(m, n, k, False) == linear_cfg
    assert dispatch.gemv_config(1, 5000, 3000, True).split_k == 0  # unmeasured (N, K): the split rule
    with pytest.raises(ValueError, match="preference"):
        dispatch.set_preference("fastest")


def test_bad_inputs():
    from fp8fx.kernels import linear_cuda as linear
    from fp8fx.kernels.act_quant import act_quant
    from fp8fx.kernels.block_gemm import block_gemm

    wq, ws = _weight(32, 48, "float32", seed=0)
    xq, xs = reference.quantize_act(torch.randn(4, 48))
    with pytest.raises(ValueError, match="multiple of 16"):
        block_gemm(xq[:, :40], xs, wq[:, :40], ws, None)
    with pytest.raises(RuntimeError, match="several devices"):
        block_gemm(xq, xs, wq.to("meta"), ws.to("meta"), None)
    with pytest.raises(TypeError, match="fp8"):
        block_gemm(xq.float(), xs, wq, ws, None)
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        act_quant(torch.zeros(2, 16, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="CUDA"):
        linear(torch.randn(4, 48), wq, ws, None, None, [128, 128])
    from fp8fx.kernels.gemv import gemv

    with pytest.raises(ValueError, match="multiple of 16"):
        gemv(torch.randn(1, 40), None, wq[:, :40], ws, None)
    with pytest.raises(TypeError, match="fp8 e4m3 weight"):
        gemv(torch.randn(1, 48), None, wq.float(), ws, None)
    with pytest.raises(ValueError, match="needs its scales"):
        gemv(xq, None, wq, ws, None)
    with pytest.raises(ValueError, match="activation scale"):
        gemv(xq, xs[:, :0], wq, ws, None)
    with pytest.raises(ValueError, match="bias"):
        gemv(torch.randn(1, 48), None, wq, ws, torch.zeros(31))
    with pytest.raises(RuntimeError, match="several devices"):
        gemv(torch.randn(1, 48), None, wq.to("meta"), ws.to("meta"), None)
    from fp8fx.kernels.gemv import gemv_cat

    w2, s2 = _weight(16, 64, "float32", seed=1)
    with pytest.raises(ValueError, match="a has K=48, b has K=64"):
        gemv_cat(xq[:1], xs[:1], [wq, w2], [ws, s2])
    with pytest.raises(ValueError, match="1 to 3 weights"):
        gemv_cat(xq[:1], xs[:1], [wq] * 4, [ws] * 4)
    with pytest.raises(ValueError, match="1 to 3 weights"):
        gemv_cat(xq[:1], xs[:1], [], [])
    with pytest.raises(ValueError, match="every weight or for none"):
        gemv_cat(xq[:1], xs[:1], [wq, wq], [ws, ws], [torch.zeros(32), None])
    with pytest.raises(TypeError, match="share one dtype"):
        gemv_cat(xq[:1], xs[:1], [wq, wq], [ws, ws.to(reference.E8M0_DTYPE)])
    if not INNER:
        with pytest.raises(RuntimeError, match="CUDA"):
            act_quant(torch.randn(4, 48))
