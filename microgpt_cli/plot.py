"""Loss curves as PNG files, drawn from a run's metrics.jsonl.

Figures are built with matplotlib's object API on the Agg canvas (never pyplot): no display is
needed, no global backend is switched, and a plot drawn during training leaks no figure state.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from microgpt_cli.errors import MicroGPTError
from microgpt_cli.io.files import atomic_write
from microgpt_cli.training.events import METRICS_FILE

if TYPE_CHECKING:  # matplotlib takes ~0.5 s to import: only when a figure is drawn
    from matplotlib.figure import Figure

LOSS_PLOT = "loss.png"
XAxis = Literal["step", "tokens", "time"]
X_AXES = dict(zip(get_args(XAxis), ("optimizer steps", "tokens seen", "seconds"), strict=True))


@dataclass
class Curves:
    """The loss series of one run, by step, with tokens and seconds for the other x axes."""

    name: str
    steps: list[int] = field(default_factory=list)
    train: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val: list[float] = field(default_factory=list)
    tokens: dict[int, int] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)

    def x(self, steps: list[int], axis: str) -> list[float]:
        if axis == "tokens":
            return [self.tokens[s] for s in steps]
        if axis == "time":
            return [self.seconds[s] for s in steps]
        return list(steps)

    @property
    def tokens_per_step(self) -> float | None:
        """Tokens per optimizer step, if the metrics record tokens (constant within a run)."""
        if len(self.tokens) < len(self.steps) or not self.steps or self.steps[-1] == 0:
            return None
        return self.tokens[self.steps[-1]] / self.steps[-1]


MAX_PLOTTED = 1e15  # larger numbers are damage, not measurements: matplotlib cannot lay out an axis for 1e308


def _metrics_line(line: str) -> dict[str, float] | None:
    """The numbers of one metrics.jsonl line, or None for a line that is not a whole, sane entry."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if not isinstance(entry, dict) or "step" not in entry or not {"train_loss", "val_loss"} & set(entry):
        return None
    numbers = {k: entry[k] for k in ("step", "train_loss", "val_loss", "tokens", "elapsed") if k in entry}
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) < MAX_PLOTTED
               for v in numbers.values()):
        return None
    return {k: float(v) for k, v in numbers.items()}


