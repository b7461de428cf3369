"""The door every HTTP request passes before any route: the Host check (against DNS rebinding),
the API key, the body's size and time limits, HEAD answered as GET, and the request count of
/metrics.

It is ASGI middleware, not a FastAPI dependency, for two reasons: a route added later is behind
the key unless its path is in OPEN_PATHS, and the key is checked before the body is read (FastAPI
parses a body before it runs dependencies, so a stranger's invalid JSON would get 400, not 401).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from urllib.parse import urlsplit

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.routing import Match
from starlette.types import Message, Receive, Scope, Send

from microgpt_cli.serve.metrics import Metrics
from microgpt_cli.serve.settings import ServeSettings

log = logging.getLogger("microgpt.serve")

OPEN_PATHS = frozenset({"/", "/health", "/favicon.ico"})  # the playground page, its icon, the health check


class ClientError(Exception):
    """A request the server refuses: OpenAI's error object with this status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self, close: bool = False) -> JSONResponse:
        """The error response; `close` ends the connection after it (a body left unread)."""
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}
        if close:
            headers["Connection"] = "close"
        return JSONResponse(body, status_code=self.status, headers=headers)

    def log(self, method: str, path: str) -> None:
        log.info("%s %s %d %s", method, path, self.status, self.message)


class ClientGone(Exception):
    """The client closed its connection before its request was whole."""


class Gate:
    """ASGI middleware in front of `app`; see the module doc."""

    def __init__(self, app: FastAPI, settings: ServeSettings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics
        self.hosts = settings.hosts()
        self.key = settings.api_key.encode() if settings.api_key is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "HEAD":  # a GET without its body: uvicorn drops the body of a HEAD
            scope = {**scope, "method": "GET"}
        statuses: list[int] = []

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])
            await send(message)

        try:
            try:
                self.check(scope)
                body = await asyncio.wait_for(self.read_body(scope, receive), self.settings.body_timeout)
            except ClientError as error:
                error.log(scope["method"], scope["path"])  # a body left unread is drained (GuardedH11)
                await error.response()(scope, receive, counted)
                return
            except asyncio.TimeoutError:
                self.metrics.connections.labels("body_timeout").inc()
                late = ClientError(408, f"the request body did not arrive within {self.settings.body_timeout:g} s")
                log.warning("closed a connection whose request body did not arrive within %g s (--body-timeout)",
                            self.settings.body_timeout)
                await late.response(close=True)(scope, receive, counted)
                return
            except ClientGone:
                return
            await self.app(scope, replay(body, receive), counted)
        finally:
            if statuses:
                self.metrics.requests.labels(self.route_of(scope), str(statuses[0])).inc()

    def check(self, scope: Scope) -> None:
        """Refuse a request for a host name this server does not answer to, or without the key."""
        headers = Headers(scope=scope)
        if self.hosts is not None:
            host = urlsplit("//" + headers.get("host", "")).hostname
            if host not in self.hosts:
                raise ClientError(400, f"this server does not answer to the host name {host!r} (see --allowed-hosts)",
                                  code="host_not_allowed")
        if self.key is None or scope["path"] in OPEN_PATHS:
            return
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key):
            raise ClientError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                              code="invalid_api_key")

    async def read_body(self, scope: Scope, receive: Receive) -> bytes:
        """The whole request body, refused with 413 as soon as it passes the cap (declared or not)."""
        limit = self.settings.max_body_bytes
        too_large = ClientError(413, f"the request body is over {limit:,} bytes", code="body_too_large")
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:  # a chunked body, or one longer than its Content-Length says
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def route_of(self, scope: Scope) -> str:
        """The route's path template (a bounded label for /metrics, unlike the paths clients send)."""
        for route in self.app.router.routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                return str(getattr(route, "path", "other"))
        return "other"


def replay(body: bytes, receive: Receive) -> Receive:
    """`receive` for the app: the body read already, then whatever the client does next (it leaves)."""
    given = False

    async def receive_again() -> Message:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive_again
