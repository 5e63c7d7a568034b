"""``python -m fp8fx bench moe``: grouped block-FP8 GEMMs and a Qwen3-30B-A3B MoE layer.

In one process on one GPU, CUDA-graph replays (do_bench_cudagraph medians):
    grouped   fp8fx grouped GEMM (fp8 activations + scales, contiguous layout) vs bf16
              torch._grouped_mm, on shared/bench/shapes.json's DeepSeek-V3 expert shapes
              (groups x rows per group, N, K), TFLOP/s
    layer     transformers Qwen3MoeSparseMoeBlock (128 experts, top-8, hidden 2048,
              intermediate 768): bf16 experts_implementation="grouped_mm" vs fp8fx
              (quantize_ -> experts_implementation="fp8fx"), at 1, 16, 256, 4096 tokens, ms
"""

from __future__ import annotations

import argparse
import sys

import torch

# shared/bench/shapes.json "moe" (the GPU machine receives the repository only).
CONTIGUOUS = [(4, 8192), (8, 4096)]
MASKED = [(1, 1024), (2, 512), (4, 256)]
NK = [(4096, 7168), (7168, 2048)]
QWEN3 = {"experts": 128, "top_k": 8, "hidden": 2048, "intermediate": 768, "tokens": [1, 16, 256, 4096]}


def _ms(fn, rep: int) -> float:
    import triton

    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")


def _grouped_row(groups: int, rows: int, n: int, k: int, rep: int) -> dict:
    from fp8fx import reference
    from fp8fx.kernels.act_quant import act_quant
    from fp8fx.kernels.grouped_gemm import config_for, grouped_gemm

    t = groups * rows
    x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(groups, n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    offs = torch.arange(1, groups + 1, device="cuda", dtype=torch.int32) * rows
    q, s = reference.quantize_weight(w)
    xq, xs = act_quant(x)
    bm, warps, stages = config_for(t, groups)
    flops = 2 * t * n * k
    wt = w.transpose(-2, -1)
    bf16 = _ms(lambda: torch._grouped_mm(x, wt, offs=offs), rep)
    fp8 = _ms(lambda: grouped_gemm(xq, xs, q, s, offs, torch.bfloat16, bm, 128, warps, stages), rep)
    lin = _ms(lambda: torch.ops.fp8fx.grouped_linear(x, q, s, offs, None, [128, 128]), rep)
    return {"shape": f"{groups} x {rows} x {n} x {k}", "bf16": flops / bf16 / 1e9, "fp8": flops / fp8 / 1e9,
            "lin": flops / lin / 1e9}


def _layer_rows(rep: int) -> list[dict]:
    import fp8fx
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = Qwen3MoeConfig(
        hidden_size=QWEN3["hidden"], moe_intermediate_size=QWEN3["intermediate"], num_experts=QWEN3["experts"],
        num_experts_per_tok=QWEN3["top_k"], experts_implementation="grouped_mm",
    )
    torch.manual_seed(0)
    bf16 = Qwen3MoeSparseMoeBlock(config).to("cuda", torch.bfloat16).eval()
    for p in bf16.parameters():
        p.data.normal_(0, 0.02)
    import copy

    fp8 = copy.deepcopy(bf16)
    fp8.experts.config = copy.deepcopy(config)
    fp8fx.quantize_(fp8)
    rows = []
    for tokens in QWEN3["tokens"]:
        x = torch.randn(1, tokens, QWEN3["hidden"], device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode():
            ref, out = bf16(x), fp8(x)
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            t_bf16 = _ms(lambda: bf16(x), rep)
            t_fp8 = _ms(lambda: fp8(x), rep)
        rows.append({"tokens": tokens, "bf16_ms": t_bf16, "fp8_ms": t_fp8, "err": err})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fp8fx bench moe", description=__doc__)
    parser.add_argument("--rep", type=int, default=50, help="ms of replays per measurement")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("fp8fx bench moe: needs a CUDA GPU", file=sys.stderr)
        return 2
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("\n| grouped GEMM, groups x rows x N x K | bf16 _grouped_mm TF | fp8fx GEMM TF | fp8fx quant+GEMM TF | GEMM/bf16 |")
    print("|---|---|---|---|---|")
    for groups, rows in CONTIGUOUS + MASKED:
        for n, k in NK:
            r = _grouped_row(groups, rows, n, k, args.rep)
            print(f"| {r['shape']} | {r['bf16']:.0f} | {r['fp8']:.0f} | {r['lin']:.0f} | {r['fp8'] / r['bf16']:.2f} |")
    print("\n| Qwen3-30B-A3B MoE layer, tokens | bf16 grouped_mm ms | fp8fx ms | speed-up | rel. error |")
    print("|---|---|---|---|---|")
    for r in _layer_rows(args.rep):
        print(f"| {r['tokens']} | {r['bf16_ms']:.3f} | {r['fp8_ms']:.3f} | {r['bf16_ms'] / r['fp8_ms']:.2f} | {r['err']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
