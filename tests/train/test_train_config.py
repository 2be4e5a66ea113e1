"""Config layers (defaults < TOML < flags), unknown keys with suggestions, the resolved TOML."""

from __future__ import annotations

import pytest

from gpt2kit.errors import UserError
from gpt2kit.train.config import build_config, coerce, read_toml, to_toml


def test_toml_sections_and_flat_keys_then_flags_override(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('lr = 1e-3\n[model]\nn_layer = 3\n[data]\nblock_size = 64\n[run]\nmax_steps = 50\n')
    cfg = build_config(read_toml(f), {"max_steps": 7})
    assert cfg.optim.lr == 1e-3 and cfg.model.n_layer == 3 and cfg.data.block_size == 64
    assert cfg.run.max_steps == 7  # the flag wins over the file
    assert cfg.optim.weight_decay == 0.01 and cfg.optim.grad_clip == 1.0  # defaults


def test_resolved_toml_round_trips(tmp_path):
    cfg = build_config({"n_layer": 2, "lr": 2.5e-4, "schedule": "inverse_sqrt", "compile": True, "out": 'a "b"'})
    f = tmp_path / "config.toml"
    f.write_text(to_toml(cfg))
    again = build_config(read_toml(f))
    assert again == cfg


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[optim]\nlearning_rate = 1\n", "did you mean lr"),
        ("n_layers = 2\n", "did you mean n_layer"),
        ("[model]\nblock_size = 2\n", "belongs in [data]"),
        ("[trainer]\nx = 1\n", "unknown section [trainer]"),
        ("max_steps = 'ten'\n", "max_steps expects int"),
        ("schedule = 'linear'\n", "schedule must be one of cosine, inverse_sqrt, constant"),
        ("lr = \n", "not valid TOML"),
    ],
)
def test_bad_toml_is_one_clear_line(tmp_path, text, expected):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(UserError) as e:
        read_toml(f)
    assert expected in str(e.value) and str(f) in str(e.value)
    assert "\n" not in str(e.value)


def test_value_checks():
    assert coerce("compile", "yes", "--compile") is True
    assert coerce("max_steps", "2e3", "--max-steps") == 2000
    assert coerce("n_layer", "none", "--n-layer") is None
    with pytest.raises(UserError, match="--lr: lr expects float"):
        coerce("lr", "fast", "--lr")
    for bad in ({"batch_size": 0}, {"lr": -1.0}, {"dropout": 1.5}, {"min_lr": 1.0, "lr": 1e-3}):
        with pytest.raises(UserError):
            build_config(bad)
