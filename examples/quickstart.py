"""fp8fx quickstart: compile a (tiny, random) Llama model with fp8fx.backend.

    python examples/quickstart.py            # CPU or the first CUDA GPU

Two ways in, one compiled graph:
    1. fp8fx.quantize_(model) then torch.compile(model, backend=fp8fx.backend)
    2. torch.compile(bf16_model, backend=fp8fx.backend): eligible linear weights are quantized
       at compile time (inference only: no grad), the model itself is left as it is.
"""

import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fp8fx
from fp8fx.backend import backend, backend_with, last_report
from fp8fx.explain import explain


def tiny_llama(device):
    config = LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval().requires_grad_(False)


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ids = torch.randint(0, 512, (1, 32), device=device)

    # 1. Quantize, then compile. (Options: fp8fx.backend_with(mode="max-autotune", cudagraphs=...).)
    model = tiny_llama(device)
    print(fp8fx.quantize_(model))
    print(explain(model, ids))  # which GEMMs become block-FP8, which stay, and why
    # guard_filter: Dynamo guards each quantized weight as it guards a bf16 one (not also its
    # codes and scales); the compiled call checks that the weights are the ones it holds.
    compiled = torch.compile(model, backend=backend, dynamic=True, options={"guard_filter_fn": backend.guard_filter})
    with torch.no_grad():
        t0 = time.perf_counter()
        logits = compiled(ids).logits
        print(f"first call (compile) {time.perf_counter() - t0:.1f} s; logits {tuple(logits.shape)}")
        for t in (1, 8, 32):  # other token counts reuse the dynamic graph (1 is Dynamo's one specialization)
            compiled(ids[:, :t])

    # 2. Compile an unquantized model directly: weights quantized at compile time.
    bf16 = tiny_llama(device)
    with torch.no_grad():
        ref = bf16(ids).logits.float()
        out = torch.compile(bf16, backend=backend_with(), dynamic=True)(ids).logits.float()
    print(last_report())
    print(f"relative error vs bf16: {((out - ref).norm() / ref.norm()).item():.4f}")


if __name__ == "__main__":
    main()
