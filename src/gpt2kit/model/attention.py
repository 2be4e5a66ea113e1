"""Attention patterns beyond dense causal: sliding window, the Sparse Transformer's fixed pattern, linear.

Shapes: q, k, v [B, H, T, D] (new positions), outputs [B, H, T, D].

- sliding (Mistral): query i sees keys i-W+1 .. i, exactly `window` keys, itself included.
- fixed (Child et al. 2019): query i sees its own block of `block` positions causally, plus the last
  `summary` positions of every earlier block.
- linear (Katharopoulos et al. 2020): phi(x) = elu(x) + 1, y_i = phi(q_i) S_i / phi(q_i) z_i with
  S_i = sum_{j<=i} phi(k_j) v_j^T and z_i = sum_{j<=i} phi(k_j).

Sliding and fixed are computed blocked over SDPA: queries in chunks, each chunk against only the key span
its pattern can reach, with a small mask -- never a [T, T] score matrix. Linear attention runs its
chunked parallel form in training and its recurrent form (a [B, H, D, D] state + [B, H, D] normaliser)
when decoding. `reference_attention` builds the full mask (or the quadratic linear form) naively: the
oracle the tests hold the blocked forms to, and the path for padded batches of the fixed pattern.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LINEAR_CHUNK = 64  # linear attention's chunk: [Cl, Cl] intra-chunk products, one [D, D] state per chunk
LINEAR_EPS = 1e-6  # added to linear attention's normaliser


@dataclass
class AttentionContext:
    """What a variant layer needs beyond q, k, v (the network builds one per forward).

    mask / is_causal: the dense layers' SDPA arguments (as the dense model gets them).
    padding: [B, P + T] bool (False = padding key), None when every key is real.
    past: positions already in the KV cache.
    """

    mask: torch.Tensor | None
    is_causal: bool
    padding: torch.Tensor | None
    past: int


# ----- the patterns as masks (reference) ---------------------------------------------------------------


def pattern_mask(kind: str, q_pos: torch.Tensor, k_pos: torch.Tensor, window: int = 1, block: int = 1,
                 summary: int = 1) -> torch.Tensor:
    """Bool mask [..., Tq, Tk]: may the query at position q_pos see the key at k_pos (causal included)."""
    q, k = q_pos[..., :, None], k_pos[..., None, :]
    causal = k <= q
    if kind in ("dense", "linear"):
        return causal
    if kind == "sliding":
        return causal & (q - k < window)
    if kind == "fixed":
        return causal & ((q // block == k // block) | (k % block >= block - summary))
    raise ValueError(f"unknown attention pattern {kind!r}")


def reference_attention(kind: str, q, k, v, window: int = 1, block: int = 1, summary: int = 1,
                        key_valid: torch.Tensor | None = None, q_pos=None, k_pos=None) -> torch.Tensor:
    """Naive masked attention of a pattern over all keys (linear: the quadratic form of the same sum).

    q_pos/k_pos default to the last Tq of 0..Tk-1; key_valid [B, Tk] masks padding keys (each query always
    sees itself, so no row is empty).
    """
    Tq, Tk = q.shape[2], k.shape[2]
    if k_pos is None:
        k_pos = torch.arange(Tk, device=q.device)
    if q_pos is None:
        q_pos = k_pos[..., Tk - Tq:]
    mask = pattern_mask(kind, q_pos, k_pos, window, block, summary)
    if key_valid is not None:
        idx = torch.arange(Tk, device=q.device)
        itself = idx[Tk - Tq:, None] == idx[None, :]  # by index: padding keys share position 0
        mask = (mask & key_valid[:, None, :]) | itself
    if mask.dim() == 3:
        mask = mask[:, None]  # per row: [B, 1, Tq, Tk]
    if kind == "linear":
        fq, fk = feature_map(q), feature_map(k)
        a = (fq @ fk.transpose(-1, -2)) * mask
        return ((a @ v.to(a.dtype)) / (a.sum(-1, keepdim=True) + LINEAR_EPS)).to(v.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ----- sliding window ----------------------------------------------------------------------------------


def sliding_attention(q, k, v, window: int, prefix_k=None, prefix_v=None, key_valid=None,
                      dropout_p: float = 0.0) -> torch.Tensor:
    """Query i sees the `window` keys ending at itself. prefix_k/v [B, H, Pk, D] (Pk <= window - 1): the
    keys just before the new ones (a KV cache); key_valid [B, Pk + T] masks padding keys."""
    B, H, T, D = q.shape
    Pk = 0 if prefix_k is None else prefix_k.shape[2]
    if Pk:
        k, v = torch.cat([prefix_k, k], 2), torch.cat([prefix_v, v], 2)
    W = window
    if T <= W:  # one chunk: every key this chunk can reach is already at hand
        if Pk == 0 and key_valid is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        mask = pattern_mask("sliding", torch.arange(Pk, Pk + T, device=q.device),
                            torch.arange(Pk + T, device=q.device), window=W)
        if key_valid is not None:
            mask = _with_valid(mask, key_valid, Pk)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    # chunks of W queries; chunk c reads the keys of chunk c-1 and c (2W keys, a band of them visible).
    # Keys are laid out with W slots before the first query, left ones filled by the prefix (or invalid).
    n = -(-T // W)
    lead = W - Pk
    k_ext = F.pad(k, (0, 0, lead, n * W - T))
    v_ext = F.pad(v, (0, 0, lead, n * W - T))
    valid = torch.ones(Pk + T, dtype=torch.bool, device=q.device) if key_valid is None else key_valid
    valid = F.pad(valid, (lead, 0))
    valid = F.pad(valid, (0, n * W - T), value=True)  # [(n + 1) W] or [B, (n + 1) W]
    qc = F.pad(q, (0, 0, 0, n * W - T)).view(B, H, n, W, D)
    kc = torch.cat([k_ext[:, :, :-W].view(B, H, n, W, D), k_ext[:, :, W:].view(B, H, n, W, D)], 3)
    vc = torch.cat([v_ext[:, :, :-W].view(B, H, n, W, D), v_ext[:, :, W:].view(B, H, n, W, D)], 3)
    i = torch.arange(W, device=q.device)[:, None]
    j = torch.arange(2 * W, device=q.device)[None, :]
    band = (j > i) & (j <= i + W)  # [W, 2W]: key slot W + i is the query itself
    vspan = torch.cat([valid[..., :-W].unflatten(-1, (n, W)), valid[..., W:].unflatten(-1, (n, W))], -1)
    # [n | B n, W, 2W]; each query sees itself even at padding, so no row is empty (NaN)
    mask = (band & vspan[..., None, :]) | (j == i + W)
    return _chunked_sdpa(qc, kc, vc, mask, dropout_p).reshape(B, H, n * W, D)[:, :, :T]


def _with_valid(mask: torch.Tensor, key_valid: torch.Tensor, Pk: int) -> torch.Tensor:
    """mask [Tq, Tk] & key_valid [B, Tk], each query still seeing itself: [B, 1, Tq, Tk]."""
    Tq, Tk = mask.shape
    itself = torch.zeros_like(mask)
    itself[torch.arange(Tq), torch.arange(Tk - Tq, Tk)] = True
    return ((mask & key_valid[:, None, :]) | itself)[:, None]


def _chunked_sdpa(qc, kc, vc, mask, dropout_p: float) -> torch.Tensor:
    """SDPA over chunks: qc [B, H, n, Q, D], kc/vc [B, H, n, K, D], mask [n, Q, K] or [B, n, Q, K].

    Chunks move next to the batch ([B n, H, ...]) so SDPA sees 4-D inputs with a mask broadcast over heads.
    """
    B, H, n, Q, D = qc.shape
    K = kc.shape[3]

    def flat(t):
        return t.transpose(1, 2).reshape(B * n, H, t.shape[3], D)

    if mask.dim() == 3:
        mask = mask.expand(B, n, Q, K)
    y = F.scaled_dot_product_attention(flat(qc), flat(kc), flat(vc), attn_mask=mask.reshape(B * n, 1, Q, K),
                                       dropout_p=dropout_p)
    return y.view(B, n, H, Q, D).transpose(1, 2)


# ----- fixed (Sparse Transformer) ----------------------------------------------------------------------


def fixed_attention(q, k, v, block: int, summary: int, dropout_p: float = 0.0) -> torch.Tensor:
    """Own block causally + the last `summary` keys of every earlier block, from position 0 (no cache)."""
    B, H, T, D = q.shape
    L, c = block, summary
    if T <= L:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    n = -(-T // L)
    pad = n * L - T
    qb = F.pad(q, (0, 0, 0, pad)).view(B, H, n, L, D)
    kb = F.pad(k, (0, 0, 0, pad)).view(B, H, n, L, D)
    vb = F.pad(v, (0, 0, 0, pad)).view(B, H, n, L, D)
    # summary keys of the blocks 0 .. n-2 (the last block's are seen by no later block): [B, H, S, D]
    S = (n - 1) * c
    ks = kb[:, :, : n - 1, L - c:].reshape(B, H, S, D)
    vs = vb[:, :, : n - 1, L - c:].reshape(B, H, S, D)
    kc = torch.cat([ks[:, :, None].expand(B, H, n, S, D), kb], 3)  # [B, H, n, S + L, D]
    vc = torch.cat([vs[:, :, None].expand(B, H, n, S, D), vb], 3)
    blk = torch.arange(n, device=q.device)
    seen = (torch.arange(S, device=q.device) // c)[None, None, :] < blk[:, None, None]  # [n, 1, S]
    own = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()  # [L, L]
    mask = torch.cat([seen.expand(n, L, S), own.expand(n, L, L)], -1)  # [n, L, S + L]
    return _chunked_sdpa(qb, kc, vc, mask, dropout_p).reshape(B, H, n * L, D)[:, :, :T]


# ----- linear ------------------------------------------------------------------------------------------


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1 (positive), in float32 at least (its sums run over the whole sequence)."""
    return F.elu(x.to(torch.promote_types(x.dtype, torch.float32))) + 1.0


