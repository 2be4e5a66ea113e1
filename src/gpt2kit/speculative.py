"""Speculative decoding: a small draft proposes K tokens, the target checks them in one forward.

Leviathan et al. 2023 ("Fast Inference from Transformers via Speculative Decoding") and Chen et al. 2023
("Accelerating Large Language Model Decoding with Speculative Sampling"). One round:

1. the draft, on its own KV cache, samples d_1..d_K from q (its filtered next-token distribution);
2. the target runs [last, d_1..d_K] (K + 1 positions) through its KV cache in ONE forward and gets p at
   every position;
3. d_i is accepted with probability min(1, p(d_i) / q(d_i)), left to right; at the first rejection a
   token is drawn from norm(max(0, p - q)) instead, and if all K are accepted a bonus token is drawn
   from p at position K + 1;
4. both caches are cropped (`KVCache.crop`) back to the tokens kept.

Every emitted token is distributed exactly as the target's (filtered) next-token distribution, so the
output is a sample of the target alone. Temperature, top-k and top-p are applied with gpt2kit.sampling's
filters to p and q alike. Greedy (temperature 0): accept while the draft's token is the target's argmax,
then take the target's argmax -- the output is the target's greedy output.

Batches: every row of a batch keeps the same cache length, so a round keeps n = the smallest number of
accepted tokens over the rows still running, plus one more token per row (a row that accepted more than n
takes its (n+1)-th draft token, which it accepted; a row that stopped at n takes its residual/bonus
sample). Truncating a row's accepted run this way still emits each token from the target's distribution
(the cut depends on the accept decisions of earlier tokens only), so the output is exact; a batch just
gains less than a single row does.

Adaptive K (`adaptive=True`): K grows by one after a round that accepted every draft token and shrinks
by one after a round that rejected within the first half, between 1 and `max_draft_tokens`.
"""

from __future__ import annotations

import torch

from .errors import UserError
from .generate import TextStream, TokenStream, _pick_decoder
from .model.quantized import generation_prefill
from .sampling import filter_logits, greedy, sample

MAX_DRAFT_TOKENS = 16


def check_draft(target, draft) -> None:
    """UserError unless the draft can propose tokens for the target (same vocabulary and end token)."""
    t, d = target.config, draft.config
    if t.vocab_size != d.vocab_size:
        raise UserError(
            f"the draft's vocabulary ({d.vocab_size} tokens) differs from the target's ({t.vocab_size}): "
            "draft and target must share the tokenizer"
        )
    if t.eos_token_id != d.eos_token_id:
        raise UserError(
            f"the draft's end-of-text id ({d.eos_token_id}) differs from the target's ({t.eos_token_id}): "
            "draft and target must share the tokenizer"
        )
    if draft.device != target.device:
        raise UserError(f"the draft is on {draft.device} but the target on {target.device}: put both on one device")


