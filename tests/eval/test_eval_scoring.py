"""The scoring core and perplexity windows, checked against a model whose log-likelihoods are known."""

from __future__ import annotations

import math
import random

import pytest
import torch
from eval_fakes import PieceTokenizer, TableLM, close, random_table

from gpt2kit.errors import UserError
from gpt2kit.eval.metrics import LMStats
from gpt2kit.eval.perplexity import (
    document_requests,
    evaluate_text,
    sliding_window_requests,
    split_documents,
)
from gpt2kit.eval.scoring import Request, score_requests


def test_score_is_sum_of_continuation_logprobs_and_order_is_kept():
    model = TableLM(random_table(12, seed=1), n_ctx=16)
    rng = random.Random(0)
    requests = [
        Request([rng.randrange(12) for _ in range(rng.randint(1, 9))], [rng.randrange(12) for _ in range(rng.randint(1, 5))])
        for _ in range(23)
    ]
    scores = score_requests(model, requests, batch_size=5, keep_token_logprobs=True)
    for r, s in zip(requests, scores):
        ids = list(r.context) + list(r.continuation)
        expected = [model.logprob(ids[i - 1], ids[i]) for i in range(len(r.context), len(ids))]
        assert s.n_tokens == len(r.continuation)
        assert all(close(a, b) for a, b in zip(s.token_logprobs, expected))
        assert close(s.logprob, sum(expected))
    # batching is an implementation detail: one request at a time gives the same numbers
    single = score_requests(model, requests, batch_size=1)
    assert all(close(a.logprob, b.logprob) for a, b in zip(scores, single))
    # longest first, so rows of a batch are padded as little as possible
    widths = [shape[1] for shape in model.calls[: len(model.calls) - len(requests)]]
    assert widths == sorted(widths, reverse=True)


def test_greedy_means_every_continuation_token_is_the_argmax():
    table = torch.zeros(5, 5)
    table[1, 2] = 5.0  # after 1, 2 is the argmax
    table[2, 3] = 5.0  # after 2, 3 is the argmax
    table[3, 1] = 5.0
    model = TableLM(table, n_ctx=8)
    s = score_requests(model, [Request([1], [2, 3]), Request([1], [2, 4]), Request([1], [3, 1]), Request([3], [1])])
    assert [x.greedy for x in s] == [True, False, False, True]


def test_context_is_cut_from_the_left_to_fit_the_window():
    model = TableLM(random_table(10, seed=2), n_ctx=4)
    ctx, cont = [1, 2, 3, 4, 5, 6], [7, 8]
    (s,) = score_requests(model, [Request(ctx, cont)])
    # fed: (ctx + cont)[-5:][:-1] = [5, 6, 7, 8][:... ] -> 4 positions, last two predict 7 and 8
    assert model.calls[-1] == (1, 4)
    assert close(s.logprob, model.logprob(6, 7) + model.logprob(7, 8))
    with pytest.raises(UserError, match="does not fit"):
        score_requests(model, [Request([1], [1, 2, 3, 4, 5])])


def _hf_scored_positions(n: int, n_ctx: int, stride: int) -> list[int]:
    """Token positions Hugging Face's recipe scores, derived from its -100 label mask and shift."""
    scored = []
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + n_ctx, n)
        trg_len = end - prev_end
        labels = list(range(begin, end))
        masked = [-100] * (len(labels) - trg_len) + labels[len(labels) - trg_len :]
        scored.extend(p for p in masked[1:] if p != -100)  # the loss shifts labels by one
        prev_end = end
        if end == n:
            break
    return scored


@pytest.mark.parametrize("n,n_ctx,stride", [(1, 8, 4), (7, 8, 4), (8, 8, 4), (9, 8, 4), (50, 8, 4), (50, 8, 3),
                                            (50, 8, 8), (50, 8, 1), (33, 16, 8)])
