"""The generation loop: exact greedy parity with transformers, batches, seeds, streaming, stops, context."""

from __future__ import annotations

import warnings

import pytest
import torch

from gpt2kit.errors import UserError
from gpt2kit.generate import GenerationWarning, generate, stream
from gpt2kit.model import GPT2, GPT2Config

PROMPTS = [[5, 17, 200, 42, 7, 99, 120], [8, 290], [1, 2, 3, 4]]


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A random transformers GPT-2 and the same weights loaded by gpt2kit from its saved directory."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=1000, n_positions=256, n_embd=64, n_layer=2, n_head=2, initializer_range=0.2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=999, eos_token_id=999,
    )
    hf = transformers.GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp("hf-gpt2")
    hf.save_pretrained(path)
    hf.generation_config.eos_token_id = None  # compare 100 tokens, never stopping early
    hf.generation_config.pad_token_id = 0
    return hf, GPT2.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=300, n_ctx=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0, attn_dropout=0.0,
                        eos_token_id=299)
    model = GPT2(config).eval()
    with torch.no_grad():  # larger weights than the init: varied, non-repeating greedy text
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def left_pad(prompts, pad=0):
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask


@pytest.mark.parametrize("fast", [False, "auto"])
def test_greedy_batch_matches_transformers(hf_pair, fast):
    hf, ours = hf_pair
    ids, mask = left_pad(PROMPTS)
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=100, do_sample=False)
    out = generate(ours, PROMPTS, max_new_tokens=100, temperature=0.0, fast=fast)
    assert out.shape == ref.shape == (3, ids.size(1) + 100)
    assert torch.equal(out[:, ids.size(1) :], ref[:, ids.size(1) :])
    assert min(len(set(r.tolist())) for r in out[:, ids.size(1) :]) > 10  # not a degenerate loop
    # the padded tensor + mask form gives the same ids, and model.generate delegates here
    out2 = ours.generate(ids, max_new_tokens=100, temperature=0.0, attention_mask=mask)
    assert torch.equal(out2[:, ids.size(1) :], ref[:, ids.size(1) :])


def test_greedy_with_repetition_penalty_matches_transformers(hf_pair):
    hf, ours = hf_pair
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=60, do_sample=False, repetition_penalty=1.3)
    out = generate(ours, ids, max_new_tokens=60, temperature=0.0, repetition_penalty=1.3)
    assert torch.equal(out, ref)
    plain = generate(ours, ids, max_new_tokens=60, temperature=0.0)
    assert len(set(out[0, 7:].tolist())) >= len(set(plain[0, 7:].tolist()))


def test_padded_rows_generate_what_they_generate_alone(tiny):
    prompts = [[3, 4, 5, 6, 7, 8], [9], [10, 11, 12]]
    batch = generate(tiny, prompts, 20, temperature=0.0)
    for i, p in enumerate(prompts):
        alone = generate(tiny, [p], 20, temperature=0.0)
        assert batch[i, -20:].tolist() == alone[0, -20:].tolist()


