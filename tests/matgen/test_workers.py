"""The worker pool of matgen's CPU-side stages."""

import os

from matgen.workers import process_pool


def test_preloaded_pool_starts_every_worker_at_once_and_runs_tasks() -> None:
    pool = process_pool(2, preload=("json",))
    try:
        assert len(pool._processes) == 2  # spawned before any real task (CPython's executor)
        assert sorted(pool.map(abs, [-3, 4])) == [3, 4]
        assert os.getpid() not in set(pool.map(_pid, range(4)))
    finally:
        pool.shutdown(wait=True)


def test_a_plain_pool_starts_workers_on_demand() -> None:
    pool = process_pool(2)
    try:
        assert len(pool._processes) == 0
        assert list(pool.map(abs, [-1])) == [1]
    finally:
        pool.shutdown(wait=True)


def _pid(_: int) -> int:
    return os.getpid()


def _ignores_ctrl_c(_: int) -> bool:
    import signal

    return signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_workers_leave_ctrl_c_to_the_parent() -> None:
    """A Ctrl-C reaches the whole process group: the parent stops the pool, workers print nothing."""
    import signal

    before = signal.getsignal(signal.SIGINT)
    pool = process_pool(2, preload=("json",))
    try:
        assert signal.getsignal(signal.SIGINT) is before  # the parent's handler is back
        assert all(pool.map(_ignores_ctrl_c, range(4)))
    finally:
        pool.shutdown(wait=True)
