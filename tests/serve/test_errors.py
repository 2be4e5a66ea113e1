"""Every bad request is a 4xx in OpenAI's error shape, naming `param` where there is one; an API key is
enforced; a bounded property-based fuzz over the server's own OpenAPI schema gives no 5xx."""

from __future__ import annotations

import json
import os

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import N_CTX, start_server


def post(live, path, body, headers=None):
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(live.url + path, content=content, headers={"content-type": "application/json", **(headers or {})},
                      timeout=60)


def assert_error(r, status, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


@pytest.mark.parametrize("body, param", [
    ('{"prompt": "a", ', None),  # bad JSON
    ('[1, 2]', None),
    ({"prompt": 3}, "prompt"),
    ({"prompt": "a", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "a", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "a", "max_tokens": 10**9}, "max_tokens"),
    ('{"prompt": "a", "temperature": NaN}', "temperature"),
    ('{"prompt": "a", "top_p": Infinity}', "top_p"),
    ({"prompt": "a", "temperature": -0.5}, "temperature"),
    ({"prompt": "a", "top_p": 0}, "top_p"),
    ({"prompt": "a", "n": 0}, "n"),
    ({"prompt": "a", "logprobs": 99}, "logprobs"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "a", "stop": [""]}, "stop"),
    ({"prompt": "a", "frobnicate": True}, "frobnicate"),
    ({"prompt": [1, 2, 10**7]}, "prompt"),
    ({"prompt": "a", "seed": 2**70}, "seed"),
    ({}, "prompt"),
])
def test_bad_completion_requests(live, body, param):
    assert_error(post(live, "/v1/completions", body), 400, param)


def test_extreme_but_valid_values_generate(live):
    for body in ({"prompt": "a", "temperature": 1e-300, "max_tokens": 3}, {"prompt": "\ud800", "max_tokens": 2},
                 {"prompt": "a", "top_k": 10**9, "top_p": 1e-9, "max_tokens": 2, "seed": -5},
                 {"prompt": "", "max_tokens": 1, "presence_penalty": 2, "frequency_penalty": -2}):
        r = post(live, "/v1/completions", body)
        assert r.status_code == 200, (body, r.text)


def test_over_context_names_the_limit(live):
    err = assert_error(post(live, "/v1/completions", {"prompt": "the cat " * 400, "max_tokens": 1}), 400, "prompt")
    assert str(N_CTX) in err["message"] and err["code"] == "context_length_exceeded"
    err = assert_error(post(live, "/v1/completions", {"prompt": "the", "max_tokens": N_CTX}), 400, "max_tokens")
    assert str(N_CTX) in err["message"]
    err = assert_error(post(live, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 500}]}), 400)
    assert str(N_CTX) in err["message"]
    r = post(live, "/v1/completions", {"prompt": "x" * 1_000_000, "max_tokens": 1})  # a 1 MB prompt
    assert_error(r, 400, "prompt")


def test_bad_chat_requests(live):
    assert_error(post(live, "/v1/chat/completions", {"messages": []}), 400, "messages")
    assert_error(post(live, "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}), 400)
    assert_error(post(live, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                     "top_logprobs": 2}), 400, "top_logprobs")


def test_queue_full_is_429_at_once(live):
    # 9 sequences (3 prompts x n=3) cannot fit a queue of 8: refused before anything runs
    err = assert_error(post(live, "/v1/completions", {"prompt": ["a", "b", "c"], "n": 3, "max_tokens": 2}), 429)
    assert err["type"] == "rate_limit_error"
    assert post(live, "/v1/completions", {"prompt": "a", "max_tokens": 2}).status_code == 200


def test_unknown_route_and_method(live):
    assert_error(httpx.get(live.url + "/v1/nope"), 404)
    assert_error(httpx.get(live.url + "/v1/completions"), 405)


def test_tokenize_detokenize_health_metrics(live, loaded):
    tok = loaded[1]
    r = post(live, "/tokenize", {"prompt": "the cat"})
    assert r.json()["tokens"] == tok.encode("the cat")
    assert post(live, "/detokenize", {"tokens": r.json()["tokens"]}).json()["prompt"] == "the cat"
    assert_error(post(live, "/detokenize", {"tokens": [10**6]}), 400, "tokens")
    assert httpx.get(live.url + "/health").json()["status"] == "ok"
    text = httpx.get(live.url + "/metrics").text
    for name in ("gpt2kit_requests_total", "gpt2kit_prompt_tokens_total", "gpt2kit_completion_tokens_total",
                 "gpt2kit_queue_depth", "gpt2kit_running_batch_size",
                 "gpt2kit_time_to_first_token_seconds_bucket", "gpt2kit_inter_token_latency_seconds_count"):
        assert name in text


def test_api_key(loaded):
    s = start_server(loaded, api_key="sekrit")
    try:
        body = {"prompt": "a", "max_tokens": 2}
        assert_error(post(s, "/v1/completions", body), 401)
        assert_error(post(s, "/v1/completions", body, {"authorization": "Bearer wrong"}), 401)
        assert_error(httpx.get(s.url + "/v1/models"), 401)
        assert post(s, "/v1/completions", body, {"authorization": "Bearer sekrit"}).status_code == 200
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        s.close()


# ----- bounded fuzz over the server's own schema ------------------------------------------------------

# 200 in CI (bounded time); GPT2KIT_FUZZ_EXAMPLES=500 for the full count
FUZZ_EXAMPLES = int(os.environ.get("GPT2KIT_FUZZ_EXAMPLES", "200"))

HOSTILE = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40)
    | st.sampled_from(["", "\x00", "<|endoftext|>", "<|im_end|>", "x" * 5000, "\ud7ff\ue000"]),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)


@pytest.fixture(scope="module")
def schema_fields(live):
    spec = httpx.get(live.url + "/openapi.json").json()
    comp = spec["components"]["schemas"]
    return {path: sorted(comp[name]["properties"]) for path, name in [
        ("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest"),
        ("/tokenize", "TokenizeRequest"), ("/detokenize", "DetokenizeRequest")]}


def test_fuzz_from_the_openapi_schema_gives_no_5xx(live, schema_fields):
    paths = sorted(schema_fields)

    @st.composite
    def bodies(draw):
        path = draw(st.sampled_from(paths))
        fields = schema_fields[path] + ["bogus"]
        keys = draw(st.lists(st.sampled_from(fields), unique=True, max_size=6))
        body = {k: draw(HOSTILE) for k in keys}
        # mostly-valid requests reach the generation path too: small bounded values for the big knobs
        if path.startswith("/v1") and draw(st.booleans()):
            body.setdefault("prompt" if path == "/v1/completions" else "messages",
                            "the cat" if path == "/v1/completions" else [{"role": "user", "content": "hi"}])
            body["max_tokens"] = draw(st.integers(0, 8) | HOSTILE)
            body.pop("n", None)
        return path, body

    seen = set()

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(bodies())
    # explicit valid bodies: the generation path is always reached, whatever the random draw
    @example(("/v1/completions", {"prompt": "the cat", "max_tokens": 4}))
    @example(("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}))
    def check(pb):
        path, body = pb
        r = post(live, path, json.dumps(body, allow_nan=True))
        seen.add(r.status_code)
        assert r.status_code < 500, (path, body, r.text)
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}

    check()
    assert 200 in seen and 400 in seen
    assert httpx.get(live.url + "/health").status_code == 200
    assert live.wait_idle()
