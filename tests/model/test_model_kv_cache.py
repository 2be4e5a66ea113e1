"""KV cache: incremental decoding gives the logits of a full forward, also for left-padded batches."""

from __future__ import annotations

import pytest
import torch

from gpt2kit import GPT2, GPT2Config, KVCache, UserError


@pytest.fixture(scope="module")
def model() -> GPT2:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=300, n_ctx=128, eos_token_id=299)
    return GPT2(config).eval()


def ids(b, t, seed=0, vocab=300):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_64_incremental_steps_equal_the_full_forward(model):
    idx = ids(2, 80)
    full = model(idx).logits
    cache = KVCache.allocate(model.config, batch_size=2, max_len=80)
    prefill = model(idx[:, :16], kv_cache=cache, last_only=True)
    assert cache.length == 16 and prefill.kv_cache is cache
    steps = [prefill.logits]
    for t in range(16, 80):
        out = model(idx[:, t : t + 1], kv_cache=cache)
        steps.append(out.logits)
    assert cache.length == 80
    incremental = torch.cat(steps, dim=1)  # logits at positions 15 .. 79
    assert (incremental - full[:, 15:]).abs().max().item() <= 1e-5


@torch.no_grad()
def test_multi_token_chunks_on_a_cache_use_the_causal_offset(model):
    idx = ids(3, 60, seed=1)
    full = model(idx).logits
    cache = KVCache.allocate(model.config, 3, 60)
    pieces = [model(idx[:, a:b], kv_cache=cache).logits for a, b in [(0, 5), (5, 20), (20, 21), (21, 60)]]
    assert (torch.cat(pieces, 1) - full).abs().max().item() <= 1e-5


@torch.no_grad()
def test_left_padded_batch_with_attention_mask(model):
    """Rows of different lengths, left-padded, decoded 64 steps: each row equals its own unpadded run."""
    prompts = [ids(1, n, seed=n)[0] for n in (5, 12, 9)]
    continuation = ids(3, 64, seed=7)
    width = max(len(p) for p in prompts)
    pad_id = 0
    batch = torch.full((3, width), pad_id, dtype=torch.long)
    mask = torch.zeros((3, width), dtype=torch.bool)
    for r, p in enumerate(prompts):
        batch[r, width - len(p) :] = p
        mask[r, width - len(p) :] = True

    cache = KVCache.allocate(model.config, 3, width + 64)
    out = model(batch, kv_cache=cache, attention_mask=mask, last_only=True)
    got = [out.logits]
    for t in range(63):
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.bool)], dim=1)
        got.append(model(continuation[:, t : t + 1], kv_cache=cache, attention_mask=mask).logits)
    got = torch.cat(got, 1)
    assert torch.isfinite(got).all()

    for r, p in enumerate(prompts):
        alone = model(torch.cat([p, continuation[r, :63]])[None]).logits[0, len(p) - 1 :]
        assert (got[r] - alone).abs().max().item() <= 1e-5


@torch.no_grad()
def test_padded_forward_without_cache_matches_unpadded(model):
    p = ids(1, 10, seed=3)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), p], 1)
    mask = torch.tensor([[False] * 4 + [True] * 10])
    a = model(padded, attention_mask=mask).logits[:, 4:]
    b = model(p).logits
    assert (a - b).abs().max().item() <= 1e-5


@torch.no_grad()
def test_crop_rewinds_and_reset_restarts(model):
    idx = ids(1, 30, seed=5)
    full = model(idx).logits
    cache = KVCache.allocate(model.config, 1, 40)
    model(idx[:, :20], kv_cache=cache)
    model(ids(1, 10, seed=9), kv_cache=cache)  # a rejected draft
    cache.crop(20)
    tail = model(idx[:, 20:], kv_cache=cache).logits
    assert (tail - full[:, 20:]).abs().max().item() <= 1e-5
    cache.reset()
    assert cache.length == 0
    assert (model(idx, kv_cache=cache).logits - full).abs().max().item() <= 1e-5


@torch.no_grad()
def test_select_rows(model):
    idx = ids(3, 12, seed=6)
    cache = KVCache.allocate(model.config, 3, 20)
    model(idx[:, :-1], kv_cache=cache)
    cache.select([2, 0])
    last = model(idx[[2, 0], -1:], kv_cache=cache).logits
    full = model(idx[[2, 0]]).logits[:, -1:]
    assert cache.batch_size == 2 and (last - full).abs().max().item() <= 1e-5


def test_cache_shape_and_overflow(model):
    cache = KVCache.allocate(model.config, 2, 8, dtype=torch.float32)
    assert cache.keys[0].shape == (2, 4, 8, 16) and len(cache.keys) == 2 and cache.max_len == 8
    with torch.no_grad():
        model(ids(2, 8), kv_cache=cache)
        with pytest.raises(UserError, match="KV cache is full"):
            model(ids(2, 1), kv_cache=cache)
    with pytest.raises(UserError, match="max_len"):
        KVCache.allocate(model.config, 1, 129)


def test_bad_inputs_name_the_problem(model):
    with pytest.raises(UserError, match="vocabulary"):
        model(torch.tensor([[300]]))
    with pytest.raises(UserError, match="n_ctx=128"):
        model(ids(1, 129))
    with pytest.raises(UserError, match="attention_mask"):
        model(ids(1, 4), attention_mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(UserError, match="batch, time"):
        model(ids(1, 4)[0])


@torch.no_grad()
def test_any_integer_dtype_is_accepted_and_floats_are_not(model):
    idx = ids(2, 9, seed=11)
    ref = model(idx).logits
    for dtype in (torch.int32, torch.int16, torch.uint16):
        assert torch.equal(model(idx.to(dtype)).logits, ref), dtype
    with pytest.raises(UserError, match="integer token ids"):
        model(idx.float())


def test_cached_attention_on_cuda_leaves_out_cudnn():
    """cuDNN's SDPA builds a graph per key length, i.e. per decoded token: KV-cache steps on CUDA must not
    use it (measured on an H100: bf16 greedy decoding 17 -> 262 tokens/s). The switch only sets backend
    flags, so it is checked without a GPU; training and CPU runs keep SDPA's own choice."""
    from gpt2kit.model.gpt2 import _attention_backends

    cache = KVCache.allocate(GPT2Config.from_preset("gpt2-tiny"), 1, 8)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with _attention_backends(torch.device("cuda"), cache):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    for device, kv in ((torch.device("cuda"), None), (torch.device("cpu"), cache)):
        with _attention_backends(device, kv):
            assert torch.backends.cuda.cudnn_sdp_enabled() == before
