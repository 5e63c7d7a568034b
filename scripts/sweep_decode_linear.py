"""The gemv's linear configs (bf16 activations quantized in the kernel: what a compiled decode
graph's fp8fx.linear_cat runs) timed in context: Llama-3-8B's four M = 1 linears, each behind
a bf16 producer kernel, over 2 layers' weights, in a CUDA graph (bench gemm's layer chain).
For one linear at a time every gemv config x split-K factor (no PDL: a model's neighbours
are not PDL launches) replaces the table's, the others keep theirs; prints us per layer,
best first, and the table's own; then the four winners together, without and with PDL.

    python scripts/sweep_decode_linear.py [--rep 20] [--top 5]
"""

import argparse
from dataclasses import replace

import torch

from fp8fx.kernels import dispatch
from fp8fx.kernels.bench import _CHAIN_SHAPES, _bench, _gemv_splits, chain_layers
from fp8fx.kernels.block_gemm import num_sms
from fp8fx.kernels.gemv import CONFIGS, gemv


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rep", type=int, default=20)
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args()
    sms = num_sms(torch.device("cuda"))
    layers = chain_layers()
    table = {(n, k): dispatch.gemv_config(1, n, k, False) for n, k in _CHAIN_SHAPES}

    def chain(cfgs):
        state = {"i": 0}

        def fn():
            state["i"] ^= 1
            for d in layers[state["i"]]:
                gemv(d["x"] * 1, None, d["wq"], d["ws"], None, config=cfgs[tuple(d["wq"].shape)])

        return fn

    print(f"table configs: {dict((key, str(c)) for key, c in table.items())}")
    print(f"table, as is: {_bench(chain(table), args.rep) * 1e3:.1f} us/layer")
    no_pdl = {key: replace(c, pdl=False) for key, c in table.items()}
    print(f"table, no PDL: {_bench(chain(no_pdl), args.rep) * 1e3:.1f} us/layer", flush=True)
    best = {}
    for n, k in _CHAIN_SHAPES:
        results = []
        for cfg in CONFIGS:
            for split in _gemv_splits(1, n, k, cfg, sms):
                c = replace(cfg, split_k=split)
                try:
                    t = _bench(chain({**no_pdl, (n, k): c}), args.rep) * 1e3
                except Exception as e:  # a config the shape cannot take
                    print(f"  {c}: {type(e).__name__}: {str(e)[:120]}")
                    continue
                results.append((t, str(c), c))
        results.sort(key=lambda r: r[0])
        best[(n, k)] = results[0][2]
        print(f"1 x {n} x {k}: table (no PDL) {no_pdl[(n, k)]}; best: "
              + ", ".join(f"{name} {t:.1f}" for t, name, _ in results[:args.top]), flush=True)
    # The four winners together (each was timed with the table's configs around it), then
    # with PDL; the table again in between, for the run-to-run drift.
    with_pdl = {key: replace(c, pdl=True) for key, c in best.items()}
    print(f"best of each together: {dict((key, str(c)) for key, c in best.items())}")
    for cfgs, label in ((best, "best of each, no PDL"), (table, "table, as is"), (with_pdl, "best of each, PDL")):
        print(f"{label}: {_bench(chain(cfgs), args.rep) * 1e3:.1f} us/layer", flush=True)


if __name__ == "__main__":
    main()
