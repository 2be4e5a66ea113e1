"""The speculative check's forward on CPU: T new tokens of one row through the target on its KV cache.

Why it exists: speculative decoding (gpt2kit.speculative) has the target score the last token and the
K draft tokens, T = K + 1 positions, in one forward. At batch 1 that forward, like a decode step, is
bound by reading the weights once, so it should cost about one decode step; through `model.forward`
it cost ~2x one (gpt2, T = 5, 2-core Xeon: 47 ms vs 23 ms per step): torch's small-M products
(F.linear) are near memory speed up to 3 rows and slow above, and the module calls, SDPA and the
per-layer tensors add a few ms. This is gpt2kit.decode_fast's network with T rows where that has B
rows: the same numpy views of the weights and cache buffers (nothing copied), each projection through
decode_fast's small-batch product (or a quantized layer's kernel for T rows), and causal attention among
the T new positions. Logits agree with model.forward to float32 rounding.

Where the native decode step applies (gpt2kit.decode_native: the compiled kernels, float32 / int8 / int4
block layers), the T positions run in one C call instead (`NativeStep.rows`): each weight is read once for
the T rows and every row's logits are bitwise what single decode steps give, so speculative greedy output
is plain greedy output to the bit. The numpy network below is the fallback.

Used by gpt2kit.speculative where `FastVerifier.supports(model, T)`: what FastDecoder supports at
batch T (CPU, float32 activations, eval mode, plain GPT-2 layers, T up to decode_fast's row limit)
and one row; elsewhere model.forward.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .decode_fast import FastDecoder, _gelu_tanh, _layer_norm, _Linear


class FastVerifier:
    """`verifier(tokens [1, T], cache) -> logits [1, T, V]` ([1, 1, V], the last position's, with
    last_only), writing the T positions into the cache."""

    @staticmethod
    def supports(model, tokens: int) -> bool:
        return tokens >= 1 and FastDecoder.supports(model, tokens)

    def __init__(self, model):
        from .model import native

        self.decoder = FastDecoder(model)  # its weight views, projections per row count and cache views
        # every float projection, one row included, through gpt2kit's kernel where it is built: a round of
        # speculative decoding then runs on one thread pool (OpenMP's). Alternating with numpy's BLAS
        # (decode_fast's 1-row gemv, in the draft's steps) left each pool's idle threads spinning on the
        # two cores the other needed: gpt2 + a 2-layer draft, K = 4, 30 tok/s vs 74 with BLAS on 1 thread
        self._native = native.f32_linear if native.library() is not None else None
        from .decode_native import NativeStep

        self._step = NativeStep.build(model)
        self._logits = np.empty((0, model.config.vocab_size), np.float32)  # grown to the largest T asked

    def _project(self, p, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        if type(p) is not _Linear:
            return p(x, out)  # a quantized layer's kernel
        if self._native is not None:
            return self._native(x, p.w, p.b, out)
        # without the native kernels torch's product, one row included: torch's pool only, no BLAS threads
        torch.from_numpy(out).copy_(torch.nn.functional.linear(torch.from_numpy(x), p.w_t, p.b_t))
        return out

    def __call__(self, tokens: torch.Tensor, cache, last_only: bool = False) -> torch.Tensor:
        d = self.decoder
        if tokens.shape[0] != 1:
            raise ValueError(f"FastVerifier takes one row, got {tokens.shape[0]}")
        T, P = tokens.shape[1], cache.length
        if P + T > cache.max_len:
            from .errors import UserError

            raise UserError(f"KV cache is full: {P} positions + {T} new > max_len {cache.max_len}")
        if self._step is not None:
            if self._logits.shape[0] < T:
                self._logits = np.empty((T, self._logits.shape[1]), np.float32)
            out = self._logits[:1] if last_only else self._logits[:T]
            self._step.rows(tokens.reshape(T).numpy(), P, cache, None, out[0] if last_only else out,
                            all_logits=not last_only)
            return torch.from_numpy(out)[None]  # a view of the buffer: valid until the next call
        layers, head = d._network(T)
        buf = d._scratch(T)
        keys, values = d._cache(cache)
        ids = tokens.reshape(T).numpy()
        x = d.wte(ids) + d.wpe(np.arange(P, P + T))  # [T, C], the residual stream
        H, D = d.n_head, d.head_dim
        C = H * D
        scale = np.float32(1.0 / math.sqrt(D))
        # query t (position P + t) sees keys 0 .. P + t: the future new positions are masked
        future = np.triu(np.ones((T, T), dtype=bool), 1)
        for i, L in enumerate(layers):
            h = _layer_norm(x, L.ln1_w, L.ln1_b, d.eps, buf["h"])
            qkv = self._project(L.qkv, h, buf["qkv"])  # [T, 3C]
            q = qkv[:, :C].reshape(T, H, D).transpose(1, 0, 2)  # [H, T, D]
            K, V = keys[i][0], values[i][0]  # [H, max_len, D] views of the cache buffers
            K[:, P : P + T, :] = qkv[:, C : 2 * C].reshape(T, H, D).transpose(1, 0, 2)
            V[:, P : P + T, :] = qkv[:, 2 * C :].reshape(T, H, D).transpose(1, 0, 2)
            scores = np.matmul(q, K[:, : P + T, :].transpose(0, 2, 1))  # [H, T, P + T]
            scores *= scale
            scores[:, :, P:][:, future] = -np.inf
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            y = np.matmul(scores, V[:, : P + T, :])  # [H, T, D]
            att = buf["att"]
            att[...] = y.transpose(1, 0, 2).reshape(T, C)
            x += self._project(L.proj, att, buf["proj"])
            h = _layer_norm(x, L.ln2_w, L.ln2_b, d.eps, buf["h"])
            f = _gelu_tanh(self._project(L.fc, h, buf["fc"]), buf["tmp"])
            x += self._project(L.out, f, buf["proj"])
        cache.advance(T)
        h = _layer_norm(x, d.lnf_w, d.lnf_b, d.eps, buf["h"])
        logits = self._project(head, h, buf["logits"])
        # a view of the scratch buffer: valid until the next call, which is all the accept step needs
        return torch.from_numpy(logits[-1:] if last_only else logits)[None]
