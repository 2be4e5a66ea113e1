"""The CPU float32 product backend of inference (model/linear.py): oneDNN where MKL runs its generic path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt2kit.errors import UserError
from gpt2kit.model import GPT2, GPT2Config
from gpt2kit.model import linear as backend

needs_onednn = pytest.mark.skipif(backend._onednn_linear_op() is None, reason="this torch has no oneDNN linear op")


@pytest.fixture
def gemm(monkeypatch):
    """Set GPT2KIT_CPU_GEMM for one test; the cached choice is recomputed before and after."""

    def choose(value: str | None, vendor: str | None = None) -> str:
        if value is None:
            monkeypatch.delenv(backend.GEMM_ENV, raising=False)
        else:
            monkeypatch.setenv(backend.GEMM_ENV, value)
        if vendor is not None:
            monkeypatch.setattr(backend, "_cpu_vendor", lambda: vendor)
        backend.inference_gemm.cache_clear()
        return backend.inference_gemm()

    yield choose
    backend.inference_gemm.cache_clear()


@needs_onednn
def test_auto_picks_onednn_off_intel_only(gemm):
    assert gemm(None, vendor="AuthenticAMD") == "onednn"
    assert gemm("auto", vendor="GenuineIntel") == "mkl"
    assert gemm(None, vendor="") == "mkl"  # no vendor to go by: the standard path
    assert gemm("mkl", vendor="AuthenticAMD") == "mkl"
    assert gemm("onednn", vendor="GenuineIntel") == "onednn"


def test_bad_choice_is_one_clear_error(gemm):
    with pytest.raises(UserError, match="GPT2KIT_CPU_GEMM='fast' is not one of auto, mkl, onednn"):
        gemm("fast")


@needs_onednn
@pytest.mark.parametrize("shape", [(1, 96), (7, 96), (2, 5, 96)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_onednn_product_equals_f_linear(gemm, shape, with_bias):
    gemm("onednn")
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(*shape, generator=g), torch.randn(130, 96, generator=g)
    b = torch.randn(130, generator=g) if with_bias else None
    with torch.no_grad():
        got = backend.float_linear(x, w, b)
    want = F.linear(x, w, b)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_training_and_other_dtypes_keep_f_linear(gemm, monkeypatch):
    gemm("onednn")
    calls = []
    real = backend._onednn_linear_op()
    monkeypatch.setattr(backend, "_onednn_linear_op", lambda: lambda *a: calls.append(1) or real(*a))
    w = torch.randn(8, 4, requires_grad=True)
    y = backend.float_linear(torch.randn(3, 4), w)  # autograd wants this product: F.linear
    y.sum().backward()
    assert w.grad is not None and not calls
    with torch.no_grad():
        backend.float_linear(torch.randn(3, 4, dtype=torch.bfloat16), w.detach().bfloat16())
        assert not calls
        backend.float_linear(torch.randn(3, 4), w)
    assert calls == [1]


@needs_onednn
def test_model_logits_agree_between_backends(gemm):
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=300, n_ctx=32, n_layer=2, n_head=2, n_embd=64, eos_token_id=0)).eval()
    idx = torch.randint(0, 300, (2, 20))
    logits = {}
    for choice in ("mkl", "onednn"):
        gemm(choice)
        with torch.inference_mode():
            logits[choice] = model(idx).logits
    torch.testing.assert_close(logits["onednn"], logits["mkl"], rtol=1e-4, atol=1e-4)
