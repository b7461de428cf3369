"""Conversations as token ids: the one chat template, its rendering with a loss mask, parsing ids
back into messages, and cutting a conversation at turn boundaries to fit a context.

The template, `microgpt-chat-1`, writes a conversation as

    <|chat|> <|system|> content <|end|> <|user|> content <|end|> <|assistant|> content <|end|> ...

where the delimiters are added tokens (see tokenizer.py): `encode` never produces them, so message
text that spells "<|end|>" stays characters. A prompt for a reply ends with `<|assistant|>`, and
the reply ends where the model samples `<|end|>`. Training learns the assistant's content and the
`<|end|>` that closes each assistant turn (the loss mask); system and user tokens are context only.

Cutting works on exchanges: a run of system/user turns and the assistant turns that answer it.
An exchange is never split from its answer, so a cut never trains a reply whose question is gone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from microgpt_cli.errors import MicroGPTError

if TYPE_CHECKING:
    from microgpt_cli.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
TEMPLATE_NAME = "microgpt-chat-1"
_JINJA = (  # the same rendering, with the delimiters' names where their text goes
    "{{ 'START' }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ 'SYSTEM' }}{% elif message['role'] == 'user' %}{{ 'USER' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT' }}"
    "{% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{ message['content'] }}{{ 'END' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT' }}{% endif %}"
)


@dataclass(frozen=True)
class ChatTemplate:
    """The template's name and its delimiters, as stored in a tokenizer spec (`chat_template`)."""

    name: str = TEMPLATE_NAME
    start: str = "<|chat|>"  # opens a conversation
    system: str = "<|system|>"
    user: str = "<|user|>"
    assistant: str = "<|assistant|>"
    end: str = "<|end|>"  # closes every turn

    @property
    def tokens(self) -> tuple[str, ...]:
        return self.start, self.system, self.user, self.assistant, self.end

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    def jinja(self) -> str:
        """The template in Jinja, as Hugging Face's `apply_chat_template` reads it from an export's
        tokenizer_config.json (a role it does not know is an error there too)."""
        text = _JINJA
        for name in ("start", "system", "user", "assistant", "end"):
            text = text.replace(f"'{name.upper()}'", repr(getattr(self, name)))
        return text

    @classmethod
    def from_dict(cls, value: object) -> ChatTemplate:
        """A stored template, checked strictly: a damaged or foreign one is one clear error."""
        names = [f.name for f in fields(cls)]
        if not isinstance(value, dict) or sorted(value) != sorted(names) or not all(
                isinstance(v, str) and v for v in value.values()):
            raise MicroGPTError(f"invalid chat template: it must map {', '.join(names)} to non-empty strings")
        if value["name"] != TEMPLATE_NAME:
            raise MicroGPTError(f"unknown chat template {value['name'][:40]!r}; this microgpt knows {TEMPLATE_NAME}")
        template = cls(**value)
        if len(set(template.tokens)) != len(template.tokens):
            raise MicroGPTError("invalid chat template: its delimiters must be distinct")
        return template


@dataclass(frozen=True)
class Message:
    role: str  # system, user or assistant
    content: str


def read_messages(value: object, need_reply: bool = True) -> list[Message]:
    """The messages of an OpenAI-style conversation (`{"messages": [{"role", "content"}, ...]}`'s
    list), checked: a ValueError says what is wrong in a few words. `need_reply`: it must hold an
    assistant turn (a conversation to train on)."""
    if not isinstance(value, list) or not value:
        raise ValueError("messages must be a non-empty list")
    messages = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ValueError(f"message {i} is not an object")
        role, content = item.get("role"), item.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i} has unknown role {str(role)[:40]!r} (use system, user or assistant)")
        if not isinstance(content, str):
            raise ValueError(f"message {i} content is {type(content).__name__}, not a string")
        messages.append(Message(role, content))
    if need_reply and not any(m.role == "assistant" for m in messages):
        raise ValueError("it has no assistant turn")
    return messages


def exchanges(roles: Sequence[str]) -> list[range]:
    """Turn indices grouped into exchanges: each a run of non-assistant turns and the assistant
    turns after it (none for a conversation's unanswered end)."""
    groups: list[range] = []
    first = 0
    for i in range(1, len(roles) + 1):
        if i == len(roles) or (roles[i] != "assistant" and roles[i - 1] == "assistant"):
            groups.append(range(first, i))
            first = i
    return groups


