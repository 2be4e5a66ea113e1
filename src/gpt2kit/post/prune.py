"""Magnitude pruning: zero the smallest-magnitude weights of the projection matrices, keep the masks.

Which tensors: the four projection matrices of every block (attn.c_attn, attn.c_proj, mlp.c_fc,
mlp.c_proj), i.e. the weights HF stores as Conv1D. Not the token/position embeddings (the tied embedding
is also the output head: zeroing rows of it removes tokens), not layer norms, not biases.

Rule: w = 0 where |w| < gamma, gamma chosen so that exactly round(S * n) weights are zero -- over all
pruned tensors together (scope "global": layers with small weights lose more) or tensor by tensor
(scope "layer": each loses the same share). Ties at gamma are broken by position, so the count is exact.

The masks (True = kept) are written to `masks.safetensors` in the checkpoint (our parameter names,
nn.Linear [out, in] layout) and listed under "pruning" in gpt2kit.json; `gpt2kit finetune` re-applies
them after every optimizer step so pruned weights stay zero.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..model.quantized import EXPERT_LINEAR

MASKS_FILE = "masks.safetensors"
PRUNED_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def prunable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if is_prunable(n)}


def is_prunable(name: str) -> bool:
    """A projection weight of a block, MoE experts' included (`...mlp.experts.{e}.c_fc.weight`)."""
    return name.endswith(PRUNED_SUFFIXES) or (name.endswith(".weight") and bool(EXPERT_LINEAR.search(name[:-7])))


def check_sparsity(sparsity: float) -> float:
    if not isinstance(sparsity, int | float) or not 0.0 <= sparsity < 1.0:
        raise UserError(f"--sparsity must be in [0, 1) (the share of weights set to zero), got {sparsity}")
    return float(sparsity)


def _smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k smallest entries of a 1-D tensor (ties broken by position)."""
    drop = torch.zeros(values.numel(), dtype=torch.bool)
    if k > 0:
        order = torch.argsort(values, stable=True)
        drop[order[:k]] = True
    return drop


def magnitude_masks(model: torch.nn.Module, sparsity: float, scope: str = "global") -> dict[str, torch.Tensor]:
    """{parameter name: bool mask (True = keep)} reaching `sparsity` over the prunable tensors."""
    sparsity = check_sparsity(sparsity)
    if scope not in ("global", "layer"):
        raise UserError(f"--scope must be global or layer, got {scope!r}")
    params = prunable_parameters(model)
    if not params:
        raise UserError("the model has no prunable projection weights")
    if scope == "layer":
        return {n: ~_smallest(p.detach().abs().flatten().cpu(), round(sparsity * p.numel())).view(p.shape)
                for n, p in params.items()}
    flat = torch.cat([p.detach().abs().flatten().cpu() for p in params.values()])
    drop = _smallest(flat, round(sparsity * flat.numel()))
    masks, offset = {}, 0
    for n, p in params.items():
        masks[n] = ~drop[offset : offset + p.numel()].view(p.shape)
        offset += p.numel()
    return masks


@torch.no_grad()
def apply_masks(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero every masked-out weight, in place (called once after pruning and after each fine-tune step)."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        p = params[name]
        p.mul_(mask.to(device=p.device, dtype=p.dtype))


def sparsity_report(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Measured zeros: over the pruned tensors, over all parameters, and per tensor."""
    params = dict(model.named_parameters())
    pruned_zero = sum(int((params[n] == 0).sum()) for n in masks)
    pruned_total = sum(params[n].numel() for n in masks)
    all_zero = sum(int((p == 0).sum()) for p in model.parameters())
    all_total = sum(p.numel() for p in model.parameters())
    return {
        "sparsity_pruned_tensors": pruned_zero / pruned_total,
        "sparsity_all_parameters": all_zero / all_total,
        "per_tensor": {n: int((params[n] == 0).sum()) / params[n].numel() for n in masks},
    }


def save_masks(masks: dict[str, torch.Tensor], directory: Path) -> None:
    from ..model.hf import save_safetensors

    save_safetensors({n: m.to(torch.bool).contiguous().cpu() for n, m in masks.items()}, Path(directory) / MASKS_FILE)


def load_masks(directory: str | Path) -> dict[str, torch.Tensor] | None:
    """The masks of a pruned checkpoint, or None if it has none."""
    f = Path(directory) / MASKS_FILE
    if not f.exists():
        return None
    from ..model.hf import read_weights

    masks = read_weights(f)
    for n, m in masks.items():
        if m.dtype != torch.bool or not is_prunable(n):
            raise UserError(f"{f}: {n!r} is not a pruning mask of a projection weight")
    return masks


def check_masks_fit(model: torch.nn.Module, masks: dict[str, torch.Tensor], source: str) -> None:
    params = dict(model.named_parameters())
    for n, m in masks.items():
        if n not in params or tuple(params[n].shape) != tuple(m.shape):
            raise UserError(f"{source}: mask {n!r} does not match the model's parameters")


def prune_checkpoint(src: str | Path, out: str | Path, sparsity: float, scope: str = "global",
                     eval_text: str | None = None, eval_tokens: int | None = None, overwrite: bool = False,
                     ) -> dict[str, Any]:
    """Prune checkpoint `src` into `out`; returns the report (requested and real sparsity, perplexities)."""
    from ..fileio import atomic_dir
    from ..model import GPT2
    from .common import checkpoint_meta, copy_model_files, load_tokenizer, perplexity, weights_size

    sparsity = check_sparsity(sparsity)
    src, out = Path(src), Path(out)
    meta = checkpoint_meta(src)
    if "quantization" in meta:
        raise UserError(f"{src} is quantized; prune the float checkpoint (then quantize the pruned one)")
    model = GPT2.from_pretrained(src, dtype=torch.float32)
    model.eval()
    tokenizer = load_tokenizer(src) if eval_text is not None else None
    report: dict[str, Any] = {"source": str(src), "out": str(out), "sparsity": sparsity, "scope": scope}
    if eval_text is not None:
        report["ppl_before"] = perplexity(model, tokenizer, eval_text, eval_tokens)["ppl"]

    t0 = time.perf_counter()
    masks = magnitude_masks(model, sparsity, scope)
    old = load_masks(src)
    if old is not None:  # pruning a pruned model: what was pruned stays pruned
        check_masks_fit(model, old, str(src / MASKS_FILE))
        masks = {n: m & old[n] if n in old else m for n, m in masks.items()}
    apply_masks(model, masks)
    measured = sparsity_report(model, masks)
    report["prune_s"] = time.perf_counter() - t0
    report["real_sparsity"] = measured["sparsity_pruned_tensors"]
    report["sparsity_all_parameters"] = measured["sparsity_all_parameters"]
    extra = {"pruning": {
        "sparsity": sparsity, "scope": scope, "method": "magnitude", "masks": MASKS_FILE,
        "tensors": sorted(masks), "real_sparsity": report["real_sparsity"],
        "sparsity_all_parameters": report["sparsity_all_parameters"],
    }}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        copy_model_files(src, tmp)
        model.save_pretrained(tmp, extra=extra)
        save_masks(masks, tmp)
    report["size_before"] = weights_size(src)
    report["size_after"] = weights_size(out)  # dense storage: zeros take the same space (see docs/post.md)
    if eval_text is not None:
        reloaded = GPT2.from_pretrained(out)
        report["ppl_after"] = perplexity(reloaded, tokenizer, eval_text, eval_tokens)["ppl"]
        report["ppl_change"] = report["ppl_after"] / report["ppl_before"] - 1
    report["per_tensor"] = measured["per_tensor"]
    return report
