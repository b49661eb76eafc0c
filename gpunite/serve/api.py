"""The host's OpenAI-compatible HTTP API (FastAPI): models, completions, chat completions, streaming, errors.

Endpoints: GET /health, GET /v1/models, GET /v1/models/{model}, POST /v1/completions,
POST /v1/chat/completions; the OpenAPI schema is at /openapi.json. Every error, ours or a validation
error, is a 4xx JSON body in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`.

Order of checks on a generation request: signature headers (401), body schema (400), model name (404),
prompt and token limits (400), then the caller's daily quota (429 with Retry-After and `reset_time`), so a
rejected request never uses quota. Each served request produces a Usage record signed by the host.

Chat template (documented, model-agnostic): every message becomes `<|role|>\\n{content}\\n` (role is
system, user or assistant; "developer" counts as system) and the prompt ends with `<|assistant|>\\n`.
Generation stops at the next role tag.

Unsupported OpenAI fields (penalties, logit_bias, user, ...) are accepted and ignored, so existing
clients and evaluation tools work unchanged.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpunite.identity import Identity
from gpunite.records import Usage, sign_record
from gpunite.serve.auth import AuthError, Caller, RequestVerifier
from gpunite.serve.engine import Completion, Engine, EngineError, GenerationEvent, SamplingParams, TokenInfo

CHAT_ROLE_TAGS = ("<|system|>", "<|user|>", "<|assistant|>")
QuotaFunction = Callable[[str, float], tuple[bool, int, float]]  # (caller, now) -> (allowed, remaining, reset)


class ApiError(Exception):
    """An error answered to the client as OpenAI's error JSON with this status."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}
        self.extra = extra or {}


@dataclass
class ServeSettings:
    """What the API needs from its host: the engine, who it is, limits, quotas, and where usage goes."""

    engine: Engine
    model_name: str
    host_identity: Identity
    quota: QuotaFunction
    run_id: str = "local"
    weights_hash: Callable[[], str] = lambda: ""
    on_usage: Callable[[Usage], None] | None = None
    forward_flops_per_token: float = 0.0
    max_tokens_cap: int = 1024
    max_sequences: int = 64  # prompts x n per request
    health_extra: Callable[[], dict[str, Any]] = dict  # more /health fields (a follower's verified round)
    verifier: RequestVerifier = field(default_factory=RequestVerifier)


# ---- request schemas ----

SEED = Field(None, ge=-(2**63), le=2**64 - 1, description="Same seed, prompt and parameters: same sample.")
TEMPERATURE = Field(1.0, ge=0, le=2, description="0 is greedy decoding.")
TOP_P = Field(1.0, ge=0, le=1, description="Nucleus sampling mass.")
STOP = Field(None, description="Up to 4 strings; generation ends before the first one.")
N = Field(1, ge=1, le=16, description="Choices per prompt.")


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(max_length=256)
    prompt: Union[str, list[int], list[Union[str, list[int]]]] = Field(
        description="Text, texts, token ids, or lists of token ids.")
    max_tokens: int | None = Field(16, ge=0, description="Tokens to generate per choice (0 with echo: score).")
    temperature: float = TEMPERATURE
    top_p: float = TOP_P
    stop: Union[str, list[str], None] = STOP
    seed: int | None = SEED
    n: int = N
    logprobs: int | None = Field(None, ge=0, le=20, description="Return this many alternatives per token.")
    echo: bool = Field(False, description="Prepend the prompt (and its token logprobs) to the output.")
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str = Field(max_length=1_000_000)


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(max_length=256)
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    temperature: float = TEMPERATURE
    top_p: float = TOP_P
    stop: Union[str, list[str], None] = STOP
    seed: int | None = SEED
    n: int = N
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    stream: bool = False
    stream_options: StreamOptions | None = None


def chat_prompt(messages: list[ChatMessage]) -> str:
    """The documented chat template."""
    parts = []
    for message in messages:
        role = "system" if message.role == "developer" else message.role
        parts.append(f"<|{role}|>\n{message.content}\n")
    parts.append("<|assistant|>\n")
    return "".join(parts)


# ---- the app ----

