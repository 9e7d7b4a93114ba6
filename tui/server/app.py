"""The ASGI app (Starlette): OpenAI's /v1/chat/completions, /v1/completions, /v1/models, and /health, /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.batching import Event, Failed, Finished, GenerationRequest, PromptTooLong, QueueFull, Scheduler, TextDelta
from engine.bench import worker_traffic
from engine.errors import IkctlError
from engine.model import Model
from engine.tool_calls import ToolCall, ToolCallStream, parse_tool_calls
from tui.server import metrics
from tui.server.requests import ApiError, ChatParams, CompletionParams, Sampling, parse_chat, parse_completion
from tui.server.responses import Reply, sse

log = logging.getLogger("ikctl.serve")
PUBLIC = ("/health", "/v1/health")  # answered without a key, as llama-server's
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


@dataclass(frozen=True)
class ServerConfig:
    model_ids: tuple[str, ...]  # names a request's `model` may use; the first is the one /v1/models lists
    api_key: str | None = None
    metrics: bool = False


class ServerState:
    """The model and its scheduler once loaded (None before), and what /health says."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.model: Model | None = None
        self.scheduler: Scheduler | None = None
        self.requests_total = 0
        self.created = int(time.time())

    def ready(self, model: Model, scheduler: Scheduler) -> None:
        self.model, self.scheduler = model, scheduler

    def loaded(self) -> tuple[Model, Scheduler]:
        if self.model is None or self.scheduler is None:
            raise ApiError(503, "the model is loading; retry when GET /health answers 200", "unavailable_error",
                           code=503)
        return self.model, self.scheduler

    def check_model(self, name: str | None) -> None:
        if name and name not in self.config.model_ids:
            raise ApiError(404, f"the model {name!r} does not exist here; this server runs "
                           f"{self.config.model_ids[0]!r} (GET /v1/models)", param="model", code="model_not_found")


# ---- the event stream of one generation ----------------------------------------------------------------------
class Generation:
    """A submitted request's events, delivered from the scheduler's thread into this event loop."""

    def __init__(self, scheduler: Scheduler, request: GenerationRequest) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.scheduler = scheduler
        try:
            self.ticket = scheduler.submit(request, self._emit)
        except QueueFull as e:
            raise ApiError(429, str(e), "rate_limit_error", code=429) from None
        except PromptTooLong as e:
            raise ApiError(400, str(e), param="messages", code="context_length_exceeded") from None
        except IkctlError as e:
            raise ApiError(400, str(e)) from None

    def _emit(self, event: Event) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed (shutdown): nobody is listening
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def events(self, request: Request | None = None) -> AsyncIterator[Event]:
        """Until Finished or Failed; with `request`, ends early (and frees the slot or the queue place) when its
        client goes away, within DISCONNECT_POLL_S."""
        try:
            while True:
                try:
                    event = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S if request else None)
                except TimeoutError:
                    if request is not None and await request.is_disconnected():
                        return
                    continue
                yield event
                if isinstance(event, Finished | Failed):
                    return
        finally:
            self.scheduler.cancel(self.ticket)  # a no-op once finished; else the slot is freed at the next step


def _failure(event: Failed) -> ApiError:
    if event.worker:
        return ApiError(503, event.message, "unavailable_error", code=503)
    return ApiError(500, event.message, "server_error", code=500)


# ---- endpoints -----------------------------------------------------------------------------------------------
async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except ValueError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None


def _generation_request(ids: list[int], s: Sampling, special: bool) -> GenerationRequest:
    return GenerationRequest(tuple(ids), s.max_tokens, s.params, s.stop, special, s.ignore_eos)


async def chat_completions(request: Request) -> Response:
    state: ServerState = request.app.state.serve
    model, scheduler = state.loaded()
    p = parse_chat(await _json(request))
    state.check_model(p.model)
    try:
        prompt = await asyncio.to_thread(model.apply_chat_template, p.messages, True, p.tools)
        ids = await asyncio.to_thread(model.tokenize, prompt, True, model.tokenizer.add_bos)
    except IkctlError as e:
        raise ApiError(400, str(e), param="messages") from None
    gen = Generation(scheduler, _generation_request(ids, p.sampling, special=p.tools is not None))
    reply = Reply("chat.completion", state.config.model_ids[0])
    if p.stream:
        return _stream(request, gen, reply, p)
    return await _complete(request, gen, reply, p)


async def apply_template(request: Request) -> Response:
    """llama-server's POST /apply-template: the prompt a chat request would run, not run."""
    state: ServerState = request.app.state.serve
    model, _ = state.loaded()
    p = parse_chat(await _json(request))
    try:
        prompt = await asyncio.to_thread(model.apply_chat_template, p.messages, True, p.tools)
    except IkctlError as e:
        raise ApiError(400, str(e), param="messages") from None
    return JSONResponse({"prompt": prompt})


async def completions(request: Request) -> Response:
    state: ServerState = request.app.state.serve
    model, scheduler = state.loaded()
    p = parse_completion(await _json(request))
    state.check_model(p.model)
    ids = p.prompt if isinstance(p.prompt, list) else \
        await asyncio.to_thread(model.tokenize, p.prompt, True, model.tokenizer.add_bos)
    gen = Generation(scheduler, _generation_request(ids, p.sampling, special=False))
    reply = Reply("text_completion", state.config.model_ids[0])
    if p.stream:
        return _stream(request, gen, reply, p)
    return await _complete(request, gen, reply, p)


def _tool_names(p: ChatParams | CompletionParams) -> list[str] | None:
    tools = getattr(p, "tools", None)
    return [t["function"]["name"] for t in tools] if tools else None


