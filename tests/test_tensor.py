"""BlockFP8Tensor: parameter behaviour, F.linear dispatch, torch.compile tracing."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import heavy_tailed, rel_err
from fp8fx import BlockFP8Tensor, reference as R


def _qlinear(n=272, k=384, bias=True, scale_fmt="float32", seed=0, dtype=torch.bfloat16):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias).to(dtype)
    w = BlockFP8Tensor.from_hp(lin.weight, scale_fmt=scale_fmt)
    lin.weight = nn.Parameter(w, requires_grad=False)
    return lin


@pytest.mark.parametrize("scale_fmt", ["float32", "ue8m0"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_dispatches_to_reference(scale_fmt, bias):
    lin = _qlinear(bias=bias, scale_fmt=scale_fmt)
    x = heavy_tailed(2, 5, 384, dtype=torch.bfloat16, seed=3)
    y = lin(x)
    w = lin.weight
    expect = R.linear(x, w.qdata, w.scale, lin.bias, None, (128, 128))
    assert torch.equal(y, expect)
    assert y.shape == (2, 5, 272) and y.dtype == torch.bfloat16


def test_attributes_and_repr():
    w = _qlinear(scale_fmt="ue8m0").weight
    assert isinstance(w, BlockFP8Tensor) and isinstance(w, nn.Parameter)
    assert w.shape == (272, 384) and w.dtype == torch.bfloat16
    assert w.qdata.dtype == torch.float8_e4m3fn and w.scale.dtype == torch.float8_e8m0fnu
    assert w.scale.shape == (3, 3) and w.block_size == (128, 128)
    assert "BlockFP8Tensor(shape=(272, 384)" in repr(w) and "ue8m0" in repr(w)
    assert w.nbytes_fp8() == 272 * 384 + 9


def test_parameter_operations():
    lin = _qlinear()
    w = lin.weight
    for t in (w.detach(), w.clone(), copy.deepcopy(lin).weight):
        assert isinstance(t, BlockFP8Tensor)
        assert torch.equal(t.qdata.view(torch.uint8), w.qdata.view(torch.uint8))
        assert torch.equal(t.scale, w.scale)
    assert w.clone().qdata.data_ptr() != w.qdata.data_ptr()
    w.requires_grad_(False)
    assert not w.requires_grad
    # .to(dtype) keeps the fp8 codes and changes the reported dtype; model.float() likewise.
    lin.float()
    assert isinstance(lin.weight, BlockFP8Tensor) and lin.weight.dtype == torch.float32
    assert lin.weight.qdata.dtype == torch.float8_e4m3fn
    y = lin(torch.randn(3, 384))
    assert y.dtype == torch.float32
    lin.to("cpu")
    assert isinstance(lin.weight, BlockFP8Tensor)
    with pytest.raises(TypeError, match="floating dtype"):
        w.to(torch.int32)


def test_state_dict_save_load_weights_only():
    lin = _qlinear()
    buf = io.BytesIO()
    torch.save(lin.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert isinstance(sd["weight"], BlockFP8Tensor)
    fresh = _qlinear(seed=1)
    x = torch.randn(4, 384, dtype=torch.bfloat16)
    assert not torch.equal(fresh(x), lin(x))
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), lin(x))


def test_load_high_precision_state_dict_quantizes():
    lin = _qlinear()
    dense = torch.randn(272, 384, dtype=torch.bfloat16)
    lin.load_state_dict({"weight": dense, "bias": lin.bias.detach()})
    q, s = R.quantize_weight(dense)
    assert torch.equal(lin.weight.qdata.view(torch.uint8), q.view(torch.uint8))
    with pytest.raises(RuntimeError, match="size mismatch"):
        lin.load_state_dict({"weight": torch.randn(16, 384), "bias": lin.bias.detach()})
    with pytest.raises(ValueError, match="shape"):
        lin.weight.copy_(torch.randn(16, 384))


def test_expert_weights_select_and_index():
    w = torch.randn(4, 144, 256)
    t = BlockFP8Tensor.from_hp(w, act_scale=torch.rand(4))
    q, s = R.quantize_weight(w)
    one = t[2]
    assert isinstance(one, BlockFP8Tensor) and one.shape == (144, 256)
    assert torch.equal(one.scale, s[2]) and one.act_scale.shape == ()
    some = t[torch.tensor([3, 1])]
    assert some.shape == (2, 144, 256) and torch.equal(some.scale, s[[3, 1]])
    assert t[1:3].shape == (2, 144, 256)
    x = torch.randn(5, 256)
    assert torch.equal(F.linear(x, t[2]), R.linear(x, q[2], s[2], None, t.act_scale[2]))
    with pytest.raises(ValueError, match="2-D weight"):
        F.linear(x, t)
    with pytest.raises(NotImplementedError, match="dim 0"):
        t.select(1, 0)


def test_unsupported_op_is_a_clear_error():
    w = _qlinear().weight
    with pytest.raises(NotImplementedError, match="does not implement.*dequantize"):
        torch.mm(torch.randn(2, 272), w)


def test_dequantize_matches_reference():
    w = torch.randn(300, 272, dtype=torch.float16)
    t = BlockFP8Tensor.from_hp(w)
    d = t.dequantize()
    assert d.dtype == torch.float16
    assert rel_err(d, w) < 0.03


def test_bad_inputs():
    lin = _qlinear()
    with pytest.raises(ValueError, match="200 features.*expects 384"):
        lin(torch.randn(2, 200, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        lin(torch.ones(2, 384, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="one device"):
        torch.ops.fp8fx.linear(torch.randn(2, 384), lin.weight.qdata.to("meta"), lin.weight.scale, None, None, [128, 128])
    with pytest.raises(ValueError, match="NaN or Inf"):
        BlockFP8Tensor.from_hp(torch.full((128, 128), float("nan")))


@pytest.mark.parametrize("dynamic", [False, None])
def test_torch_compile_fullgraph_no_recompiles(dynamic):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    lin = _qlinear()
    cnt = CompileCounterWithBackend("inductor")
    compiled = torch.compile(lin, backend=cnt, fullgraph=True, dynamic=dynamic)
    for t in (5, 7, 9, 5):
        x = torch.randn(t, 384, dtype=torch.bfloat16)
        with torch.no_grad():
            assert torch.equal(compiled(x), lin(x))
    # dynamic=None: one static graph, then one dynamic graph for every later size.
    assert cnt.frame_count == (4 - 1 if dynamic is False else 2)
    # The same sizes again never recompile.
    before = cnt.frame_count
    with torch.no_grad():
        compiled(torch.randn(7, 384, dtype=torch.bfloat16))
    assert cnt.frame_count == before


def test_compile_graph_contains_fp8fx_linear():
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    torch._dynamo.reset()
    lin = _qlinear()
    backend = AotEagerAndRecordGraphs()
    with torch.no_grad():
        torch.compile(lin, backend=backend, fullgraph=True)(torch.randn(3, 384, dtype=torch.bfloat16))
    code = backend.fw_graphs[0].code
    assert "torch.ops.fp8fx.linear.default" in code


def test_backward_through_linear():
    lin = _qlinear(dtype=torch.float32)
    x = torch.randn(4, 384, requires_grad=True)
    lin(x).sum().backward()
    w = lin.weight.dequantize(torch.float32)
    torch.testing.assert_close(x.grad, torch.ones(4, 272) @ w)
    torch.testing.assert_close(lin.bias.grad, torch.full((272,), 4.0))
