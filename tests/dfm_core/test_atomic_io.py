"""Atomic writes: the target holds the old content or the complete new one; no temp file survives."""

import os
from pathlib import Path

import numpy as np
import pytest

from dfm_core.atomic_io import atomic_write, atomic_write_text, check_writable, remove_stale_temps


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "last.pt"
    target.write_text("old")

    def failing(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, failing)
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_interrupt_during_write_leaves_no_temp(tmp_path):
    def interrupted(tmp: Path) -> None:
        tmp.write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "sub" / "x.txt", interrupted)
    assert list((tmp_path / "sub").iterdir()) == []


def test_permissions_match_a_plain_write(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = atomic_write_text(tmp_path / "atomic.txt", "x")
    assert atomic.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


@pytest.mark.parametrize("durable", [True, False])
def test_text_round_trips_and_replaces(tmp_path, durable):
    target = tmp_path / "a" / "b.cif"
    atomic_write_text(target, "first", durable=durable)
    atomic_write_text(target, "données ✓", durable=durable)
    assert target.read_text(encoding="utf-8") == "données ✓"
    assert [p.name for p in target.parent.iterdir()] == ["b.cif"]


def test_a_text_write_that_fails_midway_keeps_the_old_file(tmp_path, monkeypatch):
    import dfm_core.atomic_io as atomic_io

    target = tmp_path / "crystal.cif"
    target.write_text("old")
    real_write = os.write
    calls = []

    def short_then_full_disk(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[:3]))  # a short write: the rest must follow
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic_io.os, "write", short_then_full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(target, "new content")
    assert calls == [11, 8]
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_suffix_keeps_numpy_from_renaming_the_temp(tmp_path):
    target = tmp_path / "stats.npz"
    atomic_write(target, lambda tmp: np.savez(tmp, mu=np.arange(3)), suffix=".npz")
    with np.load(target) as d:
        assert d["mu"].tolist() == [0, 1, 2]
    assert os.listdir(tmp_path) == ["stats.npz"]


