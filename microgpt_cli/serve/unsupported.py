"""The OpenAI (and vLLM) request parameters this server does not implement. A request that sets
one to anything but its no-op value gets a 400 naming it, never a 200 that silently ignored it.
Parameters that do not change the output (`user`, `metadata`, `store`, `service_tier`) are
accepted and ignored, as are fields no API defines."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_NO_OP: dict[str, Callable[[Any], bool]] = {  # parameter -> whether a value leaves the output alone
    "best_of": lambda v: v in (None, 1),
    "suffix": lambda v: v in (None, ""),
    "logit_bias": lambda v: v in (None, {}),
    "tools": lambda v: v in (None, []),
    "functions": lambda v: v in (None, []),
    "tool_choice": lambda v: v in (None, "none"),
    "function_call": lambda v: v in (None, "none"),
    "response_format": lambda v: v is None or v == {"type": "text"},
    "audio": lambda v: v is None,
    "modalities": lambda v: v in (None, ["text"]),
    "prediction": lambda v: v is None,
    "web_search_options": lambda v: v is None,
    "reasoning_effort": lambda v: v is None,
    # vLLM's sampling extensions, which lm-evaluation-harness tasks may pass along
    "repetition_penalty": lambda v: v in (None, 1),
    "min_p": lambda v: v in (None, 0),
    "min_tokens": lambda v: v in (None, 0),
    "ignore_eos": lambda v: v in (None, False),
    "use_beam_search": lambda v: v in (None, False),
}


def unsupported_parameter(body: object) -> str | None:
    """The first parameter of a request body that asks for something not implemented, if any."""
    if not isinstance(body, dict):
        return None
    return next((name for name, no_op in _NO_OP.items() if name in body and not no_op(body[name])), None)
