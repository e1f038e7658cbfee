"""GPT-2 BPE tokenizer plus the MASK token of the mask source (section 8.1 of the KO-DFM paper).

The 50,257 GPT-2 ids are kept unchanged (``<|endoftext|>`` = 50256 separates documents and is the
autoregressive model's BOS); one extra id, ``MASK_ID = 50257``, is appended for the mask source
``p = delta_m``, so every text model has ``VOCAB_SIZE = 50258`` logits. MASK is never a data token.

Files are found from an explicit path, else ``$TEXTGEN_TOKENIZER``, else ``tokenizer/gpt2`` in the
default data root (:func:`default_data_root`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "GPT2_VOCAB_SIZE",
    "EOT_ID",
    "MASK_ID",
    "VOCAB_SIZE",
    "TextTokenizer",
    "default_data_root",
    "default_tokenizer_path",
]

GPT2_VOCAB_SIZE = 50257
EOT_ID = 50256
MASK_ID = GPT2_VOCAB_SIZE
VOCAB_SIZE = GPT2_VOCAB_SIZE + 1
EOT_TEXT = "<|endoftext|>"
MASK_TEXT = "[MASK]"

_REPO_ROOT = Path(__file__).resolve().parents[1]


def default_data_root() -> Path:
    """Where text data and tokenizer files are looked for by default: in a source checkout the shared data
    folder beside it (``<repo>/../shared/data``); in an installed package ``$XDG_DATA_HOME/textgen``
    (``~/.local/share/textgen``), since a path relative to site-packages means nothing to a user."""
    if (_REPO_ROOT / "pyproject.toml").is_file():
        return _REPO_ROOT.parent / "shared" / "data"
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "textgen"


def default_tokenizer_path() -> Path:
    """``$TEXTGEN_TOKENIZER`` if set, else ``tokenizer/gpt2`` in :func:`default_data_root`."""
    env = os.environ.get("TEXTGEN_TOKENIZER")
    if env:
        return Path(env)
    return default_data_root() / "tokenizer" / "gpt2"


def split_points(text: str, every: int, window: int = 1 << 16) -> list[int]:
    """Offsets near each multiple of ``every`` where ``text`` can be cut without changing its GPT-2 ids:
    before a single space that follows a non-space and precedes a letter (the space starts the next
    pre-token, " word"), or after a single newline between two non-space characters (the newline is a
    pre-token of its own; a run of newlines at a piece's end would merge into one). Where no such place lies within ``window`` characters, that cut is skipped."""
    cuts, target = [], every
    while target < len(text):
        end = min(len(text) - 1, target + window)
        for i in range(target, end):
            here, before, after = text[i], text[i - 1], text[i + 1]
            if (here == " " and not before.isspace() and after.isalpha()) or (
                before == "\n" and not here.isspace() and not text[i - 2].isspace()
            ):
                cuts.append(i)
                break
        target = (cuts[-1] if cuts and cuts[-1] >= target else target) + every
    return cuts


class TextTokenizer:
    """GPT-2 BPE (via the ``tokenizers`` library) with an appended MASK id.

    Args:
        path: a ``tokenizer.json`` file or a folder holding one (default: :func:`default_tokenizer_path`).

    Raises:
        FileNotFoundError: no ``tokenizer.json`` there.
        ValueError: the file is not the 50,257-token GPT-2 vocabulary.
    """

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        from tokenizers import Tokenizer

        path = Path(path) if path is not None else default_tokenizer_path()
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"GPT-2 tokenizer not found at {file}: pass --tokenizer DIR or set TEXTGEN_TOKENIZER "
                "to a folder holding tokenizer.json"
            )
        self.file = file
        try:
            self._tok = Tokenizer.from_file(str(file))
        except Exception as exc:  # the tokenizers library raises a bare Exception for bad JSON
            first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise ValueError(
                f"{file} is not a tokenizer file ({first[:160]}): pass --tokenizer DIR or set TEXTGEN_TOKENIZER "
                "to a folder holding GPT-2's tokenizer.json"
            ) from None
        if self._tok.get_vocab_size() != GPT2_VOCAB_SIZE or self._tok.token_to_id(EOT_TEXT) != EOT_ID:
            raise ValueError(
                f"{file} is not the GPT-2 tokenizer (vocab {self._tok.get_vocab_size()}, "
                f"{EOT_TEXT}={self._tok.token_to_id(EOT_TEXT)}; expected {GPT2_VOCAB_SIZE} and {EOT_ID})"
            )

    vocab_size = VOCAB_SIZE
    eot_id = EOT_ID
    mask_id = MASK_ID

    @cached_property
    def digest(self) -> str:
        """SHA-256 of ``tokenizer.json`` (keys the token cache and is stored in checkpoints)."""
        return hashlib.sha256(self.file.read_bytes()).hexdigest()

    def encode(self, text: str) -> list[int]:
        """GPT-2 ids of ``text``; the literal ``<|endoftext|>`` maps to ``EOT_ID``."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str], piece_chars: int = 1 << 20) -> list[list[int]]:
        """GPT-2 ids of each text. A text longer than ``piece_chars`` is encoded in pieces cut where GPT-2's
        pre-tokenizer cuts anyway (:func:`split_points`), so the ids are the same as in one call, while
        the tokenizer's memory stays bounded (one 50 MB call peaked at 7 GB)."""
        pieces, owner = [], []
        for k, text in enumerate(texts):
            cuts = [0, *split_points(text, piece_chars), len(text)]
            for a, b in zip(cuts[:-1], cuts[1:], strict=True):
                pieces.append(text[a:b])
                owner.append(k)
        out: list[list[int]] = [[] for _ in texts]
        for start in range(0, len(pieces), 64):
            for k, e in zip(
                owner[start : start + 64], self._tok.encode_batch(pieces[start : start + 64]), strict=True
            ):
                out[k].extend(e.ids)
        return out

    def decode(self, ids: Sequence[int] | Tensor, show_special: bool = True) -> str:
        """Text of ``ids``. EOT and MASK are shown as ``<|endoftext|>`` and ``[MASK]`` (or dropped)."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        out, run = [], []
        for i in ids:
            if i == MASK_ID or i >= VOCAB_SIZE or i < 0:
                if run:
                    out.append(self._tok.decode(run, skip_special_tokens=not show_special))
                    run = []
                if show_special:
                    out.append(MASK_TEXT if i == MASK_ID else f"[{i}]")
            else:
                run.append(int(i))
        if run:
            out.append(self._tok.decode(run, skip_special_tokens=not show_special))
        return "".join(out)

    def decode_batch(self, batch: Tensor | Sequence[Sequence[int]], show_special: bool = True) -> list[str]:
        return [self.decode(row, show_special) for row in batch]

    def as_tensor(self, text: str) -> Tensor:
        return torch.tensor(self.encode(text), dtype=torch.long)

    def __repr__(self) -> str:
        return f"TextTokenizer({str(self.file)!r}, vocab={VOCAB_SIZE})"