def create_app(settings: ServeSettings) -> FastAPI:
    """The FastAPI app serving settings.engine."""
    app = FastAPI(title="gpunite host", version="1", description=__doc__)
    engine = settings.engine
    in_flight: dict[str, int] = defaultdict(int)  # quota reservations until the usage record is written

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(_validation_api_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(ApiError(exc.status_code, str(exc.detail), kind=kind))

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError) -> JSONResponse:
        return _error_response(ApiError(503, f"{exc}", kind="server_error", code="engine_unavailable"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error"))

    async def authenticate(
        request: Request,  # the header parameters below only document the headers in the OpenAPI schema
        x_gpunite_signer: str | None = Header(None, description="Caller's Ed25519 public key (hex)."),
        x_gpunite_timestamp: str | None = Header(None, description="Unix time in seconds, as signed."),
        x_gpunite_nonce: str | None = Header(None, description="A fresh nonce per request."),
        x_gpunite_signature: str | None = Header(None, description="Signature of the request (see auth.py)."),
    ) -> Caller:
        body = await request.body()
        headers = {name: value for name, value in request.headers.items() if name.startswith("x-gpunite-")}
        try:
            return settings.verifier.verify(request.method, request.url.path, body, headers)
        except AuthError as exc:
            raise ApiError(401, str(exc), kind="authentication_error", code="invalid_signature") from None

    def check_model(name: str) -> None:
        if name != settings.model_name:
            raise ApiError(404, f"model {name!r} is not served here; GET /v1/models lists {settings.model_name!r}",
                           param="model", code="model_not_found")

    def take_quota(caller: Caller) -> _Reservation:
        now = time.time()
        allowed, remaining, reset_time = settings.quota(caller.peer_id, now)
        if not allowed or remaining < in_flight[caller.peer_id]:
            reset_at = dt.datetime.fromtimestamp(reset_time, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            retry_after = max(1, int(reset_time - now + 0.999))
            who = "anonymous callers" if caller.anonymous else f"identity {caller.peer_id[:16]}"
            raise ApiError(
                429, f"daily query quota used up for {who}; it resets at {reset_at} (earn credit to raise it)",
                kind="rate_limit_error", code="quota_exceeded", headers={"Retry-After": str(retry_after)},
                extra={"reset_time": reset_time, "reset_at": reset_at},
            )
        in_flight[caller.peer_id] += 1
        return _Reservation(in_flight, caller, remaining - in_flight[caller.peer_id] + 1)

    def record_usage(reservation: _Reservation, prompt_tokens: int, completion_tokens: int) -> None:
        # The reservation ends as the usage record appears, so the query is never counted twice.
        reservation.release()
        if settings.on_usage is None:
            return
        caller = reservation.caller
        now = time.time()
        usage = Usage(
            run_id=settings.run_id, caller=caller.peer_id, request_id=caller.request_id,
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
            flops=settings.forward_flops_per_token * (prompt_tokens + completion_tokens),
            day=dt.datetime.fromtimestamp(now, dt.timezone.utc).strftime("%Y-%m-%d"), time=now,
        )
        settings.on_usage(sign_record(settings.host_identity, usage))

    def sampling(max_tokens: int, temperature: float, top_p: float, stop: str | list[str] | None,
                 seed: int | None, logprobs: int | None, echo_logprobs: bool,
                 extra_stops: tuple[str, ...] = ()) -> SamplingParams:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4:
            raise ApiError(400, f"stop takes at most 4 strings, got {len(stops)}", param="stop")
        if any(not s for s in stops):
            raise ApiError(400, "stop strings must not be empty", param="stop")
        if max_tokens > settings.max_tokens_cap:
            raise ApiError(400, f"max_tokens {max_tokens} is above this host's cap of {settings.max_tokens_cap}",
                           param="max_tokens")
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                              stop=tuple(stops) + extra_stops, seed=seed, logprobs=logprobs,
                              echo_logprobs=echo_logprobs)

    def check_sequence_count(prompt_count: int, n: int) -> None:
        if prompt_count * n > settings.max_sequences:
            raise ApiError(400, f"{prompt_count} prompts x n={n} is more than this host's {settings.max_sequences} "
                                "sequences per request; split the request", param="n")

    def check_sequences(prompts: list[list[int]], params: SamplingParams, n: int) -> None:
        if not prompts:
            raise ApiError(400, "prompt is empty; send a string, a list of strings or token ids", param="prompt")
        check_sequence_count(len(prompts), n)
        for prompt in prompts:
            try:
                engine.check_request(prompt, params)
            except EngineError as exc:
                raise ApiError(400, str(exc), param="prompt") from None

    @app.get("/health")
    async def health() -> dict[str, Any]:
        stats = engine.stats
        return {"status": "ok", "model": settings.model_name, "weights_hash": settings.weights_hash(),
                "requests": stats.requests, "completion_tokens": stats.completion_tokens,
                "largest_batch": stats.largest_batch, "swaps": stats.swaps, **settings.health_extra()}

    def model_card() -> dict[str, Any]:
        return {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "gpunite",
                "weights_hash": settings.weights_hash(), "context_length": engine.context_length}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model}")
    async def get_model(model: str) -> dict[str, Any]:
        check_model(model)
        return model_card()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, caller: Caller = Depends(authenticate)) -> Any:
        check_model(body.model)
        if isinstance(body.prompt, list) and not all(isinstance(item, int) for item in body.prompt):
            check_sequence_count(len(body.prompt), body.n)  # before tokenizing them all
        prompts = _prompt_ids(body.prompt, engine)
        params = sampling(body.max_tokens if body.max_tokens is not None else 16, body.temperature, body.top_p,
                          body.stop, body.seed, body.logprobs, body.echo and body.logprobs is not None)
        check_sequences(prompts, params, body.n)
        reservation = take_quota(caller)
        jobs = _jobs(prompts, params, body.n)
        response_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        prompt_texts = [item if isinstance(item, str) else engine.codec.decode(item)
                        for item in _prompt_items(body.prompt)] if body.echo else []

        def choice_payload(index: int, event_or_completion: GenerationEvent | Completion, first: bool) -> dict:
            item = event_or_completion
            prefix_text = prompt_texts[index // body.n] if body.echo and first else ""
            logprobs = None
            if body.logprobs is not None:
                prompt_infos = list(item.prompt_logprobs or ()) if body.echo and first else []
                logprobs = _completion_logprobs(prompt_infos + list(item.tokens))
            return {"index": index, "text": prefix_text + item.text, "logprobs": logprobs,
                    "finish_reason": item.finish_reason}

        if body.stream:
            def chunk(choices: list[dict], usage: dict | None = None) -> dict:
                payload = {"id": response_id, "object": "text_completion", "created": created,
                           "model": settings.model_name, "choices": choices}
                if usage is not None:
                    payload["usage"] = usage
                return payload

            first_sent: set[int] = set()

            def on_event(index: int, event: GenerationEvent) -> list[dict]:
                if not event.text and event.finish_reason is None and body.logprobs is None \
                        and (not body.echo or index in first_sent):
                    return []
                first = index not in first_sent
                first_sent.add(index)
                return [chunk([choice_payload(index, event, first)])]

            return _sse_response(jobs, engine, on_event, chunk, body.stream_options, reservation, record_usage,
                                 len(prompts))

        try:
            completions_done = await _run_all(jobs, engine)
            prompt_tokens = sum(len(p) for p in prompts)
            completion_tokens = sum(c.completion_tokens for c in completions_done)
            record_usage(reservation, prompt_tokens, completion_tokens)
        finally:
            reservation.release()  # unused when generation failed or the caller went away
        return JSONResponse(
            {"id": response_id, "object": "text_completion", "created": created, "model": settings.model_name,
             "choices": [choice_payload(i, c, True) for i, c in enumerate(completions_done)],
             "usage": _usage(prompt_tokens, completion_tokens)},
            headers={"X-Gpunite-Quota-Remaining": str(reservation.remaining)},
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, caller: Caller = Depends(authenticate)) -> Any:
        check_model(body.model)
        prompt = engine.codec.encode(chat_prompt(body.messages))
        wanted = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = wanted if wanted is not None else max(
            0, min(settings.max_tokens_cap, engine.context_length - len(prompt)))
        top_k = (body.top_logprobs or 0) if body.logprobs else None
        params = sampling(max_tokens, body.temperature, body.top_p, body.stop, body.seed, top_k, False,
                          extra_stops=CHAT_ROLE_TAGS)
        check_sequences([prompt], params, body.n)
        reservation = take_quota(caller)
        jobs = _jobs([prompt], params, body.n)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        if body.stream:
            def chunk(choices: list[dict], usage: dict | None = None) -> dict:
                payload = {"id": response_id, "object": "chat.completion.chunk", "created": created,
                           "model": settings.model_name, "choices": choices}
                if usage is not None:
                    payload["usage"] = usage
                return payload

            started: set[int] = set()

            def on_event(index: int, event: GenerationEvent) -> list[dict]:
                out = []
                if index not in started:
                    started.add(index)
                    out.append(chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None}]))
                if event.text or event.finish_reason is not None or body.logprobs:
                    delta = {"content": event.text} if event.text else {}
                    logprobs = _chat_logprobs(event.tokens) if body.logprobs else None
                    out.append(chunk([{"index": index, "delta": delta, "logprobs": logprobs,
                                       "finish_reason": event.finish_reason}]))
                return out

            return _sse_response(jobs, engine, on_event, chunk, body.stream_options, reservation, record_usage, 1)

        try:
            completions_done = await _run_all(jobs, engine)
            completion_tokens = sum(c.completion_tokens for c in completions_done)
            record_usage(reservation, len(prompt), completion_tokens)
        finally:
            reservation.release()
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text},
                    "logprobs": _chat_logprobs(c.tokens) if body.logprobs else None,
                    "finish_reason": c.finish_reason} for i, c in enumerate(completions_done)]
        return JSONResponse(
            {"id": response_id, "object": "chat.completion", "created": created, "model": settings.model_name,
             "choices": choices, "usage": _usage(len(prompt), completion_tokens)},
            headers={"X-Gpunite-Quota-Remaining": str(reservation.remaining)},
        )

    return app


