"""Continuous batching: one thread runs batched decode steps over every active sequence.

Between two steps the scheduler retires finished and cancelled sequences (their rows leave the batch at
once, so a client that disconnects frees its slot within one step) and admits waiting ones: the prompts
admitted together are prefilled together (left-padded groups, `serve/prefill.py`), at most
`prefill_tokens` padded tokens between two decode steps (chunked prefill), so a burst of new prompts or
one long prompt does not stall the running sequences for longer than one chunk. Each new sequence's first
token is sampled from its prefill, and its keys/values join the running batch (`BatchCache`). Every
sequence keeps its own sampling settings and its own torch.Generator, so a seed gives the same text alone
or in a batch.

Results leave through each sequence's `sink(event)`, called on the scheduler thread: `Delta` (new text,
with per-token logprobs when asked), then exactly one `Finished` or `Failed`.
"""

from __future__ import annotations

import collections
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..generate import _find_stop, _stop_prefix_len
from ..sampling import next_token
from .batch_cache import BatchCache
from .metrics import Metrics
from .prefill import PrefillGroup, plan_groups

# padded prompt tokens prefilled between two decode steps (vLLM's max_num_batched_tokens, for a CPU)
DEFAULT_PREFILL_TOKENS = 512
# padded tokens in one prefill group: a burst is prefilled as several groups, one after another, and each
# group's first tokens go out as soon as it is done, so the median request of a burst waits for about half
# of the burst's prefill instead of all of it (the groups are still large enough for a matrix product)
GROUP_TOKENS = 256
# an idle scheduler waits this long for more of a burst of requests before it starts a prefill
# (a lone request pays it once; a burst is prefilled as one batch instead of one by one)
_COALESCE_S = 0.004
_COALESCE_MAX_S = 0.025


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # alternatives per generated token; None = no logprobs at all
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (completions with echo)
    ignore_eos: bool = False


@dataclass
class TokenInfo:
    id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely alternatives (id, logprob), best first


@dataclass
class Delta:
    text: str
    tokens: list[TokenInfo]  # empty unless logprobs were asked


@dataclass
class PromptLogprobs:
    tokens: list[TokenInfo | None]  # one per prompt token; the first has none (nothing before it)


@dataclass
class Finished:
    reason: str  # "stop" (end-of-text or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    message: str


class QueueFull(Exception):
    pass


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[object], None]
    cancelled: bool = False
    # state owned by the scheduler thread
    submitted: float = field(default_factory=time.perf_counter)
    generated: int = 0
    last_token: int = -1
    last_time: float = 0.0
    held: str = ""
    done: bool = False
    _generator: torch.Generator | None = None
    _counts: torch.Tensor | None = None
    _decoder: object = None