def test_a_writer_that_makes_private_files_still_gives_plain_permissions(tmp_path):
    """safetensors' save_file (and mkstemp) create 0600 files; the result must not be private."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")

    def private(tmp: Path) -> None:
        tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"x")
        os.close(fd)

    made = atomic_write(tmp_path / "model.safetensors", private)
    assert made.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_stale_temps_of_dead_processes_are_removed(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".last.pt.{dead_pid}.0123abcd.tmp"
    mine = tmp_path / f".best.pt.{os.getpid()}.89abcdef.tmp"
    keep = tmp_path / ".hidden_config"
    for p in (stale, mine, keep):
        p.write_text("x")
    atomic_write_text(tmp_path / "last.pt", "complete")
    other = tmp_path / f".grid.png.{dead_pid}.0123abcd.png"  # a dead temp of another file
    other.write_text("x")
    assert remove_stale_temps(tmp_path, target="last.pt") == 1  # only that file's temps
    assert not stale.exists() and mine.exists() and keep.exists() and other.exists()
    assert (tmp_path / "last.pt").read_text() == "complete"
    assert remove_stale_temps(tmp_path) == 1 and not other.exists()


def test_check_writable_names_the_problem(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="is a folder"):
        check_writable(tmp_path, "--out")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_writable(tmp_path / "a_file", "--out", folder=True)
    with pytest.raises(ValueError, match="lies under .*a_file, which is a file"):
        check_writable(tmp_path / "a_file" / "deeper" / "x.png", "--out")
    assert check_writable(tmp_path / "new" / "sub" / "x.png") == tmp_path / "new" / "sub" / "x.png"
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_result_log_survives_reopening_and_drops_a_torn_line(tmp_path: Path) -> None:
    from dfm_core.atomic_io import ResultLog

    path = tmp_path / "cells.jsonl"
    log = ResultLog(path)
    assert len(log) == 0 and log.get({"a": 1}) is None
    log.add({"a": 1, "b": "x"}, {"value": 1.5})
    log.add({"a": 2}, [1, 2])
    log.add({"a": 2}, [3])  # the last result for a key wins
    with open(path, "a") as f:
        f.write("not json\n")  # someone else's line: ignored
        f.write('{"key": {"a": 3}, "res')  # a write cut short by a kill
    again = ResultLog(path)
    assert again.get({"b": "x", "a": 1}) == {"value": 1.5}  # key order does not matter
    assert again.get({"a": 2}) == [3] and again.get({"a": 3}) is None and len(again) == 2
    assert path.read_text().endswith("\n")  # the torn line is gone, so the next line starts cleanly
    again.add({"a": 3}, 7)
    assert ResultLog(path).get({"a": 3}) == 7


def test_visible_files_skip_hidden_names_and_follow_a_symlink_loop_once(tmp_path: Path) -> None:
    from dfm_core.atomic_io import visible_files

    (tmp_path / "a" / "skip").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    for rel in ("b.CIF", "a/c.cif.gz", "a/skip/d.cif", ".git/e.cif", "a/._f.cif", "a/g.txt"):
        (tmp_path / rel).write_text("x")
    (tmp_path / "a" / "loop").symlink_to(tmp_path)  # a loop back to the top
    found = list(visible_files(tmp_path, (".cif", ".cif.gz"), skip_dir=lambda d: d.name == "skip"))
    assert sorted(p.relative_to(tmp_path).as_posix() for p in found) == ["a/c.cif.gz", "b.CIF"]


def test_visible_files_do_not_follow_a_link_above_the_folder(tmp_path: Path) -> None:
    """``data/up -> ..`` read every folder beside ``data`` (other data sets, runs) as if inside it."""
    from dfm_core.atomic_io import visible_files

    data, beside = tmp_path / "data", tmp_path / "beside"
    data.mkdir()
    beside.mkdir()
    (data / "a.txt").write_text("x")
    (beside / "b.txt").write_text("x")
    (data / "0up").symlink_to(tmp_path)  # walked first: "beside" is not yet seen through "other"
    (data / "self").symlink_to(data)
    (data / "other").symlink_to(beside)  # a link sideways is a folder of the data set: followed
    found = sorted(p.relative_to(data).as_posix() for p in visible_files(data, ("",)))
    assert found == ["a.txt", "other/b.txt"]


def test_a_folder_lock_refuses_a_second_run_and_dies_with_its_holder(tmp_path):
    """Two runs into one folder: the second is refused with the holder's pid; a SIGKILLed holder leaves no
    stale lock; the lock file goes with the run, and a folder made only for a refused run is removed."""
    import signal
    import subprocess
    import sys

    from dfm_core.atomic_io import LOCK_NAME, FolderInUse, folder_lock, holds_folder_lock

    run = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom dfm_core.atomic_io import folder_lock\n"
            "with folder_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(60)\n",
            str(run),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(
            FolderInUse, match=rf"folder {run} is in use by another run \(pid {holder.pid} on"
        ):
            with folder_lock(run):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with folder_lock(run) as locked:  # the kernel dropped the dead holder's lock
        assert (locked / LOCK_NAME).read_text().startswith(f"pid {os.getpid()} ")
        with folder_lock(run / "."):  # re-entrant in one process (an app around the library's loop)
            pass
        assert (locked / LOCK_NAME).is_file()  # the inner exit does not drop the outer lock
    assert not (run / LOCK_NAME).exists()

    @holds_folder_lock("out", "output folder")
    def refuse(out, n):
        raise ValueError("a bad flag, found before anything is written")

    with pytest.raises(ValueError, match="a bad flag"):
        refuse(tmp_path / "new" / "sub" / "out", n=1)
    assert not (tmp_path / "new").exists()  # no empty folder left behind, parents included

    import threading

    refused = []

    def other_thread() -> None:
        try:
            with folder_lock(run):
                pass
        except FolderInUse as e:
            refused.append(str(e))

    with folder_lock(run):  # another thread of this process is refused like another process
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
    assert len(refused) == 1 and "in use by another run" in refused[0]
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        refuse(tmp_path / "f.txt", n=1)


def test_a_file_system_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch):
    """Some cluster scratch file systems are mounted without flock (ENOSYS): runs must still work there."""
    import errno
    import fcntl

    from dfm_core.atomic_io import LOCK_NAME, folder_lock

    def no_flock(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.warns(UserWarning, match="has no file locks"):
        with folder_lock(tmp_path / "run") as folder:
            (folder / "last.pt").write_text("x")
            assert not (folder / LOCK_NAME).exists()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["last.pt"]


def test_visible_files_reads_a_linked_file_once(tmp_path):
    """A link beside the file it points to (or two links to one file elsewhere) is one file, not two:
    the plain file is kept, and one warning names what was skipped."""
    from dfm_core.atomic_io import visible_files

    folder, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    (folder / "z.cif").write_text("z")
    (folder / "a_link.cif").symlink_to(folder / "z.cif")  # sorts first, but the plain file is kept
    (elsewhere / "out.cif").write_text("o")
    (folder / "m1.cif").symlink_to(elsewhere / "out.cif")
    (folder / "m2.cif").symlink_to(elsewhere / "out.cif")
    (folder / "gone.cif").symlink_to(tmp_path / "missing.cif")  # dangling: kept, its reader says why
    with pytest.warns(UserWarning, match=r"skipped 2 file\(s\) that link to a file read already"):
        names = [p.name for p in visible_files(folder, (".cif",))]
    assert names == ["gone.cif", "m1.cif", "z.cif"]
