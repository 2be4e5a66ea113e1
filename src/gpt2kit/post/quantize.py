"""Weight quantization to int8 / int4 with a scale and a zero point per output channel or per group.

The scheme (per row of W [rows, cols], or per group of `group_size` consecutive columns of a row):
  asymmetric (default): lo = min(w, 0), hi = max(w, 0), s = (hi - lo) / (2^b - 1), z = round(-lo / s)
  symmetric:            s = max|w| / (2^(b-1) - 1), z = 2^(b-1)
  q = clamp(round(w / s) + z, 0, 2^b - 1),  w~ = (q - z) * s
The range includes 0 so that z is a valid code and an exact zero (e.g. a pruned weight) stays exactly 0.

What is quantized: the four projection matrices of every block (attn.c_attn, attn.c_proj, mlp.c_fc,
mlp.c_proj) and, unless `embeddings=False`, the token and position embeddings per row (token/position),
grouped along the embedding dimension like the linears. The output head is tied to the token
embedding, so it is the same quantized matrix. Biases and layer norms stay float32 (a few KB).
Why the embeddings too: for GPT-2 124M the tied embedding is 31% of the weights, for small models
most of them; left in float32 it alone would exceed the 0.17x size budget of int4.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..model.quantized import (
    _QuantStore,
    install_quantized,
    is_quantized,
    pack_int4,
    quantizable_modules,
)
from ..model.quantized_io import quantized_state_dict

SCHEME = "affine-minmax"  # the name saved in gpt2kit.json


@dataclass
class QuantSpec:
    bits: int = 8
    group_size: int | None = None  # None: one group per row (per output channel)
    symmetric: bool = False
    embeddings: bool = True

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise UserError(f"--bits must be 8 or 4, got {self.bits}")
        if self.group_size is not None and (self.group_size < 2 or self.group_size % 2):
            raise UserError(f"--group-size must be an even number >= 2, got {self.group_size}")

    @classmethod
    def default(cls, bits: int, group_size: int | None = None, symmetric: bool = False,
                embeddings: bool = True) -> QuantSpec:
        """int8 defaults to per channel, int4 to groups of 64."""
        if group_size is None and bits == 4:
            group_size = 64
        return cls(bits, group_size, symmetric, embeddings)


def quantize_tensor(w: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = False,
                    name: str = "weight") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [rows, cols] -> (codes uint8 [rows, cols], scales float32 [rows, G], zeros uint8 [rows, G])."""
    rows, cols = w.shape
    gs = cols if group_size is None else group_size
    if cols % gs:
        raise UserError(f"--group-size {gs} does not divide the {cols} input columns of {name}")
    wg = w.detach().to(torch.float32).reshape(rows, cols // gs, gs)
    qmax = 2**bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        scale = wg.abs().amax(-1) / (half - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.full_like(scale, float(half))
    else:
        lo = wg.amin(-1).clamp(max=0)
        hi = wg.amax(-1).clamp(min=0)
        scale = (hi - lo) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale works
        zero = torch.round(-lo / scale).clamp(0, qmax)
    codes = (torch.round(wg / scale.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(0, qmax)
    return codes.reshape(rows, cols).to(torch.uint8), scale.contiguous(), zero.to(torch.uint8).contiguous()


def quantize_model(model: torch.nn.Module, spec: QuantSpec) -> list[str]:
    """Replace the quantizable modules of `model` (in place) by int8/int4 ones; returns their names."""
    if is_quantized(model):
        raise UserError("the model is already quantized")
    names = quantizable_modules(model, spec.embeddings)
    for name in names:
        mod = model.get_submodule(name)
        w = mod.weight
        codes, scales, zeros = quantize_tensor(w, spec.bits, spec.group_size, spec.symmetric, name)
        qweight = pack_int4(codes) if spec.bits == 4 else codes
        store = _QuantStore(qweight, scales, zeros, spec.bits, w.shape[1])
        bias = mod.bias.detach().clone() if getattr(mod, "bias", None) is not None else None
        install_quantized(model, name, store, bias)
    return names


def save_quantized(model: torch.nn.Module, src: Path, out: Path, spec: QuantSpec, modules: list[str],
                   overwrite: bool = False) -> None:
    """Write the quantized checkpoint directory `out` (atomically): src's config/tokenizer files,
    model.safetensors with the quantized tensors, and gpt2kit.json with a "quantization" entry."""
    from ..fileio import atomic_dir, update_json
    from ..model.hf import save_safetensors
    from .common import copy_model_files

    with atomic_dir(out, overwrite=overwrite) as tmp:
        copy_model_files(src, tmp)
        save_safetensors(quantized_state_dict(model), tmp / "model.safetensors")
        update_json(tmp / "gpt2kit.json", {
            "quantization": {
                "bits": spec.bits,
                "group_size": spec.group_size,  # null = per output channel (per row)
                "symmetric": spec.symmetric,
                "scheme": SCHEME,
                "modules": modules,
            }
        })


def quantize_checkpoint(src: str | Path, out: str | Path, spec: QuantSpec, eval_text: str | None = None,
                        eval_tokens: int | None = None, speed_tokens: int = 0, overwrite: bool = False,
                        log=print) -> dict[str, Any]:
    """Quantize checkpoint `src` into `out`; returns the report (sizes, perplexities, speeds)."""
    from ..model import GPT2
    from .common import checkpoint_meta, generation_speed, load_tokenizer, perplexity, weights_size

    src, out = Path(src), Path(out)
    meta = checkpoint_meta(src)
    if "quantization" in meta:
        raise UserError(f"{src} is already quantized ({meta['quantization'].get('bits')}-bit); "
                        "quantize the original float checkpoint instead")
    model = GPT2.from_pretrained(src, dtype=torch.float32)
    model.eval()
    tokenizer = load_tokenizer(src) if eval_text is not None else None
    report: dict[str, Any] = {"source": str(src), "out": str(out), "bits": spec.bits,
                              "group_size": spec.group_size, "symmetric": spec.symmetric}
    fp32_bytes = sum(p.numel() for p in model.parameters()) * 4
    if eval_text is not None:
        report["ppl_before"] = perplexity(model, tokenizer, eval_text, eval_tokens)["ppl"]
    if speed_tokens:
        report["tokens_per_s_before"] = generation_speed(model, speed_tokens)

    t0 = time.perf_counter()
    modules = quantize_model(model, spec)
    save_quantized(model, src, out, spec, modules, overwrite=overwrite)
    report["quantize_s"] = time.perf_counter() - t0
    report["modules"] = len(modules)

    report["size_before"] = weights_size(src)
    report["size_after"] = weights_size(out)
    report["size_fp32"] = fp32_bytes
    report["size_ratio_vs_fp32"] = report["size_after"] / fp32_bytes
    # measure the checkpoint as written: what `gpt2kit eval` and `generate` will load
    reloaded = GPT2.from_pretrained(out)
    if eval_text is not None:
        report["ppl_after"] = perplexity(reloaded, tokenizer, eval_text, eval_tokens)["ppl"]
        report["ppl_change"] = report["ppl_after"] / report["ppl_before"] - 1
    if speed_tokens:
        report["tokens_per_s_after"] = generation_speed(reloaded, speed_tokens)
        report["speedup"] = report["tokens_per_s_after"] / report["tokens_per_s_before"]
    return report
