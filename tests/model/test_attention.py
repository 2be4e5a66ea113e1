"""Attention variants: blocked forms equal the naive masked reference; cached decoding equals a forward."""

import pytest
import torch

from gpt2kit.model import GPT2Config
from gpt2kit.model.attention import (
    fixed_attention,
    linear_attention,
    reference_attention,
    sliding_attention,
)
from gpt2kit.model.config import ConfigError
from gpt2kit.model.gpt2 import GPT2Network
from gpt2kit.model.kv_cache import KVCache

BLOCKED = {
    "sliding": lambda q, k, v: sliding_attention(q, k, v, 8),
    "fixed": lambda q, k, v: fixed_attention(q, k, v, 8, 2),
    "linear": lambda q, k, v: linear_attention(q, k, v, chunk=8)[0],
}


def _qkv(T, dtype=torch.float32, B=2, H=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("kind", list(BLOCKED))
@pytest.mark.parametrize("T", [8, 21, 40])  # one chunk, not a multiple of the chunk, several chunks
def test_blocked_equals_naive_reference(kind, T):
    q, k, v = _qkv(T)
    out = BLOCKED[kind](q, k, v)
    ref = reference_attention(kind, q, k, v, window=8, block=8, summary=2)
    assert (out - ref).abs().max() <= 1e-5
    g_out = torch.autograd.grad((out * torch.cos(out)).sum(), (q, k, v))
    g_ref = torch.autograd.grad((ref * torch.cos(ref)).sum(), (q, k, v))
    for a, b in zip(g_out, g_ref):
        assert (a - b).abs().max() <= 1e-5


def test_sliding_with_prefix_and_padding_equals_reference():
    q, k, v = _qkv(19)
    pk, pv = torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    valid = torch.ones(2, 26, dtype=torch.bool)
    valid[0, :10] = False
    out = sliding_attention(q, k, v, 8, pk, pv, valid)
    ref = reference_attention("sliding", q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), window=8, key_valid=valid)
    assert (out - ref)[1].abs().max() <= 1e-5
    assert (out - ref)[0, :, 3:].abs().max() <= 1e-5  # queries 0..2 of row 0 are padding


def test_linear_chunked_equals_recurrent():
    q, k, v = _qkv(37)
    chunked, (S, z) = linear_attention(q, k, v, chunk=8)
    state, steps = None, []
    for t in range(37):
        y, state = linear_attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state)
        steps.append(y)
    assert (torch.cat(steps, 2) - chunked).abs().max() <= 1e-5
    assert (state[0] - S).abs().max() <= 1e-4 * S.abs().max() and (state[1] - z).abs().max() <= 1e-4 * z.abs().max()


def _model(seed=0, **variant):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=97, n_ctx=96, n_layer=4, n_head=2, n_embd=32, dropout=0.0, attn_dropout=0.0,
                     eos_token_id=0, **variant)
    return GPT2Network(cfg).eval()


def test_sliding_window_covering_the_sequence_equals_dense():
    dense = _model()
    sliding = _model(attention="sliding", window=96)
    sliding.load_state_dict(dense.state_dict())
    idx = torch.randint(0, 97, (2, 90))
    with torch.no_grad():
        diff = (dense(idx).logits - sliding(idx).logits).abs().max()
    assert diff <= 1e-5


VARIANTS = {
    "sliding": dict(attention="sliding", window=8),
    "fixed": dict(attention="fixed", attention_block=8, attention_summary=2),
    "linear": dict(attention="linear"),
    "hybrid": dict(attention_layers=("sliding", "dense", "linear", "fixed"), window=8, attention_block=8,
                   attention_summary=2),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_decoding_equals_full_forward(name):
    model = _model(**VARIANTS[name])
    idx = torch.randint(0, 97, (2, 70))
    with torch.no_grad():
        full = model(idx).logits
        # the model's own layers against the naive reference of their pattern
        cache = KVCache.allocate(model.config, 2, 70)
        logits = [model(idx[:, :6], kv_cache=cache).logits]
        for t in range(6, 70):  # 64 single-token steps
            logits.append(model(idx[:, t:t + 1], kv_cache=cache).logits)
    assert (torch.cat(logits, 1) - full).abs().max() <= 1e-5
    # a chunk after a prefix (a second prefill into a rolling window / a state) agrees as well
    with torch.no_grad():
        cache = KVCache.allocate(model.config, 2, 70)
        model(idx[:, :30], kv_cache=cache)
        chunk = model(idx[:, 30:70], kv_cache=cache).logits
    assert (chunk - full[:, 30:]).abs().max() <= 1e-5


@pytest.mark.parametrize("name", list(VARIANTS))
def test_full_layout_cache_and_padding_equal_alone(name):
    """full=True (speculative, server) and a left-padded batch compute what a row computes alone."""
    model = _model(**VARIANTS[name])
    a, b = torch.randint(0, 97, (1, 40)), torch.randint(0, 97, (1, 25))
    with torch.no_grad():
        alone = model(b).logits
        ids = torch.cat([torch.zeros(1, 15, dtype=torch.long), b], 1)
        mask = torch.cat([torch.zeros(1, 15, dtype=torch.bool), torch.ones(1, 25, dtype=torch.bool)], 1)
        for full in (False, True):
            cache = KVCache.allocate(model.config, 2, 60, full=full)
            out = model(torch.cat([a, ids]), kv_cache=cache,
                        attention_mask=torch.cat([torch.ones(1, 40, dtype=torch.bool), mask])).logits
            assert (out[1, 15:] - alone[0]).abs().max() <= 1e-5
            assert (out[0] - model(a).logits[0]).abs().max() <= 1e-5
            # decode steps with the padding mask: row 1 at its own positions
            pos = torch.tensor([[40], [25]])
            tok = torch.randint(0, 97, (2, 1))
            m = torch.cat([torch.cat([torch.ones(1, 40, dtype=torch.bool), mask]), torch.ones(2, 1, dtype=torch.bool)], 1)
            step = model(tok, kv_cache=cache, attention_mask=m, position_ids=pos).logits
            ref = model(torch.cat([b, tok[1:]], 1)).logits[0, -1]
            assert (step[1, 0] - ref).abs().max() <= 1e-5


def test_rolling_cache_memory_does_not_grow_with_the_context():
    cfg = GPT2Config(vocab_size=97, n_ctx=4096, n_layer=2, n_head=2, n_embd=32, attention="sliding", window=16,
                     eos_token_id=0)
    small, large = KVCache.allocate(cfg, 1, 256), KVCache.allocate(cfg, 1, 4096)
    assert small.nbytes == large.nbytes == 2 * 2 * 16 * 16 * 4 * 2
    lin = cfg.replace(attention="linear")
    assert KVCache.allocate(lin, 1, 256).nbytes == KVCache.allocate(lin, 1, 4096).nbytes
    with pytest.raises(Exception, match="cannot be rewound"):
        cache = KVCache.allocate(cfg, 1, 64)
        cache.length = 10
        cache.crop(5)


@pytest.mark.parametrize("fields, message", [
    (dict(attention="sliding", window=0), "window must be a positive integer"),
    (dict(attention="blocky"), "unknown attention 'blocky'"),
    (dict(attention="fixed", attention_block=128, n_ctx=64), "attention_block"),
])
def test_bad_variant_config_is_one_clear_error(fields, message):
    with pytest.raises(ConfigError, match=message):
        GPT2Config(**fields)
