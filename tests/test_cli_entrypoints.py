"""The three command-line apps start the way a fresh machine starts them."""

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("app", ["matgen", "textgen", "imagegen"])
def test_cli_modules_run_with_python_m(app: str) -> None:
    """`python -m cli.<app>` works where the console scripts are not installed (e.g. a GPU machine)."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", f"cli.{app}", "--version"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(app)
