"""Training configuration: four dataclasses, a TOML file, and `--key value` overrides.

Precedence, lowest first: dataclass defaults < the model preset < the TOML file (or, on `--resume`, the
run's own `config.toml`) < flags given on the command line. Every key name is unique across the four
sections, so a flag `--n-layer 4`, a top-level TOML key `n_layer = 4` and `[model] n_layer = 4` all mean
the same thing. An unknown key is an error that names the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib

from ..errors import UserError


@dataclass
class ModelCfg:
    """The network. `None` means: take it from the preset (or, for vocab_size, from the shards' meta.json)."""

    preset: str = "gpt2-mini"
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    n_ctx: int | None = None
    vocab_size: int | None = None
    dropout: float | None = None
    attn_dropout: float | None = None
    grad_checkpointing: bool = False
    init_from: str = ""  # a checkpoint directory to start from instead of random weights
    # variants (not GPT-2; model/config.py): attention pattern, Mixture-of-Experts, shared layers
    attention: str = "dense"
    attention_layers: str = ""  # comma-separated per-layer patterns, e.g. "sliding,sliding,sliding,dense"
    window: int | None = None
    block: int | None = None  # fixed attention: local block length
    moe_experts: int = 0
    moe_top_k: int | None = None
    moe_every: int | None = None
    moe_first_layer: int | None = None
    moe_capacity_factor: float | None = None
    moe_eval_capacity_factor: float | None = None
    moe_dropless: bool = False
    moe_aux_loss_coef: float | None = None
    moe_z_loss_coef: float | None = None
    moe_expert_hidden: int | None = None
    share_layers: str = "none"


@dataclass
class DataCfg:
    data: str = ""  # directory with train.bin / val.bin / meta.json
    block_size: int = 256  # tokens per training row (the longest, when seq_len sampling is on)
    batch_size: int = 8  # rows per micro-batch (per process under torchrun)
    mode: str = "packed"  # packed | padded
    seq_len: str = ""  # dynamic lengths, e.g. "uniform:64:256" or "choice:64,128,256" (empty: fixed)
    eval_batch_size: int = 0  # 0: same as batch_size
    eval_batches: int = 0  # cap on validation batches per evaluation (0: the whole split)


@dataclass
class OptimCfg:
    optimizer: str = "adamw"  # adamw | muon (Muon on the hidden matrices, AdamW on the rest: train/muon.py)
    lr: float = 6e-4  # peak learning rate
    schedule: str = "cosine"  # cosine | inverse_sqrt | constant
    warmup_steps: int = 100
    min_lr: float = 0.0  # floor of the cosine schedule (absolute)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.01  # on 2-D weight matrices only
    grad_clip: float = 1.0  # max global gradient norm (0: off)
    grad_accum: int = 1  # micro-batches per optimizer step


@dataclass
class RunCfg:
    out: str = ""  # run directory
    max_steps: int = 1000
    eval_every: int = 200  # 0: only at the end
    save_every: int = 200  # 0: only at the end
    keep_last: int = 3  # step checkpoints kept (best/ is kept apart)
    log_every: int = 10
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "fp32"  # fp32 | bf16 | fp16 (fp16 on CUDA only, with a gradient scaler)
    compile: bool = False
    strategy: str = "ddp"  # ddp | fsdp | zero1 (used under torchrun)
    reshard_after_forward: bool = True  # fsdp: ZeRO-3 (True) or ZeRO-2 style (False)
    max_bad_steps: int = 5  # non-finite losses in a row that stop the run
    time_limit: float = 0.0  # seconds of training (0: none); max_steps is lowered to fit, early in the run
    tensorboard: bool = False
    progress: bool = True
    threads: int = 0  # torch CPU threads (0: torch's default)
    expert_parallel: bool = False  # under torchrun: MoE experts sharded over ranks (all-to-all dispatch)


@dataclass
class TrainConfig:
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    run: RunCfg = field(default_factory=RunCfg)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {"model": ModelCfg, "data": DataCfg, "optim": OptimCfg, "run": RunCfg}

CHOICES: dict[str, tuple[str, ...]] = {
    "mode": ("packed", "padded"),
    "schedule": ("cosine", "inverse_sqrt", "constant"),
    "optimizer": ("adamw", "muon"),
    "dtype": ("fp32", "bf16", "fp16"),
    "strategy": ("ddp", "fsdp", "zero1"),
    "attention": ("dense", "sliding", "fixed", "linear"),
    "share_layers": ("none", "all", "pairs"),
}


HELP: dict[str, str] = {
    "preset": "model preset: gpt2, gpt2-medium, gpt2-large, gpt2-xl, gpt2-tiny, gpt2-mini, gpt2-small-cpu",
    "n_layer": "transformer blocks", "n_head": "attention heads", "n_embd": "model width",
    "n_ctx": "context length (learned positions); >= block size; from scratch it defaults to the block size", "vocab_size": "at least the shards' vocabulary",
    "dropout": "dropout on embeddings, residual and FFN outputs", "attn_dropout": "dropout on attention weights",
    "grad_checkpointing": "recompute each block in backward: less memory, ~1/3 more compute",
    "init_from": "start from this checkpoint directory instead of random weights",
    "data": "shard directory from `gpt2kit data prepare`", "block_size": "tokens per training row",
    "batch_size": "rows per micro-batch (per process under torchrun)", "mode": "packed or padded rows",
    "seq_len": "dynamic lengths: uniform:64,128,256 | uniform:128@1,256@3 | schedule:0=128,1000=256",
    "eval_batch_size": "validation batch size (0: --batch-size)",
    "eval_batches": "validation batches per evaluation (0: the whole split)",
    "optimizer": "adamw, or muon (Muon on hidden matrices, AdamW on embeddings/biases/LayerNorms; one lr)",
    "lr": "peak learning rate", "schedule": "cosine | inverse_sqrt | constant",
    "warmup_steps": "linear warm-up steps", "min_lr": "floor of the cosine schedule",
    "beta1": "AdamW beta1", "beta2": "AdamW beta2", "eps": "AdamW epsilon",
    "weight_decay": "AdamW decay on 2-D weight matrices only", "grad_clip": "max global gradient norm (0: off)",
    "grad_accum": "micro-batches per optimizer step", "out": "run directory",
    "max_steps": "optimizer steps", "eval_every": "evaluate every N steps (0: at the end)",
    "save_every": "checkpoint every N steps (0: at the end)", "keep_last": "step checkpoints kept",
    "log_every": "metrics.jsonl row every N steps", "seed": "random seed (weights, data order, dropout)",
    "device": "auto | cpu | cuda | cuda:N | mps", "dtype": "fp32 | bf16 (autocast) | fp16 (CUDA, grad scaler)",
    "compile": "torch.compile the model", "strategy": "under torchrun: ddp | fsdp | zero1",
    "reshard_after_forward": "fsdp: free gathered parameters after forward (ZeRO-3) or keep them (ZeRO-2)",
    "max_bad_steps": "non-finite steps in a row that stop the run",
    "time_limit": "seconds of training: max_steps is lowered early to fit (0: off)",
    "tensorboard": "also write TensorBoard events (if installed)", "progress": "show the progress bar",
    "threads": "torch CPU threads (0: default)",
    "attention": "attention pattern: dense (GPT-2) | sliding | fixed | linear",
    "attention_layers": "per-layer patterns, comma-separated (e.g. sliding,sliding,sliding,dense)",
    "window": "sliding attention: keys each query sees, itself included (default 256)",
    "block": "fixed attention: local block length (default 128)",
    "moe_experts": "Mixture-of-Experts: experts per MoE block (0: dense FFN)",
    "moe_top_k": "experts per token (1: Switch, 2: Mixtral)", "moe_every": "every n-th block is MoE",
    "moe_first_layer": "blocks before this one keep a dense FFN (default 0)",
    "moe_capacity_factor": "expert capacity factor in training", "moe_eval_capacity_factor": "... in evaluation",
    "moe_dropless": "no expert capacity limit", "moe_aux_loss_coef": "load-balancing loss alpha (default 0.01)",
    "moe_z_loss_coef": "router z-loss coefficient (default 1e-3)",
    "moe_expert_hidden": "hidden width of each expert (default 4 * n_embd)",
    "share_layers": "cross-layer weight sharing: none | all (ALBERT) | pairs (MobileLLM-LS)",
    "expert_parallel": "under torchrun: shard MoE experts over ranks (all-to-all)",
}


def _key_index() -> dict[str, tuple[str, dataclasses.Field]]:
    """Every key name -> (section, field). Names are unique across sections by construction."""
    index: dict[str, tuple[str, dataclasses.Field]] = {}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            assert f.name not in index, f"duplicate config key {f.name}"
            index[f.name] = (section, f)
    return index


KEYS = _key_index()


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


# names other trainers use for our keys: a closer hint than spelling similarity gives
ALIASES = {
    "learning_rate": "lr", "max_lr": "lr", "lr_schedule": "schedule", "scheduler": "schedule",
    "warmup": "warmup_steps", "warmup_iters": "warmup_steps", "max_iters": "max_steps", "steps": "max_steps",
    "iters": "max_steps", "eval_interval": "eval_every", "save_interval": "save_every",
    "log_interval": "log_every", "gradient_accumulation_steps": "grad_accum", "accumulate": "grad_accum",
    "context_length": "block_size", "seq_length": "block_size", "ctx": "n_ctx", "n_positions": "n_ctx",
    "layers": "n_layer", "heads": "n_head", "d_model": "n_embd", "hidden_size": "n_embd",
    "precision": "dtype", "data_dir": "data", "out_dir": "out", "output": "out", "model": "preset",
}


def suggest_key(name: str) -> str:
    """' (did you mean X?)' for the nearest valid key, or ''."""
    key = name.lstrip("-").replace("-", "_")
    if key in ALIASES:
        return f" (did you mean {ALIASES[key]}?)"
    near = difflib.get_close_matches(key, list(KEYS), n=1, cutoff=0.5)
    return f" (did you mean {near[0]}?)" if near else ""


def field_type(f: dataclasses.Field) -> type:
    t = str(f.type)
    if "bool" in t:
        return bool
    if "int" in t:
        return int
    if "float" in t:
        return float
    return str


def coerce(key: str, value: Any, where: str) -> Any:
    """Check/convert one value to the type of `key`; `where` names the source in errors."""
    _, f = KEYS[key]
    typ = field_type(f)
    optional = "None" in str(f.type)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "")):
        if optional:
            return None
        raise UserError(f"{where}: {key} needs a value")
    try:
        if typ is bool:
            if isinstance(value, bool):
                out: Any = value
            elif isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
                out = True
            elif isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
                out = False
            else:
                raise ValueError
        elif typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            out = int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        elif typ is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
        else:
            if not isinstance(value, str):
                raise ValueError
            out = value
    except (TypeError, ValueError):
        raise UserError(f"{where}: {key} expects {typ.__name__}, got {value!r}") from None
    if key in CHOICES and out not in CHOICES[key]:
        raise UserError(f"{where}: {key} must be one of {', '.join(CHOICES[key])}, got {out!r}")
    return out


