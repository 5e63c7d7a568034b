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
@pytest.mark.parametrize("route", ["tiles", "gemv"])
def test_grouped_linear_matches_reference(e, n, k, counts, scale_fmt, route, monkeypatch):
    from fp8fx.kernels import dispatch
    from fp8fx.kernels.grouped_gemm import grouped_linear

    monkeypatch.setattr(dispatch, "GROUPED_GEMV_MAX_ROWS", 0 if route == "tiles" else 1 << 20)
    x, q, s, offs = _case(e, n, k, counts, scale_fmt, seed=e * 100 + n)
    y = grouped_linear(x, q, s, offs, None, [128, 128])
    ref = _exact(x, q, s, offs)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert torch.isfinite(y).all()
    assert rel_err(y.float(), ref) < 2e-3


@interpreted
@pytest.mark.parametrize("group_m", [1, 2, 3, 8])
def test_grouped_gemm_tile_order(group_m):
    # The 1-D grid's tile order (GROUP_M row tiles per column sweep, a partial last group,
    # tiles past the last row tile): every tile written once, each as the reference has it.
    from fp8fx.kernels.act_quant import act_quant
    from fp8fx.kernels.grouped_gemm import grouped_gemm

    x, q, s, offs = _case(4, 80, 256, [9, 0, 23, 5], "float32", seed=11)
    xq, xs = act_quant(x)
    y = grouped_gemm(xq, xs, q, s, offs, torch.float32, block_m=16, block_n=32, group_m=group_m)
    assert rel_err(y, _exact(x, q, s, offs)) < 2e-3
    ref = grouped_gemm(xq, xs, q, s, offs, torch.float32, block_m=16, block_n=32, group_m=1)
    assert torch.equal(y, ref)


@interpreted
@pytest.mark.parametrize("block_m", [1, 2, 16])
@pytest.mark.parametrize("split_k,tma", [(1, False), (3, False), (3, True)])
def test_grouped_gemv_edges(block_m, split_k, tma):
    """The grouped gemv at each row-tile size, with and without split-K, weight tiles through
    pointers or one TMA descriptor over all experts (N = 160: the last tile of an expert
    reads the next expert's rows, never stored): uneven, empty and one-row experts,
    heavy-tailed rows, rows past offs[-1] (zeros), UE8M0 activation scales."""
    from fp8fx.kernels.gemv import GemvConfig, grouped_gemv

    counts = [2, 0, 5, 1, 0, 3]
    x, q, s, offs = _case(6, 160, 400, counts, "float32", seed=block_m * 10 + split_k)
    x[3] = torch.distributions.StudentT(2.0).sample((400,)) * 3.0  # heavy tails
    x = torch.cat([x, torch.randn(2, 400)])  # two rows no expert owns
    cfg = GemvConfig(64, 4, 2, split_k=split_k, tma=tma)
    y = grouped_gemv(x, q, s, offs, torch.float32, config=cfg, block_m=block_m)
    if tma:  # the same sums as the pointer loads
        assert torch.equal(y, grouped_gemv(x, q, s, offs, torch.float32, config=GemvConfig(64, 4, 2, split_k=split_k),
                                           block_m=block_m))
    assert torch.equal(y[11:], torch.zeros(2, 160))
    assert rel_err(y[:11], _exact(x[:11], q, s, offs)) < 2e-3
    q8, s8 = R.quantize_weight(torch.randn(6, 160, 400) * 0.05, scale_fmt="ue8m0")
    y = grouped_gemv(x[:11], q8, s8, offs, torch.float32, config=cfg, act_ue8m0=True, block_m=block_m)
    want = torch.cat([R.dequantize_act(*R.quantize_act(x[a:b], 128, "ue8m0")) @ R.dequantize_weight(q8[i], s8[i]).t()
                      for i, (a, b) in enumerate(zip([0] + offs.tolist()[:-1], offs.tolist()))])
    assert rel_err(y, want) < 2e-3


@interpreted
@pytest.mark.parametrize("split_k", [1, 2])
@pytest.mark.parametrize("scale_fmt", ["float32", "ue8m0"])
@pytest.mark.parametrize("tma", [False, True])
def test_expert_gemv_matches_reference(split_k, scale_fmt, tma):
    """Unsorted rows (top-3 of 5 experts, one expert picked by several rows), heavy tails, a
    zero token; rows r read token r // 3, then rows read themselves (the down projection)."""
    from fp8fx.kernels.gemv import GemvConfig, expert_gemv

    g = torch.Generator().manual_seed(split_k)
    q, s = R.quantize_weight(torch.randn(5, 144, 272, generator=g) * 0.05, scale_fmt=scale_fmt)
    x = torch.distributions.StudentT(2.0).sample((4, 272))
    x[1] = 0.0
    ids = torch.tensor([4, 0, 2, 2, 1, 0, 3, 4, 2, 1, 0, 4])
    cfg = GemvConfig(64, 4, 2, split_k=split_k, tma=tma)
    ue8m0 = scale_fmt == "ue8m0"
    y = expert_gemv(x, ids, q, s, config=cfg, act_ue8m0=ue8m0)
    if tma:
        assert torch.equal(y, expert_gemv(x, ids, q, s, config=GemvConfig(64, 4, 2, split_k=split_k), act_ue8m0=ue8m0))
    ref = lambda xx: R.expert_linear(xx, ids, q, s)  # noqa: E731  (UE8M0 activations with e8m0 weights)
    assert rel_err(y, ref(x)) < 2e-3
    h = torch.randn(12, 272, generator=g)
    assert rel_err(expert_gemv(h, ids.int(), q, s, config=cfg, act_ue8m0=ue8m0), ref(h)) < 2e-3


def test_grouped_gemv_bad_input():
    from fp8fx.kernels.gemv import grouped_gemv

    q = torch.zeros(2, 32, 128, dtype=torch.float8_e4m3fn)
    s = torch.ones(2, 1, 1)
    x = torch.zeros(4, 128)
    with pytest.raises(ValueError, match="offs must be int32/int64 of shape"):
        grouped_gemv(x, q, s, torch.tensor([4], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"weight scales must be \[E, nN, nK\]"):
        grouped_gemv(x, q, torch.ones(1, 1, 1), torch.tensor([2, 4], dtype=torch.int32))
    with pytest.raises(TypeError, match="quantized in the kernel"):
        grouped_gemv(x.to(torch.float8_e4m3fn), q, s, torch.tensor([2, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="a has K=64, b has K=128"):
        grouped_gemv(torch.zeros(4, 64), q, s, torch.tensor([2, 4], dtype=torch.int32))
    from fp8fx.kernels.gemv import expert_gemv

    with pytest.raises(ValueError, match="expert_ids must be 1-D"):
        expert_gemv(x, torch.zeros(4, 2, dtype=torch.int64), q, s)
    with pytest.raises(ValueError, match="a multiple of T = 4 entries"):
        expert_gemv(x, torch.zeros(6, dtype=torch.int64), q, s)
    if not INTERPRET_INNER:
        with pytest.raises(RuntimeError, match="expert_gemv: the Triton kernel needs CUDA tensors"):
            expert_gemv(x, torch.zeros(8, dtype=torch.int64), q, s)


def test_grouped_block_m_rule():
    from fp8fx.kernels.gemv import grouped_block_m

    assert grouped_block_m(8, 128) == 1  # decode at batch 1, top-8 of 128 experts
    assert grouped_block_m(128, 128) == 2  # batch 16: about 1.6 rows per active expert
    assert grouped_block_m(2048, 128) == 16
    assert grouped_block_m(5, 1) == 16


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
