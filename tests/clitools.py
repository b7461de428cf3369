"""What the end-to-end tests share: the packaged corpus, and the real `microgpt` command run in a
subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from microgpt_cli.dataprep import sample_path

SHAKESPEARE = sample_path("tinyshakespeare")  # the corpus every test uses: shipped in the package


def microgpt(*args: object, cwd: Path | None = None, env: dict[str, str] | None = None,
             stdin: str | None = None, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`python -m microgpt_cli ARGS` (UTF-8 text in and out); with `check`, a non-zero exit fails the
    test with its stderr. `env` adds to this process's environment."""
    result = subprocess.run([sys.executable, "-m", "microgpt_cli", *map(str, args)], cwd=cwd, input=stdin,
                            capture_output=True, text=True, encoding="utf-8", timeout=timeout,
                            env={**os.environ, **(env or {})})
    if check:
        assert result.returncode == 0, result.stderr
    return result


def assert_clean_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """A user mistake: non-zero exit, no traceback, one `error:` line last on stderr, naming `fragments`."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """`microgpt ARGS` through the same entry point, in this process (no torch import per run):
    exit code, stdout, stderr."""
    from microgpt_cli.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out, captured.err


def assert_one_error_line(code: int, err: str, *fragments: str) -> str:
    """A clean failure: non-zero exit, no traceback, exactly one non-empty stderr line, an
    `error:` or `stopped:` line naming `fragments`; returns it."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith(("error:", "stopped:")), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
