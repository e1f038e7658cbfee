"""MP-20 data: find or download the split CSVs, parse CIFs, tokenize, cache, and batch.

The splits are the CDVAE ones (Xie et al. 2021): ``{train,val,test}.csv[.gz]`` (or ``.parquet``, for a data
set of one's own) with at least the columns ``material_id`` (unique) and ``cif``. Where they live is decided
by :func:`resolve_data_dir`; a missing split is downloaded from ``DEFAULT_BASE_URL`` (CDVAE's repository)
into that directory, unless the directory holds split files of its own.

Data flow::

    load_split -> load_structures -> CrystalTokenizer.encode -> load_token_dataset (cached .pt)
               -> collate_tokens -> (tokens (B, 6 + 4A), num_atoms (B,))
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import urllib.error
import urllib.request
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pymatgen.core import Structure
from tqdm.auto import tqdm

from dfm_core.atomic_io import atomic_write, file_sha256, user_cache_dir
from matgen.cif import crystal_blocks, parse_cif
from matgen.tokenizer import (
    PAD_ID,
    TOKENIZER_VERSION,
    CrystalTokenizer,
    TokenizationError,
    num_atoms_from_length,
    sequence_length,
)

__all__ = [
    "DEFAULT_BASE_URL",
    "SPLITS",
    "DownloadError",
    "TokenizedSplit",
    "atom_count_distribution",
    "check_split",
    "collate_tokens",
    "data_set_name",
    "default_token_cache_dir",
    "ensure_split_file",
    "load_split",
    "load_structures",
    "load_token_dataset",
    "pad_to_atoms",
    "resolve_data_dir",
    "sample_atom_counts",
]

DEFAULT_BASE_URL = "https://raw.githubusercontent.com/txie-93/cdvae/main/data/mp_20"
SPLITS = ("train", "val", "test")
DOWNLOAD_MARKER = ".mp20_download"  # in a folder that ensure_split_file fills: more splits may be fetched
REQUIRED_COLUMNS = ("material_id", "cif")
# MP-20 train as the shipped model saw it (matgen.train.ids_digest of its 27,125 ids in file order), and
# the elements of Z = 1..94 that none of those crystals holds (from the pretty_formula column). Checkpoints
# written before train_element_counts was recorded are matched to these facts by their ids digest.
MP20_TRAIN_IDS_SHA256 = "a4f61b0728b180b5a3b7d78d06ec31ffaa61f8555ee9f99993a45b50ca7dc4a0"
MP20_TRAIN_ABSENT_ELEMENTS = ("Ar", "Po", "At", "Rn", "Fr", "Ra")
_CACHE_FORMAT = 2  # 2: a crystal whose cell as written does not tokenize is tried in its Niggli cell


class DownloadError(OSError):
    """A split file is missing locally and could not be downloaded."""


# ---------------------------------------------------------------------------- locating files
def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """Directory holding the MP-20 split files.

    Precedence: the explicit ``data_dir``, then ``$MATGEN_DATA``, then ``$XDG_CACHE_HOME/matgen/mp_20``
    (``~/.cache/matgen/mp_20`` when ``XDG_CACHE_HOME`` is unset). The directory need not exist yet. A
    folder without split files of its own but with an ``mp_20/`` folder that has them (a data root such as
    ``../shared/data``) means that ``mp_20/``.
    """
    if data_dir is not None:
        chosen = Path(data_dir).expanduser()
    elif env := os.environ.get("MATGEN_DATA"):
        chosen = Path(env).expanduser()
    else:
        return user_cache_dir("matgen") / "mp_20"
    if not _has_split_files(chosen) and _has_split_files(chosen / "mp_20"):
        return chosen / "mp_20"
    return chosen


def _has_split_files(directory: Path) -> bool:
    return any(_find_split_file(split, directory) is not None for split in SPLITS)


def data_set_name(data_dir: str | Path | None = None) -> str:
    """ "MP-20" for an MP-20 folder (named ``mp_20`` or downloaded here), else the data folder's name."""
    directory = resolve_data_dir(data_dir)
    if (
        directory.name.lower().replace("-", "_") in ("mp_20", "mp20")
        or (directory / DOWNLOAD_MARKER).is_file()
    ):
        return "MP-20"
    return f"'{directory.resolve().name}'"


