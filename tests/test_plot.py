"""What the loss charts draw, read back from the matplotlib figures before they become PNGs: every
run, its train and val series with exactly the points of its metrics.jsonl, on the asked x axis.
(tests/test_ecosystem.py checks the PNG files and the `plot` command.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.colors import to_rgba
from matplotlib.lines import Line2D

from microgpt_cli.errors import MicroGPTError
from microgpt_cli.plot import X_AXES, loss_figure, runs_figure, save_runs_plot

Series = tuple[tuple[float, ...], tuple[float, ...]]


def write_run(path: Path, steps: range, val_every: int, tokens_per_step: int | None, seconds_per_step: float,
              loss_at_0: float) -> list[dict[str, Any]]:
    """A run dir whose metrics.jsonl logs `steps` (with val loss every `val_every` steps, and
    tokens seen unless `tokens_per_step` is None); returns its records."""
    records = []
    for s in steps:
        record: dict[str, Any] = {"step": s, "epoch": s / 100, "train_loss": loss_at_0 - s / 40, "lr": 1e-3,
                                  "tokens_per_sec": 1000.0, "elapsed": 0.5 + s * seconds_per_step}
        if tokens_per_step is not None:
            record["tokens"] = s * tokens_per_step
        if s % val_every == 0:
            record["val_loss"] = loss_at_0 + 0.1 - s / 45
        records.append(record)
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return records


def x_of(record: dict[str, Any], axis: str) -> float:
    return {"step": record["step"], "tokens": record.get("tokens"), "time": record["elapsed"]}[axis]


def expected_series(records: list[dict[str, Any]], axis: str) -> tuple[Series, Series | None]:
    """(train, val) as (xs, ys), straight from the records; val is None for a run never evaluated."""
    train = (tuple(x_of(r, axis) for r in records), tuple(r["train_loss"] for r in records))
    evaluated = [r for r in records if "val_loss" in r]
    val = (tuple(x_of(r, axis) for r in evaluated), tuple(r["val_loss"] for r in evaluated)) if evaluated else None
    return train, val


def series(line: Line2D) -> Series:
    xs, ys = (np.asarray(data, dtype=float).tolist() for data in (line.get_xdata(), line.get_ydata()))
    return tuple(xs), tuple(ys)


def line_of(ax: Axes, wanted: Series) -> Line2D:
    matches = [line for line in ax.get_lines() if series(line) == wanted]
    assert len(matches) == 1, f"{len(matches)} lines draw {wanted}"
    return matches[0]


def legend_labels(ax: Axes) -> list[str]:
    legend = ax.get_legend()
    assert legend is not None
    return [text.get_text() for text in legend.get_texts()]


@pytest.fixture
def runs(tmp_path: Path) -> dict[str, list[dict[str, Any]]]:
    """Three runs of different lengths, paces and val cadences; `gamma` was never evaluated."""
    return {
        "alpha": write_run(tmp_path / "alpha", range(10, 101, 10), 20, 512, 0.3, 5.0),
        "beta": write_run(tmp_path / "beta", range(5, 61, 5), 15, 128, 0.7, 4.5),
        "gamma": write_run(tmp_path / "gamma", range(1, 5), 1000, 64, 0.2, 4.8),
    }


@pytest.mark.parametrize("axis", list(X_AXES))
def test_runs_figure_draws_every_run_train_and_val(axis: str, runs: dict[str, list[dict[str, Any]]],
                                                   tmp_path: Path) -> None:
    fig = runs_figure([tmp_path / name for name in runs], axis)
    (ax,) = fig.axes
    assert ax.get_xlabel() == X_AXES[axis]
    expected = {name: expected_series(records, axis) for name, records in runs.items()}
    everything = [s for train, val in expected.values() for s in (train, val) if s is not None]
    assert sorted(series(line) for line in ax.get_lines()) == sorted(everything)  # no series missing or extra

    colours = {}
    for name, (train, val) in expected.items():
        train_line = line_of(ax, train)
        colours[name] = to_rgba(train_line.get_color())
        if val is None:  # the train curve then carries the name
            assert train_line.get_label() == f"{name} (train)"
            continue
        val_line = line_of(ax, val)
        assert to_rgba(val_line.get_color()) == colours[name]  # a run's two curves share its colour
        assert val_line.get_label() == name
        assert (train_line.get_alpha() or 1.0) < (val_line.get_alpha() or 1.0)  # "val solid, train faint"
    assert len(set(colours.values())) == len(runs)
    assert sorted(legend_labels(ax)) == ["alpha", "beta", "gamma (train)"]


def test_runs_with_the_same_name_are_told_apart(tmp_path: Path) -> None:
    first = write_run(tmp_path / "a" / "out", range(1, 4), 1, 10, 0.1, 3.0)
    second = write_run(tmp_path / "b" / "out", range(1, 4), 1, 10, 0.1, 2.0)
    (ax,) = runs_figure([tmp_path / "a" / "out", tmp_path / "b" / "out"]).axes
    for parent, records in (("a", first), ("b", second)):
        _, val = expected_series(records, "step")
        assert val is not None and line_of(ax, val).get_label() == str(tmp_path / parent / "out")
    assert len(set(legend_labels(ax))) == 2


def test_runs_figure_refuses_what_it_cannot_draw(tmp_path: Path) -> None:
    write_run(tmp_path / "old", range(1, 4), 2, None, 0.1, 3.0)  # metrics from before tokens were logged
    with pytest.raises(MicroGPTError, match="does not record tokens seen"):
        runs_figure([tmp_path / "old"], "tokens")
    with pytest.raises(MicroGPTError, match="--x must be one of step, tokens, time"):
        runs_figure([tmp_path / "old"], "epochs")
    with pytest.raises(MicroGPTError, match="at least one run dir"):
        runs_figure([])
    with pytest.raises(MicroGPTError, match="is a directory"):
        save_runs_plot([tmp_path / "old"], tmp_path)
    (ax,) = runs_figure([tmp_path / "old"], "time").axes  # time and step need no token counts
    assert len(ax.get_lines()) == 2


def test_loss_figure_draws_train_and_val_of_the_run(tmp_path: Path) -> None:
    records = write_run(tmp_path / "run", range(10, 101, 10), 30, 256, 0.3, 5.0)
    with (tmp_path / "run" / "metrics.jsonl").open("a", encoding="utf-8") as metrics:
        metrics.write('{"step": 110, "train_lo')  # a line cut mid-write is left out
    fig = loss_figure(tmp_path / "run")
    (ax,) = fig.axes
    train, val = expected_series(records, "step")
    assert val is not None
    assert sorted(series(line) for line in ax.get_lines()) == sorted([train, val])
    train_line, val_line = line_of(ax, train), line_of(ax, val)
    assert (train_line.get_label(), val_line.get_label()) == ("train", "val")
    assert to_rgba(train_line.get_color()) != to_rgba(val_line.get_color())
    assert sorted(legend_labels(ax)) == ["train", "val"]
    best = min((r for r in records if "val_loss" in r), key=lambda r: r["val_loss"])
    assert fig.get_suptitle() == f"run: best val loss {best['val_loss']:.4f} at step {best['step']:,}"
    (top,) = ax.child_axes  # tokens seen, 256 per step
    assert top.get_xlabel() == "tokens seen"


def test_loss_figure_of_a_run_not_yet_evaluated(tmp_path: Path) -> None:
    records = write_run(tmp_path / "run", range(1, 3), 1000, None, 0.3, 5.0)
    fig = loss_figure(tmp_path / "run")
    (ax,) = fig.axes
    train, _ = expected_series(records, "step")
    assert [series(line) for line in ax.get_lines()] == [train]
    assert legend_labels(ax) == ["train"] and fig.get_suptitle() == "" and ax.child_axes == []
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    with pytest.raises(MicroGPTError, match="holds no metrics yet"):
        loss_figure(tmp_path / "empty")


def test_importing_plot_does_not_import_matplotlib() -> None:
    """The CLI imports microgpt_cli.plot for `--help`; matplotlib costs half a second to import."""
    code = "import sys, microgpt_cli.plot; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
