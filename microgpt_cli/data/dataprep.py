"""`prepare`: any text in, a data dir out (train.bin, val.bin, meta.json), written atomically;
with `chat=True`, conversations in (JSONL) and a loss mask beside the ids. Reading data dirs back
is `dataset.py`'s job."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO, Literal, get_args

import numpy as np

from microgpt_cli.config import available_cpus, check_threads
from microgpt_cli.data import tokenizer as tok_lib
from microgpt_cli.data.chat import ChatFormat, ChatTemplate, read_messages
from microgpt_cli.data.dataset import MASK_FILE, META_FILE, META_VERSION, SPLITS
from microgpt_cli.errors import MicroGPTError, describe_os_error
from microgpt_cli.io.files import atomic_dir, check_replaceable, output_lock, write_synced

# --- prepare ---------------------------------------------------------------------------------

CHUNK_BYTES = 1 << 20  # per tokenizer call: large enough to amortize the call, small enough to stream
MAX_PENDING_CHUNKS = 16  # text with no safe cut point for this many chunk sizes is cut anyway
DEFAULT_TOKENIZER = "gpt2"
DEFAULT_VAL_FRACTION = 0.1
DEFAULT_BPE_VOCAB_SIZE = 4096
ErrorMode = Literal["strict", "replace"]
ERROR_MODES: tuple[str, ...] = get_args(ErrorMode)
SampleName = Literal["tinyshakespeare"]
STDIN = "-"
_SNIFF_BYTES = 8192
MAX_LISTED_SKIPS = 20  # malformed chat lines named one by one; the rest are only counted

# Where a chunk may end so that encoding chunk by chunk gives exactly the ids of encoding the
# whole text, for the gpt2, cl100k, o200k and rustbpe split patterns. Right after a newline that
# ends a non-blank line and is followed by a letter or digit: no pre-token of those patterns
# spans that point, and the newline stays alone or glued to the punctuation before it as in the
# whole text (a cut after a blank line would turn gpt2's "\n", "\n" into "\n\n" via `\s++$`, and a
# "\n" followed by "/" belongs to the punctuation run before it in o200k). Bytes >= 0x80 are
# candidates only, checked by decoding the character (see _is_cut).
_LINE_CUT = re.compile(rb"(?<=[^\s])\n(?=[0-9A-Za-z\x80-\xff])")
# Fallback for text whose lines never qualify (CRLF endings, indented code): before a single
# space between two word characters, which every pattern also starts a pre-token with.
_WORD_CUT = re.compile(rb"(?<=[0-9A-Za-z\x80-\xff]) (?=[0-9A-Za-z\x80-\xff])")


@dataclass
class _Source:
    """One input file: `name` as the user gave it, `path` where its bytes are (stdin is spooled)."""

    name: str
    path: Path
    size: int
    val_start: int  # byte offset where its validation part begins
    sha256: Any = field(default_factory=hashlib.sha256)


def prepare(
    inputs: Sequence[str | Path] = (),
    out: str | Path = "data",
    *,
    sample: str | None = None,
    tokenizer: str | tok_lib.Tokenizer = DEFAULT_TOKENIZER,
    vocab_size: int | None = None,
    chat: bool = False,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    force: bool = False,
    errors: str = "strict",
    on_progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
    stdin: BinaryIO | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    threads: int | None = None,
    on_skip: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Tokenize text files (or "-" for stdin), and the packaged `sample` corpus if named, into
    `out`/{train,val}.bin and meta.json; returns meta.

    The last `val_fraction` of every input goes to val. Text streams through in chunks cut where
    tokenization cannot change, so memory stays flat and ids equal encoding each part whole.
    `on_total(n)` is called once with the input's size in bytes, then `on_progress(done)` as the
    work advances, in those bytes (char and bpe read the text twice: each pass counts half). Everything is written
    to a hidden temp dir beside `out` and renamed into place at the end, so an error or Ctrl-C
    leaves `out` as it was (and a kill -9 leaves a temp dir the next prepare of `out` removes). An
    existing `out` is only replaced with `force`, and only if it is a data dir (or empty). `threads`
    encode chunks at once (default: one per CPU this process may use).

    `tokenizer` is a name (see tokenizer.py) or a Tokenizer, such as the one of the model a
    fine-tune starts from. With `chat`, every input is JSONL, one conversation per line
    (`{"messages": [{"role": "user", "content": "..."}, ...]}`): see `_write_chat_splits`.
    `on_skip` gets one line for each malformed line skipped (the first MAX_LISTED_SKIPS of them).
    """
    started = time.monotonic()
    out = Path(out)
    _check_options(out, tokenizer, vocab_size, val_fraction, force, errors)
    threads = check_threads(threads) or available_cpus()
    if chat and sample is not None:
        raise MicroGPTError("--sample is plain text, not conversations; give JSONL files with --chat")
    try:
        files = _resolve_inputs(inputs, out, sample)
        tok = tokenizer if isinstance(tokenizer, tok_lib.Tokenizer) else (
            None if tok_lib.needs_corpus(tokenizer) else tok_lib.named(tokenizer))
        with output_lock(out, "`microgpt prepare`"), atomic_dir(out, force) as tmp:
            sources = _plan_sources(files, tmp, stdin, val_fraction)
            size = sum(s.size for s in sources)
            if size == 0:
                raise MicroGPTError("the input is empty; give prepare some text")
            if on_total:
                on_total(size)
            progress = _Progress(on_progress, passes=2 if tok is None else 1)
            if tok is None:
                assert isinstance(tokenizer, str)
                texts = (
                    (content for _, _, messages, _ in _read_chats(sources, errors, progress) if messages
                     for content in (m.content for m in messages)) if chat
                    else (text for _, text, _ in _read_texts(sources, errors, chunk_bytes, progress)))
                tok = _build_tokenizer(tokenizer, vocab_size or DEFAULT_BPE_VOCAB_SIZE, texts)
            extra: dict[str, Any] = {}
            if chat:
                tok = tok.with_chat_template(tok.chat_template or ChatTemplate())
                dtype = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
                splits, chars, extra["chat"] = _write_chat_splits(tok, sources, tmp, dtype, errors, progress, on_skip)
            else:
                dtype = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
                splits, chars = _write_splits(tok, sources, tmp, dtype, errors, chunk_bytes, progress, threads)
            tokens = sum(s["tokens"] for s in splits.values())
            meta = {
                "version": META_VERSION,
                "tokenizer": tok.spec,
                "vocab_size": tok.vocab_size,
                "dtype": dtype,
                "splits": splits,
                "inputs": [{"path": s.name, "sha256": s.sha256.hexdigest(), "bytes": s.size} for s in sources],
                "val_fraction": val_fraction,
                "chars_per_token": round(chars / tokens, 4),
                **extra,
                "seconds": round(time.monotonic() - started, 3),
            }
            write_synced(tmp / META_FILE, (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
            (tmp / ".stdin").unlink(missing_ok=True)  # the spooled stdin is not part of the dataset
    except OSError as exc:  # unreadable input, unwritable output dir, a full disk: the user can fix these
        raise MicroGPTError(f"cannot prepare {out}: {describe_os_error(exc)}") from exc
    return meta


def _check_options(out: Path, tokenizer: str | tok_lib.Tokenizer, vocab_size: int | None, val_fraction: float,
                   force: bool, errors: str) -> None:
    cwd = Path.cwd().resolve()
    if out.name in ("", "..") or (out.exists() and (out.resolve() == cwd or out.resolve() in cwd.parents)):
        raise MicroGPTError(f"--out {out} is the current dir or above it; name a data dir such as --out data")
    if not 0 < val_fraction < 1:
        raise MicroGPTError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if errors not in ERROR_MODES:
        raise MicroGPTError(f"--errors must be one of {', '.join(ERROR_MODES)}, got {errors!r}")
    if vocab_size is not None and tokenizer != "bpe":
        given = tokenizer if isinstance(tokenizer, str) else "a given tokenizer"
        raise MicroGPTError(f"--vocab-size only applies to --tokenizer bpe ({given!r} has a fixed vocabulary)")
    if isinstance(tokenizer, str):
        tok_lib.check_name(tokenizer, vocab_size or DEFAULT_BPE_VOCAB_SIZE)
    if (out.exists() or out.is_symlink()) and not force:
        raise MicroGPTError(f"{out} already exists; pass --force to replace it or choose another --out")
    if force:
        check_replaceable(out, {META_FILE, *(f"{split}.bin" for split in SPLITS)}, "a data dir", "`microgpt prepare`")


SAMPLES = {name: f"{name}.txt" for name in get_args(SampleName)}  # packaged corpora: see samples/README.md


def sample_path(name: str) -> Path:
    """The packaged corpus `name` (one of SAMPLES)."""
    if name not in SAMPLES:
        raise MicroGPTError(f"unknown sample {name!r}; choose one of {', '.join(SAMPLES)}")
    return Path(str(resources.files("microgpt_cli") / "samples" / SAMPLES[name]))


def _resolve_inputs(inputs: Sequence[str | Path], out: Path, sample: str | None) -> list[tuple[str, Path | None]]:
    """(name, file) of every input in order, None standing for stdin; directories give their text
    files, sorted. Each file may come once: a second reading would silently double it."""
    if not inputs and sample is None:
        raise MicroGPTError("no input given; pass text files, directories, - for stdin, or --sample")
    files: list[tuple[str, Path | None]] = []
    for given in inputs:
        if str(given) == STDIN:
            files.append((STDIN, None))
            continue
        path = Path(given)
        if path.is_dir():
            found = _text_files(path, out)
            if not found:
                raise MicroGPTError(f"directory {path} has no text files (hidden and binary files are skipped)")
            files += [(str(f), f) for f in found]
        elif path.is_file():
            files.append((str(path), path))
        elif path.exists():
            raise MicroGPTError(f"{path} is not a regular file or directory; pipe it in with - instead")
        else:
            raise MicroGPTError(f"input {path} does not exist")
    if sample is not None:
        files.append((f"sample:{sample}", sample_path(sample)))
    seen: dict[object, str] = {}
    for name, file in files:
        key = STDIN if file is None else file.resolve()
        if key in seen:
            raise MicroGPTError(f"input {name} is given twice (also as {seen[key]}); each input is read once")
        seen[key] = name
    return files


def _text_files(root: Path, out: Path) -> list[Path]:
    """Non-hidden files under `root` whose start has no NUL byte, skipping the output dir."""
    skip = out.resolve()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (here / d).resolve() != skip)
        for name in sorted(filenames):
            path = here / name
            if not name.startswith(".") and path.is_file() and not _looks_binary(path):
                found.append(path)
    return found


def _looks_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\x00" in f.read(_SNIFF_BYTES)


def _plan_sources(files: list[tuple[str, Path | None]], tmp: Path, stdin: BinaryIO | None,
                  val_fraction: float) -> list[_Source]:
    sources = []
    for name, path in files:
        if path is None:  # stdin can be read once: keep a copy to stream twice
            path = tmp / ".stdin"
            with open(path, "wb") as f:
                shutil.copyfileobj(stdin or sys.stdin.buffer, f, CHUNK_BYTES)
        size = path.stat().st_size
        with open(path, "rb") as f:
            sources.append(_Source(name, path, size, _val_start(f, size, val_fraction)))
    return sources


def _val_start(f: BinaryIO, size: int, val_fraction: float) -> int:
    """Where the last `val_fraction` of a file begins: the next line start, else the previous one,
    else (one long line) the next character boundary."""
    target = int(size * (1 - val_fraction))
    f.seek(target)
    after = f.read(CHUNK_BYTES)
    newline = after.find(b"\n")
    if newline >= 0 and target + newline + 1 < size:
        return target + newline + 1
    low = max(0, target - CHUNK_BYTES)
    f.seek(low)
    newline = f.read(target - low).rfind(b"\n")
    if newline >= 0:
        return low + newline + 1
    continuation = 0
    while continuation < len(after) and 0x80 <= after[continuation] < 0xC0:
        continuation += 1
    return target + continuation


class _Progress:
    """Bytes processed, reported in bytes of the input: with several passes over it, each counts its share."""

    def __init__(self, callback: Callable[[int], None] | None, passes: int = 1):
        self.callback = callback
        self.passes = passes
        self.done = 0

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        if self.callback:
            self.callback(self.done // self.passes)


def _read_texts(sources: list[_Source], errors: str, chunk_bytes: int, progress: _Progress,
                hash_inputs: bool = False) -> Iterator[tuple[str, str, int]]:
    """(split, text, UTF-8 bytes of text) for every chunk of every input, in order.

    Progress counts a chunk when the next one is asked for, i.e. once its consumer took it. Fails
    at the end if all the text was whitespace."""
    blank = True
    for source in sources:
        with open(source.path, "rb") as f:
            for split, start, end in (("train", 0, source.val_start), ("val", source.val_start, source.size)):
                for offset, raw in _read_chunks(f, start, end, chunk_bytes, source.name):
                    if hash_inputs:
                        source.sha256.update(raw)
                    text, nbytes = _decode(raw, source.name, offset, errors)
                    blank = blank and text.isspace()
                    yield split, text, nbytes
                    progress.advance(len(raw))
    if blank:
        raise MicroGPTError("the input is only whitespace; give prepare some text")


def _read_chunks(f: BinaryIO, start: int, end: int, chunk_bytes: int, name: str) -> Iterator[tuple[int, bytes]]:
    """(file offset, bytes) pieces of f[start:end], each ending at a safe cut point or at `end`."""
    f.seek(start)
    pending, offset, left = b"", start, end - start
    while left > 0:
        data = f.read(min(chunk_bytes, left))
        if not data:
            raise MicroGPTError(f"{name} got shorter while it was being read")
        left -= len(data)
        buf = pending + data if pending else data
        cut = len(buf) if left == 0 else _last_cut(buf)
        if not cut and len(buf) >= MAX_PENDING_CHUNKS * chunk_bytes:
            cut = _forced_cut(buf)
        if cut:
            yield offset, buf[:cut]
            offset += cut
        pending = buf[cut:]


def _last_cut(buf: bytes) -> int:
    """The last offset in `buf` where a chunk may end (see _LINE_CUT), or 0 if there is none."""
    window = 4096
    while True:  # look near the end first: almost every text has a cut point there
        low = max(0, len(buf) - window)
        for pattern, word in ((_LINE_CUT, False), (_WORD_CUT, True)):
            for match in reversed(list(pattern.finditer(buf, low))):
                if _is_cut(buf, match.start(), match.end(), word):
                    return match.start() if word else match.end()
        if low == 0:
            return 0
        window *= 16


def _is_cut(buf: bytes, mark: int, next_char: int, word: bool) -> bool:
    """Check the characters around a candidate when they are not ASCII (the regex checked those)."""
    if buf[mark - 1] >= 0x80:
        before = buf[max(0, mark - 4) : mark].decode("utf-8", "replace")[-1]
        if not (before.isalnum() if word else not before.isspace()):
            return False
    if buf[next_char] >= 0x80:
        return buf[next_char : next_char + 4].decode("utf-8", "replace")[0].isalnum()
    return True


def _forced_cut(buf: bytes) -> int:
    """For text with no safe cut point in many megabytes: after the last newline, else before the
    last character; ids near this cut may differ from encoding the text whole."""
    newline = buf.rfind(b"\n")
    if newline >= 0:
        return newline + 1
    last = len(buf) - 1
    while last > len(buf) - 4 and 0x80 <= buf[last] < 0xC0:
        last -= 1
    return last


def _decode(raw: bytes, name: str, offset: int, errors: str) -> tuple[str, int]:
    """The text of a chunk and its UTF-8 size (which differs from `raw` only where bytes were replaced)."""
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise MicroGPTError(f"{name} looks binary (NUL byte at offset {offset + nul}); prepare takes UTF-8 text")
    try:
        return raw.decode("utf-8"), len(raw)
    except UnicodeDecodeError as exc:
        if errors == "replace":
            text = raw.decode("utf-8", "replace")
            return text, len(text.encode("utf-8"))
        raise MicroGPTError(
            f"{name} is not valid UTF-8 (byte offset {offset + exc.start}); convert it to UTF-8 "
            f"or pass --errors replace to replace bad bytes"
        ) from None


def _build_tokenizer(name: str, vocab_size: int, texts: Iterable[str]) -> tok_lib.Tokenizer:
    if name == "char":
        return tok_lib.train_char(texts)
    tok = tok_lib.train_bpe(texts, vocab_size)
    if tok.vocab_size < vocab_size:
        raise MicroGPTError(
            f"this text only has enough distinct byte pairs for a bpe vocabulary of {tok.vocab_size}; "
            f"use --vocab-size {tok.vocab_size} or less, or more text"
        )
    return tok


def _write_splits(tok: tok_lib.Tokenizer, sources: list[_Source], tmp: Path, dtype: str, errors: str,
                  chunk_bytes: int, progress: _Progress, threads: int) -> tuple[dict[str, dict[str, int]], int]:
    """Encode every chunk on a thread pool (tiktoken releases the GIL) while the next ones are read,
    writing ids in order; returns the per-split counts and the number of characters."""
    splits = {split: {"tokens": 0, "bytes": 0} for split in SPLITS}
    chars = 0
    in_flight: deque[tuple[str, Future[np.ndarray]]] = deque()
    texts = _read_texts(sources, errors, chunk_bytes, progress, hash_inputs=True)
    with ExitStack() as stack:
        files = {split: stack.enter_context(open(tmp / f"{split}.bin", "wb")) for split in SPLITS}
        pool = stack.enter_context(ThreadPoolExecutor(threads))
        stack.callback(pool.shutdown, cancel_futures=True)  # on error, drop queued chunks

        def write_oldest() -> None:
            split, ids = in_flight.popleft()
            array = ids.result()
            files[split].write(array.astype(np.dtype(dtype).newbyteorder("<")).data)  # no copy: the buffer itself
            splits[split]["tokens"] += len(array)

        for split, text, nbytes in texts:
            in_flight.append((split, pool.submit(tok.encode_array, text)))
            splits[split]["bytes"] += nbytes
            chars += len(text)
            if len(in_flight) > 2 * threads:  # keep every thread busy but memory bounded
                write_oldest()
        while in_flight:
            write_oldest()
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    for split, counts in splits.items():
        if counts["tokens"] < 2:
            raise MicroGPTError(
                f"the {split} split has only {counts['tokens']} token(s); the input is too small to split "
                f"with --val-fraction, give more text"
            )
    return splits, chars


# --- conversations -----------------------------------------------------------------------------


def _read_chats(sources: list[_Source], errors: str, progress: _Progress,
                hash_inputs: bool = False) -> Iterator[tuple[str, str, list[Any] | None, str]]:
    """(split, where, messages, problem) for every non-blank line of every input: `where` is
    "file:line", and either messages (checked: read_messages) or the problem of a malformed line."""
    for source in sources:
        with open(source.path, "rb") as f:
            offset = 0
            for number, raw in enumerate(f, 1):
                if hash_inputs:
                    source.sha256.update(raw)
                split = "train" if offset < source.val_start else "val"
                offset += len(raw)
                progress.advance(len(raw))
                if not raw.strip():
                    continue
                where = f"{source.name}:{number}"
                try:
                    line = raw.decode("utf-8", errors)
                    if "\x00" in line:
                        raise ValueError("it holds a NUL byte (a binary file?)")
                    try:
                        value = json.loads(line)
                    except ValueError as exc:
                        raise ValueError(f"not valid JSON ({str(exc).split(':')[0]})") from None
                    if not isinstance(value, dict) or "messages" not in value:
                        raise ValueError('not an object with a "messages" list')
                    yield split, where, read_messages(value["messages"]), ""
                except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
                    problem = "not valid UTF-8" if isinstance(exc, UnicodeDecodeError) else str(exc)
                    yield split, where, None, problem


def _write_chat_splits(tok: tok_lib.Tokenizer, sources: list[_Source], tmp: Path, dtype: str, errors: str,
                       progress: _Progress, on_skip: Callable[[str], None] | None,
                       ) -> tuple[dict[str, dict[str, int]], int, dict[str, Any]]:
    """Render every conversation with the chat template into {split}.bin and its loss mask into
    {split}.mask.bin (one byte per id: 1 where the id is trained on). A line of an input goes to
    val from the byte where the input's val part starts (a line start). A malformed line (bad JSON
    or UTF-8, no messages, an unknown role, content that is not a string, no assistant turn, a
    character the vocabulary lacks) is skipped and reported through `on_skip`, and counted.
    Returns the per-split counts, the characters of all content, and the meta.json chat facts."""
    chat = ChatFormat(tok)
    splits = {split: {"tokens": 0, "bytes": 0} for split in SPLITS}
    conversations = dict.fromkeys(SPLITS, 0)
    trained = dict.fromkeys(SPLITS, 0)
    skipped, chars = 0, 0
    order = np.dtype(dtype).newbyteorder("<")
    with ExitStack() as stack:
        files = {(split, kind): stack.enter_context(open(tmp / name.format(split=split), "wb"))
                 for split in SPLITS for kind, name in (("ids", "{split}.bin"), ("mask", MASK_FILE))}
        for split, where, messages, problem in _read_chats(sources, errors, progress, hash_inputs=True):
            if messages is not None:
                try:
                    ids, mask = chat.render(messages)
                except MicroGPTError as exc:  # a character outside a char vocabulary
                    messages, problem = None, str(exc)
            if messages is None:
                skipped += 1
                if on_skip is not None and skipped <= MAX_LISTED_SKIPS:
                    more = "; further malformed lines are counted, not listed" if skipped == MAX_LISTED_SKIPS else ""
                    on_skip(f"{where}: skipped: {problem}{more}")
                continue
            files[split, "ids"].write(ids.astype(order).tobytes())
            files[split, "mask"].write(mask.tobytes())
            contents = [m.content for m in messages]
            splits[split]["tokens"] += len(ids)
            splits[split]["bytes"] += sum(len(c.encode("utf-8")) for c in contents)
            chars += sum(map(len, contents))
            conversations[split] += 1
            trained[split] += int(mask.sum())
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    if not any(conversations.values()):
        raise MicroGPTError(f"the input holds no conversation to train on: all {skipped:,} non-blank lines are "
                            f"malformed (see the warnings)")
    for split in SPLITS:
        if not conversations[split]:
            raise MicroGPTError(f"the {split} split has no conversation ({skipped:,} malformed line(s) skipped); "
                                f"give more conversations, or change --val-fraction")
    facts = {"template": chat.template.name, "conversations": conversations, "trained_tokens": trained,
             "skipped_lines": skipped}
    return splits, chars, facts
