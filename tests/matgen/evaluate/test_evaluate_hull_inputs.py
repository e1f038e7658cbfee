"""Hull references (CSV recipe and pickled phase diagram) and input reading (fast, no CHGNet)."""

from __future__ import annotations

import gzip
import json
import pickle

import numpy as np
import pandas as pd
import pytest
from evaluate_helpers import rock_salt, write_cif
from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
from pymatgen.core import Composition
from pymatgen.entries.computed_entries import ComputedEntry

from matgen.evaluate import load_hull, parse_cif, read_inputs
from matgen.evaluate.hull import ELEMENTAL_REFS_NAME, FormationEnergyHull

MU = {"Na": -1.3, "Cl": -1.8}  # made-up elemental energies per atom
E_FORM = {"NaCl": -2.0, "NaCl3": -0.9}  # made-up formation energies per atom; NaCl3 lies above the hull


def _write_reference(folder):
    refs = {el: ComputedEntry(el, mu).as_dict() for el, mu in MU.items()}
    with gzip.open(folder / ELEMENTAL_REFS_NAME, "wt") as f:
        json.dump(refs, f)
    pd.DataFrame(
        {
            "material_id": ["x1", "x2"],
            "reduced_formula": list(E_FORM),
            "formation_energy_per_atom": list(E_FORM.values()),
        }
    ).to_csv(folder / "formation.csv.gz", index=False)


def _total_per_atom(formula: str, e_form: float) -> float:
    comp = Composition(formula)
    return e_form + sum(MU[el.symbol] * n for el, n in comp.items()) / comp.num_atoms


@pytest.mark.parametrize("target", ["folder", "csv"])
def test_formation_energy_hull(tmp_path, target):
    _write_reference(tmp_path)
    hull = load_hull(tmp_path if target == "folder" else tmp_path / "formation.csv.gz")
    assert isinstance(hull, FormationEnergyHull)
    # on the hull, 50 meV above it, and the known NaCl3 above the NaCl-Cl tie line
    assert hull.e_above_hull(Composition("NaCl"), _total_per_atom("NaCl", -2.0)) == pytest.approx(
        0.0, abs=1e-9
    )
    assert hull.e_above_hull(Composition("Na2Cl2"), _total_per_atom("NaCl", -1.95)) == pytest.approx(0.05)
    tie = (2 * -2.0) / 4  # NaCl3 = NaCl + 2 Cl: hull formation energy -0.5 eV/atom
    assert hull.e_above_hull(Composition("NaCl3"), _total_per_atom("NaCl3", -0.9)) == pytest.approx(
        -0.9 - tie
    )
    assert hull.e_above_hull(Composition("Na"), MU["Na"]) == pytest.approx(0.0)
    assert (
        hull.reference_compounds(Composition("NaCl")) == 2
        and hull.reference_compounds(Composition("Na")) == 0
    )
    with pytest.raises(KeyError):
        hull.e_above_hull(Composition("KCl"), -3.0)


def test_pickled_phase_diagram_hull(tmp_path):
    entries = [
        PDEntry("Na", MU["Na"]),
        PDEntry("Cl", MU["Cl"]),
        PDEntry("NaCl", 2 * _total_per_atom("NaCl", -2.0)),
    ]
    path = tmp_path / "ppd.pkl.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump(PhaseDiagram(entries), f)
    hull = load_hull(path)
    assert hull.e_above_hull(Composition("NaCl"), _total_per_atom("NaCl", -1.9)) == pytest.approx(0.1)


def test_a_missing_hull_says_where_to_get_one_or_how_to_do_without(tmp_path, monkeypatch):
    """A fresh machine has no mp_hull folder: the error names the public MP hull and --skip-stability,
    not a path of the developers' machine."""
    from matgen.evaluate.hull import MP_PPD_URL

    monkeypatch.delenv("MATGEN_HULL", raising=False)
    with pytest.raises(FileNotFoundError) as info:
        load_hull(tmp_path / "no_hull")
    message = str(info.value)
    assert str(tmp_path / "no_hull") in message and MP_PPD_URL in message and "--skip-stability" in message
    assert "/work/" not in message.replace(str(tmp_path), "")


