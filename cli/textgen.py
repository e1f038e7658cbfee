"""`textgen` command-line app."""

from __future__ import annotations

import typer

from cli._common import version_option

app = typer.Typer(help="textgen: discrete flow matching for texts.", no_args_is_help=True, add_completion=False)


@app.callback()
def main(version: bool = version_option("textgen")) -> None:
    """textgen: train, sample and evaluate discrete flow matching models."""
