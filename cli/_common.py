"""Small helpers shared by the command-line apps."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from typer.core import TyperGroup

if TYPE_CHECKING:
    import torch


def package_version() -> str:
    try:
        return version("kodfm")
    except PackageNotFoundError:  # running from a source tree
        return "0.1.0+src"


def version_option(app_name: str):
    def _callback(value: bool) -> None:
        if value:
            typer.echo(f"{app_name} {package_version()}")
            raise typer.Exit()

    return typer.Option(
        False, "--version", help="Print the version and exit.", callback=_callback, is_eager=True
    )


def _one_line_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
    """Warnings on a terminal: the message, not the library's source line that raised it."""
    return f"warning: {message}\n"


warnings.formatwarning = _one_line_warning  # the CLIs import this module; the Python API is untouched
# A library compiled on first import (wheels installed with --no-compile) can warn about its own source, as
# nvidia-ml-py3 (imported by chgnet) does on Python 3.12: "warning: invalid escape sequence '\A'", which
# names nothing a user can act on. (Python 3.11 raises the same as a DeprecationWarning.)
for _category in (SyntaxWarning, DeprecationWarning):
    warnings.filterwarnings("ignore", message="invalid escape sequence", category=_category)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (``kill``, ``timeout``, batch schedulers) raises KeyboardInterrupt like a
    Ctrl-C, so that a command stops through the same path: its finished work kept, one line saying so. Python
    alone dies silently on SIGTERM. Only in the main thread (where signal handlers can be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _tolerate_unencodable_output() -> None:
    """Let stdout write what its encoding cannot as '?' rather than fail with UnicodeEncodeError.

    Python's stdout is strict, and an ASCII or Latin-1 one (``PYTHONIOENCODING=ascii``, ``LANG=C`` on some
    systems, a latin-1 locale) cannot write the '\u2026' that rich puts in a help text's narrow column, nor
    a sampled text's symbols. ``typer.echo`` copes by itself; rich's help and tables write to
    ``sys.stdout`` directly. A stream that can encode them is left as it is.
    """
    stream = sys.stdout
    encoding = getattr(stream, "encoding", None)
    if not encoding or getattr(stream, "errors", "strict") != "strict" or not hasattr(stream, "reconfigure"):
        return
    try:
        "\u2026\u00c5".encode(encoding)
    except UnicodeEncodeError:
        stream.reconfigure(errors="replace")


LOGGED_PROGRESS_INTERVAL_S = 30  # seconds between progress-bar updates written to a log file


@contextlib.contextmanager
def _calm_progress_when_logged() -> Iterator[None]:
    """Within the block, progress bars update every 30 s instead of 10 times a second when stderr is not a
    terminal (``nohup``, a batch job's log, a pipe): each update is a line's worth of text in a log, and an
    hour of training would write tens of megabytes of them. tqdm reads ``TQDM_MININTERVAL``; a value the
    user set is kept, and the environment is restored afterwards (a notebook's CliRunner shares it)."""
    if getattr(sys.stderr, "isatty", lambda: False)() or "TQDM_MININTERVAL" in os.environ:
        yield
        return
    os.environ["TQDM_MININTERVAL"] = str(LOGGED_PROGRESS_INTERVAL_S)
    try:
        yield
    finally:
        os.environ.pop("TQDM_MININTERVAL", None)


class CommandGroup(TyperGroup):
    """The apps' command group: a Ctrl-C (or SIGTERM) that a command does not handle itself ends with a
    line that says so (typer alone exits 130 without a word); a training that stopped cleanly has said so
    itself and exits 130 quietly. Progress bars written to a log update every 30 s."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        _tolerate_unencodable_output()
        return super().main(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        try:
            with _sigterm_as_interrupt(), _calm_progress_when_logged():
                return super().invoke(ctx)
        except KeyboardInterrupt as e:
            # Not imported up front: dfm_core imports torch (2-3 s), which a subcommand's --help must not
            # wait for. A TrainingStopped can only come from a training that imported the module already.
            training = sys.modules.get("dfm_core.training")
            if training is not None and isinstance(e, training.TrainingStopped):
                raise typer.Exit(130) from None  # a clean stop: the loop has said where its checkpoint is
            _print_error(
                "error: interrupted; files are written whole or not at all, so none is left half-written"
            )
            raise typer.Exit(130) from None
        except EOFError as e:  # a truncated compressed file that no reader named: click says only "Aborted."
            _print_error(f"error: a file ended too early (truncated or still being written?): {e}")
            raise typer.Exit(1) from None
        except (MemoryError, RuntimeError) as e:
            if not _out_of_memory(e):
                raise
            first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
            _print_error(
                f"error: out of memory ({first[:200]}): use a smaller --batch-size (or smaller inputs); files "
                "are written whole or not at all, and a training run resumes from its last checkpoint"
            )
            raise typer.Exit(1) from None


def _out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` says that memory ran out: Python's MemoryError, torch's (CUDA) OutOfMemoryError, or
    the RuntimeError of torch's CPU allocator."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    text = str(e)
    return "can't allocate memory" in text or "not enough memory" in text or "out of memory" in text.lower()


def _print_error(line: str) -> None:
    """``line`` on stderr, red on a terminal; plain where ``NO_COLOR`` (https://no-color.org) or
    ``TERM=dumb`` asks for no colour, which click (unlike rich) does not check by itself."""
    plain = bool(os.environ.get("NO_COLOR")) or os.environ.get("TERM") == "dumb"
    typer.secho(line, fg=typer.colors.RED, err=True, color=False if plain else None)


def fail(message: str, code: int = 2) -> None:
    """Print an error in red to stderr and exit with ``code`` (nothing is lost: callers write atomically)."""
    _print_error(f"error: {message}")
    raise typer.Exit(code)


def folder_flag(text: str, flag: str = "--out", example: str = "results/") -> Path:
    """The folder a flag names. An empty value (an unset shell variable, ``--out "$DIR"``) is refused: as a
    Path it would mean the current folder, and a tool would write (or clean) its files there. A leading
    ``~`` is the home folder, as :func:`dfm_core.atomic_io.check_writable` and the folder lock take it: the
    shell leaves it as it is in ``--out=~/cifs``, and a run would otherwise write part of its files into a
    folder named ``~`` here and part into the home folder."""
    if not text.strip():
        fail(f"{flag} is empty: name the folder, e.g. {flag} {example}")
    return Path(text).expanduser()


def given(**flags: Any) -> dict[str, Any]:
    """The flags the user gave (``None`` means not given), paths as text as the configs store them."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in flags.items() if v is not None}


def budget_seconds(minutes: float | None) -> float | None:
    """``--time-budget`` minutes as the ``time_budget_s`` the train configs take."""
    return None if minutes is None else 60.0 * minutes


def train_overrides(
    *,
    steps: int | None,
    batch_size: int | None,
    lr: float | None,
    warmup: int | None,
    ema_decay: float | None,
    eval_every: int | None,
    ckpt_every: int | None,
    seed: int | None,
    device: str | None,
    time_budget: float | None,
    **more: Any,
) -> dict[str, Any]:
    """The :class:`dfm_core.training.TrainConfig` fields the shared train flags set (given ones only)."""
    return given(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup_steps=warmup,
        ema_decay=ema_decay,
        eval_every=eval_every,
        ckpt_every=ckpt_every,
        seed=seed,
        device=device,
        time_budget_s=budget_seconds(time_budget),
        **more,
    )


def _items(text: str, flag: str, kind: str) -> list[str]:
    """The comma-separated items of a flag; an empty item ('4,,8', '8,' or '') is a ValueError."""
    items = [v.strip() for v in text.split(",")]
    if not all(items):
        raise ValueError(f"{flag} must be a comma-separated list of {kind}, got {text!r} (an empty item)")
    return items


def _number_list(text: str, flag: str, kind: str, convert: type) -> list:
    out = []
    for item in _items(text, flag, kind):
        try:
            out.append(convert(item))
        except ValueError:
            where = f" in {text!r}" if item != text.strip() else ""
            raise ValueError(
                f"{flag} must be a comma-separated list of {kind}, got {item!r}{where}"
            ) from None
    return out


def int_list(text: str, flag: str) -> list[int]:
    """A flag's comma-separated whole numbers (``"32,64,128"``); '2.7', 'abc' or an empty item is a
    ValueError naming ``flag`` and the offending item."""
    return _number_list(text, flag, "whole numbers", int)


def float_list(text: str, flag: str) -> list[float]:
    """A flag's comma-separated numbers (``"0,0.5,2"``); 'abc' or an empty item is a ValueError naming
    ``flag`` and the offending item."""
    return _number_list(text, flag, "numbers", float)


def name_list(text: str, flag: str) -> list[str]:
    """A flag's comma-separated names (``"ko,power-inf"``); an empty item is a ValueError naming ``flag``."""
    return _items(text, flag, "names")


def check_alpha_flag(velocity: str | list[str], alpha: float | None) -> None:
    """``--alpha`` only means something to the power velocity: refuse it with any other, so that a
    forgotten ``--velocity power`` does not silently sample with another velocity."""
    names = [velocity] if isinstance(velocity, str) else velocity
    if alpha is not None and not any(v.strip().lower() == "power" for v in names):
        raise ValueError(f"--alpha applies to --velocity power, not {','.join(names)}")


def export_dtype(export: str | Path | None, bf16: bool) -> torch.dtype | None:
    """The dtype of ``--export`` weights; ``--export-bf16`` without ``--export`` is refused."""
    if bf16 and export is None:
        raise ValueError("--export-bf16 needs --export PATH")
    import torch

    return torch.bfloat16 if bf16 else None


def export_path(export: str | None) -> Path | None:
    """``--export`` as a file path, checked before training: a name ending in a slash or an existing
    folder is refused (``Path`` would drop the slash and write a file of that name)."""
    from dfm_core.atomic_io import check_writable

    if export is None:
        return None
    if not export.strip() or export.endswith(("/", "\\")):
        raise ValueError(f"--export must name a .safetensors file, got the folder {export!r}")
    return check_writable(Path(export), "--export")


def run_options(
    no_resume: bool, export: str | None, export_bf16: bool, quiet: bool, run_dir: Path | None = None
) -> dict[str, Any]:
    """The keyword arguments that every app's train function takes from the shared train flags, with
    ``--run-dir`` and ``--export`` checked before any data is loaded."""
    from dfm_core.atomic_io import check_writable

    if run_dir is not None:
        check_writable(run_dir, "--run-dir", folder=True)
    return {
        "resume": not no_resume,
        "export": export_path(export),
        "progress": not quiet,
        "export_dtype": export_dtype(export, export_bf16),
    }


def report_resume(result: Any, run_dir: Path) -> None:
    """Say that a train command went on from the run folder's checkpoint (or found nothing left to train):
    a rerun into a used --run-dir resumes it, which must not pass for a fresh run."""
    if getattr(result, "resumed_from", None) is None:
        return
    last = run_dir / "last.pt"
    if result.step == result.resumed_from:
        typer.echo(
            f"{last} is at step {result.step} already: nothing to train, weights exported again "
            "(a larger --steps goes on; --no-resume starts afresh)"
        )
    else:
        typer.echo(f"resumed from step {result.resumed_from} of {last}")


def report_training(result: Any, run_dir: Path) -> None:
    """The lines every ``train`` command ends with: whether it resumed, the step, the best loss, the weights."""
    from dfm_core.checkpoints import EXPORTED_MODEL  # after a training: torch is loaded already

    report_resume(result, run_dir)
    best = result.best_val_loss
    val = f"best val loss {best:.4f}" if math.isfinite(best) else "no validation run (weights: the last step)"
    typer.echo(f"trained to step {result.step}; {val}; weights: {run_dir / EXPORTED_MODEL}")


class TrainFlags:
    """Options every app's ``train`` command shares."""

    export = typer.Option(None, help="Also write the best EMA weights to this .safetensors file.")
    export_bf16 = typer.Option(
        False, "--export-bf16", help="Store the --export weights in bfloat16 (half the file size)."
    )
    warmup = typer.Option(None, min=0, help="Linear warmup steps.")
    ema_decay = typer.Option(None, help="EMA decay of the weights.")
    eval_every = typer.Option(None, min=0, help="Validate (and keep best.pt) every N steps (0: never).")
    ckpt_every = typer.Option(None, min=0, help="Write last.pt every N steps (0: only at the end).")
    seed = typer.Option(None, help="Seed of the weights, data order and noise.")
    no_resume = typer.Option(
        False,
        "--no-resume",
        help="Start afresh even if run-dir has a checkpoint (its checkpoints, metrics and model.safetensors go).",
    )
    quiet = typer.Option(False, help="No progress bar.")
    time_budget = typer.Option(
        None,
        "--time-budget",
        min=0.1,
        help="Train for at most this many minutes: after a short calibration (at least 3 steps) the step "
        "count is lowered to what fits and the LR schedule is fitted to it; the run ends at a step boundary.",
    )
