"""Compile a Llama-3-8B-dimension prefill (2 layers, dynamic shapes) with fp8fx.backend and
report, for each user-defined Triton kernel Inductor launches (passes/quant_kernel.py), the
arguments Inductor's mutation analysis found written: only the kernel's fresh outputs may be.

    python scripts/check_user_kernels.py
"""

import torch
from torch._higher_order_ops import triton_kernel_wrap as W

import fp8fx
from fp8fx.bench_e2e import _model


def main():
    found = []
    name_of = lambda kernel: getattr(getattr(kernel, "fn", kernel), "__name__", "?")  # noqa: E731
    # torch 2.11's Inductor calls identify_mutated_tensors -> [names]; later torch calls
    # identify_accessed_tensors. A failed analysis reports every tensor argument as written.
    if hasattr(W, "identify_accessed_tensors"):
        analyse = W.identify_accessed_tensors

        def spy(kernel, kwargs, *args, **kw):
            out = analyse(kernel, kwargs, *args, **kw)
            found.append((name_of(kernel), tuple(sorted(dep.name for dep in out.read_writes.writes))))
            return out

        W.identify_accessed_tensors = spy
    else:
        analyse = W.identify_mutated_tensors

        def spy(kernel, kwargs, *args, **kw):
            out = analyse(kernel, kwargs, *args, **kw)
            found.append((name_of(kernel), tuple(sorted(out))))
            return out

        W.identify_mutated_tensors = spy
    model = _model(2)
    fp8fx.quantize_(model)
    ids = torch.randint(0, 1000, (1, 2048), device="cuda")
    with torch.no_grad():
        torch.compile(model, backend=fp8fx.backend, dynamic=True)(input_ids=ids, use_cache=False)
    for name, writes in sorted(set(found)):
        print(f"{name}: writes {list(writes)}")


if __name__ == "__main__":
    main()
