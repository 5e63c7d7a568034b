"""``python -m fp8fx bench moe``: grouped block-FP8 GEMMs and a Qwen3-30B-A3B MoE layer.

In one process on one GPU, CUDA-graph replays (do_bench_cudagraph medians):
    grouped   fp8fx grouped GEMM (fp8 activations + scales, contiguous layout) vs bf16
              torch._grouped_mm, on shared/bench/shapes.json's DeepSeek-V3 contiguous expert
              shapes (groups x rows per group, N, K), TFLOP/s; ``--sweep`` adds GROUPED_SWEEP's
              tile configs (GEMM alone)
    masked    fp8fx masked grouped GEMM (per-expert padded batches, counts on the device) vs
              bf16 torch.bmm over the padded batches, on shapes.json's DeepSeek-V3 masked
              shapes (every row valid) and on decode batches (capacity 64 or 16, random
              counts); TFLOP/s counts the valid rows only, for both. ``--sweep`` times
              every grouped_masked.CONFIGS entry per shape (GEMM alone)
    experts   the same expert GEMMs through expert_gemv (fp8fx::expert_linear at decode: rows
              unsorted, each with its expert id) at 1, 4, 16 tokens, us; ``--sweep`` adds tile
              configs x split-K, TMA and pointer weight loads
    small     Qwen3-30B-A3B expert GEMMs (gate_up 1536 x 2048, down 2048 x 768) at decode sizes,
              random top-8 routing over 128 experts: fp8fx grouped_linear's two routes, the
              grouped gemv (quant in the kernel) and act quant + tiled grouped GEMM, vs bf16
              torch._grouped_mm, us; ``--sweep`` adds gemv tile configs
    layer     transformers Qwen3MoeSparseMoeBlock (128 experts, top-8, hidden 2048,
              intermediate 768): bf16 experts_implementation="grouped_mm" vs fp8fx
              (quantize_ -> experts_implementation="fp8fx"), at 1, 16, 256, 4096 tokens, ms
    topk      the router's top-8 of 128 fp32 probabilities at the same token counts:
              torch.topk vs fp8fx.topk (what fp8fx.backend puts in its place), us
"""

from __future__ import annotations

import argparse
import sys

import torch

# shared/bench/shapes.json "moe" (the GPU machine receives the repository only).
CONTIGUOUS = [(4, 8192), (8, 4096)]
MASKED = [(1, 1024), (2, 512), (4, 256)]
NK = [(4096, 7168), (7168, 2048)]
_TABLES = ["grouped", "masked", "small", "experts", "layer", "topk"]
QWEN3 = {"experts": 128, "top_k": 8, "hidden": 2048, "intermediate": 768, "tokens": [1, 16, 256, 4096]}


def _ms(fn, rep: int) -> float:
    import triton

    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")


# --sweep, grouped: tile configs (BLOCK_M, BLOCK_N, warps, stages, GROUP_M) timed on the
# GEMM alone next to config_for's choice.
GROUPED_SWEEP = [(128, 128, 8, 3, 8), (128, 128, 8, 5, 8), (128, 128, 8, 4, 4), (128, 128, 8, 4, 16),
                 (128, 64, 4, 4, 8), (64, 128, 4, 4, 8), (64, 128, 4, 5, 8), (128, 128, 4, 4, 8)]


def _grouped_row(groups: int, rows: int, n: int, k: int, rep: int, sweep: bool = False) -> dict:
    from fp8fx import reference
    from fp8fx.kernels import grouped_wgmma
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
    hopper = None
    if grouped_wgmma.supports(xq, q, torch.bfloat16):
        bn = grouped_wgmma.block_n_for(n)
        hopper = flops / _ms(lambda: grouped_wgmma.grouped_gemm_wgmma(xq, xs, q, s, offs, torch.bfloat16, bn), rep) / 1e9
    lin = _ms(lambda: torch.ops.fp8fx.grouped_linear(x, q, s, offs, None, [128, 128]), rep)
    row = {"shape": f"{groups} x {rows} x {n} x {k}", "bf16": flops / bf16 / 1e9, "fp8": flops / fp8 / 1e9,
           "hopper": hopper, "lin": flops / lin / 1e9, "config": (bm, 128, warps, stages, 8), "sweep": {}}
    for cfg in GROUPED_SWEEP if sweep else []:
        bm_, bn_, w_, s_, g_ = cfg
        t_ms = _ms(lambda: grouped_gemm(xq, xs, q, s, offs, torch.bfloat16, bm_, bn_, w_, s_, g_), rep)
        row["sweep"][cfg] = flops / t_ms / 1e9
    return row


