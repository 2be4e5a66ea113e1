"""A float GPT-2 checkpoint -> an ONNX decoder with past key/values, for onnxruntime.

One graph serves prefill and cached steps (inputs and outputs named as optimum names them):
  inputs   input_ids [batch, seq] int64, attention_mask [batch, past + seq] int64 (0 = padding),
           position_ids [batch, seq] int64, past_key_values.{i}.key / .value [batch, heads, past, head_dim]
  outputs  logits [batch, seq, vocab], present.{i}.key / .value [batch, heads, past + seq, head_dim]
Every length is dynamic and `past` may be 0 (prefill). The graph is traced from `OnnxDecoder`, a small
wrapper that runs our modules' weights with plain ops (F.linear, tanh GELU, an additive mask), because the
training network's fused autograd functions and preallocated KV cache do not export.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..fileio import atomic_dir, atomic_write_json

MODEL_FILE = "model.onnx"
OPSET = 18


def input_names(n_layer: int) -> list[str]:
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past]


def output_names(n_layer: int) -> list[str]:
    return ["logits", *[f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]]


class OnnxDecoder(nn.Module):
    """GPT-2 forward over flat past tensors (key, value per layer); returns (logits, *present)."""

    def __init__(self, model) -> None:
        super().__init__()
        if not model.config.is_gpt2:
            raise UserError(f"ONNX export supports plain GPT-2 only; this checkpoint is a variant "
                            f"({model.config.variant()})")
        self.model = model
        self.n_head, self.n_embd = model.config.n_head, model.config.n_embd
        self.scale = 1.0 / math.sqrt(model.config.n_embd // model.config.n_head)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        tr = self.model.transformer
        b, t = input_ids.shape
        x = tr.wte(input_ids) + tr.wpe(position_ids)
        past_len = past[0].shape[2]
        # query i sits at absolute position past_len + i: it sees keys up to there that are not padding;
        # an additive mask (not -inf) keeps all-padding rows finite, as transformers does
        keys = torch.arange(past_len + t, device=input_ids.device)
        queries = torch.arange(t, device=input_ids.device) + past_len
        allowed = (keys[None, :] <= queries[:, None])[None, None] & attention_mask[:, None, None, :].bool()
        bias = torch.zeros(allowed.shape, dtype=x.dtype).masked_fill(~allowed, torch.finfo(x.dtype).min)
        presents = []
        for i, block in enumerate(tr.h):
            attn = block.attn
            q, k, v = F.linear(block.ln_1(x), attn.c_attn.weight, attn.c_attn.bias).split(self.n_embd, dim=2)
            q, k, v = (z.reshape(b, t, self.n_head, -1).transpose(1, 2) for z in (q, k, v))
            k = torch.cat([past[2 * i], k], dim=2)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            presents += [k, v]
            w = (q @ k.transpose(-1, -2)) * self.scale + bias
            y = (torch.softmax(w, dim=-1) @ v).transpose(1, 2).reshape(b, t, -1)
            x = x + F.linear(y, attn.c_proj.weight, attn.c_proj.bias)
            mlp = block.mlp
            h = F.gelu(F.linear(block.ln_2(x), mlp.c_fc.weight, mlp.c_fc.bias), approximate="tanh")
            x = x + F.linear(h, mlp.c_proj.weight, mlp.c_proj.bias)
        # 2-D input: exported as one Gemm(transB=1) reading the tied embedding itself
        logits = F.linear(tr.ln_f(x).reshape(b * t, -1), self.model.lm_head.weight).reshape(b, t, -1)
        return (logits, *presents)


def empty_past(config, batch: int, length: int = 0, dtype=torch.float32) -> list[torch.Tensor]:
    shape = (batch, config.n_head, length, config.n_embd // config.n_head)
    return [torch.zeros(shape, dtype=dtype) for _ in range(2 * config.n_layer)]


def export_onnx(model, out: str | Path, tokenizer=None, overwrite: bool = False) -> dict:
    """Write `out`/model.onnx (+ config.json and the tokenizer files); returns a summary."""
    config = model.config
    decoder = OnnxDecoder(model.float().eval())
    n = config.n_layer
    # trace with a non-empty past and lengths > 1 so no dimension is specialised to 0 or 1
    b, t, p = 2, 3, 2
    ids = torch.zeros(b, t, dtype=torch.long)
    args = (ids, torch.ones(b, p + t, dtype=torch.long), torch.arange(p, p + t).expand(b, t).contiguous(),
            *empty_past(config, b, p))
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    for name in input_names(n)[3:]:
        axes[name] = {0: "batch", 2: "past"}
    for name in output_names(n)[1:]:
        axes[name] = {0: "batch", 2: "total"}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        # no constant folding: it would store a transposed copy of the tied embedding for the head; onnxruntime
        # folds the transposes in memory when it loads the graph
        with torch.no_grad():
            torch.onnx.export(decoder, args, str(tmp / MODEL_FILE), input_names=input_names(n),
                              output_names=output_names(n), dynamic_axes=axes, opset_version=OPSET,
                              dynamo=False, do_constant_folding=False)
        atomic_write_json(tmp / "config.json", config.to_hf_dict())
        if tokenizer is not None:
            tokenizer.save(tmp)
    size = sum(f.stat().st_size for f in Path(out).iterdir())
    return {"out": str(out), "format": "onnx", "file": MODEL_FILE, "opset": OPSET, "layers": n, "bytes": size}
