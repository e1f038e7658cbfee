"""CIF text in and out: :func:`parse_cif` reads any CIF the way every matgen command does, and
:func:`p1_cif` writes decoded crystals fast (P1, ordered, element species).

``matgen generate`` writes thousands of CIFs right after sampling; pymatgen's ``Structure.to(fmt="cif")``
spends about 0.6 ms a crystal on generic work (symmetry-free CifWriter, site objects, CifBlock layout)
and building the ``Structure`` costs as much again. :func:`p1_cif` formats the same text directly from a
lattice, element symbols and fractional coordinates: for the crystals the tokenizer decodes it is
byte-identical to pymatgen's output (tested on MP-20), and anything outside its simple layout (a formula
too long for one CIF line) falls back to pymatgen itself.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from pymatgen.core import Composition, Lattice, Structure

__all__ = [
    "DATA_BLOCK",
    "crystal_blocks",
    "formula_fields",
    "lattice_volume",
    "normalised_cif_text",
    "p1_cif",
    "parse_cif",
]

_MAX_LINE = 70  # pymatgen's CifBlock.max_len
DATA_BLOCK = re.compile(r"^[ \t]*data_(\S*)", re.IGNORECASE | re.MULTILINE)
_ATOM_SITE = re.compile(r"_atom_site[_.]", re.IGNORECASE)
_CIF2_TAG = re.compile(r"^([ \t]*_[A-Za-z0-9_]+)\.(?=[A-Za-z0-9_])", re.MULTILINE)  # _cell.length_a
FRAC_TOLERANCE = 1.5e-3  # 0.333 / 0.667 at special positions (3-decimal ICSD files) mean 1/3, 2/3
FULL_OCCUPANCY = 0.98  # a one-element site refined to 0.998(5) is a full site, not a disordered one
_HEADER = "# generated using pymatgen"  # kept, so the files are the ones pymatgen would have written


def _field(value: str) -> str:
    """A CIF value quoted as pymatgen's CifBlock quotes it (values here are short and never start with ';')."""
    if " " in value or value.startswith("_"):
        return f"'{value}'"
    return value


@lru_cache(maxsize=65536)
def _formula_fields_of(counts: tuple[tuple[str, int], ...]) -> tuple[str, str, int]:
    composition = Composition(dict(counts))
    _, units = composition.get_reduced_composition_and_factor()
    return composition.formula, composition.reduced_formula, int(units)


def formula_fields(species: Sequence[str]) -> tuple[str, str, int]:
    """``(formula, reduced_formula, formula units)`` of pymatgen's ``Composition`` of these sites, cached
    by composition (generated crystals repeat compositions; pymatgen takes ~0.2 ms to reduce one)."""
    return _formula_fields_of(tuple(Counter(species).items()))


def p1_cif(lattice: Lattice, species: Sequence[str], frac_coords: np.ndarray) -> str:
    """CIF text of a P1 crystal, the same text as ``Structure(lattice, species, frac_coords).to(fmt="cif")``.

    Args:
        lattice: the cell. species: one element symbol per site. frac_coords: ``(n, 3)`` fractional.
    """
    formula_sum, reduced, units = formula_fields(species)
    if (
        len("_chemical_formula_sum") + len(formula_sum) + 6 >= _MAX_LINE
        or len("_chemical_formula_structural") + len(reduced) + 6 >= _MAX_LINE
    ):  # a long formula goes on a line of its own: a rare layout, left to pymatgen
        return Structure(lattice, list(species), frac_coords).to(fmt="cif")
    f8 = "{:.8f}".format
    lines = [
        _HEADER,
        f"data_{reduced}",
        "_symmetry_space_group_name_H-M   'P 1'",
        f"_cell_length_a   {f8(lattice.a)}",
        f"_cell_length_b   {f8(lattice.b)}",
        f"_cell_length_c   {f8(lattice.c)}",
        f"_cell_angle_alpha   {f8(lattice.alpha)}",
        f"_cell_angle_beta   {f8(lattice.beta)}",
        f"_cell_angle_gamma   {f8(lattice.gamma)}",
        "_symmetry_Int_Tables_number   1",
        f"_chemical_formula_structural   {_field(reduced)}",
        f"_chemical_formula_sum   {_field(formula_sum)}",
        f"_cell_volume   {f8(lattice.volume)}",
        f"_cell_formula_units_Z   {int(units)}",
        "loop_",
        " _symmetry_equiv_pos_site_id",
        " _symmetry_equiv_pos_as_xyz",
        "  1  'x, y, z'",
        "loop_",
        " _atom_site_type_symbol",
        " _atom_site_label",
        " _atom_site_symmetry_multiplicity",
        " _atom_site_fract_x",
        " _atom_site_fract_y",
        " _atom_site_fract_z",
        " _atom_site_occupancy",
    ]
    for i, (symbol, (x, y, z)) in enumerate(zip(species, np.asarray(frac_coords).tolist(), strict=True)):
        lines.append(f"  {symbol}  {symbol}{i}  1  {f8(x)}  {f8(y)}  {f8(z)}  1")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- reading