def cache_file_prefix(split_file: Path) -> str:
    """How cache files made from ``split_file`` begin: ``mp20`` for MP-20, else the data folder's name
    (made safe for a file name). Cosmetic: the files are keyed by the split file's sha256 as well."""
    if data_set_name(split_file.parent) == "MP-20":
        return "mp20"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", split_file.parent.resolve().name).strip("._")[:40] or "data"


def default_token_cache_dir() -> Path:
    """Where tokenized splits are cached: ``$MATGEN_CACHE/tokens``, else ``$XDG_CACHE_HOME/matgen/tokens``
    (``~/.cache/matgen/tokens``); ``matgen evaluate`` keeps its fingerprints beside it in ``evaluate/``."""
    return user_cache_dir("matgen", "MATGEN_CACHE") / "tokens"


SPLIT_SUFFIXES = (".csv.gz", ".csv", ".parquet")  # in order of preference when a folder holds several


def _find_split_file(split: str, directory: Path) -> Path | None:
    for suffix in SPLIT_SUFFIXES:
        candidate = directory / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _split_like_files(directory: Path) -> list[str]:
    """Names of the entries in ``directory`` that look like a split of a data set (``train.*``, ``Val.tsv``,
    a ``test/`` folder of CIFs ...), read or not: such a folder holds a data set of its own, and MP-20 is
    never downloaded into it."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.name.split(".", 1)[0].lower() in SPLITS)


def _download(url: str, target: Path, timeout: float) -> None:
    """Download ``url`` to ``target`` via a temp file in the same directory and an atomic rename."""

    def fetch(tmp: Path) -> None:
        with tmp.open("wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            total = response.headers.get("Content-Length") if hasattr(response, "headers") else None
            with tqdm(
                total=int(total) if total and total.isdigit() else None,
                unit="B",
                unit_scale=True,
                desc=f"downloading {target.name}",
                leave=False,
            ) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
        with tmp.open("r", encoding="utf-8", errors="replace") as handle:
            header = handle.readline()
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise DownloadError(
                f"downloaded {url} but it does not look like an MP-20 CSV (header lacks {missing}): "
                f"{header[:120]!r}"
            )

    atomic_write(target, fetch, suffix=".part")


def ensure_split_file(
    split: str,
    data_dir: str | Path | None = None,
    base_url: str = DEFAULT_BASE_URL,
    download: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Path of ``{split}.csv.gz``, ``{split}.csv`` or ``{split}.parquet``, downloading ``{base_url}/{split}.csv`` if absent.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        data_dir: see :func:`resolve_data_dir`.
        base_url: where ``{split}.csv`` can be fetched (``https://``, ``http://`` or ``file://``).
        download: if False, a missing file raises ``FileNotFoundError`` instead of being fetched.
        timeout: socket timeout in seconds.

    Raises:
        ValueError: unknown split.
        FileNotFoundError: missing and ``download=False``.
        DownloadError: missing and the download failed; the message names the URL and the target path.
    """
    _check_split(split)
    directory = resolve_data_dir(data_dir)
    found = _find_split_file(split, directory)
    if found is not None:
        return found
    url = f"{base_url.rstrip('/')}/{split}.csv"
    target = directory / f"{split}.csv"
    others = _split_like_files(directory)
    if others and not (directory / DOWNLOAD_MARKER).is_file():
        # a folder with a data set of its own: never mix a downloaded MP-20 split into it
        raise FileNotFoundError(
            f"{directory} holds {', '.join(others)} but no {split}.csv[.gz] or {split}.parquet; a data folder "
            f"needs all of {', '.join(f'{s}.csv' for s in SPLITS)} (or .csv.gz, .parquet) (MP-20 is downloaded "
            "only into an empty or new folder)"
        )
    if not download:
        raise FileNotFoundError(
            f"no {split}.csv.gz, {split}.csv or {split}.parquet in {directory}; pass download=True to fetch {url}, "
            f"or point MATGEN_DATA at a directory holding the MP-20 CSVs"
        )
    new_dirs = [d for d in (directory, *directory.parents) if not d.exists()]
    done = False
    try:
        _download(url, target, timeout)
        (directory / DOWNLOAD_MARKER).write_text(f"MP-20 splits downloaded from {base_url}\n")
        done = True
    except DownloadError:
        raise
    except (OSError, urllib.error.URLError, ValueError) as exc:
        raise DownloadError(
            f"could not download MP-20 split {split!r} from {url} to {target}: {exc}"
        ) from exc
    finally:
        for d in [] if done else new_dirs:  # a mistyped --data-dir must not leave folders behind
            with contextlib.suppress(OSError):
                d.rmdir()
    return target