def pieces(roles: Sequence[str], lengths: Sequence[int], room: int) -> tuple[list[range], int]:
    """Cut one conversation's turns into pieces of consecutive whole exchanges, each at most
    `room` tokens long and each holding an assistant turn; returns the pieces (turn index ranges)
    and how many exchanges were left out because they alone are longer than `room`."""
    out: list[range] = []
    dropped = 0
    first, stop, size = 0, 0, 0  # the piece being built: turns first..stop-1, `size` tokens
    for group in exchanges(roles):
        if roles[group[-1]] != "assistant":
            continue  # nothing to learn from a question without an answer
        length = sum(lengths[i] for i in group)
        if stop > first and (length > room or size + length > room):
            out.append(range(first, stop))
            size = 0
        if length > room:
            dropped += 1
            first = stop = group.stop
            continue
        if size == 0:
            first = group.start
        stop, size = group.stop, size + length
    if stop > first:
        out.append(range(first, stop))
    return out, dropped


class ChatFormat:
    """The chat template of a tokenizer, in its ids: renders conversations (with the loss mask) and
    prompts, and parses ids back into messages."""

    def __init__(self, tokenizer: Tokenizer):
        template = tokenizer.chat_template
        if template is None:
            raise MicroGPTError(f"the {tokenizer.name} tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.template = template
        self.start = tokenizer.special_id(template.start)
        self.end = tokenizer.special_id(template.end)
        self.role_ids = {role: tokenizer.special_id(getattr(template, role)) for role in ROLES}
        self.id_roles = {i: role for role, i in self.role_ids.items()}
        # A reply ends at its <|end|>; a model that skips it and opens another turn ends there too.
        self.stop_ids = frozenset({self.end, self.start, *self.role_ids.values()})

    def turn(self, message: Message) -> list[int]:
        """One turn: <|role|> content <|end|>."""
        return [self.role_ids[message.role], *self.tokenizer.encode(message.content), self.end]

    def render(self, messages: Iterable[Message]) -> tuple[np.ndarray, np.ndarray]:
        """A whole conversation's ids and its loss mask (1 where the token is trained on: the
        assistant's content and the <|end|> of its turns)."""
        ids, mask = [self.start], [0]
        for message in messages:
            turn = self.turn(message)
            ids += turn
            mask += [0] + [int(message.role == "assistant")] * (len(turn) - 1)
        return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8)

    def prompt(self, messages: Sequence[Message], room: int) -> tuple[list[int], int]:
        """The ids that ask for the next assistant turn, at most `room` long: the oldest exchanges
        are dropped first, then a leading system turn; a last message longer than `room` alone
        keeps its end. Returns the ids and the number of turns dropped."""
        turns = [self.turn(m) for m in messages]
        pinned = messages[0].role == "system"
        kept = list(range(len(turns)))
        size = 2 + sum(map(len, turns))  # with <|chat|> and the closing <|assistant|>
        for group in exchanges([m.role for m in messages])[:-1]:  # oldest first; the last one is being answered
            if size <= room:
                break
            for i in group:
                if i > 0 or not pinned:
                    kept.remove(i)
                    size -= len(turns[i])
        if size > room and pinned and len(kept) > 1:
            kept.remove(0)
            size -= len(turns[0])
        ids = [self.start, *(t for i in kept for t in turns[i]), self.role_ids["assistant"]]
        if len(ids) > room:  # what is left is one exchange too long for the context: keep its end
            ids = [self.start, *ids[len(ids) - room + 1 :]]
        return ids, len(turns) - len(kept)

    def parse(self, ids: Iterable[int]) -> list[Message]:
        """The messages a rendered conversation holds (the inverse of `render`)."""
        ids = [int(i) for i in ids]
        if not ids or ids[0] != self.start:
            raise MicroGPTError("a rendered conversation starts with the chat start token")
        messages, at = [], 1
        while at < len(ids):
            role = self.id_roles.get(ids[at])
            try:
                end = ids.index(self.end, at + 1)
            except ValueError:
                end = -1
            if role is None or end < 0:
                raise MicroGPTError(f"token {at} of the conversation does not open a complete turn")
            messages.append(Message(role, self.tokenizer.decode(ids[at + 1 : end])))
            at = end + 1
        return messages


def as_messages(messages: Iterable[Message | dict[str, Any]]) -> list[Message]:
    """Messages given as Message objects or OpenAI-style dicts, checked (for the Python API)."""
    listed = [asdict(m) if isinstance(m, Message) else m for m in messages]
    try:
        return read_messages(listed, need_reply=False)
    except ValueError as exc:
        raise MicroGPTError(f"invalid messages: {exc}") from None
