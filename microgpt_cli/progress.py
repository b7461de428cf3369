"""Progress for long-running commands: a Rich live bar where a person watches a terminal, plain
timestamped log lines where a machine reads (CI, pipes, files). Everything goes to stderr so that
stdout stays clean for data. The library never imports this; the CLI feeds it from callbacks."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from rich.console import Console, RenderableType
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from microgpt_cli.config import CONFIG_FILE
from microgpt_cli.training.events import (
    EvalProgress,
    Evaluated,
    Event,
    Logged,
    Metrics,
    Planned,
    RunEnded,
    RunStarted,
    StepDone,
    val_scope,
)

if TYPE_CHECKING:
    from rich.table import Table

    from microgpt_cli.infer.evaluation import EvalResult

stderr = Console(stderr=True)


class Task:
    """One progress display; `update(done, status=...)` sets the absolute position and a status text."""

    def __init__(self, description: str, total: float | None, unit: str = "steps",
                 console: Console = stderr, interval: float = 10.0):
        self.description = description
        self.total = total
        self.unit = unit
        self.console = console
        self.interval = interval
        self.live = console.is_terminal
        self._last_line = 0.0
        self._start = time.monotonic()
        self._progress: Progress | None = None

    def __enter__(self) -> Task:
        if self.live:
            columns: list[ProgressColumn | str] = [
                TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn()]
            if self.unit == "bytes":
                columns += [DownloadColumn(), TransferSpeedColumn()]
            else:
                columns += [MofNCompleteColumn()]
            columns += [TimeElapsedColumn(), "eta", TimeRemainingColumn(), TextColumn("{task.fields[status]}")]
            self._progress = Progress(*columns, console=self.console, transient=False)
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=self.total, status="")
        return self

    def update(self, done: float, status: str = "", total: float | None = None, force: bool = False) -> None:
        if total is not None:
            self.total = total
        if self._progress is not None:
            self._progress.update(self._task, completed=done, total=self.total, status=status)
            return
        now = time.monotonic()
        if force or now - self._last_line >= self.interval:
            self._last_line = now
            self.console.print(self._plain_line(done, status, now - self._start), highlight=False, soft_wrap=True)

    def _plain_line(self, done: float, status: str, elapsed: float) -> str:
        if self.unit == "bytes":
            where = f"{done / 1e6:.1f}/{(self.total or 0) / 1e6:.1f} MB ({done / 1e6 / max(elapsed, 1e-9):.1f} MB/s)"
        else:
            where = f"{done:,.0f}/{self.total:,.0f} {self.unit}" if self.total else f"{done:,.0f} {self.unit}"
        pct = f" {100 * done / self.total:.0f}%" if self.total else ""
        eta = ""
        if self.total and done > 0:
            eta = f" eta {format_seconds(elapsed * (self.total - done) / done)}"
        return f"[{format_seconds(elapsed)}] {self.description}:{pct} {where}{eta} {status}".rstrip()

    def log(self, message: str) -> None:
        """A line that stays above the bar (or a plain line), e.g. an evaluation result."""
        self.console.print(message, highlight=False, soft_wrap=True)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


def _dash(value: float | None, fmt: str) -> str:
    """A number, or a dash where there is none yet (no evaluation so far)."""
    return "-" if value is None or not math.isfinite(value) else format(value, fmt)


def _per_step(seconds: float) -> str:
    return f"{seconds:.1f} s/step" if seconds >= 10 else f"{seconds:.2f} s/step"


def _count(value: float) -> str:
    """A count that may be fractional (steps per epoch): 653, or 653.4, never 653.0."""
    return f"{value:,.0f}" if abs(value - round(value)) < 0.05 else f"{value:,.1f}"


def _duration(seconds: float) -> str:
    """A long duration a person reads at a glance: 45 s, 12 min, 3.5 hours, 11.6 days."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 86400:,.1f} days"


LONG_CPU_RUN = 3600  # seconds: a CPU run planned longer than this gets a hint toward a shorter one


class _TwoLines(Progress):
    """A progress bar with a status line under it: the numbers of a training run do not fit on one
    80-column line beside a bar, and Rich would cut them to "…"."""

    status = ""

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        if self.status:
            yield Text(self.status, no_wrap=True, overflow="ellipsis")


