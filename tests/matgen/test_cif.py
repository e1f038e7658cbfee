"""The fast CIF writer and same-site check of `matgen generate` against the pymatgen code they replace."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from pymatgen.core import Structure

from matgen import tokenizer as tok
from matgen.cif import p1_cif
from matgen.generate import COINCIDENT_TOLERANCE, _coincident_atoms

TOK = tok.CrystalTokenizer()


def _pymatgen_cif(crystal: tok.DecodedCrystal) -> str:
    return Structure(crystal.lattice, crystal.species, crystal.frac_coords).to(fmt="cif")


def _shuffled(tokens: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The same crystal with its atoms in another order, as a sampler emits them (encode sorts by Z)."""
    atoms = tokens[6:].reshape(-1, 4)
    return np.concatenate([tokens[:6], atoms[rng.permutation(len(atoms))].reshape(-1)])


def _sites(species, frac) -> list[tuple[str, tuple[float, ...]]]:
    return sorted(
        (str(e), tuple(np.round(np.asarray(x) % 1.0, 6).tolist())) for e, x in zip(species, frac, strict=True)
    )


def _random_rows(rng: np.random.Generator, n: int, max_atoms: int = 20) -> list[np.ndarray]:
    """Well-kinded rows with random values: small and skewed cells, repeated coordinates, many elements."""
    rows = []
    for _ in range(n):
        atoms = int(rng.integers(1, max_atoms + 1))
        small = rng.random() < 0.4
        lengths = rng.integers(1, 8 if small else 500, 3)
        angles = tok.ANGLE_OFFSET + rng.integers(1, 180, 3)
        elements = tok.ELEMENT_OFFSET + rng.integers(0, tok.NUM_ELEMENT_TOKENS, atoms)
        grid = 101 if rng.random() < 0.5 else 3  # a coarse grid makes shared sites common
        coords = tok.FRAC_OFFSET + rng.integers(0, grid, (atoms, 3))
        rows.append(np.concatenate([lengths, angles, np.column_stack([elements, coords]).reshape(-1)]))
    return rows


@pytest.mark.slow
def test_p1_cif_is_pymatgens_text_for_every_mp20_test_crystal(mp20_test_structures) -> None:
    rng = np.random.default_rng(0)
    ids, structures = mp20_test_structures
    for material_id, structure in zip(ids, structures, strict=True):
        crystal = TOK.decode_parts(_shuffled(TOK.encode(structure).numpy(), rng))
        assert p1_cif(*crystal) == _pymatgen_cif(crystal), material_id


def test_p1_cif_is_pymatgens_text_for_random_crystals() -> None:
    rng = np.random.default_rng(1)
    compared = long_formulas = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen: no electronegativity for noble gases, etc.
        for row in _random_rows(rng, 600):
            try:
                crystal = TOK.decode_parts(row)
            except tok.DecodeError:
                continue
            compared += 1
            long_formulas += len(set(crystal.species)) >= 10  # formula lines that pymatgen wraps
            assert p1_cif(*crystal) == _pymatgen_cif(crystal)
    assert compared > 100 and long_formulas > 10


def test_p1_cif_reads_back_as_the_decoded_crystal() -> None:
    ase_io = pytest.importorskip("ase.io")
    rng = np.random.default_rng(2)
    read = 0
    for row in _random_rows(rng, 200, max_atoms=8):
        try:
            crystal = TOK.decode_parts(row)
        except tok.DecodeError:
            continue
        if _coincident_atoms(crystal):
            continue  # such crystals are never written
        text = p1_cif(*crystal)
        back = Structure.from_str(text, fmt="cif")  # pymatgen's reader sorts the sites
        assert np.allclose(back.lattice.matrix, crystal.lattice.matrix, atol=1e-6)
        assert _sites(back.species, back.frac_coords) == _sites(crystal.species, crystal.frac_coords)
        atoms = ase_io.read(io.StringIO(text), format="cif")
        assert atoms.get_chemical_symbols() == crystal.species
        delta = atoms.get_scaled_positions(wrap=False) - crystal.frac_coords
        assert np.allclose(delta - np.round(delta), 0.0, atol=1e-8)  # ASE may place 0.00 at 1.00
        assert np.allclose(atoms.cell.cellpar(), [*crystal.lattice.abc, *crystal.lattice.angles], atol=1e-6)
        read += 1
    assert read > 30


