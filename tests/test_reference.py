"""fp8fx.reference: the numerics contract every kernel is tested against."""

import math

import pytest
import torch

from conftest import heavy_tailed, rel_err
from fp8fx import reference as R

# One e4m3 rounding: |q*s - w| <= s * 2**-4 * 2**floor(log2 |q|)... bounded by half an ulp at
# the block's top exponent, i.e. amax * 2**-4 (3 mantissa bits), and by s * 2**-9 near zero
# (e4m3 subnormal spacing is 2**-9 in code units).
REL_ULP = 2.0**-4


def _block_amax(w, block=(128, 128)):
    n, k = w.shape[-2:]
    gn, gk = R.scale_grid(n, k, block)
    wp = torch.nn.functional.pad(w.float().abs(), (0, gk * block[1] - k, 0, gn * block[0] - n))
    return wp.reshape(*w.shape[:-2], gn, block[0], gk, block[1]).amax(dim=(-3, -1))


@pytest.mark.parametrize("shape", [(128, 128), (576, 7168 // 8), (2112 // 8, 7168 // 16), (300, 272), (16, 16), (4, 130, 48)])
@pytest.mark.parametrize("scale_fmt", ["float32", "ue8m0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_weight_roundtrip_error_bound(shape, scale_fmt, dtype):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(hash(shape) % 2**31)).to(dtype)
    q, s = R.quantize_weight(w, scale_fmt=scale_fmt)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.shape == (*shape[:-2], *R.scale_grid(shape[-2], shape[-1], (128, 128)))
    assert s.dtype == (torch.float8_e8m0fnu if scale_fmt == "ue8m0" else torch.float32)
    d = R.dequantize_weight(q, s, dtype=torch.float32)
    # Per element: error at most half an e4m3 step at the element's magnitude, relative to
    # the block scale (2**-4 of the value), or the subnormal step near zero.
    s_el = s.float().repeat_interleave(128, -2).repeat_interleave(128, -1)[..., : shape[-2], : shape[-1]]
    bound = torch.maximum(w.float().abs() * REL_ULP, s_el * 2.0**-9 * 0.5) * 1.0001
    assert ((d - w.float()).abs() <= bound).all()
    # No code saturates past 448, and the block's largest element uses the top of the range.
    assert q.float().abs().max() <= 448
    amax = _block_amax(w)
    if scale_fmt == "float32":
        torch.testing.assert_close(s, amax.clamp_min(R.AMAX_EPS) / 448)
    else:
        # Powers of two, the smallest with amax / s <= 448.
        log2 = torch.log2(s.float())
        assert torch.equal(log2, log2.round())
        assert (amax / s.float() <= 448).all() and (amax / (s.float() / 2) > 448).all()


def test_ue8m0_scale_is_exact_power_of_two_ceiling():
    # Values straddling powers of two, where a log2-based ceil is prone to rounding the wrong way.
    v = torch.tensor([448.0, 448.0 * 2, 448.0 * 2 * (1 + 2**-23), 448.0 * 3, 1.0, 7e-3, 448 * 2.0**-40])
    s = R.amax_to_scale(v, "ue8m0")
    expect = torch.tensor([2.0 ** math.ceil(math.log2(x / 448)) for x in v.double().tolist()])
    # The third case: amax/448 is 2 * (1 + ulp) in fp32, so the ceiling is 4.
    assert s.tolist() == expect.float().tolist()


@pytest.mark.parametrize("scale_fmt", ["float32", "ue8m0"])
def test_zero_blocks_give_zeros_not_nan(scale_fmt):
    w = torch.randn(256, 384)
    w[:128, 128:256] = 0
    q, s = R.quantize_weight(w, scale_fmt=scale_fmt)
    assert torch.isfinite(s.float()).all() and (s.float() > 0).all()
    d = R.dequantize_weight(q, s)
    assert torch.equal(d[:128, 128:256], torch.zeros(128, 128))
    xq, xs = R.quantize_act(torch.zeros(3, 256), scale_fmt=scale_fmt)
    assert torch.equal(R.dequantize_act(xq, xs), torch.zeros(3, 256))
    y = R.linear(torch.zeros(2, 384), q, s)
    assert torch.equal(y, torch.zeros(2, 256))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_weight_raises_naming_tensor(bad):
    w = torch.randn(128, 128)
    w[3, 7] = bad
    with pytest.raises(ValueError, match="layers.3.q_proj.*NaN or Inf"):
        R.quantize_weight(w, name="layers.3.q_proj")


def test_non_float_weight_and_bad_format_raise():
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        R.quantize_weight(torch.ones(128, 128, dtype=torch.int8))
    with pytest.raises(ValueError, match="scale_fmt"):
        R.quantize_weight(torch.ones(128, 128), scale_fmt="e5m2")


@pytest.mark.parametrize("k", [128, 272, 7168 // 16, 16])
@pytest.mark.parametrize("scale_fmt", ["float32", "ue8m0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_act_quant_heavy_tailed(k, scale_fmt, dtype):
    x = heavy_tailed(37, k, dtype=dtype, seed=k)
    q, s = R.quantize_act(x, 128, scale_fmt)
    assert q.shape == x.shape and s.shape == (37, math.ceil(k / 128)) and s.dtype == torch.float32
    d = R.dequantize_act(q, s)
    s_el = s.repeat_interleave(128, -1)[:, :k]
    bound = torch.maximum(x.float().abs() * REL_ULP, s_el * 2.0**-10) * 1.0001
    assert ((d - x.float()).abs() <= bound).all()
    # The group's largest element maps to (nearly) +-448 with fp32 scales.
    if scale_fmt == "float32":
        assert (q.float().abs().amax(-1) >= 416).all()


def test_linear_matches_dequantized_product_and_bf16():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(33, 272, generator=g, dtype=torch.float32).to(torch.bfloat16)
    w = torch.randn(144, 272, generator=g) * 0.05
    b = torch.randn(144, generator=g)
    q, s = R.quantize_weight(w)
    y = R.linear(x, q, s, b)
    assert y.dtype == torch.bfloat16 and y.shape == (33, 144)
    xq, xs = R.quantize_act(x)
    exact = R.dequantize_act(xq, xs) @ R.dequantize_weight(q, s).t() + b
    assert rel_err(y, exact) < 4e-3  # bf16 output rounding only
    assert rel_err(y, x.float() @ w.t() + b) < 0.06  # FP8 quantization error vs full precision


def test_linear_static_activation_scale():
    x = torch.randn(8, 256)
    q, s = R.quantize_weight(torch.randn(128, 256))
    a = x.abs().max() / 448
    y = R.linear(x, q, s, act_scale=a)
    xd = R.quantize_act_static(x, a).float() * a
    torch.testing.assert_close(y, xd @ R.dequantize_weight(q, s).t())


def test_ue8m0_weights_round_activation_scales_to_powers_of_two():
    x = torch.randn(4, 256) * 3.7
    q, s = R.quantize_weight(torch.randn(128, 256), scale_fmt="ue8m0")
    xq, xs = R.quantize_act(x, 128, "ue8m0")
    torch.testing.assert_close(R.linear(x, q, s), R.dequantize_act(xq, xs) @ R.dequantize_weight(q, s).t())


def test_grouped_linear_matches_per_expert_linear_with_empty_experts():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(4, 144, 256, generator=g)
    q, s = R.quantize_weight(w)
    x = torch.randn(10, 256, generator=g)
    offs = torch.tensor([3, 3, 9, 9])  # expert 1 and 3 get no tokens; row 9 belongs to none
    y = R.grouped_linear(x, q, s, offs)
    assert torch.equal(y[:3], R.linear(x[:3], q[0], s[0]))
    assert torch.equal(y[3:9], R.linear(x[3:9], q[2], s[2]))
    assert torch.equal(y[9:], torch.zeros(1, 144))
    with pytest.raises(ValueError, match="offs must have shape"):
        R.grouped_linear(x, q, s, offs[:3])


def test_dequantize_rejects_mis_shaped_scale():
    q, s = R.quantize_weight(torch.randn(576, 256))
    with pytest.raises(ValueError, match=r"expected \(5, 2\)"):
        R.dequantize_weight(q, s[:4])
