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
        self.started = threading.Event()  # set at the first token

    def __call__(self, ev):
        if isinstance(ev, Delta):
            self.text += ev.text
            self.started.set()
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


def _spy_prefill(monkeypatch, log):
    """Record every prefill chunk (rows, columns, padded) and every decode step in `log`, in order."""
    from gpt2kit.serve import prefill

    step, decode = prefill.PrefillGroup.step, Scheduler._step

    def spy_step(self, model, columns):
        cols = min(self.width - self.done, max(1, columns))
        log.append(("prefill", id(self), len(self.rows), cols, self.mask is not None))
        return step(self, model, columns)

    def spy_decode(self):
        log.append(("decode", len(self._active)))
        return decode(self)

    monkeypatch.setattr(prefill.PrefillGroup, "step", spy_step)
    monkeypatch.setattr(Scheduler, "_step", spy_decode)


def run_submitted_first(model, tok, prompts, params, max_batch, **kwargs):
    """Queue every sequence before the scheduler starts: its first admission takes them together."""
    s = Scheduler(model, tok, max_batch=max_batch, max_queue=64, **kwargs)
    outs = []
    for ids, p in zip(prompts, params):
        outs.append(Collect())
        s.submit([Sequence(ids, p, outs[-1])])
    s.start()
    try:
        for c in outs:
            assert c.event.wait(60)
        return [(c.text, c.finished.reason, c.finished.completion_tokens) for c in outs]
    finally:
        s.stop()


def test_batched_prefill_of_different_lengths_equals_alone(loaded, monkeypatch):
    model, tok = loaded
    g = torch.Generator().manual_seed(3)
    lengths = [5, 6, 7, 9, 30, 31, 2, 33]
    prompts = [torch.randint(0, tok.vocab_size - 1, (n,), generator=g).tolist() for n in lengths]
    params = [SamplingParams(max_tokens=15 + i, temperature=0 if i % 2 else 0.8, seed=i, ignore_eos=True)
              for i in range(len(lengths))]
    alone = [run_all(model, tok, [p], [q], 1)[0] for p, q in zip(prompts, params)]
    log = []
    _spy_prefill(monkeypatch, log)
    assert run_submitted_first(model, tok, prompts, params, 8) == alone
    chunks = [e for e in log if e[0] == "prefill"]
    # grouped by length: the short ones together (left-padded), the ~30-token ones together
    assert sorted(rows for _, _, rows, _, _ in chunks) == [3, 5]
    assert any(padded and rows > 1 for _, _, rows, _, padded in chunks)


def test_chunked_prefill_interleaves_with_decode_and_equals_alone(loaded, monkeypatch):
    model, tok = loaded
    g = torch.Generator().manual_seed(4)
    short = torch.randint(0, tok.vocab_size - 1, (4,), generator=g).tolist()
    longs = [torch.randint(0, tok.vocab_size - 1, (n,), generator=g).tolist() for n in (90, 97)]
    # the short one decodes for long enough (124 of the 128 positions) that the long prompts'
    # chunked prefill (7 chunks) happens while it runs, however fast the machine
    params = [SamplingParams(max_tokens=120, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=20, temperature=0.7, seed=5, ignore_eos=True)]
    prompts = [short] + longs
    alone = [run_all(model, tok, [p], [q], 1)[0] for p, q in zip(prompts, params)]

    log = []
    _spy_prefill(monkeypatch, log)
    s = Scheduler(model, tok, max_batch=4, max_queue=8, prefill_tokens=32)
    outs = [Collect() for _ in prompts]
    s.submit([Sequence(short, params[0], outs[0])])
    s.start()
    try:
        assert outs[0].started.wait(60)  # the short one is decoding before the long prompts arrive
        assert not outs[0].event.is_set()
        s.submit([Sequence(p, q, c) for p, q, c in zip(longs, params[1:], outs[1:])])
        for c in outs:
            assert c.event.wait(60)
    finally:
        s.stop()
    assert [(c.text, c.finished.reason, c.finished.completion_tokens) for c in outs] == alone
    long_chunks = [e for e in log if e[0] == "prefill" and e[2] == 2]  # the long pair: one group
    assert all(rows * cols <= 32 for _, _, rows, cols, _ in long_chunks)
    assert len(long_chunks) >= 6  # 97 columns x 2 rows in chunks of 16 columns
    first = log.index(long_chunks[0])
    last = log.index(long_chunks[-1])
    assert any(e[0] == "decode" for e in log[first:last])  # the short one kept decoding meanwhile


def test_plan_groups_bounds_padding():
    from gpt2kit.serve.prefill import plan_groups

    prompts = [[0] * n for n in (30, 2, 3, 100, 28, 1)]
    assert plan_groups(prompts) == [[5, 1, 2], [4, 0], [3]]
    assert plan_groups(prompts, batchable=False) == [[5], [1], [2], [4], [0], [3]]
    # a burst of 16 equal prompts: groups of at most 256 padded tokens, the first ones out sooner
    burst = plan_groups([[0] * 28] * 16, max_tokens=256)
    assert [len(g) for g in burst] == [9, 7] and sorted(i for g in burst for i in g) == list(range(16))
    assert plan_groups([[0] * 300, [0] * 5], max_tokens=256) == [[1], [0]]  # too long for any group: alone
