"""``python -m fp8fx bench e2e``: a transformers Llama at Llama-3-8B dimensions (``--model
qwen3-moe``: Qwen3-MoE at Qwen3-30B-A3B dimensions, few layers), end to end.

One process, one GPU, random bf16 weights built locally (nothing downloaded). For each variant:
prefill latency of 1 x PREFILL tokens (no cache), and decode with a static KV cache at batch 1
and 16: a CONTEXT-token prompt is prefilled into a transformers ``StaticCache`` sized
CONTEXT + STEPS, then STEPS one-token steps are timed (ms/token, tokens/s):
    bf16 eager        transformers as is
    bf16 compiled     torch.compile (Inductor)
    fp8fx eager       fp8fx.quantize_ (BlockFP8Tensor weights, fp8fx kernels)
    fp8fx compiled    torch.compile(backend=fp8fx.backend...) on the quantized model, with
                      options={"guard_filter_fn": fp8fx.backend.guard_filter} (the Dynamo
                      guards of a bf16 weight per quantized weight; --no-guard-filter: all)
Compiled decode runs from CUDA graphs: ``--graphs manual`` (default) captures the compiled
one-token step once with ``torch.cuda.graph`` and replays it (GPU time, no host overhead);
``--graphs trees`` compiles decode in Inductor's "reduce-overhead" mode instead
(``fp8fx.backend_with(mode="reduce-overhead")`` and ``compile_fx`` with that mode's options), so
the times include Dynamo's guards and the CUDA-graph-tree replay on the host.
Medians over repeats; also weight and peak memory and compile times. ``--layers`` trades
fidelity for time (32 is Llama-3-8B). The prefill computes the logits of every token, as
``model(input_ids)`` does; ``--logits-to-keep 1`` computes only the last token's, as
``generate`` prefills (the bf16 lm_head, 2048 x 128256 x 4096, is then one row). ``--batches``
with no sizes skips decode.

StaticCache in transformers 5.x keeps its own write position: each layer's
``cumulative_length``, a device tensor that every forward advances in place (forward no longer
takes ``cache_position``; one passed is ignored). Every call, warm-up and CUDA-graph replay
included, therefore writes one position further, and running past ``max_cache_len`` ends in an
``index_copy_`` out-of-bounds device assert. This bench rewinds the position (in place, so the
captured addresses stay valid) to CONTEXT before each timed run of STEPS steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

__all__ = ["cache_position", "decode_steps", "prefill_static_cache", "rewind"]

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)


# Qwen3-30B-A3B (shared/bench/shapes.json "models"): every layer MoE, 128 experts, top 8.
QWEN3_30B_A3B = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                     num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     vocab_size=151936, max_position_embeddings=8192, norm_topk_prob=True)
MODELS = {"llama3-8b": "Llama-3-8B", "qwen3-moe": "Qwen3-30B-A3B"}


def _model(layers: int, name: str = "llama3-8b"):
    """A transformers model at the named model's dimensions, random bf16 weights, on the GPU.
    The bf16 MoE baseline runs transformers' "grouped_mm" experts (torch._grouped_mm);
    fp8fx.quantize_ switches quantized experts to fp8fx's grouped block-FP8 GEMM."""
    if name == "qwen3-moe":
        from transformers import Qwen3MoeConfig as Config, Qwen3MoeForCausalLM as Model

        config = Config(num_hidden_layers=layers, tie_word_embeddings=False, experts_implementation="grouped_mm",
                        **QWEN3_30B_A3B)
    else:
        from transformers import LlamaConfig as Config, LlamaForCausalLM as Model

        config = Config(num_hidden_layers=layers, tie_word_embeddings=False, **LLAMA3_8B)
    torch.manual_seed(0)
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = Model(config)
    finally:
        torch.set_default_dtype(saved)
    for p in model.parameters():  # small random weights: realistic magnitudes, no NaN/Inf
        p.data.normal_(0.0, 0.02) if p.dim() > 1 else p.data.fill_(1.0)
    return model.eval().requires_grad_(False)