def test_sliding_windows_score_what_the_hf_recipe_scores(n, n_ctx, stride):
    tokens = list(range(100, 100 + n))
    requests = sliding_window_requests(tokens, n_ctx, stride)
    scored = [t - 100 for r in requests for t in r.continuation]
    assert scored == _hf_scored_positions(n, n_ctx, stride)
    for r in requests:
        # each window is the recipe's window: context + continuation = tokens[begin:end], <= n_ctx long
        assert len(r.context) + len(r.continuation) <= n_ctx
        assert list(r.context) + list(r.continuation) == list(range(r.context[0], r.continuation[-1] + 1))
    if stride < n_ctx:
        assert scored == list(range(1, n))  # every token but the first, exactly once


def test_sliding_window_context_is_n_ctx_minus_stride():
    requests = sliding_window_requests(list(range(40)), 8, 2)
    assert [len(r.context) for r in requests[1:-1]] == [6] * (len(requests) - 2)


@pytest.mark.parametrize("n,n_ctx", [(1, 4), (4, 4), (5, 4), (13, 4), (9, 3)])
def test_document_windows_score_every_token_once_with_eos_first(n, n_ctx):
    tokens = list(range(100, 100 + n))
    requests = document_requests(tokens, n_ctx, eos_id=7)
    assert requests[0].context == [7]
    assert [t for r in requests for t in r.continuation] == tokens
    for r in requests:
        assert len(r.continuation) <= n_ctx
        assert len(r.context) + len(r.continuation) == min(n_ctx + 1, n + 1) or r is requests[0]
    # windows are disjoint and the last one is filled out with earlier tokens as context
    if n > n_ctx:
        last = requests[-1]
        assert len(last.context) + len(last.continuation) == n_ctx + 1


def test_sliding_perplexity_equals_hand_computation():
    text = "the cat sat on the mat and the dog sat on the log " * 5
    tok = PieceTokenizer.for_texts(text)
    model = TableLM(random_table(tok.vocab_size, seed=3), n_ctx=8)
    ids = tok.encode(text)
    # the table model only looks at the previous token, so every window gives the same per-token scores
    nll = -model.sequence_logprob(ids, first_scored=1)
    for stride in (1, 3, 4, 7):
        r = evaluate_text(model, tok, text, mode="sliding", stride=stride, batch_size=3)
        assert r["tokens"] == len(ids) - 1
        assert close(r["ce"], nll / (len(ids) - 1))
        assert close(r["ppl"], math.exp(nll / (len(ids) - 1)))
        assert close(r["bpc"], nll / math.log(2) / len(text))
        assert close(r["bpb"], nll / math.log(2) / len(text.encode()))
        assert close(r["word_ppl"], math.exp(nll / len(text.split())))
    assert evaluate_text(model, tok, text)["stride"] == 4  # default n_ctx / 2


def test_document_mode_scores_each_document_after_eos():
    docs = ["a b c d e f g h i j ", "k l m ", "n o p q r s t u v w x y z "]
    text = "<|endoftext|>".join(docs)
    tok = PieceTokenizer.for_texts(*docs)
    model = TableLM(random_table(tok.vocab_size, seed=4), n_ctx=4)
    nll = -sum(model.sequence_logprob([tok.eos_id] + tok.encode(d), first_scored=1) for d in docs)
    r = evaluate_text(model, tok, text, mode="document", batch_size=2)
    assert r["documents"] == 3
    assert r["tokens"] == sum(len(tok.encode(d)) for d in docs)
    assert close(r["ce"], nll / r["tokens"])
    assert r["characters"] == sum(len(d) for d in docs)


def test_units_come_from_the_original_text_not_the_detokenized_one():
    text = "it 's a b , c . "
    tok = PieceTokenizer.for_texts(text, "it's a b, c.")
    model = TableLM(random_table(tok.vocab_size, seed=5), n_ctx=8)
    r = evaluate_text(model, tok, text, detokenize=lambda s: s.replace(" '", "'").replace(" ,", ",").replace(" .", "."))
    assert r["words"] == 7 and r["characters"] == len(text)
    assert r["tokens"] == len(tok.encode("it's a b, c. ")) - 1


