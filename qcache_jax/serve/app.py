"""The OpenAI-compatible HTTP app (FastAPI): ``POST /v1/chat/completions`` (streamed as
server-sent events or not), ``GET /v1/models``, ``GET /health``, ``GET /metrics``.

Every error is a JSON body ``{"error": {"message", "type", ...}}`` with a 4xx status (5xx only
when generation itself failed), and the server goes on serving. A client that goes away
cancels its request, which frees its slot at the scheduler's next iteration.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import QCacheError
from ..runtime.scheduler import QueueFull, ShuttingDown
from . import protocol
from .metrics import Metrics
from .protocol import APIError
from .service import ChatService

RETRY_AFTER_SECONDS = 1


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class _Generation:
    """One request's events on the event loop, and the metrics they feed."""

    def __init__(self, service: ChatService, metrics: Metrics, chat: protocol.ChatRequest, runtime_request,
                 arrived: float):
        self.service, self.metrics, self.chat, self.arrived = service, metrics, chat, arrived
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.text = service.text_stream(chat)
        self.n_out, self.last, self.finish, self.error = 0, None, None, None

        def deliver(ev):  # called from the scheduler's thread
            if not self.loop.is_closed():
                self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)

        try:
            self.handle = service.scheduler.submit(runtime_request, listener=deliver)
        except QueueFull as e:
            raise APIError(429, str(e), "rate_limit_exceeded", {"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        except ShuttingDown as e:
            raise APIError(503, str(e), "unavailable") from None
        except QCacheError as e:
            raise APIError(400, str(e)) from None
        self.prompt_tokens = len(runtime_request.prompt)

    async def deltas(self):
        """Yield a text piece per generated token (possibly empty) and for the final flush,
        until the request ends (sets ``finish``, ``error``)."""
        while self.finish is None:
            ev = await self.queue.get()
            if ev.tokens:
                self.metrics.generated.inc(len(ev.tokens))
                if self.last is None:
                    self.metrics.ttft.observe(ev.time - self.arrived)
                else:
                    self.metrics.tpot.observe(ev.time - self.last)
                self.last = ev.time
                self.n_out += len(ev.tokens)
            piece = self.text.push(ev.tokens, final=ev.finish is not None)
            if self.text.stopped:  # a stop string: the text ends before it, whatever ended the request
                if ev.finish is None:
                    self.handle.cancel("stop")  # the slot is freed at the next iteration; no more text
                self.finish, self.error = "stop", None
            elif ev.finish is not None:
                self.finish, self.error = ev.finish, ev.error
            if piece or ev.tokens:  # one chunk per generated token (its text may be held back or
                yield piece         # empty, e.g. a special token): clients can time every token
        self.metrics.requests.labels("200" if self.error is None else "500", self.finish).inc()

    def cancel(self) -> None:
        if not self.handle.finished:
            self.handle.cancel("abort")


def create_app(service: ChatService, metrics: Metrics | None = None) -> FastAPI:
    """The app serving ``service``; ``metrics`` defaults to a new registry over its scheduler."""
    metrics = metrics or Metrics(service.scheduler.stats)
    app = FastAPI(title="qcache-jax", docs_url=None, redoc_url=None)
    app.state.service, app.state.metrics = service, metrics
    # Tokenizing and opening images happen off the event loop, one request at a time (the chat
    # template and processor are not meant for concurrent calls); detokenizing a few tokens per
    # step happens on the loop (a read-only decode).
    encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qcache-encode")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(protocol.error_body(str(exc.detail), kind, exc.status_code), status_code=exc.status_code)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        metrics.requests.labels(str(exc.status), "none").inc()
        return _error(exc)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception):  # logged by the server; the client still gets JSON
        metrics.requests.labels("500", "none").inc()
        return JSONResponse(protocol.error_body(f"internal error: {type(exc).__name__}", "server_error", 500),
                            status_code=500)

    @app.get("/health")
    async def health():
        stats = service.scheduler.stats()
        if not service.scheduler.alive:  # nothing would ever answer a request
            return JSONResponse({"status": "scheduler stopped", **stats}, status_code=503)
        return {"status": "ok", **stats}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": 0,
                                            "owned_by": "qcache-jax",
                                            "max_model_len": service.engine.layout.max_len}]}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrived = time.perf_counter()  # time to first token counts from here
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None
        loop = asyncio.get_running_loop()
        layout = service.engine.layout

        def prepare():
            chat = protocol.parse_chat(body, served_model=service.name, max_images=layout.max_images)
            return chat, service.encode(chat)

        chat, runtime_request = await loop.run_in_executor(encoder, prepare)
        gen = _Generation(service, metrics, chat, runtime_request, arrived)
        cid, created = protocol.completion_id(), int(time.time())
        if chat.stream:
            return StreamingResponse(_sse(gen, cid, created), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        async def collect():
            return "".join([piece async for piece in gen.deltas()])

        task = asyncio.ensure_future(collect())
        try:
            while not task.done():  # look for a client that went away once a second
                await asyncio.wait({task}, timeout=1.0)
                if not task.done() and await request.is_disconnected():
                    task.cancel()
                    return Response(status_code=499)
            text = task.result()
        finally:
            gen.cancel()
        if gen.error is not None:
            return JSONResponse(protocol.error_body(f"generation failed: {gen.error}", "server_error", 500),
                                status_code=500)
        return protocol.completion(cid, service.name, text, gen.finish, gen.prompt_tokens, gen.n_out, created=created)

    async def _sse(gen: _Generation, cid: str, created: int):
        def event(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        try:
            yield event(protocol.chunk(cid, service.name, {"role": "assistant", "content": ""}, created=created))
            async for piece in gen.deltas():
                yield event(protocol.chunk(cid, service.name, {"content": piece}, created=created))
            if gen.error is not None:
                yield event(protocol.error_body(f"generation failed: {gen.error}", "server_error", 500))
            else:
                yield event(protocol.chunk(cid, service.name, {}, gen.finish, created=created))
                if gen.chat.include_usage:
                    c = protocol.chunk(cid, service.name, {}, created=created)
                    c["choices"], c["usage"] = [], protocol.usage(gen.prompt_tokens, gen.n_out)
                    yield event(c)
            yield "data: [DONE]\n\n"
        finally:  # also when the client went away (the response task is cancelled)
            gen.cancel()

    return app