def test_read_inputs_forms(tmp_path):
    folder = tmp_path / "cifs"
    (folder / "sub").mkdir(parents=True)
    write_cif(folder / "a.cif", rock_salt())
    write_cif(folder / "sub" / "b.CIF", rock_salt(6.0))
    (folder / "notes.txt").write_text("ignored")
    assert [i.id for i in read_inputs(folder)] == ["a.cif", "sub/b.CIF"]
    assert [i.id for i in read_inputs(folder / "a.cif")] == ["a.cif"]

    cif = (folder / "a.cif").read_text()
    frame = pd.DataFrame({"material_id": ["x", "x", "y"], "cif": [cif, cif, None]})
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_parquet(tmp_path / "t.parquet", index=False)
    for name in ("t.csv", "t.parquet"):
        items = read_inputs(tmp_path / name)
        assert [i.id for i in items] == ["x", "x#1", "y"]
        assert items[2].read_error == "empty CIF"
    pd.DataFrame({"cif": [cif]}).to_csv(tmp_path / "noid.csv", index=False)
    assert [i.id for i in read_inputs(tmp_path / "noid.csv")] == ["row0"]
    assert [i.id for i in read_inputs([rock_salt(), rock_salt()])] == ["s0", "s1"]
    with pytest.raises(ValueError):
        pd.DataFrame({"x": [1]}).to_csv(tmp_path / "bad.csv", index=False)
        read_inputs(tmp_path / "bad.csv")


def test_generator_manifest_counts_missing_crystals(tmp_path):
    """A folder with matgen-generate's samples.csv: rows without a CIF are inputs that failed."""
    write_cif(tmp_path / "crystal_000000.cif", rock_salt())
    pd.DataFrame(
        {
            "id": ["crystal_000000", "crystal_000001"],
            "file": ["crystal_000000.cif", None],
            "error": ["", "atoms coincide"],
        }
    ).to_csv(tmp_path / "samples.csv", index=False)
    items = read_inputs(tmp_path)
    assert [i.id for i in items] == ["crystal_000000", "crystal_000001"]
    assert items[0].cif and items[0].read_error is None
    assert items[1].read_error == "generator produced no crystal: atoms coincide"


def _random_reference(rng, elements, n_entries):
    formulas, energies = [], []
    for _ in range(n_entries):
        k = int(rng.integers(2, len(elements) + 1))
        chosen = rng.choice(elements, size=k, replace=False)
        formulas.append("".join(f"{el}{int(rng.integers(1, 5))}" for el in chosen))
        energies.append(float(rng.uniform(-2.0, 0.3)))
    return formulas, energies


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_linear_program_hull_matches_pymatgen_phase_diagram(seed):
    rng = np.random.default_rng(seed)
    elements = ["Li", "Fe", "P", "O"]
    formulas, energies = _random_reference(rng, elements, 40)
    hull = FormationEnergyHull(formulas, energies, {el: 0.0 for el in elements})
    entries = [PDEntry(Composition(el), 0.0) for el in elements] + [
        PDEntry(Composition(f), e * Composition(f).num_atoms) for f, e in zip(formulas, energies, strict=True)
    ]
    phase_diagram = PhaseDiagram(entries)
    for _ in range(25):
        k = int(rng.integers(1, 5))
        target = Composition({el: int(rng.integers(1, 6)) for el in rng.choice(elements, k, replace=False)})
        assert hull.hull_formation_energy_per_atom(target) == pytest.approx(
            phase_diagram.get_hull_energy_per_atom(target), abs=1e-9
        )


