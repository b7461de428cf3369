"""The training loop. It reports typed events (events.py) through `on_event` and never prints:
the CLI decides how a person or a log file sees them.

Under `torchrun` every process runs this same code: each takes its slice of every batch, DDP
averages the gradients, evaluation is split across processes and summed, and only the main
process writes files or emits events. Decisions that depend on time or signals are taken at
log steps, from values summed across processes, so that every process takes the same one."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from microgpt_cli.config import CONFIG_FILE, ModelConfig, TrainConfig, init_settings, resume_settings, save_config
from microgpt_cli.data.dataset import (
    Batches,
    ChatBatches,
    ChatRows,
    check_same_tokenizer,
    data_fingerprint,
    data_tokenizer,
    has_mask,
    open_mask,
    open_split,
    read_meta,
)
from microgpt_cli.data.tokenizer import Tokenizer, extends
from microgpt_cli.device import (
    allocation_errors,
    autocast,
    ensure_fits,
    model_flops_utilization,
    peak_flops,
    release_freed_memory,
    resolve_device,
)
from microgpt_cli.errors import Interrupted, MicroGPTError
from microgpt_cli.infer.evaluation import rows_loss, split_loss
from microgpt_cli.io import checkpoint
from microgpt_cli.io.checkpoint import RUN_FILES, Checkpoint, TrainingState
from microgpt_cli.io.files import append_text, atomic_write, dir_lock, file_sha256, remove_stale_temp_files
from microgpt_cli.model.gpt import GPT, count_params
from microgpt_cli.plot import LOSS_PLOT, save_loss_plot
from microgpt_cli.training import distributed
from microgpt_cli.training.events import (
    METRICS_FILE,
    EvalProgress,
    Evaluated,
    Event,
    Logged,
    Metrics,
    Planned,
    RunEnded,
    RunStarted,
    StepDone,
)
from microgpt_cli.training.optim import build_optimizers, lr_factor

EventFn = Callable[[Event], None]
EVAL_SHARE = 0.1  # under --time-budget, one evaluation may take at most this share of the budget
FORWARD_SHARE = 1 / 3  # a forward pass's share of a training step, to predict an evaluation's time
SAVE_BYTES_PER_SEC = 300e6  # a conservative disk speed, to predict a save before one is timed
MAX_STEPS = 10**15  # a step count no run reaches; caps --epochs 1e300
PREFLIGHT_STEPS, PREFLIGHT_SECONDS = 5, 5.0  # the pre-flight estimate times this many steps, or seconds
BYTES_PER_TRAINED_PARAM = 16  # fp32 weights, gradients and AdamW's two moments (activations come on top)
_DISCARD = ".discard"  # where a new run moves the previous one's files before deleting them


def _ignore(event: Event) -> None:
    pass


@contextmanager
def stop_requests() -> Iterator[list[int]]:
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step, so that it can finish the
    step and save a resumable checkpoint instead of dying mid-write."""
    received: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass
class Run:
    """Everything the loop needs, built and checked before the first step."""

    cfg: TrainConfig
    model_config: ModelConfig
    out: Path
    world: distributed.World
    device: torch.device
    tokenizer: Tokenizer
    fingerprint: dict[str, Any]
    model: GPT
    optimizers: list[torch.optim.Optimizer]
    batches: Batches
    val_tokens: np.ndarray
    total_steps: int
    steps_per_epoch: float
    step: int = 0
    elapsed: float = 0.0
    best_val: float = math.inf
    resumed: bool = False
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    init_from: dict[str, Any] = field(default_factory=dict)  # {"path", "sha256"} of the start weights, if any
    warnings: list[str] = field(default_factory=list)  # settings adjusted to the run, and why
    val_rows: ChatRows | None = None  # chat data: the val split's packed conversations, scored masked

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.model_config.context

    @property
    def val_size(self) -> int:
        """Positions one evaluation of the whole val split predicts."""
        return len(self.val_tokens) - 1 if self.val_rows is None else len(self.val_rows) * self.model_config.context


# --- building a run --------------------------------------------------------------------------


def run_exists(out: Path) -> bool:
    return any((out / name).exists() for name in RUN_FILES)


def _resume_checkpoint(out: Path, fingerprint: dict[str, Any]) -> Checkpoint:
    path = out / "last.pt"
    if not path.is_file():
        raise MicroGPTError(f"cannot --resume: {path} does not exist; start a run without --resume")
    saved = checkpoint.load(path)
    if saved.training is None:
        raise MicroGPTError(f"cannot --resume: {path} holds no training state")
    if saved.data != fingerprint:
        raise MicroGPTError(f"cannot --resume: {path} was trained on different data or with another tokenizer")
    return saved


