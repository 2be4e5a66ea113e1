"""Distillation: the loss formula, the teacher stays frozen, a distilled student beats the same student
trained from scratch for the same steps, and a tokenizer mismatch is refused."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from post_helpers import make_tokenizer, workspace

from gpt2kit.cli import main
from gpt2kit.model import GPT2
from gpt2kit.post.distill import distill, distillation_loss


def test_loss_matches_the_formula():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    y = torch.randint(0, 7, (2, 3))
    y[1, 2] = -100
    alpha, tau = 0.3, 2.5
    keep = y != -100
    ce = F.cross_entropy(s[keep], y[keep])
    q = F.softmax(t[keep] / tau, -1)
    kl = (q * (q.log() - F.log_softmax(s[keep] / tau, -1))).sum(-1).mean()
    want = alpha * ce + (1 - alpha) * tau**2 * kl
    assert distillation_loss(s, t, y, alpha, tau).item() == pytest.approx(want.item(), rel=1e-5)
    assert distillation_loss(s, t, y, 1.0, tau).item() == pytest.approx(ce.item(), rel=1e-6)
    assert distillation_loss(s, s, y, 0.0, tau).item() == pytest.approx(0.0, abs=1e-6)  # KL(p || p) = 0


@pytest.mark.slow
def test_distilled_student_beats_scratch_and_teacher_is_untouched(tmp_path):
    from post_helpers import train_checkpoint

    ws = workspace()
    teacher_before = {k: v.clone() for k, v in GPT2.from_pretrained(ws["ckpt"]).state_dict().items()}
    student = dict(n_layer=1, n_head=2, n_embd=32)
    common = dict(max_steps=100, lr=3e-3, warmup_steps=5, block_size=32, batch_size=8, seed=7, eval_every=0,
                  save_every=0, progress=False, device="cpu", dropout=0.0, attn_dropout=0.0, preset="gpt2-tiny",
                  n_ctx=64, eval_batches=0)
    d = distill(ws["ckpt"], "gpt2-tiny", ws["shards_a"], tmp_path / "distilled", alpha=0.5, tau=1.0,
                overrides={**common, **student})
    scratch_ckpt = train_checkpoint(tmp_path / "scratch", ws["shards_a"], **{**common, **student, "steps": 100})
    from gpt2kit.data import read_meta
    from gpt2kit.train.trainer import evaluate

    meta = read_meta(ws["shards_a"])
    scratch = evaluate(GPT2.from_pretrained(scratch_ckpt), ws["shards_a"], meta, 8, 32, torch.device("cpu"))
    assert math.isfinite(d.val["val_loss"])
    assert d.val["val_loss"] < scratch["val_loss"]
    for k, v in GPT2.from_pretrained(ws["ckpt"]).state_dict().items():
        assert torch.equal(v, teacher_before[k])


def test_cli_refuses_teacher_student_tokenizer_mismatch(tmp_path, capsys):
    ws = workspace()
    capsys.readouterr()
    other = make_tokenizer(tmp_path / "tok2", vocab_size=300)
    cfg = GPT2.from_pretrained(ws["ckpt"]).config.replace(vocab_size=300, eos_token_id=other.eos_id)
    GPT2(cfg).save_pretrained(tmp_path / "teacher2", tokenizer=other)
    code = main(["distill", "--teacher", str(tmp_path / "teacher2"), "--student", "gpt2-tiny",
                 "--data", str(ws["shards_a"]), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "different tokenizers" in err[0]
    assert not (tmp_path / "o").exists()