def test_linear_program_hull_in_many_elements():
    """Twelve elements (a Qhull phase diagram of these did not finish in minutes): the hull lies below
    every reference entry, reaches the one sitting exactly at the target, and ignores entries outside it."""
    rng = np.random.default_rng(3)
    elements = ["Li", "Na", "K", "Mg", "Ca", "Fe", "Co", "Ni", "Cu", "Zn", "O", "S"]
    formulas, energies = _random_reference(rng, elements, 300)
    target = Composition({el: i + 1 for i, el in enumerate(elements)})
    formulas += [target.formula.replace(" ", ""), "LiCl"]
    energies += [-2.5, -9.0]  # the lowest entry anywhere, exactly at the target; Cl is outside the system
    hull = FormationEnergyHull(formulas, energies, {el: 0.0 for el in [*elements, "Cl"]})
    assert hull.hull_formation_energy_per_atom(target) == pytest.approx(-2.5, abs=1e-9)
    for f, e in zip(formulas[:60], energies[:60], strict=True):
        assert hull.hull_formation_energy_per_atom(Composition(f)) <= min(e, 0.0) + 1e-9


def test_repeated_ids_never_collide_with_an_existing_id(tmp_path):
    cif = write_cif(tmp_path / "a.cif", rock_salt()).read_text()
    pd.DataFrame({"id": ["a", "a", "a#1"], "cif": [cif, cif.replace("Na", "K"), cif]}).to_csv(
        tmp_path / "t.csv", index=False
    )
    items = read_inputs(tmp_path / "t.csv")
    assert len({i.id for i in items}) == 3
    assert items[2].id == "a#1" and "K" in items[1].cif


def test_folder_reading_covers_every_cif_and_skips_hidden_files(tmp_path):
    folder = tmp_path / "cifs"
    folder.mkdir()
    text = write_cif(folder / "plain.cif", rock_salt()).read_text()
    (folder / "packed.cif.gz").write_bytes(gzip.compress(text.encode()))
    (folder / "wide.cif").write_text(text, encoding="utf-16")
    block2 = text.replace("data_", "data_second_", 1)
    (folder / "two_blocks.cif").write_text(text + "\n" + block2)
    (folder / "._plain.cif").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (folder / ".ipynb_checkpoints").mkdir()
    write_cif(folder / ".ipynb_checkpoints" / "plain-checkpoint.cif", rock_salt())
    (folder / "dangling.cif").symlink_to(tmp_path / "missing.cif")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_cif(elsewhere / "linked.cif", rock_salt(6.0))
    (folder / "link").symlink_to(elsewhere, target_is_directory=True)

    items = {i.id: i for i in read_inputs(folder)}
    two = [k for k in items if k.startswith("two_blocks.cif:")]
    assert len(two) == 2
    assert set(items) - set(two) == {
        "dangling.cif",
        "link/linked.cif",
        "packed.cif.gz",
        "plain.cif",
        "wide.cif",
    }
    assert items["dangling.cif"].read_error.startswith("unreadable file")
    for key in ("packed.cif.gz", "wide.cif", *two, "link/linked.cif"):
        assert len(parse_cif(items[key].cif)) == 2, key


def test_manifest_adds_unlisted_cifs_and_an_unreadable_manifest_falls_back(tmp_path):
    write_cif(tmp_path / "crystal_000000.cif", rock_salt())
    write_cif(tmp_path / "extra.cif", rock_salt(6.0))
    pd.DataFrame({"id": ["crystal_000000"], "file": ["crystal_000000.cif"]}).to_csv(
        tmp_path / "samples.csv", index=False
    )
    with pytest.warns(UserWarning, match="not listed"):
        assert [i.id for i in read_inputs(tmp_path)] == ["crystal_000000", "extra.cif"]
    (tmp_path / "samples.csv").write_text("")
    with pytest.warns(UserWarning, match="ignoring"):
        assert [i.id for i in read_inputs(tmp_path)] == ["crystal_000000.cif", "extra.cif"]


def test_tables_with_bytes_cifs_and_bad_tables(tmp_path):
    cif = write_cif(tmp_path / "a.cif", rock_salt()).read_text()
    pd.DataFrame({"cif": [cif.encode()]}).to_parquet(tmp_path / "b.parquet", index=False)
    (item,) = read_inputs(tmp_path / "b.parquet")
    assert item.read_error is None and len(parse_cif(item.cif)) == 2
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="cannot read the table .*empty.csv"):
        read_inputs(tmp_path / "empty.csv")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="unknown input kind"):
        read_inputs(tmp_path / "notes.txt")