class TrainDisplay:
    """Renders the training loop's events (events.py). On a terminal: a bar that moves with every
    step (or, under a time budget, with the clock), the time per step and the ETA, and under it
    the losses, LR and throughput; laid out for 80 columns. Elsewhere: a plain line every
    `interval` seconds and at every evaluation."""

    def __init__(self, console: Console = stderr, interval: float = 10.0):
        self.console = console
        self.interval = interval
        self.live = console.is_terminal
        self._progress: _TwoLines | None = None
        self._task: TaskID | None = None
        self._started: RunStarted | None = None
        self._first: tuple[int, float] | None = None  # (step, elapsed) at the first step event
        self._seconds_per_step = 0.0
        self._step, self._elapsed, self._expected = 0, 0.0, 0
        self._elapsed_at = time.monotonic()  # when _elapsed was reported: plain lines add the time since
        self._metrics: Metrics | None = None
        self._val: float | None = None
        self._best: float | None = None
        self._evaluating = ""
        self._last_line = -math.inf

    def __enter__(self) -> TrainDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def event(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self._start(event)
        elif isinstance(event, StepDone):
            self._step, self._elapsed, self._expected = event.step, event.elapsed, event.expected_steps
            self._elapsed_at = time.monotonic()
            if self._first is None:
                self._first = (event.step, event.elapsed)
            elif event.step > self._first[0]:
                self._seconds_per_step = (event.elapsed - self._first[1]) / (event.step - self._first[0])
            self._evaluating = ""
            self._refresh()
        elif isinstance(event, Logged):
            self._metrics, self._expected = event.metrics, event.expected_steps
            self._refresh()
        elif isinstance(event, EvalProgress):
            share = 100 * event.done / max(event.total, 1)
            self._evaluating = f"evaluating: {share:.0f}% of {event.total:,} val tokens"
            self._refresh()
        elif isinstance(event, Evaluated):
            m = event.metrics
            self._metrics, self._expected = m, event.expected_steps
            self._val, self._best, self._evaluating = m.val_loss, event.best_val, ""
            scope = val_scope(m.val_tokens, m.val_split_tokens)
            if self.live or scope:
                mark = " (best, saved)" if event.improved else ""
                scope = f" ({scope})" if scope else ""
                self.console.print(f"step {m.step:,}: val loss {_dash(self._val, '.4f')}{scope}{mark}",
                                   highlight=False, soft_wrap=not self.live)
            self._refresh(force=True)
        elif isinstance(event, Planned):
            self._preflight(event)
        elif isinstance(event, RunEnded):
            self._stop()
            self.summary(event)

    def _start(self, event: RunStarted) -> None:
        self._started = event
        m, cfg = event.model_config, event.train_config
        self._step, self._expected = event.step, event.total_steps
        begin = f"resuming at step {event.step:,}" if event.resumed else "starting"
        if event.init_from:
            begin += f" from {escape(event.init_from['path'])} (sha256 {event.init_from['sha256'][:12]})"
        if cfg.time_budget:
            length = (f"the {cfg.time_budget:g} s time budget decides the length (at most {event.total_steps:,} "
                      f"steps; an estimate follows once steps are timed)")
        else:
            length = f"{event.total_steps:,} steps ({_count(event.steps_per_epoch)} per epoch)"
        # On a terminal Rich wraps these between words; in a log each stays one line.
        wrap: dict[str, Any] = {"highlight": False, "soft_wrap": not self.live}
        self.console.print(
            f"{begin} · {event.params / 1e6:.2f}M params ({m.n_layer}x{m.n_embed}, {m.n_head} heads, context "
            f"{m.context}) on {event.device} · {escape(event.tokenizer)} ({event.vocab_size:,} tokens) · "
            f"{event.train_tokens:,} train / {event.val_tokens:,} val tokens · {length}", **wrap)
        if event.conversations:
            dropped = (f"; {event.dropped_exchanges:,} exchanges longer than the context are left out"
                       if event.dropped_exchanges else "")
            self.console.print(f"chat data: {event.conversations:,} conversations packed into {event.chat_rows:,} "
                               f"rows of {m.context} tokens; the loss is on the assistant's tokens only{dropped}",
                               **wrap)
        if event.peak_flops:
            self.console.print(f"MFU against {event.peak_flops / 1e12:,.0f} TFLOP/s per device "
                               f"({escape(event.peak_source)})", **wrap)
        if event.changes:
            changes = ", ".join(f"{name} {old} → {new}" for name, (old, new) in event.changes.items())
            self.console.print(f"changed on resume: {escape(changes)}", **wrap)
        for warning in event.warnings:
            self.console.print(f"[yellow]warning:[/] {escape(warning)}", **wrap)
        settings = " ".join(f"{k}={v}" for k, v in {**asdict(m), **asdict(cfg)}.items())
        saved_in = escape(str(Path(cfg.out) / CONFIG_FILE))
        self.console.print(f"[dim]settings (saved in {saved_in}): {escape(settings)}[/]", **wrap)
        if self.live:
            self._progress = _TwoLines(
                TextColumn("[bold]train"), BarColumn(bar_width=20), TaskProgressColumn(),
                TextColumn("{task.fields[where]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                TextColumn("{task.fields[pace]}"), console=self.console, transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("train", total=self._total(), where="", pace="")
            self._refresh()

    def _preflight(self, plan: Planned) -> None:
        started = self._started
        per_step = (f"{started.params / 1e6:.2f}M parameters · {started.tokens_per_step:,} tokens per step · "
                    if started else "")
        line = f"pre-flight: {per_step}{_per_step(plan.seconds_per_step)} measured · "
        if plan.time_budget:
            line += f"~{plan.steps:,} more steps fit the {plan.time_budget:g} s time budget"
        else:
            line += f"{plan.steps:,} more steps take ~{_duration(plan.seconds)} with evaluations"
        self.console.print(line, highlight=False, soft_wrap=not self.live)
        if plan.device == "cpu" and not plan.time_budget and plan.seconds > LONG_CPU_RUN:
            self.console.print(
                f"[yellow]hint:[/] this run would take {_duration(plan.seconds)} on this CPU; `--preset cpu "
                f"--time-budget 300` trains a CPU-sized model in 5 minutes, or cap this one with --time-budget "
                f"SECONDS (Ctrl-C stops it; `--resume` continues)", highlight=False, soft_wrap=not self.live)

    def _budget(self) -> float:
        return self._started.train_config.time_budget if self._started else 0.0

    def _total(self) -> float:
        return self._budget() or float(self._started.total_steps if self._started else 1)

    def _where(self) -> str:
        if self._budget():
            return f"step {self._step:,}/~{self._expected:,}" if self._seconds_per_step else f"step {self._step:,}"
        return f"{self._step:,}/{self._expected:,}"

    def _status(self) -> str:
        if self._evaluating:
            return self._evaluating
        m = self._metrics
        if m is None:
            return ""
        # At most 80 columns for any realistic run (a million tok/s, a hundred epochs).
        mfu = f"  MFU {100 * m.mfu:.0f}%" if m.mfu is not None else ""
        return (f"loss {_dash(m.train_loss, '.4f')}  val {_dash(self._val, '.4f')} (best {_dash(self._best, '.4f')})  "
                f"lr {m.lr:.1e}  {_dash(m.tokens_per_sec, ',.0f')} tok/s{mfu}  ep {m.epoch:.2f}")

    def _refresh(self, force: bool = False) -> None:
        pace = _per_step(self._seconds_per_step) if self._seconds_per_step else ""
        if self._progress is not None and self._task is not None:
            done = min(self._elapsed, self._budget()) if self._budget() else self._step
            self._progress.status = self._status()
            self._progress.update(self._task, completed=done, total=self._total(), where=self._where(), pace=pace)
            return
        now = time.monotonic()
        if self.live or not self._started or not (force or now - self._last_line >= self.interval):
            return
        self._last_line = now
        done, total = (self._elapsed, self._budget()) if self._budget() else (self._step, self._expected)
        eta = ""
        elapsed = self._elapsed + now - self._elapsed_at  # an evaluation reports no time of its own
        if self._seconds_per_step and not self._budget():
            eta = f" eta {format_seconds(self._seconds_per_step * max(0, self._expected - self._step))}"
        elif self._budget():
            eta = f" eta {format_seconds(max(0.0, self._budget() - elapsed))}"
        status = self._status()
        where = self._where() if self._budget() else f"{self._where()} steps"
        self.console.print(
            f"[{format_seconds(elapsed)}] train: {100 * done / max(total, 1e-9):.0f}% {where}"
            f"{eta}{' ' + pace if pace else ''}{'  ' + status if status else ''}", highlight=False, soft_wrap=True)

    def summary(self, summary: RunEnded) -> None:
        from rich.table import Table

        if summary.reason == "nothing to do":
            self.console.print(
                f"nothing to train: the run in {escape(str(Path(summary.last).parent))} is at step {summary.steps:,}, "
                f"which its stopping point ({summary.total_steps:,} steps) allows no further; "
                f"raise --max-steps or --epochs to train on", highlight=False, soft_wrap=True)
            return
        warmup = "after warm-up" if summary.warmup_excluded else "warm-up included"
        speed = f"{summary.tokens_per_sec:,.0f}"
        if summary.mfu is not None:
            speed += f" (MFU {100 * summary.mfu:.1f}%)"
        table = Table(title=f"training summary (ended by {summary.reason})", show_header=False)
        table.add_column(no_wrap=True)
        table.add_column(overflow="fold")  # long paths wrap whole rather than end in "…"
        # Under a time budget total_steps is only the --epochs cap, which the budget never meant to reach.
        steps = f"{summary.steps:,}" if summary.time_budget else f"{summary.steps:,} / {summary.total_steps:,}"
        scope = val_scope(summary.val_tokens, summary.val_split_tokens)
        scope = f" ({scope})" if scope else ""
        rows = [
            ("steps", steps),
            ("epochs", f"{summary.epochs:.2f}"),
            ("final train loss", _dash(summary.train_loss, ".4f")),
            ("final val loss", _dash(summary.val_loss, ".4f") + scope),
            ("best val loss", _dash(summary.best_val_loss, ".4f") + scope),
            ("time", format_seconds(summary.elapsed)),
            (f"tokens/s ({summary.timed_steps:,} steps, {warmup})", speed),
            ("best checkpoint", summary.best),
            ("resume from", summary.last),
        ]
        for key, value in rows:
            table.add_row(key, escape(value))
        self.console.print(table)


def eval_table(result: EvalResult, title: str) -> Table:
    """`microgpt eval`'s result as a table: one row per metric."""
    from rich.table import Table

    table = Table(title=escape(title))
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("loss (nats/token)", f"{result.loss:.4f}")
    table.add_row("perplexity", f"{result.perplexity:.3f}")
    table.add_row("bits per byte", f"{result.bits_per_byte:.4f}")
    table.add_row("tokens", f"{result.tokens:,}")
    table.add_row("seconds", f"{result.seconds:.2f}")
    if result.skipped is not None:
        table.add_row("characters skipped", f"{result.skipped:,}")
    if result.quantize is not None:
        table.add_row("weights", result.quantize)
    return table


def tasks_table(results: dict[str, Any], title: str) -> Table:
    """lm-evaluation-harness's results as a table: one row per task and metric, with its stderr."""
    from rich.table import Table

    table = Table(title=escape(title))
    for column, justify in (("task", "left"), ("metric", "left"), ("value", "right"), ("stderr", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for task, metrics in results["results"].items():
        name = str(metrics.get("alias", task))
        for key, value in metrics.items():
            metric, _, kind = key.partition(",")  # "acc,none": the metric and the filter it ran after
            if not kind or metric.endswith("_stderr"):
                continue
            stderr = metrics.get(f"{metric}_stderr,{kind}")
            shown = metric if kind == "none" else f"{metric} ({kind})"
            table.add_row(escape(name), escape(shown), _number(value), _number(stderr))
            name = ""
    return table


def _number(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-" if value in (None, "N/A") else escape(str(value))
    return f"{value:,.4f}" if math.isfinite(value) else str(value)
