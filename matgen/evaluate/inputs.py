"""Reading a generator's output: a folder of CIFs, one CIF, a CSV/parquet table with a ``cif`` column, a
zip archive of CIFs, an extended-XYZ file of periodic frames, a POSCAR file, or a list of pymatgen
Structures. Every crystal gets a stable, unique id (the key of the resume journal) and a digest of its
content (so that a resumed run notices an input that changed under the same id).

MatterGen, for one, writes ``generated_crystals_cif.zip`` and ``generated_crystals.extxyz``: either can be
given as it is. Archive members are read like files in a folder (id ``archive.zip/member.cif``); extxyz
frames get ids ``file.extxyz:k`` (k from 0). A frame without a periodic 3D cell or without atoms, or with
a malformed line, is recorded as a failure of its own; an atom-count line that cannot be read ends the
file with one failure row. A POSCAR without element symbols (VASP 4) is a failure, not hydrogen.

Folders are searched recursively (symlinked folders included) for ``.cif`` and ``.cif.gz`` files, POSCARs
(``POSCAR*``, ``CONTCAR*``, ``.vasp``, ``.poscar``) and extended XYZ files; hidden files and folders
(``.ipynb_checkpoints``, macOS ``._x.cif``), ``__MACOSX`` and an evaluation's own output folder (one with
a ``journal.jsonl``) are skipped. A CIF file with
several crystal data blocks gives one crystal per block (id ``file.cif:blockname``). Text is read as
UTF-8, or UTF-16 when the file starts with a UTF-16 byte-order mark.

A table may instead have a ``file`` column of CIF paths relative to the table; rows with an empty ``file``
count as crystals the generator failed to produce (reason from an ``error`` column if present). A folder
holding such a ``samples.csv`` (what ``matgen generate`` writes) is read through it, so that decoding
failures enter the denominators instead of silently disappearing; CIFs in the folder that the manifest does
not list are added after its rows.

Ids: a file's path relative to the folder (``sub/x.cif``); a table's id column (the first of
``material_id, id, name, file``) or ``row{i}``; ``s{i}`` for in-memory structures. Repeated ids get a
``#k`` suffix so that rows are never merged.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from pymatgen.core import IStructure, Structure

from dfm_core.atomic_io import hidden_name, visible_files
from matgen.cif import DATA_BLOCK, crystal_blocks, parse_cif

__all__ = ["InputItem", "error_text", "parse_cif", "read_inputs"]

ID_COLUMNS = ("material_id", "id", "name", "file")
TABLE_SUFFIXES = (
    ".csv",
    ".csv.gz",
    ".csv.bz2",
    ".csv.xz",
    ".csv.zip",
    ".parquet",
    ".pq",
)
CIF_SUFFIXES = (".cif", ".cif.gz")
ARCHIVE_SUFFIXES = (".zip",)  # after TABLE_SUFFIXES, which claim .csv.zip
EXTXYZ_SUFFIXES = (".extxyz", ".xyz")
POSCAR_SUFFIXES = (".vasp", ".poscar")
POSCAR_NAMES = ("POSCAR", "CONTCAR")
MAX_MEMBER_BYTES = 64 * 2**20  # an archive member larger than this is not unpacked (zip bombs)
MANIFEST_NAME = "samples.csv"  # written by ``matgen generate`` next to its CIFs
# The version of the rules that read and judge a crystal (CIF reading, cell reduction, sanity bounds).
# Raise it when they change what a crystal's verdict can be: journal records of an older version are redone.
# 2: CIF2 names, CR line endings, 3-decimal special positions, refined full occupancies, LLL cell for the
#    width bound (session 7).
READ_RULES = 2


@dataclass
class InputItem:
    """One input crystal before parsing: ``cif`` text, or an in-memory ``structure``."""

    id: str
    cif: str | None = None
    structure: Structure | None = None
    read_error: str | None = None

    @property
    def digest(self) -> str:
        """A short hash of the content and of :data:`READ_RULES`: a resumed run recomputes a crystal whose
        input changed, or that an earlier version of the reading and judging rules evaluated."""
        if self.structure is not None:
            payload = f"{READ_RULES}|{self.structure.as_dict()!r}".encode()
        else:
            payload = f"{READ_RULES}|{self.cif!r}|{self.read_error!r}".encode()
        return hashlib.sha1(payload).hexdigest()[:16]


def error_text(exc: BaseException, limit: int = 300) -> str:
    """An exception as one line: its message lines joined (pymatgen puts the cause on the second line)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return "; ".join(lines)[:limit] if lines else type(exc).__name__


