"""`matgen` command-line app: crystal generation with discrete flow matching."""

from __future__ import annotations

import typer

from cli._common import version_option

app = typer.Typer(
    help="matgen: generate and evaluate crystals with kinetic-optimal discrete flow matching.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main(version: bool = version_option("matgen")) -> None:
    """Crystal generation with discrete flow matching (MP-20)."""
