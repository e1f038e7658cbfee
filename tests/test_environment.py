"""The command-line apps on machines and terminals their authors did not use: an ASCII-only stdout, a narrow
terminal, and a quick ``--help`` that does not load torch."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cli._common import _tolerate_unencodable_output

REPO_ROOT = Path(__file__).resolve().parents[1]
APPS = ["matgen", "textgen", "imagegen"]


def _every_help(app: str, **env: str) -> subprocess.CompletedProcess:
    """A fresh interpreter that prints ``--help`` of the app and of each of its commands, then says
    whether torch was imported: ``torch=True`` or ``torch=False`` on stderr."""
    code = textwrap.dedent(
        f"""
        import sys
        import typer
        from cli.{app} import app

        for sub in [None, *sorted(typer.main.get_command(app).commands)]:
            try:
                app([sub, "--help"] if sub else ["--help"], prog_name="{app}")
            except SystemExit as e:
                if e.code:
                    raise
        print(f"torch={{'torch' in sys.modules}}", file=sys.stderr)
        """
    )
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONIOENCODING", "COLUMNS")}
    environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), environ.get("PYTHONPATH", "")])
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=environ, capture_output=True, timeout=120
    )


@pytest.mark.parametrize("app", APPS)
def test_help_of_every_command_does_not_import_torch(app: str) -> None:
    """``<app> <command> --help`` answers at once: torch (2-3 s to import) is not loaded for it."""
    done = _every_help(app)
    assert done.returncode == 0, done.stderr.decode()
    assert b"Usage:" in done.stdout
    assert done.stderr.strip().endswith(b"torch=False"), done.stderr.decode()[-2000:]


@pytest.mark.parametrize("app", APPS)
def test_help_of_every_command_on_an_ascii_narrow_terminal(app: str) -> None:
    """An ASCII stdout (PYTHONIOENCODING=ascii, some LANG=C systems) on a 20-column terminal: rich cuts
    option names with a '...' character that ASCII cannot encode; the help is still printed, with '?'."""
    done = _every_help(app, PYTHONIOENCODING="ascii", COLUMNS="20", TERM="dumb", NO_COLOR="1")
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert b"UnicodeEncodeError" not in done.stderr
    assert done.stdout.count(b"Usage:") >= 5  # the app and its commands
    done.stdout.decode("ascii")  # nothing but ASCII reached the terminal


def test_an_ascii_stdout_replaces_what_it_cannot_encode(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="ascii")
    monkeypatch.setattr(sys, "stdout", stream)
    _tolerate_unencodable_output()
    stream.write("1.5 \u00c5 \u2026\n")
    stream.flush()
    assert raw.getvalue() == b"1.5 ? ?\n"


def test_a_utf8_stdout_is_left_strict(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    monkeypatch.setattr(sys, "stdout", stream)
    _tolerate_unencodable_output()
    assert stream.errors == "strict"


def test_a_tilde_in_a_folder_flag_is_the_home_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--out=~/cifs`` (the shell leaves that ``~`` alone) writes into the home folder, where the
    writability check and the folder lock look, not into a folder named ``~`` here."""
    from typer.testing import CliRunner

    from cli.matgen import app

    home, here = tmp_path / "home", tmp_path / "here"
    home.mkdir()
    here.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(here)
    result = CliRunner().invoke(
        app, ["generate", "--n", "1", "--steps", "1", "--device", "cpu", "--out=~/cifs"]
    )
    assert result.exit_code == 0, result.output
    assert (home / "cifs" / "samples.csv").is_file()
    assert not any(here.iterdir())


def test_a_file_name_near_the_limit_is_written_atomically(tmp_path: Path) -> None:
    """A name of 255 bytes is valid; the hidden temp name beside it (the name + pid + tag) is shortened
    to fit, and is still one that remove_stale_temps recognises."""
    from dfm_core.atomic_io import _TEMP_NAME, _temp_beside, atomic_write, atomic_write_text

    text_file = tmp_path / ("t" * 251 + ".txt")
    atomic_write_text(text_file, "ok\n")
    blob = tmp_path / ("\u00e5" * 120 + ".bin")  # 240 bytes in UTF-8: shortened by bytes, not characters
    atomic_write(blob, lambda tmp: tmp.write_bytes(b"\0"), suffix=".npz")
    assert text_file.read_text() == "ok\n" and blob.read_bytes() == b"\0"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([text_file.name, blob.name])  # no temp left
    assert _TEMP_NAME.match(_temp_beside(text_file, ".tmp").name)


def test_a_name_or_path_too_long_is_refused_before_any_work(tmp_path: Path) -> None:
    """check_writable (run before training or sampling) refuses what the file system cannot hold, with
    a ValueError that the CLIs print as one line, not an OSError after the work is done."""
    from dfm_core.atomic_io import check_writable

    with pytest.raises(ValueError, match="--export .* 312 bytes long, and the file system takes at most"):
        check_writable(tmp_path / ("e" * 300 + ".safetensors"), "--export")
    with pytest.raises(ValueError, match="a name in it is 300 bytes long"):
        check_writable(tmp_path / ("d" * 300) / "run", "--run-dir", folder=True)
    with pytest.raises(ValueError, match="the path is longer than 4095 bytes"):
        check_writable(tmp_path.joinpath(*["abcdefghi"] * 420), "--out", folder=True)
    assert check_writable(tmp_path / ("f" * 255), "--out", folder=True) == tmp_path / ("f" * 255)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("env", "coloured"), [({}, True), ({"NO_COLOR": "1"}, False), ({"TERM": "dumb"}, False)]
)
def test_error_lines_are_red_unless_colour_is_turned_off(
    env: dict[str, str], coloured: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error on a terminal is red, but not where NO_COLOR or TERM=dumb says no colour."""
    from typer.testing import CliRunner

    from cli.matgen import app

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    result = CliRunner().invoke(app, ["generate", "--out", ""], env=env, color=True)  # color: as on a tty
    assert result.exit_code == 2 and "error: --out is empty" in result.output
    assert ("\x1b[" in result.output) == coloured


def test_progress_bars_written_to_a_log_update_every_half_minute(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under nohup or a batch scheduler stderr is a file, and ten bar updates a second filled it."""
    from typer.testing import CliRunner

    import matgen.generate
    from cli.matgen import app

    seen = []
    monkeypatch.setattr(
        matgen.generate, "generate", lambda *a, **k: seen.append(os.environ.get("TQDM_MININTERVAL"))
    )
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    CliRunner().invoke(app, ["generate", "--n", "1", "--out", "x"])  # CliRunner's stderr is no terminal
    assert seen == ["30"] and "TQDM_MININTERVAL" not in os.environ  # set for the command only
    monkeypatch.setenv("TQDM_MININTERVAL", "2")
    CliRunner().invoke(app, ["generate", "--n", "1", "--out", "x"])
    assert seen[-1] == "2"  # the user's own choice stays
