"""The main job end to end (shortened by flags): a report with val loss/ppl/bpc and a sample, and a
checkpoint directory that transformers opens with the same logits and the same tokenization."""

from __future__ import annotations

import math
import re

import pytest
import torch
from train_helpers import cli_main


@pytest.mark.slow
def test_main_job_prints_metrics_and_leaves_a_transformers_checkpoint(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "main"
    assert cli_main(["train", "--out", str(out), "--max-steps", "12", "--eval-every", "6", "--save-every", "6",
                     "--n-layer", "2", "--n-embd", "64", "--n-head", "2", "--block-size", "64", "--n-ctx", "64",
                     "--eval-batches", "4", "--progress", "false"]) == 0
    printed = capsys.readouterr().out
    m = re.search(r"validation: loss ([\d.]+) nats/token, perplexity ([\d.]+), bits per character ([\d.]+)", printed)
    assert m, printed
    loss, ppl, bpc = map(float, m.groups())
    assert ppl == pytest.approx(math.exp(loss), rel=1e-3)
    assert 0 < bpc < loss  # ~3.5 characters per token: fewer bits per character than nats per token
    assert loss < math.log(4096)  # it learned something in 12 steps
    assert "sample (prompt 'def'" in printed

    ckpt = out / "step-000012"
    assert (out / "latest").read_text().strip() == "step-000012"
    from gpt2kit.model import GPT2
    from gpt2kit.tokenizer import Tokenizer

    ours = GPT2.from_pretrained(ckpt)
    hf = transformers.GPT2LMHeadModel.from_pretrained(ckpt).eval()
    tok = Tokenizer.from_pretrained(ckpt)
    hf_tok = transformers.GPT2TokenizerFast.from_pretrained(ckpt)
    text = "def parse(self, line):\n    return line.strip()\n"
    ids = tok.encode_ordinary(text)
    assert hf_tok(text)["input_ids"] == ids
    idx = torch.tensor([ids])
    with torch.no_grad():
        assert (ours(idx).logits - hf(idx).logits).abs().max().item() < 1e-4


@pytest.mark.slow
def test_main_job_without_shape_flags_times_the_candidates_and_trains_the_planned_shape(tmp_path, capsys, monkeypatch):
    from gpt2kit.train import main_job
    from gpt2kit.train.budget import Shape

    small, large = Shape(1, 2, 32), Shape(2, 2, 64)
    monkeypatch.setattr(main_job, "CANDIDATES", {small: 1e-2, large: 5e-3})
    # a token budget no candidate meets at 1 token per parameter would still train the smallest;
    # one of 0 tokens per parameter takes the largest timed
    monkeypatch.setattr(main_job, "MIN_TOKENS_PER_PARAM", 0.0)
    out = tmp_path / "main"
    assert cli_main(["train", "--out", str(out), "--max-steps", "4", "--block-size", "64", "--n-ctx", "64",
                     "--eval-batches", "2", "--progress", "false"]) == 0
    err = capsys.readouterr().err
    assert "plan: L2 H2 d64" in err and "L1 H2 d32" in err  # both timed, the larger kept
    import json

    cfg = json.loads((out / "step-000004" / "config.json").read_text())
    assert (cfg["n_layer"], cfg["n_embd"]) == (2, 64)
    toml = (out / "config.toml").read_text()
    assert 'optimizer = "muon"' in toml and "lr = 0.005" in toml and "warmup_steps = 1" in toml
