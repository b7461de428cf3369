"""Property-based fuzzing of every subcommand with hypothesis: generated option values (valid,
boundary and invalid) and generated corrupt files (checkpoints, data dirs, TOML configs, metrics
logs, text inputs).

The property, for every case: exit 0, or a non-zero exit (2 for option parsing, 1 otherwise) with
exactly one `error:` line on stderr and nothing on stdout; never a traceback, a signal or a hang;
no temp files left anywhere; the shared inputs byte-identical; and the case's workspace changed
only where the command was meant to write (nowhere at all when it failed).

Cases run in-process through the real entry point (cli.main): a subprocess per case would pay
~2 s of torch import each, and the file must stay well under two minutes. Each case runs in a
fresh workspace dir (its cwd) and is stopped by SIGALRM if it runs too long.
"""

from __future__ import annotations

import copy
import fractions
import functools
import hashlib
import io
import json
import os
import pickle
import re
import shlex
import shutil
import signal
import sys
import tempfile
import traceback
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st

from microgpt_cli.config import TrainConfig
from microgpt_cli.data.dataset import data_fingerprint
from microgpt_cli.data.tokenizer import Tokenizer, train_char
from microgpt_cli.io.checkpoint import Checkpoint, TrainingState
from microgpt_cli.training.optim import build_optimizers

from clitools import json_junk
from conftest import TINY_TEXT, tiny_model, write_data_dir

# The bugs this test found are fixed; each one's repro runs as a fixed example of its test (see
# REGRESSIONS at the end), so that it stays fixed whatever the seed draws.

# A hang detector, not a speed limit: far above the slowest honest case (~2 s: the first gpt2
# tokenizer build), and above a checkpoint's fsync on a busy disk (over 10 s once, in a CI run
# on a loaded machine).
CASE_SECONDS = 60.0
TINY_TRAIN = ["--n-layer", "1", "--n-embed", "16", "--n-head", "2", "--context", "8", "--batch-size", "2",
              "--eval-interval", "2", "--eval-tokens", "50", "--device", "cpu", "--no-compile"]
