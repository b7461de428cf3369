"""Running the real `microgpt` command in a subprocess, shared by the end-to-end test modules."""

from __future__ import annotations

import subprocess
import sys


def microgpt(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`python -m microgpt_cli ARGS`; with `check`, a non-zero exit fails the test with its stderr."""
    result = subprocess.run([sys.executable, "-m", "microgpt_cli", *args], capture_output=True, text=True, timeout=300)
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
