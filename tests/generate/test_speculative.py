"""Speculative decoding: greedy output is the target's, sampled output has the target's distribution."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare

from gpt2kit.errors import UserError
from gpt2kit.generate import TextStream, generate
from gpt2kit.model import GPT2, GPT2Config
from gpt2kit.post.quantize import QuantSpec, quantize_model
from gpt2kit.speculative import SpeculativeTextStream, speculative_generate, speculative_stream

PROMPTS = [[1, 2, 3], [5], [7, 8, 9, 10, 11, 12]]


def tiny(vocab: int, n_layer: int, n_embd: int, seed: int, n_ctx: int = 256) -> GPT2:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_ctx=n_ctx, n_layer=n_layer, n_head=2, n_embd=n_embd,
                        eos_token_id=0, dropout=0.0, attn_dropout=0.0)
    return GPT2(config).eval()


def perturbed(model: GPT2, noise: float, seed: int) -> GPT2:
    """A draft close to the target (so it accepts often, and several tokens a round), not equal to it."""
    draft = GPT2(model.config).eval()
    draft.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise * p.std().clamp(min=1e-3))
    return draft


@pytest.fixture(scope="module")
def pair():
    target = tiny(64, 2, 32, seed=0)
    return target, perturbed(target, 0.3, seed=1)


@pytest.mark.parametrize("k,adaptive", [(1, False), (4, False), (3, True)])
def test_greedy_is_the_targets_greedy_output(pair, k, adaptive):
    target, draft = pair
    for prompt in PROMPTS:
        ref = generate(target, [prompt], 200, temperature=0)
        s = speculative_stream(target, draft, [prompt], 200, draft_tokens=k, adaptive=adaptive, temperature=0)
        steps = [int(t[0]) for t in s]
        assert torch.equal(s.sequences, ref)
        assert steps == ref[0, len(prompt):].tolist()  # streamed one token at a time, in order
        assert s.stop_reason == "length"
        assert 0.2 < s.acceptance_rate <= 1.0 and s.rounds < 200  # the draft's tokens were really used


def test_an_unrelated_draft_still_gives_the_targets_output(pair):
    target, _ = pair
    other = tiny(64, 1, 16, seed=7)
    ref = generate(target, [PROMPTS[0]], 100, temperature=0)
    assert torch.equal(speculative_generate(target, other, [PROMPTS[0]], 100, draft_tokens=5, temperature=0), ref)


def test_greedy_batch_with_padding(pair):
    target, draft = pair
    ref = generate(target, PROMPTS, 80, temperature=0)
    out = speculative_generate(target, draft, PROMPTS, 80, draft_tokens=4, temperature=0)
    assert torch.equal(out, ref)


def test_quantized_draft_and_target(pair):
    target, draft = pair
    qdraft = perturbed(target, 0.3, seed=1)
    quantize_model(qdraft, QuantSpec.default(8))
    ref = generate(target, PROMPTS, 100, temperature=0)
    assert torch.equal(speculative_generate(target, qdraft, PROMPTS, 100, draft_tokens=4, temperature=0), ref)
    # an int4 target: its kernel gives every row the same result whatever the row count, so the check
    # in one forward of K + 1 rows picks what its own decode step picks
    qtarget = perturbed(target, 0.0, seed=0)
    quantize_model(qtarget, QuantSpec.default(4, group_size=32))
    ref = generate(qtarget, [PROMPTS[0]], 100, temperature=0)
    s = speculative_stream(qtarget, qdraft, [PROMPTS[0]], 100, draft_tokens=4, temperature=0)
    for _ in s:
        pass
    assert torch.equal(s.sequences, ref) and s.acceptance_rate > 0.2


def test_eos_ends_rows_like_plain_generation(pair):
    target, draft = pair
    eos = int(generate(target, [PROMPTS[1]], 9, temperature=0)[0, -1])  # row 1 emits it as its 9th token
    ref = generate(target, PROMPTS, 60, temperature=0, eos_id=eos)
    out = speculative_generate(target, draft, PROMPTS, 60, draft_tokens=4, temperature=0, eos_id=eos)
    assert torch.equal(out, ref) and bool((out[1, len(PROMPTS[2]) + 9 :] == eos).all())


def test_text_stream_with_a_draft(pair):
    target, draft = pair

    class Tok:  # the streamer needs decode_bytes / stream_decoder / encode of ids only
        eos_id = 0

        def encode(self, text, allowed_special="all"):
            return [ord(c) % 64 for c in text]

        def stream_decoder(self):
            class D:
                def add(self, t):
                    return chr(65 + t % 26)

                def flush(self):
                    return ""
            return D()

    plain = "".join(TextStream(target, Tok(), "abc", 50, temperature=0))
    spec = "".join(SpeculativeTextStream(target, Tok(), "abc", 50, temperature=0, draft=draft, draft_tokens=3))
    assert spec == plain and len(spec) > 0


# ----- the sampled distribution ---------------------------------------------------------------------------


def target_joint(model: GPT2, prompt: list[int], n: int, temperature: float, top_k: int | None) -> torch.Tensor:
    """The exact probability of every n-token continuation under the target's filtered sampling, [V ** n]."""
    from gpt2kit.sampling import filter_logits

    V = model.config.vocab_size
    seqs = torch.tensor(list(itertools.product(range(V), repeat=n)))
    ids = torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs], 1)
    with torch.no_grad():
        logits = model(ids).logits[:, len(prompt) - 1 : -1]  # [S, n, V]
    logp = torch.log_softmax(filter_logits(logits.reshape(-1, V), temperature, top_k).reshape(logits.shape), -1)
    return logp.gather(-1, seqs[..., None]).squeeze(-1).sum(-1).exp()