def test_same_site_check_agrees_with_minimum_image_distances() -> None:
    """The grid shortcut of `_coincident_atoms` gives pymatgen's answer, also for cells so small or flat
    that distinct grid points come within the tolerance (where it must fall back to distances)."""
    rng = np.random.default_rng(3)
    checked = flagged = tight_cells = 0
    for row in _random_rows(rng, 15000, max_atoms=6):
        try:
            crystal = TOK.decode_parts(row)
        except tok.DecodeError:
            continue
        n = len(crystal.species)
        d = crystal.lattice.get_all_distances(crystal.frac_coords, crystal.frac_coords)
        d[range(n), range(n)] = np.inf
        expected = None
        if n > 1 and d.min() < COINCIDENT_TOLERANCE:
            i, j = divmod(int(d.argmin()), n)
            expected = f"atoms {i} and {j} sit on the same site (distance {d[i, j]:.4f} A); no CIF written"
        assert _coincident_atoms(crystal) == expected
        checked += 1
        flagged += expected is not None
        sigma_min = np.linalg.svd(crystal.lattice.matrix, compute_uv=False)[-1]
        tight_cells += n > 1 and sigma_min / tok.FRAC_STEPS <= COINCIDENT_TOLERANCE
    assert checked > 500 and flagged > 50 and tight_cells > 20


def test_a_cif_without_a_cell_angle_names_it() -> None:
    from pymatgen.core import Lattice

    from matgen.cif import p1_cif, parse_cif

    text = p1_cif(Lattice.cubic(4.0), ["Na", "Cl"], np.array([[0, 0, 0], [0.5, 0.5, 0.5]]))
    assert parse_cif(text).composition.reduced_formula == "NaCl"
    cut = "\n".join(line for line in text.splitlines() if not line.startswith("_cell_angle_gamma"))
    with pytest.raises(ValueError, match="lacks _cell_angle_gamma"):
        parse_cif(cut)


_HEADER = """data_x
_cell_length_a 4
_cell_length_b 4
_cell_length_c 4
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma {gamma}
_symmetry_space_group_name_H-M 'P 1'
loop_
_atom_site_label
_atom_site_type_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
_atom_site_occupancy
"""
NACL = _HEADER.format(gamma=90) + "Na1 Na 0 0 0 1\nCl1 Cl 0.5 0.5 0.5 1\n"


def test_cifs_from_other_writers_are_read_as_they_mean() -> None:
    from matgen.cif import parse_cif

    # old-Mac line endings and CIF2 dotted names: the same NaCl
    assert parse_cif(NACL.replace("\n", "\r")).composition.reduced_formula == "NaCl"
    cif2 = "#\\#CIF_2.0\n" + NACL.replace("_cell_", "_cell.").replace("_atom_site_", "_atom_site.")
    assert len(parse_cif(cif2)) == 2
    # a refined occupancy of 0.998(5) is a full site; 0.5 stays a disordered one
    refined = parse_cif(NACL.replace("0.5 0.5 0.5 1", "0.5 0.5 0.5 0.998(5)"))
    assert refined.is_ordered and refined.composition.formula == "Na1 Cl1"
    assert not parse_cif(NACL.replace("0.5 0.5 0.5 1", "0.5 0.5 0.5 0.5")).is_ordered
    # 2H-MoS2 (P 6_3/m m c) written to three decimals: 6 atoms, not 18 with copies 0.003 A apart
    mos2 = """data_MoS2
_cell_length_a 3.1604(2)
_cell_length_b 3.1604(2)
_cell_length_c 12.295(1)
_cell_angle_alpha 90.
_cell_angle_beta 90.
_cell_angle_gamma 120.
_symmetry_space_group_name_H-M 'P 63/m m c'
_symmetry_Int_Tables_number 194
loop_
_atom_site_label
_atom_site_type_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
_atom_site_occupancy
Mo1 Mo 0.333 0.667 0.25 1.
S1 S 0.333 0.667 0.621(4) 1.
"""
    s = parse_cif(mos2)
    assert len(s) == 6 and s.composition.formula == "Mo2 S4"
    assert float(np.min(s.distance_matrix[np.triu_indices(6, 1)])) > 2.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_HEADER.format(gamma=-90) + "Na1 Na 0 0 0 1\n", "gamma = -90 is outside"),
        (_HEADER.format(gamma=180) + "Na1 Na 0 0 0 1\n", "gamma = 180 is outside"),
        (
            _HEADER.format(gamma=130).replace("alpha 90", "alpha 130").replace("beta 90", "beta 130")
            + "Na1 Na 0 0 0 1\n",
            "do not form a cell",
        ),
        (_HEADER.format(gamma=90), "has no values"),
        (
            _HEADER.format(gamma=90).replace("fract_", "Cartn_").replace("_atom_site_occupancy\n", "")
            + "Na1 Na 0 0 0\n",
            "Cartesian atom positions only",
        ),
    ],
)
def test_cifs_that_cannot_mean_a_crystal_say_why(text: str, message: str) -> None:
    from matgen.cif import parse_cif

    with pytest.raises(ValueError, match=message):
        parse_cif(text)
