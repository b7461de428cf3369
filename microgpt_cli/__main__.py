"""`python -m microgpt_cli` and the `microgpt` command.

The CLI's modules take a few tenths of a second to import; a Ctrl-C or SIGTERM meanwhile ends
the command with the same one line as one later on, not a traceback from inside an import.
`cli.main` takes the signals over once it can handle them."""

import os
import signal
import sys


def _stopped(signum: int, frame: object) -> None:
    # Not SystemExit: some imported module swallows exceptions raised inside its import (seen on CI,
    # where the command then ran on). Nothing is written before `cli.main` takes over, so a hard
    # exit loses nothing.
    sys.stderr.write("stopped: interrupted\n")
    sys.stderr.flush()
    os._exit(130)


def main() -> None:
    signal.signal(signal.SIGINT, _stopped)
    signal.signal(signal.SIGTERM, _stopped)
    from microgpt_cli.cli import main as run

    run()


if __name__ == "__main__":
    main()