# ---- helpers ----

def _error_response(exc: ApiError) -> JSONResponse:
    error = {"message": exc.message, "type": exc.kind, "param": exc.param, "code": exc.code, **exc.extra}
    return JSONResponse({"error": error}, status_code=exc.status, headers=exc.headers)


def _validation_api_error(exc: RequestValidationError) -> ApiError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return ApiError(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}",
                        code="invalid_json")
    where = ".".join(location) or "body"
    message = first.get("msg", "invalid value")
    same_field = [e for e in errors if [str(p) for p in e.get("loc", ()) if p != "body"][:1] == location[:1]]
    if location and len(same_field) > 1:  # a union: name the field, not each type it could have been
        where = location[0]
        message = f"{message} (or any of the {len(same_field) - 1} other accepted forms)"
    return ApiError(400, f"{where}: {message}", param=where, code="invalid_value")


def _prompt_items(prompt: str | list[int] | list[str | list[int]]) -> list[str | list[int]]:
    """The request's prompts, each a string or a list of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(item, int) for item in prompt):
        return [prompt]  # type: ignore[list-item]
    return list(prompt)  # type: ignore[arg-type]


def _prompt_ids(prompt: str | list[int] | list[str | list[int]], engine: Engine) -> list[list[int]]:
    return [engine.codec.encode(item) if isinstance(item, str) else list(item) for item in _prompt_items(prompt)]


def _jobs(prompts: list[list[int]], params: SamplingParams, n: int) -> list[tuple[list[int], SamplingParams]]:
    """One sequence per (prompt, choice); choice j of a seeded request uses seed + j, so choices differ."""
    jobs = []
    for prompt in prompts:
        for choice in range(n):
            seed = params.seed
            if seed is not None and choice:
                seed = (seed + choice) % 2**64
            jobs.append((prompt, SamplingParams(**{**params.__dict__, "seed": seed})))
    return jobs


class _Reservation:
    """One query held against a caller's quota from acceptance until its usage record exists (or it fails)."""

    def __init__(self, in_flight: dict[str, int], caller: Caller, remaining: int):
        self._in_flight = in_flight
        self.caller = caller
        self.remaining = remaining
        self._held = True

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        self._in_flight[self.caller.peer_id] -= 1
        if self._in_flight[self.caller.peer_id] <= 0:
            del self._in_flight[self.caller.peer_id]


