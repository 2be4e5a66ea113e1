"""The prompt's elementwise and attention shortcuts for CPU inference: the native GELU (model/native,
model/linear.py) and causal attention in query chunks (model/gpt2.py). Both must compute what the plain
torch ops compute, up to rounding, and stay out of training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpt2kit.model import GPT2, GPT2Config, KVCache, native
from gpt2kit.model import gpt2 as gpt2_module
from gpt2kit.model import linear as linear_module

needs_native = pytest.mark.skipif(native.library() is None, reason=f"native kernels {native.status()}")


def _gelu_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.cat([torch.randn(200_003, generator=g) * 3, torch.linspace(-30, 30, 60_001),
                      torch.tensor([0.0, -0.0, 1e-40, -1e-40, float("inf"), float("nan")])])


@needs_native
def test_native_gelu_is_the_tanh_gelu():
    x = _gelu_inputs()
    got = native.gelu(x).double()
    xd = x.double()  # x sigmoid(2u) in float64: 0.5 x (1 + tanh u) cancels even in float64 below x ~ -6
    ref = xd * torch.sigmoid(2 * 0.7978845608028654 * (xd + 0.044715 * xd**3))
    finite = torch.isfinite(ref)
    big = finite & (ref.abs() > 1e-30)
    # within a few float32 ulp of the exact tanh GELU, its negative tail included (where torch's float32
    # 0.5 x (1 + tanh u) loses every digit to cancellation)
    # (deep in the tail the float32 argument's own rounding, ~1e-7, comes out multiplied by |2u| <= 88)
    assert ((got[big] - ref[big]).abs() / ref[big].abs()).max() < 2e-5
    assert ((got - ref).abs() / ref.abs())[finite & (ref.abs() > 1e-6)].max() < 4e-6
    assert (got[finite & ~big].abs() < 1e-30).all()
    assert got[-2] == float("inf") and torch.isnan(got[-1])
    assert torch.equal(native.gelu(x.view(2, -1)[:, :5].contiguous()), native.gelu(x.view(2, -1)[:, :5].contiguous()))


@needs_native
def test_native_gelu_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="contiguous float32 CPU"):
        native.gelu(torch.randn(4, 6).t())
    with pytest.raises(ValueError, match="contiguous float32 CPU"):
        native.gelu(torch.randn(8, dtype=torch.float64))


@needs_native
@pytest.mark.skipif(not native._arch_flags() or native._arch_flags()[0] != "-march=native", reason="x86-64 only")
@pytest.mark.parametrize("flags", ["-mno-avx512f -mno-avxvnni", "-mno-avx2"])
def test_native_gelu_has_the_same_bits_on_every_isa_path(tmp_path, flags, run_python):
    if "avx2" not in native._cpu_flags().split():
        pytest.skip("this CPU has no AVX2")
    here = str(__import__("pathlib").Path(__file__).parent)
    code = (f"import json, sys; sys.path.insert(0, {here!r}); import test_prefill_kernels as t;"
            "from gpt2kit.model import native;"
            "print(json.dumps([native.f32_status(), native.gelu(t._gelu_inputs()).view(-1).numpy().view('int32').tolist()]))")
    isa, bits = json.loads(run_python(code, GPT2KIT_CACHE=str(tmp_path), GPT2KIT_NATIVE_CFLAGS=flags))
    assert "avx512" not in isa
    here = native.gelu(_gelu_inputs()).numpy().view(np.int32)
    assert np.array_equal(np.asarray(bits, np.int32), here)


@needs_native
def test_gelu_linear_uses_the_native_gelu_for_inference_only(monkeypatch):
    calls = []
    real = native.gelu
    monkeypatch.setattr(native, "gelu", lambda u: calls.append(u.shape) or real(u))
    layer = torch.nn.Linear(512, 8)
    u = torch.randn(130, 512)
    with torch.no_grad():
        y = linear_module.gelu_linear(u, layer)
    assert calls == [(130, 512)]
    torch.testing.assert_close(y, layer(F.gelu(u, approximate="tanh")), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        linear_module.gelu_linear(torch.randn(3, 512), layer)  # too small to be worth a call
    assert len(calls) == 1
    uu = u.clone().requires_grad_()
    linear_module.gelu_linear(uu, layer).sum().backward()  # training: torch's GELU and its backward
    assert len(calls) == 1 and uu.grad is not None


def test_causal_attention_in_chunks_equals_sdpa():
    g = torch.Generator().manual_seed(1)
    for T in (192, 300, 767):
        q, k, v = (torch.randn(2, 3, T, 16, generator=g) for _ in range(3))
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.testing.assert_close(gpt2_module._causal_attention_in_chunks(q, k, v), ref, rtol=0, atol=1e-6)


def test_chunks_apply_to_a_cpu_inference_prompt_only():
    q = torch.randn(1, 2, 300, 8)
    with torch.no_grad():
        assert gpt2_module._chunk_causal_prefill(q, q, training=False)
        assert not gpt2_module._chunk_causal_prefill(q, q, training=True)
        assert not gpt2_module._chunk_causal_prefill(q[:, :, :100], q[:, :, :100], training=False)  # short
        assert not gpt2_module._chunk_causal_prefill(q, torch.randn(1, 2, 310, 8), training=False)  # a cache
        assert not gpt2_module._chunk_causal_prefill(torch.randn(1, 2, 800, 8), torch.randn(1, 2, 800, 8), False)
    assert not gpt2_module._chunk_causal_prefill(q.requires_grad_(), q, training=False)


def test_a_chunked_prompt_gives_the_model_s_logits_and_cache(monkeypatch):
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=97, n_ctx=320, n_layer=2, n_head=2, n_embd=32, eos_token_id=0)).eval()
    idx = torch.randint(0, 97, (2, 300))
    runs = []
    for chunked in (True, False):
        monkeypatch.setattr(gpt2_module, "_PREFILL_CHUNKED", range(192, 768) if chunked else range(0))
        cache = KVCache.allocate(model.config, 2, 320)
        with torch.inference_mode():
            runs.append((model(idx, kv_cache=cache).logits, cache))
    (a, ca), (b, cb) = runs
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert ca.length == cb.length == 300
