"""The training display: laid out for an 80-column terminal, moving with every step, plain lines
when not on a terminal. Fed with the real events the training loop emits."""

from __future__ import annotations

import io
import re
import time
from dataclasses import replace
from typing import Any

from rich.console import Console, Group

from microgpt_cli.config import ModelConfig, TrainConfig
from microgpt_cli.progress import Task, TrainDisplay
from microgpt_cli.training.events import (
    EvalProgress,
    Evaluated,
    Logged,
    Metrics,
    Planned,
    RunEnded,
    RunStarted,
    StepDone,
)

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
        display.event(ended(steps=46, time_budget=20.0, reason="time budget"))
    text = " ".join(console.export_text().split())
    assert "the 20 s time budget decides the length" in text and "254,670 steps (" not in text
    # The summary's step count: the --epochs cap (254,670) was never the plan under a budget.
    assert re.search(r"│ steps │ 46 │", text) and "254,670" not in text.split("training summary")[1], text


def ended(**fields: Any) -> RunEnded:
    summary = dict(steps=2, total_steps=100, epochs=0.03, best_val_loss=3.5, train_loss=4.1, val_loss=3.5, elapsed=6.0,
                   tokens_per_sec=2000.0, params=1, best="out/best.pt", last="out/last.pt", reason="steps")
    return RunEnded(**{**summary, **fields})


def test_on_a_terminal_long_lines_wrap_between_words_and_numbers_read_well() -> None:
    """Rich wraps the start line and the settings at word boundaries (a terminal would cut them
    mid-word); steps per epoch read 3,921, not 3,921.0; a partial val split is named at every val
    loss; warnings and the pre-flight estimate show, with a hint when a CPU run would take hours."""
    console = Console(width=80, file=io.StringIO(), force_terminal=True, color_system=None, record=True)
    run = started(max_steps=30)
    run = RunStarted(**{**run.__dict__, "steps_per_epoch": 3921.0, "device": "cpu",
                        "warnings": ("--warmup-steps 100 is longer than this run",)})
    with TrainDisplay(console) as display:
        display.event(run)
        display.event(Planned(6, 10.6, 95_154, 1_005_000.0, "cpu", 0.0))
        display.event(Evaluated(replace(metrics(250, 2.3417), val_tokens=13_312, val_split_tokens=111_537), 2.3417,
                                True, 13_312, 254_670))
        display.event(ended(val_loss=2.3417, best_val_loss=2.3417, val_tokens=13_312, val_split_tokens=111_537))
    raw = console.export_text()
    printed = [line for line in raw.splitlines() if "eta" not in line]  # the live bar's frames aside
    assert all(len(line) <= 80 for line in printed), printed  # a settings line of 700 characters once
    words = {word for line in printed for word in line.split()}
    assert {"context=512", "min_lr_ratio=0.1", "warmup_steps=100", "tokens)"} <= words  # wrapped between words
    text = " ".join(raw.split())
    assert "(3,921 per epoch)" in text and "3,921.0" not in text
    assert "warning: --warmup-steps 100 is longer than this run" in text
    assert "pre-flight: 44.90M parameters · 4,096 tokens per step · 10.6 s/step measured" in text
    assert "95,154 more steps take ~11.6 days with evaluations" in text
    assert "hint: this run would take 11.6 days on this CPU; `--preset cpu --time-budget 300`" in text
    scope = "on 12% of the val split: 13,312 of 111,537 tokens"
    assert f"step 250: val loss 2.3417 ({scope}) (best, saved)" in text
    for row in ("final val loss", "best val loss"):  # the summary says it too
        assert re.search(rf"{row} │ 2\.3417 \(on 12% of the val", text), text


def test_no_hint_for_a_short_run_or_under_a_time_budget() -> None:
    out = io.StringIO()
    display = TrainDisplay(Console(width=300, file=out, force_terminal=False), interval=0.0)
    display.event(started())
    display.event(Planned(6, 0.5, 1_000, 600.0, "cpu", 0.0))
    display.event(Planned(6, 10.6, 40, 60.0, "cpu", 60.0))
    display.event(Planned(6, 10.6, 95_154, 1_005_000.0, "cuda", 0.0))
    text = out.getvalue()
    assert "1,000 more steps take ~10 min" in text and "~40 more steps fit the 60 s time budget" in text
    assert "hint" not in text


def test_plain_lines_stamp_the_time_of_the_line_and_separate_thousands(monkeypatch: Any) -> None:
    """In a log, lines written while an evaluation runs carry their own time, not the last step's;
    and `microgpt eval`'s progress lines write 58,880/111,537, not 58880/111537."""
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    display = TrainDisplay(Console(width=300, file=out, force_terminal=False), interval=10.0)
    display.event(started())
    display.event(StepDone(250, 30.0, 254_670))
    for done in (10_000, 20_000):
        clock[0] += 12.0
        display.event(EvalProgress(250, done, 36_058))
    stamps = re.findall(r"^\[(\d\d:\d\d)\] train", out.getvalue(), re.M)
    assert stamps[-2:] == ["00:42", "00:54"], out.getvalue()

    out = io.StringIO()
    task = Task("eval", total=None, unit="tokens", console=Console(width=300, file=out, force_terminal=False))
    with task:
        clock[0] += 12.0
        task.update(58_880, total=111_537)
    assert "58,880/111,537 tokens" in out.getvalue() and "[00:12]" in out.getvalue(), out.getvalue()


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
