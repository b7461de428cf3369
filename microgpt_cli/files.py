"""Writing files and dirs so that a crash at any moment leaves the old version or the new one,
never half of one: temp file or dir beside the target, fsync, rename."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from microgpt_cli.errors import MicroGPTError


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call `write(file)` on a temp file beside `path`, fsync it, then rename it over `path`:
    a crash at any moment leaves either the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # make the rename itself durable


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_temp_dir(out: Path) -> Path:
    # Not tempfile.mkdtemp: its 0700 mode would stay on the renamed data dir; mkdir honours umask.
    while True:
        tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


def write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def install_dir(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished temp dir to `out`; with `force` the old `out` is moved aside first and
    deleted only once the new one is in place."""
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)
    elif not force:
        raise MicroGPTError(f"{out} already exists; pass --force to replace it or choose another --out")
    else:
        old = tmp.with_name(tmp.name.replace(".tmp-", ".old-"))
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    fsync_dir(out.parent)


@contextmanager
def atomic_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """A temp dir beside `out` to fill; when the block succeeds it is synced and renamed to `out`
    (replacing it only with `force`), when it fails it is removed and `out` stays as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out)
    try:
        yield tmp
        fsync_dir(tmp)
        install_dir(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