# Hidden temp files and dirs the product writes and must always clean up (files.py, dataprep.py,
# training/loop.py); none of the names this test creates looks like one.
TEMP_NAME = re.compile(r"^\..*\.tmp$|^\..*\.(tmp|old)-|^\.discard$|^\.lock$|^\.stdin$")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# Lines a command prints while it works (so also before a failure that comes later): train's
# start, settings, progress and evaluation lines, generate's model line. Anything else on a
# failure's stderr is a second message.
STATUS_LINE = {
    "train": re.compile(r"^(\[|starting · |resuming at step |changed on resume: |settings \(saved in "
                        r"|step [\d,]+: )"),
    "generate": re.compile(r"^.+: [\d.]+M parameters, .+ tokenizer, on |^\d+ tokens in "),
}
# CI runs a fixed set of examples (derandomized, no example database). MICROGPT_FUZZ_SCALE=10 runs
# ten times as many with a random seed: a deeper hunt, for a person to run now and then.
SCALE = float(os.environ.get("MICROGPT_FUZZ_SCALE", "1"))
SETTINGS = settings(deadline=None, derandomize=SCALE == 1, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def examples(count: int) -> settings:
    return settings(SETTINGS, max_examples=max(1, int(count * SCALE)))


# --- what a case is ------------------------------------------------------------------------


@dataclass(frozen=True)
class Ref:
    """A shared input (data, model.pt, gpt2-model.pt, run, text.txt, hf, export) that no case may change."""

    name: str


@dataclass(frozen=True)
class Blob:
    """Generated file contents, shown by what they are rather than by their bytes."""

    label: str
    data: bytes = field(repr=False)


Arg = str | Ref
Files = dict[str, Blob | None]  # workspace path -> contents (None: an empty dir)


@dataclass
class Part:
    """Arguments with the workspace files they need: what the strategies build cases from."""

    args: list[Arg] = field(default_factory=list)
    files: Files = field(default_factory=dict)
    copies: dict[str, str] = field(default_factory=dict)  # workspace path -> shared input copied there
    outputs: tuple[str, ...] = ()  # workspace paths the command may create or change when it succeeds
    stdin: bytes = b""

    def __add__(self, other: Part) -> Part:
        return Part(self.args + other.args, {**self.files, **other.files}, {**self.copies, **other.copies},
                    self.outputs + other.outputs, self.stdin + other.stdin)


def opt(flag: str, value: st.SearchStrategy[Part] | st.SearchStrategy[str]) -> st.SearchStrategy[Part]:
    """`flag VALUE` as a Part, VALUE a string or a Part (a path with its files)."""
    return value.map(lambda v: v if isinstance(v, Part) else Part([v])).map(lambda p: Part([flag]) + p)


def parts(*strategies: st.SearchStrategy[Part]) -> st.SearchStrategy[Part]:
    return st.tuples(*strategies).map(lambda ps: sum(ps, Part()))


def maybe(strategy: st.SearchStrategy[Part]) -> st.SearchStrategy[Part]:
    return st.one_of(st.just(Part()), strategy)


def mostly(good: st.SearchStrategy[Any], *odd: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`good` about half the time: a case with every input odd would only ever test the first check."""
    return st.one_of(*[good] * max(1, len(odd)), *odd)


# --- the valid material every corruption starts from ---------------------------------------


@functools.cache
def char_tokenizer() -> Tokenizer:
    return train_char([TINY_TEXT])


@functools.cache
def good_data_files() -> dict[str, bytes]:
    """meta.json, train.bin and val.bin of the shared data dir (conftest's format, TINY_TEXT)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = write_data_dir(Path(tmp) / "data", char_tokenizer(), TINY_TEXT, TINY_TEXT[:90])
        return {p.name: p.read_bytes() for p in path.iterdir()}


@functools.cache
def good_state() -> dict[str, Any]:
    """A last.pt-like checkpoint dict (with a training state) of the TINY_TRAIN shape, with the
    shared data dir's fingerprint, so that --resume gets past the data and shape checks."""
    tokenizer = char_tokenizer()
    model = tiny_model(tokenizer.vocab_size, n_layer=1, n_embed=16, context=8)
    cfg = TrainConfig(data="data", out="run", max_steps=2, batch_size=2, eval_interval=2, eval_tokens=50,
                      device="cpu")
    meta = json.loads(good_data_files()["meta.json"])
    optimizers = [o.state_dict() for o in build_optimizers(model, cfg, torch.device("cpu"))]
    metrics = {"step": 2, "epoch": 0.1, "tokens": 32, "train_loss": 3.7, "val_loss": 3.6, "elapsed": 1.0}
    training = TrainingState(optimizers, 2, 1.0, 3.6, 1)
    return Checkpoint.of(model, tokenizer, cfg, data_fingerprint(meta), metrics, training).to_dict()


def torch_bytes(obj: object, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    return buffer.getvalue()


@functools.cache
def good_checkpoint_bytes() -> bytes:
    return torch_bytes(good_state())


# --- option values ---------------------------------------------------------------------------


def argv_text(max_size: int = 12) -> st.SearchStrategy[str]:
    """What a real argv can hold on Linux: any bytes but NUL, decoded as CPython decodes argv
    (UTF-8 with surrogateescape), or any unicode text."""
    return st.one_of(
        st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=max_size),
        st.binary(max_size=max_size).map(lambda b: b.replace(b"\0", b"").decode("utf-8", "surrogateescape")),
    )


HUGE_INTS = [2**63 - 1, 2**63, 2**64, 10**30, -(2**63) - 1]
BAD_INTS = ["-1", "0", "", " ", "abc", "1.5", "1e3", "0x10", "inf", "nan", "٣", "+7", "1_0", "--"]
ODD_FLOATS = ["inf", "-inf", "nan", "-nan", "-0.0", "0", "1e-320", "1e-300", "1e-40", "1e308", "1e309", "-1", "",
              "abc", "1,5", "0x1p-3", "١.٥", "+1e-5"]
TINY_FLOATS = ("1e-320", "1e-300", "1e-40")


def int_text(valid: st.SearchStrategy[int], huge: bool = True, any_int: bool = True) -> st.SearchStrategy[str]:
    """Valid values, boundary and invalid ones, non-numbers and argv junk; with `huge`, ints
    around 2**63 and past it; with `any_int`, any int at all. Options whose valid values are an
    amount of work (steps, tokens, samples) take neither: a million tokens are a long run, not a bug."""
    odd = [st.sampled_from(BAD_INTS), argv_text(6)]
    if huge:
        odd.append(st.sampled_from(HUGE_INTS).map(str))
    if any_int:
        odd.append(st.integers().map(str))
    return mostly(valid.map(str), *odd)


def float_text(valid: st.SearchStrategy[float], huge: bool = True, tiny: bool = True) -> st.SearchStrategy[str]:
    """Valid values, then infinities, NaNs, -0.0, non-numbers and argv junk; with `huge`, 1e308
    and past it; with `tiny`, positive values near float underflow."""
    odd = [f for f in ODD_FLOATS if (huge or f not in ("1e308", "inf", "1e309")) and (tiny or f not in TINY_FLOATS)]
    return mostly(valid.map(repr), st.sampled_from(odd), argv_text(6))


def choice_text(*choices: str) -> st.SearchStrategy[str]:
    return mostly(st.sampled_from(choices), st.sampled_from(["", "bogus", choices[0].upper(), f" {choices[0]}"]),
                  argv_text(6))


DEVICES = choice_text("cpu", "auto", "cpu", "cuda", "cuda:0", "cuda:999", "mps", "cuda:", "cpu:0", "gpu")


# --- generated files -------------------------------------------------------------------------


def text_blob(max_size: int = 300) -> st.SearchStrategy[Blob]:
    """Text inputs: the tiny corpus's characters, any unicode, random bytes (mostly invalid UTF-8)
    and odd encodings."""
    alphabet = "".join(sorted(set(TINY_TEXT)))
    odd = [b"", b"\n", b"\xef\xbb\xbfHello there\n", b"\xff\xfeH\x00i\x00", b"abc\x00def\n", b"\xed\xa0\x80\n",
           b"caf\xc3\n", b"\r\n\r\n", b"\x80" * 10, TINY_TEXT.encode() * 2]
    return st.one_of(
        st.text(alphabet, max_size=max_size).map(lambda t: Blob(f"corpus chars {t[:20]!r}", t.encode())),
        st.text(st.characters(codec="utf-8"), max_size=max_size // 3).map(
            lambda t: Blob(f"unicode {t[:20]!r}", t.encode())),
        st.binary(max_size=max_size).map(lambda b: Blob(f"bytes {b[:20]!r}", b)),
        st.sampled_from(odd).map(lambda b: Blob(f"odd {b[:20]!r}", b)),
    )


DELETE = object()  # an edit that removes the key


def apply_edit(root: Any, path: tuple[str, ...], value: Any) -> None:
    """Set (or delete) root[path...], creating missing objects on the way."""
    target = root
    for key in path[:-1]:
        if not isinstance(target, dict):
            return  # an earlier edit put a non-object here
        target = target.setdefault(key, {})
    if isinstance(target, dict):
        if value is DELETE:
            target.pop(path[-1], None)
        else:
            target[path[-1]] = value


META_PATHS = [("version",), ("tokenizer",), ("tokenizer", "kind"), ("tokenizer", "chars"), ("tokenizer", "name"),
              ("vocab_size",), ("dtype",), ("splits",), ("splits", "train"), ("splits", "val"),
              ("splits", "train", "tokens"), ("splits", "val", "tokens"), ("splits", "val", "bytes"), ("inputs",)]
META_VALUES = st.one_of(json_junk(), st.sampled_from(
    [DELETE, "uint8", "float32", "uint32", "char", "gpt2", "bpe", "tiktoken", [{"path": 5}], ["x"], [{}],
     [{"path": "a.txt", "sha256": 5, "bytes": "x"}], 43, 45, 65536, 2**32 + 1]))


@st.composite
def corrupt_data_dir(draw: st.DrawFn, name: str = "data-bad") -> Part:
    """A data dir with one or two things wrong: meta.json edited or replaced by junk, token files
    cut, extended or holding ids past the vocabulary, a file missing or a dir in its place."""
    files: dict[str, Blob | None] = {n: Blob("good", b) for n, b in good_data_files().items()}
    labels = []
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(["meta-edit", "meta-edit", "meta-raw", "tokens", "missing", "dir"]))
        if kind == "meta-edit":
            meta = json.loads(good_data_files()["meta.json"])
            edit = st.tuples(st.sampled_from(META_PATHS), META_VALUES)
            edits = draw(st.lists(edit, min_size=1, max_size=3))
            for path, value in edits:
                apply_edit(meta, path, value)
            labels.append(f"meta.json edited {[(p, '<delete>' if v is DELETE else v) for p, v in edits]}")
            files["meta.json"] = Blob(labels[-1], json.dumps(meta).encode())
        elif kind == "meta-raw":
            raw = draw(st.one_of(st.binary(max_size=40), st.sampled_from(
                [b"", b"{", b"[]", b"null", b'"x"', b"\xff\xfe{}", b"\xef\xbb\xbf" + good_data_files()["meta.json"],
                 b"{}" * 3, b'{"version": 1e999}', b"NaN"])))
            labels.append(f"meta.json is {raw[:30]!r}")
            files["meta.json"] = Blob(labels[-1], raw)
        elif kind == "tokens":
            split = draw(st.sampled_from(["train.bin", "val.bin"]))
            data = bytearray(good_data_files()[split])
            how = draw(st.sampled_from(["cut-one-byte", "add-one-byte", "id-past-vocab", "empty", "random"]))
            if how == "cut-one-byte":
                data = data[:-1]
            elif how == "add-one-byte":
                data += b"\x01"
            elif how == "id-past-vocab":
                at = draw(st.integers(0, len(data) // 2 - 1))
                value = draw(st.sampled_from([char_tokenizer().vocab_size, 65535, 1000]))
                data[2 * at : 2 * at + 2] = value.to_bytes(2, "little")
            elif how == "empty":
                data = bytearray()
            else:
                data = bytearray(draw(st.binary(max_size=64)))
            labels.append(f"{split} {how}")
            files[split] = Blob(labels[-1], bytes(data))
        else:
            victim = draw(st.sampled_from(sorted(good_data_files())))
            labels.append(f"{victim} {kind}")
            if kind == "missing":
                files.pop(victim, None)
            else:
                files[victim] = None
    note(f"{name}: {'; '.join(labels)}")
    return Part([name], files={name: None, **{f"{name}/{n}": b for n, b in files.items()}})


def checkpoint_edits(shape: bool = True) -> st.SearchStrategy[list[tuple[tuple[str, ...], Any]]]:
    """Edits to a checkpoint dict: missing keys, wrong types, odd versions; with `shape`, of the
    model config and weights too."""
    state = good_state()
    top = [k for k in [*state, "bogus"] if shape or k not in ("model", "model_config")]
    paths = st.one_of(
        st.sampled_from([(k,) for k in top]),
        st.sampled_from([("tokenizer", k) for k in ("kind", "chars", "name", "tokens", "pattern")]),
        st.sampled_from([("metrics", k) for k in ("step", "epoch", "train_loss", "val_loss", "elapsed")]),
        st.sampled_from([("data", k) for k in ("inputs", "tokenizer", "vocab_size")]),
        st.sampled_from([("train_config", k) for k in ("data", "out", "seed", "batch_size", "lr", "bogus")]),
        *([st.sampled_from([("model_config", k) for k in [*state["model_config"], "bogus"]]),
           st.sampled_from([("model", k) for k in [*state["model"], "bogus"]])] if shape else []),
    )
    tensors = st.builds(lambda shape, dtype, fill: torch.full(shape, fill).to(dtype),
                        st.lists(st.integers(0, 4), max_size=3).map(tuple),
                        st.sampled_from([torch.float32, torch.int64, torch.bool, torch.float16]),
                        st.sampled_from([0.0, 1.0, float("nan"), float("inf")]))
    values = st.one_of(json_junk(), st.integers(-3, 64), tensors,
                       st.sampled_from([DELETE, 2, 0, "1", 1.0, True, "4", "char", "gpt2", "bpe", "tiktoken", "rope",
                                        [], {}, ["x"], {"step": "x"}]))
    return st.lists(st.tuples(paths, values), min_size=1, max_size=3)


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name or "x", data)
    return buffer.getvalue()


def edited_checkpoint(edits: list[tuple[tuple[str, ...], Any]]) -> Blob:
    state = copy.deepcopy(good_state())
    for path, value in edits:
        apply_edit(state, path, value)
    shown = [(".".join(map(str, p)), "<delete>" if v is DELETE else v) for p, v in edits]
    return Blob(f"checkpoint with {shown}", torch_bytes(state))


def checkpoint_blob(shape: bool = True) -> st.SearchStrategy[Blob]:
    """Corrupt checkpoints: cut short, bits flipped, random bytes, a zip that is no checkpoint,
    a torch file of the wrong structure or refused objects, a legacy (non-zip) torch file."""
    good = good_checkpoint_bytes()
    n = len(good)

    def flip(changes: list[tuple[int, int]]) -> Blob:
        data = bytearray(good)
        for at, mask in changes:
            data[at] ^= mask
        return Blob(f"checkpoint with bytes flipped at {changes}", bytes(data))

    return st.one_of(
        st.integers(0, n - 1).map(lambda k: Blob(f"checkpoint cut to {k} of {n} bytes", good[:k])),
        st.lists(st.tuples(st.integers(0, n - 1), st.integers(1, 255)), min_size=1, max_size=6).map(flip),
        st.binary(max_size=200).map(lambda b: Blob(f"random bytes {b[:20]!r}", b)),
        st.dictionaries(st.text("abcz/._", max_size=8), st.binary(max_size=20), max_size=3).map(
            lambda m: Blob(f"zip of {sorted(m)}", zip_bytes(m))),
        checkpoint_edits(shape).map(edited_checkpoint),
        checkpoint_edits(shape).map(edited_checkpoint),
        st.sampled_from([[], 5, "x", None, (1, 2)]).map(lambda v: Blob(f"torch.save({v!r})", torch_bytes(v))),
        st.just(Blob("torch.save of a tensor", torch_bytes(torch.zeros(3)))),
        st.just(Blob("a checkpoint holding a Fraction (refused by weights_only)",
                     torch_bytes({**good_state(), "metrics": {"step": fractions.Fraction(1, 3)}}))),
        st.just(Blob("legacy non-zip torch file", torch_bytes({"version": 1}, _use_new_zipfile_serialization=False))),
        st.just(Blob("plain pickle", pickle.dumps({"version": 1}))),
    )


def odd_path(name: str) -> st.SearchStrategy[Part]:
    """A path that is not what it should be: missing, a plain file, an empty dir, inside a file, or ''."""
    text = Blob("text", b"hello\n")
    return st.sampled_from([
        Part([f"{name}-missing"]),
        Part([f"{name}.file"], files={f"{name}.file": text}),
        Part([f"{name}.dir"], files={f"{name}.dir": None}),
        Part([f"{name}.file/x"], files={f"{name}.file": text}),
        Part([""]),
    ])


def checkpoint_input(shape: bool = True) -> st.SearchStrategy[Part]:
    good = st.sampled_from([Part([Ref("model.pt")]), Part([Ref("gpt2-model.pt")]), Part([Ref("run")])])
    return mostly(
        good,
        checkpoint_blob(shape).map(lambda b: Part(["ckpt.pt"], files={"ckpt.pt": b})),
        checkpoint_blob(shape).map(lambda b: Part(["ckpt.pt"], files={"ckpt.pt": b})),
        # a run dir with a damaged best.pt (what eval and generate use) or last.pt (what info reads first)
        st.tuples(checkpoint_blob(shape), st.sampled_from(["best.pt", "last.pt"])).map(
            lambda bn: Part(["run-copy"], copies={"run-copy": "run"}, files={f"run-copy/{bn[1]}": bn[0]})),
        odd_path("ckpt"),
    )


def data_input() -> st.SearchStrategy[Part]:
    return mostly(st.just(Part([Ref("data")])), corrupt_data_dir(), corrupt_data_dir(), odd_path("data"),
                  st.just(Part([Ref("run")])))


def text_input(name: str) -> st.SearchStrategy[Part]:
    return mostly(st.just(Part([Ref("text.txt")])), text_blob().map(lambda b: Part([name], files={name: b})),
                  text_blob().map(lambda b: Part([name], files={name: b})), odd_path(name))


TOML_VALUES = st.one_of(
    st.integers(-(2**64), 2**64).map(str),  # past int64 is a TOML syntax error
    st.floats().map(repr),
    st.sampled_from(["0", "-1", "2", "1.5", "inf", "-inf", "nan", "-0.0", "1e400", "true", "false", '"cpu"', '""',
                     "'x'", "[1, 2]", "[]", "{a = 1}", "1979-05-27", "07:32:00", '"\\u00e9"', '"""a\nb"""', "0x10",
                     "1_000", "'missing'"]),
    argv_text().map(lambda s: json.dumps(s, ensure_ascii=False)),  # a lone-surrogate escape is invalid TOML
)


@st.composite
def toml_blob(draw: st.DrawFn, keys: list[str], good: dict[str, str]) -> Blob:
    """A --config file: right keys with wrong types, unknown keys, tables, arrays, bad syntax or bytes."""
    kind = draw(st.sampled_from(["lines", "lines", "good", "raw"]))
    if kind == "raw":
        data = draw(st.one_of(st.binary(max_size=60), st.sampled_from(
            [b"", b"\xff\xfe", b"lr = 0.1\n\x80", b"[x]\ny = 1", b"a = ", b"= 1", b"\xef\xbb\xbflr = 0.1"])))
        return Blob(f"toml bytes {data[:40]!r}", data)
    if kind == "good":
        chosen = draw(st.lists(st.sampled_from(sorted(good)), unique=True, min_size=1, max_size=3))
        lines = [f"{k} = {good[k]}" for k in chosen]
    else:
        key = st.one_of(st.sampled_from(keys), st.sampled_from(["bogus", "max-steps", "config", "help", "vocab_size",
                                                                "\"quoted key\"", "a.b"]))
        lines = [f"{k} = {v}" for k, v in draw(st.lists(st.tuples(key, TOML_VALUES), max_size=4))]
        if draw(st.booleans()):
            lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from(["[table]", "[[array]]", "# c", "x"])))
    text = "\n".join(lines) + "\n"
    return Blob(f"toml {text!r}", text.encode("utf-8", "surrogateescape"))


def config_input(keys: list[str], good: dict[str, str]) -> st.SearchStrategy[Part]:
    return st.one_of(toml_blob(keys, good).map(lambda b: Part(["cfg.toml"], files={"cfg.toml": b})),
                     toml_blob(keys, good).map(lambda b: Part(["cfg.toml"], files={"cfg.toml": b})),
                     odd_path("cfg"))


def output_path(name: str, existing: st.SearchStrategy[Part] | None = None) -> st.SearchStrategy[Part]:
    """Where a command writes: a fresh path (the common case), a nested fresh path, an existing
    file, a path inside a file, an existing (empty or not) dir, or ''."""
    text = Blob("text", b"keep me\n")
    fresh = st.just(Part([name], outputs=(name,)))
    odd: st.SearchStrategy[Part] = st.sampled_from([
        Part([f"new/{name}"], outputs=(f"new/{name}",)),
        Part([name], files={name: text}, outputs=(name,)),
        Part([f"{name}.file/x"], files={f"{name}.file": text}, outputs=(f"{name}.file/x",)),
        Part([name], files={name: None}, outputs=(name,)),
        Part([name], files={name: None, f"{name}/keep.txt": text}, outputs=(name,)),
        Part([""], outputs=("",)),
    ])
    return mostly(fresh, odd, *([existing] if existing is not None else []))


# --- cases per subcommand --------------------------------------------------------------------
# Each command has slots (its inputs and options), each with a good value and a strategy for any
# value, valid or not. A case takes the good value for all slots but a few: with many odd inputs
# at once, every case would stop at the same first check.

Slots = dict[str, tuple[st.SearchStrategy[Part], st.SearchStrategy[Part]]]
NOTHING = st.just(Part())


def fuzzed(name: str, slots: Slots, most: int = 2, fixed: Part = Part()) -> st.SearchStrategy[tuple[str, Part]]:
    """`microgpt NAME FIXED...` with up to `most` slots at any value and the rest at their good value."""
    odd = st.lists(st.sampled_from(list(slots)), unique=True, max_size=most)
    case = odd.flatmap(lambda chosen: parts(st.just(Part([name]) + fixed),
                                            *(slots[s][1] if s in chosen else slots[s][0] for s in slots)))
    return case.map(lambda p: (name, p))


def flag(*flags: str) -> tuple[st.SearchStrategy[Part], st.SearchStrategy[Part]]:
    """A boolean option: off when good, any of `flags` (or none) when fuzzed."""
    return NOTHING, st.sampled_from([Part(), *(Part([f]) for f in flags)])


def option(name: str, values: st.SearchStrategy[str] | st.SearchStrategy[Part],
           good: st.SearchStrategy[Part] = NOTHING) -> tuple[st.SearchStrategy[Part], st.SearchStrategy[Part]]:
    return good, opt(name, values)


def good_text() -> st.SearchStrategy[Blob]:
    """A text prepare can split: a slice of the tiny corpus, sometimes with odd characters mixed in."""
    extra = st.text(st.characters(codec="utf-8"), max_size=5)
    return st.tuples(st.integers(150, len(TINY_TEXT)), extra).map(
        lambda ke: Blob(f"corpus[:{ke[0]}] + {ke[1]!r}", (TINY_TEXT[: ke[0]] + ke[1] + "\n" + TINY_TEXT).encode()))


@st.composite
def prepare_inputs(draw: st.DrawFn) -> Part:
    """0-3 inputs: text files, dirs (with hidden, binary and nested files), stdin, odd paths."""
    result = Part()
    for i in range(draw(st.sampled_from([1, 1, 2, 3, 0]))):
        kind = draw(st.sampled_from(["file", "file", "good", "shared", "dir", "stdin", "odd", "twice"]))
        if kind in ("file", "good"):
            result += Part([f"in{i}.txt"], files={f"in{i}.txt": draw(text_blob() if kind == "file" else good_text())})
        elif kind == "dir":
            result += Part([f"indir{i}"], files={f"indir{i}": None, f"indir{i}/a.txt": draw(text_blob()),
                                                 f"indir{i}/.hidden.txt": draw(text_blob()),
                                                 f"indir{i}/sub": None, f"indir{i}/sub/b.bin": Blob("nul", b"\0x")})
        elif kind == "stdin":
            result += Part(["-"], stdin=draw(st.one_of(good_text(), text_blob())).data)
        elif kind == "shared":
            result += Part([Ref("text.txt")])
        elif kind == "twice":
            result += Part([f"in{i}.txt", f"./in{i}.txt"], files={f"in{i}.txt": Blob("text", TINY_TEXT.encode())})
        else:
            result += draw(odd_path(f"in{i}"))
    return result


def prepare_cases() -> st.SearchStrategy[tuple[str, Part]]:
    # Tokenizer names tiktoken would download are left out: a network fetch has no place in a unit test.
    good_tokenizer = st.sampled_from(["char", "gpt2", "bpe"]).map(lambda t: Part(["--tokenizer", t]))
    tokenizers = choice_text("char", "gpt2", "bpe", "cl100k_bogus")
    existing = st.just(Part(["data-old"], copies={"data-old": "data"}, outputs=("data-old",)))
    return fuzzed("prepare", {
        "inputs": (good_text().map(lambda b: Part(["in.txt"], files={"in.txt": b})), prepare_inputs()),
        "out": (opt("--out", st.just(Part(["prep"], outputs=("prep",)))), opt("--out", output_path("prep", existing))),
        "tokenizer": (good_tokenizer, opt("--tokenizer", tokenizers)),
        "sample": option("--sample", choice_text("tinyshakespeare")),
        "vocab": option("--vocab-size", int_text(st.integers(257, 400))),
        "val": option("--val-fraction", float_text(st.floats(0.01, 0.99))),
        "force": flag("--force"),
        "errors": option("--errors", choice_text("strict", "replace")),
    }, most=3)


TRAIN_KEYS = ["data", "out", "preset", "resume", "force", "epochs", "max_steps", "time_budget", "batch_size",
              "batches", "grad_accum", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "grad_clip", "beta1",
              "beta2", "optimizer", "muon_lr", "eval_interval", "eval_tokens", "log_interval", "seed", "device",
              "compile", "threads", "n_layer", "n_head", "n_ma", "n_embed", "context", "text_size", "dropout",
              "position", "norm", "activation", "qk_norm", "tie_weights", "bias", "pad_vocab", "init_from"]
TRAIN_GOOD_TOML = {"lr": "0.01", "warmup_steps": "1", "seed": "7", "dropout": "0.0", "position": '"rope"',
                   "norm": '"rmsnorm"', "activation": '"gelu"', "qk_norm": "true", "bias": "false",
                   "optimizer": '"muon"', "log_interval": "1", "eval_tokens": "0", "preset": '"cpu"',
                   "compile": "true", "threads": "1"}


def run_length() -> st.SearchStrategy[Part]:
    """--max-steps and --epochs: any value for one while the other keeps the run to a few steps
    (both unbounded is a legitimately endless run; the tiny corpus has ~30 steps per epoch)."""
    small_steps = st.sampled_from(["1", "2", "3"])
    small_epochs = st.sampled_from(["0.01", "0.05", "0.1"])
    any_steps = int_text(st.integers(0, 3), any_int=False)
    any_epochs = float_text(st.floats(0.001, 0.1))
    pair = st.one_of(st.tuples(small_steps, any_epochs), st.tuples(any_steps, small_epochs))
    return pair.map(lambda p: Part(["--max-steps", p[0], "--epochs", p[1]]))


def train_inputs() -> Slots:
    """The files train reads and writes: the data dir, the run dir (fresh, an earlier run to resume
    or replace, one with a damaged last.pt or metrics.jsonl, a file...) and a --config file."""
    run_copy = st.sampled_from([[], ["--resume"], ["--force"], ["--resume", "--force"]]).map(
        lambda flags: Part(["run-copy", *flags], copies={"run-copy": "run"}, outputs=("run-copy",)))
    damaged_run = st.tuples(checkpoint_blob(), st.sampled_from([["--resume"], ["--force"], []])).map(
        lambda bf: Part(["run-copy", *bf[1]], copies={"run-copy": "run"}, files={"run-copy/last.pt": bf[0]},
                        outputs=("run-copy",)))
    bad_metrics = metrics_blob().map(lambda b: Part(["run-copy", "--resume", "--max-steps", "3"], copies={
        "run-copy": "run"}, files={"run-copy/metrics.jsonl": b}, outputs=("run-copy",)))
    out = st.one_of(output_path("run"), run_copy, damaged_run, bad_metrics,
                    st.just(Part(["run", "--resume"], outputs=("run",))))
    return {
        "data": (opt("--data", st.just(Part([Ref("data")]))), opt("--data", data_input())),
        "out": (opt("--out", st.just(Part(["run"], outputs=("run",)))), opt("--out", out)),
        "config": option("--config", config_input(TRAIN_KEYS, TRAIN_GOOD_TOML)),
    }


def train_options() -> Slots:
    """The tiny base flags, then one slot per option: a later flag wins, so a fuzzed option
    replaces its base value."""
    size = st.integers(-1, 64) | st.sampled_from(HUGE_INTS)
    return {
        "length": (st.just(Part(["--max-steps", "2", "--epochs", "1"])), run_length()),
        "n_layer": option("--n-layer", int_text(st.integers(1, 2), huge=False, any_int=False) | size.map(str)),
        "n_embed": option("--n-embed", int_text(st.sampled_from([2, 4, 8, 16, 30, 32]), huge=False, any_int=False)
                          | size.map(str)),
        "n_head": option("--n-head", int_text(st.integers(1, 4))),
        "context": option("--context", int_text(st.sampled_from([1, 4, 8, 16, 89, 90]))),
        "batch_size": option("--batch-size", int_text(st.integers(1, 4))),
        # Moderately large values run for ages by design (a step of a million micro-batches).
        "grad_accum": option("--grad-accum",
                             int_text(st.integers(1, 3), huge=True, any_int=False)),
        "lr": option("--lr", float_text(st.floats(1e-5, 1.0))),
        "min_lr_ratio": option("--min-lr-ratio", float_text(st.floats(0, 1))),
        "warmup_steps": option("--warmup-steps", int_text(st.integers(0, 5))),
        "weight_decay": option("--weight-decay", float_text(st.floats(0, 1))),
        "grad_clip": option("--grad-clip", float_text(st.floats(0, 2))),
        "beta1": option("--beta1", float_text(st.floats(0, 0.999))),
        "beta2": option("--beta2", float_text(st.floats(0, 0.999))),
        "optimizer": option("--optimizer", choice_text("adamw", "muon")),
        "muon_lr": option("--muon-lr", float_text(st.floats(1e-4, 0.1), huge=True)),
        "eval_interval": option("--eval-interval", int_text(st.integers(1, 3))),
        "eval_tokens": option("--eval-tokens", int_text(st.integers(0, 100))),
        "log_interval": option("--log-interval", int_text(st.integers(1, 3))),
        "seed": option("--seed", int_text(st.integers(0, 2**32 - 1))),
        "device": option("--device", DEVICES),
        "threads": option("--threads", int_text(st.sampled_from([0, 1, 2, 1024, 1025, 100000]), any_int=False)),
        "dropout": option("--dropout", float_text(st.floats(0, 0.99))),
        "position": option("--position", choice_text("learned", "rope")),
        "norm": option("--norm", choice_text("layernorm", "rmsnorm")),
        "activation": option("--activation", choice_text("relu", "relu2", "gelu")),
        "flags": flag("--qk-norm", "--no-qk-norm", "--untie-weights", "--no-bias", "--bias"),
        "time_budget": option("--time-budget", float_text(st.floats(0, 60), huge=True)),
        "pad_vocab": option("--pad-vocab", int_text(st.sampled_from([1, 3, 64, 128]))),
        # of the good checkpoints, only the shared run has TINY_TRAIN's shape and the data's tokenizer
        "init_from": option("--init-from", checkpoint_input()),
        "preset": option("--preset", choice_text("cpu", "gpt2", "finetune")),
    }


def train_cases(fuzz_files: bool) -> st.SearchStrategy[tuple[str, Part]]:
    """Fuzzed files with good options, or fuzzed options with good files: mixed, the options'
    parse errors would hide most of the files."""
    if fuzz_files:
        # Flags beat a --config file: these keep a generated file from asking for an honestly
        # endless run (grad_accum = 5000) or a known bug (see the top).
        fixed = Part([*TINY_TRAIN, "--max-steps", "2", "--epochs", "1", "--grad-accum", "1", "--time-budget", "0",
                      "--threads", "0", "--muon-lr", "0.02"])
        return fuzzed("train", train_inputs(), fixed=fixed)
    fixed = Part([*TINY_TRAIN, "--data", Ref("data"), "--out", "run"], outputs=("run",))
    return fuzzed("train", train_options(), most=3, fixed=fixed)


EVAL_KEYS = ["checkpoint", "data", "text", "skip_unknown", "json", "json_output", "batch_size", "device"]
EVAL_GOOD_TOML = {"batch_size": "3", "device": '"cpu"', "json": "true", "skip_unknown": "true", "text": "'missing'"}
GOOD_CHECKPOINT = st.sampled_from([Ref("model.pt"), Ref("run")]).map(lambda r: Part(["-c", r]))


def eval_cases() -> st.SearchStrategy[tuple[str, Part]]:
    # --data and --text together are refused: the source slot gives one, the extra slot may add the other.
    good_source = st.sampled_from([Part(["--data", Ref("data")]), Part(["--text", Ref("text.txt")])])
    source = st.one_of(opt("--data", data_input()), opt("--text", text_input("text.txt")))
    return fuzzed("eval", {
        "checkpoint": (GOOD_CHECKPOINT, maybe(opt("-c", checkpoint_input()))),
        "source": (good_source, source),
        "extra": (NOTHING, source),
        "device": (st.just(Part(["--device", "cpu"])), opt("--device", DEVICES)),
        "skip": flag("--skip-unknown"),
        "json": flag("--json"),
        "batch": option("--batch-size", int_text(st.integers(1, 16))),
        "config": option("--config", config_input(EVAL_KEYS, EVAL_GOOD_TOML)),
    })


GENERATE_KEYS = ["checkpoint", "prompt", "prompt_file", "length", "temperature", "top_k", "top_p", "seed",
                 "num_samples", "stop", "device"]
GENERATE_GOOD_TOML = {"temperature": "0.0", "top_k": "3", "top_p": "0.5", "seed": "1", "stop": '"e"',
                      "prompt": '"Hello"', "device": '"cpu"'}


def generate_cases() -> st.SearchStrategy[tuple[str, Part]]:
    corpus_text = st.text("".join(sorted(set(TINY_TEXT))), max_size=30)
    prompt = st.one_of(corpus_text, argv_text())
    temperatures = float_text(st.floats(0, 5), tiny=True)
    checkpoints = st.sampled_from([Ref("model.pt"), Ref("run"), Ref("gpt2-model.pt")]).map(lambda r: Part(["-c", r]))
    # --length and --num-samples always come as flags (so a --config file cannot ask for a billion
    # tokens, which would be legitimate but endless); no huge valid --num-samples either.
    return fuzzed("generate", {
        "checkpoint": (checkpoints, maybe(opt("-c", checkpoint_input()))),
        "length": (opt("--length", st.integers(0, 12).map(str)),
                   opt("--length", int_text(st.integers(0, 12), any_int=False))),  # HUGE_INTS are all refused
        "num_samples": (opt("--num-samples", st.sampled_from(["1", "2"])),
                        opt("--num-samples", int_text(st.integers(1, 3), huge=False, any_int=False))),
        "device": (st.just(Part(["--device", "cpu"])), opt("--device", DEVICES)),
        "prompt": (maybe(opt("--prompt", corpus_text)), opt("--prompt", prompt)),
        "prompt_file": option("--prompt-file", text_input("prompt.txt")),
        "temperature": option("--temperature", temperatures),
        "top_k": option("--top-k", int_text(st.integers(1, 100))),
        "top_p": option("--top-p", float_text(st.floats(0.01, 1), tiny=True)),
        "seed": option("--seed", int_text(st.integers(0, 2**32 - 1))),
        "stop": option("--stop", prompt),
        "config": option("--config", config_input(GENERATE_KEYS, GENERATE_GOOD_TOML)),
    }, most=3)


def info_cases() -> st.SearchStrategy[tuple[str, Part]]:
    good = st.sampled_from([Part([Ref(n)]) for n in ("model.pt", "gpt2-model.pt", "run", "data")])
    return fuzzed("info", {
        "target": (good, st.one_of(checkpoint_input(), data_input(), NOTHING)),
        "json": flag("--json"),
    }, most=2)


METRIC_KEYS = ["step", "train_loss", "val_loss", "tokens", "elapsed", "epoch"]


@st.composite
def metrics_blob(draw: st.DrawFn) -> Blob:
    """metrics.jsonl: good lines mixed with lines of wrong types, non-objects, junk and bad bytes."""
    good = {"step": 1, "epoch": 0.1, "tokens": 16, "train_loss": 3.7, "lr": 0.001, "tokens_per_sec": 9.0,
            "elapsed": 0.5}
    lines: list[bytes] = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["good", "edited", "edited", "json", "bytes"]))
        if kind == "good":
            lines.append(json.dumps({**good, "val_loss": 3.6}).encode())
        elif kind == "edited":
            line = dict(good)
            junk = st.one_of(json_junk(), st.sampled_from([DELETE, "1", "x", "nan", None, True, 1e308, -1]))
            for key, value in draw(st.lists(st.tuples(st.sampled_from(METRIC_KEYS), junk), min_size=1, max_size=3)):
                apply_edit(line, (key,), value)
            lines.append(json.dumps(line).encode())
        elif kind == "json":
            lines.append(json.dumps(draw(json_junk())).encode())
        else:
            lines.append(draw(st.binary(max_size=30)).replace(b"\n", b""))
    data = b"\n".join(lines) + draw(st.sampled_from([b"\n", b""]))
    return Blob(f"metrics {data[:200]!r}", data)


