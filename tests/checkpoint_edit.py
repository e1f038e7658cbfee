"""Damaged copies of safetensors checkpoints for the app tests (importable: pytest puts tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path


def with_raw_metadata(src: Path, dst: Path, **changes: str | None) -> Path:
    """A copy of ``src`` at ``dst`` whose raw metadata strings are replaced (None removes the key)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        meta, state = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    save_file(state, str(dst), meta)
    return dst
