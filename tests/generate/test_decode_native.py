"""The whole batch-1 decode step in one C call (gpt2kit.decode_native): what model.forward computes, on the
same KV cache, for float32, int8 and int4 models, on every ISA path; and where it steps aside."""

from __future__ import annotations

import json

import pytest
import torch

from gpt2kit.decode_fast import FastDecoder
from gpt2kit.decode_native import NativeStep, row_reading
from gpt2kit.errors import UserError
from gpt2kit.model import GPT2, GPT2Config, KVCache, native
from gpt2kit.post.quantize import QuantSpec, quantize_model

needs_native = pytest.mark.skipif(native.library() is None, reason=f"native kernels {native.status()}")


def _model(seed: int = 0, **kw) -> GPT2:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=500, n_ctx=48, n_layer=3, n_head=4, n_embd=64, dropout=0.0, attn_dropout=0.0,
                        eos_token_id=499, **kw)
    m = GPT2(config).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # LayerNorm and biases away from 1 / 0 too
    return m


def _quantized(bits: int) -> GPT2:
    m = _model()
    quantize_model(m, QuantSpec.default(bits, group_size=32) if bits == 4 else QuantSpec.default(bits))
    return m.eval()


def _steps(model, padded: bool, how: str, monkeypatch=None) -> tuple[torch.Tensor, KVCache, bool]:
    """Logits of 5 decode steps after a 9-token prefill, and the cache, and whether the native step ran.
    how: "native" / "numpy" (FastDecoder with GPT2KIT_FUSED_DECODE on / off) or "forward" (model.forward
    on the KV cache: the reference)."""
    if how != "forward":
        (monkeypatch or pytest.MonkeyPatch()).setenv("GPT2KIT_FUSED_DECODE", "1" if how == "native" else "0")
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 500, (1, 9), generator=g)
    mask = torch.ones(1, 14, dtype=torch.bool)
    if padded:
        mask[0, :3] = False  # a left-padded row, as in a batch
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    cache = KVCache.allocate(model.config, 1, 20)
    fast = FastDecoder(model)
    out = []
    with torch.inference_mode():
        model(idx, kv_cache=cache, attention_mask=mask[:, :9] if padded else None, position_ids=pos[:, :9] if padded else None)
        for s in range(5):
            tok = torch.randint(0, 500, (1, 1), generator=g)
            m = mask[:, : 10 + s] if padded else None
            p = pos[:, 9 + s : 10 + s] if padded else None
            if how == "forward":
                out.append(model(tok, kv_cache=cache, attention_mask=m, position_ids=p).logits[:, -1])
            else:
                out.append(fast(tok, cache, m, p).clone())
    return torch.cat(out), cache, fast._native_step not in (None, False)


@needs_native
@pytest.mark.parametrize("padded", [False, True])
def test_float32_step_matches_model_forward_and_writes_the_same_cache(padded, monkeypatch):
    model = _model()
    got, cache, used = _steps(model, padded, "native", monkeypatch)
    assert used
    ref, ref_cache, used = _steps(model, padded, "numpy", monkeypatch)  # decode_fast's numpy step
    assert not used
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-5)
    assert cache.length == ref_cache.length == 14
    for a, b in zip(cache.keys + cache.values, ref_cache.keys + ref_cache.values):
        torch.testing.assert_close(a[:, :, :14], b[:, :, :14], rtol=0, atol=2e-5)
    # and the numpy step is model.forward (tests/generate/test_generate_fast.py): one more direct check
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 500, (1, 9), generator=g)
    toks = torch.randint(0, 500, (1, 5), generator=g)
    if not padded:
        with torch.inference_mode():
            full = model(torch.cat([idx, toks], 1)).logits[0, 9:14]
        torch.testing.assert_close(got, full, rtol=0, atol=5e-5)


# A quantized product multiplies an int8 copy of its activation (per block of 32), so a float rounding
# difference upstream can move one activation code by one: ~1e-3 of the logits' scale per such flip.
QUANT_TOLERANCE = 2e-2


