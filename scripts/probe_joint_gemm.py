"""Prefill GEMMs of one input (q/k/v, gate/up) as one cuBLAS blockwise GEMM over their
weights stored side by side, against one GEMM per weight (Llama-3-8B dimensions).

GPU time from CUDA-graph replay (do_bench_cudagraph) and host time per call (issued behind a
GPU sleep so the host never waits), us, at each token count.

    python scripts/probe_joint_gemm.py [--tokens 2048 512]
"""

import argparse
import statistics
import time

import torch
from triton.testing import do_bench_cudagraph

from fp8fx import reference
from fp8fx.kernels import cublas, prepared_weight_scale


def _weights(ns, k):
    w = torch.randn(sum(ns), k, device="cuda") * 0.02
    q, s = reference.quantize_weight(w, (128, 128), "float32")
    parts, row = [], 0
    for n in ns:
        parts.append((q[row:row + n], s[row // 128:(row + n) // 128]))
        row += n
    return (q, s), parts


def _gemm(xq, xs, w, s):
    return torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=prepared_weight_scale(s, w.shape[0], "cublas"),
                            out_dtype=torch.bfloat16)


def _host_us(fn, reps=50):
    out = []
    for _ in range(reps):
        torch.cuda._sleep(2_000_000)
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e6)
        torch.cuda.synchronize()
    return statistics.median(out)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 512, 8192])
    args = parser.parse_args()
    k = 4096
    print(f"{'tokens':>6} {'group':>22} {'separate us':>12} {'joint us':>9} {'ratio':>6} {'host sep':>9} {'host joint':>10}")
    for t in args.tokens:
        x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
        xq, xs = reference.quantize_act(x, 128)
        xs = xs.t().contiguous().t()  # column-major, as the compiled graph writes it
        for ns in ((4096, 1024, 1024), (14336, 14336)):
            (jq, js), parts = _weights(ns, k)
            sep = lambda: [_gemm(xq, xs, w, s) for w, s in parts]  # noqa: E731
            joint = lambda: _gemm(xq, xs, jq, js)  # noqa: E731
            torch.testing.assert_close(torch.cat(sep(), -1), joint(), rtol=0, atol=0)
            g_sep, g_joint = do_bench_cudagraph(sep, rep=200), do_bench_cudagraph(joint, rep=200)
            print(f"{t:>6} {str(ns):>22} {g_sep * 1e3:>12.1f} {g_joint * 1e3:>9.1f} {g_sep / g_joint:>6.3f} "
                  f"{_host_us(sep):>9.1f} {_host_us(joint):>10.1f}")


if __name__ == "__main__":
    main()
