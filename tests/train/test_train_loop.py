"""The training loop: loss goes down, exact resume, accumulation, non-finite steps, checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch
from train_helpers import assert_bitwise_equal, params_of, tiny_flags, write_shards
from train_helpers import run_training as _run

from gpt2kit.errors import UserError
from gpt2kit.train.checkpoint import list_step_dirs
from gpt2kit.train.trainer import count_targets, forward_backward


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def full_run(shards, tmp_path_factory):
    """12 uninterrupted steps, 2 micro-batches per step, dropout on (so RNG state matters)."""
    out = tmp_path_factory.mktemp("full") / "run"
    result = _run(tiny_flags(shards, out, grad_accum=2))
    return out, result


def test_loss_goes_down_and_the_run_directory_is_complete(shards, tmp_path):
    out = tmp_path / "run"
    result = _run(tiny_flags(shards, out, max_steps=40, eval_every=20, save_every=20, keep_last=1, dropout=0.0,
                             attn_dropout=0.0, lr=1e-2))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 41))
    first, last = sum(r["loss"] for r in train[:3]) / 3, sum(r["loss"] for r in train[-3:]) / 3
    assert first > math.log(64) - 0.3  # starts near uniform over 64 tokens
    assert last < 0.6 * first  # and learns the counting sequences
    assert [r["step"] for r in evals] == [20, 40] and evals[1]["val_loss"] < evals[0]["val_loss"]
    v = evals[-1]
    assert v["val_ppl"] == pytest.approx(math.exp(v["val_loss"]))
    n_val_tokens = json.loads((shards / "meta.json").read_text())["splits"]["val"]["tokens"]
    # 3 characters per token in the fixture: bpc = nats/token * (tokens-1)/characters / ln 2
    assert v["val_bpc"] == pytest.approx(v["val_loss"] * (n_val_tokens - 1) / (3 * n_val_tokens) / math.log(2))
    assert result.val["val_loss"] == v["val_loss"] and result.step == 40
    # keep_last=1 keeps only the newest step dir; best/ holds the best evaluation
    assert [p.name for p in list_step_dirs(out)] == ["step-000040"]
    assert (out / "latest").read_text().strip() == "step-000040"
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["step"] == 40 and best["val_loss"] == v["val_loss"]
    assert (out / "config.toml").read_text().count("max_steps = 40") == 1
    for d in (out / "step-000040", out / "best"):
        assert (d / "config.json").is_file() and (d / "model.safetensors").is_file()


def _metrics_without_timing(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "tokens_per_s")} for r in rows]


def test_resume_after_interruption_is_bitwise_identical(shards, full_run, tmp_path):
    full_out, full = full_run
    out = tmp_path / "run"
    flags = tiny_flags(shards, out, grad_accum=2)
    first = _run(flags, stop_after=6)
    assert first.stopped_by == "stop_after" and first.step == 6
    assert [p.name for p in list_step_dirs(out)] == ["step-000004", "step-000006"]
    resumed = _run({"out": str(out)} | {"max_steps": 12}, resume=True)
    assert resumed.step == 12
    assert_bitwise_equal(params_of(out / "step-000012"), params_of(full_out / "step-000012"))
    # the whole loss curve after the resume point is the same, number for number
    assert _metrics_without_timing(out) == _metrics_without_timing(full_out)
    # the optimizer state too
    a = torch.load(out / "step-000012" / "trainer_state.pt", weights_only=True)
    b = torch.load(full_out / "step-000012" / "trainer_state.pt", weights_only=True)
    assert _same(a["ranks"], b["ranks"]) and a["tokens_seen"] == b["tokens_seen"]
    assert a["files"]["optimizer/__0_0.distcp"] == b["files"]["optimizer/__0_0.distcp"]  # same AdamW state bytes


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_accumulating_k_micro_batches_equals_one_batch_of_k_times_b():
    from gpt2kit.data import Batch
    from gpt2kit.model import GPT2, GPT2Config

    torch.manual_seed(0)
    model = GPT2(GPT2Config.from_preset("gpt2-tiny", vocab_size=50, n_ctx=16, dropout=0.0, attn_dropout=0.0,
                                        eos_token_id=0))
    B, T, k = 3, 16, 4
    idx = torch.randint(0, 50, (k * B, T))
    targets = torch.randint(0, 50, (k * B, T))
    mask = torch.rand(k * B, T) < torch.linspace(0.2, 0.95, k * B)[:, None]  # very different counts per row
    micro = [Batch(idx[i * B:(i + 1) * B], targets[i * B:(i + 1) * B], mask[i * B:(i + 1) * B]) for i in range(k)]
    assert len({count_targets(b) for b in micro}) > 1

    def grads(batches):
        model.zero_grad(set_to_none=True)
        stats = forward_backward(model, batches)
        return stats, {n: p.grad.clone() for n, p in model.named_parameters()}

    s_acc, g_acc = grads(micro)
    s_one, g_one = grads([Batch(idx, targets, mask)])
    assert s_acc.targets == s_one.targets == int(mask.sum())
    assert abs(s_acc.loss - s_one.loss) <= 1e-6
    worst = max((g_acc[n] - g_one[n]).abs().max().item() for n in g_one)
    assert worst <= 1e-6
    # the check has teeth: averaging the micro-batch means instead is visibly wrong
    model.zero_grad(set_to_none=True)
    for b in micro:
        (model(b.idx, targets=b.targets, loss_mask=b.loss_mask).loss / k).backward()
    naive = max((p.grad - g_one[n]).abs().max().item() for n, p in model.named_parameters())
    assert naive > 100 * max(worst, 1e-8)


def _nan_loss_on(calls: set[int] | None, from_call: int | None = None):
    """Forward hook that turns the training loss of chosen forward calls into NaN."""
    seen = {"n": 0}

    def hook(module, args, output):
        if not module.training:
            return output
        seen["n"] += 1
        n = seen["n"]
        if (calls and n in calls) or (from_call is not None and n >= from_call):
            output.loss = output.loss * float("nan")
        return output

    return hook


def test_non_finite_loss_skips_the_step_and_is_counted(shards, tmp_path):
    out = tmp_path / "run"
    flags = tiny_flags(shards, out, max_steps=6, save_every=0, eval_every=0, dropout=0.0, attn_dropout=0.0)
    result = _run(flags, hook=_nan_loss_on({3, 5}))
    assert result.step == 6 and result.skipped_steps == 2  # 8 forward calls, 2 of them skipped
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["skipped_steps"] == 2
    assert all(torch.isfinite(t).all() for t in params_of(out / "step-000006").values())


def test_non_finite_losses_in_a_row_stop_the_run(shards, tmp_path):
    out = tmp_path / "run"
    flags = tiny_flags(shards, out, max_steps=20, save_every=2, eval_every=0, max_bad_steps=3)
    with pytest.raises(UserError, match=r"non-finite for 3 steps in a row at step 5.*step-000004"):
        _run(flags, hook=_nan_loss_on(None, from_call=5))
    assert [p.name for p in list_step_dirs(out)] == ["step-000002", "step-000004"]
    assert all(torch.isfinite(t).all() for t in params_of(out / "step-000004").values())


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(shards, full_run, tmp_path, capsys):
    full_out, _ = full_run
    out = tmp_path / "run"
    _run(tiny_flags(shards, out, grad_accum=2), stop_after=8)
    weights = out / "step-000008" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    resumed = _run({"out": str(out), "max_steps": 12}, resume=True)
    err = capsys.readouterr().err
    assert "step-000008 is unusable: model.safetensors is truncated" in err and "resuming from step-000004" in err
    assert (out / "step-000008.corrupt" / "model.safetensors").read_bytes() == data[: len(data) // 2]  # kept
    assert resumed.step == 12
    assert_bitwise_equal(params_of(out / "step-000012"), params_of(full_out / "step-000012"))


def test_checkpoint_dir_opens_in_transformers(full_run):
    transformers = pytest.importorskip("transformers")
    from gpt2kit.model import GPT2

    full_out, _ = full_run
    ours = GPT2.from_pretrained(full_out / "step-000012")
    hf = transformers.GPT2LMHeadModel.from_pretrained(full_out / "step-000012").eval()
    idx = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        assert (ours(idx).logits - hf(idx).logits).abs().max().item() < 1e-5


def test_time_limit_lowers_max_steps_and_finishes_properly(shards, tmp_path):
    out = tmp_path / "run"
    result = _run(tiny_flags(shards, out, max_steps=100_000, time_limit=3.0, eval_every=0, save_every=0,
                             log_every=50, warmup_steps=10))
    assert 6 <= result.step < 100_000 and result.stopped_by is None
    saved = (out / "config.toml").read_text()
    assert f"max_steps = {result.step}\n" in saved and "time_limit = 0.0\n" in saved  # a resume keeps this end
    assert result.last_checkpoint.name == f"step-{result.step:06d}" and result.val is not None
    lrs = [json.loads(x)["lr"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"lr"' in x]
    assert lrs[-1] < 0.05 * 3e-3  # the cosine decayed to the new end instead of being cut off at the peak


def test_bf16_grad_checkpointing_padded_mode_and_dynamic_lengths(shards, tmp_path):
    """The optional paths run together: bf16 autocast, gradient checkpointing, padded rows, T per batch."""
    out = tmp_path / "run"
    result = _run(tiny_flags(shards, out, max_steps=4, eval_every=0, save_every=0, dtype="bf16",
                             grad_checkpointing=True, mode="padded", seq_len="uniform:8,16,32", grad_accum=2))
    assert result.step == 4 and result.skipped_steps == 0 and math.isfinite(result.train_loss)
    assert result.val is not None and math.isfinite(result.val["val_loss"])
    saved = params_of(out / "step-000004")
    assert all(t.dtype == torch.float32 for t in saved.values())  # master weights stay fp32 under autocast
