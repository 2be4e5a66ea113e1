"""gpt2kit.verify_fast: the speculative check's T-token forward equals model.forward, cache included."""

from __future__ import annotations

import pytest
import torch

from gpt2kit.model import GPT2, GPT2Config
from gpt2kit.model.kv_cache import KVCache
from gpt2kit.post.quantize import QuantSpec, quantize_model
from gpt2kit.speculative import speculative_stream
from gpt2kit.verify_fast import FastVerifier


def model(seed: int = 0) -> GPT2:
    torch.manual_seed(seed)
    return GPT2(GPT2Config(vocab_size=97, n_ctx=64, n_layer=2, n_head=4, n_embd=64, eos_token_id=0,
                           dropout=0.0, attn_dropout=0.0)).eval()


@pytest.mark.parametrize("T", [1, 2, 5, 8])
def test_logits_and_cache_equal_model_forward(T):
    m = model()
    ids = torch.randint(0, 97, (1, 13 + T), generator=torch.Generator().manual_seed(T))
    ref, fast = (KVCache.allocate(m.config, 1, 40, full=True) for _ in range(2))
    with torch.inference_mode():
        m(ids[:, :13], kv_cache=ref)
        m(ids[:, :13], kv_cache=fast)
        want = m(ids[:, 13:], kv_cache=ref).logits
        got = FastVerifier(m)(ids[:, 13:], fast)
    assert got.shape == want.shape == (1, T, 97)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert fast.length == ref.length == 13 + T
    for a, b in zip(ref.keys + ref.values, fast.keys + fast.values):
        torch.testing.assert_close(a[:, :, : 13 + T], b[:, :, : 13 + T], atol=1e-5, rtol=1e-5)


def test_supports():
    m = model()
    assert FastVerifier.supports(m, 5)
    assert not FastVerifier.supports(m, 0)
    assert not FastVerifier.supports(m, 1000)  # above decode_fast's row limit: model.forward
    assert not FastVerifier.supports(m.train(), 5)


@pytest.mark.parametrize("quantized", [False, True])
def test_speculative_greedy_is_plain_greedy_to_the_bit(quantized):
    """With the fast check (the native rows where built) a speculative greedy run is the plain fast greedy
    run, token for token, even for random weights whose logits nearly tie: every check row is computed
    as the plain decode step computes it. Without the fast path both sides use model.forward; for float32
    they agree too."""
    from gpt2kit.generate import generate

    target, draft = model(0), model(1)
    if quantized:
        quantize_model(target, QuantSpec.default(8))
    runs = {}
    for fast in ("auto", False):
        s = speculative_stream(target, draft, [[3, 4, 5]], 40, draft_tokens=4, temperature=0.0, fast=fast)
        for _ in s:
            pass
        assert (s._verifier is not None) == (fast == "auto")
        runs[fast] = s.sequences
    plain = generate(target, torch.tensor([[3, 4, 5]]), 40, temperature=0.0)
    assert torch.equal(runs["auto"], plain)
    if not quantized:  # a quantized model.forward at 5 rows uses another kernel than one row: ties may differ
        assert torch.equal(runs["auto"], runs[False])
