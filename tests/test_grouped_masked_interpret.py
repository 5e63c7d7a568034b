"""fp8fx.kernels.grouped_masked on CPU under TRITON_INTERPRET=1, against fp8fx.reference."""

import pytest
import torch

from conftest import INTERPRET_INNER, heavy_tailed, interpreted, rel_err, run_interpreted
from fp8fx import reference as R


@pytest.mark.skipif(INTERPRET_INNER, reason="this is the launcher")
def test_interpreted_suite():
    run_interpreted(__file__)


def _case(e, m, n, k, counts, scale_fmt, seed):
    """Heavy-tailed weights and activations with outliers; one all-zero row and, where there
    are two experts or more, one all-zero expert batch; the padding rows hold NaN so that
    reading them would show. fp32 activations: the interpreter's fp32 -> bf16 cast truncates
    (the GPU rounds to nearest), which would blur the bound with up to one bf16 ulp."""
    w = heavy_tailed(e, n, k, seed=seed) * 0.05
    q, s = R.quantize_weight(w, scale_fmt=scale_fmt)
    x = heavy_tailed(e, m, k, seed=seed + 1)
    x[0, 0] = 0.0
    if e > 1:
        x[1] = 0.0
    masked_m = torch.tensor(counts, dtype=torch.int32)
    for i, c in enumerate(counts):
        x[i, c:] = float("nan")
    return x, q, s, masked_m


def _check(y, x, q, s, masked_m, act=None):
    ref = R.grouped_linear_masked(x, q, s, masked_m, act)  # the oracle, fp32 out
    assert y.shape == ref.shape and y.dtype == ref.dtype
    for i, c in enumerate(masked_m.tolist()):
        assert torch.equal(y[i, c:], torch.zeros_like(y[i, c:])), f"expert {i}: padding rows not zero"
        # Row by row: the outliers would hide a wrong small row in a norm over the batch.
        for r in range(c):
            assert rel_err(y[i, r], ref[i, r]) < 1e-4, (i, r)
    assert torch.isfinite(y).all()


@interpreted
@pytest.mark.parametrize("scale_fmt", ["float32", "ue8m0"])
@pytest.mark.parametrize(
    "e,m,n,k,counts",
    [
        (3, 5, 144, 272, [5, 0, 2]),  # masked_m = M, an empty expert; edge blocks in N and K
        (2, 1, 32, 128, [1, 0]),  # M = 1 (decode)
        (4, 20, 48, 160, [0, 20, 17, 0]),  # two M tiles of 16; 17 rows cross the tile edge
        (1, 16, 16, 16, [16]),
        (2, 3, 40, 400, [0, 0]),  # nothing valid at all
    ],
)
def test_masked_linear_matches_reference(e, m, n, k, counts, scale_fmt):
    from fp8fx.kernels.grouped_masked import grouped_linear_masked

    x, q, s, masked_m = _case(e, m, n, k, counts, scale_fmt, seed=e * 100 + n)
    y = grouped_linear_masked(x, q, s, masked_m, None, [128, 128])
    _check(y, x, q, s, masked_m)


@interpreted
@pytest.mark.parametrize("bm,bn", [(16, 128), (32, 64), (64, 32)])
def test_tile_configs(bm, bn):
    from fp8fx.kernels.grouped_masked import grouped_gemm_masked, masked_act_quant

    x, q, s, masked_m = _case(3, 70, 200, 256, [70, 33, 1], "float32", seed=5)
    xq, xs = masked_act_quant(x, masked_m)
    y = grouped_gemm_masked(xq, xs, q, s, masked_m, torch.float32, block_m=bm, block_n=bn)
    _check(y, x, q, s, masked_m)


