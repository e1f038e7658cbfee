"""Text corpora -> GPT-2 token streams -> packed sequences, with an on-disk token cache.

Data flow: files -> documents (``str``; detokenised for the tokenized evaluation sets) -> GPT-2 ids,
each document followed by ``<|endoftext|>`` -> one ``uint16`` stream per corpus (cached as ``.npy``)
-> consecutive chunks of ``seq_len`` tokens (:func:`pack`; the ragged tail is dropped).

Named corpora (paths relative to the data folder: ``--data-dir``, else ``$TEXTGEN_DATA``, else ``text``
in the default data root, :func:`textgen.tokenizer.default_data_root`):

* training: ``ptb_train``, ``sotu``, ``wiki_summaries``, ``tinyshakespeare``, ``moby_dick``
  (``train`` names them all);
* evaluation (test splits): ``wikitext2``, ``wikitext103``, ``ptb``, ``lambada``.

Any other text can be given by path: a ``.txt``/``.text``/``.md``/``.tokens`` file is one document, a
``.jsonl`` file one document per line (its ``text`` field, else ``extract``), and a folder means every
such file below it (sorted; other files are skipped with a warning that counts them). Files must be UTF-8: any other encoding is an error
that names the file (no guessing).

The tokenized evaluation sets get the usual detokenisers (those used for GPT-2's zero-shot numbers
and by SEDD/MDLM): WikiText is split into articles at its top-level ``= Title =`` headings, PTB test
is one document, LAMBADA one document per passage.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dfm_core.atomic_io import atomic_write, atomic_write_text, user_cache_dir, visible_files_warning_others
from textgen.tokenizer import EOT_ID, TextTokenizer, default_data_root

__all__ = [
    "TRAIN_CORPORA",
    "EVAL_CORPORA",
    "CorpusSpec",
    "TokenCorpus",
    "default_data_dir",
    "default_cache_dir",
    "wikitext_detokenize",
    "ptb_detokenize",
    "lambada_detokenize",
    "split_wikitext_articles",
    "read_text",
    "read_documents",
    "resolve_corpora",
    "load_corpus",
    "load_corpora",
    "pack",
]

CACHE_VERSION = 1
_TEXT_SUFFIXES = (".txt", ".text", ".md", ".tokens", ".jsonl")


def default_data_dir() -> Path:
    """``$TEXTGEN_DATA`` if set, else ``text`` in :func:`textgen.tokenizer.default_data_root` (in a source
    checkout ``<repo>/../shared/data/text``)."""
    env = os.environ.get("TEXTGEN_DATA")
    return Path(env) if env else default_data_root() / "text"


def default_cache_dir() -> Path:
    """``$TEXTGEN_CACHE`` if set, else ``$XDG_CACHE_HOME/textgen`` (``~/.cache/textgen``), as matgen and
    imagegen place theirs."""
    return user_cache_dir("textgen", "TEXTGEN_CACHE")


# --------------------------------------------------------------------------------------------------
# Detokenisers of the tokenized evaluation sets
# --------------------------------------------------------------------------------------------------

_WT_REPLACEMENTS = [
    (" @-@ ", "-"),
    (" @,@ ", ","),
    (" @.@ ", "."),
    (" : ", ": "),
    (" ; ", "; "),
    (" . ", ". "),
    (" ! ", "! "),
    (" ? ", "? "),
    (" , ", ", "),
]
_WT_BRACKETS = [
    (r"\(\s*([^\)]*?)\s*\)", r"(\1)"),
    (r"\[\s*([^\]]*?)\s*\]", r"[\1]"),
    (r"{\s*([^}]*?)\s*}", r"{\1}"),
    (r"\"\s*([^\"]*?)\s*\"", r'"\1"'),
    (r"'\s*([^']*?)\s*'", r"'\1'"),
]
_WT_TAIL = [
    ("= = = =", "===="),
    ("= = =", "==="),
    ("= =", "=="),
    (" \u00b0 ", "\u00b0"),
    (" \n", "\n"),
    ("\n ", "\n"),
    (" N ", " 1 "),
    (" 's", "'s"),
]


def wikitext_detokenize(text: str) -> str:
    """Undo WikiText's tokenisation (`` @-@ `` -> ``-``, spaces before punctuation, inside brackets...)."""
    text = text.replace("s '", "s'")  # plural possessives
    text = re.sub(r"/' [0-9]/", r"/'[0-9]/", text)
    for old, new in _WT_REPLACEMENTS:
        text = text.replace(old, new)
    for pattern, repl in _WT_BRACKETS:
        text = re.sub(pattern, repl, text)
    for old, new in _WT_TAIL:
        text = text.replace(old, new)
    return text


