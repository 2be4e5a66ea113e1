"""gpt2kit's own batch-1 int8 kernel (model/native/gemv_int8.c): the arithmetic it promises, on every ISA path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpt2kit.model import native
from gpt2kit.model.quantized import QuantLinear, _QuantStore
from gpt2kit.post.quantize import quantize_tensor

needs_native = pytest.mark.skipif(native.library() is None, reason=f"native kernels {native.status()}")


def _store(rows: int, cols: int, seed: int, symmetric: bool = False) -> _QuantStore:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05
    codes, scales, zeros = quantize_tensor(w, 8, None, symmetric)
    return _QuantStore(codes, scales, zeros, 8, cols)


def _reference(store: _QuantStore, x: torch.Tensor, bias: torch.Tensor | None) -> np.ndarray:
    """The kernel's arithmetic in float64: int8 activations per block of 32, exact integer block dots."""
    rows, cols = store.rows, store.cols
    nb = cols // 32
    code = store.file_codes().numpy().astype(np.float64).reshape(rows, nb, 32)
    s = store.scales[:, 0].numpy().astype(np.float64)
    z = store.zeros[:, 0].numpy().astype(np.float64)
    xv = x.reshape(nb, 32).numpy().astype(np.float32)
    amax = np.abs(xv).max(axis=1)
    xs = (amax / np.float32(127.0)).astype(np.float32).astype(np.float64)
    inv = np.where(amax > 0, np.float32(127.0) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    xq = np.clip(np.rint(xv * inv[:, None]), -127, 127)
    dots = (code * xq[None]).sum(-1)  # [rows, nb]
    y = s * ((xs[None] * dots).sum(-1) - z * (xs * xq.sum(-1)).sum())
    return y + (0 if bias is None else bias.numpy())


@needs_native
# 1, 2, 3, 6 and 24 blocks: the 512-bit loop's 4- and 2-block steps and the 256-bit one
@pytest.mark.parametrize("rows, cols", [(1, 32), (7, 64), (9, 96), (100, 192), (515, 768)])
@pytest.mark.parametrize("threads", [1, 3])
def test_int8_gemv_computes_the_documented_arithmetic(rows, cols, threads):
    store = _store(rows, cols, seed=rows)
    x = torch.randn(1, cols, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(rows, generator=torch.Generator().manual_seed(2))
    for b in (None, bias):
        y = native.int8_gemv(store.codes_s8, store.scales[:, 0].contiguous(), store.zeros[:, 0].contiguous(), x, b,
                             threads)
        ref = _reference(store, x, b)
        assert y.shape == (1, rows) and y.dtype == torch.float32
        np.testing.assert_allclose(y[0].numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        exact = F.linear(x, store.dequantize(), b)  # the int8 product, up to 8-bit activations
        assert (y - exact).abs().max() < 1e-2 * exact.abs().max()


@needs_native
def test_quant_linear_uses_it_for_one_row_where_the_rows_are_whole_blocks():
    from gpt2kit.model.quantized import _Int8Native

    layer = QuantLinear(_store(64, 128, 0), torch.zeros(64))
    assert type(layer.small_batch_kernel(1)) is _Int8Native
    assert type(layer.small_batch_kernel(4)) is not _Int8Native  # a row's result never depends on its batch
    odd = QuantLinear(_store(16, 48, 0), None)  # 48 columns: not whole blocks of 32
    assert type(odd.small_batch_kernel(1)) is not _Int8Native
    with pytest.raises(ValueError, match="do not fit"):
        native.int8_gemv(odd.store.codes_s8, odd.store.scales[:, 0], odd.store.zeros[:, 0], torch.randn(1, 48), None)


@needs_native
@pytest.mark.skipif(not native._arch_flags() or native._arch_flags()[0] != "-march=native", reason="x86-64 only")
@pytest.mark.parametrize("flags", ["-mno-avx512f", "-mno-avx512f -mno-avxvnni", "-mno-avx2"])
def test_every_isa_path_computes_the_same(tmp_path, flags, run_python):
    """AVX-VNNI, AVX2 without VNNI (nibble-split maddubs) and portable C, built here with newer
    instructions switched off; extreme codes (0 and 255) included, where int16 pair sums would saturate."""
    if "avx2" not in native._cpu_flags().split():
        pytest.skip("this CPU has no AVX2")
    code = ("import torch, json; from gpt2kit.model import native;"
            "from gpt2kit.model.quantized import _QuantStore; from gpt2kit.post.quantize import quantize_tensor;"
            "g = torch.Generator().manual_seed(3); w = torch.randn(37, 160, generator=g) * 0.05;"
            "w[0, :80] = 1.0; w[1, :80] = -1.0; c, s, z = quantize_tensor(w, 8, None, False); st = _QuantStore(c, s, z, 8, 160);"
            "x = torch.randn(1, 160, generator=g);"
            "print(json.dumps([native.status(), native.int8_gemv(st.codes_s8, st.scales[:, 0].contiguous(),"
            " st.zeros[:, 0].contiguous(), x, None, 2)[0].tolist()]))")
    status, y = json.loads(run_python(code, GPT2KIT_CACHE=str(tmp_path), GPT2KIT_NATIVE_CFLAGS=flags))
    assert "avx512" not in status
    g = torch.Generator().manual_seed(3)
    w = torch.randn(37, 160, generator=g) * 0.05
    w[0, :80], w[1, :80] = 1.0, -1.0
    codes, scales, zeros = quantize_tensor(w, 8, None, False)
    store = _QuantStore(codes, scales, zeros, 8, 160)
    assert {0, 255} <= set(store.file_codes()[:2].flatten().tolist())
    ref = _reference(store, torch.randn(1, 160, generator=g), None)
    np.testing.assert_allclose(np.array(y), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@needs_native
@pytest.mark.parametrize("rows, cols, group", [(5, 64, None), (64, 256, 64), (33, 768, 32)])
def test_int8_dequantize_is_bitwise_the_tensor_dequantization(rows, cols, group):
    from gpt2kit.model.quantized import dequantize

    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows)) * 0.05
    store = _QuantStore(*quantize_tensor(w, 8, group, False), 8, cols)
    q, z = store.codes()
    ref = dequantize(q, store.scales, z)
    assert torch.equal(native.int8_dequantize(store.codes_s8, store.scales, store.zeros), ref)
    out = torch.full((rows, cols), float("nan"))
    assert native.int8_dequantize(store.codes_s8, store.scales, store.zeros, out=out) is out
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="out must be"):
        native.int8_dequantize(store.codes_s8, store.scales, store.zeros, out=torch.empty(rows, cols + 1))


def test_prefill_products_reuse_one_buffer_and_autograd_still_sees_its_own_weight():
    """Many rows without autograd dequantize into a reused buffer (no page faults per forward); with
    autograd, each layer keeps its own dequantized weight for the backward pass."""
    from gpt2kit.model import quantized

    a, b = QuantLinear(_store(48, 64, 1), torch.zeros(48)), QuantLinear(_store(64, 48 + 16, 2), None)
    x = torch.randn(80, 64)  # more rows than the small-batch kernels take
    with torch.no_grad():
        y = b(torch.cat([a(x), a(x)[:, :16]], 1))
    wa, wb = a.dequantize(), b.dequantize()
    ref = F.linear(torch.cat([F.linear(x, wa, a.bias), F.linear(x, wa, a.bias)[:, :16]], 1), wb)
    assert torch.equal(y, ref)
    assert quantized._buffers.flat.numel() >= 64 * 64
    xg = x.clone().requires_grad_(True)
    out = b(torch.cat([a(xg), a(xg)[:, :16]], 1)).sum()
    out.backward()
    xr = x.clone().requires_grad_(True)
    F.linear(torch.cat([F.linear(xr, wa, a.bias), F.linear(xr, wa, a.bias)[:, :16]], 1), wb).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad)
