"""The GPT-2 network, readable top to bottom (in the spirit of nanoGPT's model.py).

Shapes: B batch, T new positions, P positions already in the KV cache, C = n_embd, H = n_head,
D = head_dim = C / H, V = vocab_size.

Parameter names follow Hugging Face's GPT2LMHeadModel (`transformer.h.0.attn.c_attn.weight`, ...), so
converting a checkpoint is a rename-free transpose: HF stores those four projection matrices as Conv1D
(in x out), we store them as nn.Linear (out x in). See hf.py.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from ..errors import UserError
from .attention import AttentionContext, variant_attention
from .config import GPT2Config
from .kv_cache import KVCache
from .linear import gelu_linear, linear
from .loss import linear_cross_entropy
from .moe import MoEMLP, moe_layers, pop_aux_loss


@dataclass
class GPT2Output:
    logits: torch.Tensor | None  # [B, T, V] ([B, 1, V] with last_only); None when only the loss was asked
    loss: torch.Tensor | None  # scalar mean NLL over the counted targets; None without targets
    kv_cache: KVCache | None
    # MoE load-balancing + router z-loss of this forward (already scaled by their coefficients); the
    # trainer adds it to the loss it differentiates. None for a model without MoE layers.
    aux_loss: torch.Tensor | None = None


# SDPA kernels for KV-cache steps on CUDA: every backend but cuDNN's, which builds (and caches) an execution
# graph per key length -- a new one for every decoded token. On an H100, greedy bf16 decoding at batch 1 ran
# at 17 tokens/s with it and 262 without (float32 has no cuDNN kernel; docs/benchmarks.md, GPU section).
_CACHED_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _attention_backends(device: torch.device, kv_cache: KVCache | None):
    if kv_cache is not None and device.type == "cuda":
        return sdpa_kernel(_CACHED_ATTENTION_BACKENDS)
    return contextlib.nullcontext()


# Causal attention of a CPU prompt in query chunks of 64 (inference only). For 192 <= T < 768 queries torch's
# CPU flash kernel takes queries in blocks of 64 against one key block of up to 512 and masks inside it,
# so a causal prompt costs as much as a full T x T one; one call per 64 queries against only the keys up
# to its end does about half the work. gpt2 heads, 2 threads, per layer at T = 512: 5.73 -> 3.94 ms on a
# Zen 5 with AVX-512, 8.89 -> 6.51 ms with AVX2; from T = 768 on torch's blocks skip masked keys
# themselves and the chunks lose (docs/benchmarks.md). Same values up to rounding (~3e-7).
_PREFILL_CHUNK = 64
_PREFILL_CHUNKED = range(192, 768)


def _chunk_causal_prefill(q: torch.Tensor, k: torch.Tensor, training: bool) -> bool:
    T = q.shape[2]
    return (T in _PREFILL_CHUNKED and k.shape[2] == T and q.device.type == "cpu" and not training
            and not (torch.is_grad_enabled() and q.requires_grad) and not torch.compiler.is_compiling())


def _causal_attention_in_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA(q, k, v, is_causal=True) for q, k, v of one length T, one call per chunk of queries."""
    T = q.shape[2]
    # additive, as SDPA would turn a boolean mask into for every chunk
    visible = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
    out = []
    for s in range(0, T, _PREFILL_CHUNK):
        e = min(s + _PREFILL_CHUNK, T)
        out.append(F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, :e], v[:, :, :e], attn_mask=visible[s:e, :e]))
    return torch.cat(out, dim=2)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = config.attn_dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.config = config
        self.kinds = config.layer_attention  # the pattern at each depth (a shared block may serve several)

    def forward(self, x, attn_mask=None, is_causal=True, kv_cache: KVCache | None = None, layer: int = 0,
                last_only: bool = False):
        """last_only: keys and values for every position (the cache needs them), output for the last.
        In a model with attention variants attn_mask is an AttentionContext (model/attention.py)."""
        B, T, C = x.shape
        # [B, T, 3C] -> three [B, H, T, D] views (no copies: SDPA takes strided inputs)
        q, k, v = linear(x, self.c_attn).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4).unbind(0)
        if isinstance(attn_mask, AttentionContext):
            if self.kinds[layer] != "dense":
                y = variant_attention(self.kinds[layer], q, k, v, self.config, attn_mask, kv_cache, layer,
                                      self.attn_dropout if self.training else 0.0)
                if last_only:
                    y, T = y[:, :, -1:], 1
                y = y.transpose(1, 2).reshape(B, T, C)
                return self.resid_dropout(linear(y, self.c_proj))
            attn_mask, is_causal = attn_mask.mask, attn_mask.is_causal
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # all keys/values so far: [B, H, P + T, D]
        if last_only and T > 1:
            # the last query may see every key: no causal structure left, only the padding mask's row
            q, T, is_causal = q[:, :, -1:], 1, False
            attn_mask = None if attn_mask is None else attn_mask[..., -1:, :]
        if is_causal and attn_mask is None and _chunk_causal_prefill(q, k, self.training):
            y = _causal_attention_in_chunks(q, k, v)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=attn_mask,
                dropout_p=self.attn_dropout if self.training else 0.0,
                is_causal=is_causal and attn_mask is None,
            )
        y = y.transpose(1, 2).reshape(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(linear(y, self.c_proj))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config, hidden: int = 0):
        super().__init__()
        hidden = hidden or 4 * config.n_embd  # an MoE expert may be narrower (config.moe_expert_hidden)
        self.c_fc = nn.Linear(config.n_embd, hidden)
        self.c_proj = nn.Linear(hidden, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # GPT-2's GELU is the tanh approximation ("gelu_new" in transformers)
        return self.dropout(gelu_linear(linear(x, self.c_fc), self.c_proj))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPT2Config, index: int = 0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        is_moe = config.moe_experts > 0 and (index + 1) % config.moe_every == 0 and index >= config.moe_first_layer
        self.mlp = MoEMLP(config, lambda: MLP(config, config.moe_expert_hidden)) if is_moe else MLP(config)

    def forward(self, x, attn_mask=None, is_causal=True, kv_cache=None, layer=0, last_only=False):
        """last_only: only the last position's output (the model's last block, when only the last
        position's logits are wanted: skips the MLP and output projection for the others)."""
        h = self.attn(self.ln_1(x), attn_mask, is_causal, kv_cache, layer, last_only)
        x = (x[:, -1:] if last_only else x) + h
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT2Network(nn.Module):
    """The network alone. The public `gpt2kit.model.GPT2` adds loading, saving and generation on top
    (model/pretrained.py), so this file depends on neither its file format nor its users."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.n_ctx, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(unique_blocks(config))]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying: one tensor, as GPT-2
        self.gradient_checkpointing = False  # recompute each block in backward (less memory, ~1/3 more compute)
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        for moe in moe_layers(self):
            moe.reset_router(std=0.02)
        # the block applied at each depth (KV-cache layer): shared layers repeat blocks
        self.block_schedule = block_schedule(config)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # ----- bookkeeping ---------------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (the tied head counted once). non_embedding=True leaves out the token and
        position embeddings (the N of Kaplan et al. 2020)."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared (or tied) tensor once
        if non_embedding:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    def gradient_checkpointing_enable(self) -> None:
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    @property
    def has_moe(self) -> bool:
        return self.config.moe_experts > 0

    # read off the final LayerNorm: always a plain float tensor (a quantized embedding would dequantize)
    @property
    def device(self) -> torch.device:
        return self.transformer.ln_f.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.ln_f.weight.dtype

    # ----- the forward pass ----------------------------------------------------------------------------

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        last_only: bool = False,
        return_logits: bool | None = None,
    ) -> GPT2Output:
        """Run the network on token ids `idx` [B, T].

        targets [B, T] (next-token ids; -100 = ignore) and loss_mask [B, T] (bool, True = count) give
        `loss`, the mean NLL over counted targets (0 when none count). With targets, the loss is computed
        chunk by chunk and the [B, T, V] logits are never built, so `logits` is None unless
        return_logits=True. kv_cache: new keys/values are written after its filled positions and it
        advances by T. attention_mask [B, P + T] (bool, False = padding) masks padding keys, e.g. for
        left-padded batches; positions then default to the count of real tokens before each one.
        last_only=True: logits for the last position only ([B, 1, V]).
        """
        if idx.dim() != 2:
            raise UserError(f"model input must be token ids of shape [batch, time], got shape {tuple(idx.shape)}")
        B, T = idx.shape
        past = kv_cache.length if kv_cache is not None else 0
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise UserError(f"model input must be integer token ids, got dtype {idx.dtype}")
        if idx.dtype not in (torch.long, torch.int):
            idx = idx.long()  # nn.Embedding takes int64 / int32 only (shards are often uint16)
        self._check_ids(idx)

        if attention_mask is not None:
            if attention_mask.shape != (B, past + T):
                raise UserError(
                    f"attention_mask must have shape [batch, cache length + time] = {[B, past + T]}, "
                    f"got {list(attention_mask.shape)}"
                )
            attention_mask = attention_mask.to(device=idx.device, dtype=torch.bool)
        if position_ids is None:
            position_ids = self._default_positions(B, T, past, attention_mask, idx.device)
        attn_mask, is_causal = self._attention_mask(T, past, attention_mask, idx.device)
        if any(kind != "dense" for kind in self.config.layer_attention):
            # variant layers take the raw padding (their patterns are masks of their own), dense ones as above
            padding = None if attention_mask is None or bool(attention_mask.all()) else attention_mask
            attn_mask = AttentionContext(attn_mask, is_causal, padding, past)

        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(position_ids))
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        last = len(self.block_schedule) - 1
        blocks = self.transformer.h
        with _attention_backends(idx.device, kv_cache):
            for layer, b in enumerate(self.block_schedule):
                block = blocks[b]
                if checkpointing and kv_cache is None:
                    x = checkpoint(block, x, attn_mask, is_causal, None, layer, use_reentrant=False)
                else:
                    # only the last position leaves the network: its final block computes nothing else
                    x = block(x, attn_mask, is_causal, kv_cache, layer, last_only and layer == last)
        if kv_cache is not None:
            kv_cache.advance(T)
        x = self.transformer.ln_f(x)
        aux_loss = pop_aux_loss(self) if self.has_moe else None

        if last_only:
            x = x[:, -1:, :]
            if targets is not None:
                targets = targets[:, -1:]
                loss_mask = loss_mask[:, -1:] if loss_mask is not None else None
        if targets is None:
            return GPT2Output(linear(x, self.lm_head), None, kv_cache, aux_loss)

        if targets.shape != x.shape[:2]:
            raise UserError(f"targets must have shape {list(x.shape[:2])}, got {list(targets.shape)}")
        targets = targets.to(device=x.device, dtype=torch.long)
        if loss_mask is not None:
            if loss_mask.shape != targets.shape:
                raise UserError(f"loss_mask must have shape {list(targets.shape)}, got {list(loss_mask.shape)}")
            targets = targets.masked_fill(~loss_mask.to(device=x.device, dtype=torch.bool), -100)
        if return_logits:
            logits = linear(x, self.lm_head)
            nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                                  reduction="sum")
            loss = nll / (targets != -100).sum().clamp(min=1)
            return GPT2Output(logits, loss, kv_cache, aux_loss)
        loss = linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten())
        return GPT2Output(None, loss, kv_cache, aux_loss)

    def _check_ids(self, idx: torch.Tensor) -> None:
        # an out-of-range id would be an opaque IndexError deep in nn.Embedding; check where it is free
        # (skipped under torch.compile: reading min/max back would split the compiled graph)
        if idx.device.type == "cpu" and idx.numel() and not torch.compiler.is_compiling():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                raise UserError(f"token id {bad} is outside the model's vocabulary [0, {self.config.vocab_size})")

    def _default_positions(self, B, T, past, attention_mask, device) -> torch.Tensor:
        if attention_mask is None:
            if past + T > self.config.n_ctx:
                raise UserError(
                    f"sequence of {past + T} positions is longer than the model's context n_ctx={self.config.n_ctx}"
                )
            return torch.arange(past, past + T, device=device).unsqueeze(0)
        # left padding: a token's position is the number of real tokens before it
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        return positions

    @staticmethod
    def _attention_mask(T, past, attention_mask, device):
        """(attn_mask, is_causal) for SDPA: None + is_causal wherever the plain causal kernel is right."""
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: the fast paths below apply
        if attention_mask is None:
            if past == 0:
                return None, True  # plain causal attention over the new positions
            if T == 1:
                return None, False  # one new token sees every cached position
        # query i sits at position past + i and may see keys 0 .. past + i
        q_pos = torch.arange(past, past + T, device=device).unsqueeze(1)
        k_pos = torch.arange(past + T, device=device).unsqueeze(0)
        mask = k_pos <= q_pos  # [T, P + T]
        if attention_mask is not None:
            # mask padding keys, but let every query see itself so a padding query's row is never
            # empty (an all-masked row would give NaN; its output is never used)
            mask = (mask & attention_mask[:, None, None, :]) | (k_pos == q_pos)  # [B, 1, T, P + T]
        return mask, False


def unique_blocks(config: GPT2Config) -> int:
    """Blocks with their own weights: n_layer ("none"), n_layer / 2 ("pairs"), 1 ("all")."""
    return {"none": config.n_layer, "pairs": config.n_layer // 2, "all": 1}[config.share_layers]


def block_schedule(config: GPT2Config) -> tuple[int, ...]:
    """The unique block applied at each of the n_layer depths ("pairs": each block twice in a row)."""
    return tuple({"none": d, "pairs": d // 2, "all": 0}[config.share_layers] for d in range(config.n_layer))
