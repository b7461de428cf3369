"""Writing files and dirs so that a crash at any moment leaves the old version or the new one,
never half of one: temp file or dir beside the target, fsync, rename."""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from microgpt_cli.errors import MicroGPTError

TEMP_SUFFIX = ".tmp"


def _file_mode() -> int:
    """The mode a plain open() would give a new file: 0o666 less the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, write: Callable[[BinaryIO], object], durable: bool = True) -> None:
    """Call `write(file)` on a temp file beside `path`, fsync it, then rename it over `path`:
    a crash at any moment leaves either the old file or the new one, never half of one. Without
    `durable` the fsyncs are skipped (the rename is still atomic for the processes that read it),
    for a small record that must not wait behind other processes' writes to the disk."""
    created = make_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except BaseException:
        remove_empty(created)
        raise
    try:
        os.fchmod(fd, _file_mode())  # mkstemp makes 0600 files; the result should follow the umask like any other
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        remove_empty(created)
        # torch.save reports a full disk as a RuntimeError raised while the OSError unwinds.
        _raise_naming(path, exc.__context__ if isinstance(exc, RuntimeError) else exc, exc)
        raise
    if durable:
        fsync_dir(path.parent)  # make the rename itself durable


def append_text(path: Path, text: str) -> None:
    """Append `text` to the UTF-8 file `path`. A write cut short (a full disk) leaves a partial last
    line, which the readers of such files skip."""
    try:
        with path.open("a", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        _raise_naming(path, exc, exc)
        raise


def _raise_naming(path: Path, failed: BaseException | None, exc: BaseException) -> None:
    """A failed write to an open file names no file: if `failed` is such an OSError, raise one that
    names `path` (from `exc`, what was caught); otherwise return."""
    if isinstance(failed, OSError) and failed.filename is None:
        raise OSError(failed.errno, failed.strerror, str(path)) from exc


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
    created = make_dir(out.parent)
    try:
        tmp = make_temp_dir(out)
    except BaseException:
        remove_empty(created)
        raise
    try:
        yield tmp
        fsync_dir(tmp)
        install_dir(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_empty(created)
        raise


def make_dir(directory: Path) -> list[Path]:
    """mkdir -p, with a clear error where a file stands in the way; returns the dirs it created,
    outermost first, so that a command that then fails can take them back (remove_empty)."""
    missing = []
    for path in (directory, *directory.parents):
        if path.exists() or path.is_symlink():
            break
        missing.append(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise MicroGPTError(f"cannot create dir {directory}: it, or a dir above it, is a file") from None
    return missing[::-1]


def remove_empty(created: list[Path]) -> None:
    """Remove the dirs make_dir created, innermost first, as long as they are empty."""
    for path in reversed(created):
        try:
            path.rmdir()
        except OSError:
            return


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Delete the temp files `atomic_write` leaves when its process is killed mid-write. Call it
    only while holding the directory's lock, so that no live writer owns them."""
    removed = []
    for path in directory.glob(f".*{TEMP_SUFFIX}"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


LOCK_FILE = ".lock"


def _acquire(lock_path: Path, directory: Path, purpose: str) -> int:
    """An open descriptor of `lock_path` holding its exclusive flock (see dir_lock)."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, _file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise MicroGPTError(f"{directory} is in use by another {purpose} (PID {holder}); wait for it to "
                                f"finish or choose another dir") from None
        try:
            current: int | None = os.stat(lock_path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            return fd
        os.close(fd)  # the holder released and deleted it between our open and flock: try again


@contextmanager
def dir_lock(directory: Path, purpose: str) -> Iterator[None]:
    """Hold an exclusive lock on `directory` (creating it) for the block; a second holder gets a
    clear error naming the first one's PID. The lock is the kernel's (flock) on DIR/.lock, so it
    ends with its process, even on kill -9. The file is deleted on release; a process that locked
    a file just deleted sees that the path no longer names it, and takes the new one instead."""
    created = make_dir(directory)
    lock_path = directory / LOCK_FILE
    try:
        fd = _acquire(lock_path, directory, purpose)
    except BaseException:
        remove_empty(created)
        raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield
    finally:
        lock_path.unlink(missing_ok=True)  # while still held, so no one else holds this file
        os.close(fd)
        remove_empty(created)  # a run that failed before writing anything leaves no empty dir behind


@contextmanager
def output_lock(out: Path, purpose: str) -> Iterator[None]:
    """Hold an exclusive lock on writing `out`, a file or dir that atomic_write or atomic_dir makes
    whole, and clear what a writer of it killed mid-way (kill -9, a power cut) left beside it:
    temp files and dirs, and the old version a `--force` had moved aside. The lock is the file
    `.OUT.lock` beside `out`, held with flock (see dir_lock) and deleted on release."""
    created = make_dir(out.parent)
    lock_path = out.parent / f".{out.name}.lock"
    try:
        fd = _acquire(lock_path, out, purpose)
    except BaseException:
        remove_empty(created)
        raise
    try:
        _clear_leftovers(out)
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        os.close(fd)
        remove_empty(created)


def _clear_leftovers(out: Path) -> None:
    name = re.escape(out.name)
    temp_dir = re.compile(rf"\.{name}\.(tmp|old)-[0-9a-f]{{8}}")  # make_temp_dir, install_dir
    temp_file = re.compile(rf"\.{name}\.[a-z0-9_]{{8}}{re.escape(TEMP_SUFFIX)}")  # atomic_write's mkstemp
    for path in sorted(out.parent.iterdir()):
        if not path.name.startswith(f".{out.name}."):
            continue
        if temp_dir.fullmatch(path.name) and path.is_dir() and not path.is_symlink():
            if ".old-" in path.name and not (out.exists() or out.is_symlink()):
                os.rename(path, out)  # killed between install_dir's two renames: the old version is all there is
            else:
                shutil.rmtree(path, ignore_errors=True)
        elif temp_file.fullmatch(path.name) and path.is_file():
            path.unlink(missing_ok=True)


def check_replaceable(out: Path, ours: set[str], made: str, made_by: str) -> None:
    """For a --force that replaces `out`: refuse, in one line, anything but a dir holding only
    names in `ours` (or nothing): `made` says what the command makes ("a data dir"), `made_by` which
    command (`microgpt prepare`). A command replaces only what it made."""
    what = f"{made} made by {made_by}; --force replaces only those: choose another --out"
    if not out.is_dir():
        if out.exists() or out.is_symlink():
            raise MicroGPTError(f"{out} is a file, not {what}")
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ours)
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise MicroGPTError(f"{out} holds {shown}: it is not {what}")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
