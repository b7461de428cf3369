"""`microgpt serve`: an OpenAI-compatible HTTP API and a web playground over the batcher.

FastAPI declares the routes and validates requests against pydantic models; uvicorn serves them.
Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models (and /v1/models/{id}),
POST /tokenize and POST /detokenize (vLLM's), GET /metrics, GET /health, and the playground page at
/. Every error a client causes is OpenAI's error object with a 4xx status and one log line, never a
traceback.

Completions score text as vLLM does: `echo` returns the prompt, `logprobs` the log-probabilities
of the prompt's tokens (scored on the batcher's thread with infer/scoring.py) and of the new ones
(reported by the batcher); `max_tokens: 0` with `echo` only scores. This is what
lm-evaluation-harness's `local-completions` model needs.

Around the routes: `gate.Gate` checks the Host, the key and the body of every request first;
`connections.GuardedH11` bounds what one connection may hold; `settings.ServeSettings` has every
limit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from microgpt_cli.config import MAX_PENALTY, MAX_SEED, InvalidSetting, check_threads, stop_strings
from microgpt_cli.data.chat import Message
from microgpt_cli.data.tokenizer import Tokenizer
from microgpt_cli.device import resolve_device
from microgpt_cli.errors import MicroGPTError
from microgpt_cli.infer.chat import ChatPrompt, chat_prompt, prompt_room
from microgpt_cli.infer.engine import MAX_SLOTS
from microgpt_cli.infer.sampling import Sampler, prompt_ids
from microgpt_cli.infer.scoring import Scorer, TokenLogprob
from microgpt_cli.io.checkpoint import load, resolve_path
from microgpt_cli.serve.batcher import Batcher, Piece
from microgpt_cli.serve.batcher import Request as Job
from microgpt_cli.serve.connections import bind, guarded_protocol, open_file_limit, setup_logging
from microgpt_cli.serve.gate import ClientError, Gate
from microgpt_cli.serve.logprobs import CompletionLogprobs, chat_logprobs, prompt_entries, token_text
from microgpt_cli.serve.metrics import Metrics
from microgpt_cli.serve.settings import ServeSettings
from microgpt_cli.serve.unsupported import unsupported_parameter
from microgpt_cli.training.events import val_scope

log = logging.getLogger("microgpt.serve")

MAX_PROMPT_ROOM = 1 << 40  # /tokenize renders a whole chat: far more tokens than any request holds
MAX_LOGPROBS = 5  # alternatives per token in completions (OpenAI's limit)
MAX_TOP_LOGPROBS = 20  # and in chat completions
STATIC = resources.files("microgpt_cli.serve") / "static"


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
    val_scope: str = ""  # what val_loss was measured on where not the whole split ("on 12% of ...")
    chat_template: bool = False  # False: chat is a plain transcript (the model is not instruction-tuned)


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
    frequency_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    presence_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)

    @model_validator(mode="before")
    @classmethod
    def _implemented(cls, body: Any) -> Any:
        name = unsupported_parameter(body)
        if name is not None:
            raise ClientError(400, f"{name} is not supported by this server; leave it out", name,
                              "unsupported_parameter")
        return body

    def stops(self) -> list[str]:
        try:
            stops = stop_strings(self.stop)  # checked as generate's --stop is
        except InvalidSetting as exc:
            raise ClientError(400, str(exc), "stop") from None
        if len(stops) > 4:
            raise ClientError(400, "stop takes up to 4 strings", "stop")
        return list(stops)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]  # text or token ids, one prompt or several
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class TokenizeRequest(BaseModel):  # vLLM's: a prompt, or chat messages as the chat route writes them
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True  # these tokenizers add none
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    tokens: list[int]


def chat_messages(messages: list[ChatMessage], template: bool) -> list[Message]:
    """OpenAI's roles in the template's: developer is system; tool results have no place in the
    template (a plain transcript writes them as `tool:` lines)."""
    roles = {"developer": "system"}
    if template and any(m.role == "tool" for m in messages):
        raise ClientError(400, "this model's chat template has no tool role; send system, user and assistant "
                               "messages", "messages")
    return [Message(roles.get(m.role, m.role), m.content) for m in messages]


# --- the application -----------------------------------------------------------------------------


class Server:
    """The state behind the routes: the batcher, the settings and the metrics."""

    def __init__(self, sampler: Sampler, info: ModelInfo, settings: ServeSettings):
        self.sampler = sampler
        self.info = info
        self.settings = settings
        self.batcher = Batcher(sampler)
        self.scorer = Scorer(sampler.engine, batch_size=sampler.engine.slots)
        self.metrics = Metrics(waiting=self.batcher.waiting.qsize, active=lambda: self.batcher.active)
        self.started = int(time.time())

    def prompt_ids(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
        """The token ids of each prompt of a completions request: text (where "<|endoftext|>" is that
        token, as vLLM reads it), or ids checked against the vocabulary."""
        several = isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], int)
        prompts: list[Any] = list(prompt) if several else [prompt]
        most = self.settings.max_prompts
        if not prompt or not 1 <= len(prompts) <= most:
            raise ClientError(400, f"prompt takes a string, a list of token ids, or a list of 1 to {most} of "
                                   "either", "prompt")
        ids = []
        for item in prompts:
            if isinstance(item, str):
                try:
                    ids.append(prompt_ids(self.sampler.tokenizer, item, special=True))
                except MicroGPTError as exc:
                    raise ClientError(400, str(exc), "prompt") from None
            elif not item or not all(0 <= token < self.sampler.vocab for token in item):
                raise ClientError(400, f"a prompt of token ids needs at least one id, each from 0 to "
                                       f"{self.sampler.vocab - 1:,}", "prompt")
            else:
                ids.append(item)
        return ids

    async def score_prompts(self, prompts: list[list[int]], top_k: int) -> list[list[tuple[int, TokenLogprob | None]]]:
        """Each prompt's tokens with their log-probabilities, scored on the batcher's thread."""
        scored = await asyncio.wrap_future(self.batcher.call(lambda: self.scorer.rolling(prompts, None, top_k)))
        return [prompt_entries(ids, result) for ids, result in zip(prompts, scored, strict=True)]

    # Requests become jobs for the batcher, whose pieces come back through an asyncio queue.

    def jobs(self, prompts: list[list[int]], body: _Sampling, max_tokens: int, stops: list[str],
             loop: asyncio.AbstractEventLoop, pieces: asyncio.Queue[tuple[int, Piece]],
             logprobs: int | None, stop_ids: frozenset[int] = frozenset()) -> list[Job]:
        slots = self.batcher.engine.slots
        if body.n > slots:
            raise ClientError(400, f"n must be at most {slots} (the server's --max-batch)", "n")
        limit = self.settings.max_tokens_limit
        if max_tokens > limit:
            raise ClientError(400, f"max_tokens must be at most {limit:,} (the server's --max-tokens-limit), got "
                                   f"{max_tokens:,}", "max_tokens")
        jobs = []
        for p, ids in enumerate(prompts):

            def deliver(piece: Piece, p: int = p) -> None:
                loop.call_soon_threadsafe(pieces.put_nowait, (p, piece))

            top_k = body.top_k if body.top_k is None or body.top_k < self.sampler.vocab else None
            jobs.append(Job(ids, max_tokens, body.n, body.temperature, top_k, body.top_p, stops, body.seed, deliver,
                            frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty,
                            logprobs=logprobs, stop_ids=stop_ids))
        return jobs

    def chat_prompt(self, messages: list[ChatMessage], room: int) -> ChatPrompt:
        """A chat request's prompt, with the model's template (a plain transcript without one); a
        message the tokenizer cannot encode is a 400."""
        tokenizer = self.sampler.tokenizer
        try:
            return chat_prompt(tokenizer, chat_messages(messages, tokenizer.chat_template is not None), room)
        except MicroGPTError as exc:
            raise ClientError(400, str(exc), "messages") from None

    def model_card(self) -> dict[str, Any]:
        info = self.info
        return {"id": info.id, "object": "model", "created": self.started, "owned_by": "microgpt",
                "microgpt": {k: v for k, v in info.__dict__.items() if k != "id"}}


def build_app(server: Server) -> Gate:
    """The ASGI application serving `server`: the FastAPI routes behind the Gate."""
    app = FastAPI(title="microgpt", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ClientError)
    async def client_error(request: Request, exc: ClientError) -> Response:
        exc.log(request.method, request.url.path)
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

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "active": server.batcher.active, "waiting": server.batcher.waiting.qsize()}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.text(), media_type=server.metrics.content_type)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != server.info.id:
            raise ClientError(404, f"no model {model_id!r}: this server serves {server.info.id!r}", "model",
                              "model_not_found", kind="not_found_error")
        return server.model_card()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        prompts = server.prompt_ids(body.prompt)
        max_tokens = server.settings.max_tokens_limit if body.max_tokens is None else body.max_tokens
        shown = Shown(body.logprobs, [server.sampler.tokenizer.decode(ids) for ids in prompts] if body.echo else None)
        if body.echo and body.logprobs is not None:
            shown.prompt_logprobs = await server.score_prompts(prompts, body.logprobs)
        return await respond(request, body, prompts, max_tokens, body.stops(), chat=False, shown=shown)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Response:
        if body.top_logprobs is not None and not body.logprobs:
            raise ClientError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = server.settings.max_tokens_limit if max_tokens is None else max_tokens
        # The model's own template (a plain transcript without one), the oldest turns dropped to fit.
        prompt = server.chat_prompt(body.messages, prompt_room(server.info.context, max_tokens))
        shown = Shown((body.top_logprobs or 0) if body.logprobs else None)
        return await respond(request, body, [prompt.ids], max_tokens, [*body.stops(), *prompt.stops], chat=True,
                             shown=shown, stop_ids=prompt.stop_ids)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        if (body.prompt is None) == (body.messages is None):
            raise ClientError(400, "give either prompt or messages", "prompt")
        if body.messages is not None:  # what the chat route sends, before it drops anything to fit
            tokens = server.chat_prompt(body.messages, MAX_PROMPT_ROOM).ids
        else:
            try:
                tokens = server.sampler.tokenizer.encode_special(body.prompt or "")
            except MicroGPTError as exc:
                raise ClientError(400, str(exc), "prompt") from None
        answer: dict[str, Any] = {"count": len(tokens), "max_model_len": server.info.context, "tokens": tokens}
        if body.return_token_strs:
            answer["token_strs"] = [token_text(server.sampler.tokenizer, t) for t in tokens]
        return answer

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        if not all(0 <= token < server.sampler.tokenizer.vocab_size for token in body.tokens):
            raise ClientError(400, f"tokens must be ids from 0 to {server.sampler.tokenizer.vocab_size - 1:,}",
                              "tokens")
        return {"prompt": server.sampler.tokenizer.decode(body.tokens)}

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> str:
        return (STATIC / "playground.html").read_text(encoding="utf-8")

    @app.get("/favicon.ico")
    async def favicon() -> Response:
        return Response((STATIC / "favicon.svg").read_bytes(), media_type="image/svg+xml",
                        headers={"Cache-Control": "max-age=86400"})

    async def respond(request: Request, body: _Sampling, prompts: list[list[int]], max_tokens: int, stops: list[str],
                      chat: bool, shown: Shown, stop_ids: frozenset[int] = frozenset()) -> Response:
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[tuple[int, Piece]] = asyncio.Queue()
        jobs = server.jobs(prompts, body, max_tokens, stops, loop, pieces, shown.logprobs, stop_ids)
        lengths = [len(ids) for ids in prompts]
        context = server.info.context
        started = time.perf_counter()
        for job in jobs:
            server.batcher.submit(job)
        reply = Reply(chat, server.info.id, body.n, len(prompts), lengths, context, server.sampler.tokenizer, shown)
        metrics = server.metrics

        async def events() -> AsyncIterator[tuple[int, Piece]]:
            remaining = len(jobs) * body.n
            first = True
            try:
                while remaining:
                    p, piece = await pieces.get()
                    if first and piece.text:
                        metrics.time_to_first_token.observe(time.perf_counter() - started)
                        first = False
                    remaining -= piece.finish_reason is not None
                    yield p, piece
            finally:
                for job in jobs:  # a client that went away frees its slots at the next step
                    job.cancelled = True
                seconds = time.perf_counter() - started
                metrics.latency.observe(seconds)
                metrics.prompt_tokens.inc(sum(lengths))
                metrics.generation_tokens.inc(reply.completion_tokens)
                if remaining:
                    metrics.cancelled.inc()
                status = 200 if body.stream or not remaining else 499  # 499: the client closed the request
                log.info("%s %s %d prompt=%d completion=%d %.2fs%s", request.method, request.url.path, status,
                         sum(lengths), reply.completion_tokens, seconds, "" if not remaining else " (client left)")

        if not body.stream:
            async def collect() -> None:
                async for p, piece in events():
                    reply.add(p, piece)

            if not await unless_client_leaves(request, collect()):
                return Response(status_code=499)  # no one reads it
            if "error" in reply.finish:
                raise ClientError(500, "decoding failed on the server; see its log", kind="server_error")
            return JSONResponse(reply.whole())
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        async def stream() -> AsyncIterator[str]:
            for i in range(len(prompts) * body.n):
                if chat:
                    yield reply.sse(reply.chunk(i, "", None, role=True))
                elif shown.echo is not None:
                    yield reply.sse(reply.echo_chunk(i))
            async for p, piece in events():
                reply.add(p, piece)
                if piece.finish_reason == "error":
                    yield reply.sse({"error": {"message": "decoding failed on the server; see its log",
                                               "type": "server_error", "param": None, "code": None}})
                elif piece.text or piece.finish_reason:
                    choice = p * body.n + piece.index
                    yield reply.sse(reply.chunk(choice, piece.text, piece.finish_reason, logprobs=piece.logprobs))
            if include_usage:
                yield reply.sse({**reply.chunk(0, "", None), "choices": [], "usage": reply.usage()})
            yield "data: [DONE]\n\n"

        # Starlette ends the stream (and so events(), which cancels the jobs) when the client leaves.
        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return Gate(app, server.settings, server.metrics)


async def unless_client_leaves(request: Request, work: Awaitable[None]) -> bool:
    """Run `work` to its end, unless the client disconnects first (then cancel it): whether it ended.
    The body is read already, so the next message a client sends is its disconnect."""

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        task.cancel()  # nothing if it ended
    try:
        await task
    except asyncio.CancelledError:
        return False
    return True


@dataclass
class Shown:
    """What a reply shows besides the new text: each token's log-probability with this many
    alternatives (None: not asked), and for completions with `echo` each prompt's text and, with
    `logprobs`, its scored tokens."""

    logprobs: int | None = None
    echo: list[str] | None = None
    prompt_logprobs: list[list[tuple[int, TokenLogprob | None]]] | None = None


class Reply:
    """The OpenAI response of one request, whole or as stream chunks."""

    def __init__(self, chat: bool, model: str, n: int, prompts: int, prompt_tokens: list[int], context: int,
                 tokenizer: Tokenizer, shown: Shown):
        self.chat, self.model, self.n = chat, model, n
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.texts: list[list[str]] = [[] for _ in range(prompts * n)]
        self.finish: list[str | None] = [None] * (prompts * n)
        self.tokens = [0] * (prompts * n)
        self.prompt_tokens = prompt_tokens
        self.truncated = any(length > context for length in prompt_tokens)
        self.context = context
        self.tokenizer, self.shown = tokenizer, shown
        self.sampled: list[list[TokenLogprob]] = [[] for _ in range(prompts * n)]
        self.streamed: dict[int, CompletionLogprobs] = {}  # a streamed choice's logprobs so far

    @property
    def completion_tokens(self) -> int:
        return sum(self.tokens)

    def add(self, prompt: int, piece: Piece) -> None:
        choice = prompt * self.n + piece.index
        self.texts[choice].append(piece.text)
        self.sampled[choice].extend(piece.logprobs)
        self.tokens[choice] = piece.tokens
        if piece.finish_reason is not None:
            self.finish[choice] = piece.finish_reason

    def usage(self) -> dict[str, int]:
        prompt = sum(self.prompt_tokens)
        return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens}

    def _head(self, kind: str) -> dict[str, Any]:
        head: dict[str, Any] = {"id": self.id, "object": kind, "created": self.created, "model": self.model}
        if self.truncated:  # not in OpenAI's format: says the model saw only the prompt's end
            head["prompt_truncated_to"] = self.context
        return head

    def _echo(self, choice: int) -> tuple[str, list[tuple[int, TokenLogprob | None]]]:
        """The echoed prompt of a choice, and its scored tokens (none without logprobs)."""
        if self.shown.echo is None:
            return "", []
        prompt = choice // self.n
        return self.shown.echo[prompt], self.shown.prompt_logprobs[prompt] if self.shown.prompt_logprobs else []

    def _logprobs(self, choice: int, sampled: list[TokenLogprob], start: bool = False) -> dict[str, Any] | None:
        """The logprobs object of these new tokens of a choice (after its echoed prompt's, if `start`)."""
        if self.shown.logprobs is None:
            return None
        if self.chat:
            return chat_logprobs(self.tokenizer, sampled)
        built = self.streamed.setdefault(choice, CompletionLogprobs(self.tokenizer))
        return built.add([*(self._echo(choice)[1] if start else []), *((e.token, e) for e in sampled)])

    def whole(self) -> dict[str, Any]:
        choices = []
        for i, (text, finish) in enumerate(zip(self.texts, self.finish, strict=True)):
            logprobs = self._logprobs(i, self.sampled[i], start=True)
            if self.chat:
                message = {"role": "assistant", "content": "".join(text)}
                choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish})
            else:
                choices.append({"index": i, "text": self._echo(i)[0] + "".join(text), "logprobs": logprobs,
                                "finish_reason": finish})
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self._head(kind), "choices": choices, "usage": self.usage()}

    def echo_chunk(self, index: int) -> dict[str, Any]:
        """The first chunk of a streamed choice with echo: the prompt (and its logprobs)."""
        choice = {"index": index, "text": self._echo(index)[0], "logprobs": self._logprobs(index, [], start=True),
                  "finish_reason": None}
        return {**self._head("text_completion"), "choices": [choice]}

    def chunk(self, index: int, text: str, finish: str | None, role: bool = False,
              logprobs: Sequence[TokenLogprob] = ()) -> dict[str, Any]:
        shown = None if role else self._logprobs(index, list(logprobs))
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": shown, "finish_reason": finish}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": index, "text": text, "logprobs": shown, "finish_reason": finish}
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
        val_scope=val_scope(metrics.get("val_tokens"), metrics.get("val_split_tokens")),
        chat_template=sampler.tokenizer.chat_template is not None,
    )


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


