"""Quantization: the scale/zero-point math, int4 packing, exact reload, quality on a trained model, the
int8 decode kernel against the dequantized matmul, file sizes, and the CLI's refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from post_helpers import corpus, random_checkpoint, workspace

from gpt2kit.cli import main
from gpt2kit.errors import UserError
from gpt2kit.model import GPT2
from gpt2kit.model.quantized import QuantLinear, dequantize, pack_int4, unpack_int4
from gpt2kit.post.quantize import QuantSpec, quantize_checkpoint, quantize_tensor


@pytest.fixture(scope="module")
def tok_dir():
    return workspace()["tok"]


@pytest.fixture(scope="module")
def trained():
    """A tiny GPT-2 trained briefly on the synthetic corpus, and held-out text from the same source."""
    return workspace()["ckpt"], corpus(120, seed=99)


# ----- the math ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,group,symmetric", [(8, None, False), (8, None, True), (4, 16, False), (4, 8, True)])
def test_quantize_error_is_at_most_half_a_step(bits, group, symmetric):
    torch.manual_seed(0)
    w = torch.randn(24, 32) * 0.05 + 0.01
    codes, scales, zeros = quantize_tensor(w, bits, group, symmetric)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    back = dequantize(codes, scales, zeros)
    step = scales.repeat_interleave(32 // scales.shape[1], dim=1)
    assert ((back - w).abs() <= step / 2 + 1e-7).all()
    if symmetric:
        assert (zeros == 2 ** (bits - 1)).all()
        assert int(codes.min()) >= 1  # [-(2^(b-1)-1), 2^(b-1)-1] around the zero point


def test_scale_and_zero_point_follow_the_formula():
    w = torch.tensor([[-1.0, 0.5, 2.0, 0.0]])
    codes, scales, zeros = quantize_tensor(w, 8)
    s = 3.0 / 255
    assert scales.item() == pytest.approx(s)
    assert zeros.item() == round(1.0 / s)  # z = round(-min / s) = 85
    assert codes.tolist() == [[0, round(0.5 / s) + 85, 255, 85]]
    assert dequantize(codes, scales, zeros)[0, 3].item() == 0.0  # an exact zero stays exactly zero


def test_constant_and_zero_rows_do_not_divide_by_zero():
    w = torch.zeros(2, 8)
    w[1] = 0.25
    codes, scales, zeros = quantize_tensor(w, 4, 4)
    assert torch.isfinite(scales).all()
    assert torch.allclose(dequantize(codes, scales, zeros), w, atol=1e-6)


def test_int4_pack_round_trip_and_layout():
    codes = torch.randint(0, 16, (5, 12), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (5, 6)
    assert packed[0, 0].item() == codes[0, 0].item() | (codes[0, 1].item() << 4)
    assert torch.equal(unpack_int4(packed), codes)


def test_group_size_must_divide_the_columns():
    with pytest.raises(UserError, match="--group-size 10 does not divide the 32"):
        quantize_tensor(torch.randn(4, 32), 4, 10, name="x")
    with pytest.raises(UserError, match="--bits must be 8 or 4"):
        QuantSpec(bits=3)


# ----- modules and checkpoints -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bits, group, rows, kernel",
    [(8, None, 1, "_Int8Native"), (8, None, 3, "_Int8WeightOnly"), (4, 32, 1, "_Int4Native"),
     (4, 32, 5, "_Int4Packed")],
)
def test_small_batch_kernels_match_the_dequantized_matmul(bits, group, rows, kernel):
    from gpt2kit.model import native, quantized
    from gpt2kit.model.quantized import _QuantStore

    if kernel in ("_Int4Native", "_Int8Native") and not getattr(quantized, kernel).available():
        pytest.skip(f"gpt2kit's native int4 kernel is {native.status()}")
    if not getattr(quantized, kernel).available():
        pytest.skip(f"this torch build has no {kernel} kernel")
    torch.manual_seed(0)
    w, b = torch.randn(100, 64) * 0.1, torch.randn(100)  # 100 rows: not a multiple of 16 (the int4 padding)
    x = torch.randn(rows, 64)
    for symmetric in (False, True):
        codes, scales, zeros = quantize_tensor(w, bits, group, symmetric)
        if bits == 4:
            codes = pack_int4(codes)
        layer = QuantLinear(_QuantStore(codes, scales, zeros, bits, 64), b)
        assert type(layer.small_batch_kernel(rows)).__name__ == kernel
        exact = F.linear(x, layer.dequantize(), b)
        # 8-bit activations (dynamic int8) or bf16 activations/scales: error ~2^-8 of the output scale
        y = layer(x)
        assert y.shape == exact.shape and y.dtype == torch.float32
        assert (y - exact).abs().max() < 2e-2 * exact.abs().max()
        assert not torch.equal(y, exact)  # it really is the other kernel
        many = quantized.SMALL_BATCH_MAX_ROWS + 1
        big = torch.randn(many, 64)
        assert layer.small_batch_kernel(many) is None
        assert torch.equal(layer(big), F.linear(big, layer.dequantize(), b))  # many rows: the exact path


@pytest.mark.parametrize("kernel", ["_Int8Native", "_Int8Dynamic"])
def test_batch_one_int8_kernels_do_not_saturate(kernel):
    """u8 x s8 products of extreme codes overflow int16 pairs unless the kernel accumulates in int32
    (VNNI), splits the codes (gemv_int8.c without VNNI) or uses 7-bit activations (fbgemm without VNNI)."""
    from gpt2kit.model import quantized
    from gpt2kit.model.quantized import _QuantStore

    cls = getattr(quantized, kernel)
    if not cls.available():
        pytest.skip(f"{kernel} is not available here")
    for code, zero in ((255, 0), (0, 255)):  # the largest positive and negative weights
        codes = torch.full((16, 256), code, dtype=torch.uint8)
        store = _QuantStore(codes, torch.full((16, 1), 0.01), torch.full((16, 1), zero, dtype=torch.uint8), 8, 256)
        x = torch.full((1, 256), 3.0)
        exact = F.linear(x, store.dequantize())
        assert torch.allclose(cls(store, None)(x), exact, rtol=1e-5)


def test_fbgemm_batch_one_int8_kernel_matches_the_dequantized_matmul():
    """The fallback where gpt2kit's native kernels are unavailable."""
    from gpt2kit.model.quantized import _Int8Dynamic, _QuantStore

    if not _Int8Dynamic.available():
        pytest.skip("this torch build has no fbgemm dynamic int8 kernel")
    torch.manual_seed(0)
    w, b, x = torch.randn(100, 64) * 0.1, torch.randn(100), torch.randn(1, 64)
    codes, scales, zeros = quantize_tensor(w, 8, None)
    store = _QuantStore(codes, scales, zeros, 8, 64)
    exact = F.linear(x, store.dequantize(), b)
    y = _Int8Dynamic(store, b)(x)
    assert (y - exact).abs().max() < 2e-2 * exact.abs().max() and not torch.equal(y, exact)


