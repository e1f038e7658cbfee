"""Flags that the three apps share are checked the same way, before any data is loaded or work done."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from cli_assert import one_line_error
from typer.testing import CliRunner

from cli._common import check_alpha_flag, export_path, float_list, int_list, name_list

runner = CliRunner()


def test_lists_refuse_empty_items_and_name_the_flag() -> None:
    assert int_list("4, 8,16", "--nfe") == [4, 8, 16]
    assert float_list("0,0.5, 2", "--corrector") == [0.0, 0.5, 2.0]
    assert name_list("ko, power-inf", "--velocity") == ["ko", "power-inf"]
    for bad in ("4,,8", "8,", ",8", "", " "):
        with pytest.raises(ValueError, match="--nfe.*empty item"):
            int_list(bad, "--nfe")
    with pytest.raises(ValueError, match="--corrector.*'x'"):
        float_list("0,x", "--corrector")
    with pytest.raises(ValueError, match="--velocity.*empty item"):
        name_list("ko,", "--velocity")


def test_alpha_is_refused_without_the_power_velocity() -> None:
    check_alpha_flag("power", 2.0)
    check_alpha_flag(["ko", "power"], 2.0)  # a sweep: alpha applies to its power settings
    check_alpha_flag("ko", None)
    for velocity in ("ko", ["ko", "power-inf"], "power-inf"):
        with pytest.raises(ValueError, match="--alpha applies to --velocity power"):
            check_alpha_flag(velocity, 2.0)


def test_export_path_refuses_folders(tmp_path: Path) -> None:
    assert export_path(None) is None
    assert export_path(str(tmp_path / "m.safetensors")) == tmp_path / "m.safetensors"
    for bad in (str(tmp_path / "new") + "/", str(tmp_path)):
        with pytest.raises(ValueError, match="--export"):
            export_path(bad)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("app_name", ["matgen", "textgen", "imagegen"])
def test_train_checks_run_dir_and_export_before_loading_data(
    app_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = importlib.import_module(f"cli.{app_name}").app
    # no data anywhere: a check that ran after loading data would fail on the data instead
    monkeypatch.setenv("MATGEN_DATA", str(tmp_path / "none"))
    monkeypatch.setenv("TEXTGEN_DATA", str(tmp_path / "none"))
    monkeypatch.setenv("IMAGEGEN_DATA", str(tmp_path / "none"))
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep me")
    result = runner.invoke(app, ["train", "--run-dir", str(a_file), "--steps", "1", "--quiet"])
    one_line_error(result, "--run-dir", "is a file")
    assert a_file.read_text() == "keep me"
    folder_export = str(tmp_path / "weights") + "/"
    result = runner.invoke(
        app,
        ["train", "--run-dir", str(tmp_path / "run"), "--export", folder_export, "--steps", "1", "--quiet"],
    )
    one_line_error(result, "--export", "folder")
    assert not (tmp_path / "weights").exists()


@pytest.mark.parametrize(
    ("app_name", "command"),
    [("textgen", "sample"), ("textgen", "evaluate"), ("imagegen", "sample"), ("imagegen", "evaluate")],
)
def test_sampling_commands_refuse_alpha_without_power(app_name: str, command: str, tmp_path: Path) -> None:
    app = importlib.import_module(f"cli.{app_name}").app
    args = [command, "--checkpoint", str(tmp_path / "missing.safetensors"), "--alpha", "2"]
    if command == "evaluate":
        args += ["--out", str(tmp_path / "eval")]
    # refused before the checkpoint is even opened (it does not exist)
    one_line_error(runner.invoke(app, args), "--alpha", "power")


@pytest.mark.parametrize("load_cli", [False, True])
def test_library_source_warnings_stay_off_the_terminal(load_cli: bool) -> None:
    """A library's own bad escape sequence (nvidia-ml-py3 under chgnet, on Python 3.12) printed a bare
    "warning: invalid escape sequence" from every `matgen evaluate`; the CLIs drop it, and only that."""
    import subprocess
    import sys

    code = "import cli._common; " if load_cli else ""
    code += "import warnings; compile(\"x = '\\\\A'\", 'lib.py', 'exec'); warnings.warn('kept')"
    run = subprocess.run(
        [sys.executable, "-W", "always", "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        check=True,
    )
    assert "kept" in run.stderr
    assert ("invalid escape sequence" in run.stderr) is not load_cli


@pytest.mark.parametrize(
    ("module", "args"),
    [
        ("cli.matgen", ["evaluate", "{cif}", "--skip-stability", "--out"]),
        ("cli.imagegen", ["evaluate", "--checkpoint", "{ckpt}", "--out"]),
        ("cli.imagegen", ["sample", "--checkpoint", "{ckpt}", "--out", "{png}", "--images-dir"]),
        ("cli.textgen", ["evaluate", "--checkpoint", "{ckpt}", "--out"]),
        ("cli.matgen", ["train", "--steps", "1", "--run-dir"]),
        ("cli.textgen", ["train", "--steps", "1", "--run-dir"]),
        ("cli.imagegen", ["train", "--steps", "1", "--run-dir"]),
        ("cli.imagegen", ["train-vq", "--steps", "1", "--run-dir"]),
    ],
)
def test_an_empty_output_folder_is_refused_not_taken_for_the_current_folder(
    module: str, args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--out "$DIR"`` with DIR unset gave Path(""), the current folder: evaluations wrote their tables,
    plots and journal there (and cleaned its stale files)."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "x.cif").write_text("data_x\n")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "report.md").write_text("mine\n")
    monkeypatch.chdir(cwd)
    fill = {
        "{cif}": str(inputs / "x.cif"),
        "{ckpt}": str(inputs / "m.safetensors"),
        "{png}": str(inputs / "g.png"),
    }
    argv = [fill.get(a, a) for a in args]
    result = runner.invoke(importlib.import_module(module).app, [*argv, ""])
    one_line_error(result, "is empty")
    assert sorted(p.name for p in cwd.iterdir()) == ["report.md"]


@pytest.mark.parametrize(
    ("app_name", "command"),
    [
        ("matgen", "train"),
        ("matgen", "generate"),
        ("matgen", "evaluate"),
        ("textgen", "train"),
        ("textgen", "sample"),
        ("textgen", "evaluate"),
        ("textgen", "prepare"),
        ("imagegen", "train"),
        ("imagegen", "train-vq"),
        ("imagegen", "sample"),
        ("imagegen", "evaluate"),
    ],
)
def test_every_long_command_takes_quiet(app_name: str, command: str) -> None:
    """One flag turns the progress bars off everywhere (matgen evaluate also keeps its --no-progress)."""
    app = importlib.import_module(f"cli.{app_name}").app
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--quiet" in result.output, result.output


def test_running_out_of_memory_is_one_line_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """torch's CPU allocator (and CUDA) raise a RuntimeError with a page of text when a batch does not fit:
    the command says so in one line with what to change; any other RuntimeError is not disguised."""
    import torch

    import matgen.generate

    app = importlib.import_module("cli.matgen").app
    args = ["generate", "--n", "2", "--out", str(tmp_path / "g"), "--quiet"]
    for error in (
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
            "you tried to allocate 214748364800 bytes.\nmore lines"
        ),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    ):

        def no_memory(*a, _error=error, **k):
            raise _error

        monkeypatch.setattr(matgen.generate, "generate", no_memory)
        result = runner.invoke(app, args)
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert (
            len(lines) == 1 and lines[0].startswith("error: out of memory (") and "--batch-size" in lines[0]
        )
        assert "more lines" not in lines[0]

    def truncated(*a, **k):  # click turns an EOFError into a bare "Aborted."
        raise EOFError("Compressed file ended before the end-of-stream marker was reached")

    monkeypatch.setattr(matgen.generate, "generate", truncated)
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "Aborted" not in result.output, result.output
    assert result.output.startswith("error: a file ended too early") and "end-of-stream" in result.output

    def other(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(matgen.generate, "generate", other)
    result = runner.invoke(app, args)
    assert isinstance(result.exception, RuntimeError) and str(result.exception) == "a bug"
