"""Text generation on a preallocated KV cache: sampling, batches of ragged prompts, streaming.

One request = one prefill of the (left-padded) prompts, then one single-token forward per new token.
Everything a request needs is allocated up front: the KV cache for prompt + new tokens, the output ids
and the attention mask. The per-token loop does no Python work that depends on the vocabulary or the
sequence length, and reads values back from tensors only for the stop checks that were asked for.

    ids = generate(model, idx, max_new_tokens=50, temperature=0.8, top_k=200)  # [B, T + 50]
    for new_ids in stream(model, idx, max_new_tokens=50):  # [B] per step
        ...
    for piece in stream_text(model, tokenizer, "Once upon a time", max_new_tokens=50):
        print(piece, end="", flush=True)

Batches: pass a list of token lists of different lengths (they are left-padded for you), or a padded
[B, T] tensor with `attention_mask` (False = padding). A token's position is the number of real tokens
before it, as in `transformers`, so a padded row generates exactly what it generates alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import torch

from .errors import UserError
from .sampling import next_token, seen_tokens, validate_sampling

# How much of the context a sliding window keeps when it is full (on_overflow="slide"). Sliding re-runs
# the prompt over the kept tokens (positions are absolute in GPT-2, so cached keys cannot be shifted);
# keeping 3/4 makes that re-prefill happen once every n_ctx/4 new tokens.
SLIDE_KEEP_FRACTION = 0.75

STOP_REASONS = {
    "length": "generated max_new_tokens tokens",
    "eos": "every sequence ended with the end-of-text token",
    "stop": "every sequence reached a stop sequence",
    "context": "the sequence filled the model's context window (n_ctx); pass on_overflow='slide' to go on",
}


class GenerationWarning(UserWarning):
    """Generation ended before max_new_tokens for a reason the caller may not expect."""


def generate(
    model,
    idx,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    stop: Sequence[str | Sequence[int]] | str | None = None,
    eos_id: int | None = None,
    seed: int | torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
    truncate: str = "error",
    on_overflow: str = "stop",
    tokenizer=None,
    pad_id: int | None = None,
    fast: bool | str = "auto",
) -> torch.Tensor:
    """Continue each prompt by up to `max_new_tokens` tokens; returns the ids [B, T + n] (n <= N).

    idx: [B, T] or [T] LongTensor (with `attention_mask` [B, T] for a left-padded batch), or a list of
        token lists of any lengths. An empty prompt starts from the end-of-text token.
    temperature: 0 = greedy (argmax); otherwise softmax(logits / temperature) is sampled after
        `top_k` (keep the k most likely) and `top_p` (keep the smallest set with probability >= p).
    repetition_penalty: > 1 discourages tokens already in the row (CTRL / transformers rule).
    stop: stop sequences, as token-id lists or strings (strings need `tokenizer`).
    eos_id: a row that emits it is finished. Finished rows are filled with `pad_id` (default `eos_id`)
        and the batch ends early when every row is finished, so n < N only then, or when the context
        is full (a GenerationWarning says so; on_overflow="slide" keeps going on a sliding window).
    seed: an int or a torch.Generator; the same seed gives the same tokens.
    truncate: "error" (prompt longer than the context is a UserError) or "left" (drop its oldest
        tokens so that the prompt and the new tokens fit, when they can).
    fast: "auto" uses the matrix-vector decode path (gpt2kit.decode_fast) where it applies; False
        always runs model.forward.
    """
    s = stream(
        model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, stop=stop, eos_id=eos_id, seed=seed,
        attention_mask=attention_mask, truncate=truncate, on_overflow=on_overflow, tokenizer=tokenizer,
        pad_id=pad_id, fast=fast,
    )
    for _ in s:
        pass
    if s.stop_reason == "context":
        warnings.warn(
            f"generation stopped after {s.num_generated} of {max_new_tokens} new tokens: {STOP_REASONS['context']}",
            GenerationWarning,
            stacklevel=2,
        )
    return s.sequences


def stream(model, idx, max_new_tokens: int, **kwargs) -> TokenStream:
    """Like `generate`, but an iterator yielding the new token of every row, [B], as it is chosen.

    After the loop, `.sequences` holds what `generate` returns and `.stop_reason` says why it ended
    (one of STOP_REASONS).
    """
    return TokenStream(model, idx, max_new_tokens, **kwargs)


class TokenStream:
    """One generation request: the prefilled cache, the output buffer and the per-row stop state."""

    def __init__(
        self,
        model,
        idx,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        stop: Sequence[str | Sequence[int]] | str | None = None,
        eos_id: int | None = None,
        seed: int | torch.Generator | None = None,
        attention_mask: torch.Tensor | None = None,
        truncate: str = "error",
        on_overflow: str = "stop",
        tokenizer=None,
        pad_id: int | None = None,
        fast: bool | str = "auto",
    ):
        from .model.kv_cache import KVCache

        validate_sampling(temperature, top_k, top_p, repetition_penalty)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise UserError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if truncate not in ("error", "left"):
            raise UserError(f"truncate must be 'error' or 'left', got {truncate!r}")
        if on_overflow not in ("stop", "slide"):
            raise UserError(f"on_overflow must be 'stop' or 'slide', got {on_overflow!r}")
        config = model.config
        self.model = model
        self.n_ctx = config.n_ctx
        self.vocab_size = config.vocab_size
        self.device = model.device
        self.temperature = float(temperature)
        self.top_k, self.top_p = top_k, top_p
        self.repetition_penalty = None if repetition_penalty in (None, 1.0) else float(repetition_penalty)
        self.max_new_tokens = max_new_tokens
        self.slide = on_overflow == "slide"
        self.eos_id = eos_id
        self.pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else config.eos_token_id)
        for name, value in (("eos_id", eos_id), ("pad_id", self.pad_id)):
            if value is not None and not 0 <= value < self.vocab_size:
                raise UserError(f"{name} must be a token id in [0, {self.vocab_size}), got {value}")
        self.generator = _make_generator(seed, self.device)

        ids, mask = _prepare_prompts(idx, attention_mask, config.eos_token_id, self.device)
        ids, mask = _fit_context(ids, mask, self.n_ctx, max_new_tokens, truncate)
        ids = ids.masked_fill(~mask, self.pad_id)  # padding shows as pad_id in the output
        B, T = ids.shape
        self.batch_size, self.prompt_length = B, T
        self.padded = not bool(mask.all())

        # everything the request will touch, allocated once
        self.out = torch.full((B, T + max_new_tokens), self.pad_id, dtype=torch.long, device=self.device)
        self.out[:, :T] = ids
        self.out_mask = torch.ones(B, T + max_new_tokens, dtype=torch.bool, device=self.device)
        self.out_mask[:, :T] = mask
        cache_len = min(T + max(max_new_tokens - 1, 0), self.n_ctx) if not self.slide else self.n_ctx
        cache_len = max(cache_len, T, 1)
        self.cache = KVCache.allocate(config, B, cache_len, device=self.device, dtype=model.dtype)
        self.window_start = 0  # output column held at cache position 0 (moves when the window slides)

        self.seen = seen_tokens(ids, self.vocab_size, mask) if self.repetition_penalty else None
        self.stop_ids, self.stop_bytes = _parse_stops(stop, tokenizer, self.vocab_size, self.device)
        self.tokenizer = tokenizer
        self.track_finished = eos_id is not None or bool(self.stop_ids) or bool(self.stop_bytes)
        self.finished = torch.zeros(B, dtype=torch.bool, device=self.device)
        self._tails = [b""] * B if self.stop_bytes else None
        self._max_stop_bytes = max((len(s) for s in self.stop_bytes), default=0)
        self._finish_reason = "eos"

        self.num_generated = 0
        self.stop_reason: str | None = None
        self._last: torch.Tensor | None = None
        self._decoder = _pick_decoder(model, B, fast)

    # ----- the public view ----------------------------------------------------------------------------

    @property
    def sequences(self) -> torch.Tensor:
        """Prompts and the tokens generated so far, [B, T + n] (left padding kept)."""
        return self.out[:, : self.prompt_length + self.num_generated]

    @property
    def attention_mask(self) -> torch.Tensor:
        """[B, T + n]: False at the prompts' left padding."""
        return self.out_mask[:, : self.prompt_length + self.num_generated]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        if self.stop_reason is not None:
            raise StopIteration
        if self.num_generated == self.max_new_tokens:
            return self._end("length")
        if self.track_finished and self.num_generated and bool(self.finished.all()):
            return self._end(self._finish_reason)
        with torch.inference_mode():
            logits = self._next_logits()
            if logits is None:
                return self._end("context")
            tok = next_token(
                logits.float(), self.temperature, self.top_k, self.top_p, self.repetition_penalty,
                self.seen, self.generator,
            )
            if self.track_finished:
                tok = tok.masked_fill(self.finished, self.pad_id)
            col = self.prompt_length + self.num_generated
            self.out[:, col] = tok
            self.num_generated += 1
            if self.seen is not None:
                self.seen.scatter_(1, tok[:, None], True)
            if self.track_finished:
                self._update_finished(tok, col)
        self._last = tok
        return tok

    # ----- internals ----------------------------------------------------------------------------------

    def _end(self, reason: str):
        self.stop_reason = reason
        raise StopIteration

    def _next_logits(self) -> torch.Tensor | None:
        """Logits [B, V] for the next token: the prefill on the first call, then one decode step."""
        if self._last is None:
            if self.prompt_length >= self.n_ctx and not self.slide:
                return None
            return self._prefill(self.prompt_length)
        end = self.prompt_length + self.num_generated  # columns filled in self.out
        if end - self.window_start >= self.n_ctx:  # the window is full
            if not self.slide:
                return None
            return self._prefill(end)
        pos = None
        mask = None
        if self.padded:
            mask = self.out_mask[:, self.window_start : end]
            pos = self._positions[:, None]
            self._positions = self._positions + 1
        return self._decoder(self._last[:, None], self.cache, mask, pos)

    def _prefill(self, end: int) -> torch.Tensor:
        """Run the window that ends at output column `end` through the model from an empty cache."""
        start = max(0, end - (self.n_ctx if self._last is None else int(self.n_ctx * SLIDE_KEEP_FRACTION)))
        self.window_start = start
        self.cache.reset()
        mask = self.out_mask[:, start:end]
        padded = not bool(mask.all())
        self.padded = padded
        pos = None
        if padded:
            pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
            self._positions = pos[:, -1] + 1  # the next token's position, per row
        from .model.quantized import generation_prefill

        with generation_prefill():
            out = self.model(
                self.out[:, start:end], kv_cache=self.cache, attention_mask=mask if padded else None,
                position_ids=pos, last_only=True,
            )
        return out.logits[:, -1, :]

    def _update_finished(self, tok: torch.Tensor, col: int) -> None:
        if self.eos_id is not None:
            self.finished |= tok == self.eos_id
        gen_start = self.prompt_length
        for seq in self.stop_ids:
            n = seq.numel()
            if col + 1 - gen_start >= n:
                self.finished |= (self.out[:, col + 1 - n : col + 1] == seq).all(-1)
                self._finish_reason = "stop"
        if self.stop_bytes:
            done = self.finished.tolist()
            for row, t in enumerate(tok.tolist()):
                if done[row]:
                    continue
                tail = self._tails[row] + self.tokenizer.decode_bytes([t])
                if any(s in tail for s in self.stop_bytes):
                    self.finished[row] = True
                    self._finish_reason = "stop"
                self._tails[row] = tail[-(self._max_stop_bytes - 1) :] if self._max_stop_bytes > 1 else b""


