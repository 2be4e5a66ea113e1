"""Context extension of a trained dense checkpoint: finetune --n-ctx grows the learned position table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "post"))
from post_helpers import corpus, make_shards, make_tokenizer, random_checkpoint  # noqa: E402

from gpt2kit.cli import main  # noqa: E402
from gpt2kit.model import GPT2  # noqa: E402
from gpt2kit.model.context import extend_positions  # noqa: E402
from gpt2kit.post.finetune import finetune_shards  # noqa: E402


def test_extend_positions_tiles_the_table_and_keeps_the_short_context_exact(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    model = GPT2.from_pretrained(random_checkpoint(tmp_path / "c", tok, n_ctx=32)).eval()
    idx = torch.randint(0, tok.vocab_size, (2, 32))
    with torch.no_grad():
        before = model(idx).logits
        extend_positions(model, 80)
        assert model.config.n_ctx == 80 and model.transformer.wpe.weight.shape[0] == 80
        w = model.transformer.wpe.weight
        assert torch.equal(w[32:64], w[:32]) and torch.equal(w[64:], w[:16])
        assert torch.equal(model(idx).logits, before)
        assert model(torch.randint(0, tok.vocab_size, (1, 80))).logits.shape == (1, 80, tok.vocab_size)


def test_finetune_n_ctx_trains_at_the_longer_length_and_refuses_a_shorter_one(tmp_path, capsys):
    tok = make_tokenizer(tmp_path / "tok")
    shards = make_shards(tmp_path / "shards", corpus(400, seed=1), tmp_path / "tok")
    for variant in ({}, {"attention": "sliding", "window": 16}):
        ckpt = random_checkpoint(tmp_path / f"c{len(variant)}", tok, n_ctx=32, **variant)
        result = finetune_shards(ckpt, shards, tmp_path / f"ft{len(variant)}",
                                 {"max_steps": 2, "warmup_steps": 1, "progress": False, "device": "cpu",
                                  "eval_batches": 1, "batch_size": 2}, n_ctx=96)
        cfg = json.loads((result.checkpoint / "config.json").read_text())
        assert cfg["n_positions"] == 96
        assert cfg.get("gpt2kit_variant", {}).get("attention", "dense") == variant.get("attention", "dense")
        run_cfg = (tmp_path / f"ft{len(variant)}" / "config.toml").read_text()
        assert "block_size = 96" in run_cfg
    capsys.readouterr()
    code = main(["finetune", "--init", str(ckpt), "--data", str(shards), "--out", str(tmp_path / "short"),
                 "--n-ctx", "16"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "shorter than the checkpoint's context" in err
