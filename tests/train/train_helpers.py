"""Helpers for the training tests: tiny synthetic shards and tiny configs (imported by test_train_*.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

VOCAB = 64
EOS = 0


def _documents(n_tokens: int, rng: np.random.Generator) -> np.ndarray:
    """Documents that count upwards (mod V-1) from a random start, each followed by EOS: learnable."""
    out: list[int] = []
    while len(out) < n_tokens:
        length = int(rng.integers(10, 60))
        start = int(rng.integers(1, VOCAB))
        out += [(start + i) % (VOCAB - 1) + 1 for i in range(length)] + [EOS]
    return np.array(out, dtype=np.uint16)


def write_shards(directory: Path, train_tokens: int = 12000, val_tokens: int = 2000, seed: int = 0) -> Path:
    """A shard directory in the format of `gpt2kit data prepare` (no tokenizer directory)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits = {}
    for name, n in (("train", train_tokens), ("val", val_tokens)):
        tokens = _documents(n, rng)
        tokens.tofile(directory / f"{name}.bin")
        # pretend every token spells 3 characters / 3 bytes, so bpc = bits per token / 3
        splits[name] = {"documents": int((tokens == EOS).sum()), "tokens": int(len(tokens)),
                        "characters": 3 * len(tokens), "bytes": 3 * len(tokens)}
    meta = {"format": 1, "dtype": "uint16", "vocab_size": VOCAB, "eos_id": EOS,
            "tokenizer_fingerprint": "synthetic", "tokenizer": "", "splits": splits}
    (directory / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return directory


def tiny_flags(data: Path, out: Path, **over) -> dict:
    """Flat config keys of a tiny, fast run (the same keys as `gpt2kit train` flags)."""
    flags = {
        "data": str(data), "out": str(out), "preset": "gpt2-tiny", "n_layer": 2, "n_head": 2, "n_embd": 32,
        "n_ctx": 64, "block_size": 32, "batch_size": 4, "max_steps": 12, "eval_every": 4, "save_every": 4,
        "log_every": 1, "seed": 3, "device": "cpu", "lr": 3e-3, "warmup_steps": 3, "dropout": 0.1,
        "attn_dropout": 0.1, "progress": False, "threads": 1, "eval_batches": 4,
    }
    flags.update(over)
    return flags


def params_of(run_step_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(run_step_dir) / "model.safetensors"))


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs: max abs diff {(a[k] - b[k]).abs().max().item()}"


def cli_main(argv: list[str]) -> int:
    """`gpt2kit <argv>` with only the train command registered: the same parser class, the same error
    handling as gpt2kit.cli.main, so these tests do not depend on the other commands importing cleanly."""
    import sys

    from gpt2kit.cli import _Parser
    from gpt2kit.commands import train as train_cmd
    from gpt2kit.errors import UserError

    parser = _Parser(prog="gpt2kit")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    p = sub.add_parser("train")
    train_cmd.add_arguments(p)
    args = parser.parse_args(argv)
    try:
        return int(train_cmd.run(args) or 0)
    except UserError as e:
        print(f"gpt2kit train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    import sys

    sys.exit(cli_main(sys.argv[1:]))


def run_training(flags: dict, resume: bool = False, stop_after: int | None = None, hook=None):
    """Train with `flags` (or resume the run in flags['out']); `hook` is a forward hook on the bare model."""
    from gpt2kit.train.config import build_config
    from gpt2kit.train.trainer import Trainer, resolve_config

    cfg = resolve_config(flags, resume=True) if resume else build_config(flags)
    trainer = Trainer(cfg, resume=resume)
    if hook is not None:
        trainer.bare.register_forward_hook(hook)
    try:
        return trainer.fit(stop_after=stop_after)
    finally:
        trainer.close()