# ---------------------------------------------------------------------------- reading
def load_split(split: str, data_dir: str | Path | None = None, limit: int | None = None) -> pd.DataFrame:
    """Read one split as a DataFrame (columns include ``material_id`` and ``cif``).

    An unnamed index column (as in CDVAE's CSVs) is dropped. ``limit`` keeps the first rows only.

    Raises:
        ValueError: the file is not a table, lacks a required column, or has a blank or repeated
            ``material_id`` (ids key the skipped-row lists and the reference caches, so they must be unique).
    """
    path = ensure_split_file(split, data_dir)
    frame = _read_split_table(path, limit)
    frame["material_id"] = frame["material_id"].astype(str)
    return frame


def check_split(split: str, data_dir: str | Path | None = None, limit: int | None = None) -> Path:
    """The split's file, after the checks of :func:`load_split` (columns, unique ids) on its id column only.

    For commands that read a split late (``matgen evaluate`` reads the test split after its first stage)
    and should refuse a bad one before any work. Raises as :func:`load_split`.
    """
    path = ensure_split_file(split, data_dir)
    _read_split_table(path, limit, ids_only=True)
    return path


def _read_split_table(path: Path, limit: int | None, ids_only: bool = False) -> pd.DataFrame:
    """The table at ``path`` (first ``limit`` rows) with its required columns and unique ids checked;
    with ``ids_only`` just its ``material_id`` column (the CIF column is not parsed)."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 (or None for all rows), got {limit}")
    parquet = path.name.endswith(".parquet")
    with _table_errors(path, parquet):
        if parquet:
            import pyarrow.parquet as pq

            columns = list(pq.read_schema(path).names)
        else:
            columns = list(pd.read_csv(path, nrows=0).columns)
    columns = [c for c in columns if not str(c).startswith("Unnamed:")]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ValueError(
            f"{path} lacks the required columns {missing} (a unique id per row and the CIF text); found "
            f"{columns}: rename or add the columns"
        )
    wanted = ["material_id"] if ids_only else columns
    with _table_errors(path, parquet):
        if parquet:
            frame = pd.read_parquet(path, columns=wanted)
            frame = frame.head(limit) if limit is not None else frame
        else:
            # ids are text: "00001" is not 1 (nor a repeat of another "1")
            frame = pd.read_csv(path, nrows=limit, usecols=wanted, dtype={"material_id": str})[wanted]
    frame = frame.reset_index(drop=True)
    _check_ids(frame["material_id"], path)
    # a parquet column of bytes becomes text for every reader (training, reference, novelty)
    if "cif" in frame.columns:
        frame["cif"] = frame["cif"].map(_cif_text)
    return frame


def _cif_text(value: object) -> object:
    """A CIF cell as text: bytes decoded as UTF-8 (undecodable bytes become U+FFFD and the CIF then fails
    to parse, with that reason); anything else as it is."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    return value


