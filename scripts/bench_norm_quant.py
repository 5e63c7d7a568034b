"""fp8fx.rms_norm_quant's kernel against what Inductor makes of the same math (residual add,
transformers' RMSNorm, the decomposed activation quantization: fp8fx.backend with
fused_norm=False), per shape, CUDA-graph replay medians (us), and the kernel's registers and
spills at each warp count.

    python scripts/bench_norm_quant.py
"""

import torch
import triton

import fp8fx
from fp8fx import reference as R
from fp8fx.kernels import norm_quant
from fp8fx.passes.linear import quantize_act_decomposed

SHAPES = [(2048, 4096), (2048, 7168), (16, 4096), (1, 4096), (4096, 2048)]


def _inductor(x, r, w, eps):
    def fn(x, r, w):
        h = x + r
        q, s = quantize_act_decomposed(R.rms_norm(h, w, eps), 128, False)
        return q, s, h

    return torch.compile(fn, backend=fp8fx.backend_with(fused_norm=False), dynamic=False)


def _host_us(fn, calls=200) -> float:
    """Host microseconds per call of fn, issued while the GPU is busy (no waiting on it)."""
    import time

    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(400_000_000)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return host


def host_costs():
    x = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16)
    r, w = torch.randn_like(x), torch.rand(4096, device="cuda", dtype=torch.bfloat16)
    eps = torch.tensor(1e-5, dtype=torch.float64)
    # The same wrapper behind a plain torch.library op (schema + CUDA kernel), without
    # torch.library.custom_op's Python machinery, to see what the dispatch itself costs.
    lib = torch.library.Library("fp8fx_probe", "DEF")
    lib.define("rnq(Tensor x, Tensor? residual, Tensor weight, Tensor? eps_tensor, float eps, bool ue8m0) -> (Tensor, Tensor, Tensor)")
    lib.impl("rnq", lambda x, r, w, et, e, u: norm_quant.rms_norm_quant(x, r, w, float(et) if et is not None else e, u), "CUDA")
    print("\nhost us per call (GPU busy):")
    for label, fn in [
        ("plain torch.library op", lambda: torch.ops.fp8fx_probe.rnq.default(x, r, w, eps, 0.0, False)),
        ("torch.ops.fp8fx.rms_norm_quant", lambda: torch.ops.fp8fx.rms_norm_quant.default(x, r, w, eps, 0.0, False)),
        ("kernels.norm_quant.rms_norm_quant", lambda: norm_quant.rms_norm_quant(x, r, w, 1e-5)),
        ("torch.ops.fp8fx.act_quant", lambda: torch.ops.fp8fx.act_quant.default(x, 128, False)),
        ("torch.add (for scale)", lambda: torch.add(x, r)),
    ]:
        print(f"  {label}: {_host_us(fn):.1f}")


def main():
    print(f"{torch.cuda.get_device_name()}, triton {triton.__version__}")
    print("| rows x K | Inductor us | fp8fx kernel us (warps: regs/spills) | best / Inductor |")
    print("|---|---|---|---|")
    for m, k in SHAPES:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        r = torch.randn_like(x)
        w = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5
        ind = _inductor(x, r, w, 1e-5)
        ind(x, r, w)
        t_ind = triton.testing.do_bench_cudagraph(lambda: ind(x, r, w), rep=50) * 1e3
        cells, best = [], float("inf")
        q = torch.empty(m, k, dtype=R.FP8_DTYPE, device="cuda")
        s = norm_quant.scales_like(x)
        h = torch.empty_like(x)
        block_g = triton.next_power_of_2(k // 128)
        for warps in (2, 4, 8, 16):
            def launch(warps=warps):
                return norm_quant._rms_norm_quant_kernel[(m,)](
                    x, r, w, h, q, s, m, k, 1e-5, x.stride(0), r.stride(0),
                    HAS_RESIDUAL=True, UE8M0=False, EXACT_CAST=False, BLOCK_G=block_g, GROUP=128, num_warps=warps)

            compiled = launch()
            t = triton.testing.do_bench_cudagraph(launch, rep=50) * 1e3
            best = min(best, t)
            cells.append(f"{warps}: {t:.1f} ({compiled.n_regs}/{compiled.n_spills})")
        print(f"| {m} x {k} | {t_ind:.1f} | {'; '.join(cells)} | {best / t_ind:.2f} |")
    host_costs()


if __name__ == "__main__":
    main()
