"""Runs stopped half way (Ctrl-C, SIGTERM, SIGKILL) and run again: what is kept, redone and said."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from cli.textgen import app

runner = CliRunner()


def _stale_temp(folder: Path, target: str) -> Path:
    """A hidden temp file as `atomic_write` leaves it when its process is killed mid-write."""
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()  # its id is that of a process that has ended
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".{target}.{done.pid}.0123abcd.tmp"
    path.write_text("half a file")
    return path


def test_a_rerun_into_a_used_run_dir_says_that_it_resumed(
    tiny_corpus: Path, tokenizer_dir: Path, tmp_path: Path
):
    run_dir = tmp_path / "run"
    args = ["train", "--run-dir", str(run_dir), "--size", "tiny", "--seq-len", "8", "--batch-size", "1"]
    args += ["--eval-every", "0", "--ckpt-every", "1", "--device", "cpu", "--data", str(tiny_corpus)]
    args += ["--tokenizer", str(tokenizer_dir), "--quiet"]
    first = runner.invoke(app, [*args, "--steps", "1"])
    assert first.exit_code == 0 and "resumed" not in first.output, first.output
    more = runner.invoke(app, [*args, "--steps", "2"])
    assert more.exit_code == 0, more.output
    assert (
        f"resumed from step 1 of {run_dir / 'last.pt'}" in more.output and "trained to step 2" in more.output
    )
    same = runner.invoke(app, [*args, "--steps", "2"])
    assert same.exit_code == 0 and "at step 2 already: nothing to train" in same.output, same.output


def test_evaluate_removes_the_temp_files_a_killed_run_left(
    tiny_run: Path, tiny_corpus: Path, tokenizer_dir: Path, tmp_path: Path
):
    out = tmp_path / "eval"
    stale = _stale_temp(out, "report.json")
    args = ["evaluate", "--checkpoint", str(tiny_run / "model.safetensors"), "--out", str(out)]
    args += ["--datasets", f"a={tiny_corpus}", "--limit", "2", "--points", "4", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--tokenizer", str(tokenizer_dir), "--quiet"])
    assert result.exit_code == 0, result.output
    assert not stale.exists()
    assert sorted(p.name for p in out.iterdir()) == ["cells.jsonl", "likelihood.csv", "report.json"]
