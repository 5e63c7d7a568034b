"""GPU spot check of packed projections: quantize_ a tiny Llama on CUDA (float32 and UE8M0
scales), check the packing, and compare a compiled prefill (dynamic) with eager. Then a model
quantized on the CPU and moved to CUDA: the move unpacks its groups, the compile warns, and
after pack_projections it compiles without the warning and matches eager.

    python scripts/check_pack_cuda.py
"""

import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fp8fx
from fp8fx.api import packed_rows


def main():
    for scale_fmt in ("float32", "ue8m0"):
        torch._dynamo.reset()
        config = LlamaConfig(num_hidden_layers=2, hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                             num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval().requires_grad_(False)
        report = fp8fx.quantize_(model, fp8fx.BlockFP8Config(scale_fmt=scale_fmt))
        attn = model.model.layers[0].self_attn
        ws = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
        packed = packed_rows([w.qdata for w in ws]) and packed_rows([w.scale for w in ws])
        ids = torch.randint(0, 256, (1, 300), device="cuda")
        with torch.no_grad():
            eager = model(ids).logits.float()
            got = torch.compile(model, backend=fp8fx.backend, dynamic=True)(ids).logits.float()
        err = ((got - eager).norm() / eager.norm()).item()
        print(f"{scale_fmt}: packed {packed}, notes {len(report.notes)}, compiled vs eager rel. err {err:.2e}")
        assert packed and err < 0.02
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval().requires_grad_(False)
    fp8fx.quantize_(model)
    model.to("cuda")
    ids = torch.randint(0, 256, (1, 300), device="cuda")
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(model, backend=fp8fx.backend, dynamic=True)(ids)
    moved = [str(w.message) for w in caught if "not packed any more" in str(w.message)]
    print(f"moved to CUDA after quantize_: warned {bool(moved)} ({moved[0][:90] if moved else ''}...)")
    torch._dynamo.reset()
    fp8fx.api.pack_projections(model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not packed any more")
        eager = model(ids).logits.float()
        got = torch.compile(model, backend=fp8fx.backend, dynamic=True)(ids).logits.float()
    err = ((got - eager).norm() / eager.norm()).item()
    print(f"packed again: compiled vs eager rel. err {err:.2e}")
    assert moved and err < 0.02


if __name__ == "__main__":
    main()
