"""Assertions on command-line runs shared by the app tests (importable: pytest puts tests/ on sys.path)."""

from __future__ import annotations


def one_line_error(result, *words: str) -> str:
    """The CLI failed with exit code 2 and a single 'error: ...' line holding every word; returns it."""
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]
