"""Where a compiled prefill's GPU sits idle: one profiled call (1 x 2048 tokens, ``dynamic=True``
as ``bench e2e`` compiles it) of a Llama-3-8B-dimension model with few layers, bf16 compiled
vs fp8fx compiled. Per variant: kernels, busy and idle GPU time between the first and last
kernel, and the largest idle gaps with the kernels around them and whether the host launched
the next kernel late (its launch call started after the previous kernel had ended: the GPU
waited for the host) or early (the GPU itself was slow to start it).

Before the profile, three timings of the same call (medians of 10): the CUDA-graph replay
(GPU time alone), "as called" (CUDA events around the call, as ``bench e2e`` times it) and
"queued": the call issued behind a 50 ms GPU sleep, so that every kernel is queued before
the GPU reaches the first; events around the model's kernels then give GPU time in a stream
without waiting for the host. as called - queued is the host's share of the as-called time.

``--ab [OPTION]`` prints only the timings, for bf16 compiled and for fp8fx compiled with a
backend option off and at its default: ``fused_norm`` (fp8fx.rms_norm_quant for the RMSNorms
that feed quantizations; the default) or ``quant_kernels`` (fp8fx's quant kernel for the
SwiGLU product and the attention output, passes/quant_kernel.py), or ``guard_filter``
(fp8fx compiled without and with ``fp8fx.backend.guard_filter``). ``--ab pack``: the model
quantized with ``quantize_(pack=False)``, then the same model after ``pack_projections`` (q/k/v
and gate/up as one GEMM each), one after the other (a compiled graph holds its weights, so the
two cannot be interleaved), each for the given rounds.

    python scripts/prefill_gaps.py [--layers 4] [--top 12] [--logits-to-keep N]
        [--ab [fused_norm|quant_kernels|pack|guard_filter]]
"""

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import fp8fx
from fp8fx.bench_e2e import _graph_ms, _median_ms, _model


KEEP: dict = {}  # extra model kwargs (--logits-to-keep)


def _queued_ms(fn, repeats=10):
    """(GPU ms of fn's kernels when all are queued before the first runs, host ms to issue them)."""
    gpu, host = [], []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(100_000_000)  # ~50 ms at 2 GHz: the host issues everything meanwhile
        start.record()
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e3)
        end.record()
        torch.cuda.synchronize()
        gpu.append(start.elapsed_time(end))
    return statistics.median(gpu), statistics.median(host)


def _timings(fn, label, quiet=False):
    with torch.inference_mode():
        graph = _graph_ms(fn, 10)
        called = _median_ms(fn, 10)
        queued, host = _queued_ms(fn)
    if not quiet:
        print(f"\n{label}: graph replay {graph:.2f} ms, as called {called:.2f} ms, queued {queued:.2f} ms, "
              f"host issue {host:.2f} ms")
    return graph, called, queued, host


def _ab(model, ids, rounds, option="fused_norm"):
    """bf16 compiled, then fp8fx compiled with ``option`` False and at its default, measured in
    interleaved rounds (both compiled graphs alive in one process); medians over rounds."""
    torch._inductor.config.fx_graph_cache = False
    bf16c = torch.compile(model, dynamic=True)
    runs = {"bf16 compiled": [_timings(lambda: bf16c(input_ids=ids, use_cache=False, **KEEP), "", True) for _ in range(rounds)]}
    torch._dynamo.reset()
    if option == "pack":
        fp8fx.quantize_(model, pack=False)
        for packed in (False, True):
            if packed:
                fp8fx.api.pack_projections(model)
            torch._dynamo.reset()
            fn = torch.compile(model, backend=fp8fx.backend, dynamic=True)
            label = f"fp8fx pack={packed}"
            runs[label] = [_timings(lambda: fn(input_ids=ids, use_cache=False, **KEEP), label, True) for _ in range(rounds)]
        _print_ab(runs, rounds)
        return
    fp8fx.quantize_(model)
    if option == "guard_filter":
        be = fp8fx.backend_with()
        fns = {"fp8fx": torch.compile(model, backend=fp8fx.backend_with(), dynamic=True),
               "fp8fx guard_filter": torch.compile(model, backend=be, dynamic=True,
                                                   options={"guard_filter_fn": be.guard_filter})}
    else:
        default = getattr(fp8fx.backend_with(), option)
        fns = {f"fp8fx {option}={f}": torch.compile(model, backend=fp8fx.backend_with(**{option: f}), dynamic=True)
               for f in (False, default)}
    for _ in range(rounds):
        for label, fn in fns.items():
            runs.setdefault(label, []).append(_timings(lambda: fn(input_ids=ids, use_cache=False, **KEEP), label, True))
    _print_ab(runs, rounds)


