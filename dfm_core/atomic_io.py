"""Atomic file writes: a reader (or a restarted run) sees the old file or the complete new one, never half.

Every app writes its checkpoints, caches, samples and tables through :func:`atomic_write`: the content goes to a
hidden temp file beside the target, is flushed to disk, and is then renamed over the target (``os.replace``
is atomic on POSIX and Windows). The temp file is created with mode 0666 minus the umask, so the result has
the permissions of a plain ``open(path, "w")``, whatever mode the writer callback chose.

Beside the writers: the file helpers the apps share (:func:`check_writable`, :func:`file_sha256`,
:func:`visible_files`, :class:`ResultLog`), and :func:`folder_lock` / :func:`holds_folder_lock`, which keep
two runs from writing into one folder at once.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import inspect
import json
import os
import re
import socket
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "LOCK_NAME",
    "FolderInUse",
    "ResultLog",
    "atomic_write",
    "atomic_write_text",
    "check_writable",
    "file_sha256",
    "folder_lock",
    "hidden_name",
    "holds_folder_lock",
    "remove_stale_temps",
    "user_cache_dir",
    "visible_files",
    "visible_files_warning_others",
]

_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}(\.\w+)*$")


_NAME_MAX = 255  # bytes in one file name on most file systems; os.pathconf tells the others
_PATH_MAX = 4096  # bytes in a path (with its end) that Linux system calls take


def _name_max(folder: Path) -> int:
    """The longest file name (in bytes) that ``folder``'s file system takes; 255 where it cannot say."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # a folder not made yet; Windows has no pathconf
        return _NAME_MAX


def _temp_beside(path: Path, suffix: str) -> Path:
    """A hidden, unique temp name next to ``path`` (:func:`remove_stale_temps` recognises it). A target
    name near the file system's limit is shortened in the temp name, which would otherwise not fit."""
    name, tail = path.name, f".{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}"
    if len(os.fsencode(name)) + len(tail) + 1 > 128:  # long: ask the file system what fits
        room = min(_NAME_MAX, _name_max(path.parent)) - len(tail) - 1
        while len(os.fsencode(name)) > room:
            name = name[:-1]
    return path.with_name(f".{name}{tail}")


@contextlib.contextmanager
def _removed_on_failure(tmp: Path) -> Iterator[None]:
    """Delete ``tmp`` if the block raises (or is interrupted), then re-raise."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


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
    tmp = _temp_beside(path, suffix)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # reserve the name; umask applies
    mode = tmp.stat().st_mode & 0o777  # the mode of a plain write; some writers (safetensors) make 0600
    with _removed_on_failure(tmp):
        write(tmp)
        os.chmod(tmp, mode)
        if durable:
            fd = os.open(tmp, os.O_RDWR)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, durable: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`atomic_write`.

    The same guarantees in fewer system calls (create, write, [fsync,] close, rename): for an app that
    writes thousands of small files, where the callback version's extra open, stat and chmod showed.
    """
    path = Path(path)
    data = text.encode("utf-8")
    tmp = _temp_beside(path, ".tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(tmp, flags, 0o666)  # mode 0666 minus the umask, as a plain open(path, "w")
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, flags, 0o666)
    with _removed_on_failure(tmp):
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    return path


def check_writable(path: str | os.PathLike, what: str = "output", folder: bool = False) -> Path:
    """Fail now, before any long work, if ``path`` (a file, or a folder with ``folder=True``) cannot be
    written: a folder where a file is wanted (or the reverse), a path under a file, or no permission
    (probed by creating and removing a nameless temp file in the nearest existing folder).

    Raises:
        ValueError: naming ``what`` and the path.
    """
    path = Path(path).expanduser()
    exists = os.path.exists(path)  # False, not an OSError, for a name too long: refused below
    if exists and path.is_dir() != folder:
        if folder:
            raise ValueError(f"{what} {path} is a file, not a folder")
        raise ValueError(f"{what} {path} is a folder; give a file name inside it or elsewhere")
    target_dir = path if folder else path.parent
    ancestor = next((p for p in (target_dir, *target_dir.parents) if os.path.exists(p)), Path.cwd())
    if not ancestor.is_dir():
        raise ValueError(f"{what} {path} lies under {ancestor}, which is a file")
    limit, shown = _name_max(ancestor), str(path) if len(str(path)) <= 100 else f"{str(path)[:60]}..."
    for part in (path, *path.parents):  # the names still to be made
        if part == ancestor:
            break
        if len(os.fsencode(part.name)) > limit:
            raise ValueError(
                f"{what} {shown} cannot be written: a name in it is {len(os.fsencode(part.name))} bytes "
                f"long, and the file system takes at most {limit}"
            )
    if len(os.fsencode(os.path.abspath(path))) >= _PATH_MAX:
        raise ValueError(f"{what} {shown} cannot be written: the path is longer than {_PATH_MAX - 1} bytes")
    if exists and not folder and not os.access(path, os.W_OK):
        raise ValueError(f"{what} {path} cannot be written: no write permission")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path} cannot be written: no write permission in {ancestor}")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as e:
        raise ValueError(f"{what} {path} cannot be written in {ancestor}: {e.strerror or e}") from None
    return path


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


