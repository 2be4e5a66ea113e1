"""The HTTP app: OpenAI's completion and chat routes over the batching scheduler, plus tokenize,
health, Prometheus metrics and the playground page.

FastAPI (on Starlette, served by uvicorn) because the request bodies are pydantic models: validation,
bounds and the OpenAPI schema the fuzz tests read come from one declaration. Every error a client can
cause is a 4xx in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`; FastAPI's own 422
becomes a 400 naming the field.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import replace
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import UserError
from .metrics import Metrics
from .protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from .scheduler import (
    DEFAULT_PREFILL_TOKENS,
    Delta,
    Failed,
    Finished,
    PromptLogprobs,
    QueueFull,
    SamplingParams,
    Scheduler,
    Sequence,
)

# a client that never reads would otherwise hold its rows forever: checked while a request waits
_DISCONNECT_POLL_S = 0.25
_OPEN_PATHS = ("/", "/health", "/openapi.json", "/docs")
# temperatures below this sample as greedy (vLLM's rule): dividing by them overflows float32
GREEDY_BELOW = 1e-5


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_response(status: int, message: str, type_: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # a union reports one error per branch; the field path is what a client needs
    param = None
    if loc:
        parts = [p for p in loc if not (p[:1].islower() and ("[" in p or p in ("str", "int", "list", "float", "bool")))]
        param = ".".join(parts) if parts else loc[0]
    kind = first.get("type", "")
    if kind == "json_invalid":
        return error_response(400, f"request body is not valid JSON: {first.get('msg', '')}", code="invalid_json")
    msg = first.get("msg", "invalid request")
    where = f"'{param}': " if param else ""
    return error_response(400, f"{where}{msg}", param=param, code=kind or None)


class Server:
    """What the routes share: the model, its tokenizer, the scheduler and the limits."""

    def __init__(self, model, tokenizer, model_name: str, chat_template: str | None = None,
                 max_batch: int = 16, max_queue: int = 64, api_key: str | None = None,
                 prefill_tokens: int = DEFAULT_PREFILL_TOKENS):
        self.model, self.tokenizer = model, tokenizer
        self.model_name = model_name
        self.chat_template = chat_template
        self.n_ctx = model.config.n_ctx
        self.api_key = api_key
        self.metrics = Metrics()
        self.scheduler = Scheduler(model, tokenizer, max_batch=max_batch, max_queue=max_queue, metrics=self.metrics,
                                   prefill_tokens=prefill_tokens)
        self.created = int(time.time())

    # ----- request -> sequences -----------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, allowed_special="all")
        return ids or [self.model.config.eos_token_id]  # an empty prompt starts a new document

    def check_ids(self, ids: list[int], param: str) -> None:
        V = self.model.config.vocab_size
        bad = next((t for t in ids if t >= V), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary [0, {V})", param=param)

    def max_tokens(self, requested: int | None, default: int | None, prompt_len: int, param: str,
                   tokens_param: str = "max_tokens") -> int:
        if prompt_len >= self.n_ctx:
            raise APIError(400, f"This model's maximum context length is {self.n_ctx} tokens; the prompt has "
                                f"{prompt_len} tokens, which leaves no room for a completion.",
                           param=param, code="context_length_exceeded")
        m = requested if requested is not None else (default if default is not None else self.n_ctx - prompt_len)
        if prompt_len + m > self.n_ctx:
            raise APIError(400, f"This model's maximum context length is {self.n_ctx} tokens. However, you "
                                f"requested {prompt_len + m} tokens ({prompt_len} in the prompt, {m} in the "
                                f"completion). Please reduce the prompt or {tokens_param}.",
                           param=tokens_param, code="context_length_exceeded")
        return m

    @staticmethod
    def params(req, max_tokens: int, stop: tuple[str, ...], logprobs: int | None,
               prompt_logprobs: int | None = None) -> SamplingParams:
        stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        if any(not s for s in stops):
            raise APIError(400, "stop strings must not be empty", param="stop")
        top_k = req.top_k if req.top_k not in (None, 0, -1) else None
        top_p = req.top_p if req.top_p not in (None, 1, 1.0) else None
        temperature = 1.0 if req.temperature is None else float(req.temperature)
        if temperature < GREEDY_BELOW:  # logits / 1e-300 overflow: so small a temperature is greedy
            temperature = 0.0
        return SamplingParams(
            max_tokens=max_tokens, temperature=temperature,
            top_p=top_p, top_k=top_k, stop=stops + stop, seed=None if req.seed is None else req.seed % 2**63,
            presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        )

    def token_str(self, t: int) -> str:
        return self.tokenizer.decode_bytes([t]).decode("utf-8", errors="replace")


class _Run:
    """The sequences of one HTTP request, and the events their sink delivers on the event loop."""

    def __init__(self, server: Server, prompts: list[list[int]], params: list[SamplingParams]):
        self.server = server
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.seqs = []
        for i, (ids, p) in enumerate(zip(prompts, params)):
            def sink(ev, i=i):
                loop.call_soon_threadsafe(self.queue.put_nowait, (i, ev))
            self.seqs.append(Sequence(ids, p, sink))
        self.open = len(self.seqs)

    def submit(self) -> None:
        try:
            self.server.scheduler.submit(self.seqs)
        except QueueFull as e:
            raise APIError(429, str(e), type_="rate_limit_error", code="queue_full") from None

    def cancel(self) -> None:
        for s in self.seqs:
            if not s.done:
                self.server.scheduler.cancel(s)

    async def events(self, request: Request | None = None):
        """(index, event) until every sequence has finished; watches for the client leaving."""
        try:
            while self.open:
                try:
                    i, ev = await asyncio.wait_for(self.queue.get(), _DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if request is not None and await request.is_disconnected():
                        return
                    continue
                if isinstance(ev, Finished | Failed):
                    self.open -= 1
                yield i, ev
        finally:
            self.cancel()


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ----- logprobs in OpenAI's two formats ----------------------------------------------------------------


class _LegacyLogprobs:
    """Completions: {"tokens", "token_logprobs", "top_logprobs", "text_offset"}."""

    def __init__(self, server: Server, offset: int = 0):
        self.server, self.offset = server, offset
        self.d = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(self, infos, ids: list[int] | None = None) -> dict:
        """Append entries for `infos` (None = no logprob, e.g. the first prompt token: `ids` names it)."""
        start = {k: len(v) for k, v in self.d.items()}
        for k, info in enumerate(infos):
            s = self.server.token_str(info.id if info is not None else ids[k])
            self.d["tokens"].append(s)
            self.d["text_offset"].append(self.offset)
            self.offset += len(s)
            self.d["token_logprobs"].append(None if info is None else info.logprob)
            self.d["top_logprobs"].append(
                None if info is None else {self.server.token_str(t): lp for t, lp in info.top})
        return {k: v[start[k]:] for k, v in self.d.items()}


def _chat_logprob_entry(server: Server, token: int, logprob: float) -> dict:
    b = server.tokenizer.decode_bytes([token])
    return {"token": b.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(b)}


def _chat_logprobs(server: Server, infos) -> list[dict]:
    out = []
    for info in infos:
        e = _chat_logprob_entry(server, info.id, info.logprob)
        e["top_logprobs"] = [_chat_logprob_entry(server, t, lp) for t, lp in info.top]
        out.append(e)
    return out


# ----- the app -----------------------------------------------------------------------------------------


def create_app(server: Server) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        server.scheduler.start()
        yield
        await run_in_threadpool(server.scheduler.stop)

    app = FastAPI(title="gpt2kit serve", version="1", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request, exc):
        return _validation_error(exc)

    @app.exception_handler(APIError)
    async def _on_api_error(request, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(UserError)
    async def _on_user_error(request, exc: UserError):
        return error_response(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(Exception)
    async def _on_bug(request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}", "server_error")

    @app.middleware("http")
    async def _auth_and_count(request: Request, call_next):
        path = request.url.path
        if server.api_key is not None and path not in _OPEN_PATHS:
            auth = request.headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(given.encode(), server.api_key.encode()):
                return error_response(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                                      "authentication_error", code="invalid_api_key")
        response = await call_next(request)
        if path.startswith("/v1/") and path.endswith("completions"):
            server.metrics.requests.inc()
            if response.status_code >= 400:
                server.metrics.request_errors.inc()
        return response

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground():
        return resources.files("gpt2kit.serve").joinpath("playground.html").read_text(encoding="utf-8")

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": server.scheduler.active, "waiting": server.scheduler.waiting}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    def model_card():
        return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "gpt2kit",
                "max_model_len": server.n_ctx}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != server.model_name:
            raise APIError(404, f"the model '{model_id}' does not exist; this server serves '{server.model_name}'",
                           param="model", code="model_not_found")
        return model_card()

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of 'prompt' or 'messages'", param="prompt")
        text = req.prompt if req.prompt is not None else _render_chat(server, req.messages, req.add_generation_prompt)
        ids = await run_in_threadpool(lambda: server.tokenizer.encode(text, allowed_special="all"))
        return {"tokens": ids, "count": len(ids), "max_model_len": server.n_ctx}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        server.check_ids(req.tokens, "tokens")
        return {"prompt": server.tokenizer.decode(req.tokens)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await _completions(server, req, request)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        return await _chat(server, req, request)

    return app


def _render_chat(server: Server, messages, add_generation_prompt: bool = True) -> str:
    from ..align.chat import apply_chat_template

    msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    try:
        return apply_chat_template(msgs, server.chat_template, add_generation_prompt=add_generation_prompt)
    except UserError as e:
        raise APIError(400, str(e), param="messages") from None


async def _prompts(server: Server, prompt) -> tuple[list[list[int]], list[str]]:
    """Token ids and texts of a completion request's prompt(s): a string, strings, ids or lists of ids."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    ids, texts = [], []
    for p in prompt:
        if isinstance(p, str):
            ids.append(await run_in_threadpool(server.encode, p))
            texts.append(p)
        else:
            server.check_ids(p, "prompt")
            ids.append(list(p))
            texts.append(server.tokenizer.decode(p))
    return ids, texts


