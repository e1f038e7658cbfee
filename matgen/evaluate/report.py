"""Outputs of an evaluation: results table, summary, relaxed structures, plots, a Markdown report and a
terminal table.

Files written into the output folder:

* ``results.csv`` (and ``results.parquet`` when pyarrow is installed): one row per input crystal;
* ``summary.json``: the metrics dictionary returned by :func:`matgen.evaluate.evaluate`;
* ``relaxed.csv.gz``: ``id, cif`` of the CHGNet-relaxed structures (itself a valid ``evaluate`` input);
* ``candidates/``: one CIF per metastable, unique and novel crystal (E_hull <= 0.1 eV/atom, the M.S.U.N.
  set, which holds the S.U.N. set) that is not slab-like (``vacuum_gap`` over 7 A), as relaxed, and
  ``candidates.csv`` listing them by E_hull: the crystals worth a DFT check;
* ``e_hull_hist.png``, ``element_frequency.png``, ``density.png``, ``n_atoms.png`` (matplotlib, Agg);
* ``report.md``: the summary and the plots.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pymatgen.core import Composition

from dfm_core.atomic_io import atomic_write, atomic_write_text

__all__ = [
    "OUTPUT_FILES",
    "candidate_mask",
    "judged_true",
    "print_summary",
    "remove_outputs",
    "write_outputs",
]

OUTPUT_FILES = (
    "results.csv",
    "results.parquet",
    "summary.json",
    "relaxed.csv.gz",
    "candidates.csv",
    "e_hull_hist.png",
    "element_frequency.png",
    "density.png",
    "n_atoms.png",
    "report.md",
)


def remove_outputs(out: Path) -> None:
    """Remove the tables, plots and report of an earlier run from ``out`` (the journal stays): they are
    written again when this run completes, and a run killed before that must not leave the earlier
    run's numbers looking current."""
    for name in OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)
    folder = out / CANDIDATES_DIR
    if folder.is_dir():  # only the CIFs written there; anything else a user put there stays
        for cif in folder.glob("*.cif"):
            cif.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            folder.rmdir()


CANDIDATES_DIR = "candidates"
CANDIDATE_COLUMNS = ["id", "formula", "n_atoms", "e_hull", "stable", "sun", "known_as", "file"]


def _candidate_stem(crystal_id: str, taken: set[str]) -> str:
    """A file name stem for ``crystal_id`` (its path separators and odd characters made safe), unique
    among ``taken`` (which it joins)."""
    stem = re.sub(r"\.cif(\.gz)?$", "", str(crystal_id), flags=re.IGNORECASE)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem.replace("/", "__")).strip("._")[:120] or "crystal"
    unique, k = stem, 2
    while unique.lower() in taken:
        unique, k = f"{stem}_{k}", k + 1
    taken.add(unique.lower())
    return unique


def judged_true(flags: pd.Series) -> pd.Series:
    """True where a flag column holds True; None / NaN (not judged) count as False. No ``fillna`` on an
    object column (pandas deprecates its downcast)."""
    return flags.map(lambda v: isinstance(v, bool | np.bool_) and bool(v))


def candidate_mask(results: pd.DataFrame) -> pd.Series:
    """The candidates among ``results``: metastable, unique and novel (M.S.U.N.), and not slab-like."""
    from matgen.evaluate.validity import SLAB_GAP

    if "metastable" not in results.columns:
        return pd.Series(False, index=results.index)
    flags = results[["metastable", "unique", "novel"]].apply(judged_true)
    gap = results["vacuum_gap"].to_numpy(float) if "vacuum_gap" in results else np.zeros(len(results))
    return flags.all(axis=1) & ~(gap > SLAB_GAP)


def _write_candidates(out: Path, results: pd.DataFrame, relaxed_cifs: dict[str, str]) -> pd.DataFrame:
    """``candidates/<id>.cif`` (relaxed) and ``candidates.csv`` for the M.S.U.N. crystals, by E_hull."""
    chosen = results[candidate_mask(results) & results["id"].isin(list(relaxed_cifs))]
    chosen = chosen.sort_values("e_hull", kind="stable")
    rows, taken = [], set()
    for _, row in chosen.iterrows():
        name = f"{CANDIDATES_DIR}/{_candidate_stem(row['id'], taken)}.cif"
        atomic_write_text(out / name, relaxed_cifs[row["id"]])
        rows.append(
            {c: row.get(c, "") for c in CANDIDATE_COLUMNS[:-1]}
            | {"n_atoms": int(row["n_atoms"]), "file": name}
        )
    table = pd.DataFrame(rows, columns=CANDIDATE_COLUMNS)
    atomic_write(out / "candidates.csv", lambda tmp: table.to_csv(tmp, index=False))
    return table