def test_same_seed_same_tokens_and_different_seed_differs(tiny):
    kw = dict(max_new_tokens=30, temperature=1.0, top_k=50, top_p=0.95)
    a = generate(tiny, [[1, 2, 3]] * 2, seed=7, **kw)
    b = generate(tiny, [[1, 2, 3]] * 2, seed=7, **kw)
    c = generate(tiny, [[1, 2, 3]] * 2, seed=8, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # rows of a batch draw independently
    g = torch.Generator().manual_seed(7)
    assert torch.equal(generate(tiny, [[1, 2, 3]] * 2, seed=g, **kw), a)


def test_stream_yields_what_generate_returns(tiny):
    kw = dict(max_new_tokens=25, temperature=0.9, top_k=40, seed=3)
    s = stream(tiny, PROMPTS, **kw)
    steps = [t.clone() for t in s]
    assert len(steps) == 25 and s.stop_reason == "length"
    full = generate(tiny, PROMPTS, **kw)
    assert torch.equal(torch.stack(steps, 1), full[:, -25:])
    assert torch.equal(s.sequences, full)


def test_eos_finishes_rows_and_pads_them(tiny):
    free = generate(tiny, PROMPTS, 30, temperature=0.0)
    T = free.size(1) - 30
    eos = int(free[1, T + 4])  # make row 1's 5th new token the "end of text"
    out = generate(tiny, PROMPTS, 30, temperature=0.0, eos_id=eos, pad_id=0)
    row = out[1, T:].tolist()
    assert row[:5] == free[1, T : T + 5].tolist()
    assert row[5:] == [0] * (len(row) - 5)
    for i in (0, 2):  # other rows continue unchanged until their own first eos
        first = (free[i, T:] == eos).nonzero()
        n = int(first[0]) + 1 if len(first) else out.size(1) - T
        assert out[i, T : T + n].tolist() == free[i, T : T + n].tolist()


def test_generation_ends_when_every_row_is_done(tiny):
    free = generate(tiny, [[5, 6, 7]], 30, temperature=0.0)
    eos = int(free[0, 3 + 6])
    s = stream(tiny, [[5, 6, 7]], 30, temperature=0.0, eos_id=eos)
    list(s)
    assert s.stop_reason == "eos"
    assert s.sequences.tolist() == free[:, : 3 + 7].tolist()


def test_stop_token_sequence(tiny):
    free = generate(tiny, [[5, 6, 7]], 30, temperature=0.0)
    stop_seq = free[0, 3 + 10 : 3 + 12].tolist()
    s = stream(tiny, [[5, 6, 7]], 30, temperature=0.0, stop=[stop_seq, [299, 299, 299]])
    list(s)
    assert s.stop_reason == "stop"
    assert s.sequences[0, -2:].tolist() == stop_seq
    assert s.num_generated <= 12


def test_empty_prompt_starts_from_eos(tiny):
    out = generate(tiny, [[]], 5, temperature=0.0)
    ref = generate(tiny, [[tiny.config.eos_token_id]], 5, temperature=0.0)
    assert torch.equal(out, ref) and out[0, 0] == tiny.config.eos_token_id


def test_prompt_longer_than_context(tiny):
    long = list(range(1, 81))  # n_ctx is 64
    with pytest.raises(UserError, match="80 tokens but the model's context is 64"):
        generate(tiny, [long], 5)
    out = generate(tiny, [long], 5, temperature=0.0, truncate="left")
    assert out.shape == (1, 64)
    assert out[0, :59].tolist() == long[-59:]
    assert torch.equal(out, generate(tiny, [long[-59:]], 5, temperature=0.0))


def test_generation_past_context_stops_with_a_reason(tiny):
    s = stream(tiny, [list(range(1, 61))], 10, temperature=0.0)
    list(s)
    assert s.num_generated == 4 and s.stop_reason == "context"
    with pytest.warns(GenerationWarning, match="4 of 10 new tokens.*context"):
        out = generate(tiny, [list(range(1, 61))], 10, temperature=0.0)
    assert out.shape == (1, 64)


def test_sliding_window_continues_past_the_context(tiny):
    prompt = list(range(1, 61))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = generate(tiny, [prompt], 30, temperature=0.0, on_overflow="slide")
    assert out.shape == (1, 90)
    assert torch.equal(out[:, :64], generate(tiny, [prompt], 4, temperature=0.0))
    # each token after the slide is the greedy choice given the kept window (3/4 of n_ctx = 48 tokens)
    with torch.no_grad():
        window = out[:, 64 - 48 : 64]
        assert int(tiny(window).logits[0, -1].argmax()) == int(out[0, 64])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 2.0}, "top_p"),
        ({"max_new_tokens": -3}, "max_new_tokens"),
        ({"truncate": "right"}, "truncate"),
        ({"on_overflow": "wrap"}, "on_overflow"),
        ({"stop": ["\n"]}, "tokenizer"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_invalid_arguments_are_user_errors(tiny, kwargs, match):
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(UserError, match=match):
        generate(tiny, [[1, 2]], **kwargs)
