"""The one exception type users see: the CLI prints its message on one line and exits non-zero."""


class MicroGPTError(Exception):
    """A problem the user can fix (bad input, missing file, wrong option); never a bug."""

    exit_code = 1
    label = "error"


class Interrupted(MicroGPTError):
    """A command stopped by Ctrl-C or SIGTERM; the message says what was kept (training saves a
    resumable checkpoint first)."""

    exit_code = 130
    label = "stopped"


def describe_os_error(exc: OSError) -> str:
    """An OSError as one line naming the file: "Permission denied: out/last.pt"."""
    names = " -> ".join(str(n) for n in (exc.filename, exc.filename2) if n is not None)
    reason = exc.strerror or str(exc)
    return f"{reason}: {names}" if names else reason
