"""fp8fx.kernels on the GPU: every backend against fp8fx.reference (marked gpu, skipped without CUDA).

Legend: M tokens, N out_features, K in_features. Outputs come from the caching allocator
after it has been filled with NaN ("poisoned"), so an unwritten element shows as NaN.
"""

import dataclasses

import pytest
import torch

from fp8fx import reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# shapes.json dense "edge" set, small DSV3/Llama shapes, and a large one per class.
SHAPES = [
    (1, 576, 7168), (7, 2112, 7168), (300, 4096, 4480),
    (1, 4096, 4096), (16, 6144, 4096), (64, 2112, 7168), (128, 7168, 2048),
    (2048, 4096, 4096), (33, 144, 272),
]


def _poison():
    torch.empty(256 * 2**20, dtype=torch.float32, device="cuda").fill_(float("nan"))


def _x(m, k, dtype=torch.bfloat16, seed=0, outliers=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g)
    if outliers:
        x = x * torch.exp2(torch.randint(-12, 12, (m, k), device="cuda", generator=g).float())
        x[:, ::97] *= 1000.0
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)  # stay finite in fp16
    return x.to(dtype)


def _weight(n, k, scale_fmt, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.05
    return reference.quantize_weight(w, (128, 128), scale_fmt)


def _rel(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


def _exact_linear(x, wq, ws, bias, scale_fmt):
    # Quantize with the reference on the CPU (the oracle; see test_reference_cuda_vs_cpu),
    # then the exact product in fp64 on the GPU.
    xq, xs = reference.quantize_act(x.cpu(), 128, scale_fmt)
    xd = reference.dequantize_act(xq, xs).double().cuda()
    y = xd @ reference.dequantize_weight(wq, ws).double().t()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("m,k", [(1, 7168), (7, 4480), (300, 272), (4096, 7168)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_act_quant_bit_exact(m, k, dtype, ue8m0):
    from fp8fx.kernels.act_quant import act_quant

    x = _x(m, k, dtype, seed=m + k, outliers=True)
    x[0] = 0.0
    q_ref, s_ref = reference.quantize_act(x.cpu(), 128, "ue8m0" if ue8m0 else "float32")
    _poison()
    q, s = act_quant(x, ue8m0)
    assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(s.cpu().view(torch.int32), s_ref.view(torch.int32))
    _poison()
    qp, sp = act_quant(x, ue8m0, col_major=True, pad_rows=4)
    assert sp.stride() == (1, qp.shape[0]) and qp.shape[0] % 4 == 0
    assert torch.equal(qp[:m].cpu().view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(sp[:m].cpu(), s_ref)


@pytest.mark.parametrize("m,k", [(1, 14336), (300, 1536), (2048, 14336), (5, 768)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_silu_mul_quant_bit_exact(m, k, dtype, ue8m0):
    """silu(g) * u quantized in one pass, g and u the halves of one [M, 2K] GEMM output: the
    codes and scales of eager torch's product (on the GPU) quantized by the reference."""
    from fp8fx.kernels.act_quant import silu_mul_quant

    # heavy-tailed with outliers; fp16 scaled down so that the products stay finite (an inf
    # product makes its group's scale inf: codes of inf / inf, outside the numerics contract)
    gu = _x(m, 2 * k, dtype, seed=m + k, outliers=True) * (4 if dtype == torch.bfloat16 else 1 / 1024)
    gu[0, :128] = 0.0
    g, u = gu[:, :k], gu[:, k:]
    q_ref, s_ref = reference.quantize_act(torch.nn.functional.silu(g) * u, 128, "ue8m0" if ue8m0 else "float32")
    _poison()
    q, s = silu_mul_quant(g, u, ue8m0, col_major=True)
    assert s.stride() == (1, m)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(s, s_ref)


def test_act_quant_static_bit_exact():
    from fp8fx.kernels.act_quant import act_quant_static

    x = _x(300, 4480, seed=3, outliers=True)
    a = torch.tensor(0.01, device="cuda")
    assert torch.equal(act_quant_static(x, a).cpu().view(torch.uint8),
                       reference.quantize_act_static(x.cpu(), a.cpu()).view(torch.uint8))


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("scale_fmt", ["float32", "ue8m0"])
@pytest.mark.parametrize("backend", ["triton", "triton_fused", "gemv", "cublas", "auto"])
def test_linear_backends(m, n, k, scale_fmt, backend):
    from fp8fx.kernels import dispatch, linear_cuda

    wq, ws = _weight(n, k, scale_fmt, seed=n)
    bias = torch.randn(n, device="cuda").bfloat16() if m % 2 else None
    x = _x(m, k, seed=m, outliers=(n % 3 == 0))
    ref = _exact_linear(x, wq, ws, None if bias is None else bias.float(), scale_fmt)
    pref = "triton" if backend in ("triton_fused", "gemv") else backend
    saved = dict(dispatch.AUTO_LINEAR)
    try:
        if backend in ("triton", "triton_fused", "gemv"):
            dispatch.AUTO_LINEAR.update({c: backend for c in saved})
        dispatch._choose.cache_clear()  # memoized choices read the table just changed
        with dispatch.preference(pref):
            if backend != "auto":
                assert dispatch.choose(m, n, k, x.dtype, x.device, fused_quant=True) in (backend, "triton")
            _poison()
            y = linear_cuda(x, wq, ws, bias, None, [128, 128])
    finally:
        dispatch.AUTO_LINEAR.update(saved)
        dispatch._choose.cache_clear()
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    assert torch.isfinite(y).all()
    assert _rel(y, ref) <= 2e-3


@pytest.mark.parametrize("m,n,k", [(1, 576, 7168), (64, 2112, 7168), (2048, 4096, 4096)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_block_gemm_out_dtypes_and_split_k(m, n, k, out_dtype):
    from fp8fx.kernels.act_quant import act_quant
    from fp8fx.kernels.block_gemm import GemmConfig, block_gemm

    wq, ws = _weight(n, k, "ue8m0")
    x = _x(m, k, seed=5)
    xq, xs = act_quant(x, True)
    ref = reference.dequantize_act(xq, xs).double() @ reference.dequantize_weight(wq, ws).double().t()
    for cfg in (None, GemmConfig(16, 64, 4, 4, split_k=4), GemmConfig(64, 256, 4, 3, split_k=1)):
        _poison()
        y = block_gemm(xq, xs, wq, ws, None, out_dtype, config=cfg)
        assert torch.isfinite(y).all()
        # Hopper's fp8 wgmma accumulates with ~14 mantissa bits inside one 128-wide K block
        # (DeepSeek-V3 report; measured here: 1.3e-4 for Triton and cuBLAS alike), so even
        # an fp32 output is ~1e-4 from the exact product; the bound is 2e-3.
        tol = 5e-4 if out_dtype == torch.float32 else 2e-3
        assert _rel(y, ref) <= tol, cfg


def test_ops_registered_and_static_scale():
    from fp8fx import ops
    from fp8fx.kernels import register

    register()
    wq, ws = _weight(2112, 7168, "float32")
    x = _x(15, 7168).reshape(3, 5, 7168)
    y = torch.ops.fp8fx.linear(x, wq, ws, None, None, [128, 128])
    ref = reference.linear(x.cpu(), wq.cpu(), ws.cpu())
    assert y.shape == (3, 5, 2112) and _rel(y.float().cpu(), ref.double()) <= 2e-3
    a = torch.tensor(0.02, device="cuda")
    y = torch.ops.fp8fx.linear(x, wq, ws, None, a, [128, 128])
    assert _rel(y.float().cpu(), reference.linear(x.cpu(), wq.cpu(), ws.cpu(), None, a.cpu()).double()) <= 2e-3
    q, s = torch.ops.fp8fx.act_quant(x, 128, True)
    q_ref, s_ref = reference.quantize_act(x.cpu(), 128, "ue8m0")
    assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s.cpu(), s_ref)
    for pref in ("triton", "cublas"):
        from fp8fx.kernels import dispatch

        with dispatch.preference(pref):
            y = torch.ops.fp8fx.block_gemm(q, s, wq, ws, None, [128, 128], torch.bfloat16)
        ref = reference.dequantize_act(q_ref, s_ref) @ reference.dequantize_weight(wq.cpu(), ws.cpu()).t()
        assert y.shape == (3, 5, 2112) and _rel(y.float().cpu(), ref.double()) <= 2e-3, pref
    assert ops._cuda_impl["linear"] is not None


def test_bad_inputs_cuda():
    from fp8fx.kernels import linear_cuda

    wq, ws = _weight(256, 256, "float32")
    assert linear_cuda(_x(0, 256), wq, ws, None, None, [128, 128]).shape == (0, 256)
    with pytest.raises(RuntimeError, match="CUDA"):
        linear_cuda(_x(4, 256).cpu(), wq, ws, None, None, [128, 128])
    wq40 = torch.zeros(256, 40, dtype=reference.FP8_DTYPE, device="cuda")
    with pytest.raises(ValueError, match="multiple of 16"):
        linear_cuda(_x(4, 40), wq40, ws[:, :1].contiguous(), None, None, [128, 128])
    xt = _x(256, 8).t()  # non-contiguous [8, 256]
    y = linear_cuda(xt, wq, ws, None, None, [128, 128])
    assert _rel(y, _exact_linear(xt.contiguous(), wq, ws, None, "float32")) <= 2e-3


def test_reference_cuda_vs_cpu():
    """Does fp8fx.reference quantize identically on CUDA and on the CPU?"""
    x = _x(512, 7168, seed=11)
    for fmt in ("float32", "ue8m0"):
        q_gpu, s_gpu = reference.quantize_act(x, 128, fmt)
        q_cpu, s_cpu = reference.quantize_act(x.cpu(), 128, fmt)
        codes = (q_gpu.cpu().view(torch.uint8) != q_cpu.view(torch.uint8)).float().mean().item()
        scales = (s_gpu.cpu().view(torch.int32) != s_cpu.view(torch.int32)).float().mean().item()
        print(f"reference {fmt}: CUDA vs CPU differ in {codes:.2e} of codes, {scales:.2e} of scales")
        assert scales == 0.0 and codes == 0.0, (fmt, codes, scales)


@pytest.mark.parametrize("pref", ["auto", "cublas", "triton"])
def test_linear_under_inference_mode(pref):
    """Weights made and used under torch.inference_mode (no version counters) on every route."""
    from fp8fx.kernels import dispatch

    with torch.inference_mode(), dispatch.preference(pref):
        w = torch.randn(4096, 4096, device="cuda") * 0.02
        wq, ws = reference.quantize_weight(w)
        x = _x(128, 4096)
        for _ in range(2):  # the second call hits the prepared-scale cache
            y = torch.ops.fp8fx.linear(x, wq, ws, None, None, [128, 128])
        assert _rel(y, _exact_linear(x, wq, ws, None, "float32")) <= 2e-3


# --- gemv (small M) ---------------------------------------------------------------------------
# Configs: the tensor-core paths (wgmma at block_n >= 64, mma.sync at 32), the fp32-FMA path
# (M = 1), each with and without a ticketed split-K, weight tiles through TMA descriptors; every
# gemv.CONFIGS entry in test_gemv_configs.


def _gemv_cfgs():
    from fp8fx.kernels.gemv import GemvConfig

    return [GemvConfig(64, 4, 4, split_k=1), GemvConfig(32, 4, 4, split_k=3), GemvConfig(128, 4, 4, split_k=5),
            GemvConfig(32, 4, 4, split_k=3, use_dot=False),
            GemvConfig(128, 4, 3, split_k=4, pdl=True, prefetch=4), GemvConfig(128, 8, 3, split_k=2, use_dot=False, pdl=True),
            GemvConfig(128, 4, 3, split_k=3, kb_iter=2), GemvConfig(128, 8, 3, split_k=3, use_dot=False, kb_iter=2),
            GemvConfig(64, 4, 3, split_k=3, tma=True), GemvConfig(128, 4, 4, split_k=1, pdl=True, tma=True)]


def _identity(k):
    # w = I with UE8M0 scales (codes 256, scale 2**-8): each output is exactly one activation
    # code times its scale, so the output equals the CPU reference's dequantized activations
    # iff the fused quantization produced the reference's codes and scales.
    return reference.quantize_weight(torch.eye(k, device="cuda"), (128, 128), "ue8m0")


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("scale_fmt", ["float32", "ue8m0"])
def test_gemv_quant_bit_exact(m, scale_fmt, tma_eager):
    from fp8fx.kernels.gemv import gemv

    k = 4496  # 35 full K blocks + 16
    wq, ws = _identity(k)
    x = _x(m, k, seed=m + k, outliers=True)
    x[-1] = 0.0
    q_ref, s_ref = reference.quantize_act(x.cpu(), 128, scale_fmt)
    expected = reference.dequantize_act(q_ref, s_ref)
    for cfg in _gemv_cfgs():
        _poison()
        y = gemv(x, None, wq, ws, None, torch.float32, config=cfg, act_ue8m0=scale_fmt == "ue8m0")
        assert torch.equal(y.cpu(), expected), cfg


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("scale_fmt", ["float32", "ue8m0"])
def test_gemv_quant_bit_exact_dtypes(dtype, scale_fmt):
    from fp8fx.kernels.gemv import GemvConfig, gemv

    wq, ws = _identity(4496)
    x = _x(3, 4496, dtype, seed=1, outliers=True)
    q_ref, s_ref = reference.quantize_act(x.cpu(), 128, scale_fmt)
    y = gemv(x, None, wq, ws, None, torch.float32, config=GemvConfig(128, 4, 4, split_k=5), act_ue8m0=scale_fmt == "ue8m0")
    assert torch.equal(y.cpu(), reference.dequantize_act(q_ref, s_ref))


@pytest.mark.parametrize("m", [1, 16])
def test_gemv_static_quant_bit_exact(m, tma_eager):
    from fp8fx.kernels.gemv import gemv

    wq, ws = _identity(4496)
    x = _x(m, 4496, seed=3, outliers=True)
    a = torch.tensor(0.01, device="cuda")
    expected = reference.dequantize_act(reference.quantize_act_static(x.cpu(), a.cpu()), a.cpu())
    for cfg in _gemv_cfgs():
        assert torch.equal(gemv(x, a, wq, ws, None, torch.float32, config=cfg).cpu(), expected), cfg


@pytest.mark.parametrize("m,n,k", [(1, 576, 7168), (16, 6144, 4096), (7, 4096, 4480)])
def test_gemv_configs(m, n, k, tma_eager):
    """Every sweep config, with split-K 1 and the automatic split, GEMM alone and linear."""
    from dataclasses import replace

    from fp8fx.kernels.act_quant import act_quant
    from fp8fx.kernels.gemv import CONFIGS, LAUNCH_VARIANTS, gemv

    wq, ws = _weight(n, k, "float32", seed=n)
    x = _x(m, k, seed=m, outliers=True)
    ref = _exact_linear(x, wq, ws, None, "float32")
    xq, xs = act_quant(x, col_major=True)
    for cfg in CONFIGS:
        for c in [replace(cfg, split_k=1), cfg] + [replace(cfg, pdl=p, prefetch=f) for p, f in LAUNCH_VARIANTS]:
            _poison()
            assert _rel(gemv(x, None, wq, ws, None, torch.bfloat16, config=c), ref) <= 2e-3, c
            assert _rel(gemv(xq, xs, wq, ws, None, torch.bfloat16, config=c), ref) <= 2e-3, c


GEMV_SHAPES = [(1, 576, 7168), (3, 2112, 7168), (16, 6144, 4096), (7, 4096, 4480), (2, 200, 400), (1, 28672, 4096)]


@pytest.mark.parametrize("m,n,k", GEMV_SHAPES)
@pytest.mark.parametrize("scale_fmt", ["float32", "ue8m0"])
def test_gemv_linear(m, n, k, scale_fmt):
    from fp8fx.kernels.gemv import GemvConfig, gemv

    wq, ws = _weight(n, k, scale_fmt, seed=n)
    bias = torch.randn(n, device="cuda").bfloat16() if m % 2 else None
    x = _x(m, k, seed=m, outliers=True)
    # fp16 out: x scaled by 2**-10 (same codes, scales / 1024) keeps the outliers' outputs finite.
    inputs = {dt: x * 2**-10 if dt == torch.float16 else x for dt in (torch.bfloat16, torch.float16, torch.float32)}
    refs = {dt: _exact_linear(xi, wq, ws, None if bias is None else bias.float(), scale_fmt) for dt, xi in inputs.items()}
    for cfg in (None, GemvConfig(128, 4, 4, split_k=3)):  # None: the dispatch table's config
        for out_dtype, xi in inputs.items():
            _poison()
            y = gemv(xi, None, wq, ws, bias, out_dtype, config=cfg, act_ue8m0=scale_fmt == "ue8m0")
            ref = refs[out_dtype]
            assert y.shape == (m, n) and y.dtype == out_dtype and torch.isfinite(y).all(), cfg
            # fp32 out: Hopper's fp8 MMA accumulates with reduced precision (see above).
            assert _rel(y, ref) <= (5e-4 if out_dtype == torch.float32 else 2e-3), (cfg, out_dtype)


@pytest.mark.parametrize("m,n,k", [(1, 576, 7168), (5, 2112, 7168), (16, 4096, 4480)])
def test_gemv_fp8_input_routes(m, n, k):
    """The GEMM-alone route (fp8 codes, column-major scales as the compiled graph passes
    them), the ops under preference "triton", and static activation scales."""
    from fp8fx.kernels import block_gemm_cuda, dispatch, linear_cuda
    from fp8fx.kernels.act_quant import act_quant
    from fp8fx.kernels.gemv import gemv

    wq, ws = _weight(n, k, "ue8m0", seed=2)
    x = _x(m, k, seed=4, outliers=True)
    xq, xs = act_quant(x, True, col_major=True)
    ref = reference.dequantize_act(xq, xs).double() @ reference.dequantize_weight(wq, ws).double().t()
    for cfg in _gemv_cfgs() + [None]:
        assert _rel(gemv(xq, xs, wq, ws, None, torch.bfloat16, config=cfg), ref) <= 2e-3, cfg
    with dispatch.preference("triton"):
        assert dispatch.choose(m, n, k, torch.bfloat16, x.device) == "gemv"
        assert _rel(block_gemm_cuda(xq, xs, wq, ws, None, [128, 128], torch.bfloat16), ref) <= 2e-3
        a = torch.tensor(0.01, device="cuda")
        ref_s = reference.linear(x.cpu(), wq.cpu(), ws.cpu(), None, a.cpu()).double()
        assert _rel(linear_cuda(x, wq, ws, None, a, [128, 128]).float().cpu(), ref_s) <= 2e-3
        xq_s = reference.quantize_act_static(x, a)
        y = block_gemm_cuda(xq_s, a, wq, ws, None, [128, 128], torch.bfloat16)
        assert _rel(y.float().cpu(), ref_s) <= 2e-3


@pytest.mark.parametrize("m", [300, 2048, 33])
@pytest.mark.parametrize("ns,k", [((4096, 1024, 1024), 4096), ((1536, 1536), 2048)])
@pytest.mark.parametrize("scale_fmt", ["float32", "ue8m0"])
def test_block_gemm_cat_packed(m, ns, k, scale_fmt):
    """Prefill-sized M: weights packed as pack_projections packs them (row ranges of one codes
    and one scales buffer) run as one GEMM over the packed rows (kernels._joint_weight), within
    2e-3 of the exact product, and equal to the same GEMM on a contiguous copy of the packed
    weight. Unpacked weights (copies) give the per-weight result."""
    from fp8fx.kernels import _joint_weight, block_gemm_cat_cuda, block_gemm_cuda
    from fp8fx.kernels.act_quant import act_quant

    joint_q, joint_s = _weight(sum(ns), k, scale_fmt, seed=5)
    ws, ss, row = [], [], 0
    for n in ns:
        ws.append(joint_q[row:row + n])
        ss.append(joint_s[row // 128:(row + n) // 128])
        row += n
    assert _joint_weight(ws, ss) is not None
    x = _x(m, k, seed=m, outliers=True)
    xq, xs = act_quant(x, scale_fmt == "ue8m0", col_major=True)
    y = block_gemm_cat_cuda(xq, xs, ws, ss, [None] * len(ns), [128, 128], torch.bfloat16)
    ref = reference.dequantize_act(xq, xs).double() @ reference.dequantize_weight(joint_q, joint_s).double().t()
    assert y.shape == (m, sum(ns)) and _rel(y, ref) <= 2e-3
    assert torch.equal(y, block_gemm_cuda(xq, xs, joint_q.clone(), joint_s.clone(), None, [128, 128], torch.bfloat16))
    copies = [w.clone() for w in ws]
    assert _joint_weight(copies, ss) is None
    y_sep = block_gemm_cat_cuda(xq, xs, copies, ss, [None] * len(ns), [128, 128], torch.bfloat16)
    assert _rel(y_sep, ref) <= 2e-3


@pytest.mark.parametrize("m", [1, 2, 8, 16])
@pytest.mark.parametrize("ns,k", [((4096, 1024, 1024), 4096), ((14336, 14336), 4096), ((2048, 512, 144), 2048)])
@pytest.mark.parametrize("scale_fmt", ["float32", "ue8m0"])
@pytest.mark.parametrize("tma", [False, True])
def test_gemv_cat(m, ns, k, scale_fmt, tma, tma_eager):
    """One launch over q/k/v or gate/up (Llama-3-8B, Qwen3-30B-A3B attention and an uneven
    third weight): bit-equal to torch.cat of the single gemvs with the same config, within
    2e-3 of the exact product, through the ops (block_gemm_cat_cuda, and linear_cat_cuda,
    which quantizes bf16 x in the kernel) too. Quantizing in the kernel gives the same codes:
    at M <= 2 (the same row tiling) bit-equal to the fp8-input launch."""
    from fp8fx.kernels import block_gemm_cat_cuda, dispatch, linear_cat_cuda
    from fp8fx.kernels.act_quant import act_quant
    from fp8fx.kernels.gemv import gemv, gemv_cat

    weights = [_weight(n, k, scale_fmt, seed=i) for i, n in enumerate(ns)]
    ws, ss = [w for w, _ in weights], [s for _, s in weights]
    biases = [torch.randn(n, device="cuda", dtype=torch.bfloat16) for n in ns] if m == 2 else None
    x = _x(m, k, seed=m, outliers=True)
    xq, xs = act_quant(x, scale_fmt == "ue8m0", col_major=True)
    cfg = dataclasses.replace(dispatch.gemv_config(m, sum(ns), k, True), tma=tma)
    _poison()
    y = gemv_cat(xq, xs, ws, ss, biases, torch.bfloat16, config=cfg)
    parts = [gemv(xq, xs, w, s, None if biases is None else biases[i], torch.bfloat16, config=cfg)
             for i, (w, s) in enumerate(weights)]
    assert torch.equal(y, torch.cat(parts, -1))
    xd = reference.dequantize_act(xq, xs).double()
    ref = torch.cat([xd @ reference.dequantize_weight(w, s).double().t() + (0 if biases is None else biases[i].double())
                     for i, (w, s) in enumerate(weights)], -1)
    assert _rel(y, ref) <= 2e-3
    y_op = block_gemm_cat_cuda(xq, xs, ws, ss, biases or [None] * len(ns), [128, 128], torch.bfloat16)
    assert _rel(y_op, ref) <= 2e-3
    y_in = gemv_cat(x, None, ws, ss, biases, torch.bfloat16, config=cfg, act_ue8m0=scale_fmt == "ue8m0")
    assert _rel(y_in, ref) <= 2e-3
    if m <= 2:
        assert torch.equal(y_in, y)
    y_lin = linear_cat_cuda(x, ws, ss, biases or [None] * len(ns), [128, 128])
    assert _rel(y_lin, ref) <= 2e-3
    from fp8fx.kernels.gemv import _TICKETS

    if x.device in _TICKETS:  # split-K ran: every ticket was set back to zero
        assert _TICKETS[x.device].count_nonzero().item() == 0


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("kind,ns,k", [("norm", (4096, 1024, 1024), 4096), ("norm_residual", (14336, 14336), 4096),
                                       ("norm_residual", (2048, 512, 512), 2048), ("silu", (4096,), 14336),
                                       ("silu", (2048,), 768)])
@pytest.mark.parametrize("scale_fmt", ["float32", "ue8m0"])
@pytest.mark.parametrize("tma", [False, True])
def test_gemv_cat_prologues(m, kind, ns, k, scale_fmt, tma, tma_eager):
    """The RMSNorm (+ residual add) and SiLU * up prologues at Llama-3-8B and Qwen3-30B-A3B
    decode shapes, with the dispatch table's linear config: y within 2e-3 of the reference
    composition (eager norm / product, reference quantization, exact product), h bit-exact,
    through the ops' CUDA implementations too; heavy-tailed rows with outliers."""
    from fp8fx.kernels import dispatch, rms_norm_linear_cat_cuda, silu_mul_linear_cat_cuda
    from fp8fx.kernels.gemv import gemv_cat_rms_norm, gemv_cat_silu_mul

    weights = [_weight(n, k, scale_fmt, seed=i) for i, n in enumerate(ns)]
    ws, ss = [w for w, _ in weights], [s for _, s in weights]
    biases = [None] * len(ns)
    x = _x(m, k, seed=m, outliers=True)
    r = _x(m, k, seed=m + 7) if kind != "norm" else None
    nw = (1 + 0.5 * torch.randn(k, device="cuda")).to(torch.bfloat16)
    cfg = dataclasses.replace(dispatch.gemv_config(m, sum(ns), k, False), tma=tma)
    ue8m0 = scale_fmt == "ue8m0"
    _poison()
    if kind == "silu":
        gu = torch.cat([x, r], -1)  # gate and up as the halves of one GEMM output
        xin = torch.nn.functional.silu(x) * r
        y = gemv_cat_silu_mul(gu[:, :k], gu[:, k:], ws, ss, config=cfg, act_ue8m0=ue8m0)
        y_op = silu_mul_linear_cat_cuda(gu[:, :k], gu[:, k:], ws, ss, biases, [128, 128])
    else:
        h_ref = x if r is None else x + r
        xin = reference.rms_norm(h_ref, nw, 1e-5)
        y, h = gemv_cat_rms_norm(x, r, nw, 1e-5, ws, ss, config=cfg, act_ue8m0=ue8m0)
        y_op, h_op = rms_norm_linear_cat_cuda(x, r, nw, 1e-5, ws, ss, biases, [128, 128])
        if r is not None:
            assert torch.equal(h, h_ref) and torch.equal(h_op, h_ref)
        else:
            assert h.numel() == 0 and h_op.numel() == 0
    xq, xs = reference.quantize_act(xin, 128, scale_fmt)
    xd = reference.dequantize_act(xq, xs).double()
    ref = torch.cat([xd @ reference.dequantize_weight(w, s).double().t() for w, s in weights], -1)
    assert y.shape == (m, sum(ns)) and y.dtype == torch.bfloat16
    assert _rel(y, ref) <= 2e-3 and _rel(y_op, ref) <= 2e-3


@pytest.fixture
def tma_eager(monkeypatch):
    from fp8fx.kernels import gemv as gemv_mod

    monkeypatch.setattr(gemv_mod, "TMA_EAGER", True)


def test_gemv_tma_only_under_capture_and_same_sums(monkeypatch):
    """TMA configs take pointer loads on eager launches (descriptors cost host time per
    launch) and descriptors under CUDA-graph capture: the replay equals the eager result bit
    for bit, for gemv, gemv_cat (3 weights) and expert_gemv (3-D weights); with TMA_EAGER the
    eager launch takes descriptors and gives the same bits again."""
    from fp8fx.kernels import gemv as gemv_mod
    from fp8fx.kernels.gemv import GemvConfig, expert_gemv, gemv, gemv_cat

    made = []
    real = gemv_mod._descriptor
    monkeypatch.setattr(gemv_mod, "_descriptor", lambda w, bn: made.append(bn) or real(w, bn))
    cfg = GemvConfig(128, 4, 3, split_k=4, tma=True)
    weights = [_weight(n, 2048, "float32", seed=n) for n in (4096, 512, 512)]
    ew, es = reference.quantize_weight(torch.randn(8, 768, 2048, device="cuda") * 0.02)
    ids = torch.tensor([5, 0, 7, 3, 3, 1, 6, 2], device="cuda")
    x = _x(1, 2048, seed=4, outliers=True)
    calls = {
        "gemv": lambda: gemv(x, None, *weights[0], None, torch.bfloat16, config=cfg),
        "cat": lambda: gemv_cat(x, None, [w for w, _ in weights], [s for _, s in weights], None, torch.bfloat16, config=cfg),
        "expert": lambda: expert_gemv(x, ids, ew, es, config=cfg),
    }
    for name, call in calls.items():
        made.clear()
        eager = call()
        assert made == [], name  # pointers
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = call()
        assert made, name  # descriptors at capture
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager), name
        monkeypatch.setattr(gemv_mod, "TMA_EAGER", True)
        assert torch.equal(call(), eager), name
        monkeypatch.setattr(gemv_mod, "TMA_EAGER", False)


def test_cublas_plan_reused_and_invalidated(monkeypatch):
    """The second cuBLAS GEMM call on one weight at one M takes the recorded plan (one
    torch._scaled_mm) and gives the same bits; an in-place change of the weight scale is
    picked up, another M or row-major scales go through the checked path again. A packed
    group (block_gemm_cat) gets one plan over its joint rows, which goes when a member does."""
    import gc

    from fp8fx import kernels
    from fp8fx.api import _cat_bytes
    from fp8fx.kernels import dispatch
    from fp8fx.kernels.act_quant import act_quant

    m, n, k = 256, 512, 1024
    wq, ws = _weight(n, k, "float32", seed=3)
    x = _x(m, k, seed=3, outliers=True)
    xq, xs = act_quant(x, False, col_major=True)
    ref = reference.dequantize_act(xq, xs).double() @ reference.dequantize_weight(wq, ws).double().t()
    with dispatch.preference("cublas"):
        kernels._PLANS.clear()
        y1 = kernels.block_gemm_cuda(xq, xs, wq, ws, None, [128, 128], torch.bfloat16)
        assert len(kernels._PLANS) == 1
        y2 = kernels.block_gemm_cuda(xq, xs, wq, ws, None, [128, 128], torch.bfloat16)
        assert torch.equal(y1, y2) and _rel(y2, ref) <= 2e-3
        assert _rel(kernels.block_gemm_cuda(xq, xs.contiguous(), wq, ws, None, [128, 128], torch.bfloat16), ref) <= 2e-3
        ws.mul_(2.0)  # in place: the prepared scale is rebuilt
        y3 = kernels.block_gemm_cuda(xq, xs, wq, ws, None, [128, 128], torch.bfloat16)
        assert _rel(y3, 2 * ref) <= 2e-3
        y4 = kernels.block_gemm_cuda(xq[:128], xs[:128], wq, ws, None, [128, 128], torch.bfloat16)
        assert _rel(y4, 2 * ref[:128]) <= 2e-3

        parts = [_weight(rows, k, "float32", seed=20 + i) for i, rows in enumerate((512, 128, 256))]
        codes, scales = _cat_bytes([p[0] for p in parts]), _cat_bytes([p[1] for p in parts])
        qs, ss, row, srow = [], [], 0, 0
        for q, s in parts:
            qs.append(codes[row:row + q.shape[0]])
            ss.append(scales[srow:srow + s.shape[0]])
            row, srow = row + q.shape[0], srow + s.shape[0]
        want = torch.cat([kernels.block_gemm_cuda(xq, xs, q, s, None, [128, 128], torch.bfloat16)
                          for q, s in parts], -1)
        kernels._PLANS.clear()
        cat = lambda: kernels.block_gemm_cat_cuda(xq, xs, qs, ss, [None] * 3, [128, 128], torch.bfloat16)  # noqa: E731
        first = cat()
        assert len(kernels._PLANS) == 1 and torch.equal(first, want)
        with monkeypatch.context() as patch:  # from the plan: no joint view is built
            patch.setattr(kernels, "_joint_weight", lambda *a: pytest.fail("the planned call built the joint view"))
            assert torch.equal(cat(), want)
        ss[1].mul_(0.5)  # one member's scales in place: the shared version moves, the plan is rebuilt
        assert _rel(cat()[:, 512:640], want[:, 512:640].double() * 0.5) <= 2e-3
        del qs, ss, codes, scales, cat
        gc.collect()
        assert not kernels._PLANS and not kernels._JOINT  # the entries went with the weights


@pytest.mark.parametrize("first_use_in_graph,tma", [(False, False), (True, False), (False, True)])
def test_gemv_deterministic_and_cuda_graph(first_use_in_graph, tma):
    """Split-K sums in a fixed order: identical bits run to run; the persistent tickets are
    left zeroed; in a CUDA graph (persistent tickets, or, when the first split gemv of the
    device is being captured, tickets zeroed in the graph) replays match eager."""
    from fp8fx.kernels import gemv as gemv_mod
    from fp8fx.kernels.gemv import GemvConfig, gemv

    wq, ws = _weight(4096, 14336, "float32")
    x = _x(4, 14336, seed=9, outliers=True)
    cfg = GemvConfig(64, 4, 4, split_k=8, tma=tma)  # TMA: descriptors encoded at capture
    first = gemv(x, None, wq, ws, None, torch.float32, config=cfg)
    for _ in range(5):
        assert torch.equal(gemv(x, None, wq, ws, None, torch.float32, config=cfg), first)
    assert gemv_mod._TICKETS[x.device].count_nonzero().item() == 0
    saved = dict(gemv_mod._TICKETS)
    if first_use_in_graph:
        gemv_mod._TICKETS.clear()
    try:
        static_x = x.clone()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = gemv(static_x, None, wq, ws, None, torch.float32, config=cfg)
        assert (x.device in gemv_mod._TICKETS) != first_use_in_graph
        for _ in range(3):
            g.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, first)
        x2 = _x(4, 14336, seed=10)
        static_x.copy_(x2)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, gemv(x2, None, wq, ws, None, torch.float32, config=cfg))
    finally:
        gemv_mod._TICKETS.update(saved)
    assert gemv_mod._TICKETS[x.device].count_nonzero().item() == 0


def test_gemv_pdl_chain():
    """Each gemv reads the previous gemv's output at once. With PDL the next kernel launches
    early and must wait (griddepcontrol.wait) before reading it: the chain must equal the
    chain without PDL bit for bit, eagerly and replayed from a CUDA graph."""
    from fp8fx.kernels.gemv import GemvConfig, gemv

    weights = [_weight(4096, 4096, "float32", seed=i) for i in range(6)]
    x0 = _x(4, 4096, seed=1)

    def chain(pdl, x):
        for i, (wq, ws) in enumerate(weights):
            cfg = GemvConfig(128, 4, 3, split_k=4 if i % 2 else 1, pdl=pdl, prefetch=4 if pdl else 0)
            x = gemv(x, None, wq, ws, None, torch.bfloat16, config=cfg)
        return x

    expected = chain(False, x0)
    assert torch.isfinite(expected).all()
    for _ in range(3):
        assert torch.equal(chain(True, x0), expected)
    static_x = x0.clone()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = chain(True, static_x)
    for _ in range(3):
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expected)