@contextlib.contextmanager
def _table_errors(path: Path, parquet: bool) -> Iterator[None]:
    """Parser errors (an empty file, a wrong format, ...) of reading ``path`` as one ValueError naming it."""
    try:
        yield
    except (ValueError, UnicodeDecodeError, OSError, ImportError, EOFError, zlib.error) as exc:
        # EOFError: a truncated .gz (click would turn it into a bare "Aborted.")
        kind = "parquet" if parquet else "CSV"
        raise ValueError(
            f"cannot read {path} as a {kind} table: {str(exc).strip().splitlines()[0]}"
        ) from None


def _check_ids(ids: pd.Series, path: Path) -> None:
    """Refuse blank or repeated material ids, naming the first one and its data rows (1 = first row)."""
    blank = ids.isna() | (ids.astype(str).str.strip() == "")
    if blank.any():
        rows = (blank[blank].index + 1).tolist()
        raise ValueError(
            f"{path}: {len(rows)} row(s) have no material_id (data rows {_rows_text(rows)}); give every row "
            "a unique id"
        )
    text = ids.astype(str)
    repeated = text[text.duplicated(keep=False)]
    if len(repeated):
        first = repeated.iloc[0]
        rows = (repeated[repeated == first].index + 1).tolist()
        raise ValueError(
            f"{path}: material_id {first!r} appears in {len(rows)} rows (data rows {_rows_text(rows)}); "
            f"{repeated.nunique()} id(s) repeat in all. Give every row a unique id"
        )


def _rows_text(rows: list[int]) -> str:
    return ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")


def _parse_cifs(
    frame: pd.DataFrame, progress: bool, desc: str
) -> tuple[list[str], list[Structure], dict[str, str]]:
    """Parse every CIF; returns (ids, structures, {id: reason} for rows that failed)."""
    ids: list[str] = []
    structures: list[Structure] = []
    failed: dict[str, str] = {}
    rows = zip(frame["material_id"].tolist(), frame["cif"].tolist(), strict=True)
    with warnings.catch_warnings():
        # pymatgen warns per CIF about rounded coordinates; thousands of those drown real problems.
        warnings.simplefilter("ignore")
        for material_id, cif in tqdm(rows, total=len(frame), desc=desc, disable=not progress):
            if not isinstance(cif, str) or not cif.strip():
                failed[material_id] = "empty CIF"
                continue
            if len(blocks := crystal_blocks(cif)) > 1:
                failed[material_id] = f"the CIF holds {len(blocks)} crystals (data blocks); a row holds one"
                continue
            try:  # as matgen evaluate reads CIFs, but a CIF with two atoms on one site is refused
                structure = parse_cif(cif, keep_shared_sites=False)
            except Exception as exc:  # pymatgen raises many types for bad CIFs
                failed[material_id] = f"CIF parse error: {type(exc).__name__}: {exc}"
                continue
            ids.append(material_id)
            structures.append(structure)
    return ids, structures, failed


def load_structures(
    split: str, data_dir: str | Path | None = None, limit: int | None = None, progress: bool = True
) -> tuple[list[str], list[Structure]]:
    """Parse a split's CIFs with pymatgen; unparsable rows are skipped with one warning counting them.

    Returns:
        ``(material_ids, structures)``, in file order.
    """
    frame = load_split(split, data_dir, limit)
    ids, structures, failed = _parse_cifs(frame, progress, desc=f"parsing {split} CIFs")
    if failed:
        examples = ", ".join(list(failed)[:3])
        warnings.warn(
            f"skipped {len(failed)} of {len(frame)} {split} rows whose CIF did not parse (e.g. {examples})",
            stacklevel=2,
        )
    return ids, structures


# ---------------------------------------------------------------------------- tokens
@dataclass
class TokenizedSplit:
    """A tokenized split.

    Attributes:
        ids: material ids of the kept crystals, in file order.
        tokens: one LongTensor of shape ``(6 + 4 * num_atoms[i],)`` per crystal.
        num_atoms: ``(N,)`` atom counts.
        skipped: ``{material_id: reason}`` for rows that did not parse or tokenize.
    """

    ids: list[str]
    tokens: list[torch.LongTensor]
    num_atoms: torch.LongTensor
    skipped: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)