def stream_text(
    model,
    tokenizer,
    prompt: str | Sequence[int],
    max_new_tokens: int,
    stop: Sequence[str] | str | None = None,
    eos: bool = True,
    **kwargs,
) -> TextStream:
    """Stream the continuation of one prompt as text pieces, UTF-8 safe; see TextStream."""
    return TextStream(model, tokenizer, prompt, max_new_tokens, stop=stop, eos=eos, **kwargs)


class TextStream:
    """An iterator over the text of one continuation, yielded as soon as it is certain.

    Text is decoded with the tokenizer's incremental decoder, so a character split across tokens is
    yielded once it is complete. A stop string ends generation and is not yielded (nor is anything after
    it); text that might be the start of a stop string is held back until it is clear it is not.
    eos=True ends at the tokenizer's end-of-text token, which is not yielded. After the loop,
    `.stop_reason` says why it ended and `.tokens` holds the prompt and generated ids.
    """

    # the token-level stream it reads (gpt2kit.speculative swaps in its SpeculativeStream)
    token_stream_class = TokenStream

    def __init__(self, model, tokenizer, prompt, max_new_tokens: int, stop=None, eos: bool = True, **kwargs):
        if isinstance(stop, str):
            stop = [stop]
        self.stops = [s for s in (stop or []) if s]
        ids = tokenizer.encode(prompt, allowed_special="all") if isinstance(prompt, str) else list(prompt)
        eos_id = tokenizer.eos_id if eos else None
        self.eos_id = eos_id
        self.tokens_stream = self.token_stream_class(
            model, [ids], max_new_tokens, stop=self.stops or None, eos_id=eos_id, tokenizer=tokenizer, **kwargs
        )
        self._decoder = tokenizer.stream_decoder()
        self.stop_reason: str | None = None
        self._pieces = self._run()

    @property
    def tokens(self) -> torch.Tensor:
        return self.tokens_stream.sequences[0]

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def _run(self) -> Iterator[str]:
        stops = self.stops
        held = ""  # decoded text not yet yielded: it may be the start of a stop string
        for tok in self.tokens_stream:
            t = int(tok[0])
            if t == self.eos_id:
                self.stop_reason = "eos"
                break
            held += self._decoder.add(t)
            cut = _find_stop(held, stops)
            if cut is not None:
                self.stop_reason = "stop"
                if held[:cut]:
                    yield held[:cut]
                return
            keep = _stop_prefix_len(held, stops)
            if len(held) > keep:
                yield held[: len(held) - keep]
                held = held[len(held) - keep :]
        else:
            self.stop_reason = self.tokens_stream.stop_reason
        held += self._decoder.flush()
        cut = _find_stop(held, stops)
        if cut is not None:
            held = held[:cut]
            self.stop_reason = "stop"
        if held:
            yield held


