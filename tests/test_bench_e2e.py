"""The e2e benchmark's decode loop (fp8fx/bench_e2e.py) on CPU: a prompt prefilled into a
transformers StaticCache, then one-token steps, must give the logits of a full no-cache forward
over the same tokens; rewinding the cache's position must reproduce them (the benchmark
rewinds before each timed run)."""

import pytest
import torch

from conftest import rel_err

pytest.importorskip("transformers")

from fp8fx.bench_e2e import cache_position, decode_steps, prefill_static_cache, rewind  # noqa: E402

P, S, B = 8, 5, 2  # prompt tokens, decode steps, batch


def _tokens(vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (B, P + S), generator=g)  # [B, P + S]


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float32, 1e-5)])
def test_static_cache_decode_matches_full_forward(tiny_llama, dtype, tol):
    model = tiny_llama.to(dtype)
    ids = _tokens(model.config.vocab_size)
    with torch.inference_mode():
        full = model(input_ids=ids, use_cache=False).logits[:, P:].float()  # [B, S, V]
        cache = prefill_static_cache(model, ids[:, :P], P + S)
        assert cache_position(cache) == P
        cached = decode_steps(model, cache, ids[:, P:]).float()
        assert cache_position(cache) == P + S
        assert cached.shape == full.shape
        assert rel_err(cached, full) < tol
        # the same next tokens as the full forward (no tie-breaking doubts at these margins)
        assert (cached.argmax(-1) == full.argmax(-1)).float().mean() >= 0.9

        rewind(cache, P)  # what each timed run of the benchmark does
        again = decode_steps(model, cache, ids[:, P:]).float()
        assert torch.equal(again, cached)


def test_overflow_is_refused(tiny_llama):
    """Past max_cache_len transformers' index_copy_ would go out of bounds (a device assert on
    CUDA: the bug this loop fixes); decode_steps refuses instead."""
    model = tiny_llama
    ids = _tokens(model.config.vocab_size)
    with torch.inference_mode():
        cache = prefill_static_cache(model, ids[:, :P], P + S)
        decode_steps(model, cache, ids[:, P:])
        with pytest.raises(ValueError, match="overflow"):
            decode_steps(model, cache, ids[:, P:P + 1])
