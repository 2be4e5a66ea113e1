"""Training: configs, AdamW + schedules, the loop, checkpoints with exact resume, torchrun (see docs/train.md).

- `config`: `TrainConfig` (model, data, optim, run sections), `build_config`, TOML + `--key value` overrides.
- `optim`: `param_groups`, `build_optimizer`, `cosine_lr` / `inverse_sqrt_lr` / `constant_lr`, `lr_at`.
- `trainer`: `Trainer`, `train`, `TrainResult`, `forward_backward`, `evaluate`.
- `checkpoint`: step directories, `latest`, `best/`, sound-checkpoint detection for `--resume`.
- `distributed`: DDP / FSDP2 / ZeRO-1 under torchrun.
- `main_job`: `gpt2kit train` with no arguments.

Names are re-exported lazily, so importing the package (e.g. for the CLI's --help) does not import torch.
"""

from __future__ import annotations

from .._lazy import lazy_getattr

_EXPORTS = {
    "TrainConfig": "config",
    "build_config": "config",
    "read_toml": "config",
    "param_groups": "optim",
    "build_optimizer": "optim",
    "lr_at": "optim",
    "Trainer": "trainer",
    "TrainResult": "trainer",
    "train": "trainer",
    "evaluate": "trainer",
    "forward_backward": "trainer",
    "resolve_config": "trainer",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