def _start_checkpoint(cfg: TrainConfig, meta: dict[str, Any]) -> tuple[Checkpoint, dict[str, Any]]:
    """The checkpoint --init-from names, checked against the data, and its path and sha256."""
    if not Path(cfg.init_from).exists():
        raise MicroGPTError(f"--init-from {cfg.init_from} does not exist; pass a checkpoint file (from `microgpt "
                            f"import` or `microgpt train`) or a run dir")
    path = checkpoint.resolve_path(cfg.init_from)
    start = checkpoint.load(path)
    spec = start.tokenizer
    if spec["kind"] in ("gpt2", "tiktoken"):
        fix = f"prepare the text with `microgpt prepare --tokenizer {spec.get('name', spec['kind'])}`"
    else:  # a vocabulary learned from a corpus: only data made with that very vocabulary fits
        fix = f"prepare the text with `microgpt prepare --tokenizer-from {path}`"
    if not extends(meta["tokenizer"], spec):  # a chat template's tokens may be added to the start's
        check_same_tokenizer(meta, spec, Path(cfg.data), f"--init-from {path}", fix)
    start.check_weights()
    return start, {"path": str(path), "sha256": file_sha256(path)}


def _load_start(model: GPT, start: Checkpoint, source: str) -> None:
    """Copy a checkpoint's weights into `model`: learned positions past a shortened context are
    dropped, and the vocabulary's padding rows are added or dropped to fit model's pad_vocab.
    Tokens the data adds (a chat template's delimiters) get rows that start at the mean of the
    others; with enough padding rows (GPT-2's 50,304) the matrices keep their size."""
    state = dict(start.model)
    if "pos_emb.weight" in state:
        state["pos_emb.weight"] = state["pos_emb.weight"][: model.config.context]
    old, real, rows = start.model_config.vocab_size, model.config.vocab_size, model.config.padded_vocab
    for name in ("tok_emb.weight", "head.weight"):
        if name in state and (state[name].shape[0] != rows or real != old):
            kept = state[name][:old]
            added = kept.mean(dim=0, keepdim=True).expand(real - old, -1)
            state[name] = torch.cat([kept, added, kept.new_zeros(rows - real, kept.shape[1])])
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise MicroGPTError(f"cannot start from {source}: {exc}".splitlines()[0]) from exc


def _non_default(*configs: object) -> set[str]:
    """The settings that differ from their defaults: what a Python caller asked for on resume."""
    return {f.name for c in configs for f in fields(c) if getattr(c, f.name) != f.default}  # type: ignore[arg-type]


def _device_for(world: distributed.World, name: str) -> torch.device:
    device = resolve_device(name)
    if device.type == "cuda" and world.distributed:
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    return device


def planned_steps(cfg: TrainConfig, batches: Batches) -> tuple[int, float]:
    """Optimizer steps that --epochs and --max-steps allow, and steps per epoch."""
    steps_per_epoch = batches.per_epoch / cfg.grad_accum
    total = max(1, math.ceil(min(cfg.epochs * steps_per_epoch, MAX_STEPS)))
    return (min(total, cfg.max_steps) if cfg.max_steps else total), steps_per_epoch


def fit_warmup(cfg: TrainConfig, total_steps: int) -> tuple[TrainConfig, str]:
    """A run of `total_steps` that would end inside its warm-up never reaches the peak LR: warm up
    over a tenth of it instead (as a time budget does). Returns the settings and what changed."""
    fitted = total_steps // 10
    end = lr_factor(total_steps - 1, total_steps, cfg, 0.0, None)
    return replace(cfg, warmup_steps=fitted), (
        f"--warmup-steps {cfg.warmup_steps:,} is longer than this run of {total_steps:,} steps, which would end at "
        f"{end:.2f}x the peak LR; warming up over {fitted:,} steps instead (a tenth of the run)")


