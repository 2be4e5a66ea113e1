"""GGUF export proven by llama.cpp itself: it loads our file, tokenizes like us, and its logits and greedy
tokens equal ours (f32); q8_0 loads and generates close to the float model."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from export_helpers import checkpoint, learned_tokenizer, llama_cpp_module

from gpt2kit.cli import main

pytest.importorskip("gguf")

PROMPTS = ["the cat sat on the", "Ünïcödé wörds, numbers 12345 and   spaces!"]


@pytest.fixture(scope="module", params=["learned", "openai"])
def ckpt(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"gguf-{request.param}")
    if request.param == "openai":
        from gpt2kit.tokenizer import Tokenizer
        from shared_data import shared_path

        tok = Tokenizer.from_pretrained(shared_path("gpt2"))
    else:
        tok = learned_tokenizer(d / "tok")
    return checkpoint(d / "ckpt", tok)


def export(ckpt, out, *extra) -> tuple[int, str]:
    """`gpt2kit export CKPT --format gguf --out OUT ...` in this process: (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["export", str(ckpt), "--format", "gguf", "--out", str(out), *extra])
    return code, err.getvalue()


def ours(ckpt):
    from gpt2kit.model import GPT2
    from gpt2kit.tokenizer import Tokenizer

    return GPT2.from_pretrained(ckpt).eval(), Tokenizer.from_pretrained(ckpt)


def load(llama_cpp, path, n_ctx: int):
    # f32 KV cache: llama.cpp's default f16 cache alone rounds logits by ~1e-3
    f32 = llama_cpp.GGML_TYPE_F32
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2, n_batch=64,
                           type_k=f32, type_v=f32)


def llama_greedy(llm, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """Greedy continuation by llama.cpp's own logits; returns (new tokens, logits at the prompt's end)."""
    llm.reset()
    llm.eval(ids)
    first = np.array(llm.scores[len(ids) - 1], dtype=np.float32)
    out = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return out, first


def torch_greedy(model, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    with torch.no_grad():
        first = model(torch.tensor([ids])).logits[0, -1].numpy()
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, temperature=0.0)
    return out[0, len(ids):].tolist(), first


def test_f32_export_matches_llama_cpp(ckpt, tmp_path):
    llama_cpp = llama_cpp_module()
    code, err = export(ckpt, tmp_path / "m.gguf")
    assert code == 0, err
    model, tok = ours(ckpt)
    llm = load(llama_cpp, tmp_path / "m.gguf", model.config.n_ctx)
    for text in PROMPTS:
        ids = tok.encode_ordinary(text)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
        assert llm.detokenize(ids).decode() == text
        ref_tokens, ref_logits = torch_greedy(model, ids, 32)
        got_tokens, got_logits = llama_greedy(llm, ids, 32)
        top2 = np.sort(ref_logits)[-2:]
        assert top2[1] - top2[0] > 2e-3  # a real decision, wider than the logits tolerance
        assert got_tokens == ref_tokens
        assert np.abs(got_logits - ref_logits).max() <= 1e-3
    llm.close()


@pytest.fixture(scope="module")
def learned_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf-q8")
    return checkpoint(d / "ckpt", learned_tokenizer(d / "tok"))


def test_q8_0_loads_and_generates_near_float(learned_ckpt, tmp_path):
    ckpt = learned_ckpt
    llama_cpp = llama_cpp_module()
    code, err = export(ckpt, tmp_path / "m8.gguf", "--dtype", "q8_0")
    assert code == 0, err
    import gguf

    reader = gguf.GGUFReader(str(tmp_path / "m8.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_qkv.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    model, tok = ours(ckpt)
    llm = load(llama_cpp, tmp_path / "m8.gguf", model.config.n_ctx)
    ids = tok.encode_ordinary(PROMPTS[0])
    got_tokens, got_logits = llama_greedy(llm, ids, 32)
    _, ref_logits = torch_greedy(model, ids, 32)
    assert len(got_tokens) == 32 and all(0 <= t < model.config.vocab_size for t in got_tokens)
    # 8-bit blocks: close to the float logits, not equal
    err = np.abs(got_logits - ref_logits).max() / np.abs(ref_logits).max()
    assert err < 0.05, err
    assert (tmp_path / "m8.gguf").stat().st_size < 0.5 * sum(p.numel() * 4 for p in model.parameters())
    llm.close()


def test_refuses_variant_and_quantized_checkpoints(learned_ckpt, tmp_path):
    from gpt2kit.model import GPT2
    from gpt2kit.tokenizer import Tokenizer

    ck = learned_ckpt
    tok = Tokenizer.from_pretrained(ck)
    variant = GPT2(GPT2.from_pretrained(ck).config.replace(attention="sliding", window=16))
    variant.save_pretrained(tmp_path / "variant", tokenizer=tok)
    code, err = export(tmp_path / "variant", tmp_path / "v.gguf")
    assert code == 2 and "variant" in err and len(err.strip().splitlines()) == 1, err
    from gpt2kit.post.quantize import QuantSpec, quantize_checkpoint

    quantize_checkpoint(ck, tmp_path / "q", QuantSpec.default(8, None, False, True))
    code, err = export(tmp_path / "q", tmp_path / "q.gguf")
    assert code == 2 and "quantized" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "v.gguf").exists() and not (tmp_path / "q.gguf").exists()
