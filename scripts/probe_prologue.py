"""Registers, spills and CUDA-graph time of the decode gemv launches at Llama-3-8B shapes
(M = 1), plain (bf16 input quantized in the kernel) vs with the RMSNorm / SiLU * up
prologue, with the dispatch table's linear configs; the plain launch also with the split-K
finish loading its partials one at a time and eight at a time (gemv.FINISH_UNROLL).

    python scripts/probe_prologue.py
"""

import torch
from triton.testing import do_bench_cudagraph

from fp8fx import reference
from fp8fx.kernels import dispatch, gemv as G


def _weights(ns, k, copies):
    return [[reference.quantize_weight(torch.randn(n, k, device="cuda") * 0.05, (128, 128)) for n in ns]
            for _ in range(copies)]


def _kernel_stats():
    out = []
    for cache in G._gemv_kernel.device_caches.values():
        for key, kern in cache[0].items():
            out.append((kern.n_regs, kern.n_spills, kern.metadata.shared))
    return out


def main():
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__)
    cases = [("qkv", (4096, 1024, 1024), 4096, "norm"), ("gate_up", (14336, 14336), 4096, "norm"),
             ("down", (4096,), 14336, "silu"), ("o", (4096,), 4096, None)]
    for name, ns, k, kind in cases:
        copies = max(2, int(4 * 60e6 / (sum(ns) * k)))  # weights over 4x L2
        sets = _weights(ns, k, copies)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        r = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        nw = torch.ones(k, device="cuda", dtype=torch.bfloat16)
        gu = torch.randn(1, 2 * k, device="cuda", dtype=torch.bfloat16)
        G.TMA_EAGER = True
        cfg = dispatch.gemv_config(1, sum(ns), k, False)

        def plain(i=[0]):
            ws = sets[i[0] % copies]; i[0] += 1
            return G.gemv_cat(x, None, [w for w, _ in ws], [s for _, s in ws], None, torch.bfloat16, config=cfg)

        def fused(i=[0]):
            ws = sets[i[0] % copies]; i[0] += 1
            q, s = [w for w, _ in ws], [s for _, s in ws]
            if kind == "norm":
                return G.gemv_cat_rms_norm(x, r, nw, 1e-5, q, s, config=cfg)
            return G.gemv_cat_silu_mul(gu[:, :k], gu[:, k:], q, s, config=cfg)

        before = len(_kernel_stats())
        plain()
        torch.cuda.synchronize()
        stats_plain = _kernel_stats()[before:]
        t_plain = do_bench_cudagraph(lambda: [plain() for _ in range(copies)], rep=50) / copies * 1e3
        line = f"{name:8s} cfg {cfg} plain {t_plain:6.2f} us regs/spills/smem {stats_plain}"
        unroll = G.FINISH_UNROLL
        for u in (1, 8):  # the split-K finish one partial at a time (the old loop) or eight
            G.FINISH_UNROLL = u
            t = do_bench_cudagraph(lambda: [plain() for _ in range(copies)], rep=50) / copies * 1e3
            line += f" | finish x{u} {t:6.2f}"
        G.FINISH_UNROLL = unroll
        if kind:
            before = len(_kernel_stats())
            fused()
            torch.cuda.synchronize()
            stats_fused = _kernel_stats()[before:]
            t_fused = do_bench_cudagraph(lambda: [fused() for _ in range(copies)], rep=50) / copies * 1e3
            line += f" | {kind} {t_fused:6.2f} us regs/spills/smem {stats_fused}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