def test_zero_occupancy_is_refused_not_dropped(tmp_path):
    text = write_cif(tmp_path / "a.cif", rock_salt()).read_text()
    lines = text.splitlines()
    last_site = max(k for k, line in enumerate(lines) if line.strip().startswith(("Na", "Cl")))
    fields = lines[last_site].split()
    fields[-1] = "0.0"  # the occupancy column comes last in pymatgen's CIFs
    lines[last_site] = "  ".join(fields)
    with pytest.raises(ValueError, match="occupancy 0.0 <= 0"):
        parse_cif("\n".join(lines))


def test_two_atoms_on_one_site_parse_as_written_and_other_bad_cells_are_named():
    from pymatgen.core import Lattice, Structure

    from matgen.evaluate.inputs import error_text
    from matgen.evaluate.validity import composition_validity, structure_validity

    overlap = Structure(
        Lattice.cubic(4.2),
        ["Mg", "O", "O"],
        [[0, 0, 0], [0.5, 0.5, 0.5], [0, 0, 0]],
        validate_proximity=False,
    ).to(fmt="cif")
    parsed = parse_cif(overlap)  # pymatgen alone merges the two sites and refuses the result
    assert parsed.composition.formula == "Mg1 O2" and len(parsed) == 3
    ok, why = structure_validity(parsed)
    assert not ok and "0.000 A apart" in why
    assert composition_validity(parsed.composition) == composition_validity(Composition("MgO2"))
    # with symmetry operations the sites are not taken as written; the reason keeps pymatgen's cause
    with pytest.raises(ValueError) as caught:
        parse_cif(overlap.replace("'x, y, z'", "'x, y, z'\n  2  '-x, -y, -z'"))
    assert "Occupancy 2.0 exceeded tolerance" in error_text(caught.value)
    copper = Structure(Lattice.cubic(3.6), ["Cu"], [[0, 0, 0]]).to(fmt="cif")
    with pytest.raises(ValueError, match="cell length a = -3.6 <= 0"):
        parse_cif(copper.replace("_cell_length_a   3.60000000", "_cell_length_a   -3.6"))


def test_bad_hull_files_give_clear_errors(tmp_path):
    (tmp_path / "junk.pkl").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable pickle"):
        load_hull(tmp_path / "junk.pkl")
    (tmp_path / "bad.pkl.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="not a readable pickle"):
        load_hull(tmp_path / "bad.pkl.gz")
    (tmp_path / "dict.pkl").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="holds a dict, not a pymatgen"):
        load_hull(tmp_path / "dict.pkl")
    _write_reference(tmp_path)
    pd.DataFrame({"formula": ["NaCl"], "formation_energy_per_atom": ["abc"]}).to_csv(
        tmp_path / "words.csv", index=False
    )
    with pytest.raises(ValueError, match="no row with a numeric"):
        load_hull(tmp_path / "words.csv")


