"""The three command-line apps start the way a fresh machine starts them."""

import importlib
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer


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
    last = subprocess.run(  # the module's last command is registered before `python -m` runs the app
        [sys.executable, "-m", f"cli.{app}", list(typer.main.get_command(_app(app)).commands)[-1], "--help"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert last.returncode == 0 and "Usage:" in last.stdout, last.stderr


def _app(name: str) -> typer.Typer:
    return importlib.import_module(f"cli.{name}").app


_RICH_TAG = re.compile(r"(?<!\\)\[[a-z#/@][^\[\]]*\]")


@pytest.mark.parametrize("app", ["matgen", "textgen", "imagegen"])
def test_cli_help_texts_survive_rich_markup(app: str) -> None:
    """Help is rendered with rich markup, which silently deletes a `[word]` (e.g. "[train] tables")."""
    command = typer.main.get_command(importlib.import_module(f"cli.{app}").app)
    texts: list[tuple[str, str]] = []

    def walk(cmd: click.Command, name: str) -> None:
        texts.append((name, cmd.help or ""))
        texts.extend((f"{name} {p.name}", getattr(p, "help", None) or "") for p in cmd.params)
        for sub_name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{name} {sub_name}")

    walk(command, app)
    assert len(texts) > 10
    eaten = [(where, text) for where, text in texts if _RICH_TAG.search(text)]
    assert not eaten, f"rich would delete bracketed words from: {eaten}"


@pytest.mark.parametrize("app", ["matgen", "textgen", "imagegen"])
@pytest.mark.parametrize("minutes", ["0", "-2", "abc"])
def test_every_train_command_refuses_an_impossible_time_budget(
    app: str, minutes: str, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    module = importlib.import_module(f"cli.{app}")
    result = CliRunner().invoke(module.app, ["train", "--run-dir", str(tmp_path), "--time-budget", minutes])
    assert result.exit_code == 2 and "--time-budget" in result.output
    assert not any(tmp_path.iterdir())  # refused before any work


@pytest.mark.parametrize("app", ["matgen", "textgen", "imagegen"])
def test_every_train_command_documents_the_time_budget(app: str) -> None:
    command = typer.main.get_command(importlib.import_module(f"cli.{app}").app)
    train = command.commands["train"]  # type: ignore[attr-defined]
    option = next(p for p in train.params if p.name == "time_budget")
    assert "minutes" in (option.help or "")


def test_a_ctrl_c_no_command_handles_ends_with_a_line_that_says_so() -> None:
    from typer.testing import CliRunner

    from cli._common import CommandGroup

    for app in ("matgen", "textgen", "imagegen"):
        assert isinstance(typer.main.get_command(importlib.import_module(f"cli.{app}").app), CommandGroup), (
            app
        )
    demo = typer.Typer(cls=CommandGroup)

    @demo.command()
    def slow() -> None:
        raise KeyboardInterrupt

    @demo.command()
    def other() -> None:
        pass

    @demo.command()
    def stopped() -> None:
        from dfm_core.training import TrainingStopped

        print("interrupted at step 8; checkpoint saved")  # what the training loop prints itself
        raise TrainingStopped("stopped at step 8")

    result = CliRunner().invoke(demo, ["slow"])
    assert result.exit_code == 130
    assert result.output.strip().startswith("error: interrupted;"), result.output
    result = CliRunner().invoke(demo, ["stopped"])
    assert result.exit_code == 130 and "error" not in result.output, result.output  # no second message
