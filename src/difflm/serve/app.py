"""The HTTP face of the server: OpenAI-compatible routes and the playground page (starlette).

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (JSON, or server-sent events with
`stream: true`), `GET /v1/models`, `GET /health` and `GET /` (the playground). Every refusal is a
JSON body `{"error": {"message", "type", "param", "code"}}` with a 4xx status, and no refusal
reaches the engine: the request is checked (`protocol.parse_request`) before it is queued. The
engine runs on the batcher's thread; a request's events cross to the event loop through an
asyncio queue.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from difflm.serve.batcher import Batcher, Job, QueueFull
from difflm.serve.models import ServedModel
from difflm.serve.protocol import (
    Defaults,
    GenRequest,
    RequestError,
    chunk,
    completion_id,
    parse_request,
    reply,
)


def _error(err: RequestError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class Server:
    """The served models, the batcher and the route handlers."""

    def __init__(self, models: list[ServedModel], defaults: Defaults, batcher: Batcher) -> None:
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"two served models share a name: {names}")
        self.models = {m.name: m for m in models}
        self.defaults, self.batcher = defaults, batcher

    async def list_models(self, request: Request) -> JSONResponse:
        data = [
            {
                "id": m.name,
                "object": "model",
                "created": 0,
                "owned_by": "difflm",
                "kind": "autoregressive" if m.autoregressive else "diffusion",
                "max_length": m.max_length,
            }
            for m in self.models.values()
        ]
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "in_flight": self.batcher.in_flight})

    async def playground(self, request: Request) -> HTMLResponse:
        return HTMLResponse(resources.files("difflm.serve").joinpath("playground.html").read_text("utf-8"))

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, chat: bool) -> Response:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return _error(RequestError(400, f"the body is not valid JSON: {err}"))
        try:
            req = parse_request(body, self.models, chat, self.defaults)
        except RequestError as err:
            return _error(err)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event: dict) -> None:  # called on the batcher thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is gone (server shutting down)
                pass

        job = Job(req, emit)
        try:
            self.batcher.submit(job)
        except QueueFull as err:
            return _error(RequestError(429, str(err), kind="rate_limit_exceeded"))
        rid = completion_id(chat)
        if req.stream:
            return StreamingResponse(self._stream(job, events, rid), media_type="text/event-stream")
        return await self._collect(job, events, rid)

    async def _collect(self, job: Job, events: asyncio.Queue, rid: str) -> JSONResponse:
        try:
            while True:
                event = await events.get()
                if event["type"] == "done":
                    return JSONResponse(
                        reply(job.req, rid, event["text"], event["finish"], event["completion_tokens"])
                    )
                if event["type"] == "error":
                    return JSONResponse(RequestError(500, event["message"], kind="server_error").body(), 500)
        finally:
            job.cancelled = True  # no-op once finished; stops the work when the client went away

    async def _stream(self, job: Job, events: asyncio.Queue, rid: str) -> AsyncIterator[str]:
        req: GenRequest = job.req
        try:
            if req.chat:
                yield _sse(
                    {
                        **chunk(req, rid, None, None),
                        "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}],
                    }
                )
            while True:
                event = await events.get()
                kind = event.pop("type")
                if kind == "text":
                    yield _sse(chunk(req, rid, event["text"], None))
                elif kind == "denoise":
                    yield _sse(chunk(req, rid, None, None, denoise=event))
                elif kind == "done":
                    yield _sse(chunk(req, rid, None, event["finish"]))
                    break
                else:
                    yield _sse(RequestError(500, event["message"], kind="server_error").body())
                    break
            yield _sse("[DONE]")
        finally:
            job.cancelled = True


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return _error(RequestError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"))


def build_app(
    models: list[ServedModel], defaults: Defaults | None = None, max_batch: int = 32, max_queue: int = 256
) -> Starlette:
    """The ASGI app; its lifespan starts and stops the batcher thread."""
    server = Server(models, defaults or Defaults(), Batcher(max_batch=max_batch, max_queue=max_queue))

    @asynccontextmanager
    async def lifespan(app: Starlette):
        server.batcher.start()
        yield
        server.batcher.stop()

    routes = [
        Route("/", server.playground),
        Route("/health", server.health),
        Route("/v1/models", server.list_models),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _http_error})
    app.state.server = server
    return app


@dataclass
class Running:
    """A server started by `serve_in_thread`."""

    url: str
    stop: Callable[[], None]


def serve_in_thread(app: Starlette, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> Running:
    """Run `app` under uvicorn on a background thread (port 0 = any free port); for tests and
    benchmarks. Returns once it accepts connections."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.02)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=timeout)
        sock.close()

    return Running(f"http://{host}:{sock.getsockname()[1]}", stop)
