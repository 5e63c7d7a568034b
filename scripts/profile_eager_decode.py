"""Host time of eager (not compiled) one-token decode steps, bf16 vs fp8fx: a Llama-3-8B-
dimension model with few layers, batch 1, a StaticCache holding a short prompt. Per variant:
ms per step as called (CUDA events, median), and cProfile's top functions of the steps
(microseconds per step, own and cumulative, and calls per step).

    python scripts/profile_eager_decode.py [--layers 4] [--steps 8] [--top 30]
"""

import argparse
import cProfile
import pstats
import statistics

import torch

import fp8fx
from fp8fx.bench_e2e import _model, _step, prefill_static_cache, rewind


def _profile(label, model, steps, top):
    torch.manual_seed(0)
    context = 64
    prompt = torch.randint(0, 1000, (1, context), device="cuda")
    token = torch.randint(0, 1000, (1, 1), device="cuda")
    with torch.inference_mode():
        cache = prefill_static_cache(model, prompt, context + 3 * steps + 8)
        for _ in range(3):
            _step(model, token, cache)
        rewind(cache, context)
        times = []
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            _step(model, token, cache)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        rewind(cache, context)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(steps):
            _step(model, token, cache)
        prof.disable()
        torch.cuda.synchronize()
    print(f"\n{label}: {statistics.median(times):.2f} ms per step as called; cProfile per step "
          "(us own / us cumulative / calls):")
    rows = sorted(pstats.Stats(prof).stats.items(), key=lambda kv: -kv[1][2])[:top]
    for (path, line, name), (_, nc, tt, ct, _) in rows:
        print(f"{tt / steps * 1e6:9.1f} {ct / steps * 1e6:9.1f} {nc / steps:7.1f}  {path.rsplit('/', 1)[-1]}:{line}({name})")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    model = _model(args.layers)
    _profile("bf16 eager", model, args.steps, args.top)
    fp8fx.quantize_(model)
    _profile("fp8fx eager", model, args.steps, args.top)


if __name__ == "__main__":
    main()
