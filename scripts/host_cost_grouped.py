"""Host microseconds per call of the grouped block-FP8 GEMM at a Qwen3-30B-A3B prefill shape
(2048 tokens x top-8 over 128 experts: 128 rows per expert), issued while the GPU is busy:
the Hopper (Gluon) kernel and the Triton kernel, alone and through fp8fx::grouped_linear.

    python scripts/host_cost_grouped.py [--profile]
"""
import sys

import torch

sys.path.insert(0, "scripts")
from bench_norm_quant import _host_us  # noqa: E402

from fp8fx import reference as R  # noqa: E402
from fp8fx.kernels import dispatch, grouped_wgmma  # noqa: E402
from fp8fx.kernels.act_quant import act_quant  # noqa: E402
from fp8fx.kernels.grouped_gemm import grouped_gemm  # noqa: E402

e, rows, n, k = 128, 128, 1536, 2048
x = torch.randn(e * rows, k, device="cuda", dtype=torch.bfloat16)
q, s = R.quantize_weight(torch.randn(e, n, k, device="cuda") * 0.02)
offs = torch.arange(1, e + 1, device="cuda", dtype=torch.int32) * rows
xq, xs = act_quant(x)
cases = [
    ("act_quant", lambda: act_quant(x)),
    ("act_quant, column-major scales", lambda: act_quant(x, col_major=True)),
    ("Triton grouped_gemm", lambda: grouped_gemm(xq, xs, q, s, offs, torch.bfloat16, 64, 128, 4, 4)),
    ("Hopper grouped_gemm_wgmma", lambda: grouped_wgmma.grouped_gemm_wgmma(xq, xs, q, s, offs, torch.bfloat16, 256)),
    ("grouped_linear (Hopper)", lambda: torch.ops.fp8fx.grouped_linear(x, q, s, offs, None, [128, 128])),
]
for label, fn in cases:
    print(f"{label}: {_host_us(fn):.1f} us")
dispatch.GROUPED_WGMMA_MIN_ROWS = 1 << 30
print(f"grouped_linear (Triton): {_host_us(lambda: torch.ops.fp8fx.grouped_linear(x, q, s, offs, None, [128, 128])):.1f} us")

if "--profile" in sys.argv:  # where grouped_linear's host time goes on the Hopper path
    import cProfile
    import pstats

    dispatch.GROUPED_WGMMA_MIN_ROWS = 128
    fn = lambda: torch.ops.fp8fx.grouped_linear(x, q, s, offs, None, [128, 128])  # noqa: E731
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(400_000_000)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
