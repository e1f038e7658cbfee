"""Convex-hull references for energy above hull of CHGNet-relaxed crystals.

Default reference (``/work/shared/data/mp_hull``, see its README): MP2020-corrected formation energies of
53,358 MP materials (all MP-20 ids + MPTS-52 val/test) plus the 2023-02-07 MP elemental reference entries.
It is APPROXIMATE: stable phases outside MP-20/MPTS-52 are missing, so the hull is too high and E_hull is
biased low (optimistic); on 3,000 MP rows it reproduced MP's e_above_hull within 10 meV for 91.7% of them.

:class:`FormationEnergyHull` follows the README recipe without building a phase diagram: the lower convex
envelope at one composition ``c`` is the linear program

    E_form^hull(c) = min_w  sum_j w_j e_j   s.t.  sum_j w_j x_j = c,  w >= 0

over the reference entries ``j`` (fractional compositions ``x_j``, formation energies per atom ``e_j``)
whose elements lie within ``c``'s, plus 0-eV elemental terminals. It is exact in any number of elements;
a pymatgen ``PhaseDiagram`` (a Qhull hull in k-1 dimensions) took minutes for 6-12-element systems, whose
facet count grows combinatorially. Entries with ``e_j > 0`` never touch the hull (the terminals give 0) and
are dropped, as are all but the lowest entry of each composition. For a crystal with N atoms and CHGNet
total energy E:

    E_form = (E - sum_i n_i mu_i) / N           (mu_i: elemental reference energy per atom)
    E_hull = E_form - E_form^hull(composition)  (can be negative: below the reference hull)

:class:`PhaseDiagramHull` wraps a pickled pymatgen ``PatchedPhaseDiagram``/``PhaseDiagram`` of total-energy
``ComputedEntry``s, e.g. matbench-discovery's ``2023-02-07-ppd-mp.pkl.gz`` (the FlowMM reference):
``E_hull = E/N - ppd.get_hull_energy_per_atom(composition)``, as in flowmm ``scripts_analysis/ehull.py``.

:func:`load_hull` picks the right one from a path: a directory (``*.csv[.gz]`` + elemental references),
a CSV of the same format, or a ``.pkl``/``.pkl.gz`` pickle.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import pickle
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
from pymatgen.core import Composition

from matgen.evaluate.inputs import error_text

__all__ = [
    "FormationEnergyHull",
    "HullReference",
    "PhaseDiagramHull",
    "default_hull_path",
    "hull_compounds",
    "load_hull",
]

ELEMENTAL_REFS_NAME = "2023-02-07-mp-elemental-reference-entries.json.gz"
FORMULA_COLUMNS = ("reduced_formula", "formula", "composition", "pretty_formula")
_ELEMENT_RE = re.compile(r"[A-Z][a-z]?")


class HullReference(Protocol):
    """Anything that gives the energy above hull of a composition at a total energy per atom."""

    description: str

    def e_above_hull(self, composition: Composition, energy_per_atom: float) -> float: ...


def hull_compounds(hull: object, composition: Composition) -> float:
    """Reference compounds (not elements) in ``composition``'s chemical system, or NaN when unknown.

    Zero means the hull there is the elements alone, so a low E_hull only says the crystal beats them.
    """
    count = getattr(hull, "reference_compounds", None)
    return float(count(composition)) if count is not None else float("nan")


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else path.open("rb")


def load_elemental_references(path: str | Path) -> dict[str, float]:
    """``{element: energy per atom (eV)}`` from a JSON(.gz) dict of ``ComputedEntry.as_dict()``."""
    from pymatgen.entries.computed_entries import ComputedEntry

    with _open(Path(path)) as f:
        raw = json.load(f)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # noble gases lack electronegativities
        return {el: float(ComputedEntry.from_dict(d).energy_per_atom) for el, d in raw.items()}


class FormationEnergyHull:
    """Hull from formation energies per atom, built per chemical system on demand (see module docstring).

    Args:
        formulas: one formula per reference material.
        formation_energies: formation energy per atom (eV/atom) of each, on the same scale as the elemental
            references (MP2020-corrected for the default data).
        elemental_refs: ``{element: energy per atom}`` used to turn total energies into formation energies.
        cache_size: number of chemical systems whose candidate tables are kept in memory.
        description: one line for reports.
    """

    def __init__(
        self,
        formulas: list[str],
        formation_energies: np.ndarray | list[float],
        elemental_refs: dict[str, float],
        cache_size: int = 4096,
        description: str = "formation-energy hull",
    ) -> None:
        self.elemental_refs = dict(elemental_refs)
        self.description = description
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        # Grouped by element set from the formula text; only entries that can touch the hull are kept
        # (e <= 0), and Compositions are parsed only for systems in use.
        self._raw: dict[frozenset[str], list[tuple[str, float]]] = {}
        for formula, e in zip(formulas, np.asarray(formation_energies, dtype=float), strict=True):
            if np.isfinite(e) and e <= 0.0:
                system = frozenset(_ELEMENT_RE.findall(str(formula)))
                self._raw.setdefault(system, []).append((str(formula), float(e)))
        self._parsed: dict[frozenset[str], list[tuple[dict[str, float], float]]] = {}

    def _entries(self, system: frozenset[str]) -> list[tuple[dict[str, float], float]]:
        """``[(fractional composition, formation energy per atom)]`` of the entries with exactly ``system``."""
        if system not in self._parsed:
            with warnings.catch_warnings():
                warnings.simplefilter(
                    "ignore"
                )  # pymatgen warns about noble gases lacking electronegativities
                self._parsed[system] = [
                    ({el.symbol: x for el, x in Composition(f).fractional_composition.items()}, e)
                    for f, e in self._raw.get(system, [])
                ]
        return self._parsed[system]

    @classmethod
    def from_csv(
        cls, csv: str | Path, elemental_refs: str | Path | dict[str, float] | None = None, **kwargs
    ) -> FormationEnergyHull:
        """Read a CSV with a formula column and ``formation_energy_per_atom``.

        ``elemental_refs``: a dict, a JSON(.gz) path, or ``None`` for ``ELEMENTAL_REFS_NAME`` next to the CSV.
        """
        csv = Path(csv)
        try:
            frame = pd.read_csv(csv)
        except (ValueError, OSError, UnicodeDecodeError) as exc:  # pandas' parser errors are ValueErrors
            raise ValueError(f"hull reference {csv} is not a readable CSV: {error_text(exc)}") from None
        col = next((c for c in FORMULA_COLUMNS if c in frame.columns), None)
        if col is None or "formation_energy_per_atom" not in frame.columns:
            raise ValueError(
                f"{csv} needs a formula column ({', '.join(FORMULA_COLUMNS)}) and formation_energy_per_atom"
            )
        energies = pd.to_numeric(frame["formation_energy_per_atom"], errors="coerce")
        bad = int(energies.isna().sum())
        frame = frame.assign(formation_energy_per_atom=energies)[energies.notna()]
        if frame.empty:
            raise ValueError(f"hull reference {csv} has no row with a numeric formation_energy_per_atom")
        if bad:
            warnings.warn(
                f"{csv}: {bad} rows without a numeric formation_energy_per_atom ignored", stacklevel=2
            )
        if elemental_refs is None:
            elemental_refs = csv.parent / ELEMENTAL_REFS_NAME
        refs = (
            elemental_refs if isinstance(elemental_refs, dict) else load_elemental_references(elemental_refs)
        )
        kwargs.setdefault("description", f"formation energies from {csv.name} ({len(frame)} entries)")
        return cls(
            frame[col].astype(str).tolist(), frame["formation_energy_per_atom"].to_numpy(), refs, **kwargs
        )

    def _system(self, elements: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Fractional compositions ``(n, k)`` over sorted ``elements`` and energies ``(n,)`` of the candidates.

        The candidates are the elemental terminals (0 eV) and, per distinct composition, the lowest entry
        whose elements lie within ``elements``.
        """
        if elements in self._cache:
            self._cache.move_to_end(elements)
            return self._cache[elements]
        within = frozenset(elements)
        if 2 ** len(within) <= len(self._raw):
            subsystems = [
                frozenset(sub)
                for r in range(1, len(elements) + 1)
                for sub in itertools.combinations(elements, r)
                if frozenset(sub) in self._raw
            ]
        else:
            subsystems = [system for system in self._raw if system <= within]
        lowest: dict[tuple[float, ...], float] = {}
        for i in range(len(elements)):
            lowest[tuple(float(j == i) for j in range(len(elements)))] = 0.0
        for sub in subsystems:
            for frac, e in self._entries(sub):
                key = tuple(round(frac.get(el, 0.0), 12) for el in elements)
                if e < lowest.get(key, np.inf):
                    lowest[key] = e
        table = (np.array(list(lowest), dtype=float), np.array(list(lowest.values()), dtype=float))
        self._cache[elements] = table
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return table

    def reference_compounds(self, composition: Composition) -> int:
        """Candidate reference compounds (formation energy <= 0, elements excluded) in the system."""
        comp = Composition(composition).element_composition
        elements = tuple(sorted(el.symbol for el in comp.elements))
        return len(self._system(elements)[1]) - len(elements)

    def formation_energy_per_atom(self, composition: Composition, energy_per_atom: float) -> float:
        comp = Composition(composition).element_composition
        missing = [el.symbol for el in comp.elements if el.symbol not in self.elemental_refs]
        if missing:
            raise KeyError(f"no elemental reference energy for {', '.join(missing)}")
        mu = sum(self.elemental_refs[el.symbol] * amt for el, amt in comp.items()) / comp.num_atoms
        return float(energy_per_atom - mu)

    def hull_formation_energy_per_atom(self, composition: Composition) -> float:
        """The linear program of the module docstring, solved with HiGHS."""
        from scipy.optimize import linprog

        comp = Composition(composition).element_composition
        if comp.num_atoms <= 0:
            raise ValueError("empty composition")
        elements = tuple(sorted(el.symbol for el in comp.elements))
        if len(elements) == 1:
            return 0.0
        fractions, energies = self._system(elements)
        target = np.array([comp.get_atomic_fraction(el) for el in elements])
        res = linprog(energies, A_eq=fractions.T, b_eq=target, bounds=(0, None), method="highs")
        if res.status != 0:
            raise RuntimeError(f"hull linear program failed for {comp.reduced_formula}: {res.message}")
        return min(0.0, float(res.fun))

    def e_above_hull(self, composition: Composition, energy_per_atom: float) -> float:
        comp = Composition(composition).element_composition
        return self.formation_energy_per_atom(comp, energy_per_atom) - self.hull_formation_energy_per_atom(
            comp
        )


