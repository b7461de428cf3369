"""`microgpt serve`: an OpenAI-compatible HTTP API and a web playground over the batcher.

FastAPI declares the routes and validates requests against pydantic models; uvicorn serves them.
Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, and the
playground page at /. Every error a client causes is OpenAI's error object with a 4xx status and
one log line, never a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from microgpt_cli.config import MAX_SEED
from microgpt_cli.device import resolve_device
from microgpt_cli.errors import MicroGPTError
from microgpt_cli.infer.sampling import Sampler, prompt_ids
from microgpt_cli.io.checkpoint import load, resolve_path
from microgpt_cli.serve.batcher import Batcher, Piece
from microgpt_cli.serve.batcher import Request as Job

log = logging.getLogger("microgpt.serve")

MAX_BODY_BYTES = 1 << 20  # 1 MiB: far more than a context's worth of text
MAX_PROMPTS = 64  # prompts in one completions request
CHAT_STOPS = ("\nuser:", "\nsystem:")  # a transcript's next turn ends the assistant's


@dataclass(frozen=True)
class ModelInfo:
    """What GET /v1/models tells about the model, besides its id."""

    id: str
    checkpoint: str
    parameters: int
    tokenizer: str
    vocab_size: int
    context: int
    step: int | None
    val_loss: float | None


class ClientError(Exception):
    """A request the server refuses: OpenAI's error object with this status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status,
                            headers={"WWW-Authenticate": "Bearer"} if self.status == 401 else None)


# --- request schemas (OpenAI's, strictly typed: "5" is not a number) ----------------------------


class _Sampling(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)  # an extension of OpenAI's API
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: dict[str, bool] | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ClientError(400, "stop takes up to 4 non-empty strings", "stop")
        return stops


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for completions


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)


def transcript(messages: list[ChatMessage]) -> str:
    """Chat messages as one plain-text prompt: these models are not instruction-tuned, so the
    transcript simply asks them to continue a conversation written out as text."""
    lines = [f"{'system' if m.role == 'developer' else m.role}: {m.content}" for m in messages]
    return "\n".join(lines) + "\nassistant:"


# --- the application -----------------------------------------------------------------------------