def remove_stale_temps(folder: str | os.PathLike, target: str | None = None) -> int:
    """Delete temp files that :func:`atomic_write` left in ``folder`` when its process was killed
    (SIGKILL, power cut); temp files of live processes are kept. With ``target`` (a file name), only the
    temps of that file: for a folder of the user's own, where one output of ours is written. Returns how
    many were removed."""
    removed = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for entry in os.scandir(folder):
        match = _TEMP_NAME.match(entry.name) if entry.name.startswith(".") else None
        if match and target is not None and not target.startswith(match["target"]):  # (a long name is cut)
            continue
        if match and entry.is_file() and not _alive(int(match["pid"])):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
    return removed


def user_cache_dir(app: str, env_var: str | None = None) -> Path:
    """An app's cache folder: ``$<env_var>`` when set, else ``$XDG_CACHE_HOME/<app>`` (``~/.cache/<app>``).
    It need not exist yet."""
    env = os.environ.get(env_var) if env_var else None
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / app


LOCK_NAME = ".lock"  # in a folder a run writes into: holds the pid, host and start time of the holder


class FolderInUse(ValueError):
    """Another run (another process) is writing into the folder."""


_HELD: dict[tuple[str, int], int] = {}  # (folder, thread) holding its lock -> nesting depth (re-entrant)
_HELD_LOCK = threading.Lock()
_NO_FLOCK = (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "folder") -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (created if needed) while a run writes into it.

    A second run into the same folder fails at once with :class:`FolderInUse`, naming the holder,
    instead of interleaving its files with the first one's (duplicate rows, a mismatched export). The
    lock is an ``flock`` on ``folder/.lock``, so the operating system releases it when its process dies,
    even by SIGKILL: a stale lock never blocks a resume. The file is removed on release (and a folder
    the lock created that nothing else wrote to, and its new parents, too). The lock is re-entrant within
    one thread (an app's training holds it around the library loop it calls); another thread is refused. Where there is no ``flock`` (Windows, or a file
    system mounted without it, as some cluster scratch spaces are) the run goes on unlocked, with a
    warning in the second case.
    """
    path = check_writable(folder, what, folder=True)
    created = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
    path.mkdir(parents=True, exist_ok=True)
    key = (os.path.realpath(path), threading.get_ident())  # another thread is refused like another process
    with _HELD_LOCK:
        depth = _HELD.get(key, 0)
        if depth:  # this process holds it already (an app's run around the library call it makes)
            _HELD[key] = depth + 1
    if depth:
        try:
            yield path
        finally:
            with _HELD_LOCK:
                _HELD[key] -= 1
        return
    lock_path = path / LOCK_NAME
    handle = None
    try:
        handle = _locked_handle(path, lock_path, what)
        if handle is not None:
            handle.seek(0)
            handle.truncate()
            handle.write(
                f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
            )
            handle.flush()
        with _HELD_LOCK:
            _HELD[key] = 1
        try:
            yield path
        finally:
            with _HELD_LOCK:
                del _HELD[key]
    finally:
        if handle is not None:
            with contextlib.suppress(OSError):
                lock_path.unlink()  # while still locked, so no one locks the file we are about to drop
            handle.close()
        for folder_made in created:  # only while empty: a run refused before writing leaves no folders
            try:
                folder_made.rmdir()
            except OSError:
                break


def _locked_handle(path: Path, lock_path: Path, what: str):  # -> an open file holding the flock, or None
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    while True:  # a holder may remove the file between our open and our lock: lock the file that is there
        handle = open(lock_path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise FolderInUse(
                f"{what} {path} is in use by another run ({holder}); wait for it to finish, or use another folder"
            ) from None
        except OSError as e:
            handle.close()
            if e.errno not in _NO_FLOCK:
                raise
            with contextlib.suppress(OSError):
                lock_path.unlink()
            warnings.warn(
                f"the file system of {path} has no file locks ({e.strerror}): nothing stops two runs from "
                "writing into it at once",
                stacklevel=4,
            )
            return None
        try:
            same = os.path.samestat(os.fstat(handle.fileno()), os.stat(lock_path))
        except FileNotFoundError:
            same = False
        if same:
            return handle
        handle.close()


def holds_folder_lock(parameter: str, what: str = "folder") -> Callable:
    """Decorate a function so that it runs under :func:`folder_lock` of its argument ``parameter`` (no
    lock when that argument is ``None``; a leading ``~`` is expanded first). The wrapper adds one frame: a
    warning raised in the decorated function names its caller with a ``stacklevel`` one higher than
    without the decorator."""

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            folder = bound.arguments.get(parameter)
            if folder is None:
                return fn(*args, **kwargs)
            if str(folder).startswith("~"):  # "~/runs/x" from Python as from a shell, not a folder named "~"
                bound.arguments[parameter] = folder = Path(folder).expanduser()
                args, kwargs = bound.args, bound.kwargs
            with folder_lock(folder, what):
                return fn(*args, **kwargs)

        return locked

    return decorate


def hidden_name(name: str) -> bool:
    """A name the file walkers skip: dot files and folders (macOS ``._x`` resource forks, ``.git``) and
    ``__MACOSX``."""
    return name.startswith(".") or name == "__MACOSX"


def visible_files(
    folder: str | os.PathLike, suffixes: tuple[str, ...], skip_dir: Callable[[Path], bool] | None = None
) -> Iterator[Path]:
    """Files under ``folder`` whose lower-cased name ends in one of ``suffixes`` (``("",)``: every file),
    sorted per directory; hidden names (:func:`hidden_name`) and folders for which ``skip_dir`` is true
    are skipped. A symlinked folder is followed once (a folder linked twice is read once), and one that
    links back to ``folder`` or above it is not followed: it would read the folders beside ``folder``.
    Likewise a file is read once: a link to a file that is listed too is skipped (with one warning)."""
    found = [(p, os.path.realpath(p), p.is_symlink()) for p in _walk_visible(folder, suffixes, skip_dir)]
    plain = {real for _, real, link in found if not link}
    seen: set[str] = set()
    repeats: list[tuple[Path, str]] = []
    for path, real, link in found:
        if real in seen or (link and real in plain):
            repeats.append((path, real))
            continue
        seen.add(real)
        yield path
    if repeats:
        path, real = repeats[0]
        warnings.warn(
            f"{folder}: skipped {len(repeats)} file(s) that link to a file read already (e.g. {path} -> {real}); "
            "each file is read once",
            stacklevel=1,  # one place: a folder listed twice (cache key, then reading) warns once
        )


def _walk_visible(
    folder: str | os.PathLike, suffixes: tuple[str, ...], skip_dir: Callable[[Path], bool] | None
) -> Iterator[Path]:
    """The walk of :func:`visible_files`, links to files included."""
    top = os.path.realpath(folder)

    def links_up(d: Path) -> bool:
        if not d.is_symlink():
            return False
        real = os.path.realpath(d)
        return top == real or top.startswith(real.rstrip(os.sep) + os.sep)

    visited: set[str] = set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in visited:
            dirs[:] = []
            continue
        visited.add(real)
        dirs[:] = sorted(
            d
            for d in dirs
            if not hidden_name(d)
            and not links_up(Path(root) / d)
            and not (skip_dir is not None and skip_dir(Path(root) / d))
        )
        for name in sorted(names):
            if not hidden_name(name) and name.lower().endswith(suffixes):
                yield Path(root) / name


def visible_files_warning_others(
    folder: str | os.PathLike,
    suffixes: tuple[str, ...],
    what: str,
    skip_dir: Callable[[Path], bool] | None = None,
) -> list[Path]:
    """:func:`visible_files` with ``suffixes``, sorted; the other visible files (notes, archives, ...) are
    not dropped silently: one warning counts them, names their kinds and one example, and says which
    ``what`` files are read."""
    files, others = [], []
    for p in visible_files(folder, ("",), skip_dir):  # "": every visible file, to count the others
        (files if p.name.lower().endswith(suffixes) else others).append(p)
    if others:
        kinds = sorted({p.suffix.lower() or p.name for p in others})
        warnings.warn(
            f"{folder}: skipped {len(others)} file(s) that are not {what} by name ({', '.join(kinds[:6])}"
            f"{', ...' if len(kinds) > 6 else ''}; e.g. {others[0]}); read are {', '.join(suffixes)}",
            stacklevel=1,  # one place: a folder listed twice (cache key, then reading) warns once
        )
    return sorted(files)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, read in blocks: the identity of a checkpoint or a data file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


class ResultLog:
    """Finished pieces of a long job, kept in a JSON-lines file so that a killed run resumes.

    Each line is ``{"key": ..., "result": ...}``; :meth:`add` appends one and syncs it to disk before it
    returns. A key is any JSON-serialisable mapping that fixes what the result depends on (inputs'
    digests and settings), so a rerun with other settings recomputes instead of reusing. A torn last line
    (a run killed mid-write) is dropped when the log is opened; for a repeated key the last line wins.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._results: dict[str, Any] = {}
        if not self.path.exists():
            return
        text = self.path.read_text(encoding="utf-8", errors="replace")
        whole = text[: text.rfind("\n") + 1]
        for line in whole.splitlines():
            try:
                entry = json.loads(line)
                self._results[self._text(entry["key"])] = entry["result"]
            except (ValueError, KeyError, TypeError):
                continue  # not one of ours: ignored
        if whole != text:
            atomic_write_text(self.path, whole)

    @staticmethod
    def _text(key: Mapping[str, Any]) -> str:
        return json.dumps(key, sort_keys=True)

    def __len__(self) -> int:
        return len(self._results)

    def get(self, key: Mapping[str, Any]) -> Any | None:
        """The result stored under ``key``, or None."""
        return self._results.get(self._text(key))

    def add(self, key: Mapping[str, Any], result: Any) -> None:
        """Store ``result`` under ``key`` (appended and fsynced: it survives a kill right after)."""
        line = json.dumps({"key": key, "result": result}, sort_keys=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._results[self._text(key)] = json.loads(line)["result"]