class _ReservedStream(StreamingResponse):
    """A streaming response that ends its quota reservation however the stream ends, even unstarted."""

    def __init__(self, content: AsyncIterator[bytes], reservation: _Reservation, **kwargs: Any):
        super().__init__(content, **kwargs)
        self._reservation = reservation

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._reservation.release()


async def _run_all(jobs: list[tuple[list[int], SamplingParams]], engine: Engine) -> list[Completion]:
    completions = list(await asyncio.gather(*(engine.complete(prompt, params) for prompt, params in jobs)))
    for completion in completions:
        if completion.finish_reason == "error":
            raise ApiError(503, f"{completion.error}; retry the request", kind="server_error",
                           code="generation_failed")
    return completions


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _completion_logprobs(tokens: list[TokenInfo]) -> dict[str, list]:
    """The legacy completions logprobs object: tokens, token_logprobs, top_logprobs, text_offset."""
    texts, logprobs, tops, offsets = [], [], [], []
    offset = 0
    for info in tokens:
        texts.append(info.text)
        logprobs.append(info.logprob)
        tops.append(dict(info.top) if info.logprob is not None else None)
        offsets.append(offset)
        offset += len(info.text)
    return {"tokens": texts, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(tokens: tuple[TokenInfo, ...] | list[TokenInfo]) -> dict[str, list]:
    return {"content": [
        {"token": info.text, "logprob": info.logprob, "bytes": list(info.text.encode()),
         "top_logprobs": [{"token": text, "logprob": value, "bytes": list(text.encode())} for text, value in info.top]}
        for info in tokens
    ]}


def _sse(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def _sse_response(jobs, engine: Engine, on_event, chunk, stream_options: StreamOptions | None,
                  reservation: _Reservation, record_usage, prompt_count: int) -> StreamingResponse:
    """Stream every job's events as server-sent events, in arrival order, then usage (if asked) and [DONE]."""

    async def events() -> AsyncIterator[bytes]:
        merged: asyncio.Queue = asyncio.Queue()
        completion_tokens = [0] * len(jobs)

        async def pump(index: int, prompt: list[int], params: SamplingParams) -> None:
            try:
                async for event in engine.stream(prompt, params):
                    await merged.put((index, event))
            except EngineError as exc:  # e.g. the host is shutting down: end this choice, not the stream
                await merged.put((index, GenerationEvent("", (), finish_reason="error", error=str(exc))))

        tasks = [asyncio.create_task(pump(i, prompt, params)) for i, (prompt, params) in enumerate(jobs)]
        unfinished = len(jobs)
        recorded = False
        try:
            while unfinished:
                index, event = await merged.get()
                completion_tokens[index] = event.completion_tokens
                if event.finish_reason == "error":
                    yield _sse({"error": {"message": f"{event.error}; retry the request", "type": "server_error",
                                          "param": None, "code": "generation_failed"}})
                else:
                    for payload in on_event(index, event):
                        yield _sse(payload)
                if event.finish_reason is not None:
                    unfinished -= 1
            if stream_options is not None and stream_options.include_usage:
                yield _sse(chunk([], _usage(_prompt_tokens(jobs, prompt_count), sum(completion_tokens))))
            recorded = True  # before [DONE], so the record exists once the caller has its whole answer
            record_usage(reservation, _prompt_tokens(jobs, prompt_count), sum(completion_tokens))
            yield _sse("[DONE]")
        finally:
            for task in tasks:
                task.cancel()
            if not recorded:  # the caller went away mid-answer: it still used what was generated
                record_usage(reservation, _prompt_tokens(jobs, prompt_count), sum(completion_tokens))

    return _ReservedStream(events(), reservation, media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache",
                                    "X-Gpunite-Quota-Remaining": str(reservation.remaining)})


def _prompt_tokens(jobs: list[tuple[list[int], SamplingParams]], prompt_count: int) -> int:
    """Prompt tokens counted once per prompt, not once per choice."""
    per_prompt = len(jobs) // prompt_count
    return sum(len(prompt) for prompt, _ in jobs[::per_prompt])
