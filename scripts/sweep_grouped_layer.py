"""Tile configs of the tiled grouped GEMM (grouped_gemm.config_for) timed inside a Qwen3-30B-A3B
MoE block at prefill sizes: the fp8fx block's eager call (CUDA-graph replay medians) per
(BLOCK_M, warps, stages), against bf16 grouped_mm in the same process.

    python scripts/sweep_grouped_layer.py [--tokens 4096 1024] [--rep 30]
"""

import argparse

import torch

from fp8fx.kernels import grouped_gemm
from fp8fx.kernels.bench_moe import QWEN3, _ms, qwen3_moe_blocks

CONFIGS = [(128, 8, 4), (128, 8, 3), (128, 4, 4), (64, 4, 4), (64, 4, 5), (64, 8, 4), (32, 4, 4)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 1024])
    parser.add_argument("--rep", type=int, default=30)
    args = parser.parse_args()
    bf16, fp8 = qwen3_moe_blocks()
    default = grouped_gemm.config_for
    for tokens in args.tokens:
        x = torch.randn(1, tokens, QWEN3["hidden"], device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode():
            t_bf16 = _ms(lambda: bf16(x), args.rep)
            print(f"{tokens} tokens: bf16 {t_bf16:.3f} ms; default config {default(tokens * QWEN3['top_k'], QWEN3['experts'])}")
            for cfg in CONFIGS:
                grouped_gemm.config_for = lambda rows, experts, cfg=cfg: cfg
                try:
                    t = _ms(lambda: fp8(x), args.rep)
                finally:
                    grouped_gemm.config_for = default
                print(f"  BM {cfg[0]:3d} w{cfg[1]} s{cfg[2]}: {t:.3f} ms ({t_bf16 / t:.2f}x bf16)")


if __name__ == "__main__":
    main()
