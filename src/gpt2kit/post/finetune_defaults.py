"""Fine-tuning defaults, importable without torch (the CLI shows them in --help)."""

DEFAULTS = {"lr": 1e-4, "warmup_steps": 20, "max_steps": 200, "block_size": 256, "batch_size": 8}
