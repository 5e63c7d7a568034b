"""Kernel-level profile of compiled one-token decode steps with a StaticCache: bf16 compiled vs
fp8fx compiled, on a Llama-3-8B- or Qwen3-30B-A3B-dimension model with few layers. Prints, per
variant, the GPU time per step summed over kernels and the top kernels (time per step).

    python scripts/profile_decode.py [--model llama3-8b|qwen3-moe] [--layers 4] [--batch 1]
        [--trace] [--ab] [--prologue-ab] [--linear-config M,N,K=CFG] [--gemv-attr NAME=VALUE]
        [--no-pre-quant]

Each variant also gets its CUDA-graph replay time per step (bench e2e's decode timing,
steps + 4 steps, median of 5: kernels plus the gaps between them). --ab adds fp8fx compiled with
``quant_in_gemv=False`` (decode activation quant in the producers' kernels) and fp8fx compiled with
``fused_topk=False`` (the router's top-k through torch.topk) in the same process.
"""

import argparse

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import fp8fx
from fp8fx.bench_e2e import MODELS, _decode, _model, _step, prefill_static_cache, rewind


def _profile(model, fwd, label, batch, steps, rows, trace=False):
    torch.manual_seed(0)
    context = 256
    prompt = torch.randint(0, 1000, (batch, context), device="cuda")
    token = torch.randint(0, 1000, (batch, 1), device="cuda")
    with torch.inference_mode():
        cache = prefill_static_cache(model, prompt, context + steps + 4)
        for _ in range(3):  # compile and warm up
            _step(fwd, token, cache)
        rewind(cache, context)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                _step(fwd, token, cache)
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.self_device_time_total for e in events) / steps
    # The same cache length as above (no recompile): steps + 4 positions past the context.
    graph_ms, _, (logits_err, _) = _decode(model, fwd, batch, context, steps + 4, 5, "manual")
    print(f"\n=== {label}: {total / 1000:.3f} ms of kernels per step; CUDA-graph replay {graph_ms:.3f} ms/step "
          f"(logits vs eager {logits_err:.3f})")
    print(f"{'us/step':>9} {'calls/step':>10} {'us/call':>8}  kernel")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:rows]:
        per_step = e.self_device_time_total / steps
        calls = e.count / steps
        print(f"{per_step:9.1f} {calls:10.1f} {per_step / max(calls, 1e-9):8.1f}  {e.key[:110]}")
    if trace:  # the last step's kernels in launch order
        kernels = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.start)
        last = kernels[-(len(kernels) // steps):]
        print(f"\n--- {label}: the last step's {len(last)} kernels in order (us, gap before in us)")
        prev_end = None
        for e in last:
            gap = "" if prev_end is None else f"{e.time_range.start - prev_end:6.1f}"
            print(f"{e.time_range.elapsed_us():8.1f} {gap:>6}  {e.name[:100]}")
            prev_end = e.time_range.end


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=sorted(MODELS), default="llama3-8b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--trace", action="store_true", help="also print the last step's kernels in order")
    parser.add_argument("--ab", action="store_true",
                        help="also fp8fx with the decode quant in the producers, and with torch.topk")
    parser.add_argument("--prologue-ab", action="store_true",
                        help="also fp8fx with gemv_prologue=False (RMSNorm and SiLU * up in their own kernels)")
    parser.add_argument("--linear-config", action="append", default=[], metavar="M,N,K=CONFIG",
                        help="also fp8fx with the dispatch table's linear gemv config for (M, N, K) replaced, "
                             "e.g. 1,28672,4096=128,4,4,1,tma (block_n, warps, stages, split, flags pdl/tma/f<prefetch>)")
    parser.add_argument("--gemv-attr", action="append", default=[], metavar="NAME=VALUE",
                        help="also fp8fx with fp8fx.kernels.gemv.NAME set to the integer VALUE, e.g. FINISH_UNROLL=1")
    parser.add_argument("--no-pre-quant", action="store_true",
                        help="the gemv quantizes bf16 input per K block in its loop (gemv.PRE_QUANT = False)")
    args = parser.parse_args()
    if args.no_pre_quant:
        from fp8fx.kernels import gemv

        gemv.PRE_QUANT = False
    model = _model(args.layers, args.model)
    bf16c = torch.compile(model, dynamic=False)
    _profile(model, bf16c, f"bf16 compiled, {args.model}, {args.layers} layers, batch {args.batch}",
             args.batch, args.steps, args.rows, args.trace)
    torch._dynamo.reset()
    fp8fx.quantize_(model)
    variants = [({}, "fp8fx compiled")]
    if args.ab:
        variants += [({"quant_in_gemv": False}, "fp8fx compiled, quant in producers"),
                     ({"fused_topk": False}, "fp8fx compiled, torch.topk")]
    if args.prologue_ab:
        variants.append(({"gemv_prologue": False}, "fp8fx compiled, no gemv prologue"))
    for spec in args.linear_config:
        variants.append(({}, f"fp8fx compiled, linear config {spec}"))
    for spec in args.gemv_attr:
        variants.append(({}, f"fp8fx compiled, gemv.{spec}"))
    from fp8fx.kernels import dispatch, gemv

    measured = dict(dispatch.GEMV_MEASURED)
    attrs = {spec.split("=")[0]: getattr(gemv, spec.split("=")[0]) for spec in args.gemv_attr}
    for options, name in variants:
        torch._dynamo.reset()
        dispatch.GEMV_MEASURED.clear()
        dispatch.GEMV_MEASURED.update(measured)
        for attr, value in attrs.items():
            setattr(gemv, attr, value)
        if "linear config" in name:
            _patch_linear_config(dispatch, name.rsplit(" ", 1)[1])
        if ", gemv." in name:
            attr, value = name.rsplit("gemv.", 1)[1].split("=")
            setattr(gemv, attr, int(value))
        fp8c = torch.compile(model, backend=fp8fx.backend_with(**options), dynamic=False)
        _profile(model, fp8c, f"{name}, {args.model}, {args.layers} layers, batch {args.batch}",
                 args.batch, args.steps, args.rows, args.trace)


def _patch_linear_config(dispatch, spec: str) -> None:
    """M,N,K=block_n,warps,stages,split[,pdl][,tma][,f<blocks>]: the table's linear config for (M, N, K)."""
    from fp8fx.kernels.gemv import GemvConfig

    shape, cfg = spec.split("=")
    key = tuple(int(v) for v in shape.split(","))
    nums, flags = [], set()
    for part in cfg.split(","):
        (nums.append(int(part)) if part.isdigit() else flags.add(part))
    prefetch = next((int(f[1:]) for f in flags if f[:1] == "f" and f[1:].isdigit()), 0)
    gemm_cfg = dispatch.GEMV_MEASURED.get(key, (None, None))[0] or GemvConfig(*nums)
    dispatch.GEMV_MEASURED[key] = (gemm_cfg, GemvConfig(*nums, pdl="pdl" in flags, tma="tma" in flags, prefetch=prefetch))


if __name__ == "__main__":
    main()