def build_run(model_config: ModelConfig | None, cfg: TrainConfig, resume: bool, force: bool,
              world: distributed.World, given: set[str] | None = None) -> Run:
    """Check the data and options, build or restore the model and optimizers.

    With `resume`, the saved run's settings are the base and the settings named in `given` (by
    default those that differ from the defaults) are applied to it; see config.resume_settings."""
    out = Path(cfg.out)
    meta = read_meta(cfg.data)
    tokenizer = data_tokenizer(meta)
    fingerprint = data_fingerprint(meta)
    model_config = model_config or ModelConfig()
    given = _non_default(model_config, cfg) if given is None else given
    saved: Checkpoint | None = None
    start: Checkpoint | None = None
    init_from: dict[str, Any] = {}
    changes: dict[str, tuple[Any, Any]] = {}
    if resume:
        saved = _resume_checkpoint(out, fingerprint)
        model_config, cfg, changes = resume_settings(saved.model_config, saved.train_settings, model_config, cfg, given)
        init_from = saved.init_from
    elif run_exists(out) and not force:
        raise MicroGPTError(f"{out} already holds a run; continue it with --resume, or pass --force to start over")
    elif cfg.init_from:
        start, init_from = _start_checkpoint(cfg, meta)
        model_config = init_settings(start.model_config, model_config, given)
    model_config = replace(model_config, vocab_size=meta["vocab_size"])

    train_tokens = open_split(cfg.data, "train", meta)
    val_tokens = open_split(cfg.data, "val", meta)
    val_rows = None
    if has_mask(meta):
        val_rows = ChatRows(val_tokens, open_mask(cfg.data, "val"), tokenizer, model_config.context)
        if not len(val_rows):
            raise MicroGPTError(f"no exchange of the validation split's conversations fits --context "
                                f"{model_config.context}; use a longer --context or shorter conversations")
        train_rows = ChatRows(train_tokens, open_mask(cfg.data, "train"), tokenizer, model_config.context)
        batches: Batches = ChatBatches(train_rows, cfg.batch_size, cfg.seed, world.rank, world.size)
    elif len(val_tokens) <= model_config.context:
        raise MicroGPTError(
            f"--context {model_config.context} is longer than the validation split allows "
            f"({len(val_tokens)} tokens); use a smaller --context or a larger --val-fraction in prepare"
        )
    else:
        batches = Batches(train_tokens, model_config.context, cfg.batch_size, cfg.seed, world.rank, world.size)
    if cfg.grad_accum > batches.per_epoch:
        raise MicroGPTError(f"--grad-accum {cfg.grad_accum} asks for more micro-batches per step than one epoch "
                            f"holds ({batches.per_epoch:,}); lower --grad-accum or --batch-size")
    device = _device_for(world, cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    total_steps, steps_per_epoch = planned_steps(cfg, batches)
    warnings = []
    if saved is None and cfg.warmup_steps >= total_steps:
        cfg, warning = fit_warmup(cfg, total_steps)
        warnings.append(warning)

    params = count_params(model_config)
    ensure_fits(params, BYTES_PER_TRAINED_PARAM, device, "train")
    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    with allocation_errors(f"a model of {params:,} parameters", "use a smaller model or batch"):
        model = GPT(model_config).to(device)
        if start is not None:
            _load_start(model, start, cfg.init_from)
            del start  # its copy of the weights is not needed past here
        optimizers = build_optimizers(model, cfg, device)
    run = Run(cfg, model_config, out, world, device, tokenizer, fingerprint, model, optimizers, batches,
              val_tokens, total_steps, steps_per_epoch, changes=changes, init_from=init_from, warnings=warnings,
              val_rows=val_rows)
    if saved is not None:
        _restore(run, saved)
    return run


def _restore(run: Run, saved: Checkpoint) -> None:
    state = saved.training
    assert state is not None
    path = run.out / "last.pt"
    if len(state.optimizers) != len(run.optimizers):
        raise MicroGPTError(f"cannot --resume: {path} holds the state of {len(state.optimizers)} optimizer(s) "
                            f"but this run builds {len(run.optimizers)}")
    try:
        run.model.load_state_dict(saved.model)
        for opt, opt_state in zip(run.optimizers, state.optimizers, strict=True):
            opt.load_state_dict(opt_state)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise MicroGPTError(f"cannot --resume: {path} does not fit this run: {exc}".splitlines()[0]) from exc
    run.step, run.elapsed, run.best_val, run.resumed = state.step, state.elapsed, state.best_val, True


# --- the run dir -----------------------------------------------------------------------------


class RunFiles:
    """metrics.jsonl, config.toml, the checkpoints and the plot of a run; inert on every process but
    the main one.

    A new run in a dir that holds an older one takes the dir over at its first save, as a whole:
    until then the old run stays as it was (a new run that diverges or is killed early loses
    nothing), and from then on nothing of it is left beside the new files."""

    def __init__(self, out: Path, active: bool):
        self.out = out
        self.active = active
        self.metrics_path = out / METRICS_FILE
        self.owned = False  # whether the dir's run files are this run's
        self._pending: list[Metrics] = []  # metrics logged before this run owns the dir

    def start(self, run: Run) -> None:
        """Get the dir ready, under the run's lock: drop what a killed process left half-written;
        on resume, drop metrics past the checkpoint (those steps are about to be redone)."""
        if not self.active:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(self.out)
        shutil.rmtree(self.out / _DISCARD, ignore_errors=True)
        if run.resumed:
            self._trim_metrics(run.step)
            save_config(self.out, run.model_config, run.cfg)
            self.owned = True

    def take_over(self, run: Run) -> None:
        """Make the dir this run's before its first save: the previous run's files are moved aside
        one rename at a time, checkpoints first, then deleted; then this run's settings and the
        metrics logged so far are written. An interruption leaves fewer old files, never a mix."""
        if not self.active or self.owned:
            return
        discard = self.out / _DISCARD
        for name in (*reversed(RUN_FILES), METRICS_FILE, LOSS_PLOT, CONFIG_FILE):
            if (self.out / name).exists():
                discard.mkdir(exist_ok=True)
                (self.out / name).rename(discard / name)
        shutil.rmtree(discard, ignore_errors=True)
        save_config(self.out, run.model_config, run.cfg)
        self.owned = True
        self._append(self._pending)  # one write for the steps logged so far, not one each
        self._pending.clear()

    def _trim_metrics(self, last_step: int) -> None:
        if self.metrics_path.exists():
            kept = []
            for line in self.metrics_path.read_bytes().decode("utf-8", "replace").splitlines():
                try:
                    if json.loads(line)["step"] <= last_step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a kill
            atomic_write(self.metrics_path, lambda f: f.write("".join(f"{line}\n" for line in kept).encode()))

    def record(self, metrics: Metrics) -> None:
        if not self.owned:
            self._pending.append(metrics)
        else:
            self._append([metrics])

    def _append(self, rows: list[Metrics]) -> None:
        if self.active and rows:
            append_text(self.metrics_path, "".join(json.dumps(m.to_dict()) + "\n" for m in rows))

    def plot(self) -> None:
        """Redraw loss.png; a plot that cannot be written is not worth stopping a run for."""
        if self.active and self.owned:
            with contextlib.suppress(OSError, ValueError, MicroGPTError):
                save_loss_plot(self.out)

    def save(self, name: str, run: Run, metrics: Metrics, resumable: bool) -> None:
        self.take_over(run)
        if not self.active:
            return
        training = None
        if resumable:
            training = TrainingState([opt.state_dict() for opt in run.optimizers], run.step, run.elapsed, run.best_val,
                                     run.world.size)
        state = Checkpoint.of(run.model, run.tokenizer, run.cfg, run.fingerprint, metrics.to_dict(), training,
                              run.init_from)
        checkpoint.save(self.out / name, state)


# --- time ------------------------------------------------------------------------------------


class Clock:
    """The run's wall time (resumes included) and its --time-budget. The budget covers everything:
    training stops early enough to leave `reserve()` seconds for the final evaluation and save,
    predicted from the step time until an evaluation has been timed."""

    def __init__(self, run: Run, started: float | None):
        self.budget = run.cfg.time_budget
        self._start = time.perf_counter() if started is None else started
        self._before = run.elapsed
        self._run = run
        self._step_times: list[float] = []
        self.step_seconds = 0.0  # the recent time of one optimizer step (0: not known yet)
        self.eval_token_seconds = 0.0  # measured seconds per validation token and process (0: not yet)
        self.save_seconds = 0.0  # measured seconds of the checkpoint saves and plot after an evaluation
        self.eval_tokens = 0  # validation tokens per evaluation, fixed at the first one
        self._setup: float | None = None  # this call's seconds before its first step

    def elapsed(self) -> float:
        return self._before + time.perf_counter() - self._start

    def observe_step(self, seconds: float) -> None:
        self._step_times = [*self._step_times, seconds][-20:]
        self.step_seconds = statistics.median(self._step_times)

    def observe_window(self, seconds_per_step: float) -> None:
        """A log window's average step time: on a GPU the per-step times only measure launching."""
        self._step_times = [seconds_per_step]
        self.step_seconds = seconds_per_step

    def _forward_token_seconds(self) -> float:
        if self.eval_token_seconds:
            return self.eval_token_seconds
        run = self._run
        tokens_per_process = run.tokens_per_step / run.world.size
        return FORWARD_SHARE * self.step_seconds / tokens_per_process

    def planned_eval_tokens(self) -> int:
        """Validation tokens per evaluation: --eval-tokens (or the whole split); under a budget, at
        most what one process scores in EVAL_SHARE of it. Fixed at the first evaluation, so that
        every val loss of a run is measured on the same tokens."""
        if self.eval_tokens:
            return self.eval_tokens
        run = self._run
        wanted = min(run.cfg.eval_tokens or run.val_size, run.val_size)
        if self.budget and self.step_seconds:
            affordable = EVAL_SHARE * self.budget / self._forward_token_seconds() * run.world.size
            wanted = min(wanted, max(run.model_config.context, int(affordable)))
        return wanted

    def reserve(self) -> float:
        """Seconds to keep for the final evaluation and saves (0 without a budget)."""
        if not self.budget:
            return 0.0
        run = self._run
        evaluation = self.planned_eval_tokens() / run.world.size * self._forward_token_seconds()
        slack = (run.cfg.log_interval if run.world.distributed else 1) * self.step_seconds  # see Trainer._after_step
        return 1.1 * (min(evaluation, EVAL_SHARE * self.budget) + self.save_estimate()) + slack

    def save_estimate(self) -> float:
        """Seconds the saves after an evaluation take: as measured, or estimated before the first."""
        if self.save_seconds:
            return self.save_seconds
        # best.pt and last.pt: the weights, and AdamW's two moments in last.pt
        return 4 * self._run.model.num_params() * 4 / SAVE_BYTES_PER_SEC + 0.5

    def over(self) -> bool:
        return bool(self.budget) and self.elapsed() + self.reserve() >= self.budget

    def train_budget(self) -> float:
        """Seconds into the budget where training must stop (0 without a budget)."""
        return max(self.budget - self.reserve(), 1e-3) if self.budget else 0.0

    def training_started(self) -> None:
        """Call before every step: the first call marks where this call's start-up (imports, data
        checks, building the model) ended."""
        if self._setup is None:
            self._setup = self.elapsed() - self._before

    def schedule_time(self) -> tuple[float, float]:
        """(elapsed, budget) for the LR schedule: seconds of training so far, and the seconds that
        training may take. Start-up counts against the budget but not in the schedule, so that a
        short budget still warms up and decays over its training steps."""
        setup = self._setup or 0.0
        budget = max(self.train_budget() - setup, 1e-3) if self.budget else 0.0
        return max(0.0, self.elapsed() - setup), budget

    def eval_deadline(self) -> float | None:
        """A perf_counter time no evaluation may run past: the budget's end, less the saves."""
        if not self.budget:
            return None
        return self._start + self.budget - self._before - self.save_estimate()


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A batch on `device`. On CUDA it goes through pinned memory (torch caches those buffers) without
    waiting: the host prepares the next micro-batch while the GPU still works on this one."""
    tensor = torch.from_numpy(array)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The RNG seed of one step on one process: dropout masks differ across processes (each has
    its own rows of the batch) and depend only on the step, so a resumed run draws exactly the
    masks of an uninterrupted one, under any number of processes."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1)


# --- the loop --------------------------------------------------------------------------------


def evaluate_val(run: Run, max_tokens: int = 0, deadline: float | None = None,
                 on_progress: Callable[[int], None] | None = None) -> tuple[float, int]:
    """Validation loss over the split (or its first `max_tokens`), and the tokens it covers. Each
    process scores its share of the windows and the sums are combined, so the value is the
    single-process one. Chat data is scored on its assistant tokens, in whole conversations, as
    it trains (rows_loss); the count returned is then the positions run through the model."""
    shard = (run.world.rank, run.world.size)
    if run.val_rows is None:
        loss_sum, count, _ = split_loss(run.model, run.val_tokens, run.cfg.batch_size, run.device, max_tokens,
                                        shard=shard, deadline=deadline, on_progress=on_progress)
        positions = count
    else:
        loss_sum, count, _, positions = rows_loss(run.model, run.val_rows, run.cfg.batch_size, run.device,
                                                  max_tokens, shard=shard, deadline=deadline, on_progress=on_progress)
    sums = torch.tensor([loss_sum, count, positions], dtype=torch.float64, device=run.device)
    loss, scored, tokens = distributed.sum_across(run.world, sums).tolist()
    return loss / max(scored, 1), int(tokens)


def train(
    model_config: ModelConfig | None, cfg: TrainConfig, resume: bool = False, force: bool = False,
    on_event: EventFn = _ignore, given: set[str] | None = None, started: float | None = None,
) -> RunEnded:
    """Train a model on `cfg.data`, writing best.pt, last.pt, metrics.jsonl, config.toml and loss.png
    into `cfg.out`, which stays locked against other runs meanwhile.

    With `resume`, continue the run in `cfg.out` exactly where last.pt left it; the settings named
    in `given` (default: those not at their defaults) change it, see build_run. `started`
    (a time.perf_counter value) is when the time budget began, if before this call. Returns the
    run's summary. Raises MicroGPTError for bad input or divergence, Interrupted on Ctrl-C/SIGTERM."""
    started = time.perf_counter() if started is None else started
    world = distributed.launched_world()
    out = Path(cfg.out)
    if out.resolve() == Path(cfg.data).resolve():
        raise MicroGPTError(f"--out {out} is the data dir itself; a run writes its checkpoints and logs into --out: "
                            f"give it a dir of its own, such as --out out")
    with dir_lock(out, "`microgpt train`") if world.main else nullcontext():
        run = build_run(model_config, cfg, resume, force, world, given)
        distributed.init(world, run.device)
        trainer = None
        try:
            trainer = Trainer(run, on_event if world.main else _ignore, started)
            return trainer.train()
        except RuntimeError as exc:
            if not world.distributed:
                raise
            # Leaving with an error: torchrun's SIGTERM to the surviving ranks must not cut the
            # process down before it has said why (it still SIGKILLs a rank that hangs).
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            raise MicroGPTError(f"a peer process failed or vanished ({str(exc).splitlines()[0]}); "
                                f"{run.out / 'last.pt'} from the last save is intact: restart with --resume") from exc
        finally:
            # An exception's traceback keeps the trainer alive past the shutdown below, and a DDP wrapper
            # freed after its process group can deadlock gloo's teardown at exit: drop the wrapper first.
            if trainer is not None:
                trainer.runner = run.model
            distributed.shutdown(world)


def run_loop(run: Run, on_event: EventFn = _ignore, started: float | None = None) -> RunEnded:
    """Train a built run to its end (see Trainer)."""
    return Trainer(run, on_event, started).train()


class Trainer:
    """The loop over optimizer steps of one run, with its logging, evaluation and stopping."""

    def __init__(self, run: Run, on_event: EventFn, started: float | None):
        self.run = run
        self.emit = on_event
        self.clock = Clock(run, started)
        self.files = RunFiles(run.out, run.world.main)
        self.runner: torch.nn.Module = run.model
        if run.cfg.compile:
            self.runner = torch.compile(run.model)  # type: ignore[assignment]
        if run.world.distributed:
            device_ids = [run.device.index] if run.device.type == "cuda" else None
            self.runner = DistributedDataParallel(self.runner, device_ids=device_ids)
        self.loss_sum = torch.zeros((), device=run.device)
        self.window_steps = 0  # steps since the last log line
        self.window_start = 0.0
        self.last: Metrics | None = None
        self.lr_factor = 0.0
        self.first_step = run.step
        self.peak = peak_flops(run.device)
        self.flops_per_token = run.model.flops_per_token()
        # Log windows for the summary's tokens/s: this call's first (compilation, allocator and cache
        # warm-up) is kept apart and only used when no other was measured.
        self.warmup_window: tuple[int, float] | None = None  # (steps, seconds)
        self.timed_steps, self.timed_seconds = 0, 0.0
        self.preflight: list[float] | None = []  # step times for the pre-flight estimate; None once made

    def train(self) -> RunEnded:
        run = self.run
        over = torch.tensor([float(self.clock.over())], device=run.device)
        over_everywhere = distributed.sum_across(run.world, over).item() > 0  # every process decides alike
        if run.step >= run.total_steps:
            return self._end("nothing to do")
        if over_everywhere:
            raise MicroGPTError(
                f"--time-budget {run.cfg.time_budget:g} s ran out before the first step: start-up took "
                f"{self.clock.elapsed():.1f} s, and {self.clock.reserve():.1f} s are kept for the final "
                f"evaluation and saves; give a larger --time-budget")
        self.files.start(run)
        with stop_requests() as signals:  # from the start line on, Ctrl-C ends the run with a save
            self.emit(self._started())
            if run.init_from and run.step == 0:
                self._evaluate_start()
            run.model.train()
            self.window_start = time.perf_counter()
            while True:
                began = time.perf_counter()
                self._step()
                if self.preflight is not None and run.device.type == "cuda":
                    torch.cuda.synchronize(run.device)  # a few steps timed whole, not just launched
                self.clock.observe_step(time.perf_counter() - began)
                run.elapsed = self.clock.elapsed()
                self.emit(StepDone(run.step, run.elapsed, self._expected_steps()))
                self._plan(time.perf_counter() - began)
                reason = self._after_step(signals)
                if reason:
                    return self._end(reason)

    def _started(self) -> RunStarted:
        run = self.run
        rows = run.batches.rows if isinstance(run.batches, ChatBatches) else None
        return RunStarted(
            model_config=run.model_config, train_config=run.cfg, device=str(run.device), world_size=run.world.size,
            params=run.model.num_params(), tokenizer=run.tokenizer.name, vocab_size=run.tokenizer.vocab_size,
            train_tokens=len(run.batches.tokens), val_tokens=len(run.val_tokens),
            tokens_per_step=run.tokens_per_step, steps_per_epoch=run.steps_per_epoch, total_steps=run.total_steps,
            step=run.step, resumed=run.resumed, changes=run.changes, init_from=run.init_from,
            peak_flops=self.peak[0] if self.peak else None, peak_source=self.peak[1] if self.peak else "",
            warnings=tuple(run.warnings),
            conversations=rows.conversations if rows else 0, chat_rows=len(rows) if rows else 0,
            dropped_exchanges=rows.dropped if rows else 0,
        )

    def _plan(self, step_seconds: float) -> None:
        """Once the first few steps are timed (the first of this call, which warms caches up, left
        out), estimate the time to the end of the run: the pre-flight line."""
        if self.preflight is None:
            return
        run = self.run
        if run.step > self.first_step + 1:
            self.preflight.append(step_seconds)
        times = self.preflight
        if not times or (len(times) < PREFLIGHT_STEPS and sum(times) < PREFLIGHT_SECONDS):
            return
        self.preflight = None
        per_step = statistics.median(times)
        if run.cfg.time_budget:
            steps = self._expected_steps() - run.step
            seconds = max(0.0, run.cfg.time_budget - run.elapsed)
        else:
            steps = run.total_steps - run.step
            evaluations = steps // run.cfg.eval_interval + 1
            eval_tokens = min(run.cfg.eval_tokens or len(run.val_tokens), len(run.val_tokens))
            forward_per_token = FORWARD_SHARE * per_step / (run.tokens_per_step / run.world.size)
            save = 4 * run.model.num_params() * 4 / SAVE_BYTES_PER_SEC + 0.5  # as Clock.reserve predicts it
            seconds = steps * per_step + evaluations * (eval_tokens / run.world.size * forward_per_token + save)
        self.emit(Planned(run.step, per_step, steps, seconds, str(run.device), run.cfg.time_budget))

    def _step(self) -> None:
        """One optimizer step over --grad-accum micro-batches, without waiting for the device."""
        run, cfg = self.run, self.run.cfg
        self.clock.training_started()
        self.lr_factor = lr_factor(run.step, run.total_steps, cfg, *self.clock.schedule_time())
        for opt in run.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * self.lr_factor
        torch.manual_seed(step_seed(cfg.seed, run.world.rank, run.step))
        for micro in range(cfg.grad_accum):
            x, y = (to_device(a, run.device) for a in run.batches.get(run.step * cfg.grad_accum + micro))
            # Only the last micro-batch of a step needs the gradient all-reduce.
            sync = micro == cfg.grad_accum - 1 or not run.world.distributed
            no_sync = nullcontext() if sync else self.runner.no_sync()  # type: ignore[operator]
            with autocast(run.device), no_sync:
                loss = self.runner(x, y) / cfg.grad_accum
                loss.backward()
            self.loss_sum += loss.detach()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
        for opt in run.optimizers:
            opt.step()
        for opt in run.optimizers:
            opt.zero_grad(set_to_none=True)
        run.step += 1
        self.window_steps += 1

    def _after_step(self, signals: list[int]) -> str | None:
        """Log, evaluate, save and decide whether the run ends here; returns why it ends, if it does.

        One process decides after any step. Several agree at log, evaluation and final steps only,
        on flags summed across them, so that none evaluates while another trains (both would hang)."""
        run, cfg = self.run, self.run.cfg
        at_end = run.step >= run.total_steps
        scheduled_eval = run.step % cfg.eval_interval == 0
        agreed_step = at_end or scheduled_eval or run.step % cfg.log_interval == 0
        stop, over = bool(signals), self.clock.over()
        if not agreed_step and (run.world.distributed or not (stop or over)):
            return None
        train_loss, stop, over = self._reduce(stop, over)
        reason = "steps" if at_end else "time budget" if over else None
        metrics = self._measure(train_loss)
        if reason or scheduled_eval:
            self._evaluate(metrics)
        else:
            self.files.record(metrics)
            self.emit(Logged(metrics, self._expected_steps()))
            if stop:
                self.files.save("last.pt", run, metrics, resumable=True)
        if stop and not reason:
            name = signal.Signals(signals[0]).name if signals else "a signal to another process"
            raise Interrupted(
                f"{name} at step {run.step:,}/{run.total_steps:,}; {run.out / 'last.pt'} is saved: continue with "
                f"`microgpt train --resume --out {run.out} --data {cfg.data}`"
            )
        return reason

    def _reduce(self, stop: bool, over: bool) -> tuple[float, bool, bool]:
        """The mean train loss since the last log line and the stop flags, agreed by all processes."""
        world = self.run.world
        flags = torch.tensor([float(stop), float(over)], device=self.run.device)
        values = distributed.sum_across(world, torch.cat([self.loss_sum.reshape(1).float(), flags])).tolist()
        return values[0] / (self.window_steps * world.size), values[1] > 0, values[2] > 0

    def _measure(self, train_loss: float) -> Metrics:
        run = self.run
        if not math.isfinite(train_loss):
            kept = ""
            if (run.out / "best.pt").exists() and run.world.main:
                whose = "" if self.files.owned else " (the previous run's: this one saved nothing yet)"
                kept = f" {run.out / 'best.pt'} is kept{whose};"
            raise MicroGPTError(f"training diverged: loss is {train_loss} at step {run.step};{kept} try a lower --lr")
        now = time.perf_counter()
        window_seconds = now - self.window_start
        seconds_per_step = window_seconds / self.window_steps
        if self.window_steps > 1 or run.step > self.first_step + 1:
            self.clock.observe_window(seconds_per_step)
        if self.warmup_window is None:
            self.warmup_window = (self.window_steps, window_seconds)
        else:
            self.timed_steps += self.window_steps
            self.timed_seconds += window_seconds
        tokens_per_sec = run.tokens_per_step / seconds_per_step
        metrics = Metrics(
            step=run.step, epoch=run.step / run.steps_per_epoch, tokens=run.step * run.tokens_per_step,
            train_loss=train_loss, lr=run.cfg.lr * self.lr_factor, tokens_per_sec=tokens_per_sec,
            elapsed=run.elapsed, mfu=self._mfu(tokens_per_sec),
        )
        self.loss_sum.zero_()
        self.window_steps, self.window_start = 0, now
        self.last = metrics
        return metrics

    def _evaluate_start(self) -> None:
        """Score the starting weights of a fine-tune, so that its val curve begins where they stand
        and best.pt holds them until training beats them."""
        run = self.run
        self._evaluate(Metrics(step=0, epoch=0.0, tokens=0, train_loss=None, lr=0.0, tokens_per_sec=None,
                               elapsed=run.elapsed))

    def _evaluate(self, metrics: Metrics) -> None:
        run, clock = self.run, self.clock
        began = time.perf_counter()
        wanted = clock.planned_eval_tokens()
        deadline = clock.eval_deadline()
        if deadline is not None and not clock.step_seconds:  # before any step: no step time to size it by
            deadline = min(deadline, began + EVAL_SHARE * clock.budget)
        self.files.take_over(run)

        def progress(done: int) -> None:
            self.emit(EvalProgress(run.step, min(done * run.world.size, wanted), wanted))

        val_loss, scored = evaluate_val(run, wanted, deadline, progress)
        evaluated = time.perf_counter()
        if scored:
            # Later evaluations score what the first did, even where its deadline cut it short.
            clock.eval_tokens = clock.eval_tokens or min(wanted, scored)
            clock.eval_token_seconds = (evaluated - began) / (scored / run.world.size)
        improved = val_loss < run.best_val
        run.best_val = min(run.best_val, val_loss)
        run.elapsed = clock.elapsed()
        metrics = replace(metrics, val_loss=val_loss, elapsed=run.elapsed, val_tokens=scored,
                          val_split_tokens=len(run.val_tokens) - 1)
        self.files.record(metrics)
        self.files.plot()
        if improved:
            self.files.save("best.pt", run, metrics, resumable=False)
        self.files.save("last.pt", run, metrics, resumable=True)
        release_freed_memory()
        clock.save_seconds = time.perf_counter() - evaluated
        run.elapsed = clock.elapsed()
        self.last = metrics
        self.emit(Evaluated(metrics, run.best_val, improved, scored, self._expected_steps()))
        self.window_start = time.perf_counter()  # tokens/s measures training, not evaluation

    def _expected_steps(self) -> int:
        """Where the run will end: --max-steps/--epochs, or sooner where the time budget runs out."""
        run, clock = self.run, self.clock
        if not run.cfg.time_budget or not clock.step_seconds:
            return run.total_steps
        left = max(0.0, clock.train_budget() - run.elapsed) / clock.step_seconds
        return min(run.total_steps, run.step + round(left))

    def _mfu(self, tokens_per_sec: float) -> float | None:
        if self.peak is None:
            return None
        return model_flops_utilization(tokens_per_sec, self.flops_per_token, self.peak[0], self.run.world.size)

    def _end(self, reason: str) -> RunEnded:
        run, last = self.run, self.last
        steps, seconds, warmup_excluded = self.timed_steps, self.timed_seconds, True
        if not steps and self.warmup_window is not None:
            (steps, seconds), warmup_excluded = self.warmup_window, False
        tokens_per_sec = steps * run.tokens_per_step / seconds if seconds else 0.0
        summary = RunEnded(
            steps=run.step, total_steps=run.total_steps, epochs=run.step / run.steps_per_epoch,
            best_val_loss=None if math.isinf(run.best_val) else run.best_val,
            train_loss=last.train_loss if last else None, val_loss=last.val_loss if last else None,
            elapsed=run.elapsed,
            tokens_per_sec=tokens_per_sec, params=run.model.num_params(), best=str(run.out / "best.pt"),
            last=str(run.out / "last.pt"), reason=reason, timed_steps=steps, warmup_excluded=warmup_excluded,
            mfu=self._mfu(tokens_per_sec) if steps else None, time_budget=run.cfg.time_budget,
            val_tokens=last.val_tokens if last else None, val_split_tokens=last.val_split_tokens if last else None,
        )
        self.emit(summary)
        return summary
