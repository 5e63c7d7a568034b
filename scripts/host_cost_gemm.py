"""Host microseconds per call of the block-FP8 GEMM as a compiled prefill graph calls it
(passes.lowering.block_gemm_extern, the recorded cuBLAS route) against torch._scaled_mm and
torch.mm called directly, issued while the GPU is busy. python scripts/host_cost_gemm.py"""
import sys

import torch
sys.path.insert(0, "scripts")
from bench_norm_quant import _host_us

from fp8fx import reference as R
from fp8fx.kernels import prepared_weight_scale
from fp8fx.kernels.act_quant import act_quant
from fp8fx.passes.lowering import block_gemm_extern
m, n, k = 2048, 4096, 4096
x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
qw, sw = R.quantize_weight(w)
xs_t = torch.empty(k // 128, m, device="cuda").t()
xq, xs = act_quant(x)
xs_t.copy_(xs)
prep = prepared_weight_scale(sw, n, "cublas")
print("extern (first call records the route)", block_gemm_extern(xq, xs_t, qw, sw, out_dtype=torch.bfloat16).shape)
for label, fn in [
    ("block_gemm_extern (compiled graph's call)", lambda: block_gemm_extern(xq, xs_t, qw, sw, out_dtype=torch.bfloat16)),
    ("torch._scaled_mm direct", lambda: torch._scaled_mm(xq, qw.t(), scale_a=xs_t, scale_b=prep, out_dtype=torch.bfloat16)),
    ("torch.mm bf16", lambda: torch.mm(x, w.t())),
    ("torch.ops.fp8fx.block_gemm", lambda: torch.ops.fp8fx.block_gemm(xq, xs_t, qw, sw, None, [128, 128], torch.bfloat16)),
]:
    print(f"{label}: {_host_us(fn):.1f} us")
