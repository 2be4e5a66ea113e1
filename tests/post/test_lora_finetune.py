"""finetune --lora-*: adapters only (base frozen, AdamW state for the adapters alone), checkpoints that are
peft adapter directories, a new domain's val loss goes down, --lora-merge, exact resume, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from post_helpers import corpus, workspace
from safetensors.torch import load_file

from gpt2kit.cli import main

FLAGS = ["--max-steps", "20", "--lr", "3e-3", "--warmup-steps", "5", "--block-size", "32", "--no-progress",
         "--device", "cpu", "--eval-batches", "4"]


def test_lora_finetune_lowers_new_domain_loss_and_writes_a_peft_adapter(tmp_path, capsys):
    ws = workspace()
    out = tmp_path / "ft"
    assert main(["finetune", "--init", str(ws["ckpt"]), "--data", str(ws["shards_b"]), "--out", str(out),
                 "--lora-r", "8", "--lora-alpha", "16", "--lora-targets", "c_attn,c_proj,c_fc", "--lora-merge",
                 "--json", *FLAGS]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["val_loss_after"] < report["val_loss_before"] - 0.3
    ck = out / "step-000020"
    assert (ck / "adapter_config.json").is_file() and not (ck / "model.safetensors").exists()
    cfg = json.loads((ck / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["base_model_name_or_path"] == str(ws["ckpt"])
    tensors = load_file(ck / "adapter_model.safetensors")
    assert len(tensors) == 2 * 2 * 4  # 2 layers x 4 projections x (A, B)
    # the merged checkpoint is base + B @ A * alpha / r, tensor by tensor
    base, merged = load_file(ws["ckpt"] / "model.safetensors"), load_file(out / "merged" / "model.safetensors")
    pre = "base_model.model."
    for name in base:
        stem = name.removesuffix(".weight")
        a = tensors.get(f"{pre}{stem}.lora_A.weight")
        want = base[name] if a is None else base[name] + ((tensors[f"{pre}{stem}.lora_B.weight"] @ a) * 2.0).t()
        torch.testing.assert_close(merged[name], want, atol=1e-6, rtol=0, msg=name)  # Conv1D layout: [in, out]
    assert any(f"{pre}{n.removesuffix('.weight')}.lora_A.weight" in tensors for n in base)


def test_peft_opens_the_finetuned_adapter(tmp_path):
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install 'gpt2kit[lora]')")
    transformers = pytest.importorskip("transformers")
    from gpt2kit.post.finetune import finetune_shards
    from gpt2kit.post.lora import LoraSettings, load_lora_model

    ws = workspace()
    res = finetune_shards(ws["ckpt"], ws["shards_b"], tmp_path / "ft",
                          {"max_steps": 5, "lr": 3e-3, "block_size": 32, "progress": False, "device": "cpu"},
                          lora=LoraSettings(r=4, alpha=8, targets=("c_attn", "c_fc")))
    ours = load_lora_model(res.checkpoint)[0]  # the base from base_model_name_or_path
    hf = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(ws["ckpt"]), res.checkpoint)
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf.eval()(ids).logits, atol=1e-5, rtol=1e-5)


def _lora_trainer(ws, out, resume=False):
    from gpt2kit.post.lora import LoraSettings, LoraTrainer
    from gpt2kit.train.config import build_config

    cfg = build_config(dict(init_from=str(ws["ckpt"]), data=str(ws["shards_b"]), out=str(out), preset="gpt2-tiny",
                            n_ctx=64, block_size=32, batch_size=4, max_steps=8, lr=3e-3, warmup_steps=2,
                            save_every=4, eval_every=0, progress=False, device="cpu", dropout=0.0,
                            attn_dropout=0.0, log_every=10 ** 6))
    return LoraTrainer(cfg, LoraSettings(r=4, alpha=8, dropout=0.1, base=str(ws["ckpt"])), resume=resume,
                       log=lambda m: None)


def test_lora_resume_is_exact_and_optimizer_holds_adapters_only(tmp_path):
    ws = workspace()
    t = _lora_trainer(ws, tmp_path / "full")
    names = {id(p): n for n, p in t.bare.named_parameters()}
    held = [names[id(p)] for g in t.optimizer.param_groups for p in g["params"]]
    assert held and all(".lora_" in n for n in held)
    full = t.fit()
    t.close()
    t = _lora_trainer(ws, tmp_path / "cut")
    t.fit(stop_after=4)
    t.close()
    t = _lora_trainer(ws, tmp_path / "cut", resume=True)
    resumed = t.fit()
    t.close()
    a = load_file(full.last_checkpoint / "adapter_model.safetensors")
    b = load_file(resumed.last_checkpoint / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_lora_on_jsonl_trains_the_completion(tmp_path):
    from gpt2kit.post.finetune import finetune_jsonl
    from gpt2kit.post.lora import LoraSettings

    ws = workspace()
    lines = corpus(120, seed=9).split(". ")
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps({"prompt": s.rsplit(" ", 1)[0], "completion": " " + s.rsplit(" ", 1)[1]}) + "\n"
                         for s in lines if " " in s.strip()))
    res = finetune_jsonl(ws["ckpt"], f, tmp_path / "ft", {"max_steps": 15, "lr": 3e-3, "block_size": 32},
                         lora=LoraSettings(r=4, alpha=8), log=lambda m: None, lora_merge=True)
    assert res.after["val_loss"] < res.before["val_loss"]
    assert (tmp_path / "ft" / "final" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "ft" / "merged" / "model.safetensors").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--lora-alpha", "16"], "go with --lora-r"),
    (["--lora-r", "0"], "at least 1"),
    (["--lora-r", "4", "--lora-targets", "c_attn,wte"], "unknown wte"),
])
def test_bad_lora_flags_are_one_line_errors(tmp_path, capsys, extra, message):
    ws = workspace()
    rc = main(["finetune", "--init", str(ws["ckpt"]), "--data", str(ws["shards_b"]), "--out", str(tmp_path / "x"),
               *extra, *FLAGS])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
