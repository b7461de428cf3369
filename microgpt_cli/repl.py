"""`microgpt chat`'s loop: lines in, streamed replies out. It only translates between a person (or
a script) and `infer.chat.Conversation`, which keeps the history and samples the replies.

On a terminal: a prompt per message, the reply streamed as it is sampled, Ctrl-C stops a reply
(not the session), Ctrl-D or /quit leaves. Otherwise (stdin is a pipe or a file): one user message
per input line, one reply per output line, with a newline inside a reply written as \\n (and a
backslash as \\\\), so that a script can pair each line it sends with the line it gets back.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import TextIO

from microgpt_cli.errors import MicroGPTError
from microgpt_cli.infer.chat import Conversation

HELP = ("/reset forgets the conversation, /system TEXT sets the system message (empty: none), /quit leaves; "
        "Ctrl-C stops a reply")
PROMPT = "you> "
REPLY = "model> "


def escape_line(text: str) -> str:
    """A reply on one line: backslashes doubled, newlines as \\n."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def command(conversation: Conversation, line: str, note: Callable[[str], None]) -> bool:
    """Run a /command line; False if the line is a message (a leading // sends one starting with /)."""
    if not line.startswith("/") or line.startswith("//"):
        return False
    name, _, argument = line.partition(" ")
    if name == "/reset":
        conversation.reset()
        note("the conversation starts over" + (" (the system message stays)" if conversation.system else ""))
    elif name == "/system":
        conversation.system = argument.strip()
        note(f"system message {'set' if conversation.system else 'cleared'}")
    elif name in ("/help", "/?"):
        note(HELP)
    else:
        note(f"unknown command {name}; {HELP}")
    return True


def run_piped(conversation: Conversation, lines: TextIO, out: TextIO, warn: Callable[[str], None]) -> None:
    """One reply line per message line, in order; a message that cannot be sent gets an empty line
    (and a warning), so the pairing of lines holds."""
    for raw in lines:
        line = raw.rstrip("\r\n")
        if line == "/quit":
            return
        if command(conversation, line, lambda text: None):
            continue
        try:
            for piece in conversation.reply(line.removeprefix("/")):
                out.write(escape_line(piece))
                out.flush()
        except MicroGPTError as exc:
            warn(str(exc))
        out.write("\n")
        out.flush()


def run_terminal(conversation: Conversation, out: TextIO, note: Callable[[str], None],
                 warn: Callable[[str], None]) -> None:
    """The interactive loop, until Ctrl-D or /quit."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    note(f"type a message; {HELP}; Ctrl-D leaves")
    while True:
        try:
            line = input(PROMPT)
        except EOFError:
            out.write("\n")
            return
        except KeyboardInterrupt:
            out.write("\n")
            note("(Ctrl-D or /quit leaves)")
            continue
        if line.strip() == "/quit":
            return
        if not line.strip() or command(conversation, line, note):
            continue
        out.write(REPLY)
        stream = conversation.reply(line.removeprefix("/"))
        try:
            for piece in stream:
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            stream.close()
            out.write("\n")
            note("(reply stopped)")
            continue
        except MicroGPTError as exc:
            out.write("\n")
            warn(str(exc))
            continue
        out.write("\n")
        if not conversation.ended:
            note(f"(the reply reached --length {conversation.settings.length} tokens before its end)")
        if conversation.dropped:
            note(f"({conversation.dropped} oldest turns no longer fit the context and are left out)")


def run(conversation: Conversation, note: Callable[[str], None], warn: Callable[[str], None],
        stdin: TextIO | None = None, out: TextIO | None = None) -> None:
    """Talk on a terminal, or answer piped lines (see the module doc)."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    if hasattr(stdin, "reconfigure"):  # bytes that are not UTF-8 become U+FFFD, not a traceback
        stdin.reconfigure(errors="replace")
    if stdin.isatty():
        run_terminal(conversation, out, note, warn)
    else:
        run_piped(conversation, stdin, out, warn)
