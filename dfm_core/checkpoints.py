"""Release checkpoints: weights as safetensors with JSON metadata in the header (config, data, metrics).

:func:`export_safetensors` writes one atomically, :func:`load_safetensors` reads weights and metadata back
with clear errors for the files people mistake for one (a torch ``.pt`` training checkpoint, a truncated
download, a diverged run's NaN weights), and :func:`read_safetensors_metadata` reads only the header, for
describing a checkpoint without loading it. The apps load their models through :func:`read_checkpoint`
(the file, its format and required metadata) and :func:`load_model_weights` (the architecture and its
weights), which raise one :class:`CheckpointError` naming the file. Training checkpoints (``last.pt``) are
:mod:`dfm_core.training`'s.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dfm_core.atomic_io import atomic_write

__all__ = [
    "EXPORTED_MODEL",
    "CheckpointError",
    "CheckpointSummary",
    "describe_safetensors",
    "export_safetensors",
    "folder_given",
    "load_model_weights",
    "load_safetensors",
    "read_checkpoint",
    "read_safetensors_metadata",
    "unwrap_compiled",
]


# The file in a run folder that apps export the run's best weights to (with export_safetensors). A run
# that starts afresh removes it with the run's other outputs (dfm_core.training.train), so an old model
# never sits beside new ones; a folder given where a checkpoint is expected is searched for it.
EXPORTED_MODEL = "model.safetensors"


def folder_given(path: Path, otherwise: str = "give the .safetensors file") -> str | None:
    """The error for a checkpoint path that names a folder, ``None`` when it does not: it points at the
    folder's exported model when there is one, else says ``otherwise``."""
    if not path.is_dir():
        return None
    inside = path / EXPORTED_MODEL
    hint = f"did you mean {inside}?" if inside.is_file() else otherwise
    return f"checkpoint {path} is a folder, not a checkpoint file: {hint}"


class CheckpointError(ValueError):
    """An app's checkpoint that is missing, unreadable, or not what the app loads; the message names the
    file and what is wrong with it."""