def parse_cif(text: str, keep_shared_sites: bool = True) -> Structure:
    """Parse the first structure of a CIF (conventional setting as written, no primitive reduction).

    With ``keep_shared_sites``, a P1 CIF with two atoms on one site (a common generator failure, which
    pymatgen merges into one over-occupied site and refuses) is read with its sites as written, so that an
    evaluation can call it structurally invalid and still count its composition; without it (training
    data) such a CIF is refused.

    Read as meant rather than as written: any line endings and CIF2 dotted names
    (:func:`normalised_cif_text`); 3-decimal coordinates at special positions, 0.333 and 0.667, as 1/3
    and 2/3 (:data:`FRAC_TOLERANCE`; otherwise symmetry copies of one atom land 0.003 A apart); and
    one-element sites refined to an occupancy of at least :data:`FULL_OCCUPANCY` as full sites.

    Raises:
        ValueError: empty text, a cell length <= 0, a cell angle outside (0, 180) or angles that form no
            cell, a site occupancy <= 0 (pymatgen would take the absolute value or drop the site silently),
            Cartesian positions only, an empty atom-site loop, or nothing pymatgen can read.
    """
    from pymatgen.io.cif import CifParser

    if not text or not text.strip():
        raise ValueError("empty CIF")
    text = normalised_cif_text(text)
    block = _first_block(text)
    if block is not None:
        _check_values(block)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen warns per CIF about rounding and occupancies
        try:
            parser = CifParser(io.StringIO(text), frac_tolerance=FRAC_TOLERANCE)
        except ZeroDivisionError:  # pymatgen's reading of a loop_ that has names but no values
            raise ValueError("a loop_ of the CIF has no values (an empty atom-site list?)") from None
        try:
            structures = parser.parse_structures(primitive=False, on_error="raise")
        except ValueError as exc:
            shared = keep_shared_sites and "exceeded tolerance" in str(exc)
            as_written = _p1_sites_as_written(block) if shared else None
            if as_written is None:
                raise
            structures = [as_written]
    if not structures:
        raise ValueError("no structure in CIF")
    return _nearly_full_sites_filled(structures[0])


