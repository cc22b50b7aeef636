"""Atomic file writes: temp file in the same folder + fsync + os.replace, so an interrupted write never
leaves a broken file where the user's file was."""
import os
import secrets


def write_file_atomically(path, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same folder and os.replace, so readers never see
    a half-written file. The temp file is created with mode 0o666 & ~umask, like a plain open()."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
