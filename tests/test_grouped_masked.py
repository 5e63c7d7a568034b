"""fp8fx::grouped_linear_masked on CPU: the reference path, the fake, argument errors."""

import pytest
import torch

import fp8fx.ops  # noqa: F401  (registers torch.ops.fp8fx.*)
from conftest import heavy_tailed
from fp8fx import reference as R

op = torch.ops.fp8fx.grouped_linear_masked


def _inputs(e=3, m=5, n=144, k=272, counts=(5, 0, 2), scale_fmt="float32", dtype=torch.bfloat16):
    q, s = R.quantize_weight(heavy_tailed(e, n, k, seed=1) * 0.05, scale_fmt=scale_fmt)
    x = heavy_tailed(e, m, k, seed=2).to(dtype)
    return x, q, s, torch.tensor(counts, dtype=torch.int32)


@pytest.mark.parametrize("scale_fmt", ["float32", "ue8m0"])
def test_op_matches_per_expert_linear(scale_fmt):
    x, q, s, masked_m = _inputs(scale_fmt=scale_fmt)
    x[2, 2:] = float("nan")  # padding is never read
    y = op(x, q, s, masked_m, None, [128, 128])
    assert y.shape == (3, 5, 144) and y.dtype == torch.bfloat16
    assert torch.equal(y[0], R.linear(x[0], q[0], s[0]))
    assert torch.equal(y[1], torch.zeros(5, 144, dtype=torch.bfloat16))
    assert torch.equal(y[2, :2], R.linear(x[2, :2], q[2], s[2]))
    assert torch.equal(y[2, 2:], torch.zeros(3, 144, dtype=torch.bfloat16))


def test_static_scales_and_empty_shapes():
    x, q, s, masked_m = _inputs()
    act = torch.tensor([0.5, 1.0, 2.0])
    y = op(x, q, s, masked_m, act, [128, 128])
    assert torch.equal(y[2, :2], R.linear(x[2, :2], q[2], s[2], act_scale=act[2]))
    assert op(x[:, :0], q, s, torch.zeros(3, dtype=torch.int32), None, [128, 128]).shape == (3, 0, 144)
    q0, s0 = q[:0], s[:0]
    assert op(x[:0], q0, s0, masked_m[:0], None, [128, 128]).shape == (0, 5, 144)


def test_out_of_range_counts_rejected():
    x, q, s, _ = _inputs()
    with pytest.raises(ValueError, match=r"masked_m\[1\] = 6 is outside \[0, M = 5\]"):
        op(x, q, s, torch.tensor([5, 6, 0], dtype=torch.int32), None, [128, 128])
    with pytest.raises(ValueError, match=r"masked_m\[0\] = -1 is outside"):
        op(x, q, s, torch.tensor([-1, 0, 0], dtype=torch.int32), None, [128, 128])


def test_bad_arguments():
    x, q, s, masked_m = _inputs()
    with pytest.raises(ValueError, match=r"x\[E, M, K\] with E = 3"):
        op(x[:2], q, s, masked_m, None, [128, 128])
    with pytest.raises(ValueError, match=r"x\[E, M, K\] with E = 3"):
        op(x[0], q, s, masked_m, None, [128, 128])
    with pytest.raises(ValueError, match="masked_m must be an int32/int64 tensor of shape"):
        op(x, q, s, masked_m.float(), None, [128, 128])
    with pytest.raises(ValueError, match="masked_m must be an int32/int64 tensor of shape"):
        op(x, q, s, masked_m[:2], None, [128, 128])
    with pytest.raises(ValueError, match="static act_scale for 3 experts"):
        op(x, q, s, masked_m, torch.ones(1), [128, 128])
    with pytest.raises(ValueError, match="the weight expects 272"):
        op(x[..., :256], q, s, masked_m, None, [128, 128])
    with pytest.raises(ValueError, match="qweight must have 3 dims"):
        op(x, q[0], s[0], masked_m, None, [128, 128])
    with pytest.raises(TypeError, match="input must be float32"):
        op(x.to(torch.float8_e4m3fn), q, s, masked_m, None, [128, 128])


def test_opcheck_and_compile():
    x, q, s, masked_m = _inputs(dtype=torch.float32)
    # (test_schema is left out: its checker multiplies the fp8 weight, which has no CPU kernel.)
    checks = ("test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(op, (x, q, s, masked_m, None, [128, 128]), test_utils=checks)

    def f(x, q, s, masked_m):
        return op(x, q, s, masked_m, None, [128, 128]) * 2

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, q, s, masked_m), f(x, q, s, masked_m))


def test_reference_rejects_mis_shaped_counts():
    x, q, s, masked_m = _inputs()
    with pytest.raises(ValueError, match=r"masked_m must have shape \(3,\)"):
        R.grouped_linear_masked(x, q, s, masked_m[:1])
    with pytest.raises(ValueError, match=r"x must be \[E, M, K\]"):
        R.grouped_linear_masked(x[0], q, s, masked_m)
