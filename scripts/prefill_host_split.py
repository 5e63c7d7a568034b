"""Where a compiled prefill's host time goes, outside and inside the compiled callable.

For a Llama-3-8B-dimension model with few layers (1 x 2048 tokens, ``dynamic=True`` as
``bench e2e`` compiles it), each variant is compiled through a backend that wraps what the
real backend returns with two clock reads. Every timed call is issued behind a GPU sleep, so
the host never waits for the GPU; per call (medians of 20):

- outer: the whole Python call of the compiled model (Dynamo's guards, the frame, the
  compiled callable and whatever transformers runs outside the graph);
- inner: the compiled callable alone (AOT autograd's runtime wrapper and Inductor's ``call``:
  its argument checks, allocations and every kernel launch);
- first: on an idle GPU, from the end of a 1 us marker kernel issued just before the call to
  the call's first kernel (CUDA-only profile): the time before the GPU gets any work.

Then the as-called and CUDA-graph times of each variant (ms, medians of 10). Variants
(``--variants``): bf16 compiled; fp8fx compiled; the same with ``fp8fx.backend.guard_filter``
as torch.compile's ``guard_filter_fn``; fp8fx with fused_norm=False.
``--logits-to-keep N``: the prefill computes the last N tokens' logits (1: as ``generate``
prefills; 0, the default: every token's).

``--micro`` times host costs of single calls instead: the fused norm op through torch.ops,
its wrapper, its Triton launch alone (outputs preallocated), and the GEMM extern.
``--profile``: cProfile of the fp8fx prefill, per function (own and cumulative us per call).
``--lead-in``: per variant, the host time from the call to its first kernel launch, by function.

    python scripts/prefill_host_split.py [--layers 16] [--logits-to-keep N] [--micro | --profile]
"""

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import fp8fx
from fp8fx.bench_e2e import _graph_ms, _median_ms, _model


def _host_us(fn, repeats=200):
    """Median host microseconds of fn() issued while the GPU is busy."""
    for _ in range(3):
        fn()
    times = []
    torch.cuda._sleep(200_000_000)
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times)


def micro():
    from fp8fx.kernels import norm_quant
    from fp8fx.passes import lowering
    import fp8fx.reference as R

    m, k = 2048, 4096
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    r, w = torch.randn_like(x), torch.rand(k, device="cuda", dtype=torch.bfloat16)
    eps = torch.tensor(1e-5, dtype=torch.float64)
    q = torch.empty(m, k, dtype=R.FP8_DTYPE, device="cuda")
    s = norm_quant.scales_like(x)
    h = torch.empty_like(x)
    kern = norm_quant._rms_norm_quant_kernel

    def launch():
        kern[(m,)](x, r, w, h, q, s, m, k, 1e-5, x.stride(0), r.stride(0),
                   HAS_RESIDUAL=True, UE8M0=False, EXACT_CAST=False, BLOCK_G=32, GROUP=128, num_warps=16)

    qw, sw = fp8fx.reference.quantize_weight(torch.randn(k, k, device="cuda", dtype=torch.bfloat16))
    xq, xs = torch.ops.fp8fx.act_quant.default(x, 128, False)
    xs_cm = xs.t().contiguous().t()
    rows = [
        ("torch.ops.fp8fx.rms_norm_quant", lambda: torch.ops.fp8fx.rms_norm_quant.default(x, r, w, eps, 0.0, False)),
        ("lowering.rms_norm_quant_extern (what compiled graphs call)",
         lambda: lowering.rms_norm_quant_extern(x, r, w, eps, 0.0, False)),
        ("kernels.norm_quant.rms_norm_quant (wrapper)", lambda: norm_quant.rms_norm_quant(x, r, w, 1e-5)),
        ("Triton launch alone (outputs preallocated)", launch),
        ("three torch.empty", lambda: (torch.empty(m, k, dtype=R.FP8_DTYPE, device="cuda"), norm_quant.scales_like(x),
                                       torch.empty_like(x))),
        ("eps.item() (CPU scalar)", lambda: eps.item()),
        ("lowering.block_gemm_extern (cuBLAS route)", lambda: lowering.block_gemm_extern(xq, xs_cm, qw, sw, out_dtype=torch.bfloat16)),
        ("torch.mm bf16", lambda: torch.mm(x, w.new_empty(k, k))),
    ]
    print("\nhost us per call (GPU busy), medians of 200, two passes over the list:")
    times = [[_host_us(fn) for _, fn in rows] for _ in range(2)]
    for (label, _), a, b in zip(rows, *times):
        print(f"  {label}: {a:.1f} / {b:.1f}")


def profile_inner(layers: int, keep: dict, calls: int = 20, top: int = 40):
    """cProfile of ``calls`` compiled fp8fx prefills issued behind a GPU sleep: per function,
    microseconds per prefill (own time and cumulative) and calls per prefill."""
    model = _model(layers)
    ids = torch.randint(0, 1000, (1, 2048), device="cuda")
    fp8fx.quantize_(model)
    _profile_one("fp8fx compiled", torch.compile(model, backend=fp8fx.backend, dynamic=True), ids, keep, layers, calls, top)


def _profile_one(label, fn, ids, keep, layers, calls, top):
    import cProfile
    import pstats

    with torch.inference_mode():
        for _ in range(3):
            fn(input_ids=ids, use_cache=False, **keep)
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        for _ in range(calls):
            torch.cuda._sleep(400_000_000)
            prof.enable()
            fn(input_ids=ids, use_cache=False, **keep)
            prof.disable()
            torch.cuda.synchronize()
    stats = pstats.Stats(prof).stats
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    print(f"\n{label}, {layers} layers: per prefill, us own / us cumulative / calls")
    for (path, line, name), (cc, nc, tt, ct, _) in rows:
        print(f"{tt / calls * 1e6:9.1f} {ct / calls * 1e6:9.1f} {nc / calls:7.1f}  {path.split('/')[-1]}:{line}({name})")


