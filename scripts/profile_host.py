"""Host-side cost of one compiled prefill (1 x PREFILL tokens, ``dynamic=True`` as
``bench e2e`` compiles it), bf16 compiled vs fp8fx compiled, on a Llama-3-8B-dimension model
with few layers. Per variant: GPU time (CUDA-graph replay), wall time as called, the time until
the Python call returns (host issue time), and cProfile's top functions of one call. The
generated wrapper code of each compile is written under --out.

    python scripts/profile_host.py [--layers 4] [--prefill 2048] [--out DIR]
"""

import argparse
import cProfile
import io
import os
import pstats
import time

import torch
from torch._inductor.utils import run_and_get_code

import fp8fx
from fp8fx.bench_e2e import _graph_ms, _median_ms, _model


def _host(fn, label, out, repeats=10):
    with torch.inference_mode():
        _, codes = run_and_get_code(fn)  # the first call compiles
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, label.replace(" ", "_") + "_code.py"), "w") as f:
            f.write("\n\n# ---- next graph ----\n\n".join(codes))
        for _ in range(3):
            fn()
        gpu_ms = _graph_ms(fn, repeats)
        wall_ms = _median_ms(fn, repeats)
        issue = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            issue.append((time.perf_counter() - t0) * 1e3)
            torch.cuda.synchronize()
        issue.sort()
        prof = cProfile.Profile()
        torch.cuda.synchronize()
        prof.enable()
        fn()
        torch.cuda.synchronize()
        prof.disable()
        first_ms = _first_kernel_ms(fn)
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    print(f"\n=== {label}: GPU (graph replay) {gpu_ms:.2f} ms, as called {wall_ms:.2f} ms, "
          f"host issue {issue[len(issue) // 2]:.2f} ms (median of {repeats}); the first kernel starts "
          f"{first_ms:.2f} ms after the call")
    print("\n".join(s.getvalue().splitlines()[:45]))


def _first_kernel_ms(fn) -> float:
    """Milliseconds from the Python call to the start of its first GPU kernel (guards, the
    wrapper's prologue and the first launches: the GPU idles that long)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("fp8fx_profiled_call"):
            fn()
        torch.cuda.synchronize()
    events = prof.events()
    call = min((e for e in events if e.name == "fp8fx_profiled_call"), key=lambda e: e.time_range.start)
    kernels = [e.time_range.start for e in events if e.device_type == DeviceType.CUDA]
    return (min(kernels) - call.time_range.start) / 1e3 if kernels else float("nan")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--out", default="host_profile")
    args = parser.parse_args()
    model = _model(args.layers)
    ids = torch.randint(0, 1000, (1, args.prefill), device="cuda")
    bf16c = torch.compile(model, dynamic=True)
    _host(lambda: bf16c(input_ids=ids, use_cache=False), "bf16 compiled", args.out)
    torch._dynamo.reset()
    fp8fx.quantize_(model)
    fp8c = torch.compile(model, backend=fp8fx.backend, dynamic=True)
    _host(lambda: fp8c(input_ids=ids, use_cache=False), "fp8fx compiled", args.out)


if __name__ == "__main__":
    main()
