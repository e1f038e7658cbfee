"""`imagegen` command-line app."""

from __future__ import annotations

import typer

from cli._common import version_option

app = typer.Typer(help="imagegen: discrete flow matching for images.", no_args_is_help=True, add_completion=False)


@app.callback()
def main(version: bool = version_option("imagegen")) -> None:
    """imagegen: train, sample and evaluate discrete flow matching models."""