@needs_native
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("padded", [False, True])
def test_quantized_step_matches_model_forward(bits, padded, monkeypatch):
    """Each quantized projection runs its own batch-1 kernel's arithmetic, as model.forward does at one row."""
    model = _quantized(bits)
    got, _, used = _steps(model, padded, "native", monkeypatch)
    assert used
    ref = _steps(model, padded, "forward")[0]
    assert (got - ref).abs().max() <= QUANT_TOLERANCE * ref.abs().max()
    exact_rows = ((got - ref).abs().amax(-1) < 1e-4).sum()
    assert exact_rows >= 3  # most steps agree to float rounding: no code moved at all


@needs_native
def test_it_steps_aside_where_it_does_not_apply(monkeypatch):
    model = _model()
    assert NativeStep.build(model) is not None
    monkeypatch.setenv("GPT2KIT_FUSED_DECODE", "0")
    assert NativeStep.build(model) is None
    monkeypatch.delenv("GPT2KIT_FUSED_DECODE")
    q = _model()
    quantize_model(q, QuantSpec.default(4, group_size=16))  # groups of 16: no native int4 block layout
    assert NativeStep.build(q.eval()) is None
    # a batch of several rows keeps the numpy step
    _, cache, used = _steps(model, False, "native", monkeypatch)
    assert used
    fast = FastDecoder(model)
    big = KVCache.allocate(model.config, 2, 20)
    with torch.inference_mode():
        model(torch.tensor([[1, 2], [3, 4]]), kv_cache=big)
        fast(torch.tensor([[5], [6]]), big, None, None)
    assert fast._native_step is False  # never built: no batch-1 step was asked for


@needs_native
def test_bad_input_is_refused_and_nothing_is_written(monkeypatch):
    import numpy as np

    model = _model()
    step = NativeStep.build(model)
    cache = KVCache.allocate(model.config, 1, 20)
    logits = np.zeros(500, np.float32)
    with pytest.raises(IndexError, match="token 500"):
        step(500, 0, cache, None, logits)
    with pytest.raises(IndexError, match="position 48"):
        step(1, 48, cache, None, logits)
    assert cache.length == 0 and not cache.keys[0].any() and not logits.any()
    with pytest.raises(ValueError, match="mask has 3 columns"):
        step(1, 0, cache, np.ones(3, bool), logits)
    monkeypatch.setenv("GPT2KIT_DECODE_ROWS", "fast")
    with pytest.raises(UserError, match="GPT2KIT_DECODE_ROWS"):
        row_reading()
    monkeypatch.setenv("GPT2KIT_DECODE_ROWS", "0,0,0")
    with pytest.raises(UserError, match="streams in"):
        row_reading()
    monkeypatch.setenv("GPT2KIT_DECODE_ROWS", "3,4096,0")
    assert row_reading() == (3, 4096, 0)


@needs_native
def test_stream_and_prefetch_choices_do_not_change_the_result(monkeypatch):
    model = _model()
    results = []
    for rows in ("1,0,0", "2,8192,8192", "4,64,128"):
        monkeypatch.setenv("GPT2KIT_DECODE_ROWS", rows)
        results.append(_steps(model, False, "native", monkeypatch)[0])
    assert all(torch.equal(results[0], r) for r in results[1:])


@needs_native
@pytest.mark.skipif(not native._arch_flags() or native._arch_flags()[0] != "-march=native", reason="x86-64 only")
@pytest.mark.parametrize("flags", ["-mno-avx512f", "-mno-avx512f -mno-avxvnni", "-mno-avx2"])
def test_every_isa_path_computes_the_same(tmp_path, flags, run_python, monkeypatch):
    """AVX2 (+ AVX-VNNI or not) and portable C builds of the step, on this CPU with newer instructions off."""
    if "avx2" not in native._cpu_flags().split():
        pytest.skip("this CPU has no AVX2")
    here = str(__import__("pathlib").Path(__file__).parent)
    code = (f"import json, torch, sys; sys.path.insert(0, {here!r}); import test_decode_native as t;"
            "import pytest; mp = pytest.MonkeyPatch();"
            "from gpt2kit.model import native; print(json.dumps([native.status(), native.f32_status(),"
            " t._steps(t._model(), True, 'native', mp)[0].tolist(),"
            " t._steps(t._quantized(4), False, 'native', mp)[0].tolist(), t._steps(t._quantized(8), False, 'native', mp)[0].tolist(),"
            " all((lambda r: (r[0][0] == r[1][0]).all())(t._rows_and_steps(m, T, True)) for m in (t._model(), t._quantized(4))"
            " for T in (3, 5))]))")
    isa, f32_isa, *logits, rows_exact = json.loads(run_python(code, GPT2KIT_CACHE=str(tmp_path), GPT2KIT_NATIVE_CFLAGS=flags))
    assert "avx512" not in isa + f32_isa
    assert rows_exact is True  # T rows in one call are the single steps, bitwise, on this ISA path too
    f32, q4, q8 = (torch.tensor(v) for v in logits)
    torch.testing.assert_close(f32, _steps(_model(), True, "forward")[0], rtol=0, atol=2e-5)
    for bits, got in ((4, q4), (8, q8)):
        ref = _steps(_quantized(bits), False, "forward")[0]
        assert (got - ref).abs().max() <= QUANT_TOLERANCE * ref.abs().max()