def read_checkpoint(
    path: str | os.PathLike,
    app: str,
    checkpoint_format: str,
    required: tuple[str, ...] = ("model_config",),
    folder_advice: str = "give the .safetensors file",
    missing_hint: str = "",
    train_advice: str | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Weights and metadata of ``app``'s exported checkpoint, or a :class:`CheckpointError` that says why not.

    The errors: a folder (pointing at its ``model.safetensors`` if it has one, else ``folder_advice``); no
    file (``missing_hint`` appended); a file that is no safetensors checkpoint (pointing at the exported
    model beside it, e.g. for a ``last.pt``); another ``format`` in the metadata or a ``required`` key
    missing (``train_advice`` appended, by default "train one with `<app> train`").
    """
    path = Path(path).expanduser()  # "~/model.safetensors" from Python as from a shell
    if (folder := folder_given(path, folder_advice)) is not None:
        raise CheckpointError(folder)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}{missing_hint}")
    try:
        state, meta = load_safetensors(path)
    except (ValueError, OSError) as e:
        exported = path.parent / EXPORTED_MODEL
        beside = f"; {exported} is the model this training run exported" if exported.is_file() else ""
        raise CheckpointError(f"cannot read checkpoint {path}: {e}{beside}") from e
    if meta.get("format") != checkpoint_format or any(key not in meta for key in required):
        advice = train_advice or f"train one with `{app} train`"
        raise CheckpointError(
            f"{path} is a safetensors file but not {_article(app)} {app} checkpoint "
            f"(format={meta.get('format')!r}); {advice}"
        )
    return state, meta


def load_model_weights(
    build: Callable[[], nn.Module], state: Mapping[str, Tensor], path: Path | str, app: str
) -> nn.Module:
    """``build()`` (the architecture a checkpoint's metadata describe, built without touching the caller's
    RNG) with ``state`` loaded into it; a :class:`CheckpointError` if the metadata do not describe a
    model or the weights do not fit it (the first mismatch named, the rest counted)."""
    try:
        with torch.random.fork_rng(devices=[]):  # a random init leaves the caller's RNG as it was
            model = build()
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(
            f"{path}: its metadata does not describe {_article(app)} {app} model: {e}"
        ) from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        first = next((line for line in lines if "size mismatch" in line or "Missing" in line), lines[-1])
        more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
        raise CheckpointError(
            f"{path}: weights do not fit the architecture in its metadata: {first}{more}"
        ) from None
    return model


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module inside a ``torch.compile`` wrapper (the module itself otherwise)."""
    return getattr(model, "_orig_mod", model)


def export_safetensors(
    model_or_state: nn.Module | Mapping[str, Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Save weights as a safetensors file with JSON metadata in its header, atomically.

    Args:
        model_or_state: a module (``torch.compile`` wrappers are unwrapped) or a state dict.
        path: destination (``.safetensors``).
        metadata: JSON-serialisable values, stored as JSON strings in the header.
        dtype: cast the floating-point weights to this dtype (e.g. ``torch.bfloat16`` halves the file);
            float64 tensors (probability tables such as a source PMF, not weights) are kept as they are.

    Returns:
        The written path.
    """
    from safetensors.torch import save_file

    state = (
        unwrap_compiled(model_or_state).state_dict()
        if isinstance(model_or_state, nn.Module)
        else model_or_state
    )
    tensors = {}
    for name, value in state.items():
        value = value.detach().to("cpu")
        if dtype is not None and value.is_floating_point() and value.dtype != torch.float64:
            value = value.to(dtype)
        tensors[name] = value.contiguous().clone()  # safetensors refuses shared storage
    header = {"format": "pt"}
    for key, value in (metadata or {}).items():
        header[str(key)] = json.dumps(value)
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))
    return path


def load_safetensors(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load weights and metadata written by :func:`export_safetensors`.

    Returns:
        ``(state_dict, metadata)``, metadata values JSON-decoded (non-JSON strings kept as strings).

    Raises:
        FileNotFoundError: no file.
        ValueError: the file is not a safetensors checkpoint (e.g. a torch ``.pt`` zip, truncated or
            corrupt data), or its weights are not all finite.
    """
    from safetensors import safe_open

    path = Path(path)
    _read_header(path)
    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as f:
            raw_meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError and friends: truncated or inconsistent data
        raise ValueError(f"{path} is not a valid safetensors checkpoint ({type(e).__name__}: {e})") from e
    broken = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise ValueError(
            f"{path} holds non-finite weights (NaN or inf) in {len(broken)} tensor(s), e.g. {', '.join(broken[:3])}: "
            "a damaged file or the export of a diverged run"
        )
    return state, _decoded(raw_meta)


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a safetensors checkpoint, JSON-decoded, read from its header alone (no tensor is
    loaded or checked). Raises as :func:`load_safetensors` for a file that is not a safetensors file."""
    return _header_metadata(_read_header(Path(path)), path)


@dataclass(frozen=True)
class CheckpointSummary:
    """What a safetensors checkpoint holds, from its header: metadata and the shape of its weights."""

    path: Path
    metadata: dict[str, Any]
    tensors: int
    values: int
    dtypes: tuple[str, ...]
    size_bytes: int


def describe_safetensors(path: str | os.PathLike) -> CheckpointSummary:
    """:class:`CheckpointSummary` of a safetensors file, read from its header alone (fast for any size)."""
    path = Path(path)
    header = _read_header(path)
    entries = [v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    return CheckpointSummary(
        path=path,
        metadata=_header_metadata(header, path),
        tensors=len(entries),
        values=sum(math.prod(int(d) for d in e.get("shape", [])) for e in entries),
        dtypes=tuple(sorted({str(e.get("dtype")) for e in entries})),
        size_bytes=path.stat().st_size,
    )


def _read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, with a clear error for the files mistaken for one."""
    if not path.is_file():
        raise FileNotFoundError(f"safetensors checkpoint not found: {path}")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if head[:2] == b"PK":
            raise ValueError(
                f"{path} is not a safetensors checkpoint but a torch .pt training checkpoint (last.pt / best.pt): "
                "pass the run folder's model.safetensors (from Python, dfm_core.training.load_checkpoint reads .pt)"
            )
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors checkpoint: file too short ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or 8 + n > size:
            raise ValueError(
                f"{path} is not a safetensors checkpoint: bad header length {n} for {size} bytes"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a safetensors checkpoint: header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors checkpoint: its header is not a table")
    return header


def _header_metadata(header: Mapping[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """The JSON-decoded ``__metadata__`` of a header read by :func:`_read_header`."""
    raw = header.get("__metadata__") or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path} is not a safetensors checkpoint: its __metadata__ is not a table")
    return _decoded(raw)


def _decoded(raw: Mapping[str, str]) -> dict[str, Any]:
    """Header metadata with its values JSON-decoded (a value that is not JSON stays a string)."""
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value)
        except (TypeError, json.JSONDecodeError):
            meta[key] = value
    return meta