@interpreted
def test_act_quant_codes_and_scales_bit_exact():
    from fp8fx.kernels.grouped_masked import masked_act_quant

    x, _, _, masked_m = _case(3, 40, 16, 400, [40, 0, 19], "float32", seed=9)
    for fmt in ("float32", "ue8m0"):
        q, s = masked_act_quant(x, masked_m, ue8m0=fmt == "ue8m0")
        for i, c in enumerate(masked_m.tolist()):
            rq, rs = R.quantize_act(x[i, :c], 128, fmt)
            assert torch.equal(q[i, :c].view(torch.uint8), rq.view(torch.uint8))
            assert torch.equal(s[i, :c], rs)
    _, s = masked_act_quant(x, masked_m, mn_major=True)  # DeepGEMM's SM90 sfa layout
    assert s.shape == (3, 40, 4) and s.stride() == (160, 1, 40)
    assert torch.equal(s[0], R.quantize_act(x[0], 128)[1])


@interpreted
def test_static_scales_and_int64_counts():
    from fp8fx.kernels.grouped_masked import grouped_linear_masked

    x, q, s, masked_m = _case(3, 6, 64, 256, [6, 2, 0], "float32", seed=3)
    x = x.clamp(-50, 50)  # static scales clip outliers by design; keep the case in range
    act = torch.tensor([0.05, 0.1, 0.2])
    y = grouped_linear_masked(x, q, s, masked_m.long(), act, [128, 128])
    _check(y, x, q, s, masked_m, act)


@interpreted
def test_out_of_range_counts_stay_inside_the_batch():
    """The op asserts 0 <= masked_m <= M; the kernels alone clamp, so memory past the batch
    is never read or written (a guard canary around the output proves the writes)."""
    from fp8fx.kernels.grouped_masked import grouped_gemm_masked, masked_act_quant

    x, q, s, _ = _case(2, 4, 32, 128, [4, 4], "float32", seed=1)
    x = x.nan_to_num(0.0)
    full = torch.tensor([4, 4], dtype=torch.int32)
    bad = torch.tensor([9, -3], dtype=torch.int32)
    xq, xs = masked_act_quant(x, bad)
    y = grouped_gemm_masked(xq, xs, q, s, bad, torch.float32)
    ref = R.grouped_linear_masked(x, q, s, full)
    assert rel_err(y[0], ref[0]) < 1e-4 and torch.equal(y[1], torch.zeros(4, 32))


def test_bad_input():
    from fp8fx.kernels.grouped_masked import grouped_gemm_masked, masked_act_quant

    q = torch.zeros(2, 32, 128, dtype=torch.float8_e4m3fn)
    s = torch.ones(2, 1, 1)
    a = torch.zeros(2, 4, 128, dtype=torch.float8_e4m3fn)
    sa = torch.ones(2, 4, 1)
    with pytest.raises(ValueError, match="masked_m must be an int32/int64 tensor of shape"):
        grouped_gemm_masked(a, sa, q, s, torch.tensor([4], dtype=torch.int32))
    with pytest.raises(ValueError, match="activation scales must be fp32"):
        grouped_gemm_masked(a, torch.ones(2, 4, 2), q, s, torch.tensor([4, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="expected a"):
        grouped_gemm_masked(a[0], sa, q, s, torch.tensor([4, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="block_n must divide 128"):
        grouped_gemm_masked(a, sa, q, s, torch.tensor([4, 4], dtype=torch.int32), block_n=48)
    with pytest.raises(ValueError, match="act_scale must have shape"):
        masked_act_quant(torch.zeros(2, 4, 128), torch.tensor([1, 1]), act_scale=torch.ones(3))


@pytest.mark.skipif(INTERPRET_INNER, reason="the interpreter runs kernels on CPU tensors by design")
def test_cpu_tensors_rejected_without_interpreter():
    from fp8fx.kernels.grouped_masked import grouped_gemm_masked

    q = torch.zeros(2, 32, 128, dtype=torch.float8_e4m3fn)
    a = torch.zeros(2, 4, 128, dtype=torch.float8_e4m3fn)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        grouped_gemm_masked(a, torch.ones(2, 4, 1), q, torch.ones(2, 1, 1), torch.tensor([2, 4], dtype=torch.int32))