class Service:
    """A checkpoint served on a socket: built (port taken, checkpoint loaded and checked) by the
    constructor, then `run` until SIGINT/SIGTERM or `stop` (from another thread).

    `warnings` lists what the startup lines should say besides the URL."""

    def __init__(self, checkpoint: str | Path, settings: ServeSettings, device: str = "auto",
                 quantize: str | None = None, threads: int | None = None):
        check_threads(threads)
        if not 1 <= settings.max_batch <= MAX_SLOTS:
            raise InvalidSetting(f"max_batch must be between 1 and {MAX_SLOTS:,}, got {settings.max_batch:,}",
                                 "max_batch")
        self.warnings: list[str] = []
        files = open_file_limit(settings.max_connections + settings.fd_reserve)
        if files < settings.max_connections + settings.fd_reserve:
            fit = files - settings.fd_reserve
            if fit < 1:
                raise MicroGPTError(f"the open-file limit ({files:,}) leaves no room for connections; raise it "
                                    "(ulimit -n)")
            self.warnings.append(f"warning: the open-file limit (ulimit -n {files:,}) allows {fit:,} connections, "
                                 f"not --max-connections {settings.max_connections:,}")
            settings = replace(settings, max_connections=fit)
        if not settings.loopback and settings.api_key is None:
            self.warnings.append(f"warning: listening on {settings.host} without --api-key: anyone who can reach "
                                 "this machine can use it")
        self.socket = bind(settings.host, settings.port, backlog=min(2048, settings.max_connections))
        try:
            self.path = resolve_path(checkpoint)
            state = load(self.path, mapped=True)
            model = state.build_model().to(resolve_device(device)).eval()
            tokenizer, metrics = state.tokenizer_object(), state.metrics
            del state  # it holds the weights too: the engine converts them in place, never beside a copy
            sampler = Sampler(model, tokenizer, settings.max_batch, quantize, in_place=True, threads=threads)
        except BaseException:
            self.socket.close()
            raise
        self.server = Server(sampler, model_info(self.path, sampler, metrics), settings)
        self.app = build_app(self.server)
        config = uvicorn.Config(
            self.app, http=guarded_protocol(settings, self.server.metrics.connections),
            log_config=None, log_level="warning", access_log=False, lifespan="off", ws="none",  # no route bypasses Gate
            timeout_graceful_shutdown=settings.graceful_shutdown, timeout_keep_alive=settings.keep_alive_timeout,
            limit_concurrency=settings.max_connections + 1,  # uvicorn counts the asking connection too
            h11_max_incomplete_event_size=settings.max_header_bytes, server_header=False,
        )
        self.uvicorn = _Uvicorn(config, self.server.batcher.request_stop)

    @property
    def url(self) -> str:
        """The base URL, with the real port (`--port 0` picks one)."""
        port = self.socket.getsockname()[1]
        shown = self.server.settings.host
        return f"http://{f'[{shown}]' if ':' in shown else shown}:{port}"

    def run(self) -> None:
        self.server.batcher.start()
        try:
            self.uvicorn.run(sockets=[self.socket])
        finally:
            self.server.batcher.stop()
            self.socket.close()

    def stop(self) -> None:
        self.server.batcher.request_stop()
        self.uvicorn.should_exit = True


def serve(checkpoint: str | Path = "out", settings: ServeSettings | None = None, device: str = "auto",
          quantize: str | None = None, announce: Callable[[str], None] = print, threads: int | None = None) -> None:
    """Serve a checkpoint until SIGINT/SIGTERM: the OpenAI-compatible API under /v1 and the
    playground at /. `announce` gets the startup lines (the URL, warnings); `threads`: see Engine."""
    service = Service(checkpoint, settings or ServeSettings(), device, quantize, threads)
    setup_logging()
    info, engine = service.server.info, service.server.sampler.engine
    announce(f"microgpt serve: {service.path} ({info.parameters / 1e6:.2f}M parameters, {info.tokenizer} tokenizer, "
             f"context {info.context}) on {engine.device}, up to {engine.slots} samples at once")
    for line in service.warnings:
        announce(line)
    announce(f"playground: {service.url}/   API: {service.url}/v1   (Ctrl-C stops)")
    service.run()
