"""``matgen info``, ``textgen info``, ``imagegen info``: what a checkpoint is, read from its header alone."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import typer

from cli._common import fail

# Metadata keys shown first, in this order; the rest follow alphabetically.
FIRST_KEYS = (
    "format",
    "kind",
    "scheduler",
    "parameters",
    "step",
    "best_val_loss",
    "training_machine",
    "training_history",
    "data",
    "sampling",
)
MAX_TEXT = 240  # characters of one rendered value before it is cut


def show_checkpoint(
    path: Path,
    expected_formats: tuple[str, ...],
    as_json: bool = False,
    notes: Callable[[dict[str, Any]], list[str]] | None = None,
) -> None:
    """Print a checkpoint's file facts and metadata, one ``key: value`` line each (``as_json``: all of it
    as JSON); ``notes(metadata)`` adds app-specific lines. Exits with one error line for a bad file."""
    from dfm_core.checkpoints import describe_safetensors, folder_given

    if (folder := folder_given(path)) is not None:
        fail(folder)
    try:
        summary = describe_safetensors(path)
    except (ValueError, OSError) as e:
        fail(str(e))
    meta = summary.metadata
    if as_json:
        facts = {
            "path": str(summary.path),
            "size_bytes": summary.size_bytes,
            "tensors": summary.tensors,
            "values": summary.values,
            "dtypes": list(summary.dtypes),
        }
        typer.echo(json.dumps({"file": facts, "metadata": meta}, indent=2, default=str))
        return
    typer.echo(f"file: {summary.path} ({summary.size_bytes / 1e6:.1f} MB)")
    typer.echo(
        f"weights: {summary.values:,} values in {summary.tensors} tensors ({', '.join(summary.dtypes) or 'none'})"
    )
    if meta.get("format") not in expected_formats:
        typer.echo(f"note: not a {' or '.join(expected_formats)} file (format={meta.get('format')!r})")
    for key in [k for k in FIRST_KEYS if k in meta] + sorted(k for k in meta if k not in FIRST_KEYS):
        value = meta[key]
        if isinstance(value, Mapping) and value:  # a table: one indented line per entry
            typer.echo(f"{key}:")
            for name, item in value.items():
                typer.echo(f"  {name}: {render(item)}")
        else:
            typer.echo(f"{key}: {render(value)}")
    for line in notes(meta) if notes is not None else []:
        typer.echo(line)


def render(value: Any, limit: int = MAX_TEXT) -> str:
    """One line for a metadata value: tables as ``key=value, ...``, long number lists by their length."""
    if isinstance(value, Mapping):
        text = ", ".join(f"{k}={_compact(v)}" for k, v in value.items())
    else:
        text = _compact(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _compact(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, list) and len(value) > 8 and all(isinstance(v, int | float) for v in value):
        return f"[{len(value)} numbers]"
    if isinstance(value, str):
        return " ".join(value.split())
    return json.dumps(value, separators=(",", ":"), default=str)
