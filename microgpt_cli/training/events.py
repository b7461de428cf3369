"""What the training loop reports, as typed events: the loop emits them and never prints; the
CLI's display (progress.py) and any Python caller decide how to show them. Only the main
process emits events."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Union

from microgpt_cli.config import ModelConfig, TrainConfig

METRICS_FILE = "metrics.jsonl"  # a run dir's log: one JSON Metrics object per line


@dataclass(frozen=True)
class Metrics:
    """One line of metrics.jsonl: the state of the run at a log or evaluation step."""

    step: int
    epoch: float
    tokens: int  # tokens trained on so far
    # Mean over the steps since the previous line, and their throughput: None at the evaluation a
    # run from --init-from makes before its first step.
    train_loss: float | None
    lr: float
    tokens_per_sec: float | None
    elapsed: float  # seconds of the whole run so far, resumes included
    val_loss: float | None = None  # only at evaluations
    mfu: float | None = None  # model FLOPs utilization of the window (CUDA only): achieved / peak FLOP/s per GPU
    # At evaluations: the validation tokens val_loss was measured on, and those of the whole split
    # (fewer under a time budget or --eval-tokens; every evaluation of a run scores the same ones).
    val_tokens: int | None = None
    val_split_tokens: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def val_scope(scored: int | None, split: int | None) -> str:
    """What a val loss was measured on, where not the whole split: "on 12% of the val split:
    13,312 of 111,537 tokens"; "" for the whole split, or where the counts are not known."""
    if scored is None or split is None or scored >= split:
        return ""
    return f"on {100 * scored / max(split, 1):.0f}% of the val split: {scored:,} of {split:,} tokens"


@dataclass(frozen=True)
class RunStarted:
    """The settings in force (on resume, the saved run's with the `changes` applied) and the run's size."""

    model_config: ModelConfig
    train_config: TrainConfig
    device: str
    world_size: int
    params: int
    tokenizer: str
    vocab_size: int
    train_tokens: int
    val_tokens: int
    tokens_per_step: int
    steps_per_epoch: float
    total_steps: int  # what --epochs and --max-steps allow; a --time-budget may end the run sooner
    step: int  # where this call starts: 0, or the step resumed from
    resumed: bool = False
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # on resume: {setting: (old, new)}
    init_from: dict[str, Any] = field(default_factory=dict)  # {"path", "sha256"} of the start weights, if any
    peak_flops: float | None = None  # per device, what MFU divides by (CUDA only)
    peak_source: str = ""  # where peak_flops comes from
    warnings: tuple[str, ...] = ()  # settings the run adjusted, and why
    conversations: int = 0  # chat data: conversations in the training split (0: plain text)
    chat_rows: int = 0  # chat data: the rows of `context` tokens they are packed into
    dropped_exchanges: int = 0  # chat data: exchanges left out for being longer than the context


@dataclass(frozen=True)
class Planned:
    """The pre-flight estimate, once the first steps have been timed."""

    step: int
    seconds_per_step: float  # measured after the first step (compilation, caches) of this call
    steps: int  # steps this call plans to train: to --max-steps/--epochs, or what fits the time budget
    seconds: float  # the estimated time for them, evaluations and saves included
    device: str
    time_budget: float


@dataclass(frozen=True)
class StepDone:
    """After every optimizer step; cheap, with no loss (reading it would wait for the device)."""

    step: int
    elapsed: float
    expected_steps: int  # the best guess of where the run ends


@dataclass(frozen=True)
class Logged:
    """Every --log-interval steps."""

    metrics: Metrics
    expected_steps: int


@dataclass(frozen=True)
class EvalProgress:
    """During an evaluation: validation tokens scored so far, of `total`."""

    step: int
    done: int
    total: int


@dataclass(frozen=True)
class Evaluated:
    """Every --eval-interval steps and at the end, once the checkpoints are saved."""

    metrics: Metrics
    best_val: float
    improved: bool  # best.pt was written
    val_tokens: int  # tokens the validation loss was measured on
    expected_steps: int


@dataclass(frozen=True)
class RunEnded:
    """The summary of the run (also what `training.train` returns)."""

    steps: int
    total_steps: int
    epochs: float
    best_val_loss: float | None
    train_loss: float | None
    val_loss: float | None
    elapsed: float
    tokens_per_sec: float  # over `timed_steps` steps: the log windows after warm-up (see `warmup_excluded`)
    params: int
    best: str
    last: str
    reason: str  # "steps", "time budget" or "nothing to do"
    timed_steps: int = 0
    warmup_excluded: bool = True  # False: the run was too short to leave its first log window out
    mfu: float | None = None  # at tokens_per_sec (CUDA only)
    time_budget: float = 0.0  # the run's --time-budget (0: none)
    val_tokens: int | None = None  # what the val losses were measured on (see Metrics)
    val_split_tokens: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Event = Union[RunStarted, Planned, StepDone, Logged, EvalProgress, Evaluated, RunEnded]