class SpeculativeStream(TokenStream):
    """A TokenStream (same arguments, iteration, `.sequences`, `.stop_reason`) decoded with a draft.

    After (or during) the loop: `.rounds` (target forwards after the prefill), `.proposed` and
    `.accepted` (draft tokens, summed over rows), `.acceptance_rate` and `.draft_tokens` (K now).
    """

    def __init__(self, model, idx, max_new_tokens: int, draft=None, draft_tokens: int = 4,
                 adaptive: bool = False, max_draft_tokens: int = MAX_DRAFT_TOKENS, **kwargs):
        if draft is None:
            raise UserError("speculative decoding needs a draft model")
        if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 1:
            raise UserError(f"draft_tokens must be an integer >= 1, got {draft_tokens!r}")
        if draft_tokens > max_draft_tokens:
            raise UserError(f"draft_tokens must be <= {max_draft_tokens}, got {draft_tokens}")
        if kwargs.get("repetition_penalty") not in (None, 1.0):
            raise UserError("repetition_penalty is not supported with a draft model (p and q would change "
                            "inside a round); drop one of them")
        if kwargs.get("on_overflow", "stop") != "stop":
            raise UserError("on_overflow='slide' is not supported with a draft model")
        check_draft(model, draft)
        fast = kwargs.get("fast", "auto")
        super().__init__(model, idx, max_new_tokens, **{**kwargs, "fast": False})
        from .model.kv_cache import KVCache

        self.draft = draft
        self.draft_tokens = draft_tokens
        self.adaptive = bool(adaptive)
        self.max_draft_tokens = max_draft_tokens
        self.n_ctx = min(model.config.n_ctx, draft.config.n_ctx)
        if self.prompt_length > self.n_ctx:
            raise UserError(f"prompt is {self.prompt_length} tokens but the draft's context is {self.n_ctx}")
        B, T = self.batch_size, self.prompt_length
        # a round writes up to K positions past the last committed token: room for them
        cache_len = max(min(T + max_new_tokens + max_draft_tokens, self.n_ctx), 1)
        # full=True: a round crops the caches, which a rolling window or a linear state cannot undo
        self.cache = KVCache.allocate(model.config, B, cache_len, device=self.device, dtype=model.dtype, full=True)
        self.draft_cache = KVCache.allocate(draft.config, B, cache_len, device=self.device, dtype=draft.dtype,
                                           full=True)
        self._draft_step = _pick_decoder(draft, B, fast)
        # the check's (K + 1)-token forward through gpt2kit.verify_fast where it applies (one row, CPU
        # float32): about one decode step's cost instead of ~2x through model.forward
        self._verifier = self._draft_verifier = None
        if fast and B == 1 and not self.padded:
            from .verify_fast import FastVerifier

            self._verify_rows: dict[tuple[int, int], bool] = {}
            if FastVerifier.supports(model, 1):
                self._verifier = FastVerifier(model)
            if FastVerifier.supports(draft, 1):
                # the draft's steps too: its pending columns (2 after a fully accepted round) in one call,
                # not a forward plus a step (each with the head, most of a small draft's cost), and every
                # product on the same thread pool as the target's check (verify_fast)
                self._draft_verifier = FastVerifier(draft)
        self.positions = (self.out_mask.long().cumsum(-1) - 1).clamp(min=0)
        self.committed = T  # columns of self.out that are final (yielded or waiting to be)
        self.rounds = self.proposed = self.accepted = 0
        self._prefilled = False

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def __next__(self) -> torch.Tensor:
        if self.stop_reason is not None:
            raise StopIteration
        if self.num_generated == self.max_new_tokens:
            return self._end("length")
        if self.track_finished and self.num_generated and bool(self.finished.all()):
            return self._end(self._finish_reason)
        col = self.prompt_length + self.num_generated
        if col == self.committed:
            if self.committed >= self.n_ctx:
                return self._end("context")
            with torch.inference_mode():
                self._round()
        tok = self.out[:, col]
        if self.track_finished:
            tok = tok.masked_fill(self.finished, self.pad_id)
            self.out[:, col] = tok
        self.num_generated += 1
        if self.track_finished:
            self._update_finished(tok, col)
        self._last = tok
        return tok.clone()

    # ----- one round ----------------------------------------------------------------------------------

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        """softmax of the filtered logits [..., V] (float32), the distribution a token is drawn from."""
        shape = logits.shape
        flat = filter_logits(logits.float().reshape(-1, shape[-1]), self.temperature, self.top_k, self.top_p)
        return torch.softmax(flat, dim=-1).reshape(shape)

    def _draft_logits(self, col: int) -> torch.Tensor:
        """Feed the draft every column up to `col` (inclusive) it has not seen; its logits for col + 1."""
        cache = self.draft_cache
        if self._draft_verifier is not None and self._fast_rows(self.draft, col + 1 - cache.length):
            return self._draft_verifier(self.out[:, cache.length : col + 1], cache, last_only=True)[:, -1].float()
        if col - cache.length > 0:  # more than one pending column: a (prefill) forward for all but the last
            mask = self.out_mask[:, :col] if self.padded else None
            with generation_prefill():
                self.draft(self.out[:, cache.length : col], kv_cache=cache, attention_mask=mask, last_only=True)
        mask = self.out_mask[:, : col + 1] if self.padded else None
        pos = self.positions[:, col : col + 1] if self.padded else None
        return self._draft_step(self.out[:, col : col + 1], cache, mask, pos).float()

    def _fast_rows(self, model, T: int) -> bool:
        """Whether gpt2kit.verify_fast runs `model` (the target or the draft) on T new positions."""
        key = (id(model), T)
        if key not in self._verify_rows:
            from .verify_fast import FastVerifier

            self._verify_rows[key] = FastVerifier.supports(model, T)
        return self._verify_rows[key]

    def _verify(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        """The target's logits [B, T, V] for `tokens` [B, T] after the cache, written into the cache."""
        T = tokens.shape[1]
        if self._verifier is not None and self._fast_rows(self.model, T):
            return self._verifier(tokens, cache)
        mask = self.out_mask[:, : cache.length + T] if self.padded else None
        return self.model(tokens, kv_cache=cache, attention_mask=mask).logits

    def _first_token(self, end: int) -> None:
        """The prompt's prefill through the target, whose last logits give the first token, as in plain
        decoding: the same forward, so the cache and that token are plain decoding's own (greedy output is
        then plain greedy output to the bit where the check runs the plain step's arithmetic,
        gpt2kit.verify_fast). Rounds start after it; the draft catches up on its first proposal."""
        mask = self.out_mask[:, :end] if self.padded else None
        with generation_prefill():
            logits = self.model(self.out[:, :end], kv_cache=self.cache, attention_mask=mask, last_only=True).logits[:, -1]
        self.out[:, end] = greedy(logits.float()) if self.temperature == 0 else sample(torch.log(self._probs(logits)), self.generator)
        self.committed = end + 1
        self._prefilled = True

    def _round(self) -> None:
        end = self.committed  # out[:, :end] is final; column end - 1 is the last token
        if not self._prefilled:
            self._first_token(end)
            return
        B = self.batch_size
        remaining = self.prompt_length + self.max_new_tokens - end
        k = max(0, min(self.draft_tokens, remaining - 1, self.n_ctx - 1 - end))
        greedy_mode = self.temperature == 0
        active = ~self.finished if self.track_finished else None

        # 1. the draft proposes d_1..d_k into out[:, end : end + k]
        q = []
        for i in range(k):
            logits = self._draft_logits(end - 1 + i)
            if greedy_mode:
                d = greedy(logits)
            else:
                qi = self._probs(logits)
                q.append(qi.clone())
                d = sample(torch.log(qi), self.generator)
            self.out[:, end + i] = d

        # 2. the target scores [last, d_1..d_k] in one forward over its cache
        cache = self.cache
        logits = self._verify(self.out[:, end - 1 : end + k], cache)
        drafts = self.out[:, end : end + k]

        # 3. accept / reject
        if greedy_mode:
            choice = greedy(logits.float())  # [B, k + 1]
            ok = choice[:, :k] == drafts
        else:
            p = self._probs(logits)  # [B, k + 1, V]
            if k:
                qk = torch.stack(q, 1)  # [B, k, V]
                p_d = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)
                q_d = qk.gather(-1, drafts[..., None]).squeeze(-1)
                u = torch.rand(B, k, generator=self.generator, device=self.device)
                ok = u * q_d < p_d  # u < p/q without dividing; q_d > 0 as d was drawn from q
            else:
                ok = torch.zeros(B, 0, dtype=torch.bool, device=self.device)
        n_row = ok.long().cumprod(-1).sum(-1)  # accepted per row
        running = n_row if active is None or not bool(active.any()) else n_row[active]
        n = int(running.min())
        if greedy_mode:
            z = choice[:, n]
        elif n == k:
            z = sample(torch.log(p[:, k]), self.generator)  # every draft token accepted: a bonus token
        else:
            residual = (p[:, n] - qk[:, n]).clamp_(min=0)
            empty = residual.sum(-1, keepdim=True) == 0  # p == q up to rounding: p itself
            residual = torch.where(empty, p[:, n], residual)
            z = torch.where(n_row > n, drafts[:, n], sample(torch.log(residual), self.generator))
        self.out[:, end + n] = z

        # 4. keep what was accepted: caches hold every committed column but the new last one
        cache.crop(end + n)
        self.draft_cache.crop(min(self.draft_cache.length, end + n))
        self.committed = end + n + 1
        self.rounds += 1
        rows = B if active is None else int(active.sum())
        self.proposed += k * rows
        kept = n_row.clamp(max=n + 1) if n < k else n_row  # draft tokens emitted per row
        self.accepted += int(kept.sum() if active is None else kept[active].sum())
        if self.adaptive and k:
            if n == k:
                self.draft_tokens = min(self.draft_tokens + 1, self.max_draft_tokens)
            elif n < k / 2:
                self.draft_tokens = max(self.draft_tokens - 1, 1)


class SpeculativeTextStream(TextStream):
    """gpt2kit.generate.TextStream over a SpeculativeStream: pass draft=, draft_tokens=, adaptive=."""

    token_stream_class = SpeculativeStream


def speculative_stream(model, draft, idx, max_new_tokens: int, draft_tokens: int = 4, adaptive: bool = False,
                       **kwargs) -> SpeculativeStream:
    """Like gpt2kit.generate.stream (same keyword arguments), decoded with `draft` proposing tokens."""
    return SpeculativeStream(model, idx, max_new_tokens, draft=draft, draft_tokens=draft_tokens,
                             adaptive=adaptive, **kwargs)


def speculative_generate(model, draft, idx, max_new_tokens: int, draft_tokens: int = 4, adaptive: bool = False,
                         **kwargs) -> torch.Tensor:
    """Like gpt2kit.generate.generate: the same output distribution as `model` alone, fewer target steps."""
    s = speculative_stream(model, draft, idx, max_new_tokens, draft_tokens, adaptive, **kwargs)
    for _ in s:
        pass
    return s.sequences
