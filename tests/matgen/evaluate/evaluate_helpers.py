"""Small structure helpers shared by the evaluation tests (imported as a plain module)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pymatgen.core import Lattice, Structure


def rock_salt(a: float = 5.64) -> Structure:
    """Primitive NaCl (2 atoms)."""
    lattice = Lattice([[0, a / 2, a / 2], [a / 2, 0, a / 2], [a / 2, a / 2, 0]])
    return Structure(lattice, ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def close_pair() -> Structure:
    """Two atoms 0.3 A apart in a 5 A cube."""
    return Structure(Lattice.cubic(5.0), ["Na", "Cl"], [[0, 0, 0], [0.06, 0, 0]])


def rattled(structure: Structure, strain: float, sigma: float, seed: int = 0) -> Structure:
    rng = np.random.default_rng(seed)
    s = structure.copy()
    s.apply_strain(strain)
    cart = s.cart_coords + rng.normal(0.0, sigma, (len(s), 3))
    return Structure(s.lattice, s.species, cart, coords_are_cartesian=True)


def write_cif(path: Path, structure: Structure) -> Path:
    from pymatgen.io.cif import CifWriter

    path.write_text(str(CifWriter(structure)))
    return path


def evaluate_cli(args: list[str]):
    """``matgen evaluate ARGS`` through the installed app (a typer CliRunner result)."""
    from typer.testing import CliRunner

    from cli.matgen import app

    return CliRunner().invoke(app, ["evaluate", *args])
