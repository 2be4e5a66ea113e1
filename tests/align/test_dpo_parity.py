"""DPO loss and gradient equal TRL's DPOTrainer (its own _compute_loss on the same batch), 1e-5."""

from __future__ import annotations

import pytest
import torch
from align_helpers import tiny_checkpoint

trl = pytest.importorskip("trl", reason="TRL is not installed (pip install -e '.[align]')")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

PAIRS = [("the cat", " sat on the mat.", " ate the bone."), ("a red", " apple, yes", " sky"),
         ("the dog ate", " the bone.", " a blue sky, no and yes."), ("yes", " and no.", " no")]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("dpo")
    return tiny_checkpoint(d / "ref", seed=0), tiny_checkpoint(d / "policy", seed=1)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_and_gradient_equal_trl(checkpoints, tmp_path, loss_type):
    from trl import DPOConfig, DPOTrainer

    from gpt2kit.align.dpo import concatenated_batch, dpo_loss, encode_pairs, pair_logps
    from gpt2kit.align.pairs import Pair, completion_logps
    from gpt2kit.model import GPT2
    from gpt2kit.model.hf import _is_conv1d
    from gpt2kit.tokenizer import Tokenizer

    ref_dir, pol_dir = checkpoints
    tok = Tokenizer.from_pretrained(pol_dir)
    enc = encode_pairs([Pair(*p, where="t") for p in PAIRS], tok, 64)
    rows = list(range(len(PAIRS)))
    idx, mask = concatenated_batch(enc, rows, tok.eos_id)
    beta = 0.1

    ref = GPT2.from_pretrained(ref_dir, dtype=torch.float32)
    ref_c, ref_r = pair_logps(ref, enc, tok.eos_id)
    ours = GPT2.from_pretrained(pol_dir, dtype=torch.float32)
    c, r = completion_logps(ours, idx, mask).chunk(2)
    nc, nr = mask[:, 1:].sum(-1).chunk(2)
    loss, metrics = dpo_loss(c, r, ref_c, ref_r, beta, loss_type, nc, nr)
    loss.backward()

    hf = transformers.GPT2LMHeadModel.from_pretrained(pol_dir)
    hf_ref = transformers.GPT2LMHeadModel.from_pretrained(ref_dir)
    ds = datasets.Dataset.from_list([{"prompt": p, "chosen": a, "rejected": b} for p, a, b in PAIRS])
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=[loss_type], report_to=[], use_cpu=True,
                     bf16=False)  # fp32 like ours (TRL defaults to bf16 autocast for the reference)
    trainer = DPOTrainer(model=hf, ref_model=hf_ref, args=args, train_dataset=ds,
                         processing_class=transformers.AutoTokenizer.from_pretrained(pol_dir))
    attention = torch.zeros_like(mask)
    for i, (ids, _) in enumerate([enc.chosen[j] for j in rows] + [enc.rejected[j] for j in rows]):
        attention[i, : len(ids)] = 1
    inputs = {"input_ids": idx, "attention_mask": attention, "completion_mask": mask}
    trainer.model.train()
    out = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    trl_loss = out[0] if isinstance(out, tuple) else out
    trl_loss.backward()

    assert abs(loss.item() - trl_loss.item()) < 1e-5, (loss.item(), trl_loss.item())
    assert loss.item() > 0.01
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[k] == pytest.approx(logged[k], abs=1e-5), k
    compared = 0
    for name, p in ours.named_parameters():
        g = p.grad.t() if _is_conv1d(name) else p.grad
        want = hf.get_parameter(name).grad
        assert torch.allclose(g, want, atol=1e-5, rtol=1e-4), name
        compared += 1
    assert compared == len(list(hf.parameters()))
    assert float(ours.transformer.wte.weight.grad.abs().max()) > 1e-4
