"""Crystal tokenizer: ``Structure`` <-> a flat sequence of 878-way tokens (App. E.2 of the KO-DFM paper).

A crystal with ``a`` atoms becomes ``6 + 4 * a`` tokens::

    [len_a, len_b, len_c, alpha, beta, gamma, (Z_1, x_1, y_1, z_1), ..., (Z_a, x_a, y_a, z_a)]

The vocabulary (878 ids, this exact layout; other modules rely on it):

==========  =====  =========================================================
ids         count  meaning
==========  =====  =========================================================
0..499      500    lattice lengths ``i / 10`` Angstrom (0.0 .. 49.9)
500..679    180    lattice angles, integer degrees 0 .. 179
680..780    101    fractional coordinates ``i / 100`` (0.00 .. 1.00)
781..874    94     elements Z = 1 .. 94 (``Element.from_Z(z).symbol``)
875         1      BOS
876         1      MASK
877         1      PAD
==========  =====  =========================================================

Quantisation rounds to the nearest grid value (the paper, following Gruver et al. 2024, truncates);
rounding halves the worst-case error (0.05 A, 0.5 deg, 0.005). Fractional coordinates are wrapped
into [0, 1) first, and a coordinate that rounds up to 1.00 is written as 0.00 (the same point under
periodicity), so ``encode`` never emits the 1.00 token; ``decode`` still accepts it and maps it to 0.0.
Atoms are sorted by (Z, x, y, z) of their tokens so that ``encode`` is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from pymatgen.core import Element, Lattice, Structure

from matgen.cif import lattice_volume

__all__ = [
    "ANGLE_OFFSET",
    "BOS_ID",
    "ELEMENT_OFFSET",
    "ELEMENT_SYMBOLS",
    "FRAC_OFFSET",
    "LENGTH_OFFSET",
    "MASK_ID",
    "MAX_Z",
    "MIN_VOLUME",
    "NUM_ANGLE_TOKENS",
    "NUM_ELEMENT_TOKENS",
    "NUM_FRAC_TOKENS",
    "NUM_LENGTH_TOKENS",
    "PAD_ID",
    "SLOT_ANGLE",
    "SLOT_COORD",
    "SLOT_ELEMENT",
    "SLOT_LENGTH",
    "TOKENIZER_VERSION",
    "VOCAB_SIZE",
    "CrystalTokenizer",
    "DecodeError",
    "DecodedCrystal",
    "TokenizationError",
    "element_token",
    "ids_to_strings",
    "num_atoms_from_length",
    "sequence_length",
    "slot_kinds",
    "token_to_string",
]

TOKENIZER_VERSION = "e2-round-v1"

LENGTH_OFFSET, NUM_LENGTH_TOKENS = 0, 500
ANGLE_OFFSET, NUM_ANGLE_TOKENS = 500, 180
FRAC_OFFSET, NUM_FRAC_TOKENS = 680, 101
ELEMENT_OFFSET, NUM_ELEMENT_TOKENS = 781, 94
BOS_ID, MASK_ID, PAD_ID = 875, 876, 877
VOCAB_SIZE = 878
MAX_Z = NUM_ELEMENT_TOKENS

LENGTH_STEPS = 10  # length tokens per Angstrom
FRAC_STEPS = 100  # fractional-coordinate tokens per unit cell edge
MIN_VOLUME = 0.1  # A^3; decoded cells at or below this are degenerate

# Slot kinds: what a position in the sequence holds.
SLOT_LENGTH, SLOT_ANGLE, SLOT_ELEMENT, SLOT_COORD = 0, 1, 2, 3

ELEMENT_SYMBOLS: tuple[str, ...] = tuple(Element.from_Z(z).symbol for z in range(1, MAX_Z + 1))
_SYMBOL_TO_Z = {symbol: z for z, symbol in enumerate(ELEMENT_SYMBOLS, start=1)}

_SLOT_RANGES = {
    SLOT_LENGTH: (LENGTH_OFFSET, NUM_LENGTH_TOKENS),
    SLOT_ANGLE: (ANGLE_OFFSET, NUM_ANGLE_TOKENS),
    SLOT_ELEMENT: (ELEMENT_OFFSET, NUM_ELEMENT_TOKENS),
    SLOT_COORD: (FRAC_OFFSET, NUM_FRAC_TOKENS),
}
_SLOT_STARTS = np.array([_SLOT_RANGES[k][0] for k in range(4)])  # indexed by slot kind
_SLOT_STOPS = np.array([_SLOT_RANGES[k][0] + _SLOT_RANGES[k][1] for k in range(4)])
_LATTICE_KINDS = np.array([SLOT_LENGTH] * 3 + [SLOT_ANGLE] * 3)
_ATOM_KINDS = np.array([SLOT_ELEMENT, SLOT_COORD, SLOT_COORD, SLOT_COORD])
_SLOT_NAMES = {
    SLOT_LENGTH: "a length",
    SLOT_ANGLE: "an angle",
    SLOT_ELEMENT: "an element",
    SLOT_COORD: "a coordinate",
}


class TokenizationError(ValueError):
    """A structure cannot be written in the 878-token vocabulary."""


class DecodeError(ValueError):
    """A token sequence is not a well-formed crystal."""


class DecodedCrystal(NamedTuple):
    """A decoded crystal before it becomes a ``Structure``: what :meth:`CrystalTokenizer.decode_parts`
    returns. ``frac_coords`` is ``(a, 3)`` in [0, 1); ``species`` are element symbols in token order."""

    lattice: Lattice
    species: list[str]
    frac_coords: np.ndarray


def sequence_length(num_atoms: int) -> int:
    """Number of tokens for a crystal with ``num_atoms`` atoms: ``6 + 4 * num_atoms``."""
    return 6 + 4 * num_atoms


def num_atoms_from_length(length: int) -> int:
    """Inverse of :func:`sequence_length`; raises ``ValueError`` if ``length`` is not ``6 + 4a``, a >= 1."""
    if length < 10 or (length - 6) % 4:
        raise ValueError(f"a crystal sequence has 6 + 4 * a tokens with a >= 1, got length {length}")
    return (length - 6) // 4


def slot_kinds(max_atoms: int) -> torch.LongTensor:
    """Kind of every slot of a sequence with ``max_atoms`` atoms.

    Returns:
        LongTensor of shape ``(6 + 4 * max_atoms,)`` with ``SLOT_LENGTH`` (0), ``SLOT_ANGLE`` (1),
        ``SLOT_ELEMENT`` (2) and ``SLOT_COORD`` (3).
    """
    if max_atoms < 0:
        raise ValueError(f"max_atoms must be >= 0, got {max_atoms}")
    return torch.from_numpy(_slot_kinds(max_atoms)).long()


def _slot_kinds(num_atoms: int) -> np.ndarray:
    """:func:`slot_kinds` as a numpy array (what decoding checks each token against)."""
    return np.concatenate([_LATTICE_KINDS, np.tile(_ATOM_KINDS, num_atoms)])


def element_token(symbol: str) -> int:
    """Token id of an element symbol (``"Fe"`` -> 806); ``ValueError`` for anything outside Z = 1..94."""
    z = _SYMBOL_TO_Z.get(symbol)
    if z is None:
        raise ValueError(f"unknown element symbol {symbol!r}: the vocabulary holds Z = 1..{MAX_Z} (H..Pu)")
    return ELEMENT_OFFSET + z - 1


def token_to_string(token_id: int) -> str:
    """Human-readable form of one token: ``"4.2"``, ``"90"``, ``"0.25"``, ``"Fe"``, ``"<BOS>"``, ..."""
    i = int(token_id)
    if LENGTH_OFFSET <= i < LENGTH_OFFSET + NUM_LENGTH_TOKENS:
        return f"{(i - LENGTH_OFFSET) / LENGTH_STEPS:.1f}"
    if ANGLE_OFFSET <= i < ANGLE_OFFSET + NUM_ANGLE_TOKENS:
        return str(i - ANGLE_OFFSET)
    if FRAC_OFFSET <= i < FRAC_OFFSET + NUM_FRAC_TOKENS:
        return f"{(i - FRAC_OFFSET) / FRAC_STEPS:.2f}"
    if ELEMENT_OFFSET <= i < ELEMENT_OFFSET + NUM_ELEMENT_TOKENS:
        return ELEMENT_SYMBOLS[i - ELEMENT_OFFSET]
    special = {BOS_ID: "<BOS>", MASK_ID: "<MASK>", PAD_ID: "<PAD>"}
    if i in special:
        return special[i]
    raise ValueError(f"token id {i} is outside the vocabulary [0, {VOCAB_SIZE})")


def ids_to_strings(token_ids: torch.Tensor | Sequence[int] | np.ndarray) -> list[str]:
    """:func:`token_to_string` over a 1-D sequence of ids."""
    return [token_to_string(i) for i in _as_int_list(token_ids)]


def _as_int_list(tokens: object) -> list[int]:
    """Flatten a 1-D tensor / ndarray / sequence of integer ids to a list of ints, or raise DecodeError."""
    try:
        if isinstance(tokens, torch.Tensor):
            array = tokens.detach().cpu().numpy()
        else:
            array = np.asarray(tokens)
    except Exception as exc:  # ragged lists and the like
        raise DecodeError(f"tokens are not a 1-D array of integers ({exc})") from exc
    if array.ndim != 1:
        raise DecodeError(f"tokens must be 1-D, got shape {tuple(array.shape)}")
    if array.size == 0:
        return []
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)):
            raise DecodeError("tokens contain non-finite values")
        if not np.all(array == np.round(array)):
            raise DecodeError("tokens contain non-integer values")
    elif array.dtype.kind not in "iub":
        raise DecodeError(f"tokens must be integers, got dtype {array.dtype}")
    return [int(v) for v in array.tolist()]


class CrystalTokenizer:
    """Stateless tokenizer for crystals (App. E.2 of the KO-DFM paper, rounding instead of truncation).

    ``encode`` maps a ``Structure`` with ``a`` atoms to a LongTensor of shape ``(6 + 4a,)``;
    ``decode`` is its inverse up to quantisation and never raises anything but :class:`DecodeError`.
    """

    vocab_size = VOCAB_SIZE
    bos_id, mask_id, pad_id = BOS_ID, MASK_ID, PAD_ID
    version = TOKENIZER_VERSION

    # ------------------------------------------------------------------ encode
    def encode(self, structure: Structure) -> torch.LongTensor:
        """Tokenize one crystal.

        Args:
            structure: an ordered structure with elements Z = 1..94.

        Returns:
            LongTensor of shape ``(6 + 4 * len(structure),)``.

        Raises:
            TokenizationError: disordered sites, unsupported species, zero atoms, or a lattice
                length / angle that rounds outside the vocabulary's cells (0.1-49.9 A, 1-179 deg), so
                that every encoded sequence decodes.
        """
        if len(structure) == 0:
            raise TokenizationError("structure has zero atoms")
        if not structure.is_ordered:
            raise TokenizationError("structure is disordered (a site has partial or mixed occupancy)")

        zs = []
        for index, site in enumerate(structure):
            specie = site.specie
            element = specie if isinstance(specie, Element) else getattr(specie, "element", None)
            if not isinstance(element, Element):
                raise TokenizationError(f"site {index} holds {specie!s}, which is not an element")
            if not 1 <= element.Z <= MAX_Z:
                raise TokenizationError(
                    f"site {index} holds {element.symbol} (Z={element.Z}); the vocabulary stops at Z={MAX_Z}"
                )
            zs.append(element.Z)

        abc = np.asarray(structure.lattice.abc, dtype=np.float64)
        angles = np.asarray(structure.lattice.angles, dtype=np.float64)
        frac = np.asarray(structure.frac_coords, dtype=np.float64)
        if not (np.all(np.isfinite(abc)) and np.all(np.isfinite(angles)) and np.all(np.isfinite(frac))):
            raise TokenizationError("lattice or coordinates contain non-finite values")

        # the 0.0 A and 0 deg tokens exist but never decode to a cell: encoding refuses them too
        length_ids = np.rint(abc * LENGTH_STEPS).astype(np.int64)
        if length_ids.min() < 1 or length_ids.max() >= NUM_LENGTH_TOKENS:
            raise TokenizationError(
                f"lattice lengths {np.round(abc, 3).tolist()} A fall outside the vocabulary's cells [0.1, 49.9] A"
            )
        angle_ids = np.rint(angles).astype(np.int64)
        if angle_ids.min() < 1 or angle_ids.max() >= NUM_ANGLE_TOKENS:
            raise TokenizationError(
                f"lattice angles {np.round(angles, 3).tolist()} deg fall outside the vocabulary's cells [1, 179] deg"
            )
        volume = lattice_volume((length_ids / LENGTH_STEPS).tolist(), angle_ids.astype(float).tolist())
        if not volume > MIN_VOLUME:
            raise TokenizationError(
                f"the cell rounded to the vocabulary ({np.round(abc, 1).tolist()} A, {angle_ids.tolist()} deg) "
                f"is degenerate (volume {volume:.3g} A^3)"
            )

        # Wrap into [0, 1), round, and fold 1.00 back onto 0.00 (same point under periodicity).
        frac_ids = np.rint((frac % 1.0) * FRAC_STEPS).astype(np.int64) % FRAC_STEPS
        atoms = np.column_stack([np.asarray(zs, dtype=np.int64), frac_ids])
        order = np.lexsort(atoms.T[::-1])  # sort by Z, then x, y, z
        atoms = atoms[order]

        atom_tokens = np.empty_like(atoms)
        atom_tokens[:, 0] = ELEMENT_OFFSET + atoms[:, 0] - 1
        atom_tokens[:, 1:] = FRAC_OFFSET + atoms[:, 1:]
        tokens = np.concatenate(
            [LENGTH_OFFSET + length_ids, ANGLE_OFFSET + angle_ids, atom_tokens.reshape(-1)]
        )
        return torch.from_numpy(tokens).long()

    # ------------------------------------------------------------------ decode
    def decode(self, tokens: torch.Tensor | Sequence[int] | np.ndarray) -> Structure:
        """Turn a token sequence back into a ``Structure``.

        Args:
            tokens: 1-D ids of length ``6 + 4a`` (a >= 1), optionally preceded by one BOS and
                followed by any number of PAD tokens, which are stripped.

        Returns:
            The decoded structure (lengths ``i / 10`` A, integer-degree angles, coordinates ``i / 100``).

        Raises:
            DecodeError: for any malformed sequence; no other exception escapes.
        """
        parts = self.decode_parts(tokens)
        try:
            return Structure(parts.lattice, parts.species, parts.frac_coords, coords_are_cartesian=False)
        except Exception as exc:  # pymatgen surprises must not leak out
            raise DecodeError(f"could not build a structure: {type(exc).__name__}: {exc}") from exc

    def decode_parts(self, tokens: torch.Tensor | Sequence[int] | np.ndarray) -> DecodedCrystal:
        """:meth:`decode` without building the ``Structure`` (a third of its time): the same checks, the
        same lattice, species and coordinates. Raises only :class:`DecodeError`."""
        try:
            return self._decode(tokens)
        except DecodeError:
            raise
        except Exception as exc:  # pymatgen or numpy surprises must not leak out
            raise DecodeError(f"could not build a structure: {type(exc).__name__}: {exc}") from exc

    def _decode(self, tokens: object) -> DecodedCrystal:
        ids = _as_int_list(tokens)
        if ids and ids[0] == BOS_ID:
            ids = ids[1:]
        end = len(ids)
        while end > 0 and ids[end - 1] == PAD_ID:
            end -= 1
        ids = ids[:end]
        if len(ids) < 10 or (len(ids) - 6) % 4:
            raise DecodeError(f"sequence has {len(ids)} tokens after stripping PAD; need 6 + 4a with a >= 1")

        array = np.asarray(ids, dtype=np.int64)
        kinds = _slot_kinds((len(ids) - 6) // 4)
        bad = (array < _SLOT_STARTS[kinds]) | (array >= _SLOT_STOPS[kinds])
        if bad.any():
            position = int(bad.argmax())
            token, kind = ids[position], int(kinds[position])
            found = token_to_string(token) if 0 <= token < VOCAB_SIZE else f"out-of-vocabulary id {token}"
            raise DecodeError(f"position {position} expects {_SLOT_NAMES[kind]} token, got {found}")

        abc = [(t - LENGTH_OFFSET) / LENGTH_STEPS for t in ids[0:3]]
        angles = [float(t - ANGLE_OFFSET) for t in ids[3:6]]
        if min(abc) <= 0.0:
            raise DecodeError(f"lattice length of 0.0 A in {abc}")
        if min(angles) <= 0.0:
            raise DecodeError(f"lattice angle of 0 deg in {angles}")
        volume = lattice_volume(abc, angles)
        if not volume > MIN_VOLUME:
            raise DecodeError(
                f"degenerate lattice: lengths {abc} A, angles {angles} deg give volume {volume:.3g} A^3 "
                f"(need > {MIN_VOLUME})"
            )
        lattice = Lattice.from_parameters(*abc, *angles)
        matrix = np.asarray(lattice.matrix)
        if not np.all(np.isfinite(matrix)) or not abs(lattice.volume) > MIN_VOLUME:
            raise DecodeError(f"degenerate lattice: lengths {abc} A, angles {angles} deg")

        atoms = array[6:].reshape(-1, 4)
        species = [ELEMENT_SYMBOLS[t - ELEMENT_OFFSET] for t in atoms[:, 0].tolist()]
        frac = ((atoms[:, 1:] - FRAC_OFFSET) % FRAC_STEPS) / FRAC_STEPS  # 1.00 -> 0.00
        return DecodedCrystal(lattice, species, frac)

    def try_decode(
        self, tokens: torch.Tensor | Sequence[int] | np.ndarray
    ) -> tuple[Structure | None, str | None]:
        """``decode`` that returns ``(structure, None)`` or ``(None, reason)`` instead of raising."""
        try:
            return self.decode(tokens), None
        except DecodeError as exc:
            return None, str(exc)

    def batch_decode(self, tokens: torch.Tensor) -> list[tuple[Structure | None, str | None]]:
        """:meth:`try_decode` over each row of a ``(B, L)`` tensor (PAD-padded rows are fine)."""
        if tokens.dim() != 2:
            raise ValueError(f"batch_decode expects a (B, L) tensor, got shape {tuple(tokens.shape)}")
        return [self.try_decode(row) for row in tokens.cpu()]

    # ------------------------------------------------------------------ masks
    def allowed_token_mask(
        self,
        num_atoms: torch.LongTensor,
        max_atoms: int | None = None,
        elements: Sequence[str] | None = None,
        exclude_zero_length: bool = True,
    ) -> torch.BoolTensor:
        """Tokens allowed at each slot, for constraining logits and samplers.

        Args:
            num_atoms: ``(B,)`` atom count of each crystal.
            max_atoms: padded atom count; defaults to ``num_atoms.max()``.
            elements: restrict element slots to these symbols (all 94 if ``None``).
            exclude_zero_length: forbid the 0.0 A length token, which always decodes to a degenerate cell.

        Returns:
            BoolTensor ``(B, 6 + 4 * max_atoms, VOCAB_SIZE)`` on ``num_atoms.device``. Length, angle,
            element and coordinate slots allow only their kind; slots past ``6 + 4 * num_atoms[b]`` allow
            only PAD. BOS and MASK are never allowed.
        """
        num_atoms = torch.as_tensor(num_atoms)
        if num_atoms.dim() != 1:
            raise ValueError(f"num_atoms must have shape (B,), got {tuple(num_atoms.shape)}")
        if num_atoms.numel() and int(num_atoms.min()) < 0:
            raise ValueError("num_atoms must be non-negative")
        largest = int(num_atoms.max()) if num_atoms.numel() else 0
        if max_atoms is None:
            max_atoms = largest
        if max_atoms < largest:
            raise ValueError(f"max_atoms={max_atoms} is smaller than the largest num_atoms={largest}")

        kind_masks = torch.zeros(4, VOCAB_SIZE, dtype=torch.bool)
        for kind, (start, count) in _SLOT_RANGES.items():
            kind_masks[kind, start : start + count] = True
        if exclude_zero_length:
            kind_masks[SLOT_LENGTH, LENGTH_OFFSET] = False
        if elements is not None:
            ids = [element_token(symbol) for symbol in elements]
            if not ids:
                raise ValueError("elements must name at least one element")
            kind_masks[SLOT_ELEMENT] = False
            kind_masks[SLOT_ELEMENT, ids] = True

        device = num_atoms.device
        per_slot = kind_masks[slot_kinds(max_atoms)].to(device)  # (L, V)
        length = sequence_length(max_atoms)
        used = torch.arange(length, device=device)[None, :] < (6 + 4 * num_atoms)[:, None]  # (B, L)
        pad_only = torch.zeros(VOCAB_SIZE, dtype=torch.bool, device=device)
        pad_only[PAD_ID] = True
        return torch.where(used[..., None], per_slot[None], pad_only)
