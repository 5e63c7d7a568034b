"""Prefill activation quantizations: Inductor's fused kernels vs fp8fx's Triton ones, and
what an Inductor-launched (user-defined Triton) kernel costs the host against a Python one.

    python scripts/probe_silu_quant.py [--code]

1. SwiGLU input of down_proj at T x 14336 (the halves of a [T, 28672] gate/up output):
   Inductor's kernel for passes/linear.quantize_act_decomposed(silu(g) * u) (scales written
   column-major), kernels.act_quant.silu_mul_quant at several tiles, bf16 silu(g) * u
   compiled, and a copy of the same bytes.
2. The attention output's quantization at T x 4096: Inductor's vs kernels.act_quant.
3. Host time per call of a compiled (dynamic=True) function that quantizes through
   silu_mul_quant as an opaque custom op vs as a user-defined Triton kernel Inductor launches.
"""

import argparse
import time

import torch
import torch.nn.functional as F
from torch.library import wrap_triton
from triton.testing import do_bench_cudagraph

from fp8fx import reference
from fp8fx.kernels import act_quant as AQ
from fp8fx.passes.linear import quantize_act_decomposed


def _bench(fn):
    return do_bench_cudagraph(fn, rep=100) * 1e3  # us


def _inductor_quant(fn_x):
    def f(*args):
        q, s = quantize_act_decomposed(fn_x(*args), 128, False)
        return q, s.t().contiguous()  # the column-major scales of the model's layout
    return torch.compile(f, dynamic=False)


@torch.library.custom_op("fp8fx_probe::smq_opaque", mutates_args=())
def smq_opaque(g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = AQ.silu_mul_quant(g, u, col_major=True)
    return q, s


@smq_opaque.register_fake
def _(g, u):
    t, k = g.shape
    return g.new_empty(t, k, dtype=torch.float8_e4m3fn), torch.empty_strided((t, k // 128), (1, t), device=g.device)


def smq_user_kernel(g, u):
    t, k = g.shape
    q = torch.empty(t, k, dtype=torch.float8_e4m3fn, device=g.device)
    s = torch.empty_strided((t, k // 128), (1, t), dtype=torch.float32, device=g.device)
    wrap_triton(AQ._act_quant_kernel)[((t + 31) // 32, k // 128)](
        g, u, q, s, t, t, k, g.stride(0), u.stride(0), q.stride(0), 1, t,
        SILU_MUL=True, UE8M0=False, EXACT_CAST=False, BLOCK_T=32, GROUP=128, num_warps=4)
    return q, s


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--code", action="store_true", help="print Inductor's generated SwiGLU-quant code")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__)
    for t in (2048, 8192):
        k = 14336
        gu = torch.randn(t, 2 * k, device="cuda", dtype=torch.bfloat16)
        g, u = gu[:, :k], gu[:, k:]
        ind = _inductor_quant(lambda g, u: F.silu(g) * u)
        qi, si = ind(g, u)
        qr, sr = reference.quantize_act(F.silu(g) * u, 128)
        q0, s0 = AQ.silu_mul_quant(g, u, col_major=True)
        agree = lambda q: (q.float() == qr.float()).float().mean().item()
        print(f"T={t}: codes agree with the reference: inductor {agree(qi):.5f}, silu_mul_quant {agree(q0):.5f}; "
              f"scales equal {torch.equal(s0, sr)}")
        if args.code and t == 2048:
            from torch._inductor.utils import run_and_get_code
            torch._dynamo.reset()
            _, code = run_and_get_code(_inductor_quant(lambda g, u: F.silu(g) * u), g, u)
            print(code[0][:6000])
        bf = torch.compile(lambda g, u: F.silu(g) * u)
        bf(g, u)
        mb = t * k * 2 * 2 / 1e6
        rows = [("inductor silu*mul + quant", lambda: ind(g, u), mb + t * k / 1e6),
                ("bf16 silu*mul compiled", lambda: bf(g, u), mb + t * k * 2 / 1e6),
                ("copy of gate+up (clone)", lambda: gu.clone(), 2 * mb)]
        for bt in (8, 16, 32, 64):
            for w in (2, 4, 8):
                rows.append((f"silu_mul_quant t{bt} w{w}", lambda bt=bt, w=w: AQ.silu_mul_quant(
                    g, u, col_major=True, block_t=bt, num_warps=w), mb + t * k / 1e6))
        for name, fn, mbytes in rows:
            us = _bench(fn)
            print(f"  {name:28s} {us:8.1f} us  {mbytes / us * 1e-3:6.2f} TB/s")
        x = torch.randn(t, 4096, device="cuda", dtype=torch.bfloat16)
        indq = _inductor_quant(lambda x: x)
        indq(x)
        for name, fn in (("attn-out inductor quant", lambda: indq(x)),
                         ("attn-out act_quant t32w4", lambda: AQ.act_quant(x, col_major=True)),
                         ("attn-out act_quant t16w4", lambda: AQ.act_quant(x, col_major=True, block_t=16)),
                         ("attn-out act_quant t64w8", lambda: AQ.act_quant(x, col_major=True, block_t=64, num_warps=8))):
            print(f"  {name:28s} {_bench(fn):8.1f} us")

    # 3. host time per call, GPU kept busy so the host never waits
    k = 14336
    torch._dynamo.reset()
    variants = {"opaque custom op": torch.compile(lambda g, u: smq_opaque(g, u), dynamic=True),
                "user Triton kernel": torch.compile(smq_user_kernel, dynamic=True)}
    for t in (64, 100, 2048):
        gu = torch.randn(t, 2 * k, device="cuda", dtype=torch.bfloat16)
        g, u = gu[:, :k], gu[:, k:]
        ref = AQ.silu_mul_quant(g, u, col_major=True)
        for name, fn in variants.items():
            q, s = fn(g, u)
            same = torch.equal(q.view(torch.uint8), ref[0].view(torch.uint8)) and torch.equal(s, ref[1])
            print(f"T={t} {name}: equal to the eager launch {same}, scale strides {s.stride()}")
    for name, fn in variants.items():
        best = []
        for _ in range(5):
            torch.cuda.synchronize()
            torch.cuda._sleep(200_000_000)
            t0 = time.perf_counter()
            for _ in range(200):
                fn(g, u)
            best.append((time.perf_counter() - t0) / 200 * 1e6)
            torch.cuda.synchronize()
        print(f"host per call, {name}: {min(best):.1f} us (median {sorted(best)[2]:.1f})")


if __name__ == "__main__":
    main()