RESULT_COLUMNS = [
    "id",
    "formula",
    "n_atoms",
    "n_elements",
    "parsed",
    "sane",
    "struct_valid",
    "comp_valid",
    "valid",
    "density",
    "volume_per_atom",
    "e_initial_per_atom",
    "e_relaxed",
    "e_relaxed_per_atom",
    "relax_steps",
    "relax_converged",
    "e_hull",
    "hull_compounds",
    "stable",
    "metastable",
    "unique",
    "novel",
    "sun",
    "known_as",
    "vacuum_gap",
    "reason",
    "stability_reason",
]


def _elements_of(formulas: list[str]) -> Counter:
    counts: Counter = Counter()
    for f in formulas:
        try:
            counts.update({el.symbol for el in Composition(f).elements})
        except Exception:
            continue
    return counts


def _plots(
    out: Path, results: pd.DataFrame, summary: dict[str, Any], reference: Any
) -> list[tuple[str, str]]:
    from matplotlib.figure import Figure  # not pyplot: a notebook's backend and open figures stay as they are

    def axes(figsize: tuple[float, float]) -> tuple[Any, Any]:
        fig = Figure(figsize=figsize)
        return fig, fig.subplots()

    def save(fig: Any, name: str) -> None:  # renamed into place: a killed run leaves no half a PNG
        atomic_write(out / name, lambda tmp: fig.savefig(tmp, dpi=120, format="png"), suffix=".png")

    made: list[tuple[str, str]] = []
    valid = results["valid"].astype(bool)

    if "e_hull_histogram" in summary:
        h = summary["e_hull_histogram"]
        edges, counts = np.array(h["bin_edges"]), np.array(h["counts"])
        fig, ax = axes((6, 3.5))
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="tab:blue", edgecolor="white")
        ax.axvline(0.0, color="k", lw=1)
        ax.axvline(0.1, color="k", lw=1, ls="--")
        ax.set_xlabel("E_hull (eV/atom), CHGNet vs approximate hull; clipped to the range")
        ax.set_ylabel("crystals (converged relaxations)")
        ax.set_title(f"stable (<= 0): {summary.get('stable_rate', float('nan')):.1%} of all")
        fig.tight_layout()
        save(fig, "e_hull_hist.png")
        made.append(("E_hull distribution", "e_hull_hist.png"))

    gen = _elements_of(results.loc[results["parsed"].astype(bool), "formula"].dropna().tolist())
    ref = _elements_of(list(reference.formulas))
    n_gen = max(int(results["parsed"].astype(bool).sum()), 1)
    n_ref = max(len(reference), 1)
    top = [el for el, _ in (gen + ref).most_common(40)]
    if top:
        fig, ax = axes((11, 3.5))
        x = np.arange(len(top))
        ax.bar(x - 0.2, [gen[e] / n_gen for e in top], width=0.4, label="generated")
        ax.bar(
            x + 0.2,
            [ref[e] / n_ref for e in top],
            width=0.4,
            label=f"{summary.get('data_set', 'MP-20')} test",
        )
        ax.set_xticks(x, top, fontsize=8)
        ax.set_ylabel("fraction of crystals containing")
        ax.legend()
        fig.tight_layout()
        save(fig, "element_frequency.png")
        made.append(("Element frequency", "element_frequency.png"))

    for col, ref_values, fname, label in (
        ("density", reference.density, "density.png", "density (g/cm$^3$)"),
        ("n_atoms", reference.n_atoms, "n_atoms.png", "atoms per cell"),
    ):
        g = results.loc[valid, col].to_numpy(float)
        g = g[np.isfinite(g)]
        fig, ax = axes((6, 3.5))
        r = np.asarray(ref_values, float)
        both = np.concatenate([g, r]) if len(g) else r
        if col == "n_atoms":
            bins = np.arange(0.5, max(both.max() if len(both) else 1, 1) + 1.5, 1.0)
        else:
            lo, hi = float(np.nanmin(both)), float(np.nanmax(both))
            bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 50)
        ax.hist(
            r,
            bins=bins,
            density=True,
            alpha=0.5,
            label=f"{summary.get('data_set', 'MP-20')} test (n={len(r)})",
        )
        if len(g):
            ax.hist(g, bins=bins, density=True, alpha=0.5, label=f"generated, valid (n={len(g)})")
        ax.set_xlabel(label)
        ax.set_ylabel("density of crystals")
        ax.legend()
        fig.tight_layout()
        save(fig, fname)
        made.append((label.split(" (")[0].capitalize() + " distribution", fname))
    return made


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if np.isnan(v):
            return "n/a"
        return f"{v:.4f}"
    return str(v)


