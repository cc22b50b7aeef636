"""Atomic file writes: the data goes to a temp file in the same folder, is fsynced, and os.replace puts it
at the path, so an interrupted write never leaves a broken file where the user's file was.

- Only a regular file (or nothing) at the path is replaced: a symlink, folder, device node (/dev/full),
  FIFO or socket is refused, since replacing it would destroy something that is not a saved file.
- A process killed while writing (SIGKILL, OOM killer) leaves its temp file, named
  `.NAME.<pid>.<random>.partial` beside the target; the next save to the same path removes such leftovers
  of processes that no longer run. (An unnamed O_TMPFILE file linked in at the end would leave nothing,
  but linking it through /proc/self/fd fails with EXDEV on some hosts, this one included, so there would
  be two mechanisms, one of them untested.)"""
from __future__ import annotations

import os
import re
import secrets
import stat

from .errors import GraphcnnError

TEMP_SUFFIX = ".partial"


class UnsafeTargetError(GraphcnnError):
    """The path to write exists and is not a regular file."""


def write_file_atomically(path, data: bytes) -> None:
    """Write `data` to `path` atomically (see the module docstring). The file gets mode 0o666 & ~umask,
    like a plain open(). Raises UnsafeTargetError if `path` exists and is not a regular file."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    check_replaceable(path)
    remove_stale_temps(folder, name)
    tmp = _write_named(folder, name, data)
    try:
        check_replaceable(path)     # again, just before replacing: the window is as small as it can be
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _write_named(folder, name, data) -> str:
    tmp = _temp_name(folder, name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def check_replaceable(path) -> None:
    """Refuse (UnsafeTargetError) when `path` exists and is anything but a regular file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISREG(st.st_mode):
        return
    kind = ("a symbolic link" if stat.S_ISLNK(st.st_mode) else "a folder" if stat.S_ISDIR(st.st_mode) else
            "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else
            "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else
            "not a regular file")
    raise UnsafeTargetError(f"{path}: exists and is {kind}; refusing to replace it with a saved file "
                            f"(remove it or choose another path)")


def _temp_name(folder, name) -> str:
    return os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def remove_stale_temps(folder, name) -> list:
    """Delete `.NAME.<pid>.<hex>.partial` files in `folder` whose process no longer runs; -> removed paths."""
    pattern = re.compile(rf"\.{re.escape(name)}\.(\d+)\.[0-9a-f]{{8}}{re.escape(TEMP_SUFFIX)}")
    removed = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in entries:
        m = pattern.fullmatch(entry)
        if m is None or _process_alive(int(m.group(1))):
            continue
        try:
            os.unlink(os.path.join(folder, entry))
            removed.append(os.path.join(folder, entry))
        except OSError:
            pass
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True     # exists but is not ours (or an impossible pid): leave its file alone
    return True