def test_other_generators_outputs_zip_extxyz_and_poscar(tmp_path):
    """MatterGen-style outputs (a zip of CIFs, an extxyz of frames) and POSCARs read as crystals."""
    import zipfile

    from ase.io import write as ase_write
    from pymatgen.io.ase import AseAtomsAdaptor
    from pymatgen.io.vasp import Poscar

    salt, bigger = rock_salt(), rock_salt(6.0)
    cif = write_cif(tmp_path / "a.cif", salt).read_text()
    with zipfile.ZipFile(tmp_path / "generated_crystals_cif.zip", "w") as zf:
        zf.writestr("gen_1.cif", write_cif(tmp_path / "b.cif", bigger).read_text())
        zf.writestr("gen_0.cif", cif)
        zf.writestr("sub/gen_2.cif.gz", gzip.compress(cif.encode()))
        zf.writestr("__MACOSX/._gen_0.cif", b"\x00junk")
        zf.writestr("readme.txt", "not a crystal")
    items = read_inputs(tmp_path / "generated_crystals_cif.zip")
    prefix = "generated_crystals_cif.zip/"
    assert [i.id for i in items] == [prefix + n for n in ("gen_0.cif", "gen_1.cif", "sub/gen_2.cif.gz")]
    assert parse_cif(items[1].cif).lattice.abc == pytest.approx(bigger.lattice.abc)

    atoms = [AseAtomsAdaptor.get_atoms(s) for s in (salt, bigger)]
    molecule = atoms[0].copy()
    molecule.pbc = False
    ase_write(tmp_path / "gen.extxyz", [atoms[0], molecule, atoms[1]], format="extxyz")
    items = read_inputs(tmp_path / "gen.extxyz")
    assert [i.id for i in items] == ["gen.extxyz:0", "gen.extxyz:1", "gen.extxyz:2"]
    assert items[0].structure.matches(salt) and items[2].structure.matches(bigger)
    assert items[1].structure is None and "periodic" in items[1].read_error
    text = (tmp_path / "gen.extxyz").read_text().splitlines()
    (tmp_path / "cut.extxyz").write_text("\n".join(text[: len(text) - 2]) + "\n")  # last frame cut short
    items = read_inputs(tmp_path / "cut.extxyz")
    assert items[0].structure is not None and "cut short" in (items[-1].read_error or "")

    (tmp_path / "POSCAR").write_text(str(Poscar(bigger)))
    (tmp_path / "x.vasp").write_text("not a poscar")
    assert read_inputs(tmp_path / "POSCAR")[0].structure.matches(bigger)
    assert "unparsable POSCAR" in read_inputs(tmp_path / "x.vasp")[0].read_error
    (tmp_path / "empty.zip").write_bytes(b"PK\x05\x06" + b"\x00" * 18)  # a valid, empty archive
    with pytest.raises(ValueError, match="no .cif files"):
        read_inputs(tmp_path / "empty.zip")
    (tmp_path / "bad.zip").write_text("not a zip")
    with pytest.raises(ValueError, match="cannot read the archive"):
        read_inputs(tmp_path / "bad.zip")


def test_inputs_that_other_sources_write(tmp_path):
    """Blocks of one name in one file, an IUCr-style data_global block, several crystals in one table cell,
    extxyz frames with no atoms or a bad line, a VASP 4 POSCAR, float ids, single and empty Structures."""
    from pymatgen.core import Lattice, Structure

    salt, bigger = rock_salt(), rock_salt(6.0)
    one = write_cif(tmp_path / "one.cif", salt).read_text()
    two = write_cif(tmp_path / "two.cif", bigger).read_text()
    (tmp_path / "dup.cif").write_text(one + "\n" + two)  # both blocks are data_NaCl
    items = read_inputs(tmp_path / "dup.cif")
    assert [i.id for i in items] == ["dup.cif:NaCl", "dup.cif:NaCl#1"]
    assert parse_cif(items[1].cif).lattice.a > parse_cif(items[0].cif).lattice.a

    (tmp_path / "iucr.cif").write_text(
        "data_global\n_journal_year 1999\n_publ_section_title 'salt'\n\n" + one
    )
    (item,) = read_inputs(tmp_path / "iucr.cif")
    assert item.id == "iucr.cif" and parse_cif(item.cif).composition.reduced_formula == "NaCl"

    frame = pd.DataFrame({"material_id": [1.0, None, 3.0], "cif": [one + two, one, None]})
    frame.to_csv(tmp_path / "t.csv", index=False)
    assert [i.id for i in read_inputs(tmp_path / "t.csv")] == ["1:NaCl", "1:NaCl#1", "row1", "3"]

    cu = '1\nLattice="3.6 0 0 0 3.6 0 0 0 3.6" Properties=species:S:1:pos:R:3 pbc="T T T"\nCu 0 0 0\n'
    empty = '0\nLattice="4 0 0 0 4 0 0 0 4" Properties=species:S:1:pos:R:3 pbc="T T T"\n'
    bad = cu.replace("Cu 0 0 0", "Cu 0 notanumber 0")
    (tmp_path / "g.extxyz").write_text(cu + empty + bad + cu + cu)
    items = read_inputs(tmp_path / "g.extxyz")
    assert [i.id for i in items] == [f"g.extxyz:{k}" for k in range(5)]  # every frame keeps its row
    assert [i.structure is not None for i in items] == [True, False, False, True, True]
    assert "no atoms" in items[1].read_error and "unreadable" in items[2].read_error
    (tmp_path / "h.extxyz").write_text(cu + "x\n" + cu)
    items = read_inputs(tmp_path / "h.extxyz")
    assert len(items) == 2 and "not an atom count" in items[1].read_error

    vasp4 = "NaCl\n1.0\n0 2.82 2.82\n2.82 0 2.82\n2.82 2.82 0\n1 1\nDirect\n0 0 0\n0.5 0.5 0.5\n"
    (tmp_path / "POSCAR").write_text(vasp4)
    assert "without element symbols" in read_inputs(tmp_path / "POSCAR")[0].read_error

    assert [i.id for i in read_inputs(salt)] == ["s0"]
    (nothing,) = read_inputs([Structure(Lattice.cubic(4.0), [], [])])
    assert nothing.structure is None and "no atoms" in nothing.read_error


