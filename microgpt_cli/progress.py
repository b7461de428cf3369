"""Progress for long-running commands: a Rich live bar where a person watches a terminal, plain
timestamped log lines where a machine reads (CI, pipes, files). Everything goes to stderr so that
stdout stays clean for data. The library never imports this; the CLI feeds it from callbacks."""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

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
            columns: list[ProgressColumn | str] = [TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn()]
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
            where = f"{done:g}/{self.total:g} {self.unit}" if self.total else f"{done:g} {self.unit}"
        pct = f" {100 * done / self.total:.0f}%" if self.total else ""
        eta = ""
        if self.total and done > 0:
            eta = f" eta {format_seconds(elapsed * (self.total - done) / done)}"
        return f"[{format_seconds(elapsed)}] {self.description}:{pct} {where}{eta} {status}".rstrip()

    def log(self, message: str) -> None:
        """A line that stays above the bar (or a plain line), e.g. an evaluation result."""
        self.console.print(message, highlight=False, soft_wrap=True)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


class TrainDisplay:
    """Renders the training loop's events: a live bar with loss, val loss, best, lr, tok/s and ETA
    on a terminal; a log line per event otherwise."""

    def __init__(self, console: Console = stderr):
        self.console = console
        self.task: Task | None = None
        self.best = float("nan")
        self.val = float("nan")

    def __enter__(self) -> TrainDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.task is not None:
            self.task.__exit__(None, None, None)

    def event(self, kind: str, info: dict) -> None:
        if kind == "start":
            self._start(info)
        elif kind in ("log", "eval"):
            assert self.task is not None
            if kind == "eval":
                self.val, self.best = info["val_loss"], info["best_val"]
            status = (
                f"epoch {info['epoch']:.2f} loss {info['train_loss']:.4f} val {self.val:.4f} best {self.best:.4f} "
                f"lr {info['lr']:.2e} {info['tokens_per_sec']:,.0f} tok/s"
            )
            self.task.update(info["step"], status=status, total=info["total_steps"], force=kind == "eval")
            if kind == "eval" and self.task.live:
                mark = " (best, saved)" if info["improved"] else ""
                self.task.log(f"step {info['step']}: val loss {info['val_loss']:.4f}{mark}")

    def _start(self, info: dict) -> None:
        m = info["model_config"]
        begin = f"resuming at step {info['step']}" if info["resumed"] else "starting"
        self.console.print(
            f"{begin} · {info['params'] / 1e6:.2f}M params "
            f"({m['n_layer']}x{m['n_embed']}, {m['n_head']} heads, context {m['context']}) on {info['device']} · "
            f"{info['tokenizer']} ({info['vocab_size']:,} tokens) · {info['train_tokens']:,} train / "
            f"{info['val_tokens']:,} val tokens · {info['total_steps']:,} steps "
            f"({info['steps_per_epoch']:.1f} per epoch)",
            highlight=False, soft_wrap=True,
        )
        self.task = Task("train", info["total_steps"], unit="steps", console=self.console).__enter__()
        self.task.update(info["step"])

    def summary(self, summary: dict) -> None:
        from rich.table import Table

        table = Table(title="training summary", show_header=False)
        rows = [
            ("steps", f"{summary['steps']:,} / {summary['total_steps']:,}"),
            ("epochs", f"{summary['epochs']:.2f}"),
            ("final train loss", _num(summary["train_loss"])),
            ("final val loss", _num(summary["val_loss"])),
            ("best val loss", _num(summary["best_val_loss"])),
            ("time", format_seconds(summary["elapsed"])),
            ("tokens/s", f"{summary['tokens_per_sec']:,.0f}"),
            ("best checkpoint", summary["best"]),
            ("resume from", summary["last"]),
        ]
        for key, value in rows:
            table.add_row(key, value)
        self.console.print(table)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