def counts_of(samples: torch.Tensor, V: int) -> torch.Tensor:
    """Histogram of n-token continuations [S, n] over the V ** n cells (first token most significant)."""
    n = samples.shape[1]
    index = (samples * (V ** torch.arange(n - 1, -1, -1))).sum(-1)
    return torch.bincount(index, minlength=V**n).double()


def chisquare_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of the counts under `probs`; 0 when a continuation of probability 0 was counted."""
    keep = probs > 0
    if counts[~keep].sum() > 0:
        return 0.0
    expected = probs[keep].double().numpy()
    expected *= float(counts.sum()) / expected.sum()
    return float(chisquare(counts[keep].numpy(), expected, sum_check=False).pvalue)


@pytest.mark.parametrize("batch,samples", [(1, 3000), (8, 4000)])
def test_sampled_distribution_is_the_targets(batch, samples):
    V, n, prompt = 8, 3, [1, 2]
    target = tiny(V, 2, 16, seed=3)
    draft = perturbed(target, 1.0, seed=4)  # accepts ~2/3 of its tokens: rejections and bonus tokens both occur
    temperature, top_k = 0.9, 6
    probs = target_joint(target, prompt, n, temperature, top_k)
    got = []
    gen = torch.Generator().manual_seed(0)
    accepted = proposed = 0
    for _ in range(samples // batch):
        s = speculative_stream(target, draft, [prompt] * batch, n, draft_tokens=2, temperature=temperature,
                               top_k=top_k, seed=gen)
        for _ in s:
            pass
        got.append(s.sequences[:, len(prompt):])
        accepted, proposed = accepted + s.accepted, proposed + s.proposed
    counts = counts_of(torch.cat(got), V)
    assert 0.3 < accepted / proposed < 0.95
    p_value = chisquare_p(counts, probs)
    print(f"chi-square p={p_value:.3f}, acceptance {accepted / proposed:.2f}")
    assert p_value > 1e-3
    # the test can fail: as many samples drawn from the draft's own distribution are told apart
    q = target_joint(draft, prompt, n, temperature, top_k)
    torch.manual_seed(0)
    from_q = torch.distributions.Multinomial(int(counts.sum()), probs=q).sample()
    assert chisquare_p(from_q, probs) < 1e-3


def test_bad_drafts_and_options_are_user_errors(pair):
    target, draft = pair
    with pytest.raises(UserError, match="vocabulary"):
        speculative_generate(target, tiny(65, 1, 16, seed=0), [[1]], 5)
    with pytest.raises(UserError, match="repetition_penalty"):
        speculative_generate(target, draft, [[1]], 5, repetition_penalty=1.3)
    with pytest.raises(UserError, match="draft_tokens"):
        speculative_generate(target, draft, [[1]], 5, draft_tokens=0)