def plot_cases() -> st.SearchStrategy[tuple[str, Part]]:
    def run_dir(i: int) -> st.SearchStrategy[Part]:
        name = f"run{i}"
        return mostly(
            st.just(Part([Ref("run")])),
            metrics_blob().map(lambda b: Part([name], copies={name: "run"}, files={f"{name}/metrics.jsonl": b})),
            metrics_blob().map(lambda b: Part([name], copies={name: "run"}, files={f"{name}/metrics.jsonl": b})),
            st.just(Part([Ref("data")])), odd_path(name),
        )

    dirs = st.sampled_from([1, 1, 2, 3, 0]).flatmap(lambda k: parts(*map(run_dir, range(k))) if k else NOTHING)
    no_out = st.just(Part(outputs=("runs.png",)))  # the default: runs.png in the cwd
    return fuzzed("plot", {
        "dirs": (st.just(Part([Ref("run")])), dirs),
        "out": (opt("--out", st.just(Part(["plot.png"], outputs=("plot.png",)))),
                st.one_of(opt("--out", output_path("plot.png")), no_out)),
        "x": option("--x", choice_text("step", "tokens", "time")),
    })


def export_cases() -> st.SearchStrategy[tuple[str, Part]]:
    checkpoints = st.sampled_from([Ref("model.pt"), Ref("run"), Ref("gpt2-model.pt")]).map(lambda r: Part(["-c", r]))
    return fuzzed("export", {
        "checkpoint": (checkpoints, maybe(opt("-c", checkpoint_input(shape=True)))),
        "out": (opt("--out", st.just(Part(["exported"], outputs=("exported",)))),
                maybe(opt("--out", output_path("exported")))),
        "format": (maybe(opt("--format", st.sampled_from(["hf", "safetensors"]))),
                   opt("--format", choice_text("hf", "safetensors"))),
        "force": flag("--force"),
    })


