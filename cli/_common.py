"""Small helpers shared by the command-line apps."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import typer


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


def fail(message: str, code: int = 2) -> None:
    """Print an error in red to stderr and exit with ``code`` (nothing is lost: callers write atomically)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)
