"""The numpy decode path computes what model.forward computes, on the same KV cache."""

from __future__ import annotations

import copy

import pytest
import torch

from gpt2kit.decode_fast import MAX_BATCH, NATIVE_MAX_BATCH, FastDecoder, max_batch
from gpt2kit.generate import generate, stream
from gpt2kit.model import GPT2, GPT2Config, KVCache, native


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=500, n_ctx=48, n_layer=3, n_head=4, n_embd=64, dropout=0.0, attn_dropout=0.0,
                        eos_token_id=499)
    m = GPT2(config).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # LayerNorm and biases away from 1 / 0 too
    return m


@pytest.mark.parametrize("padded", [False, True])
def test_decode_step_logits_and_cache_match_model_forward(model, padded):
    cfg = model.config
    B, T = 3, 9
    torch.manual_seed(1)
    idx = torch.randint(0, cfg.vocab_size, (B, T))
    mask = torch.ones(B, T + 4, dtype=torch.bool)
    if padded:
        mask[1, :3] = False
        mask[2, :6] = False
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    ref_cache, fast_cache = KVCache.allocate(cfg, B, 20), KVCache.allocate(cfg, B, 20)
    fast = FastDecoder(model)
    with torch.inference_mode():
        for cache in (ref_cache, fast_cache):
            model(idx, kv_cache=cache, attention_mask=mask[:, :T] if padded else None,
                  position_ids=pos[:, :T] if padded else None)
        for step in range(4):
            tok = torch.randint(0, cfg.vocab_size, (B, 1))
            m = mask[:, : T + step + 1] if padded else None
            p = pos[:, T + step : T + step + 1] if padded else None
            ref = model(tok, kv_cache=ref_cache, attention_mask=m, position_ids=p).logits[:, -1]
            got = fast(tok, fast_cache, m, p)
            torch.testing.assert_close(got, ref, rtol=0, atol=2e-5)
    assert fast_cache.length == ref_cache.length == T + 4
    for k1, k2 in zip(ref_cache.keys + ref_cache.values, fast_cache.keys + fast_cache.values):
        torch.testing.assert_close(k1[:, :, : T + 4], k2[:, :, : T + 4], rtol=0, atol=2e-5)


def test_generate_uses_the_fast_path_and_agrees(model):
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    s = stream(model, prompts, 5, temperature=0.0)
    assert isinstance(s._decoder, FastDecoder)
    slow = generate(model, prompts, 30, temperature=0.0, fast=False)
    quick = generate(model, prompts, 30, temperature=0.0)
    assert torch.equal(slow, quick)


def test_fast_path_only_where_it_applies(model):
    most = max_batch()  # MAX_BATCH, or NATIVE_MAX_BATCH with gpt2kit's own float32 kernel
    assert most == (MAX_BATCH if native.library() is None else NATIVE_MAX_BATCH)
    assert FastDecoder.supports(model, 1) and FastDecoder.supports(model, most)
    assert not FastDecoder.supports(model, most + 1)
    assert not FastDecoder.supports(copy.deepcopy(model).to(torch.bfloat16), 1)
    assert not FastDecoder.supports(copy.deepcopy(model).train(), 1)