# Decode batches for the masked layout (not in shapes.json): (experts, capacity M), counts
# drawn uniformly from [1, M] with a fixed seed.
MASKED_DECODE = [(8, 64), (32, 16)]


def _masked_inputs(groups: int, rows: int, n: int, k: int, full: bool):
    from fp8fx import reference

    g = torch.Generator().manual_seed(groups * rows + n)
    counts = torch.full((groups,), rows) if full else torch.randint(1, rows + 1, (groups,), generator=g)
    x = torch.randn(groups, rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(groups, n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    q, s = reference.quantize_weight(w)
    return x, w, q, s, counts.to("cuda", torch.int32), int(counts.sum())


def _masked_row(groups: int, rows: int, n: int, k: int, rep: int, full: bool, sweep: bool) -> dict:
    from fp8fx.kernels import grouped_wgmma
    from fp8fx.kernels.grouped_masked import CONFIGS, config_for, grouped_gemm_masked, masked_act_quant

    x, w, q, s, masked_m, valid = _masked_inputs(groups, rows, n, k, full)
    xq, xs = masked_act_quant(x, masked_m)
    flops = 2 * valid * n * k
    wt = w.transpose(1, 2)
    tf = lambda fn: flops / _ms(fn, rep) / 1e9
    gemm = lambda c: (lambda: grouped_gemm_masked(xq, xs, q, s, masked_m, torch.bfloat16, *c))
    row = {
        "shape": f"{groups} x {rows} x {n} x {k}",
        "valid": valid,
        "bf16": tf(lambda: torch.bmm(x, wt)),
        "fp8": tf(gemm(config_for(rows))),
        "hopper": (tf(lambda: grouped_wgmma.grouped_gemm_masked_wgmma(xq, xs, q, s, masked_m))
                   if grouped_wgmma.supports(xq.view(-1, k), q, torch.bfloat16) else None),
        "lin": tf(lambda: torch.ops.fp8fx.grouped_linear_masked(x, q, s, masked_m, None, [128, 128])),
        "config": "m{}n{}w{}s{}".format(*config_for(rows)),
    }
    if sweep:
        row["sweep"] = {"m{}n{}w{}s{}".format(*c): tf(gemm(c)) for c in CONFIGS}
    return row


def _masked_table(rep: int, sweep: bool) -> None:
    print("\n| masked grouped GEMM, experts x capacity M x N x K | valid rows | bf16 bmm TF | fp8fx Triton GEMM TF "
          "| fp8fx Hopper GEMM TF | fp8fx quant+GEMM TF (as dispatched) | best GEMM/bf16 | quant+GEMM/bf16 | config |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = [(g, r, n, k, True) for g, r in MASKED for n, k in NK]
    rows += [(g, r, n, k, False) for g, r in MASKED_DECODE for n, k in NK]
    swept = []
    for groups, capacity, n, k, full in rows:
        r = _masked_row(groups, capacity, n, k, rep, full, sweep)
        hopper = "n/a" if r["hopper"] is None else f"{r['hopper']:.0f}"
        best = max(r["fp8"], r["hopper"] or 0.0)
        print(f"| {r['shape']} | {r['valid']} | {r['bf16']:.0f} | {r['fp8']:.0f} | {hopper} | {r['lin']:.0f} "
              f"| {best / r['bf16']:.2f} | {r['lin'] / r['bf16']:.2f} | {r['config']} |")
        if sweep:
            swept.append(r)
    if swept:
        names = list(swept[0]["sweep"])
        print("\n| masked GEMM sweep, TF | " + " | ".join(names) + " | best |")
        print("|---|" + "---|" * (len(names) + 1))
        for r in swept:
            best = max(names, key=r["sweep"].get)
            print(f"| {r['shape']} | " + " | ".join(f"{r['sweep'][c]:.0f}" for c in names) + f" | {best} |")


SMALL_TOKENS = [1, 2, 4, 8, 16, 32, 64]
SMALL_SWEEP = [(128, 4, 4), (64, 4, 4), (128, 8, 4), (256, 8, 3), (64, 2, 4)]


def _small_rows(rep: int, sweep: bool) -> list[dict]:
    from fp8fx import reference
    from fp8fx.kernels.act_quant import act_quant
    from fp8fx.kernels.gemv import GemvConfig, grouped_block_m, grouped_gemv
    from fp8fx.kernels.grouped_gemm import config_for, grouped_gemm
    from fp8fx.moe import sort_by_expert

    e, top_k = QWEN3["experts"], QWEN3["top_k"]
    rows = []
    for n, k in [(2 * QWEN3["intermediate"], QWEN3["hidden"]), (QWEN3["hidden"], QWEN3["intermediate"])]:
        torch.manual_seed(n)
        w = torch.randn(e, n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        q, s = reference.quantize_weight(w)
        wt = w.transpose(-2, -1)
        for tokens in SMALL_TOKENS:
            ids = torch.rand(tokens, e, device="cuda").topk(top_k, dim=-1).indices
            _, _, offs = sort_by_expert(ids, e)
            t = tokens * top_k
            x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
            bm, warps, stages = config_for(t, e)

            def tiles():
                xq, xs = act_quant(x)
                return grouped_gemm(xq, xs, q, s, offs, torch.bfloat16, bm, 128, warps, stages)

            want = tiles().float()
            got = grouped_gemv(x, q, s, offs).float()
            row = {"shape": f"{tokens} tok ({t} rows) x {n} x {k}", "block_m": grouped_block_m(t, e),
                   "err": ((got - want).norm() / want.norm().clamp_min(1e-30)).item(),
                   "bf16": _ms(lambda: torch._grouped_mm(x, wt, offs=offs), rep) * 1e3,
                   "tiles": _ms(tiles, rep) * 1e3, "gemv": _ms(lambda: grouped_gemv(x, q, s, offs), rep) * 1e3}
            if sweep:
                for bn, nw, ns in SMALL_SWEEP:
                    for bmx in (1, 2, 16):
                        cfg = GemvConfig(bn, nw, ns)
                        row[f"{cfg}m{bmx}"] = _ms(lambda: grouped_gemv(x, q, s, offs, config=cfg, block_m=bmx), rep) * 1e3
            rows.append(row)
    return rows


EXPERT_TOKENS = [1, 4, 16]
EXPERT_SWEEP = [(128, 4, 3, False), (128, 4, 3, True), (64, 4, 3, False), (64, 4, 3, True), (64, 4, 4, True),
                (128, 4, 4, True), (128, 8, 4, False)]


def _expert_rows(rep: int, sweep: bool) -> list[dict]:
    """expert_gemv (fp8fx::expert_linear's route: rows unsorted, each with its expert id) on
    the Qwen3-30B-A3B expert shapes (the bf16 baseline at these shapes: the small table)."""
    from dataclasses import replace

    from fp8fx import reference
    from fp8fx.kernels.gemv import GROUPED_CONFIG, GemvConfig, expert_gemv

    e, top_k = QWEN3["experts"], QWEN3["top_k"]
    rows = []
    for n, k, gate_up in [(2 * QWEN3["intermediate"], QWEN3["hidden"], True), (QWEN3["hidden"], QWEN3["intermediate"], False)]:
        torch.manual_seed(n)
        q, s = reference.quantize_weight(torch.randn(e, n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
        for tokens in EXPERT_TOKENS:
            ids = torch.rand(tokens, e, device="cuda").topk(top_k, dim=-1).indices.reshape(-1)
            r = ids.numel()
            x = torch.randn(tokens if gate_up else r, k, device="cuda", dtype=torch.bfloat16)
            row = {"shape": f"{tokens} tok ({r} rows) x {n} x {k}", "gemv": _ms(lambda: expert_gemv(x, ids, q, s), rep) * 1e3}
            if sweep:
                ref = expert_gemv(x, ids, q, s, config=replace(GROUPED_CONFIG, split_k=1)).float()
                for bn, nw, ns, tma in EXPERT_SWEEP:
                    for split in (0, 1, 2, 4, 8):
                        cfg = GemvConfig(bn, nw, ns, split, tma=tma)
                        got = expert_gemv(x, ids, q, s, config=cfg).float()
                        if (got - ref).norm() > 1e-2 * ref.norm():
                            raise AssertionError(f"expert_gemv {cfg} disagrees with split 1 at {row['shape']}")
                        row[str(cfg)] = _ms(lambda: expert_gemv(x, ids, q, s, config=cfg), rep) * 1e3
            rows.append(row)
    return rows


def qwen3_moe_blocks():
    """(bf16, fp8fx) transformers ``Qwen3MoeSparseMoeBlock`` at Qwen3-30B-A3B dimensions on the
    GPU: random N(0, 0.02) weights, bf16 with "grouped_mm" experts, and a quantized copy."""
    import copy

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
    fp8 = copy.deepcopy(bf16)
    fp8.experts.config = copy.deepcopy(config)
    fp8fx.quantize_(fp8)
    return bf16, fp8


def _layer_rows(rep: int) -> list[dict]:
    bf16, fp8 = qwen3_moe_blocks()
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


def _topk_rows(rep: int) -> list[dict]:
    from fp8fx.kernels.topk import topk

    rows = []
    for tokens in QWEN3["tokens"]:
        probs = torch.randn(tokens, QWEN3["experts"], device="cuda").softmax(-1)
        ours, ref = topk(probs, QWEN3["top_k"]), torch.topk(probs, QWEN3["top_k"], dim=-1)
        same = torch.equal(ours[0], ref.values) and torch.equal(ours[1], ref.indices)
        t_torch = _ms(lambda: torch.topk(probs, QWEN3["top_k"], dim=-1), rep) * 1e3
        t_ours = _ms(lambda: topk(probs, QWEN3["top_k"]), rep) * 1e3
        rows.append({"tokens": tokens, "torch_us": t_torch, "fp8fx_us": t_ours, "same": same})
    return rows


def _print_sweep(row: dict) -> None:
    """A table row's swept configs (keys named by GemvConfig: "dot..."), best first."""
    extra = {key: v for key, v in row.items() if key.startswith("dot")}
    if extra:
        best = min(extra, key=extra.get)
        print(f"|   sweep: best {best} {extra[best]:.1f} us; " + ", ".join(f"{a} {v:.1f}" for a, v in extra.items()) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fp8fx bench moe", description=__doc__)
    parser.add_argument("--rep", type=int, default=50, help="ms of replays per measurement")
    parser.add_argument("--only", choices=_TABLES, action="append",
                        help="run only these tables (repeatable); default: all")
    parser.add_argument("--sweep", action="store_true", help="grouped, masked, small: time every tile config too")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("fp8fx bench moe: needs a CUDA GPU", file=sys.stderr)
        return 2
    tables = args.only or _TABLES
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    if "grouped" in tables:
        print("\n| grouped GEMM, groups x rows x N x K | bf16 _grouped_mm TF | fp8fx Triton GEMM TF "
              "| fp8fx Hopper GEMM TF | fp8fx quant+GEMM TF (as dispatched) | best GEMM/bf16 |")
        print("|---|---|---|---|---|---|")
        for groups, rows in CONTIGUOUS + MASKED:  # masked shapes too, here in the contiguous layout
            for n, k in NK:
                r = _grouped_row(groups, rows, n, k, args.rep, args.sweep)
                hopper = "n/a" if r["hopper"] is None else f"{r['hopper']:.0f}"
                best = max(r["fp8"], r["hopper"] or 0.0)
                print(f"| {r['shape']} | {r['bf16']:.0f} | {r['fp8']:.0f} | {hopper} | {r['lin']:.0f} | {best / r['bf16']:.2f} |")
                if r["sweep"]:
                    print(f"|   sweep (BM, BN, warps, stages, GROUP_M) TF, config_for's {r['config']}: "
                          + ", ".join(f"{c} {tf:.0f}" for c, tf in sorted(r["sweep"].items(), key=lambda i: -i[1])) + " |")
    if "masked" in tables:
        _masked_table(args.rep, args.sweep)
    if "small" in tables:
        print("\n| Qwen3-30B-A3B experts, decode | bf16 _grouped_mm us | fp8fx tiles us | fp8fx gemv us (block_m) "
              "| gemv/bf16 | gemv/tiles | gemv vs tiles rel. diff |")
        print("|---|---|---|---|---|---|---|")
        for r in _small_rows(args.rep, args.sweep):
            print(f"| {r['shape']} | {r['bf16']:.1f} | {r['tiles']:.1f} | {r['gemv']:.1f} ({r['block_m']}) "
                  f"| {r['bf16'] / r['gemv']:.2f} | {r['tiles'] / r['gemv']:.2f} | {r['err']:.1e} |")
            _print_sweep(r)
    if "experts" in tables:
        print("\n| Qwen3-30B-A3B experts, decode, unsorted rows | fp8fx expert_gemv us |")
        print("|---|---|")
        for r in _expert_rows(args.rep, args.sweep):
            print(f"| {r['shape']} | {r['gemv']:.1f} |")
            _print_sweep(r)
    if "layer" in tables:
        print("\n| Qwen3-30B-A3B MoE layer, tokens | bf16 grouped_mm ms | fp8fx ms | speed-up | rel. error |")
        print("|---|---|---|---|---|")
        for r in _layer_rows(args.rep):
            print(f"| {r['tokens']} | {r['bf16_ms']:.3f} | {r['fp8_ms']:.3f} | {r['bf16_ms'] / r['fp8_ms']:.2f} | {r['err']:.3f} |")
    if "topk" in tables:
        print(f"\n| router top-{QWEN3['top_k']} of {QWEN3['experts']}, tokens | torch.topk us | fp8fx.topk us | speed-up | same picks |")
        print("|---|---|---|---|---|")
        for r in _topk_rows(args.rep):
            print(f"| {r['tokens']} | {r['torch_us']:.1f} | {r['fp8fx_us']:.1f} | {r['torch_us'] / r['fp8fx_us']:.2f} | {r['same']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
