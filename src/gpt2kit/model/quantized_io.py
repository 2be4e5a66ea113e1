"""Quantized checkpoints: the state dict `gpt2kit quantize` writes and the loader that reads it back
(the layers themselves live in quantized.py, the float format in hf.py)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import UserError, require_dir
from ..fileio import read_json
from .config import GPT2Config
from .gpt2 import GPT2Network
from .hf import CONFIG_FILE, GPT2KIT_FILE, WEIGHTS_FILE, SafetensorsReader, _is_conv1d
from .meta import on_meta
from .quantized import HEAD, QuantEmbedding, QuantLinear, QuantTiedHead, _QuantStore, install_quantized


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of a (partly) quantized model under checkpoint names: `<module>.qweight/.scales/.zeros`
    for quantized matrices, HF names (Conv1D layout) for float ones, the tied head left out."""
    out: dict[str, torch.Tensor] = {}
    quantized: set[str] = set()
    for name, mod in model.named_modules():
        if isinstance(mod, QuantTiedHead):
            quantized.add(name)
            continue
        if isinstance(mod, QuantLinear | QuantEmbedding):
            quantized.add(name)
            out.update(mod.store.tensors(name))
            if isinstance(mod, QuantLinear) and mod.bias is not None:
                out[f"{name}.bias"] = mod.bias.detach()
    for name, t in model.state_dict().items():
        owner = name.rsplit(".", 1)[0]
        if owner in quantized or owner.rsplit(".", 1)[0] in quantized or name == f"{HEAD}.weight":
            continue  # a quantized module's buffers (`x.store.codes_s8`, ...) or the tied head
        t = t.detach()
        out[name] = (t.t() if _is_conv1d(name) else t).contiguous()
    return {k: v.contiguous().cpu() for k, v in out.items()}


def load_quantized(path, device=None, dtype=None, model_class: type[GPT2Network] = GPT2Network) -> GPT2Network:
    """Load a checkpoint written by `gpt2kit quantize` as a GPT2 whose listed modules are quantized.

    dtype: the float dtype of the unquantized tensors and of the dequantized weights (default float32).
    """
    path = require_dir(path, "model directory")
    meta = read_json(path / GPT2KIT_FILE, "gpt2kit checkpoint metadata")
    spec = meta.get("quantization") if isinstance(meta, dict) else None
    if not isinstance(spec, dict) or spec.get("bits") not in (4, 8) or not isinstance(spec.get("modules"), list):
        raise UserError(f"{path / GPT2KIT_FILE}: 'quantization' must hold bits (4 or 8) and a list of modules")
    config = GPT2Config.from_hf_dict(read_json(path / CONFIG_FILE, "model config"), source=str(path / CONFIG_FILE))
    weights_file = path / WEIGHTS_FILE
    if not weights_file.exists():
        raise UserError(f"no weights in {path}: expected {WEIGHTS_FILE}")
    dtype = dtype or torch.float32
    device = torch.device(device) if device is not None else torch.device("cpu")
    with SafetensorsReader(weights_file) as tensors:
        return _build(model_class, config, spec, tensors, weights_file, path, device, dtype)


def _build(model_class, config, spec, tensors, weights_file, path, device, dtype) -> GPT2Network:
    """The quantized model from the checkpoint's tensors (read one at a time, so that converting one --
    int8 codes become signed -- holds its raw copy only until the next)."""
    with on_meta():
        model = model_class(config)
    bits = int(spec["bits"])
    used: set[str] = set()
    for name in spec["modules"]:
        keys = [f"{name}.qweight", f"{name}.scales", f"{name}.zeros"]
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise UserError(f"{weights_file}: missing tensor {missing[0]!r} of quantized module {name!r}")
        try:
            original = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"{path / GPT2KIT_FILE}: quantized module {name!r} is not part of this model") from None
        cols = original.embedding_dim if isinstance(original, nn.Embedding) else original.in_features
        qw, sc, zs = (tensors[k].to(device) for k in keys)  # each read now, in memory of its own
        store = _QuantStore(qw, sc, zs, bits, cols, compute_dtype=dtype)
        rows = original.num_embeddings if isinstance(original, nn.Embedding) else original.out_features
        if store.rows != rows:
            raise UserError(f"{weights_file}: quantized {name!r} has {store.rows} rows, expected {rows}")
        bias = None
        if isinstance(original, nn.Linear) and original.bias is not None:
            if f"{name}.bias" not in tensors:
                raise UserError(f"{weights_file}: missing tensor {name + '.bias'!r}")
            bias = tensors[f"{name}.bias"].to(device=device, dtype=dtype)
            used.add(f"{name}.bias")
        install_quantized(model, name, store, bias)
        used.update(keys)

    # the float tensors that remain (layer norms, unquantized modules)
    state = {}
    for name in tensors:
        if name in used:
            continue
        t = tensors[name]
        state[name] = (t.t() if _is_conv1d(name) else t).to(device=device, dtype=dtype).contiguous()
    expected = {n for n, _ in model.named_parameters(remove_duplicate=False) if n != f"{HEAD}.weight"}
    expected -= {n for n, m in model.named_modules() if isinstance(m, QuantLinear) for n in [f"{n}.bias"]}
    unknown = sorted(set(state) - expected)
    missing = sorted(expected - set(state))
    if unknown or missing:
        what = f"unexpected tensor {unknown[0]!r}" if unknown else f"missing tensor {missing[0]!r}"
        raise UserError(f"{weights_file}: {what} for a quantized model with this config")
    model.load_state_dict(state, strict=False, assign=True)
    if "transformer.wte" not in spec["modules"]:
        model.lm_head.weight = model.transformer.wte.weight  # re-tie the float head
    model.requires_grad_(False)  # inference only: quantized codes have no gradient
    model.eval()
    return model