def _unique(ids: list[str]) -> list[str]:
    """``ids`` with repeats renamed ``id#k``, never onto a name that another input already has."""
    reserved = set(ids)
    kept: set[str] = set()
    counters: dict[str, int] = {}
    out = []
    for i in ids:
        if i not in kept:
            kept.add(i)
            out.append(i)
            continue
        k = counters.get(i, 0) + 1
        while f"{i}#{k}" in reserved:
            k += 1
        counters[i] = k
        reserved.add(f"{i}#{k}")
        out.append(f"{i}#{k}")
    return out


def _decode(data: bytes) -> str:
    """Text from bytes: UTF-16 after its byte-order mark, else UTF-8; every line ending as ``\n``."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = data.decode("utf-16", errors="replace")
    else:
        text = data.decode("utf-8-sig", errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _unpacked_text(data: bytes) -> str:
    """A file's text from its bytes: gunzipped when it is gzip data (whatever its name), then
    :func:`_decode`."""
    return _decode(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)


def _read_text(path: Path) -> tuple[str | None, str | None]:
    try:
        return _unpacked_text(path.read_bytes()), None
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        return None, f"unreadable file: {exc}"


def _cif_items(text: str, id_: str) -> list[InputItem]:
    """One item per crystal block of a CIF's text (id ``id_:block`` when the text holds several)."""
    return [InputItem(id=f"{id_}:{name}" if name else id_, cif=block) for name, block in crystal_blocks(text)]


def _file_items(path: Path, id_: str) -> list[InputItem]:
    text, err = _read_text(path)
    if text is None:
        return [InputItem(id=id_, read_error=err)]
    return _cif_items(text, id_)


def _zip_items(path: Path) -> list[InputItem]:
    import zipfile

    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ValueError(f"cannot read the archive {path}: {error_text(exc)}") from None
    items: list[InputItem] = []
    with archive:
        members = sorted(
            (m for m in archive.infolist() if not m.is_dir() and m.filename.lower().endswith(CIF_SUFFIXES)),
            key=lambda m: m.filename,
        )
        for m in members:
            if any(hidden_name(part) for part in m.filename.split("/")):
                continue
            id_ = f"{path.name}/{m.filename}"
            if m.file_size > MAX_MEMBER_BYTES:
                items.append(
                    InputItem(id=id_, read_error=f"archive member of {m.file_size} bytes: too large")
                )
                continue
            if m.flag_bits & 0x1:
                items.append(InputItem(id=id_, read_error="encrypted archive member (password required)"))
                continue
            try:
                text = _unpacked_text(archive.read(m))
            except (
                OSError,
                EOFError,
                ValueError,
                RuntimeError,  # zipfile: an encrypted member (also caught above, by its flag)
                NotImplementedError,  # zipfile: a compression method it cannot unpack (deflate64, ...)
                zipfile.BadZipFile,
                gzip.BadGzipFile,
            ) as exc:
                items.append(InputItem(id=id_, read_error=f"unreadable archive member: {error_text(exc)}"))
                continue
            items.extend(_cif_items(text, id_))
    if not items:
        raise ValueError(f"the archive {path} holds no .cif files")
    return items