def ptb_detokenize(text: str) -> str:
    """Undo PTB's (Mikolov) tokenisation; ``N`` (a number) becomes ``1`` and ``<unk>`` becomes ``?``."""
    for old, new in ((" 's", "'s"), ("s ' ", "s' "), (" n't", "n't"), (" \n ", "\n"), ("\\/", "/")):
        text = text.replace(old, new)
    for _ in range(10):  # overlapping matches (" N N ") need several passes
        text = text.replace(" N ", " 1 ")
    return text.replace("$ 1", "$1").replace("# 1", "#1").replace("<unk>", "?")


def lambada_detokenize(text: str) -> str:
    """Straight quotes and a leading newline, as in GPT-2's LAMBADA evaluation."""
    return "\n" + text.replace("\u201c", '"').replace("\u201d", '"').strip()


_WT_HEADING = re.compile(r"^ = [^=].* = $")


def split_wikitext_articles(text: str) -> list[str]:
    """Split a WikiText file into articles at its top-level headings (`` = Title = `` lines)."""
    articles: list[list[str]] = []
    for line in text.splitlines(keepends=True):
        if _WT_HEADING.match(line.rstrip("\n")) or not articles:
            articles.append([])
        articles[-1].append(line)
    return ["".join(a) for a in articles if "".join(a).strip()]


# --------------------------------------------------------------------------------------------------
# Reading documents
# --------------------------------------------------------------------------------------------------


