"""Convert a bf16 transformers checkpoint to block FP8, load it with fp8fx, generate.

    python examples/convert_and_generate.py [--workdir DIR]

Builds a Llama-architecture checkpoint locally (random weights; small on CPU, Llama-3-8B
dimensions with 4 layers on a GPU), converts it shard by shard (the same as
`python -m fp8fx convert SRC DST`), loads the FP8 checkpoint straight into BlockFP8Tensor
parameters and generates a few tokens.
"""

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fp8fx
from fp8fx.convert import convert, inspect


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    big = device == "cuda"
    config = LlamaConfig(
        hidden_size=4096 if big else 256,
        intermediate_size=14336 if big else 512,
        num_hidden_layers=4 if big else 2,
        num_attention_heads=32 if big else 4,
        num_key_value_heads=8 if big else 2,
        vocab_size=128256 if big else 512,
        tie_word_embeddings=False,
    )
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fp8fx-example-"))
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(workdir / "bf16", max_shard_size="2GB")

    summary = convert(workdir / "bf16", workdir / "fp8", device=device)
    print(summary)
    print("\n".join(inspect(workdir / "fp8")[:3]))

    model = fp8fx.from_pretrained(workdir / "fp8", device=device)
    ids = torch.randint(0, config.vocab_size, (1, 8), device=device)
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    print("generated token ids:", out[0, 8:].tolist())


if __name__ == "__main__":
    main()