def _cache_path(split_file: Path, split: str, limit: int | None, cache_dir: Path) -> Path:
    key = hashlib.sha256(
        f"{file_sha256(split_file)}|{TOKENIZER_VERSION}|{limit}|{_CACHE_FORMAT}".encode()
    ).hexdigest()[:20]
    return cache_dir / f"{cache_file_prefix(split_file)}-{split}-{key}.pt"


def _save_atomic(payload: dict, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(payload, tmp), suffix=".part")


def _load_cached(path: Path) -> TokenizedSplit:
    """Read a cache file; raises on anything unexpected so the caller can rebuild."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != _CACHE_FORMAT or payload.get("tokenizer_version") != TOKENIZER_VERSION:
        raise ValueError("cache written by another version")
    flat, num_atoms, ids = payload["flat"], payload["num_atoms"], list(payload["ids"])
    lengths = [sequence_length(n) for n in num_atoms.tolist()]
    if len(ids) != len(lengths) or sum(lengths) != flat.numel():
        raise ValueError("inconsistent cache contents")
    tokens = list(torch.split(flat, lengths)) if lengths else []
    return TokenizedSplit(ids, tokens, num_atoms.long(), dict(payload["skipped"]))


def encode_in_some_cell(tokenizer: CrystalTokenizer, structure: Structure) -> torch.LongTensor:
    """The tokens of ``structure`` in its cell as written, or, when that cell does not fit the vocabulary
    (a length over 49.9 A or an angle under 1 deg of a needlessly skewed basis), in its Niggli-reduced
    cell: the same crystal. Raises the first :class:`TokenizationError` when neither fits."""
    try:
        return tokenizer.encode(structure)
    except TokenizationError as first:
        try:
            reduced = structure.get_reduced_structure()
        except Exception:  # a degenerate lattice has no reduced cell
            raise first from None
        if np.allclose(reduced.lattice.matrix, structure.lattice.matrix):
            raise
        try:
            return tokenizer.encode(reduced)
        except TokenizationError:
            raise first from None


def load_token_dataset(
    split: str,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    cache: bool = True,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> TokenizedSplit:
    """Parse and tokenize a split, caching the result.

    Parsing all 27k train CIFs takes a minute or two, so the result is stored as a ``.pt`` file in
    ``cache_dir`` (default :func:`default_token_cache_dir`), keyed by the sha256 of the split file, the
    tokenizer version and ``limit``. Writes are atomic; an unreadable cache is rebuilt.

    Rows that fail to parse or tokenize are left out and listed in ``TokenizedSplit.skipped``.
    """
    split_file = ensure_split_file(split, data_dir)
    path = None
    if cache:
        path = _cache_path(
            split_file, split, limit, Path(cache_dir) if cache_dir else default_token_cache_dir()
        )
        if path.exists():
            try:
                return _load_cached(path)
            except Exception as exc:  # corrupt, truncated or foreign: rebuild
                warnings.warn(f"ignoring unreadable token cache {path} ({exc}); rebuilding", stacklevel=2)

    frame = load_split(split, data_dir, limit)
    ids, structures, skipped = _parse_cifs(frame, progress, desc=f"tokenizing {split}")
    tokenizer = CrystalTokenizer()
    kept_ids: list[str] = []
    tokens: list[torch.LongTensor] = []
    for material_id, structure in zip(ids, structures, strict=True):
        try:
            tokens.append(encode_in_some_cell(tokenizer, structure))
        except TokenizationError as exc:
            skipped[material_id] = f"tokenization error: {exc}"
            continue
        kept_ids.append(material_id)
    num_atoms = torch.tensor([num_atoms_from_length(t.numel()) for t in tokens], dtype=torch.long)
    if skipped:
        examples = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:3])
        warnings.warn(
            f"skipped {len(skipped)} of {len(frame)} {split} rows that did not parse or tokenize "
            f"(e.g. {examples[:300]}); all are listed with their reasons in skipped_rows.csv of the run folder",
            stacklevel=2,
        )

    result = TokenizedSplit(kept_ids, tokens, num_atoms, skipped)
    if path is not None:
        flat = torch.cat(tokens) if tokens else torch.zeros(0, dtype=torch.long)
        payload = {
            "format": _CACHE_FORMAT,
            "tokenizer_version": TOKENIZER_VERSION,
            "ids": kept_ids,
            "flat": flat,
            "num_atoms": num_atoms,
            "skipped": skipped,
        }
        try:
            _save_atomic(payload, path)
        except OSError as exc:  # a read-only cache must not stop training
            warnings.warn(
                f"could not write token cache {path}: {exc} (set MATGEN_CACHE to cache elsewhere)",
                stacklevel=2,
            )
    return result


# ---------------------------------------------------------------------------- batching
def pad_to_atoms(tokens: torch.LongTensor, max_atoms: int) -> torch.LongTensor:
    """Pad (with PAD) or trim trailing PAD so the last dim is ``6 + 4 * max_atoms``.

    Args:
        tokens: ``(L,)`` or ``(B, L)``.
        max_atoms: target atom count.

    Raises:
        ValueError: if trimming would drop non-PAD tokens.
    """
    target = sequence_length(max_atoms)
    length = tokens.shape[-1]
    if length > target:
        if bool((tokens[..., target:] != PAD_ID).any()):
            raise ValueError(f"sequence of length {length} holds more than max_atoms={max_atoms} atoms")
        return tokens[..., :target]
    return torch.nn.functional.pad(tokens, (0, target - length), value=PAD_ID)


def collate_tokens(seqs: list[torch.LongTensor]) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Stack variable-length crystal sequences, PAD-padded to the batch's largest atom count.

    Returns:
        ``tokens`` of shape ``(B, 6 + 4 * A)`` with ``A = max(num_atoms)``, and ``num_atoms`` ``(B,)``.
    """
    if not seqs:
        raise ValueError("collate_tokens needs at least one sequence")
    num_atoms = torch.tensor([num_atoms_from_length(s.numel()) for s in seqs], dtype=torch.long)
    max_atoms = int(num_atoms.max())
    batch = torch.stack([pad_to_atoms(s.long(), max_atoms) for s in seqs])
    return batch, num_atoms


