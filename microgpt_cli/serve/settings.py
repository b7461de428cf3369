"""Every limit, timeout and default of `microgpt serve`, in one place: the CLI builds its options
from these fields, the server reads nothing else. Light to import (no web or torch modules), since
the CLI imports it to build `serve --help`."""

from __future__ import annotations

import ipaddress
import string
from dataclasses import dataclass
from typing import ClassVar

from microgpt_cli.config import InvalidSetting, _validate, setting

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_KEY_CHARACTERS = frozenset(string.ascii_letters + string.digits + string.punctuation)


@dataclass(frozen=True)
class ServeSettings:
    """How `serve` listens, whom it answers, and how much any one client may hold."""

    host: str = setting("127.0.0.1", "Address to listen on; 0.0.0.0 for every network interface (then set --api-key).")
    port: int = setting(8000, "Port to listen on; 0 picks a free one (the startup line shows which).")
    api_key: str | None = setting(
        None, "Require 'Authorization: Bearer KEY' on every route but /, /health and the playground's files "
              "(printable ASCII, no spaces).")
    allowed_hosts: str | None = setting(
        None, "Host names clients may reach the server by (the Host header), comma-separated, * for any; "
              "refuses DNS rebinding. Default: localhost, 127.0.0.1 and ::1 when --host is a loopback address, "
              "else any.")
    max_batch: int = setting(8, "Samples decoded at once; concurrent requests share the batch (continuous batching).")
    max_tokens_limit: int = setting(
        1024, "The most new tokens one request may ask for (and its default max_tokens for chat).")
    max_connections: int = setting(
        2048, "Open connections at most; the next one gets 503 at once (raises the open-file limit to fit).")
    header_timeout: float = setting(10.0, "Seconds a client has to send a request's headers (slow clients are cut).")
    body_timeout: float = setting(30.0, "Seconds a client has to send a request's body once its headers are in.")
    keep_alive_timeout: int = setting(5, "Seconds an idle connection stays open between requests.")
    max_body_bytes: int = setting(1 << 20, "The largest request body accepted (bigger ones get 413).")

    # Fixed limits: not worth a flag.
    max_header_bytes: ClassVar[int] = 16 << 10  # a request's line and headers, as h11 buffers them (its default)
    max_prompts: ClassVar[int] = 64  # prompts in one completions request
    log_every: ClassVar[float] = 10.0  # seconds between two log lines of one kind of connection trouble
    refused_linger: ClassVar[float] = 1.0  # seconds a refused connection may take to read its 503
    graceful_shutdown: ClassVar[int] = 10  # seconds in-flight requests get to finish after a stop request
    fd_reserve: ClassVar[int] = 64  # open files kept free beyond the connections: model, logs, the event loop

    def __post_init__(self) -> None:
        _validate(self)
        if not 0 <= self.port <= 65535:
            raise InvalidSetting(f"port must be between 0 and 65535, got {self.port}", "port")
        for name in ("max_batch", "max_tokens_limit", "max_connections", "keep_alive_timeout", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise InvalidSetting(f"{name} must be at least 1, got {getattr(self, name)}", name)
        for name in ("header_timeout", "body_timeout"):
            if not 0 < getattr(self, name) <= 3600:
                raise InvalidSetting(f"{name} must be above 0 and at most 3600 seconds, got {getattr(self, name)}",
                                     name)
        if self.max_connections > 1_000_000:
            raise InvalidSetting(f"max_connections must be at most 1,000,000, got {self.max_connections:,}",
                                 "max_connections")
        # A key no client can send (empty, spaces, non-ASCII) would lock everyone out, or, read as
        # "no key", open the server to all: refuse it at start.
        if self.api_key is not None and (not self.api_key or not set(self.api_key) <= _KEY_CHARACTERS):
            raise InvalidSetting("api_key (or MICROGPT_API_KEY) must be non-empty printable ASCII without spaces: "
                                 "it is sent in an HTTP header", "api_key")
        if self.allowed_hosts is not None and not all(name.strip() for name in self.allowed_hosts.split(",")):
            raise InvalidSetting(f"allowed_hosts takes comma-separated host names, got {self.allowed_hosts!r}",
                                 "allowed_hosts")

    @property
    def loopback(self) -> bool:
        """Whether --host is reachable from this machine only."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def hosts(self) -> frozenset[str] | None:
        """The Host header names the server answers to (lowercase, without port); None for any."""
        if self.allowed_hosts is None:
            return frozenset((*LOOPBACK_NAMES, self.host.lower())) if self.loopback else None
        names = {name.strip().lower().strip("[]") for name in self.allowed_hosts.split(",")}
        return None if "*" in names else frozenset(names)