# -- static KV cache: fill, step, rewind (any device; tests/test_bench_e2e.py runs it on CPU) --


def _cursors(cache) -> list[torch.Tensor]:
    """Each layer's write position: the device tensor StaticLayer.update advances in place."""
    cursors = [getattr(layer, "cumulative_length", None) for layer in getattr(cache, "layers", ())]
    if not cursors or not all(isinstance(c, torch.Tensor) for c in cursors):
        import transformers

        raise RuntimeError(f"fp8fx bench e2e: this StaticCache (transformers {transformers.__version__}) does not "
                           "keep a cumulative_length tensor per layer; the decode loop needs one")
    return cursors


def cache_position(cache) -> int:
    """The number of positions written (the next write position); synchronizes with the device."""
    return int(_cursors(cache)[0])


def rewind(cache, position: int) -> None:
    """Set every layer's write position to ``position``, in place (CUDA-graph addresses stay valid).
    Entries past it are masked out of attention and overwritten by the next steps."""
    for cursor in _cursors(cache):
        cursor.fill_(position)


def prefill_static_cache(model, prompt: torch.Tensor, max_cache_len: int):
    """A transformers StaticCache of ``max_cache_len`` positions holding ``prompt`` (B, P) (eager
    forward). The cache allocates its tensors here, on the prompt's device, and marks them as
    static addresses, so a compiled step and a captured CUDA graph can update them in place."""
    from transformers import StaticCache

    if prompt.shape[1] >= max_cache_len:
        raise ValueError(f"prompt of {prompt.shape[1]} tokens leaves no room in a cache of {max_cache_len}")
    # transformers 5.x: StaticCache(config, max_cache_len); batch, device and dtype come from the
    # first update (4.x's positional max_batch_size would land in max_cache_len: use keywords).
    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    model(input_ids=prompt, past_key_values=cache, use_cache=True)
    return cache


def _step(fwd, token: torch.Tensor, cache) -> torch.Tensor:
    """One decode step: ``token`` (B, 1) at the cache's position; returns logits (B, 1, V)."""
    return fwd(input_ids=token, past_key_values=cache, use_cache=True).logits


def decode_steps(fwd, cache, tokens: torch.Tensor) -> torch.Tensor:
    """Feed ``tokens`` (B, n) one column at a time through ``fwd`` with ``cache``; logits (B, n, V).
    Refuses to run past the cache's end (which would be an index_copy_ device assert on CUDA)."""
    start, n, size = cache_position(cache), tokens.shape[1], min(layer.max_cache_len for layer in cache.layers)
    if start + n > size:
        raise ValueError(f"{n} steps from position {start} overflow a StaticCache of {size} positions")
    return torch.cat([_step(fwd, tokens[:, i:i + 1], cache) for i in range(n)], dim=1)


# -- timing (CUDA) ------------------------------------------------------------------------------


def _median_ms(fn, repeats: int, setup=None) -> float:
    """Median over ``repeats`` of the GPU time of ``fn()``, after one untimed call; ``setup()`` runs
    before each call, untimed."""
    times = []
    for i in range(repeats + 1):
        if setup is not None:
            setup()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        if i:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def _capture(step):
    """``step`` captured once in a CUDA graph after three warm-up calls on a side stream (the first
    compiles); returns (graph, its output tensor, seconds of the warm-up)."""
    t0 = time.perf_counter()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step()
    return g, out, warm_s


def _graph_ms(step, repeats: int) -> float:
    """Median replay time of ``step`` captured once in a CUDA graph (no host overhead)."""
    g, _, _ = _capture(step)
    return _median_ms(g.replay, repeats)