def atom_count_distribution(num_atoms: torch.Tensor, max_atoms: int | None = None) -> torch.Tensor:
    """Empirical distribution of atom counts, indexed by the count itself.

    Args:
        num_atoms: ``(N,)`` atom counts (all >= 1).
        max_atoms: length of the support; defaults to ``num_atoms.max()``.

    Returns:
        float Tensor ``p`` of shape ``(max_atoms + 1,)`` with ``p[k] = P(count = k)`` and ``p[0] = 0``,
        so ``torch.multinomial(p, n, replacement=True)`` draws counts directly.
    """
    num_atoms = torch.as_tensor(num_atoms).long().flatten()
    if num_atoms.numel() == 0:
        raise ValueError("num_atoms is empty")
    if int(num_atoms.min()) < 1:
        raise ValueError("atom counts must be >= 1")
    largest = int(num_atoms.max())
    max_atoms = largest if max_atoms is None else max_atoms
    if max_atoms < largest:
        raise ValueError(f"max_atoms={max_atoms} is smaller than the largest count {largest}")
    counts = torch.bincount(num_atoms, minlength=max_atoms + 1).double()
    return counts / counts.sum()


def sample_atom_counts(
    distribution: torch.Tensor, n: int, generator: torch.Generator | None = None
) -> torch.LongTensor:
    """Draw ``n`` atom counts from :func:`atom_count_distribution`'s output; returns ``(n,)``."""
    return torch.multinomial(distribution.double(), n, replacement=True, generator=generator)
