"""MoE and shared-layer checkpoints through the post-training tools: quantize (experts included), prune,
fine-tune, distil dense -> MoE and MoE -> dense, and generation."""

from __future__ import annotations

import json

import pytest
import torch
from post_helpers import random_checkpoint, workspace

from gpt2kit.model import GPT2
from gpt2kit.model.moe import MoEMLP

MOE = dict(moe_experts=4, moe_top_k=2)
FAST = dict(max_steps=6, lr=3e-3, warmup_steps=2, block_size=32, batch_size=4, seed=7, eval_every=0, save_every=0,
            progress=False, device="cpu", dropout=0.0, attn_dropout=0.0, eval_batches=2)


@pytest.fixture(scope="module")
def ws():
    return workspace()


@pytest.fixture(scope="module")
def moe_ckpt(ws, tmp_path_factory):
    from gpt2kit.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(ws["tok"])
    return random_checkpoint(tmp_path_factory.mktemp("moe") / "ckpt", tok, share_layers="pairs", **MOE)


def test_quantize_includes_the_experts_and_reloads(tmp_path, moe_ckpt):
    from gpt2kit.model.quantized import QuantLinear
    from gpt2kit.post.quantize import QuantSpec, quantize_checkpoint

    quantize_checkpoint(moe_ckpt, tmp_path / "q", QuantSpec.default(8))
    modules = json.loads((tmp_path / "q" / "gpt2kit.json").read_text())["quantization"]["modules"]
    assert "transformer.h.0.mlp.experts.3.c_fc" in modules
    q, ref = GPT2.from_pretrained(tmp_path / "q"), GPT2.from_pretrained(moe_ckpt)
    layer = q.transformer.h[0].mlp
    assert isinstance(layer, MoEMLP) and isinstance(layer.experts[3].c_fc, QuantLinear)
    ids = torch.randint(0, q.config.vocab_size, (2, 20))
    assert q(ids, targets=ids).loss.item() == pytest.approx(ref(ids, targets=ids).loss.item(), rel=0.02)
    out = q.generate(ids[:1, :5], max_new_tokens=4, temperature=0.0)  # the KV-cache loop, forward fallback
    assert out.shape == (1, 9)


def test_prune_cuts_expert_weights(tmp_path, moe_ckpt):
    from gpt2kit.post.prune import load_masks, prune_checkpoint

    r = prune_checkpoint(moe_ckpt, tmp_path / "p", 0.5)
    assert r["real_sparsity"] == pytest.approx(0.5, abs=1e-3)
    masks = load_masks(tmp_path / "p")
    assert "transformer.h.0.mlp.experts.2.c_proj.weight" in masks


def test_finetune_keeps_the_variant(tmp_path, ws, moe_ckpt):
    from gpt2kit.post.finetune import finetune_shards

    r = finetune_shards(moe_ckpt, ws["shards_a"], tmp_path / "ft", overrides=FAST)
    tuned = GPT2.from_pretrained(r.checkpoint if hasattr(r, "checkpoint") else tmp_path / "ft" / "best")
    assert tuned.config.moe_experts == 4 and tuned.config.share_layers == "pairs"


def test_distill_dense_teacher_into_moe_student_and_back(tmp_path, ws, moe_ckpt):
    from gpt2kit.post.distill import distill

    student = dict(FAST, n_layer=2, n_head=2, n_embd=32, preset="gpt2-tiny", n_ctx=64)
    d = distill(ws["ckpt"], "gpt2-tiny", ws["shards_a"], tmp_path / "to_moe", overrides={**student, **MOE})
    moe_student = GPT2.from_pretrained(d.last_checkpoint)
    assert moe_student.config.moe_experts == 4
    rows = [json.loads(x) for x in (tmp_path / "to_moe" / "metrics.jsonl").read_text().splitlines()]
    assert any("moe_load" in r for r in rows)  # the student's balance loss and load were in the loop
    back = distill(d.last_checkpoint, "gpt2-tiny", ws["shards_a"], tmp_path / "to_dense", overrides=student)
    assert GPT2.from_pretrained(back.last_checkpoint).config.is_gpt2
