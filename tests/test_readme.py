"""Every command and code example in README.md, run for real so the docs cannot rot.

What runs, and how:
- Every fenced ```bash / ```python block. A bash block is split into commands (one per line, `\\`
  continuations joined, `# comments` dropped, `a && b` chains split), each run with `bash -c` in a temp
  workspace; a python block runs as a script there. `python -c ...` lines are bash commands like any other.
  Blocks without a language (the diagram) are text; any other language fails `test_blocks_are_all_handled`.
- Commands run the venv's own `microgpt`, `python` and `torchrun` (this interpreter's bin dir first on PATH),
  with HOME in a temp dir (`microgpt --install-completion` writes rc files there, never in the real HOME)
  no MICROGPT_* variables from the caller's environment, and one torch thread each (OMP_NUM_THREADS=1).
  Exit status 0 is required of every command.
- REWRITES (below) is the complete list of changes made to commands before they run: the virtualenv step
  and the `pip install` prefix go (the project is installed; CI runs the README's install + test command
  itself, see `test_ci_runs_the_readmes_test_command`) and training shrinks to a seconds-long tiny model.
- Grouping: the blocks of a SEQUENTIAL_SECTIONS section (the Tutorial) run in order in one shared
  workspace, as a reader would type them. Every other block runs alone in a fresh workspace holding the
  files examples name (input.txt, book.txt, notes/, start.txt, other.txt: slices of the packaged
  tinyshakespeare; chats.jsonl: conversations in their characters) plus, unless the block makes them
  itself, a char-tokenized `data/` and a tiny trained `out/` (both built once by the real CLI). Groups
  run concurrently, one per CPU core (up to WORKERS).
- A marker on the line just before a fence changes what happens to that block:
  `<!-- readme-test: parse-only (REASON) -->`: each command runs with `--help` appended, which checks its
  option names without running it (`torchrun` options go through torchrun's own argument parser, the
  microgpt part through `python -m microgpt_cli ... --help`); python code is only compiled.
  `<!-- readme-test: skip (REASON) -->`: not run at all; allowed only for the README's test command.
  `<!-- readme-test: expect-error (REASON) -->`: a documented error example; each command must fail cleanly.
- Inline commands in the prose (`microgpt ...`, `python benchmarks/...` spans not already in a block) are
  checked too: `microgpt --install-completion` / `--show-completion` run for real, the rest with `--help`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from clitools import SHAKESPEARE

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"
REFERENCE_START = "<!-- reference:start -->"  # tables generated from the CLI, checked by test_ecosystem.py

TINY_TRAIN_FLAGS = ("--n-layer 1 --n-embed 32 --n-head 2 --context 32 --batch-size 8 --eval-tokens 2000 "
                    "--max-steps 10 --eval-interval 5")

# The only changes made to README commands before they run (regex -> replacement, applied in order to each
# command of a chain). Keep this short: everything else runs exactly as written.
REWRITES: dict[str, str] = {
    # The project is already installed in this interpreter's environment; .ci/run installs it for real.
    r"^pip install\b.*$": "",
    r"^python3? -m venv \S+$": "",
    r"^source \S+/bin/activate$": "",
    # Every training run (microgpt train, or `-m microgpt_cli train` under torchrun) becomes a 1-layer,
    # 32-wide model that stops after 10 steps with 2 evaluations (so loss plots have a curve). Appended, so
    # these flags win over the README's own (the later flag wins) and over --preset, --config files,
    # --epochs and --time-budget alike.
    r"(\bmicrogpt(?:_cli)? train\b.*)$": rf"\1 {TINY_TRAIN_FLAGS}",
}

# H2 sections whose blocks build on each other (prepare -> train -> ... -> export): one shared workspace.
SEQUENTIAL_SECTIONS = ("Tutorial",)
MARKER = re.compile(r"<!--\s*readme-test:\s*(?P<kind>[\w-]+)\s*(?P<reason>.*?)\s*-->")
MARKER_KINDS = ("parse-only", "skip", "expect-error")
SHELL_LANGUAGES, TEXT_LANGUAGES = ("bash", "sh", "shell"), ("", "text")
COMMAND_TIMEOUT = 300  # seconds; a hung command (say a torchrun rendezvous) fails instead of stalling CI
WORKERS = max(1, min(4, os.cpu_count() or 1))  # blocks run concurrently: one-thread processes, one per core
CORPUS_CHARS = 150_000  # of tinyshakespeare: prepare with any tokenizer (bpe training included) stays quick


# --- reading the README ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    line: int  # README line where the command starts
    text: str  # as written (comment dropped, continuations joined)


@dataclass(frozen=True)
class Block:
    line: int  # README line of the opening fence
    section: str  # the H2 heading above it (what SEQUENTIAL_SECTIONS matches)
    heading: str  # the nearest heading above it (for messages)
    language: str
    code: str  # with the fence's indentation removed
    marker: str  # "" (run), or one of MARKER_KINDS
    reason: str

    @property
    def where(self) -> str:
        return f"README.md block at line {self.line} (under {self.heading!r})"

    def commands(self) -> list[Command]:
        return shell_commands(self.code, self.line + 1) if self.language in SHELL_LANGUAGES else []


def read_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, with their section and readme-test marker."""
    blocks: list[Block] = []
    lines = text.splitlines()
    section = heading = ""
    index = 0
    while index < len(lines):
        line = lines[index]
        if re.match(r"#{2,6} ", line):
            heading = line.lstrip("#").strip()
            section = heading if line.startswith("## ") else section
        fence = re.match(r"^(\s*)```\s*(\w*)\s*$", line)
        if not fence:
            index += 1
            continue
        indent, language = fence.groups()
        end = next(i for i in range(index + 1, len(lines)) if lines[i].strip() == "```")
        code = "\n".join(body[len(indent):] for body in lines[index + 1:end]) + "\n"
        marker = MARKER.fullmatch(lines[index - 1].strip()) if index else None
        kind, reason = (marker["kind"], marker["reason"].strip("() ")) if marker else ("", "")
        blocks.append(Block(index + 1, section, heading, language, code, kind, reason))
        index = end + 1
    return blocks


