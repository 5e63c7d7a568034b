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


def test_tables_without_decode(capsys):
    """``--batches`` with no sizes (prefill only, e.g. with ``--logits-to-keep 1``): the tables
    print the prefill columns and ratios and no decode ones."""
    import argparse

    from fp8fx.api import QuantizeReport
    from fp8fx.bench_e2e import _print_tables

    args = argparse.Namespace(model="llama3-8b", layers=2, prefill=64, logits_to_keep=1, context=8, steps=2,
                              graphs="manual", repeats=3, batches=[])
    rows = [dict(variant=v, compile_s=c, decode_first_s=0.0 if c else None, prefill_ms=ms, prefill_graph_ms=ms,
                 weights_gib=w, peak_gib=w, cudagraph_skips=0, recompiles=0)
            for v, c, ms, w in (("bf16 eager", None, 10.0, 2.0), ("bf16 compiled", 5.0, 8.0, 2.0),
                                ("fp8fx eager", None, 9.0, 1.0), ("fp8fx compiled", 6.0, 6.0, 1.0))]
    _print_tables(args, rows, QuantizeReport(bytes_before=4, bytes_after=2), "5.x")
    out = capsys.readouterr().out
    assert "logits of the last 1 tokens" in out and "| fp8fx compiled / bf16 compiled, prefill | 1.33 |" in out
    assert "decode" not in out.split("\n| ratio")[1]