HF_CONFIG_KEYS = ["model_type", "architectures", "vocab_size", "n_positions", "n_ctx", "n_embd", "n_layer", "n_head",
                  "n_inner", "activation_function", "layer_norm_epsilon", "tie_word_embeddings",
                  "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention", "torch_dtype"]
HF_CONFIG_VALUES = st.one_of(json_junk(), st.sampled_from(
    [DELETE, 0, 1, 2, 3, 16, 17, 50257, 50256, 1024, "gpt2", "bert", ["GPT2LMHeadModel"], ["LlamaForCausalLM"],
     "gelu_new", "gelu", "relu", "swish", True, False, "float16", "bfloat16"]))


EXPORT_CONFIG_PATHS = [("format",), ("version",), ("model_config",), ("model_config", "n_layer"),
                       ("model_config", "n_embed"), ("model_config", "vocab_size"), ("model_config", "tie_weights"),
                       ("model_config", "position"), ("model_config", "pad_vocab"), ("model_config", "extra"),
                       ("tokenizer",), ("tokenizer", "kind"), ("tokenizer", "chars")]


@functools.cache
def good_source_files(kind: str) -> dict[str, bytes]:
    """What `microgpt import` reads, as files: "hf", a random transformers GPT-2 small enough to copy into
    every case (1 layer, 8 wide, context 16); "export", `microgpt export --format safetensors` of the
    shared char model."""
    from microgpt_cli.io.export import export

    from clitools import hf_gpt2

    with tempfile.TemporaryDirectory() as tmp:
        if kind == "hf":
            directory = hf_gpt2(Path(tmp) / "hf", n_positions=16, n_embd=8, n_layer=1, n_head=2)
        else:
            (Path(tmp) / "model.pt").write_bytes(good_checkpoint_bytes())
            directory = Path(tmp) / "exported"
            export(Path(tmp) / "model.pt", directory, "safetensors")
        return {f.name: f.read_bytes() for f in directory.iterdir()}


