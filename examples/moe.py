"""Block-FP8 MoE: quantize a Qwen3-MoE model's experts and compare with bf16.

    python examples/moe.py

Builds a Qwen3-MoE model from a local config (random weights; tiny on CPU, Qwen3-30B-A3B
layer dimensions with 2 layers on a GPU), quantizes the fused expert weights
(gate_up_proj [E, 2I, H], down_proj [E, H, I]) and attention projections with
fp8fx.quantize_, and reports the error against bf16 and the weight bytes.
"""

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

import fp8fx


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    big = device == "cuda"
    config = Qwen3MoeConfig(
        hidden_size=2048 if big else 256,
        moe_intermediate_size=768 if big else 128,
        intermediate_size=6144 if big else 512,
        num_experts=128 if big else 8,
        num_experts_per_tok=8 if big else 2,
        num_hidden_layers=2,
        num_attention_heads=32 if big else 4,
        num_key_value_heads=4 if big else 2,
        vocab_size=151936 if big else 512,
        # F.linear per selected expert: the form BlockFP8Tensor serves today.
        experts_implementation="eager",
    )
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, config.vocab_size, (1, 32), device=device)
    with torch.inference_mode():
        ref = model(ids).logits.float()
        report = fp8fx.quantize_(model)
        out = model(ids).logits.float()
    print(report)
    rel = ((out - ref).norm() / ref.norm()).item()
    print(f"relative L2 error of the logits vs bf16: {rel:.4f}")
    experts = model.model.layers[0].mlp.experts
    print("experts.gate_up_proj:", experts.gate_up_proj)


if __name__ == "__main__":
    main()
