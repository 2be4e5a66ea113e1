"""Cross-layer weight sharing: honest parameter counts, the block schedule, KV-cache decoding."""

from __future__ import annotations

import pytest
import torch

from gpt2kit.model.config import GPT2Config
from gpt2kit.model.gpt2 import GPT2Network, block_schedule
from gpt2kit.model.kv_cache import KVCache


def cfg(**kw) -> GPT2Config:
    base = dict(vocab_size=96, n_ctx=32, n_layer=4, n_head=2, n_embd=32, dropout=0.0, attn_dropout=0.0,
                eos_token_id=0)
    return GPT2Config(**(base | kw))


def _block_params(c: GPT2Config) -> int:
    C = c.n_embd
    return 4 * C + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)


@pytest.mark.parametrize("share,unique", [("none", 4), ("pairs", 2), ("all", 1)])
def test_parameter_counts_count_each_shared_block_once(share, unique):
    c = cfg(share_layers=share)
    model = GPT2Network(c)
    embeddings = c.vocab_size * c.n_embd + c.n_ctx * c.n_embd
    assert len(model.transformer.h) == unique
    assert model.num_params() == embeddings + unique * _block_params(c) + 2 * c.n_embd
    assert model.num_params() == sum(t.numel() for n, t in model.state_dict().items() if n != "lm_head.weight")
    assert len(block_schedule(c)) == c.n_layer  # depth stays n_layer


def test_pairs_applies_each_block_twice_in_a_row():
    assert block_schedule(cfg(share_layers="pairs", n_layer=6)) == (0, 0, 1, 1, 2, 2)
    assert block_schedule(cfg(share_layers="all")) == (0, 0, 0, 0)
    torch.manual_seed(0)
    shared = GPT2Network(cfg(share_layers="pairs")).eval()
    full = GPT2Network(cfg()).eval()
    # the unshared model with block i's weights copied into depths 2i and 2i+1 computes the same thing
    state = {}
    for n, t in shared.state_dict().items():
        if n.startswith("transformer.h."):
            i, rest = n.removeprefix("transformer.h.").split(".", 1)
            for d in (2 * int(i), 2 * int(i) + 1):
                state[f"transformer.h.{d}.{rest}"] = t
        else:
            state[n] = t
    full.load_state_dict(state)
    idx = torch.randint(0, 96, (2, 12))
    assert torch.equal(shared(idx).logits, full(idx).logits)


@pytest.mark.parametrize("kw", [dict(share_layers="pairs"), dict(share_layers="all"),
                                dict(share_layers="pairs", moe_experts=4, moe_top_k=2)])
def test_kv_cache_decoding_equals_the_full_forward(kw):
    torch.manual_seed(0)
    model = GPT2Network(cfg(**kw)).eval()
    idx = torch.randint(0, 96, (2, 14))
    with torch.no_grad():
        full = model(idx).logits
        cache = KVCache.allocate(model.config, 2, 14, torch.device("cpu"), torch.float32)
        steps = [model(idx[:, :6], kv_cache=cache).logits]
        steps += [model(idx[:, t : t + 1], kv_cache=cache).logits for t in range(6, 14)]
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-5


def test_shared_checkpoint_saves_unique_blocks_only(tmp_path):
    from safetensors.torch import load_file

    from gpt2kit.model import GPT2

    torch.manual_seed(0)
    model = GPT2(cfg(share_layers="all")).eval()
    model.save_pretrained(tmp_path)
    names = load_file(str(tmp_path / "model.safetensors")).keys()
    assert {n.split(".")[2] for n in names if n.startswith("transformer.h.")} == {"0"}
    back = GPT2.from_pretrained(tmp_path)
    assert back.config.share_layers == "all" and back.config.n_layer == 4
    idx = torch.randint(0, 96, (1, 9))
    assert torch.equal(model(idx).logits, back(idx).logits)
    out = back.generate(idx, max_new_tokens=5, temperature=0.0)
    assert out.shape == (1, 14)
