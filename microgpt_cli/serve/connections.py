"""The connection layer under the routes: the listening socket, uvicorn's h11 protocol with the two
defences uvicorn lacks, and a log that an attack cannot flood.

uvicorn already bounds what it can (see `Service`: `timeout_keep_alive`, `limit_concurrency`, h11's
header size). It has no deadline for a request's headers, so a client that sends them a byte at
a time holds its connection forever (slow loris), and its concurrency limit answers only clients
that finish their headers, so idle connections pile up until the process runs out of file
descriptors. `GuardedH11` adds both: a header deadline, and a connection cap answered with 503 as
soon as a connection is accepted.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import socket
import threading
import time
from typing import Any, ClassVar

import h11
from prometheus_client import Counter
from uvicorn.protocols.http.h11_impl import H11Protocol

from microgpt_cli.errors import MicroGPTError
from microgpt_cli.serve.settings import ServeSettings

log = logging.getLogger("microgpt.serve")


def bind(host: str, port: int, backlog: int) -> socket.socket:
    """A socket listening on host:port: taken before the model loads, so that of two servers started
    on one port the second fails at once with one line, and `--port 0` knows its real port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # "localhost" is 127.0.0.1, as uvicorn has it
    try:
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        raise MicroGPTError(f"cannot listen on {host}: not an address or a name this machine resolves; "
                            "pick another --host") from None
    _, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart without waiting out TIME_WAIT
        sock.bind(address)
        sock.listen(backlog)  # listening claims the port: SO_REUSEADDR lets two bind it until then
    except OSError as exc:
        sock.close()
        reason = {errno.EADDRINUSE: "the port is in use; pick another --port (0 picks a free one)",
                  errno.EADDRNOTAVAIL: "the address is not this machine's; pick another --host",
                  errno.EACCES: "permission denied (ports below 1024 need privileges); pick another --port"}
        raise MicroGPTError(f"cannot listen on {host}:{port}: {reason.get(exc.errno or 0, exc.strerror)}") from None
    return sock


def open_file_limit(wanted: int) -> int:
    """Raise this process's soft limit on open files towards `wanted` (as far as the hard limit
    allows); the limit in force after."""
    try:
        import resource
    except ImportError:  # Windows: no such limit to raise
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return wanted
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft
    return target


def raw_response(status: int, reason: str, message: str, *headers: str) -> bytes:
    """A whole HTTP response with OpenAI's error object, for a connection no ASGI app will answer."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}}).encode()
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(body)}",
            "connection: close", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for each request's headers and a cap on open
    connections. `guarded_protocol` makes the subclass that knows the settings."""

    settings: ClassVar[ServeSettings]
    closed: ClassVar[Counter]  # connections cut, by reason: over_capacity, header_timeout, body_timeout

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._phase: str | None = None
        self._refused = len(self.connections) > self.settings.max_connections
        if self._refused:
            self._refuse()
        else:
            self._watch()

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)
            self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # arms uvicorn's keep-alive timer for the wait for the next request
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._set_clock(None)

    def _watch(self) -> None:
        """Start the clock of what the client owes now: a request's headers (also while idle between
        requests, where uvicorn's shorter keep-alive timeout usually ends the wait first), or the
        rest of a body that was answered before it was read (a refused request), which is drained.
        The app bounds the body of a request it reads (Gate, --body-timeout)."""
        state = self.conn.their_state
        if state is h11.IDLE:
            self._set_clock("headers")
        elif state is h11.SEND_BODY and self.cycle is not None and self.cycle.response_complete:
            self._set_clock("drain")
        else:
            self._set_clock(None)

    def _set_clock(self, phase: str | None) -> None:
        if phase == self._phase:
            return
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._phase = phase
        if phase is not None and not self.transport.is_closing():
            seconds = self.settings.header_timeout if phase == "headers" else self.settings.body_timeout
            self._deadline = self.loop.call_later(seconds, self._late)

    def _late(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._phase == "drain":
            self.closed.labels("body_timeout").inc()
        elif self.conn.trailing_data[0]:  # a request began: say why it ends (an idle connection just closes)
            seconds = self.settings.header_timeout
            self.transport.write(raw_response(408, "Request Timeout",
                                              f"the request headers did not arrive within {seconds:g} s"))
            log.warning("closed a connection whose request headers did not arrive within %g s (--header-timeout)",
                        seconds)
            self.closed.labels("header_timeout").inc()
        self.transport.close()

    def _refuse(self) -> None:
        cap = self.settings.max_connections
        self.transport.write(raw_response(503, "Service Unavailable",
                                          f"the server has its maximum of {cap:,} connections open; retry later",
                                          "retry-after: 1"))
        # Half-close: the client reads the 503 and our end of file, then closes. Closing outright
        # would reset a connection whose request is already in flight, losing the 503.
        self.transport.write_eof()
        self.loop.call_later(self.settings.refused_linger, self.transport.abort)
        log.warning("refused a connection: %s connections are open (--max-connections)", f"{cap:,}")
        self.closed.labels("over_capacity").inc()


def guarded_protocol(settings: ServeSettings, closed: Counter) -> type[GuardedH11]:
    """The GuardedH11 of one server, for uvicorn.Config(http=...)."""
    return type("GuardedH11", (GuardedH11,), {"settings": settings, "closed": closed})


class Throttle(logging.Filter):
    """Let through at most one warning or error of each kind (logger and message) every `every`
    seconds, the next one saying how many were left out: an attack or a failing disk makes a few
    lines, not a flood. Lines below warning (one per request) pass."""

    def __init__(self, every: float):
        super().__init__()
        self.every = every
        self._last: dict[tuple[str, str], float] = {}
        self._left_out: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, str(record.msg))
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -math.inf) < self.every:
                self._left_out[key] = self._left_out.get(key, 0) + 1
                return False
            self._last[key] = now
            left_out = self._left_out.pop(key, 0)
        if left_out:
            record.msg = f"{record.msg} (and {left_out:,} more like it since the last such line)"
        return True


class _ServeHandler(logging.StreamHandler):
    """The handler `setup_logging` installs, so that a second server in one process replaces it."""


LOGGERS = {"microgpt.serve": logging.INFO, "uvicorn": logging.WARNING, "asyncio": logging.WARNING}


def setup_logging(stream: Any = None) -> None:
    """One log for the server, uvicorn and asyncio (whose socket errors land here): a time and a
    message per line on `stream` (stderr by default), throttled by Throttle."""
    handler = _ServeHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    handler.addFilter(Throttle(ServeSettings.log_every))
    for name, level in LOGGERS.items():
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if isinstance(h, _ServeHandler)]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
