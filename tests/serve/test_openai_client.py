"""The official `openai` client against the server: completions and chat, streaming and not, n, stop
strings, logprobs, seeds; greedy text equals `gpt2kit generate --temperature 0`; batched equals alone."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("openai")

PROMPTS = ["the cat", "a bird sang in", "the dog sat on the log. the", "mat"]


def greedy(client, prompt, n=24, **kw):
    return client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0, **kw).choices[0]


def test_completion_shape_usage_and_models(client, loaded):
    r = client.completions.create(model="tiny", prompt="the cat", max_tokens=7, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    c = r.choices[0]
    assert c.finish_reason in ("length", "stop") and isinstance(c.text, str)
    assert r.usage.prompt_tokens == len(loaded[1].encode("the cat"))
    if c.finish_reason == "length":
        assert r.usage.completion_tokens == 7
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_stream_equals_non_stream_and_include_usage(client):
    full = greedy(client, "the dog", 30)
    pieces, usage, finish = [], None, None
    for chunk in client.completions.create(model="tiny", prompt="the dog", max_tokens=30, temperature=0, stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.text)
            finish = c.finish_reason or finish
    assert "".join(pieces) == full.text
    assert finish == full.finish_reason
    assert usage is not None and usage.completion_tokens >= 1


def test_n_seed_and_sampling(client):
    kw = dict(model="tiny", prompt="the", max_tokens=12, temperature=1.0, top_p=0.9, seed=123, n=2)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # a seed reproduces every choice
    assert a.choices[0].text != a.choices[1].text  # ... and the n choices differ
    lists = client.completions.create(model="tiny", prompt=["the", "a"], max_tokens=3, n=2, seed=1)
    assert len(lists.choices) == 4


def test_stop_strings(client):
    free = greedy(client, "the cat", 40).text
    # stop on a piece of the greedy continuation: the text ends right before it
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    if not stop.strip():
        pytest.skip("greedy text too short for a stop string")
    r = greedy(client, "the cat", 40, stop=[stop, "zzzz"])
    assert r.text == free[: free.index(stop)]
    assert r.finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="the cat", max_tokens=40, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == r.text


def test_logprobs_completions(client, loaded):
    import torch

    model, tok = loaded
    r = greedy(client, "the cat", 5, logprobs=3)
    lp = r.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    # the first token's logprob is the model's log-softmax at the end of the prompt
    ids = tok.encode("the cat")
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
    assert math.isclose(lp.token_logprobs[0], float(logp.max()), abs_tol=1e-4)
    assert len(lp.top_logprobs[0]) == 3 and max(lp.top_logprobs[0].values()) == pytest.approx(lp.token_logprobs[0], abs=1e-5)
    # echo + max_tokens=0 scores the prompt (as lm-eval-harness asks)
    e = client.completions.create(model="tiny", prompt="the cat sat", max_tokens=0, echo=True, logprobs=0)
    assert e.choices[0].text == "the cat sat"
    assert e.choices[0].logprobs.token_logprobs[0] is None
    assert len(e.choices[0].logprobs.token_logprobs) == len(tok.encode("the cat sat"))


def test_chat_completions_stream_and_logprobs(client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat?"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0, logprobs=True,
                                       top_logprobs=2)
    c = r.choices[0]
    assert r.object == "chat.completion" and c.message.role == "assistant"
    assert "<|im_end|>" not in c.message.content
    assert len(c.logprobs.content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in c.logprobs.content)
    parts = [ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=10, temperature=0, stream=True) if ch.choices]
    assert "".join(parts) == c.message.content
    two = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, n=2, seed=3)
    assert [x.index for x in two.choices] == [0, 1]


def test_batched_greedy_equals_alone(client, live):
    alone = [greedy(client, p, 40).text for p in PROMPTS * 2]
    with ThreadPoolExecutor(8) as pool:  # 8 requests on a batch of 4: rows join and leave mid-run
        together = list(pool.map(lambda p: greedy(client, p, 40).text, PROMPTS * 2))
    assert together == alone
    assert live.wait_idle()


def _run_cli(args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "gpt2kit", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


def test_cli_serve_greedy_equals_generate(checkpoint):
    import openai

    gen = subprocess.run([sys.executable, "-m", "gpt2kit", "generate", str(checkpoint), "--prompt", "the cat sat",
                          "--max-new-tokens", "30", "--temperature", "0", "--no-prompt"],
                         capture_output=True, text=True, timeout=120)
    assert gen.returncode == 0, gen.stderr
    expected = gen.stdout[:-1]  # generate ends its output with a newline
    proc = _run_cli(["serve", str(checkpoint), "--port", "0"])
    try:
        line = proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{m.group(1)}/v1", api_key="x", max_retries=0, timeout=60)
        r = c.completions.create(model="x", prompt="the cat sat", max_tokens=30, temperature=0)
        assert r.choices[0].text == expected
    finally:
        proc.terminate()
        proc.wait(timeout=20)