def read_text(path: str | os.PathLike) -> str:
    """A file's text, which must be UTF-8 (newlines normalised to ``\\n``; a leading byte-order mark is
    dropped, not read as a character).

    Raises:
        ValueError: the file is not UTF-8; the message names the file, the line and the byte.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raw = path.read_bytes()
        for magic, kind in (
            (b"\x1f\x8b", "gzip"),
            (b"BZh", "bzip2"),
            (b"\xfd7zXZ", "xz"),
            (b"PK\x03\x04", "zip"),
        ):
            if raw.startswith(magic):
                raise ValueError(f"{path} is {kind}-compressed, not text: decompress it first") from None
        if raw[:4] in (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff"):
            raise ValueError(f"{path} is UTF-32 text: re-encode it, e.g. iconv -f utf-32 -t utf-8") from None
        if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
            raise ValueError(f"{path} is UTF-16 text: re-encode it, e.g. iconv -f utf-16 -t utf-8") from None
        if b"\x00" in raw[:8192]:  # NUL bytes before a decoding error: not text in any 8-bit encoding
            raise ValueError(
                f"{path} is a binary file (it holds NUL bytes), not text: remove it or give the text files"
            ) from None
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            # bytes 0x80-0x9f are control codes in Latin-1 but quotes and dashes in Windows-1252
            source = "cp1252" if any(0x80 <= b <= 0x9F for b in raw) else "latin1"
            raise ValueError(
                f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}): "
                f"re-encode it, e.g. iconv -f {source} -t utf-8"
            ) from None
        raise
    if "\x00" in text:  # valid UTF-8, but text does not hold NUL: UTF-16 without a byte-order mark, or binary
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise ValueError(
            f"{path} holds NUL bytes (line {line}): UTF-16 text without a byte-order mark, or not text; "
            "re-encode it, e.g. iconv -f utf-16le -t utf-8"
        )
    return text


def _jsonl_texts(path: Path, field: str | None = None) -> list[str]:
    docs = []
    for n, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON line ({e})") from None
        if isinstance(row, str):
            docs.append(row)
            continue
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: expected an object or a string")
        keys = [field] if field else ["text", "extract"]
        value = next((row[k] for k in keys if isinstance(row.get(k), str)), None)
        if value is None:  # never guess another field: an id column would become the training text
            found = ", ".join(f"{k} ({type(v).__name__})" for k, v in list(row.items())[:8]) or "none"
            raise ValueError(
                f"{path}:{n}: no text in a field named {' or '.join(keys)}; the line has the fields {found}. "
                "Give each line a 'text' field"
            )
        docs.append(value)
    return docs


_OUTPUT_MARKERS = ("metrics.jsonl", "cells.jsonl")  # a folder holding one is a run / evaluation output


def text_files(folder: str | os.PathLike) -> list[Path]:
    """The text files a folder contributes, sorted: hidden files and folders (macOS ``._x.txt`` resource
    forks, ``__MACOSX``) are skipped, and so are folders that this tool wrote (a ``textgen train`` run
    or an evaluation, recognised by their ``metrics.jsonl`` / ``cells.jsonl``), so that a run folder
    placed inside its data folder never becomes training data, and symlinks back to the folder or to one
    above it (a loop that would read the folders beside it). Other files (images, archives...) are
    skipped with a warning that counts them."""

    def skip_dir(d: Path) -> bool:
        return any((d / m).exists() for m in _OUTPUT_MARKERS)

    files = visible_files_warning_others(folder, _TEXT_SUFFIXES, "text", skip_dir)
    return [p for p in files if p.name not in _OUTPUT_MARKERS]


def read_documents(path: str | os.PathLike) -> list[str]:
    """Documents of a file (``.txt``/``.tokens``: one; ``.jsonl``: one per line) or of a folder
    (:func:`text_files`)."""
    path = Path(path)
    if path.is_dir():
        files = text_files(path)
        if not files:
            raise FileNotFoundError(f"no text files ({', '.join(_TEXT_SUFFIXES)}) under {path}")
        return [d for f in files for d in read_documents(f)]
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    if path.suffix.lower() == ".jsonl":
        return _jsonl_texts(path)
    return [read_text(path)]


@dataclass(frozen=True)
class CorpusSpec:
    """A named corpus: where it lives under the data folder and how to turn it into documents."""

    name: str
    relpath: str
    reader: Callable[[Path], list[str]]
    role: str  # "train" or "eval"
    description: str = ""


def _wikitext(path: Path) -> list[str]:
    return [wikitext_detokenize(a).strip() for a in split_wikitext_articles(read_text(path))]


def _ptb(path: Path) -> list[str]:
    return [ptb_detokenize(read_text(path)).strip()]


def _lambada(path: Path) -> list[str]:
    return [lambada_detokenize(t) for t in _jsonl_texts(path, "text")]


def _plain(path: Path) -> list[str]:
    return read_documents(path)


TRAIN_CORPORA: dict[str, CorpusSpec] = {
    s.name: s
    for s in (
        CorpusSpec("ptb_train", "ptb/ptb.train.txt", _ptb, "train", "Penn Treebank train (detokenised)"),
        CorpusSpec("sotu", "sotu/sotu.jsonl", _plain, "train", "State of the Union addresses 1790-2016"),
        CorpusSpec(
            "wiki_summaries",
            "wiki_vital_summaries/summaries_en.jsonl",
            _plain,
            "train",
            "Wikipedia lead summaries of the vital articles",
        ),
        CorpusSpec("tinyshakespeare", "tinyshakespeare/input.txt", _plain, "train", "tiny-shakespeare"),
        CorpusSpec("moby_dick", "moby_dick/moby_dick.txt", _plain, "train", "Moby Dick"),
    )
}
EVAL_CORPORA: dict[str, CorpusSpec] = {
    s.name: s
    for s in (
        CorpusSpec("wikitext2", "wikitext2/wiki.test.tokens", _wikitext, "eval", "WikiText-2 test"),
        CorpusSpec("wikitext103", "wikitext103/wiki.test.tokens", _wikitext, "eval", "WikiText-103 test"),
        CorpusSpec("ptb", "ptb/ptb.test.txt", _ptb, "eval", "Penn Treebank test"),
        CorpusSpec("lambada", "lambada/lambada_test.jsonl", _lambada, "eval", "LAMBADA test"),
    )
}
_ALL_NAMED = {**TRAIN_CORPORA, **EVAL_CORPORA}


def resolve_corpora(
    items: Iterable[str], data_dir: str | os.PathLike | None = None
) -> list[tuple[str, Path, Callable]]:
    """Turn names (``train``, ``sotu``, ``wikitext2``...) and paths into ``(name, path, reader)`` triples."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    out: list[tuple[str, Path, Callable]] = []
    for item in items:
        if (item == "train" or item in _ALL_NAMED) and Path(item).exists():
            warnings.warn(
                f"{item!r} names a built-in corpus, which is what is read; the {'folder' if Path(item).is_dir() else 'file'} "
                f"{item!r} here is not (write ./{item} to read it)",
                stacklevel=2,
            )
        if item == "train":
            out += [(s.name, data_dir / s.relpath, s.reader) for s in TRAIN_CORPORA.values()]
        elif item in _ALL_NAMED:
            s = _ALL_NAMED[item]
            out.append((s.name, data_dir / s.relpath, s.reader))
        else:
            if not str(item).strip():
                raise ValueError(
                    "an empty data path (an unset shell variable?): give a file, folder or corpus name"
                )
            p = Path(item)
            if not p.exists():
                raise FileNotFoundError(
                    f"{item!r} is neither a corpus name ({', '.join(['train', *_ALL_NAMED])}) nor an existing path"
                )
            out.append((p.stem or p.name, p, read_documents))
    for name, p, _ in out:
        if not p.exists():
            raise FileNotFoundError(
                f"corpus {name!r} not found at {p}: pass --data-dir or set TEXTGEN_DATA to the text data folder"
            )
    return out


