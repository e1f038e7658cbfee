"""Reading a generator's output: a folder of CIFs, one CIF, a CSV/parquet table with a ``cif`` column, or
a list of pymatgen Structures. Every crystal gets a stable, unique id (the key of the resume journal).

A table may instead have a ``file`` column of CIF paths relative to the table; rows with an empty ``file``
count as crystals the generator failed to produce (reason from an ``error`` column if present). A folder
holding such a ``samples.csv`` (what ``matgen generate`` writes) is read through it, so that decoding
failures enter the denominators instead of silently disappearing.

Ids: a file's path relative to the folder (``sub/x.cif``); a table's id column (the first of
``material_id, id, name, file``) or ``row{i}``; ``s{i}`` for in-memory structures. Repeated ids get a
``#k`` suffix so that rows are never merged.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from pymatgen.core import Structure

__all__ = ["InputItem", "parse_cif", "read_inputs"]

ID_COLUMNS = ("material_id", "id", "name", "file")
TABLE_SUFFIXES = (".csv", ".csv.gz", ".parquet", ".pq")
MANIFEST_NAME = "samples.csv"  # written by ``matgen generate`` next to its CIFs


@dataclass
class InputItem:
    """One input crystal before parsing: ``cif`` text, or an in-memory ``structure``."""

    id: str
    cif: str | None = None
    structure: Structure | None = None
    read_error: str | None = None


def parse_cif(text: str) -> Structure:
    """Parse the first structure of a CIF (conventional setting as written, no primitive reduction).

    Raises:
        ValueError: empty text or nothing pymatgen can read.
    """
    from pymatgen.io.cif import CifParser

    if not text or not text.strip():
        raise ValueError("empty CIF")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen warns per CIF about rounding and occupancies
        parser = CifParser(io.StringIO(text))
        structures = parser.parse_structures(primitive=False, on_error="raise")
    if not structures:
        raise ValueError("no structure in CIF")
    return structures[0]


def _unique(ids: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for i in ids:
        if i in seen:
            seen[i] += 1
            out.append(f"{i}#{seen[i]}")
        else:
            seen[i] = 0
            out.append(i)
    return out


def _read_text(path: Path) -> tuple[str | None, str | None]:
    try:
        return path.read_text(encoding="utf-8", errors="replace"), None
    except OSError as exc:
        return None, f"unreadable file: {exc}"


def _read_table(path: Path) -> list[InputItem]:
    name = path.name.lower()
    frame = pd.read_parquet(path) if name.endswith((".parquet", ".pq")) else pd.read_csv(path)
    if "cif" not in frame.columns and "file" not in frame.columns:
        raise ValueError(f"{path} has neither a 'cif' nor a 'file' column (columns: {list(frame.columns)})")
    id_col = next((c for c in ID_COLUMNS if c in frame.columns), None)
    ids = _unique([str(x) for x in frame[id_col]] if id_col else [f"row{i}" for i in range(len(frame))])
    if "cif" in frame.columns:
        cifs = [c if isinstance(c, str) else None for c in frame["cif"]]
        return [
            InputItem(id=i, cif=c, read_error=None if c is not None else "empty CIF")
            for i, c in zip(ids, cifs, strict=True)
        ]
    errors = frame["error"] if "error" in frame.columns else [None] * len(frame)
    items = []
    for i, f, err in zip(ids, frame["file"], errors, strict=True):
        if isinstance(f, str) and f.strip():
            text, read_err = _read_text(path.parent / f)
            items.append(InputItem(id=i, cif=text, read_error=read_err))
        else:
            why = err if isinstance(err, str) and err.strip() else "no file"
            items.append(InputItem(id=i, read_error=f"generator produced no crystal: {why}"))
    return items


def read_inputs(inputs: str | Path | Sequence[Structure]) -> list[InputItem]:
    """Collect the crystals to evaluate (see module docstring for the accepted forms and ids)."""
    if not isinstance(inputs, str | Path):
        items = list(inputs)
        if not all(isinstance(s, Structure) for s in items):
            raise TypeError("a list input must contain pymatgen Structures")
        return [InputItem(id=f"s{i}", structure=s) for i, s in enumerate(items)]
    path = Path(inputs).expanduser()
    manifest = path / MANIFEST_NAME
    if path.is_dir() and manifest.is_file() and "file" in pd.read_csv(manifest, nrows=0).columns:
        return _read_table(manifest)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(".cif"))
        out = []
        for f in files:
            text, err = _read_text(f)
            out.append(InputItem(id=f.relative_to(path).as_posix(), cif=text, read_error=err))
        return out
    if not path.exists():
        raise FileNotFoundError(f"no such input: {path}")
    if path.name.lower().endswith(TABLE_SUFFIXES):
        return _read_table(path)
    text, err = _read_text(path)
    return [InputItem(id=path.name, cif=text, read_error=err)]
