"""LoRA adapters on GPT-2's projections, saved and loaded in peft's format.

A wrapped projection computes  base(x) + lora_B(lora_A(dropout(x))) * scaling  (scaling = alpha / r, or
alpha / sqrt(r) with rsLoRA), as peft's `lora.Linear` does. The wrapper holds the base layer's own weight and
bias Parameters (no copies) with requires_grad False, so only lora_A / lora_B train and AdamW keeps state for
them alone.

peft's files for GPT-2 (checked against peft itself, tests/post/test_lora_peft.py):
- `adapter_config.json`: peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, lora_dropout, target_modules,
  fan_in_fan_out True (GPT-2's Conv1D stores weights in x out; it only matters when merging), bias "none".
- `adapter_model.safetensors`: `base_model.model.transformer.h.{i}.attn.c_attn.lora_A.weight` [r, in] and
  `...lora_B.weight` [out, r]: the same shapes whatever the base layer's layout, since lora_A / lora_B are
  plain Linears. Our nn.Linear weights are [out, in], so merging adds B @ A * scaling without a transpose.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import UserError
from ..train.trainer import Trainer

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
DEFAULT_TARGETS = ("c_attn",)
KNOWN_TARGETS = ("c_attn", "c_proj", "c_fc")


@dataclass
class LoraSettings:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] | str = DEFAULT_TARGETS  # module-name suffixes, or a regex (peft: fullmatch)
    use_rslora: bool = False
    base: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # other keys read from a peft config, kept on save

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def check(self) -> None:
        if self.r < 1:
            raise UserError(f"--lora-r must be at least 1, got {self.r}")
        if self.alpha <= 0:
            raise UserError(f"--lora-alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--lora-dropout must be in [0, 1), got {self.dropout}")


def parse_targets(text: str) -> tuple[str, ...]:
    """--lora-targets c_attn,c_proj,c_fc -> a tuple, refusing names GPT-2 does not have."""
    targets = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in targets if t not in KNOWN_TARGETS]
    if bad or not targets:
        raise UserError(f"--lora-targets: unknown {','.join(bad) or '(none)'}; choose from {','.join(KNOWN_TARGETS)}")
    return targets


class LoraLinear(nn.Module):
    """A frozen nn.Linear (its own Parameters, not copies) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, r: int, scaling: float, dropout: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter objects: no second copy of the base in memory
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # peft's default init; B = 0: a no-op start
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight, self.bias)
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta(self) -> torch.Tensor:
        """The update to the [out, in] weight: B @ A * scaling."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merged(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight + self.delta())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin


def _matches(name: str, targets: tuple[str, ...] | str) -> bool:
    if isinstance(targets, str):  # peft: a string target_modules is a regex over the full module name
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _check_plain_gpt2(model) -> None:
    if not model.config.is_gpt2:
        raise UserError(f"LoRA covers plain GPT-2 checkpoints; this one is a variant ({model.config.variant()})")
    if not isinstance(model.transformer.h[0].attn.c_attn, nn.Linear):
        raise UserError("LoRA needs a float checkpoint (this one is quantized)")


def inject_lora(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Freeze every parameter of `model` and wrap the target projections; returns the wrapped module names."""
    settings.check()
    _check_plain_gpt2(model)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and name != "lm_head" and _matches(name, settings.targets):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child,
                    LoraLinear(module, settings.r, settings.scaling, settings.dropout))
            wrapped.append(name)
    if not wrapped:
        raise UserError(f"LoRA target modules {settings.targets!r} match no projection of this model")
    return wrapped


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """peft's names: base_model.model.<module>.lora_A.weight / lora_B.weight."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().contiguous().cpu()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().contiguous().cpu()
    return out


def adapter_config(settings: LoraSettings, wrapped: list[str]) -> dict[str, Any]:
    targets = settings.targets if isinstance(settings.targets, str) else sorted({n.rsplit(".", 1)[-1] for n in wrapped})
    return {
        **settings.extra,
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": settings.base,
        "r": settings.r,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": targets,
        "fan_in_fan_out": True,  # GPT-2's Conv1D (in x out) layout; peft sets it for Conv1D anyway
        "bias": "none",
        "use_rslora": settings.use_rslora,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def save_adapter(model: nn.Module, settings: LoraSettings, directory: str | Path) -> None:
    """adapter_config.json + adapter_model.safetensors into an existing directory (each file atomic)."""
    from safetensors.torch import save as st_save

    from ..fileio import atomic_write_bytes, atomic_write_json

    d = Path(directory)
    wrapped = list(lora_modules(model))
    atomic_write_bytes(d / WEIGHTS_FILE, st_save(adapter_state_dict(model), metadata={"format": "pt"}))
    atomic_write_json(d / CONFIG_FILE, adapter_config(settings, wrapped))


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_adapter_config(directory: str | Path) -> LoraSettings:
    """LoraSettings from a peft adapter_config.json; features gpt2kit does not implement are refused."""
    from ..fileio import read_json

    d = Path(directory)
    cfg = read_json(d / CONFIG_FILE, "LoRA adapter config")
    where = d / CONFIG_FILE
    if cfg.get("peft_type") != "LORA":
        raise UserError(f"{where}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    for key, ok in (("bias", ("none", None)), ("use_dora", (False, None)), ("modules_to_save", (None, [])),
                    ("rank_pattern", ({}, None)), ("alpha_pattern", ({}, None)),
                    ("layers_to_transform", (None,)), ("lora_bias", (False, None)),
                    ("exclude_modules", (None,)), ("target_parameters", (None,)), ("layer_replication", (None,))):
        if cfg.get(key) not in ok:
            raise UserError(f"{where}: {key}={cfg.get(key)!r} is not supported by gpt2kit")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        targets = tuple(targets)
    elif not isinstance(targets, str):
        raise UserError(f"{where}: target_modules must be a list or a regex string")
    known = {"r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "base_model_name_or_path"}
    settings = LoraSettings(r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout") or 0.0),
                            targets=targets, use_rslora=bool(cfg.get("use_rslora", False)),
                            base=str(cfg.get("base_model_name_or_path") or ""),
                            extra={k: v for k, v in cfg.items() if k not in known})
    settings.check()
    return settings


def _loaded_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    st, binf = directory / WEIGHTS_FILE, directory / "adapter_model.bin"
    if st.is_file():
        return load_file(st)
    if binf.is_file():
        return torch.load(binf, map_location="cpu", weights_only=True)
    raise UserError(f"{directory}: no {WEIGHTS_FILE} (nor adapter_model.bin)")


def load_adapter_weights(model: nn.Module, directory: str | Path) -> None:
    """Copy an adapter's lora_A / lora_B tensors into the model's (already injected) LoraLinear modules."""
    d = Path(directory)
    tensors = _loaded_tensors(d)
    mods = lora_modules(model)
    seen = set()
    for key, t in tensors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_[AB])(?:\.default)?\.weight", key)
        if m is None or m.group(1) not in mods:
            raise UserError(f"{d / WEIGHTS_FILE}: tensor {key!r} does not belong to a LoRA target of this model")
        target = getattr(mods[m.group(1)], m.group(2)).weight
        if tuple(t.shape) != tuple(target.shape):
            raise UserError(f"{d / WEIGHTS_FILE}: {key} has shape {list(t.shape)}, the model needs {list(target.shape)}")
        with torch.no_grad():
            target.copy_(t.to(target.dtype))
        seen.add((m.group(1), m.group(2)))
    missing = [f"{n}.{ab}" for n in mods for ab in ("lora_A", "lora_B") if (n, ab) not in seen]
    if missing:
        raise UserError(f"{d / WEIGHTS_FILE}: no tensor for {missing[0]} (and {len(missing) - 1} more)")


def load_lora_model(adapter: str | Path, base: str | Path | None = None, dtype=torch.float32):
    """(model with the adapter injected and loaded, settings). `base` defaults to base_model_name_or_path."""
    from ..hub import resolve_checkpoint
    from ..model import GPT2

    d = Path(adapter)
    if not is_adapter_dir(d):
        raise UserError(f"{d}: not a LoRA adapter directory (no {CONFIG_FILE})")
    settings = read_adapter_config(d)
    where = base or settings.base
    if not where:
        raise UserError(f"{d}: the adapter names no base model; pass --base DIR")
    model = GPT2.from_pretrained(resolve_checkpoint(str(where), "--base"), dtype=dtype)
    inject_lora(model, settings)
    load_adapter_weights(model, d)
    model.eval()
    return model, settings


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoraLinear by a plain nn.Linear holding W + B @ A * scaling (in place)."""
    for name, m in list(lora_modules(model).items()):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, m.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def merge_checkpoint(adapter: str | Path, out: str | Path, base: str | Path | None = None,
                     overwrite: bool = False) -> dict[str, Any]:
    """`gpt2kit lora merge`: base + adapter folded into a plain checkpoint directory at `out`."""
    from ..fileio import atomic_dir
    from ..hub import resolve_checkpoint
    from .common import copy_model_files

    model, settings = load_lora_model(adapter, base)
    base_dir = resolve_checkpoint(str(base or settings.base), "--base")
    n = len(lora_modules(model))
    merge_lora(model)
    with atomic_dir(Path(out), overwrite=overwrite) as tmp:
        copy_model_files(Path(base_dir), tmp)
        model.save_pretrained(tmp, extra={"lora_merged": {"adapter": str(adapter), "base": str(base_dir),
                                                          "r": settings.r, "lora_alpha": settings.alpha}})
    return {"out": str(out), "base": str(base_dir), "adapter": str(adapter), "merged_modules": n,
            "r": settings.r, "lora_alpha": settings.alpha, "scaling": settings.scaling}


