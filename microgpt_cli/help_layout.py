"""How `microgpt COMMAND --help` lays out options: three columns (names, value, description) that
leave the description most of an 80-column terminal, value names a user reads (INTEGER, PATH,
learned|rope) rather than Python types, and aliases accepted but not listed.

Typer's own layout gives each of a flag's names and its negative form a column of their own;
`train` has enough of them to squeeze the descriptions into 22 columns at 80. `install()` puts
this layout in its place; it reuses Typer's description cell (help, env var, default)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any, get_args

import typer.core
import typer.rich_utils as rich_utils
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from microgpt_cli.config import ModelConfig, SamplingSettings, TrainConfig

VALUE_NAMES = {int: "INTEGER", float: "NUMBER", str: "TEXT", Path: "PATH"}


def aliases() -> frozenset[str]:
    """Option names accepted but left out of --help (see config.setting)."""
    return frozenset(a for cls in (ModelConfig, TrainConfig, SamplingSettings) for f in fields(cls)
                     for a in f.metadata["aliases"])


def option_names(param: Any) -> list[str]:
    """The names --help shows for an option: its own, then its negative form (--no-bias), without aliases."""
    hidden = aliases()
    return [name for name in (*param.opts, *param.secondary_opts) if name not in hidden]


def value_name(param: Any) -> str | None:
    """What the value of an option or argument is: INTEGER, NUMBER, TEXT, PATH or its choices;
    None for a flag, which takes none."""
    if getattr(param, "is_flag", False):
        return None
    if param.metavar is not None:
        return str(param.metavar)
    descriptor = param.type_descriptor
    if descriptor.is_choice and descriptor.choices is not None:
        return "|".join(map(str, descriptor.choices))
    annotation = descriptor.annotation
    if descriptor.is_list:
        annotation = get_args(annotation)[0]
    return VALUE_NAMES.get(annotation, "VALUE") + ("..." if param.nargs != 1 else "")


def _options_panel(*, name: str, params: list[Any], ctx: Any, markup_mode: Any, console: Console) -> None:
    if not params:
        return
    table = Table(highlight=True, show_header=False, expand=True, box=None, padding=(0, 1), pad_edge=False)
    marks = any(param.required for param in params)
    if marks:
        table.add_column(no_wrap=True)  # "*" for a required one
    table.add_column(no_wrap=True)  # names
    table.add_column(no_wrap=True, max_width=18, overflow="fold")  # value
    table.add_column(ratio=1)  # description
    for param in params:
        if isinstance(param, typer.core.TyperArgument):
            names = Text((param.metavar or (param.name or "").upper()) + ("..." if param.nargs != 1 else ""))
            value = ""
        else:
            shown = option_names(param)
            primary = [n for n in shown if n not in param.secondary_opts]
            negative = [n for n in shown if n in param.secondary_opts]
            names = rich_utils.highlighter(", ".join(primary))
            if negative:
                names.append("\n")
                names.append(rich_utils.negative_highlighter(", ".join(negative)))
            value = value_name(param) or ""
        cells: list[Any] = [names, Text(value, style=rich_utils.STYLE_TYPES),
                            rich_utils._get_parameter_help(param=param, ctx=ctx, markup_mode=markup_mode)]
        if marks:
            star = rich_utils.REQUIRED_SHORT_STRING if param.required else ""
            cells.insert(0, Text(star, style=rich_utils.STYLE_REQUIRED_SHORT))
        table.add_row(*cells)
    console.print(Panel(table, border_style=rich_utils.STYLE_OPTIONS_PANEL_BORDER, title=name,
                        title_align=rich_utils.ALIGN_OPTIONS_PANEL))


def _usage_name(param: typer.core.TyperArgument) -> str:
    """An argument in the usage line as Click and man pages write it: SOURCE, [PATH], RUN_DIRS...;
    Typer's own is {SOURCE}, a set-builder brace few users read as "required"."""
    name = param.display_name_raw
    name = name if param.required else f"[{name}]"
    return name + ("..." if param.nargs != 1 else "")


def install() -> None:
    rich_utils._print_options_panel = _options_panel
    typer.core.TyperArgument._usage_display_name = _usage_name  # type: ignore[method-assign, assignment]
