"""Command line: ``python -m fp8fx demo | convert | inspect | bench``."""

from __future__ import annotations

import argparse
from pathlib import Path
import statistics
import sys
import time

import torch

__all__ = ["main"]


def _demo_model(device: torch.device, dtype: torch.dtype, layers: int):
    """A small Llama-architecture model built from a local config (random weights, no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=8192,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def _time_forward(model, ids, repeats: int) -> float:
    """Median wall time of one forward, in milliseconds (synchronized on CUDA)."""
    times = []
    for i in range(repeats + 1):
        if ids.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(ids)
        if ids.is_cuda:
            torch.cuda.synchronize()
        if i:  # the first call warms up
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def demo(args) -> int:
    import fp8fx

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16
    model = _demo_model(device, dtype, args.layers)
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), device=device)
    print(f"fp8fx demo: Llama-architecture model, {args.layers} layers, hidden 512, on {device} ({dtype}), "
          f"{args.tokens} tokens, torch {torch.__version__}")

    with torch.inference_mode():
        ref = model(ids).logits.float()
        t_bf16 = _time_forward(model, ids, args.repeats)
        report = fp8fx.quantize_(model, fp8fx.BlockFP8Config(scale_fmt=args.scale_fmt))
        out = model(ids).logits.float()
        t_fp8 = _time_forward(model, ids, args.repeats)
        compiled = torch.compile(model, backend=fp8fx.backend, dynamic=True,
                                 options={"guard_filter_fn": fp8fx.backend.guard_filter})
        t0 = time.perf_counter()
        out_c = compiled(ids).logits.float()
        t_compile = time.perf_counter() - t0
        t_fp8c = _time_forward(compiled, ids, args.repeats)

    print(report)
    # The per-weight list duplicates the report above: keep the summary, skips and rewrites.
    explanation = str(fp8fx.explain(model, ids)).splitlines()
    print("\n".join(line for line in explanation if not line.startswith("  rewritten")))
    rel = ((out - ref).norm() / ref.norm()).item()
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"output error vs bf16: relative L2 {rel:.4f}, next-token agreement {agree:.1%}")
    rel_c = ((out_c - out).norm() / out.norm()).item()
    print(f"compiled vs eager fp8fx: relative L2 {rel_c:.2e}")
    print(f"time per forward: bf16 eager {t_bf16:.1f} ms, fp8fx eager {t_fp8:.1f} ms, "
          f"fp8fx compiled {t_fp8c:.1f} ms (compile {t_compile:.1f} s; median of {args.repeats})")
    if device.type == "cpu":
        print("note: on CPU the FP8 GEMMs run the pure-torch reference (dequantize + fp32 matmul); "
              "the speed-up comes from the Hopper kernels on a GPU")
    return 0


def bench(args) -> int:
    if args.what == "gemm":
        from fp8fx.kernels import bench as gemm_bench

        return gemm_bench.main(args.rest)
    if args.what == "e2e":
        from fp8fx import bench_e2e

        return bench_e2e.main(args.rest)
    from fp8fx.kernels import bench_moe

    return bench_moe.main(args.rest)


def convert(args) -> int:
    from fp8fx.config import BlockFP8Config
    from fp8fx.convert import convert as run_convert

    config = BlockFP8Config(scale_fmt=args.scale_fmt, modules_to_not_convert=tuple(args.exclude))
    print(run_convert(args.src, args.dst, config, device=args.device))
    return 0


def inspect(args) -> int:
    from fp8fx.convert import inspect as run_inspect

    print("\n".join(run_inspect(args.path)))
    if args.trace:
        # Load the model and trace it as fp8fx.backend compiles it: the GEMMs of the real
        # graph, rewritten or skipped (a bf16 checkpoint is quantized at compile time).
        import fp8fx
        from fp8fx.hf import read_quantization_config

        if read_quantization_config(Path(args.path)) is not None:
            model = fp8fx.from_pretrained(args.path)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(args.path, dtype=torch.bfloat16).eval()
            model.requires_grad_(False)
        ids = torch.randint(0, model.config.vocab_size, (1, 8))
        print(fp8fx.explain(model, ids))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fp8fx", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="quantize a small locally built Llama model and compare it with bf16")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--scale-fmt", choices=["float32", "ue8m0"], default="float32")
    p.set_defaults(func=demo)
    p = sub.add_parser("bench", help="GPU benchmarks: gemm, moe, e2e")
    p.add_argument("what", choices=["gemm", "moe", "e2e"])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=bench)
    p = sub.add_parser("convert", help="convert a bf16/fp16 transformers checkpoint directory to block FP8")
    p.add_argument("src")
    p.add_argument("dst", help="a new directory (must not exist)")
    p.add_argument("--scale-fmt", choices=["float32", "ue8m0"], default="float32")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="keep modules matching PATTERN in high precision (repeatable; name, suffix or glob)")
    p.add_argument("--device", default="cpu", help="where to quantize (cuda is faster)")
    p.set_defaults(func=convert)
    p = sub.add_parser("inspect", help="what a checkpoint holds and what fp8fx does with each GEMM")
    p.add_argument("path")
    p.add_argument("--trace", action="store_true",
                   help="also load the model (CPU) and trace it as fp8fx.backend compiles it (fp8fx.explain)")
    p.set_defaults(func=inspect)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError, TypeError) as e:
        print(e if str(e).startswith("fp8fx") else f"fp8fx: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
