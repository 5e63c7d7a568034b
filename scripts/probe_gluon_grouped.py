"""Probe: the warp-specialized Gluon grouped GEMM (kernels/grouped_wgmma.py) against the Triton
grouped GEMM, on the GPU: correctness on edge shapes, then TFLOP/s on issue 5's shape.

    python scripts/probe_gluon_grouped.py                # every variant, each in its own process
    python scripts/probe_gluon_grouped.py --one 3,8,232,0,256,1,0  # stages, group_m, math_regs,
        # maxnreg (0: none), block_n, sa by column, persistent programs (0: balanced_programs)

Each variant runs in a subprocess with a time limit, so a variant whose register split
deadlocks (setmaxnreg waits forever) is reported instead of hanging the run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import torch

VARIANTS = ["3,8,232,0,256,1,0", "3,8,232,0,256,1,128", "3,16,232,0,256,1,0", "4,8,232,0,256,1,0", "3,4,232,0,256,1,0", "3,8,232,0,256,1,66"]


def _inputs(counts, n, k, fmt, seed):
    from fp8fx import reference as R
    from fp8fx.kernels.act_quant import act_quant

    g = torch.Generator(device="cuda").manual_seed(seed)
    e = len(counts)
    w = torch.randn(e, n, k, device="cuda", generator=g) * 0.02
    w[:, :, :3] *= 200
    q, s = R.quantize_weight(w, scale_fmt=fmt)
    t = sum(counts)
    x = torch.randn(max(t, 1), k, device="cuda", generator=g).to(torch.bfloat16)[:t]
    if t:
        x[t // 2, :64] *= 500
    xq, xs = act_quant(x, ue8m0=fmt == "ue8m0")
    offs = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    return xq, xs, q, s, offs


def one(spec: str) -> None:
    from fp8fx.kernels.grouped_gemm import grouped_gemm
    from fp8fx.kernels.grouped_wgmma import grouped_gemm_wgmma

    stages, group_m, regs, maxnreg, block_n, by_col, programs = (int(v) for v in spec.split(","))
    kw = dict(stages=stages, group_m=group_m, math_regs=regs, maxnreg=maxnreg or None, block_n=block_n,
              programs=programs or None)
    by_column = (lambda sa: sa.t().contiguous().t()) if by_col else (lambda sa: sa)  # scales' layout
    worst = 0.0
    cases = [
        ([700, 0, 1, 3000, 0, 95], 4096, 7168, "float32"),
        ([700, 0, 1, 3000, 0, 95], 4096, 7168, "ue8m0"),
        ([1, 0, 0, 0], 512, 2048, "float32"),
        ([0, 0, 513, 0], 576, 7168, "float32"),  # a partial N block
        ([130, 127, 128, 1], 256, 1040, "float32"),  # a partial K block
        ([256] * 8, 2048, 768, "ue8m0"),
    ]
    for counts, n, k, fmt in cases:
        xq, xs, q, s, offs = _inputs(counts, n, k, fmt, n + k)
        ref = grouped_gemm(xq, xs, q, s, offs, torch.bfloat16, 128, 128, 8, 4)
        # a tail past offs[-1]: rows no expert owns must come back as zeros
        tail = torch.cat([xq, xq[:5]]) if xq.shape[0] else xq
        tail_s = torch.cat([xs, xs[:5]]) if xq.shape[0] else xs
        y = grouped_gemm_wgmma(xq, by_column(xs), q, s, offs, torch.bfloat16, **kw)
        y_tail = grouped_gemm_wgmma(tail, by_column(tail_s), q, s, offs, torch.bfloat16, **kw)
        y_few = grouped_gemm_wgmma(tail, by_column(tail_s), q, s, offs, torch.bfloat16, **{**kw, "programs": 3})
        torch.cuda.synchronize()
        assert torch.equal(y_few, y_tail), "3 persistent programs disagree with one per SM"
        d = (y.float() - ref.float()).abs().max().item() if y.numel() else 0.0
        rel = ((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item() if y.numel() else 0.0
        tail_ok = bool((y_tail[xq.shape[0]:] == 0).all()) and torch.equal(y_tail[: xq.shape[0]], y)
        worst = max(worst, rel)
        print(f"  check {counts} n={n} k={k} {fmt}: max|d| {d:.3g} rel {rel:.2e} tail {'ok' if tail_ok else 'BAD'}")
        assert tail_ok and rel < 1e-3, "mismatch"

    import triton

    xq, xs, q, s, offs = _inputs([8192] * 4, 4096, 7168, "float32", 0)
    flop = 2 * 4 * 8192 * 4096 * 7168
    tri = lambda: grouped_gemm(xq, xs, q, s, offs, torch.bfloat16, 128, 128, 8, 4)
    xs_g = by_column(xs)
    glu = lambda: grouped_gemm_wgmma(xq, xs_g, q, s, offs, torch.bfloat16, **kw)
    res = {"triton": [], "gluon": [], "graph": []}
    for _ in range(3):
        res["triton"].append(triton.testing.do_bench(tri, warmup=50, rep=300))
        res["gluon"].append(triton.testing.do_bench(glu, warmup=50, rep=300))
        # back-to-back CUDA-graph replays, as `bench moe` times them (no L2 flush between calls)
        res["graph"].append(triton.testing.do_bench_cudagraph(glu, rep=100, return_mode="median"))
    t_ms, g_ms, c_ms = min(res["triton"]), min(res["gluon"]), sorted(res["graph"])[1]
    print(f"RESULT {spec}: triton {flop / t_ms / 1e9:.0f} TFLOP/s, gluon {flop / g_ms / 1e9:.0f} TFLOP/s "
          f"({t_ms / g_ms:.3f}x), gluon graph replays {flop / c_ms / 1e9:.0f}, worst rel {worst:.1e}")


TABLE = [  # (experts, rows per expert, N, K)
    (4, 8192, 4096, 7168), (4, 8192, 7168, 2048), (8, 1024, 4096, 7168), (32, 256, 4096, 7168),
    (128, 64, 1536, 2048), (128, 128, 1536, 2048), (128, 256, 1536, 2048), (128, 512, 1536, 2048),
    (128, 1024, 1536, 2048), (128, 256, 2048, 768), (128, 512, 2048, 768), (128, 1024, 2048, 768),
]


def table() -> None:
    """Triton kernel (as config_for tiles it) against the Hopper kernel at 128- and 256-column
    tiles, GEMM alone, TFLOP/s: where grouped_linear should switch (dispatch.GROUPED_WGMMA_MIN_ROWS)."""
    import triton

    from fp8fx.kernels.grouped_gemm import config_for, grouped_gemm
    from fp8fx.kernels.grouped_wgmma import grouped_gemm_wgmma

    print("| experts x rows x N x K | Triton (BM) | Hopper BN 128 | Hopper BN 256 | best Hopper / Triton |")
    print("|---|---|---|---|---|")
    for e, r, n, k in TABLE:
        xq, xs, q, s, offs = _inputs([r] * e, n, k, "float32", 1)
        flop = 2 * e * r * n * k
        bm, w, st = config_for(e * r, e)
        tf = lambda fn: flop / triton.testing.do_bench(fn, warmup=25, rep=200) / 1e9
        t = tf(lambda: grouped_gemm(xq, xs, q, s, offs, torch.bfloat16, bm, 128, w, st))
        h128 = tf(lambda: grouped_gemm_wgmma(xq, xs, q, s, offs, torch.bfloat16, 128))
        h256 = tf(lambda: grouped_gemm_wgmma(xq, xs, q, s, offs, torch.bfloat16, 256)) if n % 256 == 0 else 0.0
        print(f"| {e} x {r} x {n} x {k} | {t:.0f} ({bm}) | {h128:.0f} | {h256:.0f} | {max(h128, h256) / t:.2f} |")
        sys.stdout.flush()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--one")
    p.add_argument("--variants", nargs="*", default=VARIANTS)
    p.add_argument("--timeout", type=int, default=120)
    p.add_argument("--table", action="store_true", help="Triton vs Hopper kernel by rows per expert")
    args = p.parse_args()
    if args.table:
        table()
        return 0
    if args.one:
        one(args.one)
        return 0
    print(torch.cuda.get_device_name(), torch.__version__)
    for v in args.variants:
        try:
            r = subprocess.run([sys.executable, __file__, "--one", v], capture_output=True, text=True, timeout=args.timeout)
            out = (r.stdout + r.stderr).strip().splitlines()
            print(f"== {v} rc={r.returncode}")
            print("\n".join(out[-12:] if r.returncode else out))
        except subprocess.TimeoutExpired:
            print(f"== {v} TIMEOUT after {args.timeout}s (hang?)")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