def read_curves(run_dir: str | Path, name: str | None = None) -> Curves:
    """The curves in RUN_DIR/metrics.jsonl. A line being written right now (or cut by a crash)
    is skipped rather than failing the plot."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise MicroGPTError(f"{run_dir} has no {METRICS_FILE}; is it a `microgpt train --out` dir?")
    curves = Curves(name or run_dir.resolve().name)
    # A crash can cut a line inside a character, so undecodable bytes only spoil their own line.
    for line in path.read_bytes().decode("utf-8", "replace").splitlines():
        entry = _metrics_line(line)
        if entry is None:
            continue
        step = int(entry["step"])
        if "train_loss" in entry:  # absent from the evaluation before the first step of a fine-tune
            curves.steps.append(step)
            curves.train.append(entry["train_loss"])
        if "val_loss" in entry:
            curves.val_steps.append(step)
            curves.val.append(entry["val_loss"])
        if "tokens" in entry:
            curves.tokens[step] = int(entry["tokens"])
        curves.seconds[step] = entry.get("elapsed", 0.0)
    return curves


def _figure(**kwargs: object) -> Figure:
    from matplotlib.figure import Figure

    return Figure(**kwargs)  # type: ignore[arg-type]


PLOT_FORMATS = ("png", "svg", "pdf")  # what `plot --out` may end in; the format follows the suffix


def _save(fig: Figure, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    atomic_write(path, lambda f: fig.savefig(f, format=path.suffix[1:].lower()))
    return path


def save_loss_plot(run_dir: str | Path) -> Path:
    """Write RUN_DIR/loss.png (see loss_figure). Cheap enough to call at every evaluation."""
    return _save(loss_figure(run_dir), Path(run_dir) / LOSS_PLOT)


def loss_figure(run_dir: str | Path) -> Figure:
    """The chart of one run: train and val loss by step, with tokens seen on the top axis when
    metrics.jsonl records them."""
    run_dir = Path(run_dir)
    curves = read_curves(run_dir)
    if not curves.steps and not curves.val:
        raise MicroGPTError(f"{run_dir / METRICS_FILE} holds no metrics yet")
    # Fixed margins, not a layout engine: constrained layout would double the drawing time.
    fig = _figure(figsize=(7, 4), dpi=100)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.12, top=0.8)
    ax = fig.add_subplot()
    few = len(curves.steps) < 3  # a lone point needs a marker to be seen at all
    ax.plot(curves.steps, curves.train, color="tab:blue", alpha=0.6, label="train", marker="." if few else None)
    if curves.val:
        ax.plot(curves.val_steps, curves.val, color="tab:orange", marker="o", markersize=3, label="val")
        best = min(range(len(curves.val)), key=curves.val.__getitem__)
        fig.suptitle(f"{curves.name}: best val loss {curves.val[best]:.4f} at step {curves.val_steps[best]:,}",
                     x=0.02, y=0.98, ha="left", fontsize="medium")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    per_step = curves.tokens_per_step
    if per_step:
        from matplotlib.ticker import EngFormatter

        def to_tokens(steps: Any) -> Any:  # tick positions: a float or a numpy array
            return steps * per_step

        def to_steps(tokens: Any) -> Any:
            return tokens / per_step

        top = ax.secondary_xaxis("top", functions=(to_tokens, to_steps))
        top.set_xlabel("tokens seen")
        top.xaxis.set_major_formatter(EngFormatter())  # 2M rather than an offset "1e6" that collides with the title
    return fig


def _check_runs_request(run_dirs: Sequence[str | Path], x_axis: str) -> None:
    if x_axis not in X_AXES:
        raise MicroGPTError(f"--x must be one of {', '.join(X_AXES)}, got {x_axis!r}")
    if not run_dirs:
        raise MicroGPTError("pass at least one run dir to plot")


def save_runs_plot(run_dirs: Sequence[str | Path], out: str | Path, x_axis: str = "step") -> Path:
    """Write one chart comparing runs to `out`, a PNG, SVG or PDF file by its suffix (see runs_figure)."""
    _check_runs_request(run_dirs, x_axis)  # a bad request fails before a bad --out, as it always has
    if Path(out).is_dir():
        raise MicroGPTError(f"--out {out} is a directory; name the PNG file to write, such as {Path(out) / 'runs.png'}")
    if Path(out).suffix[1:].lower() not in PLOT_FORMATS:
        raise MicroGPTError(f"--out {out}: name a .png, .svg or .pdf file (the format follows the suffix)")
    return _save(runs_figure(run_dirs, x_axis), Path(out))


def runs_figure(run_dirs: Sequence[str | Path], x_axis: str = "step") -> Figure:
    """One chart comparing runs by `x_axis` (step, tokens or time): val loss solid, train loss
    faint, one colour per run."""
    _check_runs_request(run_dirs, x_axis)
    paths = [Path(d) for d in run_dirs]
    names = [p.name or str(p) for p in paths]
    if len(set(names)) < len(names):  # a/out and b/out: the names alone would not tell them apart
        names = [str(p) for p in paths]
    fig = _figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for i, (path, name) in enumerate(zip(paths, names, strict=True)):
        curves = read_curves(path, name)
        if not curves.steps and not curves.val:
            raise MicroGPTError(f"{path / METRICS_FILE} holds no metrics yet")
        if x_axis == "tokens" and len(curves.tokens) < len(curves.steps):
            raise MicroGPTError(f"{path / METRICS_FILE} does not record tokens seen; use --x step or --x time")
        color = f"C{i % 10}"
        ax.plot(curves.x(curves.steps, x_axis), curves.train, color=color, alpha=0.25, linewidth=1)
        if curves.val:
            ax.plot(curves.x(curves.val_steps, x_axis), curves.val, color=color, marker="o", markersize=3, label=name)
        else:
            ax.lines[-1].set_label(f"{name} (train)")
    ax.set_xlabel(X_AXES[x_axis])
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("val loss (solid) and train loss (faint)", loc="left", fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig
