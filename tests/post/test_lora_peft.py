"""LoRA in peft's format, proven by peft itself: our adapters load into peft with our logits, peft's adapters
load into gpt2kit with peft's logits, and `gpt2kit lora merge` equals peft's merge_and_unload."""

from __future__ import annotations

import json

import pytest
import torch

from gpt2kit.errors import UserError

peft = pytest.importorskip("peft", reason="peft is not installed (pip install 'gpt2kit[lora]')")
transformers = pytest.importorskip("transformers")


def _tiny_base(tmp_path):
    from gpt2kit.model import GPT2, GPT2Config

    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=300, n_ctx=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0, attn_dropout=0.0,
                           eos_token_id=299))
    base = tmp_path / "base"
    model.save_pretrained(base)
    return base


def _ids():
    return torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(3))


def _hf(base):
    return transformers.GPT2LMHeadModel.from_pretrained(base).eval()


def _our_adapter(base, out, targets=("c_attn", "c_proj", "c_fc"), use_rslora=False):
    from gpt2kit.model import GPT2
    from gpt2kit.post.lora import LoraSettings, inject_lora, lora_modules, save_adapter

    model = GPT2.from_pretrained(base)
    settings = LoraSettings(r=4, alpha=8.0, targets=targets, use_rslora=use_rslora, base=str(base))
    inject_lora(model, settings)
    g = torch.Generator().manual_seed(1)
    for m in lora_modules(model).values():  # B starts at zero; make the update visible
        m.lora_B.weight.data = torch.randn(m.lora_B.weight.shape, generator=g) * 0.1
    out.mkdir()
    save_adapter(model, settings, out)
    return model.eval()


def test_our_adapter_loads_in_peft_with_our_logits(tmp_path):
    base = _tiny_base(tmp_path)
    ours = _our_adapter(base, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["fan_in_fan_out"] is True and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["target_modules"] == ["c_attn", "c_fc", "c_proj"]
    pm = peft.PeftModel.from_pretrained(_hf(base), tmp_path / "ad").eval()
    ids = _ids()
    with torch.no_grad():
        want = pm(ids).logits
        plain = _hf(base)(ids).logits
        got = ours(ids).logits
    assert (want - plain).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_rslora_scaling_matches_peft(tmp_path):
    base = _tiny_base(tmp_path)
    ours = _our_adapter(base, tmp_path / "ad", targets=("c_attn",), use_rslora=True)
    pm = peft.PeftModel.from_pretrained(_hf(base), tmp_path / "ad").eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, pm(ids).logits, atol=1e-5, rtol=1e-5)


def _peft_adapter(base, out):
    torch.manual_seed(5)
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                          task_type="CAUSAL_LM", init_lora_weights=False)  # B random too: a non-trivial adapter
    pm = peft.get_peft_model(_hf(base), cfg).eval()
    pm.save_pretrained(out)
    return pm


def test_peft_adapter_loads_in_gpt2kit(tmp_path):
    from gpt2kit.post.lora import load_lora_model

    base = _tiny_base(tmp_path)
    pm = _peft_adapter(base, tmp_path / "peft_ad")
    ours, settings = load_lora_model(tmp_path / "peft_ad", base=base)
    assert settings.r == 4 and settings.scaling == 4.0
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, pm(ids).logits, atol=1e-5, rtol=1e-5)


def test_merge_cli_equals_peft_merge_and_unload(tmp_path, capsys):
    from safetensors.torch import load_file

    from gpt2kit.cli import main

    base = _tiny_base(tmp_path)
    pm = _peft_adapter(base, tmp_path / "peft_ad")
    assert main(["lora", "merge", str(tmp_path / "peft_ad"), "--base", str(base), "--out", str(tmp_path / "m")]) == 0
    merged_hf = pm.merge_and_unload().state_dict()
    ours = load_file(tmp_path / "m" / "model.safetensors")
    base_w = load_file(base / "model.safetensors")
    name = "transformer.h.1.mlp.c_fc.weight"
    assert (ours[name] - base_w[name]).abs().max() > 1e-3
    for k, v in ours.items():
        torch.testing.assert_close(v, merged_hf[k], atol=1e-6, rtol=1e-6, msg=k)
    # a plain checkpoint: transformers opens it and gives the adapter's logits
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(_hf(tmp_path / "m")(ids).logits, pm(ids).logits, atol=1e-5, rtol=1e-5)


def test_base_is_frozen_and_not_copied(tmp_path):
    from gpt2kit.model import GPT2
    from gpt2kit.post.lora import LoraSettings, inject_lora

    model = GPT2.from_pretrained(_tiny_base(tmp_path))
    w = model.transformer.h[0].attn.c_attn.weight
    inject_lora(model, LoraSettings(r=2, alpha=4, targets=("c_attn", "c_proj")))
    assert model.transformer.h[0].attn.c_attn.weight is w  # the same Parameter, no copy
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert len(trainable) == 2 * 2 * 3  # 2 layers x (c_attn, attn.c_proj, mlp.c_proj) x (A, B)


def test_unsupported_adapter_configs_are_one_line_errors(tmp_path):
    from gpt2kit.post.lora import load_lora_model, parse_targets

    base = _tiny_base(tmp_path)
    _peft_adapter(base, tmp_path / "ad")
    p = tmp_path / "ad" / "adapter_config.json"
    cfg = json.loads(p.read_text())
    p.write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(UserError, match="use_dora"):
        load_lora_model(tmp_path / "ad", base=base)
    with pytest.raises(UserError, match="unknown q_proj"):
        parse_targets("c_attn,q_proj")
    with pytest.raises(UserError, match="not a LoRA adapter"):
        load_lora_model(base, base=base)
