"""Validity and sanity checks (fast, no CHGNet)."""

from __future__ import annotations

import time

import pytest
from evaluate_helpers import close_pair, rock_salt
from pymatgen.core import Lattice, Structure

from matgen.evaluate import check_sanity, composition_validity, parse_cif, structure_validity
from matgen.evaluate.validity import min_interatomic_distance


def test_nacl_is_valid():
    s = rock_salt()
    assert structure_validity(s) == (True, None)
    assert composition_validity(s)
    assert check_sanity(s) is None


def test_atoms_0p3_apart_are_invalid():
    s = close_pair()
    assert min_interatomic_distance(s) == pytest.approx(0.3, abs=1e-6)
    ok, reason = structure_validity(s)
    assert not ok and "0.300 A apart" in reason


def test_periodic_image_distance_counts():
    # one atom per cell, but the cell is 0.4 A long: the atom overlaps its own image
    s = Structure(Lattice.orthorhombic(0.4, 5, 5), ["Fe"], [[0, 0, 0]])
    assert not structure_validity(s)[0]


def test_nacl2_is_not_charge_neutral():
    assert not composition_validity("NaCl2")
    assert composition_validity("NaCl")


@pytest.mark.parametrize(
    ("formula", "valid"),
    [
        ("Fe", True),  # single element
        ("FeNi3", True),  # all metals ("alloy")
        ("Fe2O3", True),
        ("LiFePO4", True),
        ("Na3O", False),
        ("ArCl", False),  # Ar has no smact14 oxidation states
        ("PmH3", True),  # Pm lacks a Pauling electronegativity: CDVAE's TypeError counted that as passing
    ],
)
def test_smact_cases(formula, valid):
    assert composition_validity(formula) is valid


def test_smact14_not_icsd24():
    """smact>=3 defaults to ICSD-2024 oxidation states; CDVAE's numbers need the 2014 set."""
    from smact.screening import smact_validity

    # MP-20 test compositions on which the two sets disagree
    assert not composition_validity("Sm(CoB)2") and smact_validity("Sm(CoB)2")
    assert composition_validity("Nb4AgS8") and not smact_validity("Nb4AgS8")
    assert smact_validity("Sm(CoB)2", oxidation_states_set="smact14") is False


def test_sanity_bounds_reject_huge_lattice_before_neighbour_search():
    s = Structure(Lattice.orthorhombic(1e12, 3, 3), ["Cu", "Ni"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    t0 = time.perf_counter()
    reason = check_sanity(s)
    assert reason is not None and "lattice length" in reason
    assert time.perf_counter() - t0 < 0.5


def test_parse_cif_rejects_garbage():
    with pytest.raises(ValueError):
        parse_cif("")
    with pytest.raises(Exception):  # noqa: B017 -- pymatgen raises various types
        parse_cif("not a cif at all")


def test_sanity_bounds_reject_dummy_species_and_accept_ions():
    from pymatgen.core import DummySpecies, Species

    dummy = Structure(Lattice.cubic(4.2), [DummySpecies("X", 1), Species("Cl", -1)], [[0, 0, 0], [0.5] * 3])
    assert "not chemical elements: X+" in check_sanity(dummy)
    ions = Structure(Lattice.cubic(4.2), [Species("Na", 1), Species("Cl", -1)], [[0, 0, 0], [0.5] * 3])
    assert check_sanity(ions) is None


def test_an_analysis_error_is_recorded_not_raised(monkeypatch):
    """Whatever a metric raises on an odd crystal becomes that crystal's reason; the run goes on."""
    from matgen.evaluate import pipeline

    def broken(_structure):
        raise RuntimeError("simulated neighbour-search failure")

    monkeypatch.setattr(pipeline, "structure_validity", broken)
    cif = Structure(Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5] * 3]).to(fmt="cif")
    rec = pipeline.analyze_crystal(("nacl.cif", cif, None, None))
    assert rec["parsed"] and rec["sane"] and not rec["valid"]
    assert "analysis failed: RuntimeError: simulated neighbour-search failure" in rec["reason"]


def test_the_vacuum_gap_tells_a_slab_from_a_bulk_crystal() -> None:
    """A monolayer with 10 A of vacuum relaxed to E_hull ~ 0 and was offered as a bulk candidate."""
    from pymatgen.core import Lattice, Structure

    from matgen.evaluate.validity import SLAB_GAP, largest_vacuum_gap

    bulk = rock_salt()
    assert largest_vacuum_gap(bulk) < 3.0
    slab = Structure(Lattice.orthorhombic(4.0, 4.0, 14.0), ["Na", "Cl"], [[0, 0, 0.5], [0.5, 0.5, 0.5]])
    assert largest_vacuum_gap(slab) == pytest.approx(14.0)  # one atomic layer: the whole c is empty
    thick = Structure(Lattice.orthorhombic(4.0, 4.0, 14.0), ["Na", "Cl"] * 2,
                      [[0, 0, 0.4], [0.5, 0.5, 0.4], [0, 0, 0.6], [0.5, 0.5, 0.6]])  # fmt: skip
    assert largest_vacuum_gap(thick) == pytest.approx(0.8 * 14.0) and largest_vacuum_gap(thick) > SLAB_GAP
    skewed = bulk.copy()
    skewed.make_supercell([[1, 1, 0], [0, 1, 0], [0, 0, 1]])  # the same bulk in another basis
    assert largest_vacuum_gap(skewed) < SLAB_GAP