def linear_attention(q, k, v, state: tuple[torch.Tensor, torch.Tensor] | None = None, key_valid=None,
                     chunk: int = LINEAR_CHUNK) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Causal linear attention, chunked parallel form. state (S [B, H, D, D], z [B, H, D]): the sums over
    earlier positions (None: none). key_valid [B, T]: padding keys add nothing. Returns (y, new state)."""
    B, H, T, D = q.shape
    fq, fk, vf = feature_map(q), feature_map(k), v.to(torch.promote_types(v.dtype, torch.float32))
    if key_valid is not None:
        fk = fk * key_valid[:, None, :, None]
    if state is None:
        S0 = fq.new_zeros(B, H, D, D)
        z0 = fq.new_zeros(B, H, D)
    else:
        S0, z0 = state
    if T == 1:  # the recurrent form: one step of the state
        S1 = S0 + fk.transpose(-1, -2) @ vf
        z1 = z0 + fk[:, :, 0]
        y = (fq @ S1) / ((fq * z1[:, :, None]).sum(-1, keepdim=True) + LINEAR_EPS)
        return y.to(v.dtype), (S1, z1)
    Cl = min(chunk, T)
    n = -(-T // Cl)
    pad = n * Cl - T
    fq, fk, vf = (F.pad(t, (0, 0, 0, pad)).view(B, H, n, Cl, D) for t in (fq, fk, vf))
    kv = fk.transpose(-1, -2) @ vf  # [B, H, n, D, D]: each chunk's sum of phi(k) v^T
    ks = fk.sum(3)  # [B, H, n, D]
    S_before = torch.cat([S0[:, :, None], kv[:, :, :-1]], 2).cumsum(2)  # state entering each chunk
    z_before = torch.cat([z0[:, :, None], ks[:, :, :-1]], 2).cumsum(2)
    a = (fq @ fk.transpose(-1, -2)).tril()  # [B, H, n, Cl, Cl] within the chunk, causal
    num = a @ vf + fq @ S_before
    den = a.sum(-1) + (fq * z_before[:, :, :, None, :]).sum(-1)
    y = (num / (den[..., None] + LINEAR_EPS)).reshape(B, H, n * Cl, D)[:, :, :T]
    new_state = (S_before[:, :, -1] + kv[:, :, -1], z_before[:, :, -1] + ks[:, :, -1])
    return y.to(v.dtype), new_state


# ----- one layer's variant attention, with or without a cache -------------------------------------------


def variant_attention(kind: str, q, k, v, config, ctx: AttentionContext, kv_cache=None, layer: int = 0,
                      dropout_p: float = 0.0) -> torch.Tensor:
    """The attention of a non-dense layer: blocked/chunked forms, the cache's rolling window or state."""
    T, P = q.shape[2], ctx.past
    padding = ctx.padding
    if kv_cache is None and padding is None:
        if kind == "sliding":
            return sliding_attention(q, k, v, config.window, dropout_p=dropout_p)
        if kind == "fixed":
            return fixed_attention(q, k, v, config.attention_block, config.attention_summary, dropout_p)
        return linear_attention(q, k, v)[0]
    if kind == "linear":
        if kv_cache is not None and kv_cache.has_state(layer):
            new_valid = None if padding is None else padding[:, P:]
            y, state = linear_attention(q, k, v, kv_cache.state(layer), new_valid)
            kv_cache.set_state(layer, state)
            return y
        new_valid = None if padding is None else padding[:, P:]
        state = None
        if kv_cache is not None:  # a full-layout cache (serve, speculative): the sums over the cached keys
            keys, values = kv_cache.update(layer, k, v)
            fk = feature_map(keys[:, :, :P])
            if padding is not None:
                fk = fk * padding[:, None, :P, None]
            state = (fk.transpose(-1, -2) @ values[:, :, :P].float(), fk.sum(2))
        return linear_attention(q, k, v, state, new_valid)[0]
    if kind == "sliding":
        W = config.window
        if kv_cache is not None:
            if kv_cache.is_rolling(layer):
                if T == 1:
                    keys, values, slot_valid = kv_cache.roll_step(layer, k, v, padding)
                    mask = None if slot_valid is None else slot_valid[:, None, None, :]
                    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
                pk, pv = kv_cache.rolling_prefix(layer, W - 1)
                kv_cache.roll_write(layer, k, v)
            else:
                keys, values = kv_cache.update(layer, k, v)
                n = min(P, W - 1)
                pk, pv = keys[:, :, P - n: P], values[:, :, P - n: P]
        else:
            pk = pv = None
        Pk = 0 if pk is None else pk.shape[2]
        valid = None if padding is None else padding[:, P - Pk:]
        return sliding_attention(q, k, v, W, pk if Pk else None, pv if Pk else None, valid, dropout_p)
    # fixed: a full cache; the pattern as a mask over positions (left padding: count real tokens)
    if kv_cache is not None:
        k, v = kv_cache.update(layer, k, v)
    if padding is None:
        k_pos = torch.arange(P + T, device=q.device)
    else:
        k_pos = (padding.long().cumsum(-1) - 1).clamp(min=0)
    q_pos = k_pos[..., P:]
    if P == 0 and padding is None:
        return fixed_attention(q, k, v, config.attention_block, config.attention_summary, dropout_p)
    return reference_attention("fixed", q, k, v, block=config.attention_block,
                               summary=config.attention_summary, key_valid=padding, q_pos=q_pos, k_pos=k_pos)
