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


def test_int8_kernel_matches_dequantized_matmul():
    from gpt2kit.model.quantized import _QuantStore

    torch.manual_seed(0)
    w, b = torch.randn(96, 64) * 0.1, torch.randn(96)
    x = torch.randn(3, 64)
    for symmetric in (False, True):
        codes, scales, zeros = quantize_tensor(w, 8, None, symmetric)
        layer = QuantLinear(_QuantStore(codes, scales, zeros, 8, 64), b)
        assert layer._use_int8_kernel(x)
        exact = F.linear(x, layer.dequantize(), b)
        # bf16 activations: relative error ~2^-8 of the output scale
        assert (layer(x) - exact).abs().max() < 2e-2 * exact.abs().max()
        big = torch.randn(32, 64)
        assert torch.equal(layer(big), F.linear(big, layer.dequantize(), b))  # many rows: the exact path


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
