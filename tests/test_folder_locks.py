"""Every long job of the Python API runs under its folder's lock, and takes "~" in its folder argument as a
shell does: a second job into the same folder is refused before it does anything."""

import importlib
import inspect
import threading
from pathlib import Path

import pytest

from dfm_core.atomic_io import FolderInUse, folder_lock

LONG_JOBS = [
    ("dfm_core.training", "train", "run_dir"),
    ("matgen.train", "train_crystal_model", "run_dir"),
    ("matgen.generate", "generate", "out_dir"),
    ("matgen.evaluate.pipeline", "evaluate", "out_dir"),
    ("textgen.train", "train_text_model", "run_dir"),
    ("textgen.evaluate", "evaluate", "out_dir"),
    ("imagegen.train", "train_image_model", "run_dir"),
    ("imagegen.train_vq", "train_vqvae", "run_dir"),
    ("imagegen.evaluate", "evaluate_sweep", "out_dir"),
]


def _call_in_other_thread(fn, kwargs: dict) -> BaseException | None:
    """Run ``fn(**kwargs)`` in another thread (refused like another process) and return what it raised."""
    raised: list[BaseException | None] = [None]

    def run() -> None:
        try:
            fn(**kwargs)
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            raised[0] = e

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "the job ran instead of being refused"
    return raised[0]


@pytest.mark.parametrize(("module", "name", "parameter"), LONG_JOBS)
def test_a_second_job_into_a_busy_folder_is_refused(
    module: str, name: str, parameter: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    fn = getattr(importlib.import_module(module), name)
    required = {
        p.name: None
        for p in inspect.signature(fn).parameters.values()
        if p.default is inspect.Parameter.empty and p.kind is not inspect.Parameter.VAR_KEYWORD
    }
    monkeypatch.setenv("HOME", str(tmp_path))
    busy = tmp_path / "busy"
    with folder_lock(busy):
        raised = _call_in_other_thread(fn, {**required, parameter: busy})
        assert isinstance(raised, FolderInUse), f"{module}.{name}: {raised!r}"
        raised = _call_in_other_thread(fn, {**required, parameter: "~/busy"})  # the same folder
        assert isinstance(raised, FolderInUse), f"{module}.{name} with '~': {raised!r}"
    assert not (Path.cwd() / "~").exists()