# --------------------------------------------------------------------------------------------------
# Token streams and the cache
# --------------------------------------------------------------------------------------------------


@dataclass
class TokenCorpus:
    """A token stream (documents each followed by EOT) and where it came from.

    Attributes:
        name: corpus name(s), joined with ``+``.
        tokens: ``(T,)`` uint16 GPT-2 ids.
        num_documents: documents in the stream.
        sources: the files read.
    """

    name: str
    tokens: np.ndarray
    num_documents: int
    sources: list[str]

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def as_tensor(self) -> Tensor:
        return torch.from_numpy(self.tokens.astype(np.int64))


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    files = text_files(path) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def tokenize_documents(documents: Sequence[str], tokenizer: TextTokenizer, batch: int = 256) -> np.ndarray:
    """GPT-2 ids of ``documents``, each followed by EOT, as one uint16 stream."""
    parts: list[np.ndarray] = []
    eot = np.array([EOT_ID], dtype=np.uint16)
    for start in range(0, len(documents), batch):
        for ids in tokenizer.encode_batch(documents[start : start + batch]):
            parts.append(np.asarray(ids, dtype=np.uint16))
            parts.append(eot)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def load_corpus(
    name: str,
    path: Path,
    reader: Callable[[Path], list[str]],
    tokenizer: TextTokenizer,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> TokenCorpus:
    """Read, tokenize and cache one corpus; a cached stream is reused when file, reader and tokenizer match."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = hashlib.sha256(
        json.dumps([CACHE_VERSION, name, reader.__name__, _file_digest(path), tokenizer.digest]).encode()
    ).hexdigest()[:24]
    file = cache / f"{name}-{key}.npy"
    meta_file = file.with_suffix(".json")
    if use_cache and file.is_file() and meta_file.is_file():
        try:
            tokens = np.load(file, allow_pickle=False)
            meta = json.loads(meta_file.read_text())
            return TokenCorpus(name, tokens, int(meta["num_documents"]), [str(path)])
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry is rebuilt below
    docs = reader(path)
    tokens = tokenize_documents(docs, tokenizer)
    if use_cache:
        facts = {
            "name": name,
            "source": str(path),
            "num_documents": len(docs),
            "num_tokens": int(tokens.shape[0]),
        }
        try:
            atomic_write(file, lambda tmp: np.save(tmp, tokens, allow_pickle=False), suffix=".npy")
            atomic_write_text(meta_file, json.dumps(facts) + "\n")
        except OSError as exc:  # a read-only cache must not stop training or evaluation
            warnings.warn(
                f"could not write the token cache {file} ({exc.strerror or exc}); going on without it "
                "(set TEXTGEN_CACHE or pass --cache-dir to cache elsewhere)",
                stacklevel=2,
            )
    return TokenCorpus(name, tokens, len(docs), [str(path)])


def load_corpora(
    items: Iterable[str],
    tokenizer: TextTokenizer,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> TokenCorpus:
    """Concatenate the token streams of several corpora (names or paths, see :func:`resolve_corpora`)."""
    parts = [
        load_corpus(n, p, r, tokenizer, cache_dir, use_cache) for n, p, r in resolve_corpora(items, data_dir)
    ]
    if not parts:
        raise ValueError("no corpora given")
    return TokenCorpus(
        "+".join(p.name for p in parts),
        np.concatenate([p.tokens for p in parts]),
        sum(p.num_documents for p in parts),
        [s for p in parts for s in p.sources],
    )


def pack(tokens: np.ndarray | Tensor, seq_len: int) -> Tensor:
    """Consecutive chunks of ``seq_len`` tokens: ``(T // seq_len, seq_len)`` long; the tail is dropped."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    t = (
        torch.from_numpy(np.asarray(tokens).astype(np.int64))
        if not isinstance(tokens, Tensor)
        else tokens.long()
    )
    n = t.shape[0] // seq_len
    return t[: n * seq_len].reshape(n, seq_len).clone()