SUMMARY_ROWS = [
    ("n_inputs", "crystals"),
    ("n_unparsable", "unparsable or missing"),
    ("n_failed_sanity_bounds", "outside sanity bounds"),
    ("struct_valid", "structural validity"),
    ("comp_valid", "compositional validity (SMACT)"),
    ("valid", "valid (both)"),
    ("cov_recall", "COV-R (CDVAE)"),
    ("cov_precision", "COV-P (CDVAE)"),
    ("cov_recall_valid", "COV-R, valid only"),
    ("cov_precision_valid", "COV-P, valid only"),
    ("wdist_density", "W-dist density"),
    ("wdist_num_elems", "W-dist #elements"),
    ("unique_rate", "unique"),
    ("novel_rate", "novel"),
    ("unique_novel_rate", "unique & novel"),
    ("n_match_undetermined", "  StructureMatcher failed (neither)"),
    ("n_relaxed", "relaxed (CHGNet)"),
    ("n_relax_failed", "relaxation failed"),
    ("n_relax_unconverged", "relaxation not converged"),
    ("stable_rate", "stable (E_hull <= 0)"),
    ("n_stable_no_reference_compounds", "  of which no reference compound in system"),
    ("metastable_rate", "E_hull <= 0.1 eV/atom"),
    ("sun_rate", "S.U.N."),
    ("n_candidates_known", "  candidates that are held-out crystals (val/test splits)"),
    ("n_slab_like", "slab-like (> 7 A of vacuum; not candidates)"),
    ("msun_rate", "M.S.U.N. (<= 0.1)"),
    ("e_hull_median", "median E_hull (eV/atom), converged"),
]


