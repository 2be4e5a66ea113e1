"""The scheduler without HTTP: sequences that join a running batch at different times, with different
prompt lengths (the batch cache shifts, compacts and grows), generate what they generate alone."""

from __future__ import annotations

import threading

import pytest
import torch

from gpt2kit.serve.scheduler import Delta, Finished, QueueFull, SamplingParams, Scheduler, Sequence


class Collect:
    def __init__(self):
        self.text, self.finished, self.event = "", None, threading.Event()

    def __call__(self, ev):
        if isinstance(ev, Delta):
            self.text += ev.text
        elif isinstance(ev, Finished):
            self.finished = ev
            self.event.set()


def run_all(model, tok, prompts, params, max_batch):
    s = Scheduler(model, tok, max_batch=max_batch, max_queue=64)
    s.start()
    try:
        outs = []
        for ids, p in zip(prompts, params):
            c = Collect()
            outs.append(c)
            s.submit([Sequence(ids, p, c)])
        for c in outs:
            assert c.event.wait(60)
        return [(c.text, c.finished.reason, c.finished.completion_tokens) for c in outs]
    finally:
        s.stop()


def test_batched_equals_alone_across_joins_compaction_and_growth(loaded):
    model, tok = loaded
    g = torch.Generator().manual_seed(0)
    lengths = [3, 90, 1, 40, 7, 100, 12, 60]  # long prompts join after short ones: the cache shifts and grows
    prompts = [torch.randint(0, tok.vocab_size - 1, (n,), generator=g).tolist() for n in lengths]
    params = [SamplingParams(max_tokens=min(20 + 3 * i, 128 - n), temperature=0 if i % 2 else 0.9, seed=i,
                             top_k=None if i % 3 else 20, ignore_eos=True)
              for i, n in enumerate(lengths)]
    alone = [run_all(model, tok, [p], [q], 1)[0] for p, q in zip(prompts, params)]
    batched = run_all(model, tok, prompts, params, 3)
    assert batched == alone
    assert all(reason == "length" for _, reason, _ in batched)


def test_submit_is_all_or_nothing_when_the_queue_is_full(loaded):
    model, tok = loaded
    s = Scheduler(model, tok, max_batch=1, max_queue=2)  # not started: nothing drains the queue
    seq = lambda: Sequence([1, 2], SamplingParams(max_tokens=1), lambda ev: None)  # noqa: E731
    with pytest.raises(QueueFull):
        s.submit([seq(), seq(), seq()])
    assert s.waiting == 0
    s.submit([seq(), seq()])
    with pytest.raises(QueueFull):
        s.submit([seq()])


@pytest.mark.parametrize("layers", [("sliding", "dense"), ("linear", "fixed")])
def test_attention_variants_batched_equal_alone(loaded, layers):
    from gpt2kit.model import GPT2, GPT2Config

    _, tok = loaded
    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, n_ctx=128, n_layer=2, n_head=2, n_embd=32,
                     attention_layers=layers, window=8, attention_block=8, attention_summary=2)
    model = GPT2(cfg).eval()
    g = torch.Generator().manual_seed(2)
    lengths = [5, 30, 2, 17]
    prompts = [torch.randint(0, tok.vocab_size - 1, (n,), generator=g).tolist() for n in lengths]
    params = [SamplingParams(max_tokens=12 + 2 * i, temperature=0, ignore_eos=True) for i in range(len(lengths))]
    alone = [run_all(model, tok, [p], [q], 1)[0] for p, q in zip(prompts, params)]
    assert run_all(model, tok, prompts, params, 2) == alone
