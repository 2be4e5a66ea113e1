"""gpt2kit's own float32 product for a few rows (model/native/gemm_f32.c): the arithmetic, the batch
invariance it promises (a row's result does not depend on the rows beside it), every ISA path, and its
use by the decode fast path; and the batched decode attention (model/native/attention.c)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gpt2kit.model import native

needs_native = pytest.mark.skipif(native.library() is None, reason=f"native kernels {native.status()}")


def _case(M: int, N: int, K: int, bias: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((M, K), dtype=np.float32)
    w = (rng.standard_normal((N, K), dtype=np.float32) * 0.05).astype(np.float32)
    b = rng.standard_normal(N, dtype=np.float32) if bias else None
    return x, w, b


def _reference(x, w, b):
    y = x.astype(np.float64) @ w.astype(np.float64).T
    return y if b is None else y + b


@needs_native
@pytest.mark.parametrize("M, N, K", [(1, 1, 1), (3, 7, 17), (5, 13, 768), (16, 50, 3072), (33, 9, 40), (4, 4, 16)])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_f32_linear_computes_x_w_t_plus_b(M, N, K, threads, bias):
    x, w, b = _case(M, N, K, bias)
    out = np.full((M, N), np.nan, np.float32)
    got = native.f32_linear(x, w, b, out, threads)
    assert got is out
    ref = _reference(x, w, b)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(ref).max()))


@needs_native
@pytest.mark.parametrize("K", [768, 100])
def test_a_rows_result_is_bitwise_the_same_alone_or_in_any_batch(K):
    x, w, b = _case(20, 37, K, True, seed=1)
    alone = np.stack([native.f32_linear(x[i : i + 1].copy(), w, b, np.empty((1, 37), np.float32), 1)[0]
                      for i in range(20)])
    for M in (2, 3, 4, 5, 7, 16, 20):
        for threads in (1, 2):
            batched = native.f32_linear(x[:M].copy(), w, b, np.empty((M, 37), np.float32), threads)
            assert np.array_equal(batched, alone[:M]), (M, threads)


@needs_native
def test_f32_linear_refuses_what_it_cannot_read():
    x, w, b = _case(2, 8, 16, True)
    with pytest.raises(ValueError, match="do not fit"):
        native.f32_linear(x, w[:, :8].copy(), b, np.empty((2, 8), np.float32))
    with pytest.raises(ValueError, match="do not fit"):
        native.f32_linear(x, w, b, np.empty((2, 9), np.float32))
    with pytest.raises(ValueError, match="float32"):
        native.f32_linear(x.astype(np.float64), w, b, np.empty((2, 8), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        native.f32_linear(np.asfortranarray(x), w, b, np.empty((2, 8), np.float32))


@needs_native
@pytest.mark.skipif(not native._arch_flags() or native._arch_flags()[0] != "-march=native", reason="x86-64 only")
@pytest.mark.parametrize("flags, isa", [("-mno-avx512f", "avx2+fma"), ("-mno-avx2", "portable")])
def test_every_isa_path_computes_the_same(tmp_path, flags, isa, run_python):
    """The AVX2 and portable paths, built on this CPU with its newer instructions switched off."""
    if "avx2" not in native._cpu_flags().split():
        pytest.skip("this CPU has no AVX2")
    code = ("import json, numpy as np; from gpt2kit.model import native;"
            "rng = np.random.default_rng(5); x = rng.standard_normal((6, 70), dtype=np.float32);"
            "w = rng.standard_normal((11, 70), dtype=np.float32); b = rng.standard_normal(11, dtype=np.float32);"
            "y = native.f32_linear(x, w, b, np.empty((6, 11), np.float32), 2);"
            "alone = [native.f32_linear(x[i:i+1].copy(), w, b, np.empty((1, 11), np.float32), 1)[0] for i in range(6)];"
            "print(json.dumps([native.f32_status(), y.tolist(), bool(np.array_equal(np.stack(alone), y))]))")
    status, y, invariant = json.loads(run_python(code, GPT2KIT_CACHE=str(tmp_path), GPT2KIT_NATIVE_CFLAGS=flags))
    assert status == isa and invariant
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 70), dtype=np.float32)
    w = rng.standard_normal((11, 70), dtype=np.float32)
    b = rng.standard_normal(11, dtype=np.float32)
    np.testing.assert_allclose(np.array(y), _reference(x, w, b), rtol=1e-5, atol=1e-4)


@needs_native
def test_the_decode_fast_path_gives_each_row_the_logits_it_gets_alone():
    """Through FastDecoder at 1 row (numpy's BLAS) and at 6 rows (this kernel): a row decoded beside others
    gets the logits it gets alone, to float32 rounding."""
    from gpt2kit.decode_fast import FastDecoder
    from gpt2kit.model import GPT2, GPT2Config, KVCache

    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=97, eos_token_id=0, n_ctx=32, n_layer=2, n_head=2, n_embd=32)).eval()
    prompt = torch.randint(0, 97, (6, 5))
    with torch.inference_mode():
        def step(rows):
            cache = KVCache.allocate(model.config, len(rows), 32)
            model(prompt[rows], kv_cache=cache)
            return FastDecoder(model)(prompt[rows, -1:], cache, None, None).clone()

        batched = step(list(range(6)))
        for i in range(6):
            torch.testing.assert_close(step([i])[0], batched[i], rtol=0, atol=2e-6)


@needs_native
@pytest.mark.parametrize("B, H, D, T, max_len", [(1, 1, 1, 1, 1), (3, 2, 5, 7, 9), (16, 12, 64, 90, 128)])
@pytest.mark.parametrize("masked", [False, True])
def test_decode_attention_equals_the_numpy_softmax(B, H, D, T, max_len, masked):
    from gpt2kit.decode_fast import _attention

    rng = np.random.default_rng(B + T)
    qkv = rng.standard_normal((B, 3 * H * D), dtype=np.float32)
    keys = rng.standard_normal((B, H, max_len, D), dtype=np.float32)
    values = rng.standard_normal((B, H, max_len, D), dtype=np.float32)
    keep = None
    if masked:  # rows that joined later see only their last columns; the newest column is always theirs
        keep = np.ones((B, T), bool)
        for b in range(B):
            keep[b, : rng.integers(0, T)] = False
    scale = np.float32(1 / np.sqrt(D))
    out = np.full((B, H * D), np.nan, np.float32)
    native.decode_attention(qkv, keys, values, T, keep, float(scale), out, threads=2)
    q = qkv[:, : H * D].reshape(B, H, 1, D)
    ref = _attention(q, keys[:, :, :T], values[:, :, :T], keep, scale).reshape(B, H * D)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@needs_native
def test_decode_attention_refuses_what_it_cannot_read():
    qkv = np.zeros((2, 3 * 8), np.float32)
    cache = np.zeros((2, 2, 10, 4), np.float32)
    out = np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match="do not fit"):
        native.decode_attention(qkv, cache, cache, 11, None, 0.5, out)  # past max_len
    with pytest.raises(ValueError, match="do not fit"):
        native.decode_attention(qkv, cache, cache, 5, np.ones((2, 4), bool), 0.5, out)
    with pytest.raises(ValueError, match="float32"):
        native.decode_attention(qkv, cache.astype(np.float64), cache.astype(np.float64), 5, None, 0.5, out)