def _print_ab(runs, rounds):
    med = {label: [statistics.median(col) for col in zip(*rows)] for label, rows in runs.items()}
    base = med["bf16 compiled"]
    print(f"\nmedians of {rounds} rounds (each a median of 10 calls)")
    print("| variant | graph replay ms | as called ms | queued ms | host issue ms | bf16 / it (graph, called, queued) |")
    print("|---|---|---|---|---|---|")
    for label, (g, c, q, h) in med.items():
        spread = max(r[1] for r in runs[label]) - min(r[1] for r in runs[label])
        print(f"| {label} | {g:.2f} | {c:.2f} (spread {spread:.2f}) | {q:.2f} | {h:.2f} | "
              f"{base[0] / g:.3f}, {base[1] / c:.3f}, {base[2] / q:.3f} |")


def _events(fn):
    with torch.inference_mode():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    kernels, launches = [], {}
    for e in prof.profiler.kineto_results.events():
        if e.device_type() == torch.autograd.DeviceType.CUDA:
            if e.name().startswith("Memset") or e.name().startswith("Memcpy"):
                continue
            kernels.append((e.start_ns(), e.start_ns() + e.duration_ns(), e.name(), e.correlation_id()))
        elif e.name() in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx"):
            launches[e.correlation_id()] = e.start_ns()
    kernels.sort()
    return kernels, launches


def _report(label, kernels, launches, top):
    busy = sum(end - start for start, end, _, _ in kernels)
    span = kernels[-1][1] - kernels[0][0]
    gaps = []
    for (s0, e0, n0, _), (s1, e1, n1, c1) in zip(kernels, kernels[1:]):
        gap = s1 - max(e0, s0)
        if gap > 0:
            late = launches.get(c1, 0) > e0  # the host called the launch after the GPU went idle
            gaps.append((gap, n0, n1, late))
    idle = sum(g for g, *_ in gaps)
    late_ns = sum(g for g, _, _, late in gaps if late)
    print(f"\n=== {label}: {len(kernels)} kernels, span {span / 1e6:.2f} ms, busy {busy / 1e6:.2f} ms, "
          f"idle {idle / 1e6:.2f} ms in {len(gaps)} gaps ({late_ns / 1e6:.2f} ms where the host launched late)")
    by_next = {}
    for g, _, n1, _ in gaps:
        key = n1[:60]
        by_next[key] = by_next.get(key, 0) + g
    print("idle time before each kernel kind (top):")
    for name, g in sorted(by_next.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {g / 1e3:9.1f} us  {name}")
    print("largest gaps:")
    for g, n0, n1, late in sorted(gaps, reverse=True)[:top]:
        print(f"  {g / 1e3:8.1f} us {'host late' if late else 'gpu     '}  {n0[:45]} -> {n1[:45]}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--logits-to-keep", type=int, default=0, help="1: only the last token's logits")
    parser.add_argument("--ab", nargs="?", const="fused_norm", choices=["fused_norm", "quant_kernels", "pack", "guard_filter"],
                        help="timings only: bf16, fp8fx with this backend option off and at its default")
    parser.add_argument("--rounds", type=int, default=5, help="--ab: interleaved rounds of the fp8fx variants")
    args = parser.parse_args()
    if args.logits_to_keep:
        KEEP["logits_to_keep"] = args.logits_to_keep
    model = _model(args.layers)
    ids = torch.randint(0, 1000, (1, 2048), device="cuda")
    if args.ab:
        _ab(model, ids, args.rounds, args.ab)
        return
    bf16c = torch.compile(model, dynamic=True)
    _timings(lambda: bf16c(input_ids=ids, use_cache=False, **KEEP), "bf16 compiled")
    _report("bf16 compiled", *_events(lambda: bf16c(input_ids=ids, use_cache=False, **KEEP)), args.top)
    torch._dynamo.reset()
    fp8fx.quantize_(model)
    fp8c = torch.compile(model, backend=fp8fx.backend, dynamic=True)
    _timings(lambda: fp8c(input_ids=ids, use_cache=False, **KEEP), "fp8fx compiled")
    _report("fp8fx compiled", *_events(lambda: fp8c(input_ids=ids, use_cache=False, **KEEP)), args.top)


if __name__ == "__main__":
    main()