class LoraTrainer(Trainer):
    """gpt2kit's Trainer on a frozen base with LoRA adapters: AdamW sees the adapters only; every checkpoint
    (step-XXXXXX/, best/) is an adapter directory in peft's format, and resume loads the base from
    `init_from` and the adapters from the step directory."""

    def __init__(self, cfg, settings: LoraSettings, **kwargs):
        if cfg.run.strategy == "fsdp":
            raise UserError("LoRA fine-tuning supports --strategy ddp (or one process), not fsdp")
        self.lora = settings
        super().__init__(cfg, **kwargs)

    def _build_model(self, mc, resume_dir):
        model = super()._build_model(mc, None)  # the base, from init_from
        inject_lora(model, self.lora)
        if resume_dir is not None:
            load_adapter_weights(model, resume_dir)
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.log(f"LoRA r={self.lora.r} alpha={self.lora.alpha:g} on {len(lora_modules(model))} projections: "
                 f"{n:,} trainable parameters")
        return model

    def _save_model_files(self, directory: Path, full_state) -> None:
        from ..fileio import atomic_write_json

        save_adapter(self.bare, self.lora, directory)
        atomic_write_json(Path(directory) / "gpt2kit.json",
                          {"lora": {"base": self.lora.base}, "training": {"step": self.step,
                                                                         "config": self.cfg.to_dict()}})