def _wrap(backend, record):
    def compile_(gm, example_inputs):
        fn = backend(gm, example_inputs)

        def run(*args):
            t0 = time.perf_counter()
            out = fn(*args)
            record.append((t0, time.perf_counter()))
            return out

        return run

    return compile_


# C functions that put work on the GPU: Triton's and Inductor's launchers, extern GEMMs.
_LAUNCHES = {"launch", "_launch_kernel", "_scaled_mm", "mm", "addmm", "embedding"}


def _lead_in(label, call, top=14):
    """One call under sys.setprofile up to the first kernel launch (a C function in _LAUNCHES):
    the host time before the GPU gets work, split by function (exclusive time; the hook
    inflates Python-heavy parts). Issued behind a GPU sleep."""
    import sys

    events: list = []

    def hook(frame, event, arg):
        if event.startswith("c_"):
            name = getattr(arg, "__qualname__", None) or getattr(arg, "__name__", None) or str(arg)
        else:
            name = f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_code.co_name}"
        events.append((time.perf_counter(), event, name))
        if event == "c_call" and name.rsplit(".", 1)[-1] in _LAUNCHES:
            sys.setprofile(None)

    with torch.inference_mode():
        call()
        torch.cuda.synchronize()
        torch.cuda._sleep(200_000_000)
        t0 = time.perf_counter()
        sys.setprofile(hook)
        call()
        sys.setprofile(None)
        torch.cuda.synchronize()
    own: dict = {}
    stack = ["(caller)"]
    prev = t0
    for t, event, name in events:
        own[stack[-1]] = own.get(stack[-1], 0.0) + t - prev
        prev = t
        if event in ("call", "c_call"):
            stack.append(name)
        elif len(stack) > 1:
            stack.pop()
    first = events[-1][2] if events else "?"
    print(f"{label}: {(prev - t0) * 1e3:.2f} ms from the call to the first launch ({first}); exclusive ms:")
    for name, t in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {t * 1e3:7.3f}  {name}")


def _split(label, call, record, repeats=20):
    with torch.inference_mode():
        for _ in range(3):
            call()
        outer, inner = [], []
        for _ in range(repeats):
            record.clear()
            torch.cuda._sleep(200_000_000)
            t0 = time.perf_counter()
            call()
            t1 = time.perf_counter()
            outer.append((t1 - t0) * 1e3)
            inner.append(sum(b - a for a, b in record) * 1e3)
            torch.cuda.synchronize()
        firsts = []
        for _ in range(5):
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                torch.cuda._sleep(1000)
                call()
                torch.cuda.synchronize()
            ks = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                        if e.device_type == torch.autograd.DeviceType.CUDA and "Memset" not in e.name)
            firsts.append((ks[1][0] - ks[0][1]) / 1e3)
        graph = _graph_ms(call, 10)
        called = _median_ms(call, 10)
    print(f"{label}: host outer {statistics.median(outer):.2f} ms, inner {statistics.median(inner):.2f} ms "
          f"(outside the callable {statistics.median(outer) - statistics.median(inner):.2f}); marker end -> first "
          f"kernel {statistics.median(firsts):.2f} ms; graph replay {graph:.2f} ms, as called {called:.2f} ms "
          f"(+{called - graph:.2f})")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--logits-to-keep", type=int, default=0, help="1: only the last token's logits")
    parser.add_argument("--variants", nargs="+", default=["bf16", "fp8fx", "fp8fx_guard_filter", "fused_norm_off"],
                        choices=["bf16", "fp8fx", "fp8fx_guard_filter", "fused_norm_off"])
    parser.add_argument("--micro", action="store_true")
    parser.add_argument("--profile", action="store_true", help="cProfile of the fp8fx prefill's host time")
    parser.add_argument("--lead-in", action="store_true",
                        help="per variant, only the host time from the call to its first kernel launch, by function")
    args = parser.parse_args()
    keep = {"logits_to_keep": args.logits_to_keep} if args.logits_to_keep else {}
    if args.micro:
        micro()
        return
    if args.profile:
        profile_inner(args.layers, keep)
        return
    from torch._inductor.compile_fx import compile_fx

    torch._inductor.config.fx_graph_cache = False  # variants differ in lowering only
    model = _model(args.layers)
    ids = torch.randint(0, 1000, (1, 2048), device="cuda")
    rec: list = []
    if "bf16" in args.variants:
        bf16c = torch.compile(model, backend=_wrap(compile_fx, rec), dynamic=True)
        run = _lead_in if args.lead_in else _split
        run("bf16 compiled", lambda: bf16c(input_ids=ids, use_cache=False, **keep), *([] if args.lead_in else [rec]))
        torch._dynamo.reset()
    fp8fx.quantize_(model)
    for label, be in [("fp8fx", fp8fx.backend), ("fp8fx_guard_filter", fp8fx.backend),
                      ("fused_norm_off", fp8fx.backend_with(fused_norm=False))]:
        if label in args.variants:
            opts = {"guard_filter_fn": be.guard_filter} if label.endswith("guard_filter") else None
            fn = torch.compile(model, backend=_wrap(be, rec), dynamic=True, options=opts)
            run = _lead_in if args.lead_in else _split
            run(f"{label} compiled", lambda: fn(input_ids=ids, use_cache=False, **keep), *([] if args.lead_in else [rec]))
            torch._dynamo.reset()


if __name__ == "__main__":
    main()
