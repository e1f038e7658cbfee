"""Worker processes for CPU-side work (CIF decoding and writing, fingerprints, CHGNet graphs).

Workers are spawned (safe with CUDA and threads in the parent) and exit on their own when the parent dies:
a parent killed with SIGKILL cannot shut its pool down, and its workers would otherwise wait on their
task pipe forever.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

__all__ = ["process_pool"]

PARENT_POLL_S = 1.0


def _exit_when_orphaned(parent_pid: int) -> None:
    """Pool initializer: a daemon thread that ends the worker once its parent is gone; Ctrl-C is left to
    the parent (which stops the pool), so a worker prints no traceback of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while True:
            time.sleep(PARENT_POLL_S)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def _import_modules(modules: tuple[str, ...]) -> None:
    for name in modules:
        importlib.import_module(name)


def process_pool(workers: int, preload: Sequence[str] = ()) -> ProcessPoolExecutor:
    """A spawn-context pool of ``workers`` processes that do not outlive this process.

    With ``preload``, all workers start at once and import those modules (pymatgen takes seconds), so
    the start-up overlaps the caller's own work (e.g. GPU sampling) instead of delaying the first task.
    """
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=mp.get_context("spawn"),
        initializer=_exit_when_orphaned,
        initargs=(os.getpid(),),
    )
    if preload:
        with _sigint_ignored():  # the spawned interpreters start with Ctrl-C ignored (it is the parent's)
            for _ in range(workers):  # each submit while no worker is idle spawns another process
                pool.submit(_import_modules, tuple(preload))
    return pool


@contextlib.contextmanager
def _sigint_ignored():
    """SIGINT ignored while processes are spawned from the main thread (they inherit it through exec)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
