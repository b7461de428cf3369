"""How many CPU threads each engine call uses, chosen from the time the calls take.

A decode step is ~200 small ops, and torch's OpenMP threads meet at a barrier after each. On an
idle machine more threads read the weights faster; on a busy one, every barrier waits until the
other processes give each thread a time slice, and a step with 2 threads can take several times
as long as with 1. Which one wins depends on the load at the moment, so it is measured instead of
guessed: each kind of call (a step of n rows, a prefill per token) keeps a moving average of its
time per thread count, uses the fastest, and now and then tries the others again (the worse one
was, the more rarely), so that a change in load is noticed within a few dozen steps. Before a
kind of call has been measured (the first prompt of a process), it uses as many threads as there
are CPUs idle at that moment.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from microgpt_cli.config import available_cpus

T = TypeVar("T")
RETRY_EVERY = 24  # calls between tries of a thread count that was slower, times how much slower it was
SMOOTHING = 0.3  # weight of the newest time in the moving average


def idle_cpus() -> int | None:
    """CPUs that no other process is running on at this instant, from the kernel's count of
    runnable tasks less this process's own (its OpenMP threads spin for a while after each
    parallel region, and would read as load); None where that cannot be told."""
    try:
        running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        own = sum(_running(task) for task in Path("/proc/self/task").iterdir())
    except (OSError, ValueError, IndexError):
        return None
    return max(0, available_cpus() - max(0, running - own))


def _running(task: Path) -> bool:
    """Whether a thread of this process is runnable (state R); one that ended meanwhile is not."""
    try:
        return (task / "stat").read_text().rpartition(")")[2].split()[0] == "R"
    except (OSError, IndexError):
        return False


def thread_options(most: int) -> list[int]:
    """The thread counts worth comparing: `most` and the powers of two below it, down to 1."""
    options = [most]
    while options[-1] > 1:
        options.append(1 << ((options[-1] - 1).bit_length() - 1))
    return options


@dataclass
class _Timing:
    seconds: float  # moving average, per unit of work
    call: int  # the call it was last measured at


class ThreadChooser:
    """Runs calls with the thread count that has been fastest for their kind of work."""

    def __init__(self, most: int):
        self.most = most
        self.options = thread_options(most)
        self._timings: dict[Hashable, dict[int, _Timing]] = {}
        self._calls: dict[Hashable, int] = {}

    def choose(self, kind: Hashable) -> int:
        """The thread count to run the next call of `kind` with."""
        timings = self._timings.get(kind, {})
        call = self._calls.get(kind, 0)
        untried = [n for n in self.options if n not in timings]
        if untried:  # first as many threads as there are idle CPUs right now: a guess until measured
            idle = idle_cpus()
            guess = self.most if idle is None else min(max(idle, 1), self.most)
            return min(untried, key=lambda n: abs(n - guess))
        best = min(timings, key=lambda n: timings[n].seconds)
        for n, timing in timings.items():
            slower = timing.seconds / timings[best].seconds
            if n != best and call - timing.call >= RETRY_EVERY * slower:
                return n
        return best

    def run(self, kind: Hashable, work: Callable[[], T], units: int = 1) -> T:
        """`work()` with the chosen number of threads; its time, per unit, updates the choice. The
        caller's thread setting is restored afterwards."""
        if len(self.options) == 1:
            return work()
        threads = self.choose(kind)
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        began = time.perf_counter()
        try:
            return work()
        finally:
            seconds = (time.perf_counter() - began) / units
            torch.set_num_threads(previous)
            self.record(kind, threads, seconds)

    def record(self, kind: Hashable, threads: int, seconds: float) -> None:
        """A call of `kind` took `seconds` (per unit) with `threads` threads."""
        call = self._calls.get(kind, 0)
        self._calls[kind] = call + 1
        if call == 0:
            return  # a kind's first call pays one-time costs (oneDNN primitives, cache growth): not a measure
        timings = self._timings.setdefault(kind, {})
        old = timings.get(threads)
        # A count tried again after a while is measured afresh: its old average is of another load.
        if old is None or call - old.call > RETRY_EVERY:
            average = seconds
        else:
            average = (1 - SMOOTHING) * old.seconds + SMOOTHING * seconds
        timings[threads] = _Timing(average, call)
