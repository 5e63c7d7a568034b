"""DeepGEMM grouped-GEMM adapters (fp8fx.kernels.deepgemm), on CPU.

DeepGEMM is installed on none of our machines, so the adapters run here against a stand-in
written from DeepGEMM's documented semantics (README and the Python bindings' arguments):
it checks the layouts the adapters promise and computes the product in pure torch. This
tests our side of the contract, not DeepGEMM.
"""

import pytest
import torch

from conftest import heavy_tailed
from fp8fx import reference as R
from fp8fx.kernels import deepgemm


def _tma(mn):
    return (mn + 3) // 4 * 4


class FakeDeepGEMM:
    """m_grouped_fp8_gemm_nt_{contiguous,masked} as documented; padding output rows get NaN
    (DeepGEMM leaves them unspecified)."""

    def __init__(self, arch, align=128):
        self.arch, self.align = arch, align

    def get_mk_alignment_for_contiguous_layout(self):
        return self.align

    def _sfa(self, sfa, m, groups):
        if self.arch == 9:
            assert sfa.dtype == torch.float32 and sfa.stride(-2) == 1 and sfa.stride(-1) == _tma(m)
            return sfa.float()
        assert sfa.dtype == torch.int32 and sfa.stride(-2) == 1 and sfa.stride(-1) == _tma(m)
        return deepgemm.unpack_ue8m0_mn_major(sfa, groups)

    def _weight(self, b, sfb, g):
        n, k = b.shape[1:]
        if self.arch == 9:
            assert sfb.dtype == torch.float32 and sfb.is_contiguous()
            return R.dequantize_weight(b[g], sfb[g])
        rows = deepgemm.unpack_ue8m0_mn_major(sfb[g], (k + 127) // 128)  # [N, nK], one per row
        return b[g].float() * rows.repeat_interleave(128, dim=-1)[:, :k]

    def m_grouped_fp8_gemm_nt_contiguous(self, a, b, d, m_indices):
        (x, sfa), (w, sfb) = a, b
        tp, k = x.shape
        assert tp % self.align == 0 and m_indices.shape == (tp,) and m_indices.dtype == torch.int32
        assert m_indices.is_contiguous() and d.shape == (tp, w.shape[1])
        idx = m_indices.tolist()
        for r, g in enumerate(idx):  # every expert segment starts aligned
            if g >= 0 and (r == 0 or idx[r - 1] != g):
                assert r % self.align == 0, f"expert {g} starts at row {r}"
        xd = R.dequantize_act(x, self._sfa(sfa, tp, (k + 127) // 128))
        d.fill_(float("nan"))
        for g in sorted(set(idx) - {-1}):
            rows = m_indices == g
            d[rows] = (xd[rows] @ self._weight(w, sfb, g).t()).to(d.dtype)

    def m_grouped_fp8_gemm_nt_masked(self, a, b, d, masked_m, expected_m):
        (x, sfa), (w, sfb) = a, b
        e, m, k = x.shape
        assert masked_m.dtype == torch.int32 and masked_m.shape == (e,) and expected_m > 0
        xd = R.dequantize_act(x, self._sfa(sfa, m, (k + 127) // 128))
        d.fill_(float("nan"))
        for g, c in enumerate(masked_m.tolist()):
            d[g, :c] = (xd[g, :c] @ self._weight(w, sfb, g).t()).to(d.dtype)


def test_contiguous_layout_pads_each_expert_to_the_alignment():
    offs = torch.tensor([3, 3, 200, 200, 205])
    dest, m_indices = deepgemm.contiguous_layout(offs, 210, 128)
    tp = 896  # ceil((210 + 5 * 127) / 128) * 128
    assert m_indices.shape == (tp,) and m_indices.dtype == torch.int32
    expect_dest = list(range(3)) + list(range(128, 325)) + list(range(384, 389)) + [tp] * 5
    assert dest.tolist() == expect_dest
    expect = torch.full((tp,), -1, dtype=torch.int32)
    expect[:3], expect[128:325], expect[384:389] = 0, 2, 4
    assert torch.equal(m_indices, expect)


def test_grouped_scale_layouts():
    xs = torch.rand(2, 5, 3)
    a = deepgemm.mn_major_tma_aligned(xs)
    assert a.stride() == (24, 1, 8) and torch.equal(a, xs)
    assert deepgemm.prepare_act_scale(a) is a
    _, ws = R.quantize_weight(torch.randn(3, 300, 640), scale_fmt="ue8m0")
    sfb = deepgemm.prepare_weight_scale(ws, 300, arch_major=10)
    assert sfb.shape == (3, 300, 2) and sfb.stride()[1:] == (1, 300)
    for g in range(3):
        assert torch.equal(sfb[g], deepgemm.prepare_weight_scale(ws[g], 300, arch_major=10))
    assert torch.equal(deepgemm.prepare_weight_scale(ws, 300, arch_major=9), ws.float())


@pytest.mark.parametrize("arch,scale_fmt,align", [(9, "float32", 128), (9, "ue8m0", 64), (10, "ue8m0", 128)])
def test_contiguous_adapter(monkeypatch, arch, scale_fmt, align):
    monkeypatch.setattr(deepgemm, "load", lambda: FakeDeepGEMM(arch, align))
    e, n, k = 4, 192, 384
    q, s = R.quantize_weight(heavy_tailed(e, n, k, seed=3) * 0.05, scale_fmt=scale_fmt)
    offs = torch.tensor([70, 70, 200, 230], dtype=torch.int32)
    x = heavy_tailed(240, k, seed=4)  # rows 230: belong to no expert
    xq, xs = R.quantize_act(x, 128, scale_fmt)
    sfb = deepgemm.prepare_weight_scale(s, n, arch)
    y = deepgemm.grouped_contiguous(xq, xs, q, sfb, offs, torch.float32, arch)
    ref = R.grouped_linear(x, q, s, offs)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert torch.equal(y[230:], torch.zeros(10, n))


@pytest.mark.parametrize("arch,scale_fmt", [(9, "float32"), (10, "ue8m0")])
def test_masked_adapter(monkeypatch, arch, scale_fmt):
    monkeypatch.setattr(deepgemm, "load", lambda: FakeDeepGEMM(arch))
    e, m, n, k = 3, 6, 128, 256
    q, s = R.quantize_weight(heavy_tailed(e, n, k, seed=5) * 0.05, scale_fmt=scale_fmt)
    x = heavy_tailed(e, m, k, seed=6)
    masked_m = torch.tensor([6, 0, 4], dtype=torch.int32)
    xq, xs = R.quantize_act(x, 128, scale_fmt)
    xs = deepgemm.mn_major_tma_aligned(xs)  # the layout masked_act_quant(mn_major=True) writes
    sfb = deepgemm.prepare_weight_scale(s, n, arch)
    y = deepgemm.grouped_masked(xq, xs, q, sfb, masked_m, torch.float32, arch)
    ref = R.grouped_linear_masked(x, q, s, masked_m)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_grouped_support_gates():
    cpu = torch.device("cpu")
    assert not deepgemm.supports_grouped("masked", 4096, 7168, torch.bfloat16, cpu, False)
    with pytest.raises(ValueError, match="layout must be one of"):
        deepgemm.supports_grouped("ragged", 4096, 7168, torch.bfloat16, cpu, False)
    assert deepgemm.contiguous_alignment(object()) == 128