def _decode(model, fwd, batch: int, context: int, steps: int, repeats: int, graphs: str):
    """(ms per decode step, seconds of the first calls, check) at batch ``batch`` with a StaticCache.

    A random ``context``-token prompt is prefilled (eager ``model``) into a cache of
    context + steps positions; each timed run rewinds to ``context`` and makes ``steps``
    one-token steps, so the attended context grows from context to context + steps - 1.
    graphs: "none" calls ``fwd`` per step; "manual" replays one captured CUDA graph of
    ``fwd``'s step; "trees" calls ``fwd`` (compiled with CUDA graph trees) per step.
    check (when ``fwd`` is not ``model``): relative errors (logits, layer-0 keys written) of a
    run of ``steps`` new tokens against eager ``model`` making the same steps from the same
    cache; see _check_run.
    """
    if steps < 3:
        raise ValueError("--steps must be at least 3 (warm-up calls share the cache)")
    torch.manual_seed(batch)
    prompt = torch.randint(0, 1000, (batch, context), device="cuda")
    token = torch.randint(0, 1000, (batch, 1), device="cuda")  # static input buffer
    cache = prefill_static_cache(model, prompt, context + steps)
    step = lambda: _step(fwd, token, cache)  # noqa: E731
    t0 = time.perf_counter()
    if graphs == "manual":
        g, out, first_s = _capture(step)  # warm-up wrote 3 positions; capture wrote none
        run = lambda: (g.replay(), out)[1]  # noqa: E731
    else:
        step()  # compiles (trees: then records on later calls); counted below as first-call time
        torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        run = step

    def steps_run(run=run):
        for _ in range(steps):
            logits = run()
        return logits

    ms = _median_ms(steps_run, repeats, setup=lambda: rewind(cache, context)) / steps
    end = cache_position(cache)
    assert end == context + steps, f"decode ended at position {end}, expected {context + steps}"
    check = (float("nan"), float("nan"))
    if fwd is not model:
        tokens = torch.randint(0, 1000, (batch, steps), device=token.device)
        got = _check_run(cache, context, token, tokens, run)
        want = _check_run(cache, context, token, tokens, lambda: _step(model, token, cache))
        check = tuple(((g - w).norm() / w.norm()).item() for g, w in zip(got, want))
    return ms, first_s, check