def _extxyz_items(path: Path) -> list[InputItem]:
    """One item per frame. Frames are split by their atom-count lines first, so that a malformed
    coordinate costs only its own frame; a count line that cannot be read ends the file (one failure
    row for what is left, as the frames after it cannot be told apart)."""
    text, err = _read_text(path)
    if text is None:
        return [InputItem(id=f"{path.name}:0", read_error=err)]
    lines = text.splitlines()
    items: list[InputItem] = []
    at = 0
    while at < len(lines):
        if not lines[at].strip():
            at += 1
            continue
        id_ = f"{path.name}:{len(items)}"
        try:
            count = int(lines[at].split()[0])
            if count < 0:
                raise ValueError(count)
        except (ValueError, IndexError):
            why = f"line {at + 1} is not an atom count ({lines[at][:40]!r})"
            items.append(InputItem(id=id_, read_error=f"unreadable extxyz from this frame on: {why}"))
            break
        frame = lines[at : at + 2 + count]
        at += 2 + count
        items.append(_extxyz_frame(id_, frame, count))
    return items


def _extxyz_frame(id_: str, lines: list[str], count: int) -> InputItem:
    from ase.io import read as ase_read

    if count == 0:
        return InputItem(id=id_, read_error="extxyz frame with no atoms")
    if len(lines) < 2 + count:
        return InputItem(id=id_, read_error=f"extxyz frame cut short: {len(lines) - 2} of {count} atom lines")
    try:
        atoms = ase_read(io.StringIO("\n".join(lines) + "\n"), format="extxyz")
    except Exception as exc:  # ase raises many types for a malformed frame
        return InputItem(id=id_, read_error=f"unreadable extxyz frame: {error_text(exc)}")
    return _atoms_item(id_, atoms, "extxyz frame")


def _atoms_item(id_: str, atoms, what: str) -> InputItem:  # atoms: ase.Atoms
    """The crystal of an ASE ``Atoms`` (species and positions only: per-site extras such as forces or
    magnetic moments are not part of the crystal)."""
    from pymatgen.io.ase import AseAtomsAdaptor

    if len(atoms) == 0:
        return InputItem(id=id_, read_error=f"{what} with no atoms")
    if not atoms.pbc.all() or atoms.cell.rank < 3:
        return InputItem(id=id_, read_error=f"{what} without a periodic 3D cell (Lattice/pbc)")
    try:
        structure = AseAtomsAdaptor.get_structure(atoms)
    except Exception as exc:
        return InputItem(id=id_, read_error=f"{what} not convertible: {error_text(exc)}")
    return InputItem(id=id_, structure=Structure(structure.lattice, structure.species, structure.frac_coords))


def _poscar_items(path: Path) -> list[InputItem]:
    text, err = _read_text(path)
    if text is None:
        return [InputItem(id=path.name, read_error=err)]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            structure = Structure.from_str(text, fmt="poscar")
    except Exception as exc:
        return [InputItem(id=path.name, read_error=f"unparsable POSCAR: {error_text(exc)}")]
    if any("false names" in str(w.message) for w in caught):  # VASP 4 files: pymatgen invents H, He, ...
        return [InputItem(id=path.name, read_error="POSCAR without element symbols (VASP 4 format)")]
    if len(structure) == 0:
        return [InputItem(id=path.name, read_error="POSCAR with no atoms")]
    return [InputItem(id=path.name, structure=structure)]


def _read_frame(path: Path) -> pd.DataFrame:
    name = path.name.lower()
    try:
        if name.endswith((".parquet", ".pq")):
            return pd.read_parquet(path)
        frame = pd.read_csv(path, dtype=dict.fromkeys(ID_COLUMNS, str))  # ids "00001" and "1" stay apart
    except Exception as exc:  # pandas/pyarrow raise many types for a bad file
        raise ValueError(f"cannot read the table {path}: {error_text(exc)}") from None
    # an id column of whole numbers with a gap is written by pandas as floats (1.0, , 3.0): the ids were 1, 3
    for column in (c for c in ID_COLUMNS if c in frame.columns):
        ids = frame[column].dropna()
        if len(ids) and ids.str.fullmatch(r"-?\d+\.0").all():
            frame[column] = frame[column].str.removesuffix(".0")
    return frame


