"""Batched CHGNet relaxation: graph/potential equivalence with chgnet, E_hull of a stable compound,
perturbation recovery, agreement with chgnet's StructOptimizer, and failure isolation (CPU, ~1 min)."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pandas as pd
import pytest
from evaluate_helpers import rattled, rock_salt

from matgen.evaluate import build_graph_arrays, load_hull, parse_cif, relax_structures
from matgen.evaluate.relax import CHGNetBatchPotential, shared_potential

STABLE_ID = "mp-1086"  # TaC, rock salt, e_above_hull 0 in MP-20 test.csv


@pytest.fixture(scope="module")
def potential() -> CHGNetBatchPotential:
    import torch

    torch.set_num_threads(1)
    return shared_potential("cpu")


@pytest.fixture(scope="module")
def test_rows(mp20_dir) -> pd.DataFrame:
    return pd.read_csv(mp20_dir / "test.csv.gz", nrows=400)


def _stable_compound(mp20_dir):
    frame = pd.read_csv(mp20_dir / "test.csv.gz")
    row = frame[frame["material_id"] == STABLE_ID].iloc[0]
    assert row["e_above_hull"] == 0.0
    return parse_cif(row["cif"])


def test_graph_and_batched_potential_match_chgnet(potential, test_rows):
    """Our vectorised graph + one-shot batched forward reproduce CHGNet's own predict_structure."""
    structures = [rattled(parse_cif(c), 0.02, 0.05, seed=k) for k, c in enumerate(test_rows["cif"][:5])]
    ref = potential.model.predict_structure(structures, task="efs", batch_size=5)
    e, f, s = potential.predict_structures(structures)
    for k, st in enumerate(structures):
        g = build_graph_arrays(st.lattice.matrix, st.frac_coords, np.array(st.atomic_numbers))
        cg = potential.model.graph_converter(st)
        assert len(g.atom_graph) == len(cg.atom_graph)
        assert len(g.bond_graph) == len(cg.bond_graph)
        assert e[k] == pytest.approx(float(ref[k]["e"]), abs=1e-5)
        np.testing.assert_allclose(f[k], ref[k]["f"], atol=1e-3)
        np.testing.assert_allclose(s[k] * 160.21766208, ref[k]["s"], atol=1e-3)  # eV/A^3 -> GPa


def test_stable_compound_and_perturbed_copy(potential, mp20_dir, hull_dir):
    s = _stable_compound(mp20_dir)
    hull = load_hull(hull_dir)
    plain, shaken = relax_structures(
        [s, rattled(s, 0.05, 0.2, seed=3)], potential=potential, progress=False, batch_atoms=64
    )
    assert plain.error is None and shaken.error is None
    assert plain.converged and shaken.converged
    e_hull = hull.e_above_hull(s.composition, plain.energy_per_atom)
    assert abs(e_hull) < 0.1
    assert shaken.n_steps > plain.n_steps
    assert abs(shaken.energy_per_atom - plain.energy_per_atom) < 0.01
    assert abs(shaken.structure.volume - plain.structure.volume) / plain.structure.volume < 0.03


def test_matches_chgnet_structoptimizer(potential, test_rows):
    from chgnet.model import StructOptimizer

    structures = [rattled(parse_cif(c), 0.03, 0.1, seed=k) for k, c in enumerate(test_rows["cif"][2:4])]
    ours = relax_structures(structures, potential=potential, progress=False)
    opt = StructOptimizer(model=potential.model, use_device="cpu")
    for st, r in zip(structures, ours, strict=True):
        with contextlib.redirect_stdout(io.StringIO()):
            ref = opt.relax(st.copy(), fmax=0.1, steps=500, verbose=False)
        e_ref = ref["trajectory"].energies[-1] / len(st)
        assert abs(r.energy_per_atom - e_ref) < 0.01


class _NaNForFirst(CHGNetBatchPotential):
    """Wraps a potential and poisons the first crystal of every batch."""

    def __init__(self, inner: CHGNetBatchPotential) -> None:
        self.__dict__.update(inner.__dict__)

    def collect(self, pending):
        e, f, s = super().collect(pending)
        e[0] = np.nan
        return e, f, s


