"""Atomic file writes: a reader (or a restarted run) sees the old file or the complete new one, never half.

Every app writes its checkpoints, caches, CIFs and tables through these two functions: the content goes to a
hidden temp file beside the target, is flushed to disk, and is then renamed over the target (``os.replace``
is atomic on POSIX and Windows). The temp file is created with mode 0666 minus the umask, so the result has
the permissions of a plain ``open(path, "w")``, whatever mode the writer callback chose.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text", "remove_stale_temps"]

_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}(\.\w+)*$")


def atomic_write(
    path: str | os.PathLike, write: Callable[[Path], object], *, suffix: str = ".tmp", durable: bool = True
) -> Path:
    """Call ``write(tmp)`` to fill a temp file next to ``path``, then rename it onto ``path``.

    ``suffix`` ends the temp name (``np.savez`` appends ``.npz`` to a name without it, so pass ``".npz"``).
    ``durable`` fsyncs the data before the rename, so that a power cut cannot leave an empty file behind.
    If ``write`` raises (or the process is interrupted), the target is untouched and the temp file removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # reserve the name; umask applies
    mode = tmp.stat().st_mode & 0o777  # the mode of a plain write; some writers (safetensors) make 0600
    try:
        write(tmp)
        os.chmod(tmp, mode)
        if durable:
            fd = os.open(tmp, os.O_RDWR)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, durable: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`atomic_write`."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), durable=durable)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_temps(folder: str | os.PathLike) -> int:
    """Delete temp files that :func:`atomic_write` left in ``folder`` when its process was killed
    (SIGKILL, power cut); temp files of live processes are kept. Returns how many were removed."""
    removed = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for entry in os.scandir(folder):
        match = _TEMP_NAME.match(entry.name) if entry.name.startswith(".") else None
        if match and entry.is_file() and not _alive(int(match["pid"])):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
    return removed