class BodyLimit:
    """Refuse a request body over `limit` bytes with 413, before it is read whole."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = ClientError(413, f"the request body is over {self.limit:,} bytes", code="body_too_large")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await too_large.response()(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise too_large
            return message

        await self.app(scope, limited, send)


class Server:
    """The state behind the routes: the batcher, the limits and the key."""

    def __init__(self, sampler: Sampler, info: ModelInfo, api_key: str | None, max_tokens_limit: int):
        self.sampler = sampler
        self.info = info
        self.api_key = api_key
        self.max_tokens_limit = max_tokens_limit
        self.batcher = Batcher(sampler)
        self.started = int(time.time())

    # Requests become jobs for the batcher, whose pieces come back through an asyncio queue.

    def jobs(self, prompts: list[str], body: _Sampling, max_tokens: int, stops: list[str],
             loop: asyncio.AbstractEventLoop, pieces: asyncio.Queue[tuple[int, Piece]]) -> tuple[list[Job], list[int]]:
        slots = self.batcher.engine.slots
        if body.n > slots:
            raise ClientError(400, f"n must be at most {slots} (the server's --max-batch)", "n")
        if max_tokens > self.max_tokens_limit:
            raise ClientError(400, f"max_tokens must be at most {self.max_tokens_limit:,} (the server's "
                                   f"--max-tokens-limit), got {max_tokens:,}", "max_tokens")
        jobs, lengths = [], []
        for p, prompt in enumerate(prompts):
            try:
                ids = prompt_ids(self.sampler.tokenizer, prompt)
            except MicroGPTError as exc:
                raise ClientError(400, str(exc), "prompt") from None
            lengths.append(len(ids))

            def deliver(piece: Piece, p: int = p) -> None:
                loop.call_soon_threadsafe(pieces.put_nowait, (p, piece))

            top_k = body.top_k if body.top_k is None or body.top_k < self.sampler.vocab else None
            jobs.append(Job(ids, max_tokens, body.n, body.temperature, top_k, body.top_p, stops, body.seed, deliver))
        return jobs, lengths


def build_app(server: Server) -> FastAPI:
    """The FastAPI application serving `server`."""
    app = FastAPI(title="microgpt", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ClientError)
    async def client_error(request: Request, exc: ClientError) -> Response:
        log.info("%s %s %d %s", request.method, request.url.path, exc.status, exc.message)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0]
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = where[0] if where else None  # the field; deeper parts name union members and list items
        if first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        else:
            message = f"{param}: {first.get('msg', 'invalid value')}" if param else str(first.get("msg"))
        return await client_error(request, ClientError(400, message, param, "invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return await client_error(request, ClientError(exc.status_code, str(exc.detail), kind=kind))

    async def authorized(request: Request) -> None:
        if server.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), server.api_key.encode()):
            raise ClientError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                              code="invalid_api_key")

    guarded = [Depends(authorized)]

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "active": server.batcher.active, "waiting": server.batcher.waiting.qsize()}

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict[str, Any]:
        info = server.info
        return {"object": "list", "data": [{
            "id": info.id, "object": "model", "created": server.started, "owned_by": "microgpt",
            "microgpt": {k: v for k, v in info.__dict__.items() if k != "id"},
        }]}

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not 1 <= len(prompts) <= MAX_PROMPTS:
            raise ClientError(400, f"prompt takes a string or a list of 1 to {MAX_PROMPTS} strings", "prompt")
        max_tokens = server.max_tokens_limit if body.max_tokens is None else body.max_tokens
        return await respond(request, body, prompts, max_tokens, body.stops(), chat=False)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat(body: ChatRequest, request: Request) -> Response:
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = server.max_tokens_limit if max_tokens is None else max_tokens
        return await respond(request, body, [transcript(body.messages)], max_tokens, [*body.stops(), *CHAT_STOPS],
                             chat=True)

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> str:
        return (resources.files("microgpt_cli.serve") / "static" / "playground.html").read_text(encoding="utf-8")

    async def respond(request: Request, body: _Sampling, prompts: list[str], max_tokens: int, stops: list[str],
                      chat: bool) -> Response:
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[tuple[int, Piece]] = asyncio.Queue()
        jobs, lengths = server.jobs(prompts, body, max_tokens, stops, loop, pieces)
        context = server.info.context
        started = time.perf_counter()
        for job in jobs:
            server.batcher.submit(job)
        reply = Reply(chat, server.info.id, body.n, len(prompts), lengths, context)

        async def events() -> AsyncIterator[tuple[int, Piece]]:
            remaining = len(jobs) * body.n
            try:
                while remaining:
                    p, piece = await pieces.get()
                    remaining -= piece.finish_reason is not None
                    yield p, piece
            finally:
                for job in jobs:  # a client that went away frees its slots at the next step
                    job.cancelled = True
                seconds = time.perf_counter() - started
                log.info("%s %s 200 prompt=%d completion=%d %.2fs%s", request.method, request.url.path,
                         sum(lengths), reply.completion_tokens, seconds, "" if not remaining else " (client left)")

        if not body.stream:
            async for p, piece in events():
                reply.add(p, piece)
            if "error" in reply.finish:
                raise ClientError(500, "decoding failed on the server; see its log", kind="server_error")
            return JSONResponse(reply.whole())
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        async def stream() -> AsyncIterator[str]:
            if chat:
                for i in range(body.n):
                    yield reply.sse(reply.chunk(i, "", None, role=True))
            async for p, piece in events():
                reply.add(p, piece)
                if piece.finish_reason == "error":
                    yield reply.sse({"error": {"message": "decoding failed on the server; see its log",
                                               "type": "server_error", "param": None, "code": None}})
                elif piece.text or piece.finish_reason:
                    yield reply.sse(reply.chunk(p * body.n + piece.index, piece.text, piece.finish_reason))
            if include_usage:
                yield reply.sse({**reply.chunk(0, "", None), "choices": [], "usage": reply.usage()})
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


class Reply:
    """The OpenAI response of one request, whole or as stream chunks."""

    def __init__(self, chat: bool, model: str, n: int, prompts: int, prompt_tokens: list[int], context: int):
        self.chat, self.model, self.n = chat, model, n
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.texts: list[list[str]] = [[] for _ in range(prompts * n)]
        self.finish: list[str | None] = [None] * (prompts * n)
        self.tokens = [0] * (prompts * n)
        self.prompt_tokens = prompt_tokens
        self.truncated = any(length > context for length in prompt_tokens)
        self.context = context

    @property
    def completion_tokens(self) -> int:
        return sum(self.tokens)

    def add(self, prompt: int, piece: Piece) -> None:
        choice = prompt * self.n + piece.index
        self.texts[choice].append(piece.text)
        if piece.finish_reason is not None:
            self.finish[choice], self.tokens[choice] = piece.finish_reason, piece.tokens

    def usage(self) -> dict[str, int]:
        prompt = sum(self.prompt_tokens)
        return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens}

    def _head(self, kind: str) -> dict[str, Any]:
        head: dict[str, Any] = {"id": self.id, "object": kind, "created": self.created, "model": self.model}
        if self.truncated:  # not in OpenAI's format: says the model saw only the prompt's end
            head["prompt_truncated_to"] = self.context
        return head

    def whole(self) -> dict[str, Any]:
        finished = enumerate(zip(self.texts, self.finish, strict=True))
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": "".join(t)},
                        "logprobs": None, "finish_reason": f} for i, (t, f) in finished]
            return {**self._head("chat.completion"), "choices": choices, "usage": self.usage()}
        choices = [{"index": i, "text": "".join(t), "logprobs": None, "finish_reason": f} for i, (t, f) in finished]
        return {**self._head("text_completion"), "choices": choices, "usage": self.usage()}

    def chunk(self, index: int, text: str, finish: str | None, role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice]}

    @staticmethod
    def sse(event: dict[str, Any]) -> str:
        return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"


def model_info(checkpoint_path: Path, sampler: Sampler, metrics: dict[str, Any]) -> ModelInfo:
    name = checkpoint_path.parent.name if checkpoint_path.name in ("best.pt", "last.pt") else checkpoint_path.stem
    val = metrics.get("val_loss")
    return ModelInfo(
        id=name or "microgpt", checkpoint=str(checkpoint_path), parameters=sampler.engine.num_params,
        tokenizer=sampler.tokenizer.name, vocab_size=sampler.tokenizer.vocab_size,
        context=sampler.engine.context, step=metrics.get("step"), val_loss=float(val) if val is not None else None,
    )



def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, told of a stop request first (so in-flight streams end at once), and
    exiting normally afterwards instead of re-raising the signal: Ctrl-C is how a server stops."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]):
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.on_exit()
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def serve(checkpoint: str | Path = "out", host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 8, max_tokens_limit: int = 1024, device: str = "auto", quantize: str | None = None,
          announce: Callable[[str], None] = print) -> None:
    """Serve a checkpoint until SIGINT/SIGTERM: the OpenAI-compatible API under /v1 and the
    playground at /. `announce` gets the startup lines (the URL, warnings)."""
    if not 0 <= port <= 65535:
        raise MicroGPTError(f"--port must be between 0 and 65535, got {port}")
    if max_tokens_limit < 1:
        raise MicroGPTError(f"--max-tokens-limit must be at least 1, got {max_tokens_limit}")
    if api_key is not None and not api_key.strip():
        raise MicroGPTError("--api-key must not be empty")
    if not port_free(host, port):
        raise MicroGPTError(f"cannot listen on {host}:{port}: the port is in use or the address is not this "
                            "machine's; pick another --port or --host")
    path = resolve_path(checkpoint)
    state = load(path)
    resolved = resolve_device(device)
    model = state.build_model().to(resolved).eval()
    sampler = Sampler(model, state.tokenizer_object(), max_batch, quantize)
    server = Server(sampler, model_info(path, sampler, state.metrics), api_key, max_tokens_limit)
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    config = uvicorn.Config(BodyLimit(build_app(server), MAX_BODY_BYTES), host=host, port=port, log_level="warning",
                            access_log=False, lifespan="off", timeout_graceful_shutdown=10)
    uv = _Uvicorn(config, server.batcher.request_stop)
    info = server.info
    shown = f"[{host}]" if ":" in host else host
    announce(f"microgpt serve: {path} ({info.parameters / 1e6:.2f}M parameters, {info.tokenizer} tokenizer, "
             f"context {info.context}) on {sampler.engine.device}, up to {max_batch} samples at once")
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        announce(f"warning: listening on {host} without --api-key: anyone who can reach this machine can use it")
    announce(f"playground: http://{shown}:{port}/   API: http://{shown}:{port}/v1   (Ctrl-C stops)")
    server.batcher.start()
    try:
        uv.run()
    finally:
        server.batcher.stop()