def _find_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that is the beginning of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


# ----- request preparation ----------------------------------------------------------------------------


def _make_generator(seed, device) -> torch.Generator | None:
    if seed is None:
        return None
    if isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"seed must be an integer or a torch.Generator, got {seed!r}")
    return torch.Generator(device=device).manual_seed(seed)


def _prepare_prompts(idx, attention_mask, eos_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, T], mask [B, T]) on `device`: ragged lists left-padded, empty prompts started from EOS."""
    if isinstance(idx, torch.Tensor):
        ids = idx.to(device=device, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2:
            raise UserError(f"prompt ids must have shape [batch, time] or [time], got {tuple(idx.shape)}")
        if attention_mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        else:
            mask = attention_mask.to(device=device, dtype=torch.bool)
            if mask.dim() == 1:
                mask = mask[None]
            if mask.shape != ids.shape:
                raise UserError(
                    f"attention_mask must have the prompt's shape {list(ids.shape)}, got {list(mask.shape)}"
                )
            if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
                raise UserError("attention_mask must be left padding: in each row no False may follow a True")
        if ids.size(0) == 0:
            raise UserError("prompt batch is empty")
        rows = None
        if ids.size(1) == 0 or not bool(mask.any(-1).all()):
            rows = [r[m].tolist() for r, m in zip(ids, mask)]
    else:
        if attention_mask is not None:
            raise UserError("attention_mask goes with a padded tensor of ids; lists of ids are padded for you")
        rows = list(idx)
        if not rows or all(isinstance(t, int) for t in rows):
            rows = [rows]  # a single prompt given as one list of ids
        rows = [list(r.tolist() if isinstance(r, torch.Tensor) else r) for r in rows]
        for r in rows:
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in r):
                raise UserError("prompt must be token ids: a list of ints, a list of such lists, or a tensor")
    if rows is not None:
        rows = [r if r else [eos_token_id] for r in rows]  # an empty prompt starts a new document
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = True
        ids, mask = ids.to(device), mask.to(device)
    # drop columns that are padding in every row
    first = int(mask.any(0).int().argmax())
    return ids[:, first:], mask[:, first:]


def _fit_context(ids, mask, n_ctx: int, max_new_tokens: int, truncate: str):
    T = ids.size(1)
    if T > n_ctx and truncate == "error":
        raise UserError(
            f"prompt is {T} tokens but the model's context is {n_ctx} tokens; shorten it or ask for left "
            "truncation (truncate='left', CLI --truncate left)"
        )
    if truncate == "left" and T + max_new_tokens > n_ctx:
        keep = max(n_ctx - max_new_tokens, 1)
        if keep < T:
            ids, mask = ids[:, T - keep :], mask[:, T - keep :]
            # a row truncated to nothing but padding still needs one token to condition on
            empty = ~mask.any(-1)
            if bool(empty.any()):
                mask[empty, -1] = True
    return ids, mask


def _parse_stops(stop, tokenizer, vocab_size: int, device) -> tuple[list[torch.Tensor], list[bytes]]:
    """Stop sequences as (token-id tensors, UTF-8 byte strings)."""
    if stop is None:
        return [], []
    if isinstance(stop, str) or (stop and all(isinstance(t, int) for t in stop)):
        stop = [stop]
    ids, texts = [], []
    for s in stop:
        if isinstance(s, str):
            if not s:
                raise UserError("stop strings must not be empty")
            if tokenizer is None:
                raise UserError("stop strings need a tokenizer (pass tokenizer=...) to read generated text")
            texts.append(s.encode("utf-8"))
        else:
            seq = list(s)
            if not seq or not all(isinstance(t, int) and 0 <= t < vocab_size for t in seq):
                raise UserError(f"a stop sequence must be a non-empty list of token ids < {vocab_size}, got {s!r}")
            ids.append(torch.tensor(seq, dtype=torch.long, device=device))
    return ids, texts


def _pick_decoder(model, batch_size: int, fast):
    """The single-token forward: the matrix-vector fast path where it applies, else model.forward."""
    if fast:
        try:
            from .decode_fast import FastDecoder
        except ImportError:  # pragma: no cover - the fast path is optional
            FastDecoder = None
        if FastDecoder is not None and FastDecoder.supports(model, batch_size):
            return FastDecoder(model)
        if fast is True:
            raise UserError("fast decoding is not available for this model/device/batch; use fast='auto'")

    def forward(tok, cache, mask, pos):
        return model(tok, kv_cache=cache, attention_mask=mask, position_ids=pos).logits[:, -1, :]

    return forward