def _unquoted(line: str) -> Iterator[int]:
    """Indexes of the characters of a shell line outside quotes and not backslash-escaped."""
    quote, escaped = "", False
    for i, char in enumerate(line):
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        else:
            yield i


def _strip_comment(line: str) -> str:
    for i in _unquoted(line):
        if line[i] == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _split_chain(line: str) -> list[str]:
    """`a && b` -> [a, b], quote-aware: each command of a chain is rewritten and reported on its own."""
    cuts = [i for i in _unquoted(line) if line.startswith("&&", i)]
    starts, ends = [0, *(i + 2 for i in cuts)], [*cuts, len(line)]
    return [line[start:end].strip() for start, end in zip(starts, ends, strict=True)]


def shell_commands(code: str, first_line: int) -> list[Command]:
    commands: list[Command] = []
    pending, pending_line = "", first_line
    for number, raw in enumerate(code.splitlines(), first_line):
        if not pending:
            pending_line = number
        line = _strip_comment(raw).strip()
        if line.endswith("\\"):  # continuation: joins the next line, one space between
            pending += line[:-1].strip() + " "
            continue
        full, pending = (pending + line).strip(), ""
        if full:
            commands += [Command(pending_line, part) for part in _split_chain(full)]
    return commands


def rewrite(command: str) -> str:
    for pattern, replacement in REWRITES.items():
        command = re.sub(pattern, replacement, command)
    return command.strip()


def inline_commands(text: str, blocks: list[Block]) -> list[Command]:
    """Commands in `code spans` of the prose (not tables, fences or the generated Reference section) that no
    block already holds, without placeholders such as COMMAND, FILE or `...`; each once."""
    text = text.split(REFERENCE_START)[0]
    seen = {command.text for block in blocks for command in block.commands()}
    fence_lines = {n for block in blocks for n in range(block.line, block.line + block.code.count("\n") + 2)}
    found: list[Command] = []
    for number, line in enumerate(text.splitlines(), 1):
        if number in fence_lines or line.lstrip().startswith(("|", "<!--")):
            continue
        for span in re.findall(r"`([^`\n]+)`", line):
            runnable = re.match(r"microgpt( |$)|python benchmarks/\S+( |$)", span)
            placeholder = "..." in span or re.search(r"\b[A-Z]{3,}\b", span)
            if runnable and not placeholder and span not in seen:
                found.append(Command(number, span))
                seen.add(span)
    return found


