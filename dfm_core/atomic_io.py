"""Atomic file writes: a reader (or a restarted run) sees the old file or the complete new one, never half.

Every app writes its checkpoints, caches, CIFs and tables through these two functions: the content goes to a
hidden temp file beside the target, is flushed to disk, and is then renamed over the target (``os.replace``
is atomic on POSIX and Windows). The temp file is created with mode 0666 minus the umask, so the result has
the permissions of a plain ``open(path, "w")``, whatever mode the writer callback chose.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text"]


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