def test_divergence_is_recorded_not_raised(potential):
    bad, good = rock_salt(5.2), rock_salt(5.9)
    seen = []
    results = relax_structures(
        [bad, good], potential=_NaNForFirst(potential), progress=False, batch_atoms=2, on_results=seen.extend
    )
    assert results[0].error is not None and "non-finite" in results[0].error
    assert np.isnan(results[0].energy)
    # with batch_atoms=2 the second crystal runs alone later and is poisoned as well; run it unpoisoned:
    ok = relax_structures([good], potential=potential, progress=False)[0]
    assert ok.error is None and np.isfinite(ok.energy)
    assert sorted(i for i, _ in seen) == [0, 1]


def test_overlapped_half_batches_give_the_same_result(potential):
    """The CUDA pipelining (two half-batches) is plain bookkeeping: same numbers when forced on CPU."""
    structures = [rattled(rock_salt(a), 0.0, 0.1, seed=k) for k, a in enumerate((5.4, 5.6, 5.8, 6.0))]
    a = relax_structures(structures, potential=potential, progress=False, batch_atoms=4, overlap=False)
    b = relax_structures(structures, potential=potential, progress=False, batch_atoms=4, overlap=True)
    for x, y in zip(a, b, strict=True):
        assert x.n_steps == y.n_steps
        assert x.energy_per_atom == pytest.approx(y.energy_per_atom, abs=1e-5)


def test_graph_worker_processes_give_the_same_result(potential):
    structures = [rattled(rock_salt(a), 0.0, 0.1, seed=k) for k, a in enumerate((5.5, 5.9))]
    a = relax_structures(structures, potential=potential, progress=False, steps=20)
    b = relax_structures(structures, potential=potential, progress=False, steps=20, graph_workers=1)
    for x, y in zip(a, b, strict=True):
        assert x.n_steps == y.n_steps
        assert x.energy_per_atom == pytest.approx(y.energy_per_atom, abs=1e-6)


class _FailsForVolume(CHGNetBatchPotential):
    """Raises for any batch that contains a crystal with the poisoned lattice constant."""

    def __init__(self, inner: CHGNetBatchPotential, poisoned_volume: float) -> None:
        self.__dict__.update(inner.__dict__)
        self.poisoned_volume = poisoned_volume

    def launch(self, graphs):
        for g in graphs:
            if abs(abs(np.linalg.det(g.lattice)) - self.poisoned_volume) < 1.0:
                raise RuntimeError("simulated CHGNet failure")
        return super().launch(graphs)


def test_an_exception_in_a_batch_only_fails_the_culprit(potential):
    structures = [rock_salt(a) for a in (5.4, 5.64, 6.0)]
    poisoned = _FailsForVolume(potential, structures[1].volume)
    results = relax_structures(structures, potential=poisoned, progress=False, steps=3)
    assert results[1].error is not None and "simulated CHGNet failure" in results[1].error
    assert results[0].error is None and results[2].error is None
    plain = relax_structures([structures[0], structures[2]], potential=potential, progress=False, steps=3)
    assert results[0].energy_per_atom == pytest.approx(plain[0].energy_per_atom, abs=1e-5)


def test_isolated_atoms_do_not_break_the_batch(potential):
    from pymatgen.core import Lattice, Structure

    lonely = Structure(Lattice.cubic(30.0), ["Na"], [[0, 0, 0]])
    results = relax_structures([lonely], potential=potential, progress=False, steps=3)
    assert results[0].error is None and np.isfinite(results[0].energy)


def test_elements_beyond_chgnet_are_refused_with_a_reason(potential):
    from pymatgen.core import Lattice, Structure

    americium = Structure(Lattice.cubic(3.5), ["Am"], [[0, 0, 0]])
    results = relax_structures([americium, rock_salt(5.64)], potential=potential, progress=False, steps=3)
    assert "up to Pu" in results[0].error and "Am" in results[0].error
    assert results[1].error is None and np.isfinite(results[1].energy)
