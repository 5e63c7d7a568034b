"""Kernel-level profile of one Qwen3-30B-A3B MoE block (transformers ``Qwen3MoeSparseMoeBlock``,
128 experts, top-8, hidden 2048, intermediate 768), eager, bf16 "grouped_mm" experts vs fp8fx
experts: GPU time per call summed over kernels, and the top kernels.

    python scripts/profile_moe_layer.py [--tokens 4096] [--calls 5] [--rows 20]
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from fp8fx.kernels.bench_moe import QWEN3, qwen3_moe_blocks


def _profile(block, x, label, calls, rows):
    with torch.inference_mode():
        for _ in range(3):
            block(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                block(x)
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.self_device_time_total for e in events) / calls
    print(f"\n=== {label}: {total / 1000:.3f} ms of kernels per call")
    print(f"{'us/call':>9} {'launches':>8}  kernel")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:rows]:
        print(f"{e.self_device_time_total / calls:9.1f} {e.count / calls:8.1f}  {e.key[:110]}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096])
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args()
    bf16, fp8 = qwen3_moe_blocks()
    for tokens in args.tokens:
        x = torch.randn(1, tokens, QWEN3["hidden"], device="cuda", dtype=torch.bfloat16)
        _profile(bf16, x, f"bf16 grouped_mm, {tokens} tokens", args.calls, args.rows)
        _profile(fp8, x, f"fp8fx, {tokens} tokens", args.calls, args.rows)


if __name__ == "__main__":
    main()
