"""Checkpoint directories: bitwise round trip, transformers opens ours, we open HF's, bad files refused."""

from __future__ import annotations

import json

import pytest
import torch

from gpt2kit import GPT2, GPT2Config, UserError
from gpt2kit.model import check_tokenizer_fits
from gpt2kit.model.hf import to_hf_state_dict


def tiny_model(seed=0, **kw) -> GPT2:
    torch.manual_seed(seed)
    config = GPT2Config(**(dict(n_layer=2, n_head=2, n_embd=32, vocab_size=211, n_ctx=64, eos_token_id=210) | kw))
    return GPT2(config).eval()


IDX = torch.randint(0, 211, (2, 33), generator=torch.Generator().manual_seed(0))


def test_save_load_round_trip_is_bitwise(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "ckpt", extra={"training": {"steps": 3}})
    loaded = GPT2.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name
    with torch.no_grad():
        assert torch.equal(model(IDX).logits, loaded(IDX).logits)
    meta = json.loads((tmp_path / "ckpt" / "gpt2kit.json").read_text())
    assert meta["training"] == {"steps": 3} and meta["format"] == 1


def test_directory_layout_is_hugging_face(tmp_path):
    from safetensors import safe_open

    model = tiny_model()
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
    assert (cfg["n_positions"], cfg["n_embd"], cfg["vocab_size"], cfg["eos_token_id"]) == (64, 32, 211, 210)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
        assert "lm_head.weight" not in keys  # tied: stored once
        assert f.get_tensor("transformer.h.0.attn.c_attn.weight").shape == (32, 96)  # Conv1D: in x out
        assert f.get_tensor("transformer.h.1.mlp.c_proj.weight").shape == (128, 32)
    assert keys == set(to_hf_state_dict(model))


def test_transformers_opens_our_directory_with_equal_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_model(seed=1)
    model.save_pretrained(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert (hf(IDX).logits - model(IDX).logits).abs().max().item() <= 1e-5


def test_we_open_a_transformers_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**tiny_model().config.to_hf_dict())).eval()
    hf.save_pretrained(tmp_path)
    ours = GPT2.from_pretrained(tmp_path)
    with torch.no_grad():
        assert (hf(IDX).logits - ours(IDX).logits).abs().max().item() <= 1e-5