def test_notebook_inputs_cif_text_dataframes_istructures_and_ase_atoms(tmp_path):
    """What a notebook holds: CIF text, a DataFrame with a cif column, an IStructure, ASE Atoms, or a list
    mixing them; anything else is named by its position and type."""
    from ase import Atoms
    from ase.build import bulk
    from pymatgen.core import IStructure

    salt = rock_salt()
    text = write_cif(tmp_path / "salt.cif", salt).read_text()
    (item,) = read_inputs(text)
    assert item.id == "cif" and parse_cif(item.cif).composition.reduced_formula == "NaCl"
    items = read_inputs(pd.DataFrame({"material_id": ["a", "b"], "cif": [text, None]}))
    assert [i.id for i in items] == ["a", "b"] and items[1].read_error == "empty CIF"
    molecule = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])  # no cell: not a crystal
    items = read_inputs([IStructure.from_sites(salt), text, bulk("Cu"), molecule])
    assert [i.id for i in items] == ["s0", "s1", "s2", "s3"]
    assert items[0].structure.composition.reduced_formula == "NaCl"
    assert items[2].structure.composition.reduced_formula == "Cu" and len(items[2].structure) == 1
    assert "without a periodic 3D cell" in items[3].read_error
    assert [i.id for i in read_inputs(bulk("Si"))] == ["s0"]
    with pytest.raises(TypeError, match="input s1 is of type int"):
        read_inputs([salt, 3])
    with pytest.raises(ValueError, match="DataFrame has neither a 'cif' nor a 'file' column"):
        read_inputs(pd.DataFrame({"x": [1]}))


def test_files_other_tools_write_line_endings_gzip_and_non_text_cells(tmp_path):
    text = write_cif(tmp_path / "salt.cif", rock_salt()).read_text()
    (tmp_path / "mac.cif").write_text(text.replace("\n", "\r"), newline="")  # old-Mac line endings
    (tmp_path / "packed.cif").write_bytes(gzip.compress(text.encode()))  # gzip data without .gz
    for name in ("mac.cif", "packed.cif"):
        (item,) = read_inputs(tmp_path / name)
        assert parse_cif(item.cif).composition.reduced_formula == "NaCl", name
    pd.DataFrame({"cif": [1, 2]}).to_csv(tmp_path / "numbers.csv", index=False)
    assert [i.read_error for i in read_inputs(tmp_path / "numbers.csv")] == [
        "the cif cell holds '1' (int), not CIF text",
        "the cif cell holds '2' (int), not CIF text",
    ]
