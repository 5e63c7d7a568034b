"""fp8fx::topk (MoE routing's top-k in one launch): the Triton kernel under TRITON_INTERPRET=1
against torch.topk, the op on CPU, and the post-grad rewrite of aten.topk (passes/topk.py)."""

import expecttest
import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from conftest import INTERPRET_INNER, check_topk, compile_post_grad, heavy_tailed, interpreted, run_interpreted, topk_rows


@pytest.mark.skipif(INTERPRET_INNER, reason="this is the launcher")
def test_interpreted_suite():
    run_interpreted(__file__)


@interpreted
@pytest.mark.parametrize(
    "shape,k",
    [((1, 128), 8), ((7, 128), 8), ((5, 3, 60), 4), ((33, 256), 16), ((2, 512), 32), ((4, 7), 7), ((3, 1), 1),
     ((6, 16), 0), ((0, 128), 8)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_torch_topk(shape, k, dtype):
    from fp8fx.kernels.topk import topk

    x = topk_rows(shape, dtype, seed=sum(shape) + k)
    values, indices = topk(x, k)
    assert values.shape == indices.shape == (*shape[:-1], k)
    check_topk(values, indices, x, k)
    if shape[0] > 3 and dtype == torch.float32:  # no ties (fp32), no NaN: the very indices of torch.topk
        assert torch.equal(indices[3:], torch.topk(x[3:], k, dim=-1).indices)


@interpreted
def test_kernel_strided_rows():
    from fp8fx.kernels.topk import topk

    x = heavy_tailed(9, 200, seed=3)[:, :128]  # rows 200 apart
    values, indices = topk(x, 8)
    ref = torch.topk(x, 8, dim=-1)
    assert torch.equal(values, ref.values) and torch.equal(indices, ref.indices)


def test_kernel_rejects_what_it_cannot_take():
    from fp8fx.kernels.topk import MAX_COLS, MAX_K, supports, topk

    with pytest.raises(ValueError, match=f"1 <= C <= {MAX_COLS}"):
        topk(torch.randn(2, MAX_COLS + 1), 4)
    with pytest.raises(ValueError, match=f"k <= min\\(C, {MAX_K}\\)"):
        topk(torch.randn(2, 128), MAX_K + 1)
    with pytest.raises(ValueError, match="got torch.int32"):
        topk(torch.ones(2, 8, dtype=torch.int32), 2)
    assert supports(torch.randn(1, 128), 8) and not supports(torch.randn(1, 128), 129)


def test_op_on_cpu_is_torch_topk_and_checks_k():
    x = heavy_tailed(4, 96, seed=5)
    values, indices = torch.ops.fp8fx.topk(x, 6)
    ref = torch.topk(x, 6, dim=-1)
    assert torch.equal(values, ref.values) and torch.equal(indices, ref.indices)
    with pytest.raises(ValueError, match="0 <= k <= x.shape\\[-1\\], got k = 97"):
        torch.ops.fp8fx.topk(x, 97)
    with pytest.raises(ValueError, match="got k = -1"):
        torch.ops.fp8fx.topk(x, -1)
    torch.library.opcheck(torch.ops.fp8fx.topk.default, (x, 6))


# --- the rewrite ---------------------------------------------------------------------------


class Router(nn.Module):
    """Qwen3-MoE's router: softmax in fp32, top-k, renormalized weights in the input dtype."""

    def __init__(self, experts=128, top_k=8, largest=True):
        super().__init__()
        self.experts, self.top_k, self.largest = experts, top_k, largest

    def forward(self, logits):
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        w, ids = torch.topk(probs, self.top_k, dim=-1, largest=self.largest)
        return (w / w.sum(-1, keepdim=True)).to(logits.dtype), ids


class TestRewrite(expecttest.TestCase):
    def test_router_topk(self):
        x = heavy_tailed(3, 16, seed=1).to(torch.bfloat16)
        (w, ids), g = compile_post_grad(Router(16, 4), x, dynamic=False)
        self.assertExpectedInline(g, """\
in0: bf16[3, 16]
v1: f32[3, 16] = prims.convert_element_type(in0, f32)
v2: f32[3, 1] = aten.amax(v1, [-1], True)
v3: f32[3, 16] = aten.sub(v1, v2)
v4: f32[3, 16] = aten.exp(v3)
v5: f32[3, 1] = aten.sum(v4, [-1], True)
v6: f32[3, 16] = aten.div(v4, v5)
v7: (f32[3, 4], i64[3, 4]) = fp8fx.topk(v6, 4)
v8: f32[3, 4] = getitem(v7, 0)
v9: i64[3, 4] = getitem(v7, 1)
v10: f32[3, 1] = aten.sum(v8, [-1], True)
v11: f32[3, 4] = aten.div(v8, v10)
v12: bf16[3, 4] = prims.convert_element_type(v11, bf16)
return (v12, v9)""")
        assert counters["fp8fx"]["topk"] == 1 and counters["fp8fx"]["topk_kept"] == 0
        ref_w, ref_ids = Router(16, 4)(x)
        assert torch.equal(ids, ref_ids) and torch.equal(w, ref_w)

    def test_left_to_aten(self):
        x = heavy_tailed(3, 600, seed=2)
        for model, why in ((Router(600, 4), "600 columns"), (Router(16, 4, largest=False), "smallest")):
            xi = x[:, : model.experts]
            (w, ids), g = compile_post_grad(model, xi, dynamic=False)
            assert "aten.topk" in g and "fp8fx.topk" not in g, why
            assert counters["fp8fx"]["topk_kept"] == 1 and counters["fp8fx"]["topk"] == 0, why
            assert torch.equal(ids, model(xi)[1])
        _, g = compile_post_grad(Router(16, 4), x[:, :16], fused_topk=False, dynamic=False)
        assert "aten.topk" in g and not counters["fp8fx"]["topk_kept"]


def test_uuid_includes_fused_topk():
    from fp8fx.passes import PostGradPass

    assert PostGradPass().uuid() != PostGradPass(fused_topk=False).uuid()