def flatten_toml(doc: dict[str, Any], where: str) -> dict[str, Any]:
    """TOML document (sections or top-level keys) -> {key: value}, rejecting unknown keys."""
    flat: dict[str, Any] = {}
    for k, v in doc.items():
        if isinstance(v, dict):
            if k not in SECTIONS:
                raise UserError(f"{where}: unknown section [{k}] (expected one of {', '.join(SECTIONS)})")
            for kk, vv in v.items():
                if kk not in KEYS:
                    raise UserError(f"{where}: unknown key {k}.{kk}{suggest_key(kk)}")
                if KEYS[kk][0] != k:
                    raise UserError(f"{where}: key {kk} belongs in [{KEYS[kk][0]}], not [{k}]")
                flat[kk] = coerce(kk, vv, where)
        else:
            if k not in KEYS:
                raise UserError(f"{where}: unknown key {k}{suggest_key(k)}")
            flat[k] = coerce(k, v, where)
    return flat


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file is not valid TOML: {path}: {e}") from None
    return flatten_toml(doc, str(path))


def build_config(*layers: dict[str, Any]) -> TrainConfig:
    """Apply flat {key: value} layers, lowest precedence first, onto the defaults."""
    cfg = TrainConfig()
    for layer in layers:
        for k, v in layer.items():
            if k not in KEYS:
                raise UserError(f"unknown config key {k}{suggest_key(k)}")
            section, _ = KEYS[k]
            setattr(getattr(cfg, section), k, v)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Checks that need no files; the shapes against the data and preset are checked in the trainer."""
    positive = {
        "block_size": cfg.data.block_size,
        "batch_size": cfg.data.batch_size,
        "grad_accum": cfg.optim.grad_accum,
        "max_steps": cfg.run.max_steps,
        "log_every": cfg.run.log_every,
        "keep_last": cfg.run.keep_last,
        "max_bad_steps": cfg.run.max_bad_steps,
    }
    for k, v in positive.items():
        if v < 1:
            raise UserError(f"{flag_name(k)} must be >= 1, got {v}")
    for k in ("eval_every", "save_every", "warmup_steps", "eval_batches", "eval_batch_size", "threads", "time_limit"):
        v = getattr(getattr(cfg, KEYS[k][0]), k)
        if v < 0:
            raise UserError(f"{flag_name(k)} must be >= 0, got {v}")
    for k in ("n_layer", "n_head", "n_embd", "n_ctx", "vocab_size"):
        v = getattr(cfg.model, k)
        if v is not None and v < 1:
            raise UserError(f"{flag_name(k)} must be >= 1, got {v}")
    for k in ("dropout", "attn_dropout"):
        v = getattr(cfg.model, k)
        if v is not None and not 0.0 <= v < 1.0:
            raise UserError(f"{flag_name(k)} must be in [0, 1), got {v}")
    if cfg.optim.lr <= 0:
        raise UserError(f"--lr must be > 0, got {cfg.optim.lr}")
    if cfg.optim.min_lr < 0 or cfg.optim.min_lr > cfg.optim.lr:
        raise UserError(f"--min-lr must be in [0, lr={cfg.optim.lr}], got {cfg.optim.min_lr}")
    if not (0 <= cfg.optim.beta1 < 1 and 0 <= cfg.optim.beta2 < 1):
        raise UserError("--beta1 and --beta2 must be in [0, 1)")
    if cfg.optim.schedule == "inverse_sqrt" and cfg.optim.warmup_steps < 1:
        raise UserError("--schedule inverse_sqrt needs --warmup-steps >= 1")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def to_toml(cfg: TrainConfig) -> str:
    """The resolved config as TOML (None values are left out: they mean 'from the preset/data')."""
    lines = ["# resolved by gpt2kit train; `gpt2kit train --config THIS` repeats the run", ""]
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            if v is not None:
                lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
    return "\n".join(lines)