def _log_line(done: Finished) -> str:
    t = done.timings
    return (f"prompt {t.prompt_n} tokens {t.prompt_ms / 1e3:.2f} s, generated {t.predicted_n} tokens "
            f"{t.predicted_ms / 1e3:.2f} s, {done.reason}")


async def _complete(request: Request, gen: Generation, reply: Reply, p: ChatParams | CompletionParams) -> Response:
    parts: list[str] = []
    async for event in gen.events(request):
        if isinstance(event, TextDelta):
            parts.append(event.text)
        elif isinstance(event, Failed):
            raise _failure(event)
        else:
            text, calls = "".join(parts), ()
            names = _tool_names(p)
            if names is not None:
                parsed = parse_tool_calls(text, names)
                text, calls = parsed.content, parsed.tool_calls
            request.state.log = _log_line(event) + (f", {len(calls)} tool calls" if calls else "")
            return JSONResponse(reply.body(text, calls, event))
    request.state.log = "client went away"
    return Response(status_code=499)


def _stream(request: Request, gen: Generation, reply: Reply, p: ChatParams | CompletionParams) -> StreamingResponse:
    names = _tool_names(p)

    def delta(text: str) -> bytes:
        return sse(reply.chunk({"content": text} if reply.chat else text))

    async def body() -> AsyncIterator[bytes]:
        request.state.log = "client went away"
        if reply.chat:
            yield sse(reply.chunk({"role": "assistant", "content": ""}))
        held = ToolCallStream(names) if names is not None else None  # tool calls go out whole, at the end
        async for event in gen.events(request):  # also while queued: a client gone is noticed without a token sent
            if isinstance(event, TextDelta):
                out = held.feed(event.text) if held is not None else event.text
                if out:
                    yield delta(out)
            elif isinstance(event, Failed):
                request.state.log = f"failed: {event.message}"
                yield sse(_failure(event).body())
                return
            else:
                calls: tuple[ToolCall, ...] = ()
                if held is not None:
                    rest, calls = held.end()
                    if rest:
                        yield delta(rest)
                    if calls:
                        yield sse(reply.chunk({"tool_calls": [c.as_dict(i) for i, c in enumerate(calls)]}))
                finish = "tool_calls" if calls else event.reason
                final = reply.chunk({} if reply.chat else "", finish, {"timings": event.timings.as_dict()})
                yield sse(final)
                if p.include_usage:
                    yield sse(reply.usage_chunk(event))
                yield sse("[DONE]")
                request.state.log = _log_line(event) + (f", {len(calls)} tool calls" if calls else "")

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def list_models(request: Request) -> Response:
    state: ServerState = request.app.state.serve
    meta: dict[str, Any] = {}
    if state.model is not None:
        meta = {"n_ctx": state.model.n_ctx, "n_vocab": state.model.n_vocab, "arch": state.model.arch}
    return JSONResponse({"object": "list", "data": [
        {"id": state.config.model_ids[0], "object": "model", "created": state.created, "owned_by": "ikctl",
         "meta": meta}]})


async def health(request: Request) -> Response:
    state: ServerState = request.app.state.serve
    if state.scheduler is None:
        return JSONResponse(ApiError(503, "Loading model", "unavailable_error", code=503).body(), 503)
    problem = state.scheduler.stats().problem
    if problem:
        return JSONResponse(ApiError(503, problem, "unavailable_error", code=503).body(), 503)
    return JSONResponse({"status": "ok"})


async def metrics_text(request: Request) -> Response:
    state: ServerState = request.app.state.serve
    if not state.config.metrics:
        raise ApiError(501, "metrics are off; start the server with --metrics", "not_supported_error", code=501)
    model, scheduler = state.loaded()
    text = metrics.render(scheduler.stats(), worker_traffic(model), state.requests_total)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


# ---- errors, the key and the log -------------------------------------------------------------------------------
async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    request.state.log = exc.message
    return JSONResponse(exc.body(), exc.status)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse(ApiError(exc.status_code, message, kind, code=exc.status_code).body(), exc.status_code)


class Gate:
    """Counts requests, checks the bearer key (all but /health) and logs one line per request when it ends."""

    def __init__(self, app: ASGIApp, state: ServerState, write: Callable[[str], None]) -> None:
        self.app, self.state, self.write = app, state, write

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.state.requests_total += 1
        t0, status = time.perf_counter(), [0]
        path = scope["path"]

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            key = self.state.config.api_key
            if key and path not in PUBLIC and not _key_ok(scope, key):
                scope.setdefault("state", {})["log"] = "missing or wrong API key"
                error = ApiError(401, "missing or wrong API key: send the header `Authorization: Bearer KEY` with "
                                 "the key of the server's --api-key-file", "authentication_error",
                                 code="invalid_api_key")
                await JSONResponse(error.body(), 401)(scope, receive, watch)
            else:
                await self.app(scope, receive, watch)
        finally:
            if not (path in (*PUBLIC, "/metrics") and status[0] == 200):
                note = scope.get("state", {}).get("log", "")
                client = scope.get("client") or ("-", 0)
                self.write(f"{client[0]} {scope['method']} {path} {status[0] or '-'} "
                           f"{time.perf_counter() - t0:.2f} s" + (f" | {note}" if note else ""))


def _key_ok(scope: Scope, key: str) -> bool:
    headers = dict(scope.get("headers") or [])
    given = headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer":
        value = headers.get(b"x-api-key", b"").decode("latin-1")
    return hmac.compare_digest(value.strip().encode(), key.encode())


def make_app(state: ServerState, write: Callable[[str], None] = log.info) -> ASGIApp:
    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/completions", completions, methods=["POST"]),
        Route("/apply-template", apply_template, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/models", list_models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/health", health, methods=["GET"]),
        Route("/metrics", metrics_text, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={ApiError: _api_error, HTTPException: _http_error})
    app.state.serve = state
    return Gate(app, state, write)
