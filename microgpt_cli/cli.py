"""The `microgpt` command: parse options, call the library, render with Rich. No ML logic here."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from microgpt_cli import __version__
from microgpt_cli.errors import MicroGPTError
from microgpt_cli.progress import stderr

app = typer.Typer(
    name="microgpt",
    help="Train small GPT language models on your own text, evaluate them, and sample from them.\n\n"
    "microgpt prepare input.txt → microgpt train → microgpt eval → microgpt generate --prompt hello",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)

CheckpointOpt = Annotated[
    Path, typer.Option("--checkpoint", "-c", help="Checkpoint file, or a run dir (its best.pt is used).")
]
DeviceOpt = Annotated[str, typer.Option(help="Where to run: auto, cpu, cuda or mps (auto picks cuda, then mps, then cpu).")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"microgpt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


# --- prepare ---------------------------------------------------------------------------------

# --- train -----------------------------------------------------------------------------------

# --- eval ------------------------------------------------------------------------------------

# --- generate --------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: user mistakes become one line on stderr and a non-zero exit, never a traceback."""
    try:
        code = app(argv, prog_name="microgpt", standalone_mode=False)
    except MicroGPTError as exc:
        stderr.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:  # bad option or value, caught by the parser
        stderr.print(f"[bold red]error:[/] {escape(exc.format_message())} (see --help)", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):
        stderr.print("[bold red]interrupted[/]")
        sys.exit(130)
    except BrokenPipeError:  # e.g. `microgpt generate ... | head`
        sys.stderr.close()
        sys.exit(0)
    sys.exit(code if isinstance(code, int) else 0)
