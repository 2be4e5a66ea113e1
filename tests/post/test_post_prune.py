"""Pruning: the threshold reaches the requested sparsity exactly, global vs per-layer scope, the masks are
saved and survive a fine-tune, and bad sparsities are refused."""

from __future__ import annotations

import json

import pytest
import torch
from post_helpers import corpus, workspace

from gpt2kit.cli import main
from gpt2kit.model import GPT2
from gpt2kit.post.finetune import finetune_shards
from gpt2kit.post.prune import PRUNED_SUFFIXES, load_masks, magnitude_masks, prune_checkpoint


def _tiny_model(seed=0):
    from gpt2kit.model import GPT2Config

    torch.manual_seed(seed)
    return GPT2(GPT2Config(vocab_size=64, eos_token_id=63, n_ctx=16, n_layer=2, n_head=2, n_embd=32))


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9])
def test_global_threshold_reaches_sparsity_and_cuts_the_smallest(sparsity):
    model = _tiny_model()
    masks = magnitude_masks(model, sparsity, "global")
    assert set(masks) == {n for n, _ in model.named_parameters() if n.endswith(PRUNED_SUFFIXES)}
    params = dict(model.named_parameters())
    total = sum(m.numel() for m in masks.values())
    dropped = sum(int((~m).sum()) for m in masks.values())
    assert dropped == round(sparsity * total)
    if 0 < sparsity:
        kept = torch.cat([params[n].detach().abs()[m] for n, m in masks.items()])
        cut = torch.cat([params[n].detach().abs()[~m] for n, m in masks.items()])
        assert cut.max() <= kept.min()  # w = 0 exactly where |w| < gamma


def test_layer_scope_prunes_each_tensor_equally_global_does_not():
    model = _tiny_model()
    with torch.no_grad():  # make one layer's weights much smaller: global pruning should hit it hardest
        model.transformer.h[0].mlp.c_fc.weight.mul_(0.1)
    per_layer = magnitude_masks(model, 0.5, "layer")
    for m in per_layer.values():
        assert (~m).float().mean().item() == pytest.approx(0.5, abs=1 / m.numel())
    glob = magnitude_masks(model, 0.5, "global")
    assert (~glob["transformer.h.0.mlp.c_fc.weight"]).float().mean() > 0.9


def test_pruned_checkpoint_reports_real_sparsity_and_keeps_embeddings(tmp_path):
    ws = workspace()
    r = prune_checkpoint(ws["ckpt"], tmp_path / "p", 0.3, eval_text=corpus(60, seed=98))
    assert r["real_sparsity"] == pytest.approx(0.3, abs=1e-4)
    assert r["ppl_after"] >= r["ppl_before"] * 0.98
    meta = json.loads((tmp_path / "p" / "gpt2kit.json").read_text())
    assert meta["pruning"]["masks"] == "masks.safetensors" and meta["pruning"]["scope"] == "global"
    pruned, orig = GPT2.from_pretrained(tmp_path / "p"), GPT2.from_pretrained(ws["ckpt"])
    assert torch.equal(pruned.transformer.wte.weight, orig.transformer.wte.weight)
    masks = load_masks(tmp_path / "p")
    for n, p in pruned.named_parameters():
        if n in masks:
            assert (p[~masks[n]] == 0).all()
            assert torch.equal(p[masks[n]], dict(orig.named_parameters())[n][masks[n]])


def test_mask_survives_finetune(tmp_path):
    ws = workspace()
    prune_checkpoint(ws["ckpt"], tmp_path / "p", 0.5)
    result = finetune_shards(tmp_path / "p", ws["shards_b"], tmp_path / "ft",
                             {"max_steps": 6, "lr": 3e-3, "warmup_steps": 0, "block_size": 32, "progress": False,
                              "device": "cpu"})
    tuned = GPT2.from_pretrained(result.checkpoint)
    masks = load_masks(tmp_path / "p")
    assert load_masks(result.checkpoint) is not None  # carried into the fine-tuned checkpoint
    params = dict(tuned.named_parameters())
    before = dict(GPT2.from_pretrained(tmp_path / "p").named_parameters())
    moved = 0
    for n, m in masks.items():
        assert (params[n][~m] == 0).all(), n
        moved += int((params[n][m] != before[n][m]).sum())
    assert moved > 0  # the kept weights did train


@pytest.mark.parametrize("bad", ["1.0", "-0.1", "1.5"])
def test_cli_refuses_sparsity_outside_0_1(tmp_path, capsys, bad):
    assert main(["prune", str(tmp_path), "--sparsity", bad, "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--sparsity must be in [0, 1)" in err[0]
