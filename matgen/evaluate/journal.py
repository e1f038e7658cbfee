"""Append-only JSON-lines journal that makes an evaluation resumable.

Each line is ``{"stage": ..., "id": ..., ...}``. Writes are flushed and fsynced per batch, so a run killed
at any moment loses at most the batch in flight. On open:

* a torn last line (no trailing newline, or unparsable) is cut off the file, so later appends start on a
  clean line; so is everything from the first line that is not a record (corrupt bytes, JSON that is not
  an object with ``stage`` and ``id``);
* a file that does not open with this tool's header line is someone else's: :class:`JournalMismatch` is
  raised and the file is left as it was;
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

__all__ = ["Journal", "JournalMismatch", "NotAJournal", "structure_from_json", "structure_to_json"]


class JournalMismatch(RuntimeError):
    """The journal in the output folder was written with different settings, or is not a journal."""


class NotAJournal(JournalMismatch):
    """The file at the journal's path was not written by :class:`Journal` (and was left untouched)."""


_HEAD = b'{"stage"'  # how every journal opens: its meta record, written first


def _record(line: bytes) -> dict[str, Any] | None:
    """The record on one journal line, or ``None`` for anything else (corrupt bytes, a torn write, JSON
    that is not an object with a ``stage`` and an ``id``)."""
    try:
        rec = json.loads(line)
    except ValueError:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not UTF-8
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("stage"), str) or "id" not in rec:
        return None
    return rec


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
        self._check_ours(data)
        good_end = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
        pos = kept_end = 0
        while pos < good_end:
            nl = data.index(b"\n", pos)
            line = data[pos:nl]
            if line.strip():
                rec = _record(line)
                if rec is None:
                    break  # a corrupt line ends the trustworthy part
                if rec["stage"] == "meta":
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
                    "or empty this one to start over"
                )

    def _check_ours(self, data: bytes) -> None:
        """Refuse a file that this class did not write, before anything cuts it: its first line must be
        the meta record (or, when a run was killed during its very first write, the start of one)."""
        text = data.lstrip()
        if not text:
            return
        first = text.split(b"\n", 1)[0]
        if b"\n" in text:
            rec = _record(first)
            ours = rec is not None and rec["stage"] == "meta"
        else:  # a torn first write: a prefix of the header line
            ours = first.startswith(_HEAD) or _HEAD.startswith(first)
        if not ours:
            raise NotAJournal(
                f"{self.path} is not a journal of matgen evaluate (its first line is "
                f"{first[:40].decode('utf-8', 'replace')!r}); it was left as it is: use another output folder"
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
