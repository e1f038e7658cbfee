"""Uniqueness within the generated set and novelty against the training set (the U and N of S.U.N.).

Matching: pymatgen ``StructureMatcher(ltol=0.2, stol=0.3, angle_tol=5)`` (pymatgen's defaults, used by
MatterGen and FlowMM for S.U.N.), which compares reduced cells up to symmetry, origin and supercells.
Two crystals can only match when their reduced formulas agree, so every search is restricted to one
formula group first: uniqueness compares a crystal with the earlier representatives of its formula only,
novelty with the training crystals of its formula only (parsed on demand from the split CSV's
``pretty_formula`` column, which is MP's reduced formula; rows lacking it are parsed and grouped).

Species are compared as elements: a crystal written with oxidation states (``Fe2+``, or pymatgen's
``_atom_type_oxidation_number`` loop) matches the same crystal without them, in either order.

* unique: the first crystal (in input order) of each equivalence class is unique, later matches are not;
  so the number of unique crystals is the number of distinct structures.
* novel: no training crystal matches.
* S.U.N. (MatterGen, Zeni et al. 2025): stable and unique and novel, as a fraction of all generated.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

from pymatgen.core import Composition, Element, Structure

__all__ = ["TrainingSet", "known_as", "make_matcher", "novelty_flags", "uniqueness_flags"]

LTOL, STOL, ANGLE_TOL = 0.2, 0.3, 5.0


def make_matcher():
    from pymatgen.analysis.structure_matcher import StructureMatcher

    return StructureMatcher(ltol=LTOL, stol=STOL, angle_tol=ANGLE_TOL)


def elements_only(structure: Structure) -> Structure:
    """``structure`` with oxidation states removed (a copy; the same object if it has none)."""
    if all(isinstance(sp, Element) for sp in structure.composition):
        return structure
    plain = structure.copy()
    plain.remove_oxidation_states()
    return plain


def _fit(matcher, a: Structure, b: Structure) -> bool | None:
    """Whether ``a`` and ``b`` match; ``None`` when the matcher fails on them (an odd cell, say), which the
    callers turn into "undetermined" rather than "no match": a failure must not count as novel or unique."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return bool(matcher.fit(a, b))
    except Exception:
        return None


def _matched(matcher, s: Structure, others: Sequence[Structure]) -> bool | None:
    """``True`` if ``s`` matches one of ``others``, ``False`` if it matches none, ``None`` if it matches none
    but the matcher failed on some."""
    failed = False
    for other in others:
        fit = _fit(matcher, s, other)
        if fit:
            return True
        failed |= fit is None
    return None if failed else False


def uniqueness_flags(structures: Sequence[Structure | None], progress: bool = True) -> list[bool | None]:
    """``True`` for the first member of each StructureMatcher class, ``False`` for later ones, ``None`` for
    missing structures and for those the matcher failed on (undetermined; they join no class)."""
    from tqdm.auto import tqdm

    matcher = make_matcher()
    reps: dict[str, list[Structure]] = {}
    out: list[bool | None] = []
    for s in tqdm(structures, desc="uniqueness", disable=not progress, leave=False):
        if s is None:
            out.append(None)
            continue
        s = elements_only(s)
        group = reps.setdefault(s.composition.reduced_formula, [])
        matched = _matched(matcher, s, group)
        if matched is None:
            out.append(None)
        elif matched:
            out.append(False)
        else:
            group.append(s)
            out.append(True)
    return out


class TrainingSet:
    """Training crystals grouped by reduced formula, parsed lazily (one formula group at a time).

    Args:
        data_dir: MP-20 data folder (``matgen.data.resolve_data_dir`` semantics).
        split: which split counts as "seen" (``train``).
        limit: keep the first ``limit`` rows only (tests / quick runs).
    """

    def __init__(
        self, data_dir: str | Path | None = None, split: str = "train", limit: int | None = None
    ) -> None:
        from matgen.data import load_split

        frame = load_split(split, data_dir, limit)
        self.size = len(frame)
        self.unreadable = 0  # rows that are not in the reference: a crystal like them would count as novel
        self._cifs: dict[str, list[tuple[str, str]]] = {}  # reduced formula -> (material_id, cif)
        formulas = frame["pretty_formula"] if "pretty_formula" in frame.columns else [None] * len(frame)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for material_id, formula, cif in zip(frame["material_id"], formulas, frame["cif"], strict=True):
                key = self._key(formula, cif) if isinstance(cif, str) else None
                if key is None:
                    self.unreadable += 1
                else:
                    self._cifs.setdefault(key, []).append((str(material_id), cif))
        self._parsed: dict[str, list[tuple[str, Structure]]] = {}

    @staticmethod
    def _key(formula: object, cif: str) -> str | None:
        """The row's reduced formula: from its ``pretty_formula`` (fast), else from its CIF (a data set of
        one's own may lack the column or hold a formula pymatgen cannot read); None if neither reads."""
        from matgen.evaluate.inputs import parse_cif

        if isinstance(formula, str) and formula:
            try:
                return Composition(formula).reduced_formula
            except Exception:
                pass  # the CIF decides
        try:
            return parse_cif(cif).composition.reduced_formula
        except Exception:
            return None

    def structures(self, reduced_formula: str) -> list[Structure]:
        return [s for _, s in self.entries(reduced_formula)]

    def entries(self, reduced_formula: str) -> list[tuple[str, Structure]]:
        """``(material_id, structure)`` of the rows of this reduced formula (parsed on first use)."""
        if reduced_formula not in self._parsed:
            from matgen.evaluate.inputs import parse_cif

            parsed = []
            for material_id, cif in self._cifs.get(reduced_formula, []):
                try:
                    parsed.append((material_id, elements_only(parse_cif(cif))))
                except Exception:  # counted: the summary says how many rows the reference lacks
                    self.unreadable += 1
            self._parsed[reduced_formula] = parsed
        return self._parsed[reduced_formula]

    def n_formulas(self) -> int:
        return len(self._cifs)


def novelty_flags(
    structures: Sequence[Structure | None], training: TrainingSet, progress: bool = True
) -> list[bool | None]:
    """``True`` if no training crystal of the same reduced formula matches, ``False`` if one does, ``None``
    for missing structures and for those the matcher failed on without finding a match (undetermined)."""
    from tqdm.auto import tqdm

    matcher = make_matcher()
    out: list[bool | None] = []
    for s in tqdm(structures, desc="novelty", disable=not progress, leave=False):
        if s is None:
            out.append(None)
            continue
        s = elements_only(s)
        matched = _matched(matcher, s, training.structures(s.composition.reduced_formula))
        out.append(None if matched is None else not matched)
    return out


def known_as(structures: dict[str, Structure], references: Sequence[TrainingSet]) -> dict[str, str]:
    """For crystals (by id) that match a row of one of ``references`` (e.g. the held-out splits, which
    novelty does not consult), that row's material id: "novel" means new to the training set, and a
    crystal the data set already holds elsewhere is no discovery."""
    matcher = make_matcher()
    found: dict[str, str] = {}
    for crystal_id, structure in structures.items():
        s = elements_only(structure)
        for reference in references:
            match = next(
                (mid for mid, t in reference.entries(s.composition.reduced_formula) if _fit(matcher, s, t)),
                None,
            )
            if match is not None:
                found[crystal_id] = match
                break
    return found
