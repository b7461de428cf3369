"""The training display: laid out for an 80-column terminal, moving with every step, plain lines
when not on a terminal. Fed with the real events the training loop emits."""

from __future__ import annotations

import io
import re
from typing import Any

from rich.console import Console, Group

from microgpt_cli.config import ModelConfig, TrainConfig
from microgpt_cli.progress import TrainDisplay
from microgpt_cli.training.events import EvalProgress, Evaluated, Logged, Metrics, RunEnded, RunStarted, StepDone

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def started(**train: Any) -> RunStarted:
    return RunStarted(
        model_config=ModelConfig(vocab_size=50257), train_config=TrainConfig(**train), device="cpu", world_size=1,
        params=44_900_000, tokenizer="gpt2", vocab_size=50257, train_tokens=301_966, val_tokens=36_059,
        tokens_per_step=4096, steps_per_epoch=73.7, total_steps=254_670, step=0,
    )


def metrics(step: int, val: float | None = None) -> Metrics:
    # Wide numbers on purpose: a million tokens/s and a hundred epochs still fit 80 columns.
    return Metrics(step=step, epoch=100 + step / 73.7, tokens=step * 4096, train_loss=4.123456, lr=2.5e-3,
                   tokens_per_sec=1_234_567.0, elapsed=step * 2.5, val_loss=val)


def screen(display: TrainDisplay) -> list[str]:
    """What the live display shows now, rendered at 80 columns."""
    assert display._progress is not None
    console = Console(width=80, record=True, file=io.StringIO(), force_terminal=True, color_system=None)
    console.print(Group(*display._progress.get_renderables()))
    return console.export_text().rstrip("\n").splitlines()


def test_the_live_display_fits_80_columns_and_moves_with_every_step() -> None:
    console = Console(width=80, file=io.StringIO(), force_terminal=True, color_system=None)
    with TrainDisplay(console) as display:
        display.event(started())
        display.event(StepDone(1, 3.0, 254_670))
        display.event(StepDone(2, 5.5, 254_670))  # no log step yet: the bar still moves
        lines = screen(display)
        assert "2/254,670" in lines[0] and "2.50 s/step" in lines[0]
        display.event(Logged(metrics(10), 254_670))
        lines = screen(display)
        assert lines[1].startswith("loss 4.1235  val - (best -)"), lines
        display.event(EvalProgress(250, 18_000, 36_058))
        assert "evaluating: 50% of 36,058 val tokens" in screen(display)[1]
        display.event(Evaluated(metrics(250, 3.98774), 3.98774, True, 36_058, 254_670))
        lines = screen(display)
        assert "val 3.9877 (best 3.9877)" in lines[1], lines
        display.event(StepDone(254_669, 9_999.0, 254_670))
        lines = screen(display)
    for line in lines:
        assert len(line) <= 80 and "…" not in line, lines
    assert "254,669/254,670" in lines[0] and "1,234,567 tok/s" in lines[1] and "ep 103.39" in lines[1]


def test_under_a_time_budget_the_clock_drives_the_bar_and_the_start_line_says_so() -> None:
    console = Console(width=80, file=io.StringIO(), force_terminal=True, color_system=None, record=True)
    with TrainDisplay(console) as display:
        display.event(started(time_budget=20))
        display.event(StepDone(1, 5.0, 254_670))
        display.event(StepDone(3, 10.0, 6))
        lines = screen(display)
        assert "50%" in lines[0] and "step 3/~6" in lines[0]
    text = console.export_text()
    assert "the 20 s time budget decides the length" in text and "254,670 steps (" not in text


def test_plain_lines_when_not_on_a_terminal() -> None:
    out = io.StringIO()
    console = Console(width=200, file=out, force_terminal=False, color_system=None)
    display = TrainDisplay(console, interval=0.0)
    display.event(started())
    display.event(StepDone(1, 3.0, 100))
    display.event(StepDone(2, 5.0, 100))
    display.event(Logged(metrics(2), 100))
    display.event(Evaluated(metrics(2, 3.5), 3.5, True, 1000, 100))
    display.event(RunEnded(steps=2, total_steps=100, epochs=0.03, best_val_loss=3.5, train_loss=4.1, val_loss=3.5,
                           elapsed=6.0, tokens_per_sec=2000.0, params=1, best="out/best.pt", last="out/last.pt",
                           reason="steps"))
    text = ANSI.sub("", out.getvalue())
    assert "\x1b" not in out.getvalue()  # no cursor movement or colour in a log file
    lines = text.splitlines()
    assert any(line.startswith("[00:05] train: 2% 2/100 steps") and "2.00 s/step" in line for line in lines), text
    assert any("val 3.5000" in line for line in lines) and "training summary (ended by steps)" in text


def test_nothing_to_do_is_said_plainly() -> None:
    out = io.StringIO()
    display = TrainDisplay(Console(width=200, file=out, force_terminal=False))
    display.event(RunEnded(steps=20, total_steps=5, epochs=1.0, best_val_loss=None, train_loss=None, val_loss=None,
                           elapsed=1.0, tokens_per_sec=0.0, params=1, best="r[1]/best.pt", last="r[1]/last.pt",
                           reason="nothing to do"))
    assert "nothing to train: the run in r[1] is at step 20" in out.getvalue()