@pytest.mark.parametrize("bits", [8, 4])
def test_reload_is_bitwise_exact_and_loss_is_close(tmp_path, tok_dir, bits):
    from gpt2kit.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tok_dir)
    src = random_checkpoint(tmp_path / "fp", tok)
    report = quantize_checkpoint(src, tmp_path / "q", QuantSpec.default(bits))
    meta = json.loads((tmp_path / "q" / "gpt2kit.json").read_text())
    q = meta["quantization"]
    assert q["bits"] == bits and q["group_size"] == (64 if bits == 4 else None) and q["scheme"]
    assert "transformer.wte" in q["modules"] and "transformer.h.1.mlp.c_proj" in q["modules"]
    assert "tokenizer" in meta  # the source's metadata is kept

    a, b = GPT2.from_pretrained(tmp_path / "q"), GPT2.from_pretrained(tmp_path / "q")
    for (na, ta), (_, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(ta, tb), na
    ids = torch.randint(0, tok.vocab_size, (2, 40))
    assert torch.equal(a(ids).logits, b(ids).logits)
    ref = GPT2.from_pretrained(src)
    assert a(ids, targets=ids).loss.item() == pytest.approx(ref(ids, targets=ids).loss.item(), rel=0.02)
    assert report["size_after"] < report["size_before"] * (0.3 if bits == 8 else 0.2)


def test_quantized_quality_and_size_on_a_trained_model(tmp_path, trained):
    ckpt, text = trained
    r8 = quantize_checkpoint(ckpt, tmp_path / "q8", QuantSpec.default(8), eval_text=text)
    r4 = quantize_checkpoint(ckpt, tmp_path / "q4", QuantSpec.default(4, 64), eval_text=text)
    assert r8["ppl_before"] < 30  # the model did learn the grammar (vocabulary 320)
    assert r8["ppl_after"] <= r8["ppl_before"] * 1.01
    assert r4["ppl_after"] <= r4["ppl_before"] * 1.10
    assert r8["size_after"] <= 0.30 * r8["size_fp32"]
    assert r4["size_after"] <= 0.17 * r4["size_fp32"]


def test_quantized_model_generates_like_its_dequantized_twin(tmp_path, trained):
    ckpt, _ = trained
    quantize_checkpoint(ckpt, tmp_path / "q8", QuantSpec.default(8))
    q = GPT2.from_pretrained(tmp_path / "q8")
    prompt = torch.tensor([[5, 17, 42, 7]])
    out = q.generate(prompt, max_new_tokens=12, temperature=0.0)
    assert out.shape == (1, 16)
    # the same tokens come from greedy decoding with full forward passes (dequantized path, no cache)
    ids = prompt
    for _ in range(12):
        ids = torch.cat([ids, q(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    agree = (ids == out).float().mean().item()
    assert agree >= 0.9


@pytest.mark.parametrize("bits", [8, 4])
def test_fast_decoder_runs_quantized_models_like_their_forward(tmp_path, trained, bits):
    """gpt2kit.generate's numpy decoder takes quantized models too (their projections through the same
    small-batch kernels as forward): same logits up to float32 rounding, same greedy ids."""
    from gpt2kit.decode_fast import FastDecoder
    from gpt2kit.model.kv_cache import KVCache

    ckpt, _ = trained
    quantize_checkpoint(ckpt, tmp_path / "q", QuantSpec.default(bits))
    q = GPT2.from_pretrained(tmp_path / "q").eval()
    assert FastDecoder.supports(q, 1) and FastDecoder.supports(q, 4)
    prompt = torch.tensor([[5, 17, 42, 7]])
    fast = q.generate(prompt, max_new_tokens=16, temperature=0.0, fast=True)
    slow = q.generate(prompt, max_new_tokens=16, temperature=0.0, fast=False)
    assert torch.equal(fast, slow)

    caches = [KVCache.allocate(q.config, 1, max_len=8) for _ in range(2)]
    with torch.no_grad():
        for c in caches:
            q(prompt, kv_cache=c)
        step = torch.tensor([[11]])
        ref = q(step, kv_cache=caches[0]).logits[:, -1]
        got = FastDecoder(q)(step, caches[1], None, None)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


# ----- CLI -----------------------------------------------------------------------------------------------


def test_cli_quantize_then_eval_json(tmp_path, trained, capsys):
    ckpt, text = trained
    (tmp_path / "valid.txt").write_text(text)
    assert main(["quantize", str(ckpt), "--bits", "4", "--group-size", "64", "--out", str(tmp_path / "q4"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bits"] == 4 and report["size_ratio_vs_fp32"] < 0.17
    assert main(["eval", str(tmp_path / "q4"), "--text", str(tmp_path / "valid.txt"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    flat = json.dumps(result)
    assert "ppl" in flat and math.isfinite(_find(result, "ppl"))


def _find(obj, key):
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for v in obj.values():
            r = _find(v, key)
            if r is not None:
                return r
    if isinstance(obj, list):
        for v in obj:
            r = _find(v, key)
            if r is not None:
                return r
    return None


def test_cli_refuses_an_already_quantized_checkpoint(tmp_path, trained, capsys):
    ckpt, _ = trained
    assert main(["quantize", str(ckpt), "--bits", "8", "--out", str(tmp_path / "q8")]) == 0
    capsys.readouterr()
    assert main(["quantize", str(tmp_path / "q8"), "--bits", "4", "--out", str(tmp_path / "qq")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already quantized" in err[0]
    assert not (tmp_path / "qq").exists()


def test_cli_bad_group_size_and_existing_output(tmp_path, trained, capsys):
    ckpt, _ = trained
    assert main(["quantize", str(ckpt), "--bits", "4", "--group-size", "48", "--out", str(tmp_path / "q")]) == 2
    assert "--group-size 48 does not divide" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert main(["quantize", str(ckpt), "--bits", "8", "--out", str(tmp_path / "taken")]) == 2
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("bits", [8, 4])
def test_generation_prefill_may_use_bf16_and_everything_else_stays_exact(bits, monkeypatch):
    """Inside generation_prefill() many-row quantized products run in bf16 where the CPU multiplies bf16
    natively (or when forced); outside it -- evaluation, scoring -- they are the exact float32 product."""
    from gpt2kit.model.quantized import _QuantStore, generation_prefill, quant_prefill_mode

    torch.manual_seed(0)
    w, b = torch.randn(96, 64) * 0.1, torch.randn(96)
    codes, scales, zeros = quantize_tensor(w, bits, 32 if bits == 4 else None)
    layer = QuantLinear(_QuantStore(pack_int4(codes) if bits == 4 else codes, scales, zeros, bits, 64), b)
    x = torch.randn(100, 64)  # more rows than the small-batch kernels take
    exact = F.linear(x, layer.dequantize(), b)
    monkeypatch.setenv("GPT2KIT_QUANT_PREFILL", "bf16")
    with torch.no_grad():
        assert torch.equal(layer(x), exact)  # not in a generation's prefill
        with generation_prefill():
            fast = layer(x)
        assert torch.equal(layer(x), exact)  # the context ended
    assert fast.dtype == torch.float32 and not torch.equal(fast, exact)
    assert (fast - exact).abs().max() < 2e-2 * exact.abs().max()
    monkeypatch.setenv("GPT2KIT_QUANT_PREFILL", "float32")
    with torch.no_grad(), generation_prefill():
        assert torch.equal(layer(x), exact)
    xg = x.clone().requires_grad_(True)
    monkeypatch.setenv("GPT2KIT_QUANT_PREFILL", "bf16")
    with generation_prefill():
        assert torch.equal(layer(xg), exact)  # autograd: the exact product it can differentiate
    monkeypatch.setenv("GPT2KIT_QUANT_PREFILL", "fast")
    with pytest.raises(UserError, match="GPT2KIT_QUANT_PREFILL must be one of auto, bf16, int8, float32"):
        quant_prefill_mode()
    monkeypatch.setenv("GPT2KIT_QUANT_PREFILL", "auto")
    assert quant_prefill_mode() in ("bf16", "int8", "float32")


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [2, 33, 100])
def test_generation_prefill_in_int8_multiplies_int4_weights_by_the_native_gemm(bits, rows, monkeypatch):
    """GPT2KIT_QUANT_PREFILL=int8 (what a CPU with AVX2 and no bf16 dot products picks): an int4 weight's
    prompt rows go through gemm_int4.c, activations in 8 bits, as close to the exact product as the batch-1
    kernel is; int8 weights keep their usual product; outside a prefill nothing changes."""
    from gpt2kit.model import native
    from gpt2kit.model.quantized import _QuantStore, generation_prefill

    if not native.int4_gemm_available():
        pytest.skip(f"gpt2kit's int4 GEMM is not built here (needs AVX2; native: {native.status()})")
    torch.manual_seed(0)
    w, b = torch.randn(96, 64) * 0.1, torch.randn(96)
    codes, scales, zeros = quantize_tensor(w, bits, 32 if bits == 4 else None)
    layer = QuantLinear(_QuantStore(pack_int4(codes) if bits == 4 else codes, scales, zeros, bits, 64), b)
    x = torch.randn(1, rows, 64)
    exact = F.linear(x, layer.dequantize(), b)
    monkeypatch.setenv("GPT2KIT_QUANT_PREFILL", "int8")
    with torch.no_grad():
        outside = layer(x)
        with generation_prefill():
            fast = layer(x)
    assert fast.shape == exact.shape == (1, rows, 96)
    if bits == 8:  # what it is outside a prefill: the small-batch kernel, or the exact product
        assert torch.equal(fast, outside) and (rows <= 64 or torch.equal(fast, exact))
        return
    if rows > 64:
        assert torch.equal(outside, exact)
    kernel = layer.small_batch_kernel(1)
    assert torch.equal(fast, native.int4_gemm(kernel.blocks, x, kernel.bias, 96, 64).view(1, rows, 96))
    assert (fast - exact).abs().max() < 2e-2 * exact.abs().max()
    one = native.int4_gemv(kernel.blocks, x[0, :1], kernel.bias, 96, 64)  # the batch-1 kernel, same 8-bit rows
    torch.testing.assert_close(fast[0, :1], one, rtol=0, atol=1e-4)