class Scheduler:
    def __init__(self, model, tokenizer, max_batch: int = 16, max_queue: int = 64, metrics: Metrics | None = None,
                 prefill_tokens: int = DEFAULT_PREFILL_TOKENS):
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_tokens = max(1, int(prefill_tokens))
        self.group_tokens = GROUP_TOKENS
        self.metrics = metrics or Metrics()
        self.eos_id = self.config.eos_token_id
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._prefills: list[PrefillGroup] = []  # admitted, being prefilled (in order)
        self._active: list[Sequence] = []  # row i of the batch cache is _active[i]
        self._cond = threading.Condition()
        self._stopping = False
        self._last_submit = 0.0
        self._thread: threading.Thread | None = None
        self._cache = BatchCache(self.config, max_batch, model.dtype, model.device)
        self._fast = None
        self._fast_generation = -1
        # MoE layers that drop tokens over capacity route a token differently in a different batch:
        # prefill their prompts one at a time, so a request computes what it computes alone
        self._batch_prefill = not (self.config.moe_experts > 0 and not self.config.moe_dropless)

    # ----- called from any thread ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="gpt2kit-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue all of `seqs` or none: QueueFull when the waiting queue has no room for them."""
        with self._cond:
            if len(self._waiting) + len(seqs) > self.max_queue:
                raise QueueFull(f"the server's queue is full ({self.max_queue} waiting requests); retry later")
            self._waiting.extend(seqs)
            self._last_submit = time.perf_counter()
            self.metrics.queue_depth.set(len(self._waiting))
            self._cond.notify_all()

    def cancel(self, seq: Sequence) -> None:
        """Stop generating for `seq` (its client left); its row is freed before the next step."""
        seq.cancelled = True
        with self._cond:
            self._cond.notify_all()

    @property
    def active(self) -> int:
        """Sequences decoding or being prefilled."""
        return len(self._active) + self._prefilling

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def _prefilling(self) -> int:
        return sum(len(g.sequences) for g in list(self._prefills))

    # ----- the scheduler thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                admit = self._take_admissions()
                if admit is None:
                    break
                try:
                    self._retire([s for s in self._active if s.cancelled])
                    self._drop_cancelled_prefills()
                    self._plan(admit)
                    admit = []
                    self._prefill()
                    if self._active:
                        self._step()
                except Exception as e:  # a bug must fail the requests in flight, not the server
                    pending = [s for g in self._prefills for s in g.sequences] + admit
                    for seq in self._active + [s for s in pending if not s.done]:
                        self._fail(seq, f"internal error during generation: {type(e).__name__}: {e}")
                    self._active, self._prefills = [], []
                    self._cache = BatchCache(self.config, self.max_batch, self.model.dtype, self.model.device)
                self.metrics.running.set(len(self._active))
        for seq in list(self._waiting) + self._active + [s for g in self._prefills for s in g.sequences]:
            self._fail(seq, "the server is shutting down")

    def _take_admissions(self) -> list[Sequence] | None:
        """The waiting sequences that fit in the batch now (None: stop). Sleeps while there is no work."""
        with self._cond:
            while not self._stopping and not self._waiting and not self._active and not self._prefills:
                self._cond.wait()
            if self._stopping:
                return None
            free = self.max_batch - len(self._active) - self._prefilling
            if not self._active and not self._prefills and len(self._waiting) < free:
                # idle: the rest of a burst is usually a few milliseconds behind its first request
                deadline = self._last_submit + _COALESCE_MAX_S
                while not self._stopping and len(self._waiting) < free:
                    wait = min(self._last_submit + _COALESCE_S, deadline) - time.perf_counter()
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
            admit = []
            while self._waiting and len(admit) < free:
                admit.append(self._waiting.popleft())
            self.metrics.queue_depth.set(len(self._waiting))
            return admit

    def _plan(self, seqs: list[Sequence]) -> None:
        """Group newly admitted sequences into prefill groups (identical prompts share a row)."""
        rows: dict[tuple[int, ...], list[Sequence]] = {}
        alone: list[Sequence] = []  # prompt logprobs: every position's logits, one prompt per group
        for seq in seqs:
            if seq.cancelled:
                self._finish(seq, "stop", emit=False)
            elif seq.params.prompt_logprobs is not None:
                alone.append(seq)
            else:
                rows.setdefault(tuple(seq.prompt_ids), []).append(seq)
        prompts = [list(k) for k in rows]
        shared = list(rows.values())
        for group in plan_groups(prompts, self._batch_prefill, max_tokens=self.group_tokens):
            self._prefills.append(PrefillGroup.build([shared[i] for i in group], [prompts[i] for i in group],
                                                     self.config, self.model.device, self.model.dtype))
        for seq in alone:
            self._prefills.append(PrefillGroup.build([[seq]], [seq.prompt_ids], self.config, self.model.device,
                                                     self.model.dtype, full_logits=True))

    def _drop_cancelled_prefills(self) -> None:
        for g in [g for g in self._prefills if all(s.cancelled for s in g.sequences)]:
            self._prefills.remove(g)
            for s in g.sequences:
                self._finish(s, "stop", emit=False)

    def _prefill(self) -> None:
        """Run prefill chunks, oldest group first, up to `prefill_tokens` padded tokens; start the groups
        that finish. With nothing decoding there is nothing to hold up: every group runs to its end."""
        budget = self.prefill_tokens
        while self._prefills and (budget > 0 or not self._active):
            g = self._prefills[0]
            if g.rows and all(s.cancelled for s in g.sequences):
                self._drop_cancelled_prefills()
                continue
            columns = max(1, budget // len(g.rows)) if self._active else max(1, self.prefill_tokens // len(g.rows))
            budget -= g.step(self.model, columns)
            if g.finished:
                self._prefills.pop(0)
                self._start(g)

    def _start(self, g: PrefillGroup) -> None:
        """Sample the first token of every sequence of a prefilled group; the live ones join the batch."""
        prompt_logits = g.prompt_logits() if g.full_logits else None
        for r, row in enumerate(g.rows):
            for seq in row:
                if seq.cancelled:
                    self._finish(seq, "stop", emit=False)
                    continue
                if prompt_logits is not None:
                    seq.sink(PromptLogprobs(self._prompt_logprobs(seq.prompt_ids, prompt_logits,
                                                                  seq.params.prompt_logprobs)))
                self.metrics.prompt_tokens.inc(len(seq.prompt_ids))
                self._init_state(seq)
                if seq.params.max_tokens == 0:  # scoring the prompt only (echo + logprobs)
                    self._finish(seq, "length")
                    continue
                self._emit_token(seq, g.last[r])
                if not seq.done:
                    self._cache.add(g.cache, row=r, length=g.lengths[r])
                    self._active.append(seq)

    def _step(self) -> None:
        n = len(self._active)
        view, mask, pos = self._cache.step_inputs()
        tok = torch.tensor([[s.last_token] for s in self._active], dtype=torch.long, device=self.model.device)
        logits = self._decoder(n)(tok, view, mask, pos)
        self._cache.advance()
        logits = logits.float()
        # greedy rows without penalties: one argmax over the batch instead of one per row
        greedy = [s.params.temperature == 0 and s._counts is None for s in self._active]
        best = logits.argmax(-1).tolist() if any(greedy) else None
        for i, seq in enumerate(self._active[:n]):
            self._emit_token(seq, logits[i], best[i] if greedy[i] else None)
        self._retire([s for s in self._active if s.done])

    def _decoder(self, n: int):
        """The decode step for n rows: gpt2kit's matrix-vector fast path where it applies (as generate)."""
        from ..decode_fast import FastDecoder

        if FastDecoder.supports(self.model, n):
            # a FastDecoder caches numpy views of the cache buffers: a new one when the buffers are new
            if self._fast_generation != self._cache.generation:
                self._fast, self._fast_generation = FastDecoder(self.model), self._cache.generation
            return self._fast
        return lambda tok, cache, mask, pos: self.model(
            tok, kv_cache=cache, attention_mask=mask, position_ids=pos).logits[:, -1, :]

    def _retire(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            row = self._active.index(seq)
            moved = self._cache.remove(row)
            if moved is not None:
                self._active[row] = self._active[moved]
            self._active.pop()
            if not seq.done:
                self._finish(seq, "stop", emit=False)

    # ----- one sequence -------------------------------------------------------------------------------

    def _init_state(self, seq: Sequence) -> None:
        p = seq.params
        seed = p.seed if p.seed is not None else random.getrandbits(63)
        seq._generator = torch.Generator(device=self.model.device).manual_seed(seed)
        if p.presence_penalty or p.frequency_penalty:
            seq._counts = torch.zeros(self.config.vocab_size, device=self.model.device)
        seq._decoder = self.tokenizer.stream_decoder()

    def _emit_token(self, seq: Sequence, logits: torch.Tensor, token: int | None = None) -> None:
        """Choose seq's next token from its logits [V] (token: already chosen, greedily), send the text it
        makes certain, check the stops."""
        p = seq.params
        raw = logits
        if token is not None:
            t = token
        else:
            if seq._counts is not None:
                logits = logits - p.frequency_penalty * seq._counts - p.presence_penalty * (seq._counts > 0)
            t = int(next_token(logits[None], p.temperature, p.top_k, p.top_p, None, None, seq._generator)[0])
            if not 0 <= t < logits.numel():  # a distribution with no finite mass (NaN): take the argmax
                t = int(torch.nan_to_num(raw, nan=float("-inf")).argmax())
        now = time.perf_counter()
        if seq.generated == 0:
            self.metrics.ttft.observe(now - seq.submitted)
        else:
            self.metrics.inter_token.observe(now - seq.last_time)
        seq.last_time = now
        seq.generated += 1
        seq.last_token = t
        self.metrics.completion_tokens.inc()
        if seq._counts is not None:
            seq._counts[t] += 1
        infos = [self._token_info(raw, t, p.logprobs)] if p.logprobs is not None else []
        if t == self.eos_id and not p.ignore_eos:
            self._finish(seq, "stop", tokens=infos)
            return
        seq.held += seq._decoder.add(t)
        cut = _find_stop(seq.held, list(p.stop))
        if cut is not None:
            seq.held = seq.held[:cut]
            self._finish(seq, "stop", tokens=infos, flush=False)
            return
        if seq.generated >= p.max_tokens or len(seq.prompt_ids) + seq.generated >= self.config.n_ctx:
            self._finish(seq, "length", tokens=infos)
            return
        keep = _stop_prefix_len(seq.held, list(p.stop))
        text = seq.held[: len(seq.held) - keep]
        seq.held = seq.held[len(seq.held) - keep :]
        if text or infos:
            seq.sink(Delta(text, infos))

    def _finish(self, seq: Sequence, reason: str, tokens=(), emit: bool = True, flush: bool = True) -> None:
        seq.done = True
        if not emit:
            return
        text = seq.held
        if flush and seq._decoder is not None:
            text += seq._decoder.flush()
            cut = _find_stop(text, list(seq.params.stop))
            if cut is not None:
                text, reason = text[:cut], "stop"
        if text or tokens:
            seq.sink(Delta(text, list(tokens)))
        seq.sink(Finished(reason, len(seq.prompt_ids), seq.generated))

    def _fail(self, seq: Sequence, message: str) -> None:
        seq.done = True
        seq.sink(Failed(message))

    @staticmethod
    def _token_info(logits: torch.Tensor, token: int, top: int) -> TokenInfo:
        logp = torch.log_softmax(logits, dim=-1)
        alts = []
        if top:
            vals, ids = torch.topk(logp, top)
            alts = list(zip(ids.tolist(), vals.tolist()))
        return TokenInfo(token, float(logp[token]), alts)

    def _prompt_logprobs(self, ids: list[int], logits: torch.Tensor, top: int) -> list[TokenInfo | None]:
        return [None] + [self._token_info(logits[i - 1], ids[i], top) for i in range(1, len(ids))]
