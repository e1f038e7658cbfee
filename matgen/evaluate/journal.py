"""Append-only JSON-lines journal that makes an evaluation resumable.

Each line is ``{"stage": ..., "id": ..., ...}``. Writes are flushed and fsynced per batch, so a run killed
at any moment loses at most the batch in flight. On open:

* a torn last line (no trailing newline, or unparsable) is cut off the file, so later appends start on a
  clean line;
* records are keyed by ``(stage, id)``; a repeated key keeps the last record, so replaying a batch never
  duplicates a row;
* a header line records the settings that change results (``meta``); a journal written with other settings
  raises :class:`JournalMismatch` instead of silently mixing numbers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from pymatgen.core import Lattice, Structure

__all__ = ["Journal", "JournalMismatch", "structure_from_json", "structure_to_json"]


class JournalMismatch(RuntimeError):
    """The journal in the output folder was written with different settings."""


class Journal:
    """Resumable per-crystal records in ``path`` (see module docstring)."""

    def __init__(self, path: str | Path, meta: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: dict[tuple[str, str], dict[str, Any]] = {}
        self.meta = dict(meta or {})
        self._load()
        self._fh = self.path.open("a", encoding="utf-8")
        if not self._stored_meta:
            self._write([{"stage": "meta", "id": "", **self.meta}])

    def _load(self) -> None:
        self._stored_meta: dict[str, Any] | None = None
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        good_end = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
        pos = kept_end = 0
        while pos < good_end:
            nl = data.index(b"\n", pos)
            line = data[pos:nl]
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break  # a corrupt line ends the trustworthy part
                if rec.get("stage") == "meta":
                    self._stored_meta = {k: v for k, v in rec.items() if k not in ("stage", "id")}
                else:
                    self.records[(rec["stage"], str(rec["id"]))] = rec
            pos = kept_end = nl + 1
        if kept_end < len(data):
            with self.path.open("r+b") as f:
                f.truncate(kept_end)
        if self._stored_meta is not None and self.meta:
            diff = {
                k: (self._stored_meta.get(k), v)
                for k, v in self.meta.items()
                if self._stored_meta.get(k) != v
            }
            if diff:
                raise JournalMismatch(
                    f"{self.path} was written with other settings {diff}; use another output folder "
                    "or delete the journal to start over"
                )

    def _write(self, records: Iterable[dict[str, Any]]) -> None:
        for rec in records:
            self._fh.write(json.dumps(rec, allow_nan=True, separators=(",", ":")) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def append(self, records: list[dict[str, Any]]) -> None:
        """Write a batch of records (each with ``stage`` and ``id``) durably, then remember them."""
        if not records:
            return
        self._write(records)
        for rec in records:
            self.records[(rec["stage"], str(rec["id"]))] = rec

    def get(self, stage: str, id_: str) -> dict[str, Any] | None:
        return self.records.get((stage, id_))

    def has(self, stage: str, id_: str) -> bool:
        return (stage, id_) in self.records

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def structure_to_json(s: Structure) -> dict[str, Any]:
    """Compact, lossless JSON form of an ordered structure (lattice rows, atomic numbers, fractional coords)."""
    return {
        "lattice": np.asarray(s.lattice.matrix).ravel().tolist(),
        "numbers": [int(z) for z in s.atomic_numbers],
        "frac": np.asarray(s.frac_coords).ravel().tolist(),
    }


def structure_from_json(d: dict[str, Any] | None) -> Structure | None:
    """Inverse of :func:`structure_to_json` (``None`` passes through)."""
    if not d:
        return None
    return Structure(Lattice(np.reshape(d["lattice"], (3, 3))), d["numbers"], np.reshape(d["frac"], (-1, 3)))
