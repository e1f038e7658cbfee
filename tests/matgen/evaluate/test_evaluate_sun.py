"""Uniqueness and novelty (the U and N of S.U.N.) compare crystals as elements, in either order."""

from __future__ import annotations

from evaluate_helpers import rock_salt
from pymatgen.core import Lattice, Structure

from matgen.evaluate.sun import elements_only, novelty_flags, uniqueness_flags


def _decorated(structure: Structure) -> Structure:
    s = structure.copy()
    s.add_oxidation_state_by_element({"Na": 1, "Cl": -1})
    return s


class _Training:
    """A stand-in for TrainingSet: crystals by reduced formula."""

    def __init__(self, crystals: list[Structure]) -> None:
        self.crystals = [elements_only(c) for c in crystals]

    def structures(self, formula: str) -> list[Structure]:
        return [c for c in self.crystals if c.composition.reduced_formula == formula]


def test_oxidation_states_do_not_make_a_crystal_unique_or_novel() -> None:
    plain, charged = rock_salt(), _decorated(rock_salt())
    assert elements_only(plain) is plain and str(elements_only(charged)[0].specie) == "Na"
    for order in ([plain, charged], [charged, plain]):
        assert uniqueness_flags(order, progress=False) == [True, False]
    other = Structure(Lattice.cubic(3.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])  # CsCl type
    assert uniqueness_flags([charged, other, None], progress=False) == [True, True, None]
    assert novelty_flags([charged, other], _Training([plain]), progress=False) == [False, True]
    assert novelty_flags([plain], _Training([charged]), progress=False) == [False]


def test_a_training_row_with_an_unreadable_formula_still_counts_for_novelty(tmp_path) -> None:
    """A data set of one's own whose pretty_formula pymatgen cannot read (here 'NaCl (rock salt)') had
    the row dropped from the novelty reference, so its crystal was called novel."""
    import pandas as pd

    from matgen.evaluate.sun import TrainingSet

    salt = rock_salt()
    frame = pd.DataFrame(
        {
            "material_id": ["a", "b"],
            "pretty_formula": ["NaCl (rock salt)", ""],
            "cif": [salt.to(fmt="cif")] * 2,
        }
    )
    frame.to_csv(tmp_path / "train.csv", index=False)
    training = TrainingSet(tmp_path)
    assert training.n_formulas() == 1 and len(training.structures("NaCl")) == 2
    assert novelty_flags([salt], training, progress=False) == [False]


def test_a_matcher_failure_is_undetermined_not_unique_or_novel(monkeypatch) -> None:
    """StructureMatcher raising on a pair used to read as "no match": the crystal counted as unique and
    novel, and S.U.N. went up with every failure."""
    import matgen.evaluate.sun as sun

    class Failing:
        def fit(self, a, b):
            raise ValueError("singular lattice")

    monkeypatch.setattr(sun, "make_matcher", Failing)
    salt, other = rock_salt(), rock_salt(5.0)
    assert uniqueness_flags([salt, other], progress=False) == [True, None]  # the first has nothing to fail on
    assert novelty_flags([salt], _Training([other]), progress=False) == [None]
    assert novelty_flags([salt], _Training([]), progress=False) == [True]  # nothing to compare: novel


def test_unreadable_training_rows_are_counted(tmp_path) -> None:
    import pandas as pd

    from matgen.evaluate.sun import TrainingSet

    cif = rock_salt().to(fmt="cif")
    frame = pd.DataFrame({"material_id": ["a", "b", "c"], "pretty_formula": ["NaCl", "", "NaCl"],
                          "cif": [cif, "not a cif", cif.replace("_cell_length_a", "_cell_length_q")]})  # fmt: skip
    frame.to_csv(tmp_path / "train.csv", index=False)
    training = TrainingSet(tmp_path)
    assert training.unreadable == 1  # row b: neither its formula nor its CIF reads
    assert len(training.structures("NaCl")) == 1 and training.unreadable == 2  # row c's CIF fails to parse


def test_a_candidate_that_a_held_out_split_holds_is_named_as_known(tmp_path) -> None:
    """Novelty is judged against the training split only; a crystal the val or test split holds is a known
    material, and the candidates list names it rather than offering it as a discovery."""
    import pandas as pd

    from matgen.evaluate.sun import TrainingSet, known_as

    pd.DataFrame(
        {"material_id": ["mp-22862"], "pretty_formula": ["NaCl"], "cif": [rock_salt().to(fmt="cif")]}
    ).to_csv(tmp_path / "test.csv", index=False)
    held_out = TrainingSet(tmp_path, split="test")
    cscl = Structure(Lattice.cubic(3.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    found = known_as({"salt": _decorated(rock_salt(5.5)), "cscl": cscl}, [held_out])
    assert found == {"salt": "mp-22862"}  # the strained rock salt is the known one; CsCl-type is not held
