"""fp8fx.kernels.grouped_gemm on CPU under TRITON_INTERPRET=1, against fp8fx.reference."""

import pytest
import torch

from conftest import INTERPRET_INNER, interpreted, rel_err, run_interpreted
from fp8fx import reference as R


@pytest.mark.skipif(INTERPRET_INNER, reason="this is the launcher")
def test_interpreted_suite():
    run_interpreted(__file__)


def _case(e, n, k, counts, scale_fmt, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(e, n, k, generator=g) * 0.05
    w[0, :, :16] *= 100.0  # outlier columns
    q, s = R.quantize_weight(w, scale_fmt=scale_fmt)
    t = sum(counts)
    x = torch.randn(t, k, generator=g) * torch.logspace(-2, 1, k)
    if t > 1:
        x[0] = 0.0
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    # fp32 activations give an fp32 output: the interpreter's fp32 -> bf16 cast truncates
    # (the GPU rounds to nearest), which would blur the 2e-3 bound with up to 1 bf16 ulp.
    return x, q, s, offs


def _exact(x, q, s, offs, act=None):
    """The fp32 product of the dequantized operands (no output rounding), per expert."""
    fmt = "ue8m0" if s.dtype == torch.float8_e8m0fnu else "float32"
    y = torch.zeros(x.shape[0], q.shape[1])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if act is None:
            xd = R.dequantize_act(*R.quantize_act(x[start:end], 128, fmt))
        else:
            xd = R.dequantize_act(R.quantize_act_static(x[start:end], act[e]), act[e])
        y[start:end] = xd @ R.dequantize_weight(q[e], s[e]).t()
        start = end
    return y


@interpreted
@pytest.mark.parametrize("scale_fmt", ["float32", "ue8m0"])
@pytest.mark.parametrize(
    "e,n,k,counts",
    [
        (3, 144, 272, [5, 0, 20]),  # an empty expert, edge blocks in N and K
        (2, 32, 128, [1, 0]),  # one token
        (4, 48, 160, [0, 0, 17, 0]),  # all tokens to one expert
        (1, 16, 16, [3]),
    ],
)
def test_grouped_linear_matches_reference(e, n, k, counts, scale_fmt):
    from fp8fx.kernels.grouped_gemm import grouped_linear

    x, q, s, offs = _case(e, n, k, counts, scale_fmt, seed=e * 100 + n)
    y = grouped_linear(x, q, s, offs, None, [128, 128])
    ref = _exact(x, q, s, offs)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert torch.isfinite(y).all()
    assert rel_err(y.float(), ref) < 2e-3


@interpreted
def test_rows_past_last_offset_are_zero_and_static_scales():
    from fp8fx.kernels.grouped_gemm import grouped_linear

    x, q, s, _ = _case(2, 32, 128, [4, 3], "float32", seed=7)
    offs = torch.tensor([4, 5], dtype=torch.int32)  # rows 5, 6 belong to no expert
    y = grouped_linear(x, q, s, offs, None, [128, 128])
    assert torch.equal(y[5:], torch.zeros(2, 32))
    assert rel_err(y[:5].float(), _exact(x, q, s, offs)[:5]) < 2e-3
    act = torch.tensor([0.02, 0.05])
    y = grouped_linear(x[:5], q, s, offs, act, [128, 128])
    assert rel_err(y.float(), _exact(x[:5], q, s, offs, act)) < 2e-3


def test_bad_input():
    from fp8fx.kernels.grouped_gemm import grouped_gemm

    q = torch.zeros(2, 32, 128, dtype=torch.float8_e4m3fn)
    s = torch.ones(2, 1, 1)
    a = torch.zeros(4, 128, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="offs must have shape"):
        grouped_gemm(a, torch.ones(4, 1), q, s, torch.tensor([4], dtype=torch.int32))
    with pytest.raises(ValueError, match="activation scales must be fp32"):
        grouped_gemm(a, torch.ones(4, 2), q, s, torch.tensor([2, 4], dtype=torch.int32))


@pytest.mark.skipif(INTERPRET_INNER, reason="the interpreter runs kernels on CPU tensors by design")
def test_cpu_tensors_rejected_without_interpreter():
    from fp8fx.kernels.grouped_gemm import grouped_gemm

    q = torch.zeros(2, 32, 128, dtype=torch.float8_e4m3fn)
    a = torch.zeros(4, 128, dtype=torch.float8_e4m3fn)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        grouped_gemm(a, torch.ones(4, 1), q, torch.ones(2, 1, 1), torch.tensor([2, 4], dtype=torch.int32))
