"""Probe: does a persistent RMSNorm reduction let Inductor put the activation quantization's
group amax into the RMSNorm kernel at hidden 4096 (Llama-3-8B prefill)?

At hidden 4096 Inductor emits RMSNorm as a looped reduction that writes the normalized bf16
rows, then a second (persistent) kernel reads them back for the per-128-group amax, the
division and the fp8 cast. Its persistent-reduction threshold for inner reductions is 1024
(torch/_inductor/choices.py). This compiles a few Llama-3-8B-dimension layers with
fp8fx.backend twice, with the default heuristic and with inner reductions up to --threshold
persistent (an InductorChoices subclass installed with V.set_choices_handler around the
compiling call), and prints per variant the generated kernels that write fp8 codes (and
whether each computes the rsqrt itself), the kernel count, and the prefill GPU time
(CUDA-graph replay, medians of 10) next to bf16 compiled in the same process.

    python scripts/probe_persistent_norm.py [--layers 2] [--threshold 8192]
"""

import argparse
import re
import sys
from pathlib import Path

import torch
from torch._inductor.choices import InductorChoices
from torch._inductor.utils import run_and_get_code
from torch._inductor.virtualized import V

import fp8fx

torch._inductor.config.fx_graph_cache = False  # each variant compiles afresh (the choices are not in the key)
from fp8fx.bench_e2e import _graph_ms, _model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import kernel_sources  # noqa: E402


def _choices(threshold: int):
    from torch._inductor.runtime.hints import ReductionHint

    class Choices(InductorChoices):
        @staticmethod
        def should_use_persistent_reduction(features, cooperative_reduction):
            if (not cooperative_reduction and features.get_reduction_hint() == ReductionHint.INNER
                    and V.graph.sizevars.statically_known_leq(features.reduction_numel, threshold)):
                return True
            return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)

    return Choices()


def _variant(model, ids, label, choices=None):
    torch._dynamo.reset()
    fn = torch.compile(model, backend=fp8fx.backend, dynamic=True) if label != "bf16" else torch.compile(model, dynamic=True)
    call = lambda: fn(input_ids=ids, use_cache=False)  # noqa: E731
    with torch.inference_mode():
        if choices is not None:
            with V.set_choices_handler(choices):
                _, codes = run_and_get_code(call)
        else:
            _, codes = run_and_get_code(call)
        ms = _graph_ms(call, 10)
    code = "\n".join(codes)
    body = code[code.rindex("def call(") :]
    launches = len(re.findall(r"\btriton_\w+\.run\(", body))
    kernels = kernel_sources(code)
    fp8 = [name for name, src in kernels.items() if "float8e4nv" in src]
    print(f"\n{label}: prefill {ms:.3f} ms (graph replay), {launches} Triton launches in the last graph")
    for name in fp8:
        print(f"  fp8 writer {name[:90]}  rsqrt={'rsqrt' in kernels[name]}")
    return ms


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--threshold", type=int, default=8192)
    args = p.parse_args()
    model = _model(args.layers)
    ids = torch.randint(0, 1000, (1, 2048), device="cuda")
    bf16 = _variant(model, ids, "bf16")
    fp8fx.quantize_(model)
    base = _variant(model, ids, "fp8fx default")
    pers = _variant(model, ids, f"fp8fx persistent <= {args.threshold}", _choices(args.threshold))
    print(f"\nbf16 / fp8fx: default {bf16 / base:.3f}x, persistent {bf16 / pers:.3f}x")


if __name__ == "__main__":
    main()
