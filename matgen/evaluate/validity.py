"""Sanity bounds, structural validity and compositional (SMACT) validity of generated crystals.

Sanity bounds (:class:`SanityBounds`, checked right after parsing, before any neighbour search)
    Neighbour searches (pymatgen, CrystalNN, CHGNet's graph) grow with the number of periodic images and
    cell-list bins: a CIF with a 1e12 A lattice makes pymatgen ask for ~100 TB. A crystal outside the bounds
    (non-finite numbers, lattice lengths outside [0.5, 500] A, a cell narrower than 0.5 A between opposite
    faces, volume per atom outside [0.1, 5000] A^3, more than 1000 atoms, disordered sites) is recorded
    with the reason, counted structurally invalid, and never touched by the later stages. A crystal written
    in a needlessly skewed cell is first moved to its LLL-reduced cell (:func:`in_reduced_cell`), so that
    the bounds judge the crystal, not the basis it was written in.

Structural validity (CDVAE, Xie et al. 2021, ``scripts/eval_utils.py::structure_validity``)
    Valid when every interatomic distance, periodic images included, is >= 0.5 A and the cell volume is
    >= 0.1 A^3. CDVAE checks pymatgen's ``distance_matrix`` (minimum-image distances between *distinct*
    sites); here the distance of an atom to its own periodic images (the shortest lattice vector) is also
    checked, which only matters for degenerate cells with a lattice vector below 0.5 A.

Compositional validity (CDVAE ``smact_validity``, with the SMACT 2014 oxidation states)
    Valid when the composition has a single element, or only metals (``smact.metals``, "alloys"), or when
    some combination of oxidation states is charge neutral for the gcd-reduced stoichiometry *and* passes
    the Pauling electronegativity test (every cation less electronegative than every anion).
    Reproduces CDVAE exactly under smact 4.x:

    * Oxidation states: ``Element.oxidation_states_smact14`` (``smact/data/oxidation_states.txt``). CDVAE
      used ``Element.oxidation_states``, which was this set in smact 2.x; smact >= 3 switched that attribute
      (and ``smact_validity``'s default) to the ICSD-2024 set, which changes the numbers.
    * Neutrality: ``sum(ox_i * n_i) == 0`` with the reduced counts ``n_i``; this is what CDVAE's call
      ``smact.neutral_ratios(ox, stoichs=[(n_i,)])`` tested (its return value changed from
      ``(bool, ratios)`` to ``ratios`` in smact 3, so it is not called here).
    * Pauling test: pairs are checked in order; as in smact 2.x with CDVAE's ``except TypeError``, the first
      cation/anion pair with a missing electronegativity makes the test *pass* (smact 4 would fail it).
      Elements without smact14 oxidation states (e.g. noble gases) make a multi-element, non-alloy
      composition invalid (CDVAE would have crashed on them).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from pymatgen.core import Composition, Structure

__all__ = [
    "SanityBounds",
    "check_sanity",
    "largest_vacuum_gap",
    "composition_validity",
    "in_reduced_cell",
    "min_interatomic_distance",
    "structure_validity",
]

STRUCT_CUTOFF = 0.5  # A, CDVAE
MIN_VOLUME = 0.1  # A^3, CDVAE


@dataclass(frozen=True)
class SanityBounds:
    """Limits that keep neighbour searches finite; see the module docstring."""

    min_length: float = 0.5
    max_length: float = 500.0
    min_width: float = 0.5
    min_volume_per_atom: float = 0.1
    max_volume_per_atom: float = 5000.0
    max_atoms: int = 1000


def _is_element(species: object) -> bool:
    """A pymatgen Element, or an ion of one (Species); not a DummySpecies such as ``X``."""
    from pymatgen.core import Element

    return isinstance(species, Element) or isinstance(getattr(species, "element", None), Element)


def check_sanity(structure: Structure, bounds: SanityBounds | None = None) -> str | None:
    """``None`` if the crystal is safe to analyse, else the reason it is not. Costs O(n_atoms)."""
    b = bounds or SanityBounds()
    n = len(structure)
    if n == 0:
        return "no atoms"
    if n > b.max_atoms:
        return f"{n} atoms > {b.max_atoms}"
    if not structure.is_ordered:
        return "disordered (partially occupied) sites are not supported"
    unknown = sorted({str(sp) for sp in structure.composition if not _is_element(sp)})
    if unknown:
        return f"species that are not chemical elements: {', '.join(unknown)}"
    matrix = np.asarray(structure.lattice.matrix, dtype=float)
    if not np.isfinite(matrix).all() or not np.isfinite(structure.frac_coords).all():
        return "non-finite lattice or coordinates"
    lengths = np.linalg.norm(matrix, axis=1)
    if lengths.min() < b.min_length or lengths.max() > b.max_length:
        return f"lattice length out of [{b.min_length}, {b.max_length}] A: {np.round(lengths, 3).tolist()}"
    volume = abs(float(np.linalg.det(matrix)))
    if not math.isfinite(volume) or volume <= 0:
        return "degenerate lattice (zero volume)"
    if _cell_width(matrix, volume) < b.min_width:
        return f"cell narrower than {b.min_width} A"
    vpa = volume / n
    if not (b.min_volume_per_atom <= vpa <= b.max_volume_per_atom):
        return f"volume per atom {vpa:.3g} A^3 outside [{b.min_volume_per_atom}, {b.max_volume_per_atom}]"
    return None


def _cell_width(matrix: np.ndarray, volume: float) -> float:
    """The smallest width between opposite faces of a cell: V / max |a_j x a_k|."""
    areas = np.linalg.norm(np.cross(matrix[[1, 2, 0]], matrix[[2, 0, 1]]), axis=1)
    return volume / areas.max()


def in_reduced_cell(structure: Structure, bounds: SanityBounds | None = None) -> Structure:
    """``structure`` itself, or, when its cell as written is narrower than the sanity bound, the same
    crystal in its LLL-reduced cell. A generator (or a file) may write a crystal in a needlessly skewed
    basis (lengths near 50 A, an angle of a few degrees); judged on that basis it would fail the width
    bound and its neighbour searches would scan many images, though the crystal itself is ordinary."""
    b = bounds or SanityBounds()
    matrix = np.asarray(structure.lattice.matrix, dtype=float)
    if len(structure) == 0 or not np.isfinite(matrix).all():
        return structure
    volume = abs(float(np.linalg.det(matrix)))
    if not volume > 0 or _cell_width(matrix, volume) >= b.min_width:
        return structure
    try:
        return structure.get_reduced_structure(reduction_algo="LLL")
    except Exception:  # a degenerate cell: check_sanity names it
        return structure


def _shortest_lattice_vector(structure: Structure) -> float:
    lll = np.asarray(structure.lattice.get_lll_reduced_lattice().matrix)
    rng = range(-2, 3)
    combos = np.array([c for c in itertools.product(rng, rng, rng) if any(c)], dtype=float)
    return float(np.linalg.norm(combos @ lll, axis=1).min())


def min_interatomic_distance(structure: Structure) -> float:
    """Smallest distance between two atoms, periodic images (including an atom's own) included, in A."""
    self_image = _shortest_lattice_vector(structure)
    if len(structure) < 2:
        return self_image
    dist = np.array(structure.distance_matrix, dtype=float)
    np.fill_diagonal(dist, np.inf)
    return float(min(dist.min(), self_image))


def structure_validity(structure: Structure) -> tuple[bool, str | None]:
    """CDVAE structural validity (min distance >= 0.5 A, volume >= 0.1 A^3): ``(valid, reason)``."""
    if structure.volume < MIN_VOLUME:
        return False, f"volume {structure.volume:.3g} A^3 < {MIN_VOLUME}"
    d = min_interatomic_distance(structure)
    if d < STRUCT_CUTOFF:
        return False, f"atoms {d:.3f} A apart (< {STRUCT_CUTOFF} A)"
    return True, None


def _pauling_ok(ox_states: tuple[int, ...], enegs: tuple[float | None, ...]) -> bool:
    """smact 2.x ``eneg_states_test`` as CDVAE called it (a TypeError on a missing value meant 'ok')."""
    for (ox1, en1), (ox2, en2) in itertools.combinations(zip(ox_states, enegs, strict=True), 2):
        if (ox1 > 0 and ox2 < 0) or (ox1 < 0 and ox2 > 0):
            if en1 is None or en2 is None:
                return True
            if ox1 > 0 and en1 >= en2:
                return False
            if ox1 < 0 and en1 <= en2:
                return False
    return True


@lru_cache(maxsize=65536)
def _smact_valid(symbols: tuple[str, ...], counts: tuple[int, ...]) -> bool:
    import smact

    if len(set(symbols)) == 1:
        return True
    if all(s in smact.metals for s in symbols):
        return True
    elements = [smact.Element(s) for s in symbols]
    ox_combos = [e.oxidation_states_smact14 or [] for e in elements]
    enegs = tuple(e.pauling_eneg for e in elements)
    for ox in itertools.product(*ox_combos):
        if sum(o * c for o, c in zip(ox, counts, strict=True)) == 0 and _pauling_ok(ox, enegs):
            return True
    return False


def composition_validity(composition: Composition | Structure | str) -> bool:
    """CDVAE/SMACT charge-neutrality + electronegativity validity with the smact14 oxidation states."""
    if isinstance(composition, Structure):
        composition = composition.composition
    comp = Composition(composition).element_composition
    items = sorted(comp.items(), key=lambda kv: kv[0].Z)  # CDVAE sorts by atomic number
    symbols = tuple(el.symbol for el, _ in items)
    amounts = [float(a) for _, a in items]
    if not all(abs(a - round(a)) < 1e-6 and a > 0 for a in amounts):
        return False  # fractional occupancy: no integer stoichiometry to balance
    counts = [int(round(a)) for a in amounts]
    g = math.gcd(*counts)
    return _smact_valid(symbols, tuple(c // g for c in counts))


SLAB_GAP = 7.0  # A of empty space across the cell: a slab, wire or molecule in a box, not a bulk crystal


def largest_vacuum_gap(structure: Structure) -> float:
    """The widest empty layer across the cell, in A: over the three lattice planes, the largest gap between
    the atoms' fractional coordinates along the plane normal (periodic), times the interplanar spacing.
    Bulk crystals stay below a few A; a slab with 10 A of vacuum shows about 10."""
    matrix = np.asarray(structure.lattice.matrix, dtype=float)
    volume = abs(float(np.linalg.det(matrix)))
    areas = np.linalg.norm(np.cross(matrix[[1, 2, 0]], matrix[[2, 0, 1]]), axis=1)  # |a_j x a_k| for a_i
    frac = np.mod(np.asarray(structure.frac_coords, dtype=float), 1.0)
    widest = 0.0
    for axis in range(3):
        x = np.sort(frac[:, axis])
        gaps = np.diff(np.concatenate([x, x[:1] + 1.0]))
        widest = max(widest, float(gaps.max()) * volume / areas[axis])
    return widest