def _check_run(cache, context: int, token: torch.Tensor, tokens: torch.Tensor, run):
    """(logits [B, n, V], layer-0 keys written at positions context..context+n-1) of ``run`` fed
    ``tokens`` [B, n] one at a time through the static ``token`` buffer, from the cache rewound
    to ``context`` with the positions past it zeroed. Layer-0 keys depend only on the token and
    its position (RoPE), so a step that writes the wrong slot or rotates by the wrong position
    gives a large error there; logits of a deep random-weight model barely depend on positions,
    and differ between compiled and eager by bf16 (and fp8 code) roundings anyway."""
    rewind(cache, context)
    for layer in cache.layers:
        layer.keys[:, :, context:].zero_()
        layer.values[:, :, context:].zero_()
    logits = []
    for i in range(tokens.shape[1]):
        token.copy_(tokens[:, i:i + 1])
        logits.append(run().to(torch.float32, copy=True))  # a CUDA graph's output buffer is reused
    return torch.cat(logits, dim=1), cache.layers[0].keys[:, :, context:].to(torch.float32, copy=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fp8fx bench e2e", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="llama3-8b",
                        help="llama3-8b (dense, the default) or qwen3-moe (Qwen3-30B-A3B MoE layers)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--context", type=int, default=512, help="prompt tokens in the cache before decode")
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per run")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 16], help="decode batch sizes (none: no decode)")
    parser.add_argument("--logits-to-keep", type=int, default=0,
                        help="prefill logits of the last N tokens (1: as generate prefills); 0: every token")
    parser.add_argument("--graphs", choices=["manual", "trees"], default="manual",
                        help="CUDA graphs for compiled decode: torch.cuda.graph capture, or reduce-overhead mode")
    parser.add_argument("--variants", nargs="+", default=["bf16", "fp8fx"], choices=["bf16", "fp8fx"])
    parser.add_argument("--no-guard-filter", dest="guard_filter", action="store_false",
                        help="compile fp8fx without fp8fx.backend.guard_filter (Dynamo's inner guards on quantized weights)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("fp8fx bench e2e: needs a CUDA GPU", file=sys.stderr)
        return 2
    import transformers
    from torch._dynamo.utils import counters
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    import fp8fx

    model = _model(args.layers, args.model)
    ids = torch.randint(0, 1000, (1, args.prefill), device="cuda")
    keep = {"logits_to_keep": args.logits_to_keep} if args.logits_to_keep else {}
    rows = []

    def measure(name, fwd_prefill, fwd_decode, compiled=False):
        row = {"variant": name, "compile_s": None, "decode_first_s": None}
        torch._dynamo.reset()
        counters.clear()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            if compiled:  # the first prefill call compiles
                t0 = time.perf_counter()
                fwd_prefill(input_ids=ids, use_cache=False, **keep)
                torch.cuda.synchronize()
                row["compile_s"] = time.perf_counter() - t0
            prefill = lambda: fwd_prefill(input_ids=ids, use_cache=False, **keep)  # noqa: E731
            row["prefill_ms"] = _median_ms(prefill, args.repeats)
            # The same compiled prefill replayed from a CUDA graph: GPU time without host overhead.
            row["prefill_graph_ms"] = _graph_ms(prefill, args.repeats) if compiled else float("nan")
            first = 0.0
            for b in args.batches:
                graphs = args.graphs if compiled else "none"
                ms, first_s, check = _decode(model, fwd_decode, b, args.context, args.steps, args.repeats, graphs)
                row[f"decode{b}_ms"], row[f"decode{b}_tok_s"] = ms, b * 1000.0 / ms
                row[f"decode{b}_err_vs_eager"], row[f"decode{b}_keys_err_vs_eager"] = check
                first += first_s
            if compiled:
                row["decode_first_s"] = first
        torch.cuda.synchronize()
        row["weights_gib"] = _weight_bytes(model) / 2**30
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        row["cudagraph_skips"] = counters["inductor"].get("cudagraph_skips", 0)
        row["recompiles"] = sum(counters["recompiles"].values()) if "recompiles" in counters else 0
        rows.append(row)
        print(row, flush=True)

    def compiled_pair(backend_prefill, backend_decode, guard_filter=False):
        # Prefill: dynamic sequence; decode: static shapes (one graph per batch size).
        def opts(be):
            return {"guard_filter_fn": be.guard_filter} if guard_filter else None

        return (torch.compile(model, backend=backend_prefill, dynamic=True, options=opts(backend_prefill)),
                torch.compile(model, backend=backend_decode, dynamic=False, options=opts(backend_decode)))

    def inductor(mode_options):
        def backend(gm, inputs):
            return compile_fx(gm, inputs, config_patches=mode_options)
        return backend

    trees = args.graphs == "trees"
    if "bf16" in args.variants:
        measure("bf16 eager", model, model)
        rot = dict(list_mode_options("reduce-overhead")) if trees else {}
        measure("bf16 compiled", *compiled_pair(inductor({}), inductor(rot)), compiled=True)
    report = None
    if "fp8fx" in args.variants:
        report = fp8fx.quantize_(model)
        print(report, flush=True)
        measure("fp8fx eager", model, model)
        decode_backend = fp8fx.backend_with(mode="reduce-overhead") if trees else fp8fx.backend
        measure("fp8fx compiled", *compiled_pair(fp8fx.backend, decode_backend, args.guard_filter), compiled=True)
    torch._dynamo.reset()
    _print_tables(args, rows, report, transformers.__version__)
    return 0


def _weight_bytes(model) -> int:
    from fp8fx import BlockFP8Tensor

    return sum(p.nbytes_fp8() if isinstance(p, BlockFP8Tensor) else p.numel() * p.element_size()
               for p in model.parameters())


def _print_tables(args, rows, report, tf_version: str) -> None:
    base = {r["variant"]: r for r in rows}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\ndevice {device}, torch {torch.__version__}, transformers {tf_version}, "
          f"{MODELS[args.model]} dimensions, {args.layers} layers; prefill 1 x {args.prefill} (no cache, logits of "
          f"{f'the last {args.logits_to_keep} tokens' if args.logits_to_keep else 'every token'}); decode: "
          f"StaticCache, {args.context}-token prompt then {args.steps} timed steps, CUDA graphs ({args.graphs}) "
          f"for compiled; medians of {args.repeats}")
    dec = [f"decode{b}" for b in args.batches]
    head = ["prefill ms", "prefill graph ms"] + [f"{d} ms/token" for d in dec] + [f"{d} tok/s" for d in dec]
    print("| variant | " + " | ".join(head) + " | weights GiB | peak GiB | compile s (prefill / decode) "
          "| decode vs eager, rel. err of logits; layer-0 keys |")
    print("|---" * (len(head) + 5) + "|")
    for r in rows:
        cells = [f"{r['prefill_ms']:.2f}", f"{r['prefill_graph_ms']:.2f}"]
        cells += [f"{r[f'{d}_ms']:.3f}" for d in dec] + [f"{r[f'{d}_tok_s']:.1f}" for d in dec]
        comp = "" if r["compile_s"] is None else f"{r['compile_s']:.0f} / {r['decode_first_s']:.0f}"
        err = "" if r["compile_s"] is None else " / ".join(
            f"{r[f'{d}_err_vs_eager']:.1e}; {r[f'{d}_keys_err_vs_eager']:.1e}" for d in dec)
        print(f"| {r['variant']} | " + " | ".join(cells)
              + f" | {r['weights_gib']:.2f} | {r['peak_gib']:.2f} | {comp} | {err} |")
    if {"bf16 compiled", "fp8fx compiled", "fp8fx eager", "bf16 eager"} - base.keys():
        return
    bc, fc, fe, be = base["bf16 compiled"], base["fp8fx compiled"], base["fp8fx eager"], base["bf16 eager"]
    print("\n| ratio | value | target |\n|---|---|---|")
    for b in args.batches:
        target = (">= 1.4" if args.model == "qwen3-moe" else ">= 1.6") if b == 1 else ""
        print(f"| fp8fx compiled / bf16 compiled, decode b{b} tokens/s | "
              f"{bc[f'decode{b}_ms'] / fc[f'decode{b}_ms']:.2f} | {target} |")
    prefill_target = ">= 1.35" if args.model == "llama3-8b" else ""
    print(f"| fp8fx compiled / bf16 compiled, prefill | {bc['prefill_ms'] / fc['prefill_ms']:.2f} | {prefill_target} |")
    graph_ratio = bc["prefill_graph_ms"] / fc["prefill_graph_ms"]
    print(f"| same, both prefills replayed from CUDA graphs | {graph_ratio:.2f} | |")
    print(f"| fp8fx compiled / fp8fx eager, prefill | {fe['prefill_ms'] / fc['prefill_ms']:.2f} | >= 1.15 |")
    for b in args.batches:
        print(f"| fp8fx eager / bf16 eager, decode b{b} tokens/s | {be[f'decode{b}_ms'] / fe[f'decode{b}_ms']:.2f} | |")
    fp8_share = report.bytes_after / report.bytes_before
    print(f"| weight memory, quantized linears fp8 / bf16 | {fp8_share:.3f} | <= 0.51 |")
    print(f"| weight memory, whole model (embedding and lm_head stay bf16) | "
          f"{fc['weights_gib'] / be['weights_gib']:.2f} | |")
    print(f"| peak memory fp8fx compiled / bf16 compiled | {fc['peak_gib'] / bc['peak_gib']:.2f} | |")
    print(f"| compile time (first prefill call) fp8fx / bf16 | {fc['compile_s'] / bc['compile_s']:.2f} | <= 1.5 |")
    if args.batches:
        print(f"| compile time (first decode calls) fp8fx / bf16 | {fc['decode_first_s'] / bc['decode_first_s']:.2f} | |")
    skips = {r["variant"]: r["cudagraph_skips"] for r in rows if r["cudagraph_skips"]}
    if skips:
        print(f"\nWARNING: Inductor skipped CUDA graphs: {skips}")


if __name__ == "__main__":
    sys.exit(main())