def normalised_cif_text(text: str) -> str:
    """CIF text with any line endings (CRLF, old-Mac CR) as ``\n`` and CIF2 dotted names
    (``_cell.length_a``, ``_atom_site.fract_x``) in the CIF1 spelling (``_cell_length_a``) that the parser
    reads; the CIF2 core dictionary maps its names onto CIF1 names this way."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _CIF2_TAG.sub(r"\1_", text) if _CIF2_TAG.search(text) else text


def _nearly_full_sites_filled(structure: Structure) -> Structure:
    """``structure`` with its sites made full when every site holds one element at an occupancy of at
    least :data:`FULL_OCCUPANCY` (refined occupancies such as 0.998(5)); otherwise unchanged."""
    if structure.is_ordered:
        return structure
    species = []
    for site in structure:
        occupancies = list(site.species.items())
        if len(occupancies) != 1 or not FULL_OCCUPANCY <= occupancies[0][1] <= 1.0:
            return structure
        species.append(occupancies[0][0])
    return Structure(structure.lattice, species, structure.frac_coords)


def _first_block(text: str):  # -> pymatgen CifBlock | None
    from pymatgen.io.cif import CifFile

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return next(iter(CifFile.from_str(text).data.values()), None)
    except Exception:
        return None  # the parser proper reports what is wrong


def _number(value: object) -> float | None:
    """A CIF number without its standard uncertainty ("4.213(2)" -> 4.213); None for "." / "?" / text."""
    try:
        return float(re.sub(r"\(.*\)$", "", str(value).strip()))
    except ValueError:
        return None


def _values(block, key: str) -> list:
    values = block.data.get(key)
    return [values] if isinstance(values, str) else list(values or [])


_CELL_KEYS = tuple(f"_cell_length_{x}" for x in "abc") + tuple(
    f"_cell_angle_{x}" for x in ("alpha", "beta", "gamma")
)


def _check_values(block) -> None:
    keys = {k.lower().replace(".", "_") for k in block.data}  # CIF names ignore case; CIF2 spells _cell.x
    if _ATOM_SITE.search("\n".join(block.data)):  # a crystal block: it needs all six cell parameters
        missing = [k for k in _CELL_KEYS if k not in keys]
        if missing:
            raise ValueError(f"the CIF lacks {', '.join(missing)}")
    for axis in "abc":
        for value in _values(block, f"_cell_length_{axis}"):
            number = _number(value)
            if number is not None and number <= 0:
                raise ValueError(f"cell length {axis} = {value} <= 0")
    angles = {}
    for name in ("alpha", "beta", "gamma"):
        for value in _values(block, f"_cell_angle_{name}"):
            number = _number(value)
            if number is not None and not 0 < number < 180:
                raise ValueError(f"cell angle {name} = {value} is outside (0, 180) degrees")
            angles[name] = number
    if len(angles) == 3 and None not in angles.values():
        if lattice_volume((1.0, 1.0, 1.0), list(angles.values())) <= 1e-6:  # sqrt of the angle determinant
            raise ValueError(
                f"cell angles {', '.join(f'{v:g}' for v in angles.values())} do not form a cell "
                "(one is at least the sum of the other two, or the three sum to 360 degrees or more)"
            )
    if "_atom_site_cartn_x" in keys and "_atom_site_fract_x" not in keys:
        raise ValueError(
            "the CIF gives Cartesian atom positions only (_atom_site_Cartn_x); fractional ones "
            "(_atom_site_fract_x) are needed"
        )
    fract_x = next((k for k in block.data if k.lower() == "_atom_site_fract_x"), None)
    if fract_x is not None and not _values(block, fract_x):
        raise ValueError("the CIF's atom-site loop lists no atoms")
    for value in _values(block, "_atom_site_occupancy"):
        number = _number(value)
        if number is not None and number <= 0:
            raise ValueError(f"site occupancy {value} <= 0")


def lattice_volume(abc: Sequence[float], angles_deg: Sequence[float]) -> float:
    """Cell volume from lattice parameters; 0 when the angles cannot close a cell."""
    ca, cb, cg = (math.cos(math.radians(x)) for x in angles_deg)
    det = 1.0 - ca * ca - cb * cb - cg * cg + 2.0 * ca * cb * cg
    if det <= 0.0:
        return 0.0
    return abc[0] * abc[1] * abc[2] * math.sqrt(det)


def _p1_sites_as_written(block) -> Structure | None:
    """The sites of a P1 block exactly as listed (no merging of coincident sites); None if the block has
    symmetry operations other than the identity, partial occupancies, or anything unreadable."""
    if block is None:
        return None
    ops = _values(block, "_symmetry_equiv_pos_as_xyz") or _values(block, "_space_group_symop_operation_xyz")
    if any(re.sub(r"[\s'\"]", "", str(op)).lower() != "x,y,z" for op in ops):
        return None
    try:
        cell = [_number(block.data[f"_cell_length_{x}"]) for x in "abc"]
        cell += [_number(block.data[f"_cell_angle_{x}"]) for x in ("alpha", "beta", "gamma")]
        species = _values(block, "_atom_site_type_symbol")
        coords = [[_number(v) for v in _values(block, f"_atom_site_fract_{x}")] for x in "xyz"]
        occupancy = [_number(v) for v in _values(block, "_atom_site_occupancy")] or [1.0] * len(species)
        if None in cell or not species or any(None in c or len(c) != len(species) for c in coords):
            return None
        if len(occupancy) != len(species) or any(o != 1.0 for o in occupancy):
            return None
        return Structure(
            Lattice.from_parameters(*cell), species, list(zip(*coords, strict=True)), validate_proximity=False
        )
    except Exception:
        return None


def crystal_blocks(text: str) -> list[tuple[str, str]]:
    """``[(block name, block text)]`` of the data blocks that hold atom sites: one entry per crystal of a
    multi-crystal CIF. A CIF with one crystal gives ``[("", its block)]``, without the blocks around it
    that hold no atom sites (the ``data_global`` block of IUCr and COD files); one without any crystal
    gives ``[("", text)]``, so that the parser names what is missing."""
    starts = list(DATA_BLOCK.finditer(text))
    if len(starts) <= 1:
        return [("", text)]
    ends = [m.start() for m in starts[1:]] + [len(text)]
    blocks = [
        (m.group(1) or str(k), text[m.start() : e]) for k, (m, e) in enumerate(zip(starts, ends, strict=True))
    ]
    crystals = [b for b in blocks if _ATOM_SITE.search(b[1])]
    if len(crystals) > 1:
        return crystals
    return [("", crystals[0][1] if crystals else text)]
