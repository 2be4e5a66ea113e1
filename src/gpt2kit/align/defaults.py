"""Training defaults of the alignment commands, importable without torch (the CLI shows them in --help)."""

ALIGN_DEFAULTS = {"lr": 5e-5, "warmup_steps": 10, "max_steps": 100, "batch_size": 8, "block_size": 256,
                  "schedule": "cosine", "min_lr": 0.0, "weight_decay": 0.0, "grad_clip": 1.0, "seed": 1337,
                  "threads": 0}
# the trainer flags (post.common.TRAIN_FLAGS) these commands take
ALIGN_FLAGS = ("lr", "max_steps", "warmup_steps", "schedule", "min_lr", "weight_decay", "batch_size", "block_size",
               "seed", "threads")