class PhaseDiagramHull:
    """A pickled pymatgen (Patched)PhaseDiagram of total-energy entries (e.g. matbench-discovery's MP PPD)."""

    def __init__(self, phase_diagram: object, description: str = "pickled phase diagram") -> None:
        self.phase_diagram = phase_diagram
        self.description = description

    @classmethod
    def from_pickle(cls, path: str | Path) -> PhaseDiagramHull:
        path = Path(path)
        try:
            with _open(path) as f:
                obj = pickle.load(f)  # noqa: S301 -- a file the user pointed us to
        except Exception as exc:  # UnpicklingError, BadGzipFile, EOFError, missing classes, ...
            raise ValueError(f"hull reference {path} is not a readable pickle: {error_text(exc)}") from None
        if not callable(getattr(obj, "get_hull_energy_per_atom", None)):
            raise ValueError(
                f"hull reference {path} holds a {type(obj).__name__}, not a pymatgen (Patched)PhaseDiagram"
            )
        return cls(obj, description=f"{type(obj).__name__} from {path.name}")

    def e_above_hull(self, composition: Composition, energy_per_atom: float) -> float:
        comp = Composition(composition).element_composition
        return float(energy_per_atom - self.phase_diagram.get_hull_energy_per_atom(comp))


MP_PPD_NAME = "2023-02-07-ppd-mp.pkl.gz"  # the hull FlowMM and the paper's stability numbers use
MP_PPD_URL = "https://figshare.com/ndownloader/files/40344451"  # Matbench Discovery v1.0.0, figshare