def write_legacy_bin(model: GPT2, path, prefix: str, with_buffers: bool, with_head: bool):
    """A pytorch_model.bin as OpenAI-converted checkpoints on the Hub have it: no `transformer.` prefix,
    the causal-mask buffers included, and sometimes the (tied) head."""
    (path / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    sd = {}
    for name, t in to_hf_state_dict(model).items():
        sd[prefix + name.removeprefix("transformer.")] = t
    if with_buffers:
        n = model.config.n_ctx
        for i in range(model.config.n_layer):
            sd[f"{prefix}h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
            sd[f"{prefix}h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    if with_head:
        sd["lm_head.weight"] = model.transformer.wte.weight.detach().clone()
    torch.save(sd, path / "pytorch_model.bin")


@pytest.mark.parametrize("prefix, with_buffers, with_head", [("", True, False), ("transformer.", False, True)])
def test_pytorch_model_bin_with_and_without_prefix(tmp_path, prefix, with_buffers, with_head):
    model = tiny_model(seed=3)
    write_legacy_bin(model, tmp_path, prefix, with_buffers, with_head)
    loaded = GPT2.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(IDX).logits, model(IDX).logits)


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('code ran')",))

    model = tiny_model()
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    torch.save({"transformer.wte.weight": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="pytorch_model.bin: refused to load"):
        GPT2.from_pretrained(tmp_path)
    assert not marker.exists()


def test_missing_extra_and_misshaped_tensors_are_named(tmp_path):
    from safetensors.torch import save_file

    model = tiny_model()
    model.save_pretrained(tmp_path)
    good = to_hf_state_dict(model)

    def attempt(sd):
        save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
        GPT2.from_pretrained(tmp_path)

    with pytest.raises(UserError, match=r"missing tensor 'transformer.h.1.ln_2.bias'"):
        attempt({k: v for k, v in good.items() if k != "transformer.h.1.ln_2.bias"})
    with pytest.raises(UserError, match=r"unexpected tensor 'transformer.h.2.ln_1.weight'"):
        attempt(good | {"transformer.h.2.ln_1.weight": torch.ones(32)})
    with pytest.raises(UserError, match=r"'transformer.wpe.weight' has shape \[65, 32\], expected \[64, 32\]"):
        attempt(good | {"transformer.wpe.weight": torch.zeros(65, 32)})
    with pytest.raises(UserError, match=r"'transformer.h.0.mlp.c_fc.weight' has shape \[128, 32\], expected \[32, 128\]"):
        attempt(good | {"transformer.h.0.mlp.c_fc.weight": torch.zeros(128, 32)})  # Linear layout, not Conv1D
    with pytest.raises(UserError, match="lm_head.weight.*tied"):
        attempt(good | {"lm_head.weight": torch.zeros(211, 32)})


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_names_the_file(tmp_path, damage):
    tiny_model().save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 10)
    with pytest.raises(UserError, match="model.safetensors: not a readable safetensors file"):
        GPT2.from_pretrained(tmp_path)


def test_missing_pieces(tmp_path):
    with pytest.raises(UserError, match="model directory not found"):
        GPT2.from_pretrained(tmp_path / "nope")
    with pytest.raises(UserError, match="model config not found"):
        GPT2.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(tiny_model().config.to_hf_dict()))
    with pytest.raises(UserError, match="no weights"):
        GPT2.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        GPT2.from_pretrained(tmp_path)


def test_dtype_and_device_arguments(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    half = GPT2.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cpu")
    assert half.dtype == torch.bfloat16 and half.lm_head.weight is half.transformer.wte.weight
    assert torch.equal(half.transformer.wpe.weight, model.transformer.wpe.weight.to(torch.bfloat16))
    half.save_pretrained(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert GPT2.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16


def test_quantized_checkpoints_are_delegated(tmp_path, monkeypatch):
    calls = []
    import gpt2kit.model.pretrained as pretrained

    monkeypatch.setattr(pretrained, "load_quantized",
                        lambda path, device=None, dtype=None, model_class=None: calls.append((path, device, dtype)) or "q")
    (tmp_path / "gpt2kit.json").write_text(json.dumps({"quantization": {"bits": 8}}))
    assert GPT2.from_pretrained(tmp_path, device="cpu") == "q"
    assert calls == [(tmp_path, "cpu", None)]


class FakeTokenizer:
    def __init__(self, vocab_size, eos_id):
        self.vocab_size, self.eos_id, self.saved_to = vocab_size, eos_id, None

    def save(self, path):
        self.saved_to = path
        (path / "vocab.json").write_text("{}")


def test_tokenizer_must_fit_the_model(tmp_path):
    model = tiny_model()
    with pytest.raises(UserError, match="tokenizer has 300 tokens but the model's vocab_size is 211"):
        check_tokenizer_fits(model.config, FakeTokenizer(300, 210))
    with pytest.raises(UserError, match="end-of-text id is 5 but the model's eos_token_id is 210"):
        model.save_pretrained(tmp_path / "a", tokenizer=FakeTokenizer(211, 5))
    assert not (tmp_path / "a").exists()  # refused before anything was written
    tok = FakeTokenizer(200, 210)
    model.save_pretrained(tmp_path / "b", tokenizer=tok)
    assert tok.saved_to == tmp_path / "b" and (tmp_path / "b" / "vocab.json").exists()


def test_real_tokenizer_files_open_with_transformers(tmp_path, gpt2_files_dir):
    from gpt2kit.tokenizer import Tokenizer

    transformers = pytest.importorskip("transformers")
    tok = Tokenizer.from_pretrained(gpt2_files_dir)
    torch.manual_seed(0)
    model = GPT2(GPT2Config.from_preset("gpt2-tiny", n_ctx=32))
    model.save_pretrained(tmp_path, tokenizer=tok)
    hf_tok = transformers.GPT2TokenizerFast.from_pretrained(tmp_path)
    assert hf_tok.encode("Hello world") == tok.encode_ordinary("Hello world")
    assert GPT2.from_pretrained(tmp_path).config == model.config
