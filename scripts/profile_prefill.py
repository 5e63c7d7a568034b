"""Kernel-level profile of one prefill (1 x 2048) of a Llama-3-8B-dimension model with few
layers: fp8fx eager vs fp8fx compiled vs bf16 compiled. Prints the top CUDA kernels of each.

    python scripts/profile_prefill.py [--layers 2] [--rows 14] [--no-eager]
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import fp8fx
from fp8fx.bench_e2e import _model


def _top(fn, label, rows=14):
    with torch.inference_mode():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    print(f"\n=== {label}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rows", type=int, default=14, help="kernels listed per variant")
    parser.add_argument("--no-eager", action="store_true", help="compiled variants only")
    args = parser.parse_args()
    model = _model(args.layers)
    ids = torch.randint(0, 1000, (1, 2048), device="cuda")
    bf16c = torch.compile(model, dynamic=True)
    _top(lambda: bf16c(input_ids=ids, use_cache=False), "bf16 compiled", args.rows)
    torch._dynamo.reset()
    fp8fx.quantize_(model)
    if not args.no_eager:
        _top(lambda: model(input_ids=ids, use_cache=False), "fp8fx eager", args.rows)
    fp8c = torch.compile(model, backend=fp8fx.backend, dynamic=True)
    _top(lambda: fp8c(input_ids=ids, use_cache=False), "fp8fx compiled", args.rows)


if __name__ == "__main__":
    main()