def print_summary(summary: dict[str, Any]) -> None:
    """A rich table of the main numbers, with the stability caveat."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="matgen evaluate", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, label in SUMMARY_ROWS:
        if key in summary:
            table.add_row(label, _fmt(summary[key]))
    console = Console()
    console.print(table)
    console.print(  # names and paths of the user's data: text, not rich markup
        f"reference: {summary.get('reference')}; novelty vs {summary.get('novelty_reference')};"
        f"{_cutoffs_text(summary).rstrip('.').lower()}",
        markup=False,
    )
    if "stability_note" in summary:
        console.print(
            f"[bold yellow]{escape(summary['stability_note'])}[/] Hull: {escape(str(summary.get('hull_reference')))}"
        )


def _cutoffs_text(summary: dict[str, Any]) -> str:
    cuts = summary.get("cov_cutoffs")
    if not cuts:
        return ""
    return f" Coverage cut-offs: structure {cuts['structure']:g}, composition {cuts['composition']:g}."


def _report_md(
    summary: dict[str, Any], plots: list[tuple[str, str]], candidates: pd.DataFrame | None = None
) -> str:
    lines = ["# matgen evaluate report", ""]
    if "stability_note" in summary:
        lines += [f"> **{summary['stability_note']}** Hull reference: {summary.get('hull_reference')}.", ""]
    lines += [
        f"Reference for coverage and distributions: {summary.get('reference')}. "
        f"Novelty against {summary.get('novelty_reference')}.{_cutoffs_text(summary)}",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for key, label in SUMMARY_ROWS:
        if key in summary:
            lines.append(f"| {label} | {_fmt(summary[key])} |")
    lines.append("")
    if summary.get("invalid_reasons"):
        lines += ["## Why crystals were invalid or unreadable", "", "| reason | crystals |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in summary["invalid_reasons"].items()]
        lines.append("")
    if summary.get("stability_reasons"):
        lines += ["## Stability caveats", "", "| reason | crystals |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in summary["stability_reasons"].items()]
        lines.append("")
    if candidates is not None:
        lines += _candidates_md(candidates)
    for title, fname in plots:
        lines += [f"## {title}", "", f"![{title}]({fname})", ""]
    lines += [
        "## Definitions",
        "",
        "Validity, coverage and Wasserstein distances follow CDVAE (Xie et al. 2021); stability uses CHGNet "
        "relaxation (FIRE + Frechet cell filter, fmax and step cap in `summary.json`) and E_hull against the "
        "hull reference above; S.U.N. follows MatterGen (StructureMatcher ltol 0.2, stol 0.3, angle_tol 5). "
        "Rates are fractions of all input crystals. See the docstrings of `matgen.evaluate.*` for details.",
        "",
    ]
    return "\n".join(lines)


def _candidates_md(candidates: pd.DataFrame, shown: int = 20) -> list[str]:
    """The report's table of the lowest-E_hull M.S.U.N. crystals."""
    lines = ["## Candidates: metastable, unique and novel crystals (relaxed CIFs in `candidates/`)", ""]
    if candidates.empty:
        return [*lines, "None of the crystals is within 0.1 eV/atom of the hull, unique and novel.", ""]
    more = (
        f" (the first {shown} of {len(candidates)}; all in `candidates.csv`)"
        if len(candidates) > shown
        else ""
    )
    lines += [
        f"Lowest E_hull first{more}. Novel means new to the training split; a crystal that matches a row of "
        "the held-out splits (val, test) is named in the last column: it is a known crystal.",
        "",
        "| crystal | formula | atoms | E_hull (eV/atom) | S.U.N. | known as |",
        "|---|---|---:|---:|---|---|",
    ]
    for _, row in candidates.head(shown).iterrows():
        sun = "yes" if bool(row["sun"]) else ""
        label = str(row["id"]).replace("|", "\\|").replace("[", "\\[").replace("]", "\\]")
        known = row.get("known_as") if isinstance(row.get("known_as"), str) else ""
        lines.append(
            f"| [{label}]({row['file']}) | {row['formula']} | {int(row['n_atoms'])} | {row['e_hull']:.3f} | "
            f"{sun} | {known} |"
        )
    return [*lines, ""]


def write_outputs(
    out: Path,
    results: pd.DataFrame,
    summary: dict[str, Any],
    reference: Any,
    relax_records: dict[str, dict[str, Any]],
    console: bool = True,
) -> None:
    """Write every output file (see module docstring) and optionally print the summary table."""
    from pymatgen.io.cif import CifWriter

    from matgen.evaluate.journal import structure_from_json

    cols = [c for c in RESULT_COLUMNS if c in results.columns] + [
        c for c in results.columns if c not in RESULT_COLUMNS
    ]
    results = results[cols]
    atomic_write(out / "results.csv", lambda tmp: results.to_csv(tmp, index=False))
    try:
        results.to_parquet(out / "results.parquet", index=False)
    except (ImportError, ValueError, TypeError, OSError) as exc:  # pyarrow missing, a mixed-type column
        (out / "results.parquet").unlink(missing_ok=True)
        warnings.warn(f"results.parquet not written ({exc}); results.csv holds the same table", stacklevel=2)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, allow_nan=True) + "\n")
    relaxed_cifs = {}
    for i, rec in relax_records.items():
        s = structure_from_json(rec.get("relaxed"))
        if s is not None:
            relaxed_cifs[i] = str(CifWriter(s))
    relaxed = pd.DataFrame(
        {"id": list(relaxed_cifs), "cif": list(relaxed_cifs.values())}, columns=["id", "cif"]
    )
    atomic_write(out / "relaxed.csv.gz", lambda tmp: relaxed.to_csv(tmp, index=False, compression="gzip"))
    candidates = _write_candidates(out, results, relaxed_cifs) if relax_records else None
    plots = _plots(out, results, summary, reference)
    atomic_write_text(out / "report.md", _report_md(summary, plots, candidates))
    if console:
        print_summary(summary)