def _request_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


async def _completions(server: Server, req: CompletionRequest, request: Request):
    prompts, texts = await _prompts(server, req.prompt)
    n = req.n or 1
    lp = req.logprobs
    echo = bool(req.echo)
    all_ids, all_params = [], []
    for ids in prompts:
        m = server.max_tokens(req.max_tokens, 16, len(ids), "prompt")
        if m == 0 and not echo:
            raise APIError(400, "max_tokens must be >= 1 (0 only with echo, to score the prompt)", param="max_tokens")
        base = server.params(req, m, (), lp, lp if (echo and lp is not None) else None)
        for j in range(n):
            all_ids.append(ids)
            all_params.append(base if base.seed is None else replace(base, seed=(base.seed + j) % 2**63))
    if req.stream and echo and lp is not None:
        raise APIError(400, "echo with logprobs is not supported when streaming", param="echo")
    run = _Run(server, all_ids, all_params)
    run.submit()
    rid, created = _request_id("cmpl"), int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": server.model_name}
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    if req.stream:
        async def stream():
            usage = [0, 0]
            if echo:
                for i in range(len(all_ids)):
                    yield _sse({**head, "choices": [{"index": i, "text": texts[i // n], "logprobs": None,
                                                     "finish_reason": None}]})
            legacy = [_LegacyLogprobs(server) for _ in all_ids]
            async for i, ev in run.events():
                if isinstance(ev, Delta):
                    logprobs = legacy[i].add(ev.tokens) if lp is not None else None
                    yield _sse({**head, "choices": [{"index": i, "text": ev.text, "logprobs": logprobs,
                                                     "finish_reason": None}]})
                elif isinstance(ev, Finished):
                    usage[0] += ev.prompt_tokens
                    usage[1] += ev.completion_tokens
                    yield _sse({**head, "choices": [{"index": i, "text": "", "logprobs": None,
                                                     "finish_reason": ev.reason}]})
                elif isinstance(ev, Failed):
                    yield _sse({"error": {"message": ev.message, "type": "server_error", "param": None, "code": None}})
            if include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(*usage)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    choices = [{"index": i, "text": texts[i // n] if echo else "", "logprobs": None, "finish_reason": None}
               for i in range(len(all_ids))]
    legacy = [_LegacyLogprobs(server) for _ in all_ids]
    usage = [0, 0]
    async for i, ev in run.events(request):
        if isinstance(ev, PromptLogprobs):
            legacy[i].add(ev.tokens, all_ids[i])
        elif isinstance(ev, Delta):
            choices[i]["text"] += ev.text
            if lp is not None:
                if echo and not legacy[i].d["tokens"]:
                    legacy[i].offset = len(choices[i]["text"]) - len(ev.text)
                legacy[i].add(ev.tokens)
        elif isinstance(ev, Finished):
            choices[i]["finish_reason"] = ev.reason
            usage[0] += ev.prompt_tokens
            usage[1] += ev.completion_tokens
        elif isinstance(ev, Failed):
            raise APIError(500, ev.message, "server_error")
    if lp is not None:
        for c, leg in zip(choices, legacy):
            c["logprobs"] = leg.d
    # the prompt is counted once per prompt, as OpenAI counts it
    usage[0] = sum(len(ids) for ids in prompts)
    return {**head, "choices": choices, "usage": _usage(*usage)}


async def _chat(server: Server, req: ChatCompletionRequest, request: Request):
    from ..align.chat import CHAT_STOP_STRINGS

    text = _render_chat(server, req.messages)
    ids = await run_in_threadpool(server.encode, text)
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    tokens_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    m = server.max_tokens(requested, None, len(ids), "messages", tokens_param)
    if m == 0:
        raise APIError(400, f"{tokens_param} must be >= 1", param=tokens_param)
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    lp = (req.top_logprobs or 0) if req.logprobs else None
    base = server.params(req, m, CHAT_STOP_STRINGS, lp)
    n = req.n or 1
    params = [base if base.seed is None else replace(base, seed=(base.seed + j) % 2**63) for j in range(n)]
    run = _Run(server, [ids] * n, params)
    run.submit()
    rid, created = _request_id("chatcmpl"), int(time.time())
    head = {"id": rid, "created": created, "model": server.model_name}
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    if req.stream:
        chunk = {**head, "object": "chat.completion.chunk"}

        async def stream():
            completion = 0
            for i in range(n):
                yield _sse({**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}]})
            async for i, ev in run.events():
                if isinstance(ev, Delta):
                    logprobs = {"content": _chat_logprobs(server, ev.tokens), "refusal": None} if lp is not None else None
                    yield _sse({**chunk, "choices": [{"index": i, "delta": {"content": ev.text},
                                                      "logprobs": logprobs, "finish_reason": None}]})
                elif isinstance(ev, Finished):
                    completion += ev.completion_tokens
                    yield _sse({**chunk, "choices": [{"index": i, "delta": {}, "logprobs": None,
                                                      "finish_reason": ev.reason}]})
                elif isinstance(ev, Failed):
                    yield _sse({"error": {"message": ev.message, "type": "server_error", "param": None, "code": None}})
            if include_usage:
                yield _sse({**chunk, "choices": [], "usage": _usage(len(ids), completion)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    choices = [{"index": i, "message": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None} for i in range(n)]
    completion = 0
    async for i, ev in run.events(request):
        if isinstance(ev, Delta):
            choices[i]["message"]["content"] += ev.text
            if lp is not None:
                if choices[i]["logprobs"] is None:
                    choices[i]["logprobs"] = {"content": [], "refusal": None}
                choices[i]["logprobs"]["content"] += _chat_logprobs(server, ev.tokens)
        elif isinstance(ev, Finished):
            choices[i]["finish_reason"] = ev.reason
            completion += ev.completion_tokens
        elif isinstance(ev, Failed):
            raise APIError(500, ev.message, "server_error")
    return {**head, "object": "chat.completion", "choices": choices, "usage": _usage(len(ids), completion)}