def default_hull_path(data_dir: str | Path | None = None) -> Path:
    """``$MATGEN_HULL``, else the ``mp_hull`` folder next to the MP-20 data folder."""
    env = os.environ.get("MATGEN_HULL")
    if env:
        return Path(env).expanduser()
    from matgen.data import resolve_data_dir

    return resolve_data_dir(data_dir).parent / "mp_hull"


def load_hull(path: str | Path | None = None, data_dir: str | Path | None = None) -> HullReference:
    """Open a hull reference: a directory with ``*.csv[.gz]`` + elemental refs, a CSV, or a pickle.

    Opened references are kept for the life of the process (keyed by path and modification time).
    """
    p = Path(path).expanduser() if path is not None else default_hull_path(data_dir)
    key = (str(p.resolve()), p.stat().st_mtime if p.exists() else None)
    if key not in _HULLS:
        _HULLS[key] = _open_hull(p, data_dir)
    return _HULLS[key]


_HULLS: dict[tuple[str, float | None], HullReference] = {}


def _open_hull(p: Path, data_dir: str | Path | None) -> HullReference:
    if not p.exists():
        where = (
            "" if data_dir is None else f" (looked beside the data folder {data_dir}: is --data-dir right?)"
        )
        raise FileNotFoundError(
            f"hull reference {p} not found{where}; pass --hull (or set MATGEN_HULL) to a CSV with formula + "
            "formation_energy_per_atom (or a folder of them with elemental references), or to a "
            f"PatchedPhaseDiagram .pkl[.gz] such as Matbench Discovery's MP hull {MP_PPD_NAME} ({MP_PPD_URL}); "
            "or --skip-stability for the other metrics"
        )
    name = p.name.lower()
    if p.is_dir():
        csvs = sorted(p.glob("*.csv.gz")) + sorted(p.glob("*.csv"))
        if not csvs:
            raise FileNotFoundError(f"no *.csv[.gz] of formation energies in {p}")
        refs = p / ELEMENTAL_REFS_NAME
        return FormationEnergyHull.from_csv(csvs[0], refs if refs.exists() else None)
    if name.endswith((".pkl", ".pkl.gz", ".pickle")):
        return PhaseDiagramHull.from_pickle(p)
    if name.endswith((".csv", ".csv.gz")):
        refs = p.parent / ELEMENTAL_REFS_NAME
        if not refs.exists():
            refs = default_hull_path(data_dir) / ELEMENTAL_REFS_NAME
        return FormationEnergyHull.from_csv(p, refs)
    raise ValueError(f"unrecognised hull reference {p}: expected a directory, .csv[.gz] or .pkl[.gz]")
