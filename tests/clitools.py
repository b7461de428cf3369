"""What the end-to-end tests share: the packaged corpus, the real `microgpt` command run in a
subprocess, local GPT-2 models, and the JSON junk the fuzz tests send."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import strategies as st

from microgpt_cli.data.dataprep import sample_path

SHAKESPEARE = sample_path("tinyshakespeare")  # the corpus every test uses: shipped in the package
GPT2_SHAPES = {
    # n_positions other than 1024, n_embd not a multiple of 64 (head size 10)
    "small": dict(n_positions=48, n_embd=40, n_layer=2, n_head=4),
    "wide": dict(n_positions=1024, n_embd=64, n_layer=1, n_head=2),
}


def hf_gpt2(directory: Path, seed: int = 0, **overrides: Any) -> Path:
    """A random transformers GPT2LMHeadModel (GPT2_SHAPES["small"] unless overridden) saved in
    `directory`: what `microgpt import` reads, built without the network."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=50257, **{**GPT2_SHAPES["small"], **overrides})
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # random, non-trivial norms and biases: a wrong mapping shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory)
    return directory


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


def json_junk() -> st.SearchStrategy[Any]:
    """Any JSON value: scalars (huge and odd numbers among them) in lists and objects a few levels deep."""
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from([0, -1, 2**16, 2**32, 2**64, 10**12]),
                        st.floats(), st.text(max_size=6))
    return st.recursive(
        scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3), max_leaves=6)