def safetensors_parts(data: bytes) -> tuple[dict[str, Any], bytes]:
    """A safetensors file's JSON header and the tensor bytes after it."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + size]), data[8 + size:]


def safetensors_bytes(header: dict[str, Any], body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + body


@st.composite
def weights_blob(draw: st.DrawFn, kind: str) -> Blob:
    """model.safetensors gone wrong: cut short (often inside the header), bytes flipped, random, or a
    header whose tensors say another dtype, shape, offsets or name than the data holds."""
    good = good_source_files(kind)["model.safetensors"]
    header, body = safetensors_parts(good)
    damage = draw(st.sampled_from(["cut", "flip", "random", "header", "header"]))
    if damage == "cut":
        k = draw(st.integers(0, 300) | st.integers(0, len(good) - 1))
        return Blob(f"safetensors cut to {k} of {len(good)} bytes", good[:k])
    if damage == "flip":
        changes = draw(st.lists(st.tuples(st.integers(0, 300) | st.integers(0, len(good) - 1), st.integers(1, 255)),
                                min_size=1, max_size=4))
        flipped = bytearray(good)
        for at, mask in changes:
            flipped[at] ^= mask
        return Blob(f"safetensors with bytes flipped at {changes}", bytes(flipped))
    if damage == "random":
        data = draw(st.binary(max_size=200))
        return Blob(f"random bytes {data[:20]!r}", data)
    edits = draw(st.lists(st.tuples(st.sampled_from(sorted(header)),
                                    st.sampled_from(["dtype", "shape", "data_offsets", "<rename>", "<delete>"]),
                                    st.one_of(json_junk(), st.sampled_from(["F16", "BF16", "I64", "F64", "BOOL"]),
                                              st.lists(st.integers(0, 70000), max_size=3))),
                          min_size=1, max_size=3))
    edited = copy.deepcopy(header)
    for name, key, value in edits:
        if name not in edited or not isinstance(edited[name], dict):
            continue
        if key == "<delete>":
            del edited[name]
        elif key == "<rename>":
            edited[f"{name}.x"] = edited.pop(name)
        else:
            edited[name][key] = value
    return Blob(f"safetensors header edited {edits}", safetensors_bytes(edited, body))


@st.composite
def config_json_blob(draw: st.DrawFn, kind: str) -> Blob:
    """config.json with keys set to other values (valid for another model, or junk) or removed, or no JSON."""
    if draw(st.integers(0, 4)) == 0:
        blob = draw(text_blob(100))
        return Blob(f"config.json of {blob.label}", blob.data)
    config = json.loads(good_source_files(kind)["config.json"])
    paths = [(k,) for k in HF_CONFIG_KEYS] if kind == "hf" else EXPORT_CONFIG_PATHS
    edits = draw(st.lists(st.tuples(st.sampled_from(paths), HF_CONFIG_VALUES), min_size=1, max_size=3))
    for path, value in edits:
        apply_edit(config, path, value)
    shown = [(".".join(p), "<delete>" if v is DELETE else v) for p, v in edits]
    return Blob(f"config.json with {shown}", json.dumps(config).encode())


def model_source(kind: str) -> st.SearchStrategy[Part]:
    """A model directory for `microgpt import` (a transformers GPT-2, or a microgpt safetensors export):
    the good one, one with a damaged file, a missing file, or pytorch_model.bin in place of safetensors
    (junk, a tensor dict, or a pickle that would run code)."""
    def copy_with(files: dict[str, Blob | None], drop: str = "") -> Part:
        kept = {n: Blob(n, d) for n, d in good_source_files(kind).items() if n != drop}
        return Part(["src"], files={f"src/{n}": b for n, b in {**kept, **files}.items()})

    pickles = st.sampled_from([
        Blob("pickle of os.system", pickle.dumps(os.system)),
        Blob("torch.save of a tensor dict", torch_bytes({"wte.weight": torch.zeros(3, 8)})),
        Blob("torch.save of a list", torch_bytes([1, 2])),
        Blob("random bytes", b"\x80\x04junk"),
    ])
    return mostly(
        st.just(Part([Ref(kind)])),
        weights_blob(kind).map(lambda b: copy_with({"model.safetensors": b})),
        weights_blob(kind).map(lambda b: copy_with({"model.safetensors": b})),
        config_json_blob(kind).map(lambda b: copy_with({"config.json": b})),
        config_json_blob(kind).map(lambda b: copy_with({"config.json": b})),
        st.sampled_from(["config.json", "model.safetensors"]).map(lambda n: copy_with({}, drop=n)),
        pickles.map(lambda b: copy_with({"pytorch_model.bin": b}, drop="model.safetensors")),
        odd_path("src"),
    )


def import_cases() -> st.SearchStrategy[tuple[str, Part]]:
    return fuzzed("import", {
        "source": (st.sampled_from([Part([Ref("hf")]), Part([Ref("export")])]),
                   st.sampled_from(["hf", "export"]).flatmap(model_source)),
        "out": (opt("--out", st.just(Part(["model.pt"], outputs=("model.pt",)))),
                maybe(opt("--out", output_path("model.pt")))),
        "force": flag("--force"),
    })


# --- running a case --------------------------------------------------------------------------


class CaseTimeout(BaseException):
    """Raised by SIGALRM in a case that runs too long: a BaseException, so that no `except
    Exception` in the product swallows it."""


def _on_alarm(signum: int, frame: object) -> None:
    raise CaseTimeout


class _KeptBytes(io.BytesIO):
    """An output buffer that survives close(): main closes stderr on a broken pipe."""

    def close(self) -> None:
        pass


@dataclass
class Outcome:
    code: int
    out: str
    err: str
    crash: str = ""  # the traceback of an exception that escaped main


@contextmanager
def inside(path: Path) -> Iterator[None]:
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def run_main(args: list[str], stdin: bytes = b"") -> Outcome:
    """`microgpt ARGS` through the real entry point, with stdout and stderr encoded as a real
    process's would be (strict UTF-8 stdout, backslash-escaped stderr) and `stdin` as its input."""
    from microgpt_cli.cli import main

    out_bytes, err_bytes = _KeptBytes(), _KeptBytes()
    out = io.TextIOWrapper(out_bytes, encoding="utf-8", errors="strict", write_through=True)
    err = io.TextIOWrapper(err_bytes, encoding="utf-8", errors="backslashreplace", write_through=True)
    saved_stdin, threads = sys.stdin, torch.get_num_threads()
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    code, crash = 0, ""
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                main(args)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception:  # what would be a traceback in a real process
                code, crash = 1, traceback.format_exc()
    except CaseTimeout:
        code, crash = 1, f"hang: still running after {CASE_SECONDS} s\n{traceback.format_exc()}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        sys.stdin = saved_stdin
        torch.set_num_threads(threads)  # --threads N would otherwise slow every later case
    return Outcome(code, out_bytes.getvalue().decode("utf-8", "replace"),
                   ANSI.sub("", err_bytes.getvalue().decode("utf-8", "replace")), crash)


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root`: 'dir' or the sha256 of its contents."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in dirnames:
            found[str((here / name).relative_to(root))] = "dir"
        for name in filenames:
            path = here / name
            found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def temp_files(*roots: Path) -> list[str]:
    return [str(Path(d) / n) for root in roots for d, ds, fs in os.walk(root) for n in ds + fs if TEMP_NAME.match(n)]


def build_workspace(workspace: Path, case: Part, shared: Path) -> None:
    for dest, source in case.copies.items():
        shutil.copytree(shared / source, workspace / dest)
    for name, blob in case.files.items():
        path = workspace / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if blob is None:
            if path.is_file():
                path.unlink()
            path.mkdir(exist_ok=True)
        else:
            if path.is_dir():
                shutil.rmtree(path)
            path.write_bytes(blob.data)


def under(path: str, outputs: tuple[str, ...]) -> bool:
    """Whether `path` (relative to the workspace) is one of `outputs`, inside one ('' is everything)
    or a dir above one (created for it)."""
    return any(o in ("", ".") or path == o or path.startswith(o + "/") or o.startswith(path + "/") for o in outputs)


def check_case(name: str, case: Part, shared: Path, workspace: Path) -> None:
    """Run one generated case and assert the property (see the module docstring)."""
    build_workspace(workspace, case, shared)
    args = [str(shared / a.name) if isinstance(a, Ref) else a for a in case.args]
    shown = "microgpt " + shlex.join(a.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for a in args)
    note(shown)
    before, shared_before = snapshot(workspace), snapshot(shared)
    with inside(workspace):
        outcome = run_main(args, case.stdin)
    after = snapshot(workspace)
    context = f"{shown}\nexit {outcome.code}\nstdout: {outcome.out[:300]!r}\nstderr: {outcome.err[-1500:]}"
    assert not outcome.crash, f"{context}\n{outcome.crash}"
    assert "Traceback" not in outcome.err + outcome.out, context
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    if outcome.code == 0:
        stray = [p for p in changed if not under(p, case.outputs)]
        assert not stray, f"{context}\nchanged outside the outputs {case.outputs}: {stray}"
    else:
        status = STATUS_LINE.get(name)
        lines = [line for line in outcome.err.split("\n") if line.strip()]  # what a terminal shows as lines
        messages = [line for line in lines if not (status and status.match(line))]
        assert len(messages) == 1 and messages[0].startswith("error:") and lines[-1] == messages[0], context
        assert outcome.code in (1, 2) and (outcome.code == 2) == messages[0].endswith("(see --help)"), context
        assert outcome.out == "", context
        assert not changed, f"{context}\na failed command changed {changed}"
    assert not temp_files(workspace, shared), f"{context}\ntemp files left: {temp_files(workspace, shared)}"
    assert snapshot(shared) == shared_before, f"{context}\na shared input changed"


# --- the bugs found, as fixed examples ------------------------------------------------------
# Each bug this test found, as the command that showed it: every one runs as an explicit example
# of its test, so a fixed bug stays fixed whatever the seed draws.

Case = tuple[str, Part]
GOOD_RUN_ARGS = [*TINY_TRAIN, "--max-steps", "2", "--epochs", "1"]


def train_case(*args: Arg, data: Part | None = None, out: str = "run") -> Case:
    data = data or Part([Ref("data")])
    return "train", Part(["train", *GOOD_RUN_ARGS, "--data"]) + data + Part(["--out", out, *args], outputs=(out,))


def bad_data(*edits: tuple[tuple[str, ...], Any]) -> Part:
    meta = json.loads(good_data_files()["meta.json"])
    for path, value in edits:
        apply_edit(meta, path, value)
    files: Files = {"data-bad": None, **{f"data-bad/{n}": Blob(n, b) for n, b in good_data_files().items()}}
    files["data-bad/meta.json"] = Blob(f"meta.json {edits}", json.dumps(meta).encode())
    return Part(["data-bad"], files=files)


def bad_checkpoint(blob: Blob) -> Part:
    return Part(["ckpt.pt"], files={"ckpt.pt": blob})


def bad_metrics(data: bytes) -> Case:
    return "plot", Part(["plot", "run0", "--out", "plot.png"], copies={"run0": "run"},
                        files={"run0/metrics.jsonl": Blob(repr(data), data)}, outputs=("plot.png",))


def zip_version_flipped() -> Blob:
    data = bytearray(good_checkpoint_bytes())
    data[data.find(b"PK\x01\x02") + 6] ^= 0x40  # the central directory's "version needed to extract"
    return Blob("zip version flipped", bytes(data))


def generate_case(*args: str, checkpoint: str = "model.pt") -> Case:
    return "generate", Part(["generate", "-c", Ref(checkpoint), "--length", "3", "--device", "cpu", *args])


def repros() -> dict[str, list[Case]]:
    """The repro of every bug found, by the test it belongs to; the comment says what it did."""
    empty = Part(files={"empty.txt": Blob("empty", b"")})
    return {
        "prepare": [
            # A two-line error: the tokenizer name quoted without repr.
            ("prepare", Part(["prepare", "--sample", "tinyshakespeare", "--tokenizer", "a\nb", "--vocab-size", "300",
                              "--out", "prep"], outputs=("prep",))),
            # An empty new/ left behind by a failed prepare.
            ("prepare", Part(["prepare", "empty.txt", "--out", "new/prep"], outputs=("new/prep",)) + empty),
        ],
        "train_options": [
            train_case("--n-embed", str(2**40)),  # an allocator RuntimeError traceback
            train_case("--n-layer", str(2**62)),  # a hang, building blocks
            train_case("--grad-accum", str(10**21)),  # OverflowError
            train_case("--time-budget", "1e308"),  # OverflowError planning the evaluation
            train_case("--optimizer", "muon", "--muon-lr", "1e308"),  # a float32 overflow in the update
        ],
        "train_files": [
            train_case(data=bad_data((("tokenizer", "name"), None))),  # TypeError printing the start line
            train_case(data=bad_data((("inputs",), ["x"]))),  # AttributeError in data_fingerprint
            train_case(data=Part(["missing"])),  # an empty run dir left behind
        ],
        "generate": [
            generate_case("--prompt", "\udc80"),  # UnicodeEncodeError: an argv that is not UTF-8
            generate_case("--prompt", "\udc80", checkpoint="gpt2-model.pt"),
            generate_case("--temperature", "1e-40"),  # NaN probabilities
            generate_case("--top-p", "1e-300"),  # an all-zero distribution
        ],
        "info": [("info", Part(["info"]) + target) for target in [
            bad_data((("tokenizer", "chars"), None)),  # AttributeError in from_spec
            bad_data((("dtype",), [])),  # unhashable dtype
            bad_data((("inputs",), [{}])),  # KeyError formatting the table
            bad_data((("splits", "val", "bytes"), DELETE)),
            bad_checkpoint(edited_checkpoint([(("metrics", "val_loss"), "x")])),
            bad_checkpoint(edited_checkpoint([(("data", "inputs"), None)])),
            bad_checkpoint(edited_checkpoint([(("tokenizer",), {})])),
            bad_checkpoint(edited_checkpoint([(("model_config", "vocab_size"), torch.zeros(2, 1))])),  # two lines
            bad_checkpoint(edited_checkpoint([(("version",), torch.zeros(2))])),  # an ambiguous tensor truth value
            bad_checkpoint(zip_version_flipped()),  # NotImplementedError from zipfile
        ]],
        "plot": [
            bad_metrics(b'{"step": 1, "train_loss": 3.7, "val_loss": null}\n'),  # TypeError
            bad_metrics(b'{"step": 1e308, "train_loss": 3.7}\n'),  # matplotlib cannot lay out the axis
            bad_metrics(b'{"step": 1, "train_loss": 1e308}\n'),
            bad_metrics(b"\x80\n"),  # UnicodeDecodeError
        ],
        "export": [
            # KeyError: a config of 2 layers over 1-layer weights, exported unchecked.
            ("export", Part(["export", "-c"]) + bad_checkpoint(edited_checkpoint([(("model_config", "n_layer"), 2)]))
             + Part(["--out", "exported"], outputs=("exported",))),
        ],
    }


def regressions(test: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorate a test with the repros of its fixed bugs as explicit examples."""
    def decorate(func: Callable[..., None]) -> Callable[..., None]:
        for case in repros().get(test, []):
            func = example(case=case)(func)
        return func

    return decorate


# --- fixtures and tests ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The inputs every case may read and none may change: a char data dir, a tiny char
    checkpoint, a tiny gpt2-tokenizer checkpoint, a trained run dir, a text file, a tiny
    transformers GPT-2 directory and a safetensors export of the char checkpoint."""
    root = tmp_path_factory.mktemp("fuzz-shared")
    with pytest.MonkeyPatch.context() as env:
        for var in ("MICROGPT_DATA", "MICROGPT_OUT", "MICROGPT_DEVICE"):
            env.delenv(var, raising=False)  # a default path must mean the case's own workspace
        (root / "data").mkdir()
        for name, data in good_data_files().items():
            (root / "data" / name).write_bytes(data)
        (root / "model.pt").write_bytes(good_checkpoint_bytes())
        from microgpt_cli.data.tokenizer import named
        from microgpt_cli.io import checkpoint

        gpt2 = named("gpt2")
        checkpoint.save(root / "gpt2-model.pt", Checkpoint.of(tiny_model(gpt2.vocab_size, n_layer=1, n_embed=8), gpt2))
        (root / "text.txt").write_text(TINY_TEXT[:200], encoding="utf-8")
        for kind in ("hf", "export"):
            (root / kind).mkdir()
            for name, data in good_source_files(kind).items():
                (root / kind / name).write_bytes(data)
        result = run_main(["train", "--data", str(root / "data"), "--out", str(root / "run"), *TINY_TRAIN,
                           "--max-steps", "2", "--log-interval", "1"])
        assert result.code == 0 and not result.crash, result.err + result.crash
        yield root


@pytest.fixture(scope="module")
def workspaces(tmp_path_factory: pytest.TempPathFactory) -> Callable[[], Path]:
    root = tmp_path_factory.mktemp("fuzz-cases")
    return lambda: Path(tempfile.mkdtemp(dir=root))


def fuzz(name_and_case: tuple[str, Part], shared: Path, workspaces: Callable[[], Path]) -> None:
    workspace = workspaces()
    try:
        check_case(*name_and_case, shared, workspace)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)


@examples(100)
@given(case=prepare_cases())
@regressions("prepare")
def test_prepare(case: tuple[str, Part], shared: Path, workspaces: Callable[[], Path]) -> None:
    fuzz(case, shared, workspaces)


@examples(85)
@given(case=train_cases(fuzz_files=False))
@regressions("train_options")
def test_train_options(case: tuple[str, Part], shared: Path, workspaces: Callable[[], Path]) -> None:
    fuzz(case, shared, workspaces)


@examples(75)
@given(case=train_cases(fuzz_files=True))
@regressions("train_files")
def test_train_files(case: tuple[str, Part], shared: Path, workspaces: Callable[[], Path]) -> None:
    fuzz(case, shared, workspaces)


@examples(120)
@given(case=eval_cases())
@regressions("eval")
def test_eval(case: tuple[str, Part], shared: Path, workspaces: Callable[[], Path]) -> None:
    fuzz(case, shared, workspaces)


@examples(120)
@given(case=generate_cases())
@regressions("generate")
def test_generate(case: tuple[str, Part], shared: Path, workspaces: Callable[[], Path]) -> None:
    fuzz(case, shared, workspaces)


@examples(120)
@given(case=info_cases())
@regressions("info")
def test_info(case: tuple[str, Part], shared: Path, workspaces: Callable[[], Path]) -> None:
    fuzz(case, shared, workspaces)


@examples(50)
@given(case=plot_cases())
@regressions("plot")
def test_plot(case: tuple[str, Part], shared: Path, workspaces: Callable[[], Path]) -> None:
    fuzz(case, shared, workspaces)


@examples(100)
@given(case=export_cases())
@regressions("export")
def test_export(case: tuple[str, Part], shared: Path, workspaces: Callable[[], Path]) -> None:
    fuzz(case, shared, workspaces)


@examples(60)
@given(case=import_cases())
def test_import(case: tuple[str, Part], shared: Path, workspaces: Callable[[], Path]) -> None:
    fuzz(case, shared, workspaces)