def _rows_and_steps(model, T: int, padded: bool):
    """Logits and caches of T new tokens after a 9-token prefill: one NativeStep.rows call, and T single steps."""
    import numpy as np

    step = NativeStep.build(model)
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 500, (1, 9), generator=g)
    toks = torch.randint(0, 500, (T,), generator=g).numpy()
    keep = np.ones(9 + T, bool)
    if padded:
        keep[:3] = False
    pos0 = 6 if padded else 9
    results = []
    for how in ("rows", "steps"):
        cache = KVCache.allocate(model.config, 1, 20)
        with torch.inference_mode():
            model(idx, kv_cache=cache)
        logits = np.zeros((T, 500), np.float32)
        if how == "rows":
            step.rows(toks, pos0, cache, keep if padded else None, logits)
        else:
            for j in range(T):
                step(int(toks[j]), pos0 + j, cache, keep[: 10 + j] if padded else None, logits[j])
        results.append((logits, cache))
    return results


@needs_native
@pytest.mark.parametrize("kind", ["float32", "int8", "int4"])
@pytest.mark.parametrize("padded", [False, True])
def test_rows_are_bitwise_the_single_steps(kind, padded):
    """T tokens in one call (speculative decoding's check) give what T steps give, to the bit: every T from
    1 to 7 (float32 rows meet a weight row 4 or 2 at a time, so every remainder is covered)."""
    import numpy as np

    model = _model() if kind == "float32" else _quantized(8 if kind == "int8" else 4)
    for T in range(1, 8):
        (rows, rc), (steps, sc) = _rows_and_steps(model, T, padded)
        assert np.array_equal(rows, steps), (T, np.abs(rows - steps).max())
        assert rc.length == sc.length == 9 + T
        for a, b in zip(rc.keys + rc.values, sc.keys + sc.values):
            assert torch.equal(a, b)


@needs_native
def test_rows_can_return_the_last_logits_only_and_refuse_bad_input():
    import numpy as np

    model = _model()
    (rows, _), _ = _rows_and_steps(model, 5, False)
    step = NativeStep.build(model)
    g = torch.Generator().manual_seed(2)  # the prompt and tokens _rows_and_steps draws
    idx = torch.randint(0, 500, (1, 9), generator=g)
    toks = torch.randint(0, 500, (5,), generator=g).numpy()
    cache = KVCache.allocate(model.config, 1, 20)
    with torch.inference_mode():
        model(idx, kv_cache=cache)
    last = np.zeros(500, np.float32)
    step.rows(toks, 9, cache, None, last, all_logits=False)
    assert np.array_equal(last, rows[-1]) and cache.length == 14
    with pytest.raises(ValueError, match="logits must be"):
        step.rows(toks[:2], 14, cache, None, np.zeros((3, 500), np.float32))
    with pytest.raises(IndexError, match="positions 14..20"):
        step.rows(np.arange(7), 14, cache, None, np.zeros((7, 500), np.float32))  # the cache holds 20
    with pytest.raises(IndexError, match="tokens 1..500"):
        step.rows(np.array([1, 500]), 14, cache, None, np.zeros((2, 500), np.float32))
    assert cache.length == 14
