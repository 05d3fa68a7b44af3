"""One atomic file write for everything fxsparse saves (CSR checkpoints, training checkpoints, summaries).

The data goes to a fresh temporary file beside the target, is flushed to disk, then renamed over the
target (os.replace is atomic on POSIX and Windows): a crash or an error never leaves half a file, and an
existing file is only replaced by a complete one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Union

PathLike = Union[str, "os.PathLike[str]"]


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(temporary_path)`` to produce the file, then move it onto ``path`` atomically.

    The temporary file is created exclusively (never another writer's), keeps the usual permissions
    (0o666 minus the umask, whatever ``write`` does to it), is fsynced before the rename, and is removed
    if ``write`` raises. The parent directory must exist.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {path!r}: directory {directory!r} does not exist")
    base = os.path.basename(path)
    for attempt in range(100):
        tmp = os.path.join(directory, f".{base}.{os.getpid()}.{attempt}.tmp")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            mode = os.stat(tmp).st_mode & 0o777
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"could not create a temporary file beside {path!r}")
    try:
        write(tmp)
        os.chmod(tmp, mode)  # some writers (safetensors) re-create the file as 0o600
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through atomic_write."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    atomic_write(path, write)
