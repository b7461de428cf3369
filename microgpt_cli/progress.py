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
