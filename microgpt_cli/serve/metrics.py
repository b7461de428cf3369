"""What GET /metrics reports, in the Prometheus text format (through prometheus_client): the
figures vLLM's and llama.cpp's servers expose, under microgpt_ names. Each server has its own
registry, so that several in one process (tests) do not mix their counts."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: from a few milliseconds (a GPU's first token) to minutes (a long completion on a CPU).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Metrics:
    """The server's counters, histograms and gauges; `waiting` and `active` are read when scraped."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, waiting: Callable[[], float], active: Callable[[], float]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("microgpt_requests", "HTTP requests by route and status code.",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("microgpt_prompt_tokens", "Prompt tokens of completed or cancelled requests.",
                                     registry=r)
        self.generation_tokens = Counter("microgpt_generation_tokens", "Tokens generated.", registry=r)
        self.cancelled = Counter("microgpt_requests_cancelled",
                                 "Requests whose client left before they finished; their slots were freed.",
                                 registry=r)
        self.time_to_first_token = Histogram("microgpt_time_to_first_token_seconds",
                                             "Seconds from a request's arrival to its first generated text.",
                                             buckets=TTFT_BUCKETS, registry=r)
        self.latency = Histogram("microgpt_request_latency_seconds",
                                 "Seconds from a request's arrival to its last token (or its client leaving).",
                                 buckets=LATENCY_BUCKETS, registry=r)
        Gauge("microgpt_requests_waiting", "Requests queued for a free slot.", registry=r).set_function(waiting)
        Gauge("microgpt_slots_active", "Batch slots decoding a sample now.", registry=r).set_function(active)
        self.connections = Counter("microgpt_connections_closed",
                                   "Connections the server cut: over_capacity (past --max-connections), "
                                   "header_timeout, body_timeout.", ["reason"], registry=r)

    def text(self) -> bytes:
        return generate_latest(self.registry)
