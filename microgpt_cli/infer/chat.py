"""Chat on top of the sampler: messages in, the assistant's reply out, as text pieces.

A model fine-tuned on conversations (`prepare --chat`, then `train`) carries its chat template in
its tokenizer: the prompt is the conversation rendered with it, ending with the assistant's turn
token, and the reply ends at the model's end-of-turn token. A base model has no template: the
conversation becomes a plain transcript ("user: ...\\nassistant:") that the model continues as
text, ending where it starts the next "user:" or "system:" line.

The history is kept within the context: the prompt leaves room for the reply (its `length`, at
most half the context), and the oldest exchanges are dropped first (see ChatFormat.prompt).
`microgpt chat`, `serve`'s chat route and the Python API `chat` all build prompts here.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from microgpt_cli.config import SamplingSettings
from microgpt_cli.data.chat import ChatFormat, Message, as_messages
from microgpt_cli.data.tokenizer import Tokenizer
from microgpt_cli.infer.sampling import (
    DEFAULT_LENGTH,
    DEFAULT_SEED,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    Sampler,
    TextStream,
    load_sampler,
)
from microgpt_cli.model.gpt import GPT

TRANSCRIPT_STOPS = ("\nuser:", "\nsystem:")  # a transcript's next turn ends the assistant's


def transcript(messages: Sequence[Message]) -> str:
    """Messages as one plain-text prompt, for a model without a chat template."""
    return "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant:"


@dataclass(frozen=True)
class ChatPrompt:
    """What to sample a reply from: the prompt's ids, and where the reply ends."""

    ids: list[int]
    stop_ids: frozenset[int]  # the template's delimiters (or a base model's end of text)
    stops: tuple[str, ...]  # stop strings: a transcript's next turn
    dropped: int  # old turns left out to fit the context


def prompt_room(context: int, length: int) -> int:
    """Prompt tokens that leave room for a reply of `length` (at most half the context)."""
    return max(1, context - min(length, context // 2))


def chat_prompt(tokenizer: Tokenizer, messages: Sequence[Message], room: int) -> ChatPrompt:
    """The prompt asking for the next assistant turn of `messages`, at most `room` tokens long."""
    if tokenizer.chat_template is not None:
        chat = ChatFormat(tokenizer)
        ids, dropped = chat.prompt(messages, room)
        return ChatPrompt(ids, chat.stop_ids, (), dropped)
    # A transcript is a text prompt, read as the completion route reads one: "<|endoftext|>" is that token.
    kept = list(messages)
    ids = tokenizer.encode_special(transcript(kept))
    while len(ids) > room and len(kept) > 1:  # drop the oldest turn, a leading system one last
        kept.pop(1 if kept[0].role == "system" and len(kept) > 2 else 0)
        ids = tokenizer.encode_special(transcript(kept))
    eot = tokenizer.eot_id
    return ChatPrompt(ids[-room:], frozenset() if eot is None else frozenset({eot}), TRANSCRIPT_STOPS,
                      len(messages) - len(kept))


def stream_reply(sampler: Sampler, messages: Sequence[Message], settings: SamplingSettings) -> TextStream:
    """The reply to `messages` as text pieces (none of the prompt), ending at the end of the
    assistant's turn or after `settings.length` tokens (then `stream.batch.stopped[0]` is False)."""
    prompt = chat_prompt(sampler.tokenizer, messages, prompt_room(sampler.engine.context, settings.length))
    return sampler.stream(prompt.ids, settings, prompt.stops, prompt.stop_ids)


@dataclass
class Conversation:
    """A conversation with a model, turn by turn: what `microgpt chat` keeps between replies."""

    sampler: Sampler
    settings: SamplingSettings
    system: str = ""
    messages: list[Message] = field(default_factory=list)
    dropped: int = 0  # turns the last prompt left out to fit the context
    ended: bool = True  # whether the last reply ended its turn (not cut by the length or interrupted)

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages.clear()

    def reply(self, text: str) -> Generator[str, None, None]:
        """Send a user message and stream the reply; the reply joins the history when the stream
        ends, is closed or is interrupted, with whatever text it had by then. A message the
        tokenizer cannot encode raises MicroGPTError before anything joins the history."""
        history = [*([Message("system", self.system)] if self.system else []), *self.messages, Message("user", text)]
        prompt = chat_prompt(self.sampler.tokenizer, history,
                             prompt_room(self.sampler.engine.context, self.settings.length))
        stream = self.sampler.stream(prompt.ids, self.settings, prompt.stops, prompt.stop_ids)
        self.dropped, self.ended = prompt.dropped, False
        self.messages.append(Message("user", text))
        pieces: list[str] = []
        try:
            for piece in stream:
                pieces.append(piece)
                yield piece
            self.ended = stream.batch.stopped[0]
        finally:
            self.messages.append(Message("assistant", "".join(pieces)))


def chat(
    model: GPT | str | Path,
    messages: Iterable[Message | dict[str, Any]],
    tokenizer: Tokenizer | None = None,
    length: int = DEFAULT_LENGTH,
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int | None = DEFAULT_TOP_K,
    top_p: float = DEFAULT_TOP_P,
    seed: int | None = DEFAULT_SEED,
    device: str = "auto",
    quantize: str | None = None,
) -> str:
    """The assistant's reply to `messages` (OpenAI-style dicts {"role", "content"} or Message),
    with the model's chat template (a plain transcript for a model without one).

    `model` is a GPT (then `tokenizer` is required) or a checkpoint file / run dir (loaded on
    `device`)."""
    settings = SamplingSettings(length, temperature, top_k, top_p, None, seed)
    checked = as_messages(messages)
    return "".join(stream_reply(load_sampler(model, tokenizer, device, 1, quantize), checked, settings))
