"""Fine-tuning: a new domain's validation loss goes down; prompt/completion rows count only the
completion; quantized checkpoints and mismatched tokenizers are refused."""

from __future__ import annotations

import json

import pytest
import torch.nn.functional as F
from post_helpers import corpus, make_tokenizer, workspace

from gpt2kit.cli import main
from gpt2kit.model import GPT2
from gpt2kit.post.finetune import completion_batch, completion_rows, finetune_jsonl, finetune_shards


def test_finetune_on_new_domain_lowers_its_val_loss(tmp_path):
    ws = workspace()
    result = finetune_shards(ws["ckpt"], ws["shards_b"], tmp_path / "ft",
                             {"max_steps": 20, "lr": 3e-3, "warmup_steps": 5, "block_size": 32, "progress": False,
                              "device": "cpu", "eval_batches": 4})
    assert result.after["val_loss"] < result.before["val_loss"] - 0.5
    assert (result.checkpoint / "model.safetensors").exists()


def test_completion_rows_mask_only_the_completion():
    class Tok:
        eos_id = 0

        def encode(self, text, allowed_special="all"):
            return [ord(c) for c in text]

    rows = completion_rows([("ab", "xyz"), ("", "q")], Tok(), block_size=16)
    assert rows[0] == ([97, 98, 120, 121, 122, 0], 2)
    b = completion_batch(rows, pad_id=0)
    # row 0: inputs a b x y z, targets b x y z EOS; only x y z EOS are the completion
    assert b.idx[0].tolist() == [97, 98, 120, 121, 122]
    assert b.targets[0].tolist() == [98, 120, 121, 122, 0]
    assert b.loss_mask[0].tolist() == [False, True, True, True, True]
    # row 1 (empty prompt): inputs q, target EOS; padding is neither input nor target
    assert b.loss_mask[1].tolist() == [True, False, False, False, False]
    assert b.targets[1, 1:].tolist() == [-100] * 4
    # a too-long prompt loses its oldest tokens, never the completion
    long = completion_rows([("abcdefgh", "xyz")], Tok(), block_size=5)
    assert long[0] == ([103, 104, 120, 121, 122, 0], 2)


def test_completion_loss_is_the_mean_over_completion_tokens_only():
    ws = workspace()
    from gpt2kit.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(ws["tok"])
    model = GPT2.from_pretrained(ws["ckpt"])
    rows = completion_rows([("the cat sees", " the moon today."), ("a dog", " helps the king again.")], tok, 32)
    b = completion_batch(rows, tok.eos_id)
    loss = model(b.idx, targets=b.targets, loss_mask=b.loss_mask).loss
    logits = model(b.idx).logits
    nll = F.cross_entropy(logits.transpose(1, 2), b.targets.clamp(min=0), reduction="none")
    manual = nll[b.loss_mask].mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)
    # changing a prompt target does not change the loss
    t2 = b.targets.clone()
    t2[0, 0] = (t2[0, 0] + 1) % tok.vocab_size
    assert model(b.idx, targets=t2, loss_mask=b.loss_mask).loss.item() == pytest.approx(loss.item(), rel=1e-6)


def test_jsonl_instruction_tuning_lowers_completion_loss(tmp_path):
    ws = workspace()
    lines = []
    for i in range(60):
        s = corpus(1, seed=1000 + i).strip()
        words = s.split()
        lines.append(json.dumps({"prompt": f"Q: {words[0]} {words[1]}\nA:", "completion": " " + s}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    r = finetune_jsonl(ws["ckpt"], tmp_path / "pairs.jsonl", tmp_path / "ft",
                       {"max_steps": 25, "lr": 3e-3, "warmup_steps": 2, "batch_size": 8}, val_fraction=0.2,
                       log=lambda m: None)
    assert r.after["val_loss"] < r.before["val_loss"]
    assert (tmp_path / "ft" / "final" / "model.safetensors").exists()
    assert json.loads((tmp_path / "ft" / "final" / "gpt2kit.json").read_text())["finetune"]["loss"] == "completion only"


def test_cli_refuses_bad_jsonl_quantized_init_and_other_tokenizer(tmp_path, capsys):
    ws = workspace()
    capsys.readouterr()
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n')
    assert main(["finetune", "--init", str(ws["ckpt"]), "--jsonl", str(tmp_path / "bad.jsonl"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:1: expected an object with string fields" in capsys.readouterr().err
    assert main(["quantize", str(ws["ckpt"]), "--bits", "8", "--out", str(tmp_path / "q")]) == 0
    capsys.readouterr()
    assert main(["finetune", "--init", str(tmp_path / "q"), "--data", str(ws["shards_b"]), "--out", str(tmp_path / "o")]) == 2
    assert "quantized" in capsys.readouterr().err
    other = make_tokenizer(tmp_path / "tok2", vocab_size=300)
    GPT2(GPT2.from_pretrained(ws["ckpt"]).config.replace(vocab_size=300, eos_token_id=other.eos_id)).save_pretrained(
        tmp_path / "m2", tokenizer=other)
    assert main(["finetune", "--init", str(tmp_path / "m2"), "--data", str(ws["shards_b"]), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fingerprint mismatch" in err[0]
