"""gpt2kit's own batch-1 int4 kernel (model/native/gemv.c): the arithmetic it promises, and its fallbacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpt2kit.model import native
from gpt2kit.model.quantized import QuantLinear, _QuantStore, pack_int4
from gpt2kit.post.quantize import quantize_tensor

needs_native = pytest.mark.skipif(native.library() is None, reason=f"native kernels {native.status()}")


def _store(rows: int, cols: int, group: int, seed: int = 0, scale: float = 0.05) -> _QuantStore:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * scale
    codes, scales, zeros = quantize_tensor(w, 4, group, False)
    return _QuantStore(pack_int4(codes), scales, zeros, 4, cols)


def _reference(store: _QuantStore, x: torch.Tensor, bias: torch.Tensor | None) -> np.ndarray:
    """The kernel's arithmetic in float64: int8 activations per block of 32, fp16 scale and scale * zero."""
    from gpt2kit.model.quantized import unpack_int4

    rows, cols = store.rows, store.cols
    nb = cols // 32
    c = unpack_int4(store.qweight).numpy().astype(np.float64).reshape(rows, nb, 32)
    per = store.group_size // 32
    s32 = np.repeat(store.scales.numpy(), per, axis=1)
    z = np.repeat(store.zeros.numpy().astype(np.float32), per, axis=1)
    d = s32.astype(np.float16).astype(np.float64)
    m = (s32 * z).astype(np.float16).astype(np.float64)
    xv = x.reshape(nb, 32).numpy().astype(np.float32)
    amax = np.abs(xv).max(axis=1)
    xs = (amax / np.float32(127.0)).astype(np.float32)
    inv = np.where(amax > 0, np.float32(127.0) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    xq = np.clip(np.rint(xv * inv[:, None]), -127, 127)
    dots = (c * xq[None]).sum(-1)  # [rows, nb], exact integers
    y = (d * xs[None] * dots).sum(-1) - (m * (xs * xq.sum(-1))[None]).sum(-1)
    return y + (0 if bias is None else bias.numpy())


@needs_native
# nb = 1, 3, 6, 7, 8, 24 blocks: every mix of the 512-bit (4 blocks), 256-bit (2) and odd-block loops
@pytest.mark.parametrize("rows, cols, group", [(1, 32, 32), (7, 96, 32), (9, 192, 64), (13, 224, 32), (100, 256, 64), (515, 768, 128)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_int4_gemv_computes_the_documented_arithmetic(rows, cols, group, threads):
    store = _store(rows, cols, group, seed=rows)
    blocks = native.pack_int4_blocks(store.qweight, store.scales, store.zeros, store.group_size)
    assert blocks.shape == (rows, cols // 32 * 20)
    x = torch.randn(1, cols, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(rows, generator=torch.Generator().manual_seed(2))
    for b in (None, bias):
        y = native.int4_gemv(blocks, x, b, rows, cols, threads)
        ref = _reference(store, x, b)
        assert y.shape == (1, rows) and y.dtype == torch.float32
        np.testing.assert_allclose(y[0].numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        exact = F.linear(x, store.dequantize(), b)  # and it is the int4 product, up to 8-bit activations
        assert (y - exact).abs().max() < 1e-2 * exact.abs().max()


@needs_native
def test_quant_linear_uses_it_for_one_row_only_and_falls_back_where_it_cannot():
    from gpt2kit.model.quantized import _Int4Native, _Int4Packed

    layer = QuantLinear(_store(64, 128, 32), torch.zeros(64))
    assert type(layer.small_batch_kernel(1)) is _Int4Native
    assert type(layer.small_batch_kernel(4)) is not _Int4Native  # a row's result never depends on its batch
    tiny = QuantLinear(_store(64, 128, 32, scale=1e-7), None)  # scales below fp16's normal range
    assert not native.fits_int4_blocks(tiny.store.scales, 32)
    if _Int4Packed.available():
        assert type(tiny.small_batch_kernel(1)) is _Int4Packed
    x = torch.randn(1, 128)
    assert (layer(x) - F.linear(x, layer.dequantize(), layer.bias)).abs().max() < 1e-2 * layer(x).abs().max()


def test_disabled_by_environment_says_so(run_python):
    code = "from gpt2kit.model import native; print(native.library() is None, native.status())"
    assert run_python(code, GPT2KIT_NATIVE="0") == "True unavailable: disabled by GPT2KIT_NATIVE=0"


def test_without_a_compiler_it_is_unavailable_and_generation_still_works(tmp_path, run_python):
    code = ("import torch; from gpt2kit.model import native;"
            "from gpt2kit.model.quantized import QuantLinear, _QuantStore, pack_int4;"
            "from gpt2kit.post.quantize import quantize_tensor;"
            "c, s, z = quantize_tensor(torch.randn(16, 64), 4, 32, False);"
            "l = QuantLinear(_QuantStore(pack_int4(c), s, z, 4, 64), None); y = l(torch.randn(1, 64));"
            "print(native.status(), tuple(y.shape))")
    out = run_python(code, CC="/nonexistent-cc", PATH=str(tmp_path), GPT2KIT_CACHE=str(tmp_path / "cache"))
    assert out == "unavailable: no C compiler (cc or gcc, or $CC) on PATH (1, 16)"


@needs_native
def test_built_once_into_the_cache_and_reused(tmp_path, run_python):
    code = "from gpt2kit.model import native; print(native.status())"
    first = run_python(code, GPT2KIT_CACHE=str(tmp_path))
    built = sorted((tmp_path / "native").glob("gemv-*.so"))
    assert len(built) == 1 and first == native.status()
    mtime = built[0].stat().st_mtime_ns
    assert run_python(code, GPT2KIT_CACHE=str(tmp_path)) == first
    assert built[0].stat().st_mtime_ns == mtime  # loaded, not rebuilt
    assert not list((tmp_path / "native").glob("*.tmp"))  # written atomically, nothing left behind


@needs_native
@pytest.mark.skipif(not native._arch_flags() or native._arch_flags()[0] != "-march=native", reason="x86-64 only")
@pytest.mark.parametrize("flags, isa", [("-mno-avxvnni -mno-avx512vnni", "avx2"), ("-mno-avx2", "portable")])
def test_every_isa_path_computes_the_same(tmp_path, flags, isa, run_python):
    """The AVX2 (maddubs) and portable paths, built on this CPU with its newer instructions switched off."""
    if "avx2" not in native._cpu_flags().split():
        pytest.skip("this CPU has no AVX2")
    code = ("import torch, json; from gpt2kit.model import native; from gpt2kit.model.quantized import _QuantStore;"
            "from gpt2kit.post.quantize import quantize_tensor; from gpt2kit.model.quantized import pack_int4;"
            "g = torch.Generator().manual_seed(3); w = torch.randn(37, 160, generator=g) * 0.05;"
            "c, s, z = quantize_tensor(w, 4, 32, False); st = _QuantStore(pack_int4(c), s, z, 4, 160);"
            "b = native.pack_int4_blocks(st.qweight, st.scales, st.zeros, 32);"
            "x = torch.randn(1, 160, generator=g);"
            "print(json.dumps([native.status(), native.int4_gemv(b, x, None, 37, 160, 2)[0].tolist()]))")
    import json

    status, y = json.loads(run_python(code, GPT2KIT_CACHE=str(tmp_path), GPT2KIT_NATIVE_CFLAGS=flags))
    assert status == isa
    g = torch.Generator().manual_seed(3)
    w = torch.randn(37, 160, generator=g) * 0.05
    codes, scales, zeros = quantize_tensor(w, 4, 32, False)
    store = _QuantStore(pack_int4(codes), scales, zeros, 4, 160)
    ref = _reference(store, torch.randn(1, 160, generator=g), None)
    np.testing.assert_allclose(np.array(y), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@needs_native
@pytest.mark.parametrize("rows, cols, group", [(5, 64, 32), (64, 256, 64), (33, 768, 256), (7, 72, 24), (3, 20, 10)])
def test_int4_dequantize_is_bitwise_the_tensor_dequantization(rows, cols, group):
    from gpt2kit.model.quantized import dequantize, unpack_int4

    store = _store(rows, cols, group, seed=cols)
    fast = native.int4_dequantize(store.qweight, store.scales, store.zeros, cols, threads=2)
    assert torch.equal(fast, dequantize(unpack_int4(store.qweight), store.scales, store.zeros))
    assert torch.equal(store.dequantize(), fast)  # the store uses it on the CPU


needs_gemm = pytest.mark.skipif(not native.int4_gemm_available(),
                                reason=f"gpt2kit's int4 GEMM needs AVX2, FMA and F16C (native: {native.status()})")


@needs_gemm
# M: the 4-row tiles and the single-row tail; N: whole and partial groups of 8 columns; K: 1 to 24 blocks
@pytest.mark.parametrize("M, N, K", [(1, 8, 32), (3, 77, 96), (4, 16, 768), (9, 13, 224), (130, 40, 3072)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_int4_gemm_is_the_batch_1_arithmetic_row_by_row(M, N, K, threads):
    store = _store(N, K, 32, seed=M + N)
    blocks = native.pack_int4_blocks(store.qweight, store.scales, store.zeros, store.group_size)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    bias = torch.randn(N, generator=torch.Generator().manual_seed(2))
    for b in (None, bias):
        y = native.int4_gemm(blocks, x, b, N, K, threads)
        assert y.shape == (M, N) and y.dtype == torch.float32
        for r in range(M):
            ref = _reference(store, x[r], b)
            np.testing.assert_allclose(y[r].numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@needs_gemm
def test_int4_gemm_rows_do_not_depend_on_their_neighbours():
    """A row's result is the same bits alone, in a tile of 4, or in the tail: a prompt's batch mates
    never change it."""
    store = _store(40, 256, 32, seed=5)
    blocks = native.pack_int4_blocks(store.qweight, store.scales, store.zeros, store.group_size)
    x = torch.randn(11, 256, generator=torch.Generator().manual_seed(6))
    full = native.int4_gemm(blocks, x, None, 40, 256)
    for r in range(11):
        assert torch.equal(native.int4_gemm(blocks, x[r : r + 1], None, 40, 256)[0], full[r])
    assert torch.equal(native.int4_gemm(blocks, x[3:9], None, 40, 256), full[3:9])


@needs_native
@pytest.mark.skipif(not native._arch_flags() or native._arch_flags()[0] != "-march=native", reason="x86-64 only")
@pytest.mark.parametrize("flags, built", [("-mno-avx512f -mno-avxvnni", True), ("-mno-avx2", False)])
def test_int4_gemm_on_an_avx2_build_and_without_avx2(tmp_path, flags, built, run_python):
    """AVX2 alone computes the same bits as this CPU's build; without AVX2 the GEMM says it is not there,
    and a generation prefill falls back to the float32 product."""
    if "avx2" not in native._cpu_flags().split():
        pytest.skip("this CPU has no AVX2")
    here = str(__import__("pathlib").Path(__file__).parent)
    code = (f"import json, sys, torch; sys.path.insert(0, {here!r}); import test_native_int4 as t;"
            "from gpt2kit.model import native; from gpt2kit.model.quantized import quant_prefill_mode;"
            "st = t._store(21, 96, 32, seed=4); b = native.pack_int4_blocks(st.qweight, st.scales, st.zeros, 32);"
            "x = torch.randn(6, 96, generator=torch.Generator().manual_seed(7));"
            "ok = native.int4_gemm_available();"
            "print(json.dumps([ok, native.int4_gemm(b, x, None, 21, 96).numpy().view('int32').tolist() if ok else None,"
            " quant_prefill_mode()]))")
    import json

    ok, bits, mode = json.loads(run_python(code, GPT2KIT_CACHE=str(tmp_path), GPT2KIT_NATIVE_CFLAGS=flags,
                                           GPT2KIT_QUANT_PREFILL="auto"))
    assert ok is built
    if built:
        st = _store(21, 96, 32, seed=4)
        b = native.pack_int4_blocks(st.qweight, st.scales, st.zeros, 32)
        x = torch.randn(6, 96, generator=torch.Generator().manual_seed(7))
        assert np.array_equal(np.asarray(bits, np.int32), native.int4_gemm(b, x, None, 21, 96).numpy().view(np.int32))
    else:
        assert mode in ("bf16", "float32")  # never "int8" without the kernel
        said = run_python("from gpt2kit.model import native; import torch\ntry:\n"
                          "    native.int4_gemm(torch.zeros(1, 20, dtype=torch.uint8), torch.zeros(1, 32), None, 1, 32)\n"
                          "except RuntimeError as e:\n    print(e)", GPT2KIT_CACHE=str(tmp_path), GPT2KIT_NATIVE_CFLAGS=flags)
        assert "int4 GEMM unavailable" in said