def _cell_text(value: object) -> str | None:
    if isinstance(value, bytes | bytearray):
        return _decode(bytes(value))
    return value if isinstance(value, str) else None


def _id_text(value: object) -> str:
    """An id cell as text; a whole number that pandas read as a float (a column with a NaN) loses '.0'."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _table_items(path: Path, frame: pd.DataFrame) -> list[InputItem]:
    if "cif" not in frame.columns and "file" not in frame.columns:
        raise ValueError(f"{path} has neither a 'cif' nor a 'file' column (columns: {list(frame.columns)})")
    id_col = next((c for c in ID_COLUMNS if c in frame.columns), None)
    raw_ids = list(frame[id_col]) if id_col else [None] * len(frame)
    ids = _unique(
        [
            _id_text(x) if x is not None and pd.notna(x) and str(x).strip() else f"row{k}"
            for k, x in enumerate(raw_ids)
        ]
    )
    if "cif" in frame.columns:
        items = []
        for i, cell in zip(ids, frame["cif"], strict=True):
            c = _cell_text(cell)
            missing = cell is None or (pd.api.types.is_scalar(cell) and pd.isna(cell))
            if c is None and not missing:
                what = f"{str(cell)[:40]!r} ({type(cell).__name__})"
                items.append(InputItem(id=i, read_error=f"the cif cell holds {what}, not CIF text"))
            elif c is None or not c.strip():
                items.append(InputItem(id=i, read_error="empty CIF"))
            else:  # a cell holding several crystals gives one row each, as a file does
                items.extend(_cif_items(c, i))
        return items
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


def _folder_items(folder: Path) -> list[InputItem]:
    manifest = folder / MANIFEST_NAME
    listed: list[InputItem] = []
    listed_files: set[str] = set()
    if manifest.is_file():
        try:
            frame = _read_frame(manifest)
        except ValueError as exc:
            warnings.warn(f"ignoring {manifest}: {exc}; reading the CIF files instead", stacklevel=3)
            frame = None
        if frame is not None and "file" in frame.columns:
            listed = _table_items(manifest, frame)
            listed_files = {
                (folder / f).resolve().as_posix() for f in frame["file"] if isinstance(f, str) and f.strip()
            }
    extra: list[InputItem] = []
    for f in visible_files(folder, ("",), skip_dir=_evaluation_folder):
        if f.resolve().as_posix() in listed_files:
            continue
        name, rel = f.name.lower(), f.relative_to(folder).as_posix()
        if name.endswith(CIF_SUFFIXES):
            extra.extend(_file_items(f, rel))
        elif name.endswith(POSCAR_SUFFIXES) or f.name.startswith(POSCAR_NAMES):
            extra.extend(InputItem(rel, it.cif, it.structure, it.read_error) for it in _poscar_items(f))
        elif name.endswith(EXTXYZ_SUFFIXES):
            prefix = rel[: -len(f.name)]
            extra.extend(
                InputItem(prefix + it.id, it.cif, it.structure, it.read_error) for it in _extxyz_items(f)
            )
    if listed and extra:
        warnings.warn(
            f"{len(extra)} CIF(s) in {folder} are not listed in {MANIFEST_NAME}; they are evaluated too",
            stacklevel=3,
        )
    return listed + extra


def _evaluation_folder(folder: Path) -> bool:
    """A folder an evaluation writes into (it holds a journal): its relaxed ``candidates/*.cif`` are
    outputs, not inputs, when ``--out`` lies inside the folder of crystals being evaluated."""
    return (folder / "journal.jsonl").is_file()


def _with_unique_ids(items: list[InputItem]) -> list[InputItem]:
    """The items with printable ids (a file name that is not UTF-8 keeps its odd bytes as ``\\xfe``, so
    the tables can be written) and repeated ids suffixed ``#k`` (two blocks named ``data_FeO`` in one
    file, say)."""
    printable = [_printable(it.id) for it in items]
    return [
        InputItem(i, it.cif, it.structure, it.read_error)
        for i, it in zip(_unique(printable), items, strict=True)
    ]


def _printable(text: str) -> str:
    """``text`` with the lone surrogates of undecodable bytes (``os.fsdecode``) written as ``\\xNN``."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that stands for no byte
        raw = text.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "backslashreplace")


Inputs = str | Path | Structure | pd.DataFrame | Sequence[Structure | str]


def read_inputs(inputs: Inputs) -> list[InputItem]:
    """Collect the crystals to evaluate (see module docstring for the accepted forms and ids).

    Besides paths, a notebook may pass CIF text, a pandas DataFrame with a ``cif`` (or ``file``) column,
    a pymatgen (I)Structure or ASE ``Atoms``, or a list mixing those and CIF strings (ids ``s{i}``).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: a table that cannot be read or lacks a ``cif``/``file`` column, or a file of an
            unknown kind.
        TypeError: a list item that is none of the above.
    """
    return _with_unique_ids(_read_items(inputs))


def _is_cif_text(value: object) -> bool:
    """CIF text rather than a path: several lines, one of them opening a data block."""
    return isinstance(value, str) and "\n" in value.strip() and DATA_BLOCK.search(value) is not None


def _is_atoms(value: object) -> bool:
    return type(value).__name__ == "Atoms" and type(value).__module__.startswith("ase")


def _object_items(value: object, id_: str) -> list[InputItem]:
    """The items of one in-memory input: a structure, ASE atoms, or CIF text."""
    if isinstance(value, IStructure):
        if not len(value):
            return [InputItem(id=id_, read_error="structure with no atoms")]
        structure = value if isinstance(value, Structure) else Structure.from_sites(value)
        return [InputItem(id=id_, structure=structure)]
    if _is_atoms(value):
        return [_atoms_item(id_, value, "ASE Atoms")]
    if _is_cif_text(value):
        return _cif_items(_decode(value.encode()), id_)
    raise TypeError(
        f"input {id_} is of type {type(value).__name__}; give pymatgen Structures, ASE Atoms or CIF text "
        "(or a path, or a table with a cif column)"
    )


def _read_items(inputs: Inputs) -> list[InputItem]:
    if isinstance(inputs, pd.DataFrame):
        if "cif" not in inputs.columns and "file" not in inputs.columns:
            raise ValueError(
                f"the DataFrame has neither a 'cif' nor a 'file' column (columns: {list(inputs.columns)})"
            )
        return _table_items(Path.cwd() / "DataFrame", inputs)  # a file column is relative to the cwd
    if _is_cif_text(inputs):
        return _cif_items(_decode(inputs.encode()), "cif")
    if not isinstance(inputs, str | Path):
        values = [inputs] if isinstance(inputs, IStructure) or _is_atoms(inputs) else list(inputs)
        return [item for i, value in enumerate(values) for item in _object_items(value, f"s{i}")]
    path = Path(inputs).expanduser()
    if path.is_dir():
        return _folder_items(path)
    if not path.exists():
        raise FileNotFoundError(f"no such input: {path}")
    name = path.name.lower()
    if name.endswith(TABLE_SUFFIXES):
        return _table_items(path, _read_frame(path))
    if name.endswith(CIF_SUFFIXES):
        return _file_items(path, path.name)
    if name.endswith(ARCHIVE_SUFFIXES):
        return _zip_items(path)
    if name.endswith(EXTXYZ_SUFFIXES):
        return _extxyz_items(path)
    if name.endswith(POSCAR_SUFFIXES) or path.name.startswith(POSCAR_NAMES):
        return _poscar_items(path)
    text, _ = _read_text(path)
    if text is not None and DATA_BLOCK.search(text):
        return _file_items(path, path.name)  # a CIF under another name
    raise ValueError(
        f"{path}: unknown input kind; expected a folder, a .cif[.gz] file, a .zip of CIFs, an .extxyz "
        f"file, a POSCAR, or a table ({', '.join(TABLE_SUFFIXES)})"
    )
