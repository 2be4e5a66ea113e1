"""GPT2Config: presets, validation, and the config.json mapping."""

from __future__ import annotations

import pytest
import torch

from gpt2kit import GPT2, GPT2Config, UserError
from gpt2kit.model import PRESETS

# (n_layer, n_head, n_embd, parameter count with the tied head counted once)
OPENAI_SIZES = {
    "gpt2": (12, 12, 768, 124_439_808),
    "gpt2-medium": (24, 16, 1024, 354_823_168),
    "gpt2-large": (36, 20, 1280, 774_030_080),
    "gpt2-xl": (48, 25, 1600, 1_557_611_200),
}


@pytest.mark.parametrize("name", list(OPENAI_SIZES))
def test_openai_presets_have_the_published_parameter_counts(name):
    n_layer, n_head, n_embd, n_params = OPENAI_SIZES[name]
    config = GPT2Config.from_preset(name)
    assert (config.n_layer, config.n_head, config.n_embd) == (n_layer, n_head, n_embd)
    assert (config.vocab_size, config.n_ctx, config.eos_token_id) == (50257, 1024, 50256)
    with torch.device("meta"):  # count without allocating gigabytes
        model = GPT2(config)
    assert model.num_params() == n_params
    assert model.num_params(non_embedding=True) == n_params - (50257 + 1024) * n_embd


def test_cpu_presets():
    shapes = {n: (c.n_layer, c.n_head, c.n_embd) for n, c in PRESETS.items()}
    assert shapes["gpt2-tiny"] == (2, 2, 64)
    assert shapes["gpt2-mini"] == (4, 4, 128)
    assert shapes["gpt2-small-cpu"] == (6, 6, 384)
    assert GPT2Config.from_preset("gpt2-tiny").head_dim == 32


def test_defaults_match_gpt2():
    c = GPT2Config()
    assert (c.dropout, c.attn_dropout, c.layer_norm_epsilon) == (0.1, 0.1, 1e-5)
    assert c.bos_token_id == c.eos_token_id == 50256


def test_overrides_and_presets_are_not_shared():
    c = GPT2Config.from_preset("gpt2", dropout=0.0, n_ctx=256)
    assert (c.dropout, c.n_ctx, c.n_layer) == (0.0, 256, 12)
    assert PRESETS["gpt2"].dropout == 0.1


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(n_embd=100, n_head=3), "divisible by n_head"),
        (dict(n_layer=0), "n_layer"),
        (dict(vocab_size=1.5), "vocab_size"),
        (dict(dropout=1.0), "dropout"),
        (dict(attn_dropout=-0.1), "attn_dropout"),
        (dict(layer_norm_epsilon=0), "layer_norm_epsilon"),
        (dict(vocab_size=100), "eos_token_id"),
    ],
)
def test_invalid_configs_raise_a_clear_error(kwargs, words):
    with pytest.raises(UserError, match=words):
        GPT2Config(**kwargs)
    with pytest.raises(ValueError):  # also a ValueError for Python callers
        GPT2Config(**kwargs)


def test_unknown_preset_and_field():
    with pytest.raises(UserError, match="unknown model preset 'gpt3'.*gpt2-tiny"):
        GPT2Config.from_preset("gpt3")
    with pytest.raises(UserError, match="n_embed"):
        GPT2Config.from_preset("gpt2", n_embed=10)


def test_hf_dict_round_trip_and_transformers_reads_it():
    transformers = pytest.importorskip("transformers")
    c = GPT2Config.from_preset("gpt2-mini", vocab_size=1000, eos_token_id=3, n_ctx=128, dropout=0.05,
                               attn_dropout=0.2, layer_norm_epsilon=1e-6)
    d = c.to_hf_dict()
    assert GPT2Config.from_hf_dict(d) == c
    hf = transformers.GPT2Config(**d)
    assert (hf.n_positions, hf.n_embd, hf.n_layer, hf.n_head, hf.vocab_size) == (128, 128, 4, 4, 1000)
    assert (hf.resid_pdrop, hf.embd_pdrop, hf.attn_pdrop, hf.layer_norm_epsilon) == (0.05, 0.05, 0.2, 1e-6)
    assert (hf.bos_token_id, hf.eos_token_id, hf.activation_function) == (3, 3, "gelu_new")
    # and back from what transformers writes
    assert GPT2Config.from_hf_dict(hf.to_dict()) == c


@pytest.mark.parametrize(
    "change, words",
    [
        ({"model_type": "llama"}, "model_type"),
        ({"activation_function": "relu"}, "activation_function"),
        ({"n_inner": 100}, "n_inner"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"n_embd": 65}, "divisible"),
    ],
)
def test_unsupported_hf_configs_are_refused(change, words):
    d = GPT2Config.from_preset("gpt2-tiny").to_hf_dict() | change
    with pytest.raises(UserError, match=words):
        GPT2Config.from_hf_dict(d, source="x/config.json")