README_TEXT = README.read_text(encoding="utf-8")
BLOCKS = read_blocks(README_TEXT)
CODE_BLOCKS = [block for block in BLOCKS if block.language not in TEXT_LANGUAGES]


def readme_test_command() -> str:
    """The command of the block that follows "Run the tests": what CI must run."""
    prose_line = next(n for n, line in enumerate(README_TEXT.splitlines(), 1) if "Run the tests" in line)
    block = next(block for block in CODE_BLOCKS if block.line > prose_line)
    return " && ".join(command.text for command in block.commands())


def groups() -> list[list[Block]]:
    """Blocks of a SEQUENTIAL_SECTIONS section together, in README order; every other block alone."""
    result: list[list[Block]] = []
    for block in CODE_BLOCKS:
        sequential = block.section.startswith(SEQUENTIAL_SECTIONS)
        if sequential and result and result[-1][0].section == block.section:
            result[-1].append(block)
        else:
            result.append([block])
    return result


GROUPS = groups()


def group_id(group: list[Block]) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", group[0].heading.lower()).strip("-")[:24].strip("-")
    return f"L{group[0].line}-{slug}"


# --- workspaces -----------------------------------------------------------------------------------------


def write_text_files(workspace: Path) -> None:
    """The files README examples name, cut from tinyshakespeare at line starts (so a char vocabulary of
    input.txt covers every one of them), and chats.jsonl (conversations in its characters);
    `benchmarks` points at the repo's scripts."""
    text = SHAKESPEARE.read_text(encoding="utf-8")
    corpus = text[: text.rindex("\n", 0, CORPUS_CHARS) + 1]
    half = corpus.index("\n", len(corpus) // 2) + 1
    (workspace / "notes").mkdir(parents=True, exist_ok=True)
    other = corpus.index("\n", half + 10_000) + 1
    words = sorted(set(re.findall(r"\b[a-z]{3,8}\b", corpus)))[:400]  # conversations in input.txt's characters
    chats = "".join(json.dumps({"messages": [{"role": "user", "content": f"reverse {w}"},
                                              {"role": "assistant", "content": w[::-1]}]}) + "\n" for w in words)
    files = {"input.txt": corpus, "book.txt": corpus[:half], "notes/act-two.txt": corpus[half:],
             "start.txt": corpus[: corpus.index("\n\n") + 2], "other.txt": corpus[other:], "chats.jsonl": chats}
    for name, content in files.items():
        (workspace / name).write_text(content, encoding="utf-8")
    (workspace / "benchmarks").symlink_to(ROOT / "benchmarks", target_is_directory=True)


def command_env(home: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MICROGPT_")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["HOME"] = str(home)
    # One torch thread per process: the tiny models gain nothing from more, and on a busy 2-core machine
    # OpenMP's waiting threads made a 1000-token sample take 11 s instead of 0.3 s. (torchrun sets it too.)
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_shell(command: str, workspace: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    if command.startswith("torchrun ") and shutil.which("torchrun", path=env["PATH"]) is None:
        command = "python -m torch.distributed.run " + command[len("torchrun "):]
    return subprocess.run(["bash", "-c", command], cwd=workspace, env=env, capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=COMMAND_TIMEOUT)


def failure(block: Block, command: Command, ran: str, result: subprocess.CompletedProcess[str]) -> str:
    return (f"{block.where}, command at README.md:{command.line} exited {result.returncode}\n"
            f"  as written: {command.text}\n  as run:     {ran}\n"
            f"--- stderr (end) ---\n{result.stderr[-4000:]}\n--- stdout (end) ---\n{result.stdout[-1500:]}")


def build_trained(workspace: Path, env: dict[str, str]) -> Path:
    """A workspace with `data/` (input.txt, char tokenizer) and a tiny `out/`, made by the real CLI."""
    write_text_files(workspace)
    for command in ("microgpt prepare input.txt --tokenizer char", f"microgpt train {TINY_TRAIN_FLAGS}"):
        result = run_shell(command, workspace, env)
        assert result.returncode == 0, f"building the shared workspace: {command}\n{result.stderr}"
    return workspace


def makes(group: list[Block], pattern: str) -> bool:
    code = "\n".join(rewrite(c.text) for block in group for c in block.commands()) + "\n"
    code += "\n".join(block.code for block in group if block.language == "python")
    return re.search(pattern, code) is not None


def workspace_for(group: list[Block], root: Path, trained: Future[Path]) -> Path:
    """Text files, plus the shared data/ and out/ unless the group's own commands create them."""
    write_text_files(root)
    needs = {"data": not makes(group, r"\bmicrogpt(_cli)? prepare\b|\bprepare\("),
             "out": not makes(group, r"\bmicrogpt(_cli)? train\b|\btrain\(")}
    for name in (name for name, needed in needs.items() if needed):
        shutil.copytree(trained.result() / name, root / name)
    return root


# --- running blocks -------------------------------------------------------------------------------------


def run_block(block: Block, workspace: Path, env: dict[str, str]) -> None:
    if block.language == "python":
        script = workspace / f"readme_block_L{block.line}.py"
        # As written (REWRITES are for shell commands), moved down so traceback line numbers are README's.
        script.write_text("\n" * block.line + block.code, encoding="utf-8")
        result = subprocess.run([sys.executable, str(script)], cwd=workspace, env=env, capture_output=True,
                                text=True, encoding="utf-8", errors="replace", timeout=COMMAND_TIMEOUT)
        assert result.returncode == 0, failure(block, Command(block.line + 1, script.name), script.name, result)
        return
    for command in block.commands():
        ran = rewrite(command.text)
        if not ran:
            continue
        result = run_shell(ran, workspace, env)
        if block.marker == "expect-error":
            assert result.returncode != 0 and "Traceback" not in result.stderr, failure(block, command, ran, result)
        else:
            assert result.returncode == 0, failure(block, command, ran, result)


def torchrun_parts(command: str) -> tuple[list[str], list[str]] | None:
    """(torchrun's own args, the args after `-m microgpt_cli`) of a torchrun command, else None."""
    words = shlex.split(command)
    launcher = 1 if words[:1] == ["torchrun"] else 3 if words[:3] == ["python", "-m", "torch.distributed.run"] else 0
    if not launcher or "microgpt_cli" not in words:
        return None
    module = words.index("microgpt_cli") - 1
    assert words[module] in ("-m", "--module"), command
    return words[launcher:module], words[module + 2:]


def _raise(message: str) -> NoReturn:
    raise ValueError(message)


def torchrun_parse_error(args: list[str]) -> str:
    """What torchrun's own argument parser says of `args` ("" if it accepts them), without launching."""
    from torch.distributed.run import get_args_parser  # imported here: only parse-only torchrun lines need it

    parser = get_args_parser()
    parser.error = _raise  # type: ignore[method-assign]  # raise instead of printing and exiting
    try:
        parser.parse_args(args)
    except ValueError as error:
        return str(error)
    return ""


def parse_check(block: Block, workspace: Path, env: dict[str, str]) -> None:
    """Check each command's option names without running it (see the module docstring)."""
    if block.language == "python":
        compile(block.code, f"README.md:{block.line + 1}", "exec")
        return
    for command in block.commands():
        ran = rewrite(command.text)
        if not ran:
            continue
        parts = torchrun_parts(ran)
        if parts:
            launcher_args, microgpt_args = parts
            error = torchrun_parse_error([*launcher_args, "-m", "microgpt_cli", *microgpt_args])
            assert not error, f"{block.where}: torchrun rejects README.md:{command.line}: {error}"
            ran = shlex.join(["python", "-m", "microgpt_cli", *microgpt_args])
        ran += " --help"
        result = run_shell(ran, workspace, env)
        assert result.returncode == 0, failure(block, command, ran, result)


def run_group(group: list[Block], root: Path, env: dict[str, str], trained: Future[Path]) -> None:
    workspace = workspace_for(group, root, trained)
    for block in group:
        if block.marker == "parse-only":
            parse_check(block, workspace, env)
        elif block.marker != "skip":
            run_block(block, workspace, env)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One temp HOME for the module: shell rc files and tool caches (matplotlib's fonts) land there once."""
    return command_env(tmp_path_factory.mktemp("home"))


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
             env: dict[str, str]) -> Iterator[dict[str, Future[None]]]:
    """The selected groups, started at once on WORKERS threads (each command is a one-thread process, so
    two cores run two at a time), longest first; each test waits for its own group's outcome."""
    selected = {item.name.removeprefix("test_readme_block[").removesuffix("]") for item in request.session.items
                if item.name.startswith("test_readme_block[")}
    chosen = [group for group in GROUPS if group_id(group) in selected and not skipped(group)]
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        trained = pool.submit(build_trained, tmp_path_factory.mktemp("trained"), env)
        futures = {group_id(group): pool.submit(run_group, group, tmp_path_factory.mktemp(group_id(group)), env,
                                                trained)
                   for group in sorted(chosen, key=lambda group: -sum(len(b.commands()) for b in group))}
        yield futures
        for future in futures.values():
            future.cancel()


def skipped(group: list[Block]) -> bool:
    return all(block.marker == "skip" for block in group)


@pytest.mark.parametrize("group", GROUPS, ids=group_id)
def test_readme_block(group: list[Block], outcomes: dict[str, Future[None]]) -> None:
    if skipped(group):
        pytest.skip(f"{group[0].where}: {group[0].reason}")
    outcomes[group_id(group)].result()  # the group's AssertionError, naming the block and command, if any


def test_inline_commands(tmp_path: Path, env: dict[str, str]) -> None:
    """Commands quoted in the prose: the shell-completion ones for real (HOME is a temp dir), the rest
    with --help (the option names they use exist)."""
    home = Path(env["HOME"])
    write_text_files(tmp_path)
    commands = inline_commands(README_TEXT, BLOCKS)
    for command in commands:
        real = re.fullmatch(r"microgpt --(install|show)-completion", command.text) is not None
        ran = command.text if real else f"{command.text} --help"
        result = run_shell(ran, tmp_path, env)
        assert result.returncode == 0, (f"README.md:{command.line}: `{command.text}` exited {result.returncode}"
                                        f" (ran: {ran})\n{result.stderr[-3000:]}")
    if any(command.text == "microgpt --install-completion" for command in commands):
        assert any(home.rglob("*microgpt*")), "install-completion wrote no completion script under the temp HOME"


# --- the README's own structure -------------------------------------------------------------------------


def test_ci_runs_the_readmes_test_command() -> None:
    ci_lines = [line.strip() for line in CI_RUN.read_text(encoding="utf-8").splitlines()]
    command = readme_test_command()
    assert command in ci_lines, f".ci/run does not run the README's test command {command!r}"


def test_markers_are_known_placed_and_give_reasons() -> None:
    lines = README_TEXT.splitlines()
    for number, line in enumerate(lines, 1):
        marker = MARKER.search(line)
        if not marker:
            continue
        assert marker["kind"] in MARKER_KINDS, f"README.md:{number}: unknown readme-test marker {marker['kind']!r}"
        assert marker["reason"].strip("() "), f"README.md:{number}: a readme-test marker must say why"
        fence = lines[number].strip() if number < len(lines) else ""
        assert fence.startswith("```"), f"README.md:{number}: a readme-test marker must be just before a fence"


def test_only_the_test_command_is_skipped() -> None:
    """Skipping is for what truly cannot run: only the README's test command (CI runs it via .ci/run)."""
    skips = [block for block in CODE_BLOCKS if block.marker == "skip"]
    assert len(skips) <= 1, [block.where for block in skips]
    for block in skips:
        commands = " && ".join(command.text for command in block.commands())
        assert commands == readme_test_command(), f"{block.where} is skipped but is not the test command"


def test_blocks_are_all_handled() -> None:
    handled = (*SHELL_LANGUAGES, "python", *TEXT_LANGUAGES)
    for block in BLOCKS:
        assert block.language in handled, f"{block.where}: no way to run a {block.language!r} block; add one"
    runnable = [block for block in CODE_BLOCKS if block.marker != "skip"]
    assert len(runnable) >= 10 and all(block.code.strip() for block in runnable)
