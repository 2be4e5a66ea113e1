"""The server serves what gpt2kit loads: a quantized checkpoint (greedy text equals gpt2kit.generate on it)
and a chat checkpoint's own template."""

from __future__ import annotations

import shutil

import httpx
import pytest

from conftest import LiveServer

pytest.importorskip("openai")


def test_quantized_checkpoint_greedy_equals_generate(checkpoint, tmp_path):
    import openai

    from gpt2kit.generate import TextStream
    from gpt2kit.model import GPT2
    from gpt2kit.post.quantize import QuantSpec, quantize_checkpoint
    from gpt2kit.serve.app import Server
    from gpt2kit.tokenizer import Tokenizer

    q = tmp_path / "int8"
    quantize_checkpoint(checkpoint, q, QuantSpec.default(8), log=lambda *a, **k: None)
    model, tok = GPT2.from_pretrained(q).eval(), Tokenizer.from_pretrained(q)
    expected = "".join(TextStream(model, tok, "the dog sat", 30, temperature=0))
    live = LiveServer(Server(model, tok, "int8"))
    try:
        c = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
        assert c.completions.create(model="int8", prompt="the dog sat", max_tokens=30, temperature=0).choices[0].text == expected
    finally:
        live.close()


def test_chat_checkpoint_template_is_used(checkpoint, loaded, tmp_path):
    from gpt2kit.align.chat import load_chat_template, save_chat_template
    from gpt2kit.serve.app import Server

    d = tmp_path / "chat"
    shutil.copytree(checkpoint, d)
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
    save_chat_template(d, template)
    model, tok = loaded
    live = LiveServer(Server(model, tok, "chat", chat_template=load_chat_template(d)))
    try:
        r = httpx.post(live.url + "/tokenize", json={"messages": [{"role": "user", "content": "the cat"}]})
        assert r.json()["tokens"] == tok.encode("[user] the cat\n[assistant] ")
    finally:
        live.close()