def test_wikitext_documents_split_at_top_level_headings():
    text = " \n = A = \n \n x y \n \n = = Sub = = \n z \n \n = B = \n \n w \n"
    docs = split_documents(text, "auto")
    assert "".join(docs) == text  # nothing lost between documents
    assert len(docs) == 2 and docs[0].startswith(" \n = A =") and " = = Sub = = " in docs[0]
    assert docs[1] == " = B = \n \n w \n"
    assert split_documents("p1\n\np2\n", "blank") == ["p1\n\n", "p2\n"]
    assert split_documents("one doc", "auto") == ["one doc"]


def test_bad_text_inputs_are_user_errors():
    tok = PieceTokenizer.for_texts("a b a b")
    model = TableLM(random_table(tok.vocab_size), n_ctx=4)
    with pytest.raises(UserError, match="empty"):
        evaluate_text(model, tok, "  \n")
    with pytest.raises(UserError, match="too short"):
        evaluate_text(model, tok, "a")
    with pytest.raises(UserError, match="--stride"):
        evaluate_text(model, tok, "a b a b", stride=5)
    small = TableLM(random_table(2), n_ctx=4)  # vocabulary smaller than the tokenizer's
    with pytest.raises(UserError, match="vocabulary"):
        evaluate_text(small, tok, "a b a b")


def test_metrics_from_one_nll():
    s = LMStats(nll=100.0, tokens=50, characters=200, bytes=250, words=40)
    assert close(s.ce, 2.0) and close(s.ppl, math.exp(2.0))
    assert close(s.bits_per_token, 2.0 / math.log(2))
    assert close(s.bpc, 100 / math.log(2) / 200) and close(s.bpb, 100 / math.log(2) / 250)
    assert close(s.word_ppl, math.exp(100 / 40))


def test_head_at_scored_positions_only_gives_the_full_head_numbers():
    from gpt2kit.model import GPT2, GPT2Config

    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=300, n_ctx=32, n_layer=2, n_head=2, n_embd=32, eos_token_id=299)).eval()
    rng = random.Random(1)
    requests = [Request([rng.randrange(300) for _ in range(rng.randint(1, 20))],
                        [rng.randrange(300) for _ in range(rng.randint(1, 6))]) for _ in range(9)]
    fast = score_requests(model, requests, batch_size=4, keep_token_logprobs=True)
    full = score_requests(model, requests, batch_size=4, keep_token_logprobs=True, select_positions=False)
    for a, b in zip(fast, full):
        assert a.greedy == b.greedy
        assert all(close(x, y) for x, y in zip(a.token_logprobs, b.token_logprobs))
    assert isinstance(model.lm_head, torch.nn.Linear)  # the head is put back
    # and the numbers are the model's own: log_softmax of its logits at the continuation positions
    r = requests[0]
    ids = torch.tensor([list(r.context) + list(r.continuation)])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0].double(), -1)
    n = len(r.context)
    expected = [float(lp[n - 1 + i, t]) for i, t in enumerate(r.continuation)]
    assert all(close(x, y, 1e-4) for x, y in zip(fast[0].token_logprobs, expected))


def test_models_that_use_the_head_weight_directly_fall_back_to_full_logits():
    class WeightHead(torch.nn.Module):
        """Reads lm_head.weight itself, so the head cannot be swapped for the scored rows."""

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = torch.nn.Embedding(20, 8)
            self.lm_head = torch.nn.Linear(8, 20, bias=False)
            self.config = TableLM(torch.zeros(20, 20), n_ctx=16).config

        def forward(self, idx):
            from types import SimpleNamespace

            return SimpleNamespace(logits=self.emb(idx) @ self.lm_head.weight.t())

    model = WeightHead()
    requests = [Request([1, 2, 3], [4, 5]), Request([6], [7])]
    got = score_requests(model, requests)
    want = score_requests(model, requests, select_positions=False)
    assert [a.logprob for a in got] == pytest.approx([b.logprob for b in want])
    assert isinstance(model.lm_head, torch.nn.Linear)
