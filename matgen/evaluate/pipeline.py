"""``evaluate``: judge any crystal generator's output against MP-20, resumably.

Stages (each with a progress bar), per crystal unless noted:

1. read + parse + sanity bounds + structural/compositional validity + fingerprints   -> journal "basic"
2. MP-20 test reference fingerprints (cached on disk; whole set)                       -> coverage, W-dist
3. batched CHGNet relaxation of structurally valid crystals (unless ``skip_stability``) -> journal "relax"
4. E_hull against the hull reference; stable = E_hull <= 0 with >= 2 elements (whole set, cheap)
5. uniqueness within the set, novelty vs the training split (StructureMatcher; whole set)
6. results table, summary, plots, report

Rates are fractions of *all* input crystals (unparsable ones included), as CDVAE does for validity and
MatterGen for stability and S.U.N.; the summary also gives the counts behind them.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pymatgen.core import Structure

from dfm_core.atomic_io import holds_folder_lock
from dfm_core.runtime import resolve_device
from matgen.data import data_set_name, resolve_data_dir
from matgen.evaluate.coverage import (
    COV_COMP_CUTOFF,
    COV_STRUCT_CUTOFF,
    coverage_metrics,
    wasserstein_metrics,
)
from matgen.evaluate.fingerprints import (
    composition_fingerprint,
    decode_array,
    encode_array,
    load_test_reference,
    parallel_map,
    structure_fingerprint,
)
from matgen.evaluate.hull import hull_compounds, load_hull
from matgen.evaluate.inputs import InputItem, Inputs, error_text, parse_cif, read_inputs
from matgen.evaluate.journal import Journal, structure_from_json, structure_to_json
from matgen.evaluate.report import OUTPUT_FILES, candidate_mask, judged_true, remove_outputs
from matgen.evaluate.validity import (
    SLAB_GAP,
    check_sanity,
    composition_validity,
    in_reduced_cell,
    largest_vacuum_gap,
    structure_validity,
)

__all__ = ["STABILITY_NOTE", "evaluate"]

JOURNAL_FORMAT = 1
METASTABLE_CUTOFF = 0.1  # eV/atom
EHULL_BINS = np.round(np.arange(-0.5, 2.0 + 1e-9, 0.05), 3)
STABILITY_NOTE = (
    "Stability numbers are CHGNet (model 0.3.0) energies after a CHGNet relaxation, compared with an APPROXIMATE "
    "convex hull; they are a cheap proxy, not DFT stability."
)


# ------------------------------------------------------------------------------------ per-crystal work
def _parse_item(item: InputItem) -> tuple[Structure | None, str | None]:
    """The crystal of an input (in its LLL-reduced cell if the cell as written is too narrow), or why not."""
    if item.read_error:
        return None, item.read_error
    if item.structure is not None:
        return in_reduced_cell(item.structure), None
    try:
        return in_reduced_cell(parse_cif(item.cif or "")), None
    except Exception as exc:
        msg = error_text(exc)
        return None, f"unparsable CIF: {msg}"


def analyze_crystal(payload: tuple[str, str | None, dict | None, str | None]) -> dict[str, Any]:
    """Stage-1 record of one crystal: parse, sanity, validity, density, fingerprints (worker-safe)."""
    id_, cif, sdict, read_error = payload
    item = InputItem(id_, cif, Structure.from_dict(sdict) if sdict else None, read_error)
    nan = float("nan")
    rec: dict[str, Any] = {
        "stage": "basic",
        "id": id_,
        "formula": None,
        "n_atoms": None,
        "n_elements": None,
        "parsed": False,
        "sane": False,
        "struct_valid": False,
        "comp_valid": False,
        "valid": False,
        "density": nan,
        "volume_per_atom": nan,
        "reason": None,
        "struct_fp": None,
        "comp_fp": None,
    }
    structure, err = _parse_item(item)
    if structure is None:
        rec["reason"] = err
        return rec
    rec["parsed"] = True
    reasons: list[str] = []
    try:
        comp = structure.composition
        rec["formula"] = comp.reduced_formula
        rec["n_atoms"] = len(structure)
        rec["n_elements"] = len(comp.elements)
        rec["comp_valid"] = bool(composition_validity(comp))
    except Exception as exc:
        reasons.append(f"composition error: {exc}")
    insane = check_sanity(structure)
    if insane is not None:
        rec["reason"] = "; ".join([f"failed sanity bounds: {insane}", *reasons])
        return rec
    rec["sane"] = True
    try:
        _measure(structure, rec, reasons)
    except Exception as exc:  # one odd crystal must never stop the run: record why and go on
        msg = error_text(exc) if str(exc).strip() else ""
        reasons.append(f"analysis failed: {type(exc).__name__}{': ' + msg if msg else ''}")
        # rec["valid"] stays False: _measure sets it last, after everything that can raise
    rec["reason"] = "; ".join(reasons) or None
    return rec


def _measure(structure: Structure, rec: dict[str, Any], reasons: list[str]) -> None:
    """Density, validity and fingerprints of a sane crystal, into ``rec`` (reasons appended)."""
    rec["density"] = float(structure.density)
    rec["volume_per_atom"] = float(structure.volume / len(structure))
    struct_ok, why = structure_validity(structure)
    rec["struct_valid"] = struct_ok
    if why:
        reasons.append(why)
    if not rec["comp_valid"]:
        reasons.append("composition fails SMACT charge neutrality / electronegativity")
    fp = structure_fingerprint(structure)
    rec["struct_fp"] = encode_array(fp)
    try:
        rec["comp_fp"] = encode_array(composition_fingerprint(structure))
    except Exception as exc:
        reasons.append(f"composition fingerprint failed: {exc}")
    if fp is None:
        reasons.append("CrystalNN fingerprint failed (counted invalid, as in CDVAE)")
    rec["valid"] = bool(struct_ok and rec["comp_valid"] and fp is not None)


def _payload(item: InputItem) -> tuple[str, str | None, dict | None, str | None]:
    return (
        item.id,
        item.cif,
        item.structure.as_dict() if item.structure is not None else None,
        item.read_error,
    )


# ------------------------------------------------------------------------------------------ the driver
def _check_settings(**values: Any) -> None:
    """Refuse settings that cannot mean anything (before any work is done)."""
    fmax = values["fmax"]
    if not (isinstance(fmax, int | float) and math.isfinite(fmax) and fmax > 0):
        raise ValueError(f"fmax must be a positive number of eV/A, got {fmax}")
    for name in ("relax_steps", "chunk_size"):
        if values[name] < 1:
            raise ValueError(f"{name} must be at least 1, got {values[name]}")
    for name in ("batch_atoms", "test_limit", "train_limit"):
        if values[name] is not None and values[name] < 1:
            raise ValueError(f"{name} must be at least 1 (or unset for no limit), got {values[name]}")
    if values["workers"] < 0:
        raise ValueError(f"workers must be >= 0 (0 = no extra processes), got {values['workers']}")
    cuts = values["cov_cutoffs"]
    if not (
        len(cuts) == 2
        and all(
            isinstance(c, int | float) and not isinstance(c, bool) and math.isfinite(c) and c > 0
            for c in cuts
        )
    ):
        raise ValueError(f"cov_cutoffs must be two positive numbers (structure, composition), got {cuts!r}")


class OtherEvaluation(ValueError):
    """The output folder holds the finished evaluation of other crystals, which this run would replace."""


def _check_out_folder(out: Path, ids: Sequence[str], overwrite: bool) -> None:
    """Refuse an output folder holding files by the names this run writes (``report.md``, ``results.csv``,
    ...) but no journal: they are someone's own files, not an earlier evaluation's, and must not be
    deleted or overwritten. With a journal the folder is an evaluation's, and its tables are rewritten:
    unless they hold crystals these inputs lack (another evaluation: its tables and candidates/ would be
    replaced) and ``overwrite`` is not given."""
    if (out / "journal.jsonl").exists():
        if overwrite or not (out / "results.csv").is_file():
            return
        try:
            before = pd.read_csv(out / "results.csv", usecols=["id"], dtype=str, keep_default_na=False)["id"]
        except (ValueError, OSError):  # unreadable tables are rewritten anyway
            return
        dropped = sorted(set(before) - set(ids))
        if dropped:
            raise OtherEvaluation(
                f"{out} holds the evaluation of other crystals: {len(dropped)} of its {len(before)} (e.g. "
                f"{dropped[0]!r}) are not among these inputs, and its tables, plots and candidates/ would be "
                "replaced. Use another output folder, or overwrite (--overwrite); what it computed stays in "
                "its journal, so evaluating those crystals again there is quick"
            )
        return
    theirs = [name for name in OUTPUT_FILES if (out / name).exists()]
    if theirs:
        raise ValueError(
            f"{out} already holds {', '.join(theirs)} but no journal.jsonl of an evaluation: they would be "
            "replaced; move them away or use another output folder"
        )


def _held_out_sets(data_dir: str | Path | None) -> list[Any]:
    """The data set's val and test splits (those that exist), for :func:`matgen.evaluate.sun.known_as`."""
    from matgen.data import ensure_split_file
    from matgen.evaluate.sun import TrainingSet

    sets = []
    for split in ("val", "test"):
        try:
            ensure_split_file(split, data_dir, download=False)
        except FileNotFoundError:
            continue
        sets.append(TrainingSet(data_dir, split=split))
    return sets


def _described(inputs: Inputs, n: int | None = None) -> str:
    """The inputs in a few words for messages and the summary: the path, or what was passed in memory."""
    if isinstance(inputs, Path) or (isinstance(inputs, str) and "\n" not in inputs):
        return str(inputs)
    what = "CIF text" if isinstance(inputs, str) else f"in-memory {type(inputs).__name__}"
    return what if n is None else f"{what} ({n} crystals)"


JOURNAL_EVERY_S = 15.0  # stage 1 writes its finished crystals at least this often


@holds_folder_lock("out_dir", "output folder")
def evaluate(
    inputs: Inputs,
    out_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    skip_stability: bool = False,
    device: str = "auto",
    hull: str | Path | None = None,
    test_limit: int | None = None,
    train_limit: int | None = None,
    relax_steps: int = 500,
    fmax: float = 0.1,
    batch_atoms: int | None = None,
    seed: int = 0,
    workers: int = 0,
    cache_dir: str | Path | None = None,
    chunk_size: int = 64,
    cov_cutoffs: tuple[float, float] = (COV_STRUCT_CUTOFF, COV_COMP_CUTOFF),
    overwrite: bool = False,
    progress: bool = True,
    console: bool = True,
) -> dict[str, Any]:
    """Evaluate generated crystals: validity, coverage, property distances, stability and S.U.N.

    Args:
        inputs: a folder of ``.cif`` files, POSCARs or extxyz files (searched recursively), one CIF, a CSV/parquet with a ``cif``
            column (optional id column ``material_id``/``id``/``name``/``file``), a zip, extxyz or POSCAR
            file; or in memory: CIF text, a DataFrame with a ``cif`` column, a pymatgen Structure, ASE
            Atoms, or a list of those (see :func:`matgen.evaluate.inputs.read_inputs`).
        out_dir: output folder: ``results.csv`` (+ ``.parquet``), ``summary.json``, ``relaxed.csv.gz``,
            ``candidates/`` (relaxed CIFs of the metastable, unique, novel crystals) with ``candidates.csv``,
            plots, ``report.md`` and the resume journal ``journal.jsonl``. Re-running with the same folder
            resumes; only crystals without a journal record are computed.
        data_dir: MP-20 folder (default: ``$MATGEN_DATA``, see ``matgen.data.resolve_data_dir``).
        skip_stability: skip relaxation, E_hull and S.U.N.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` for CHGNet.
        hull: hull reference (folder, CSV or PatchedPhaseDiagram pickle, see :func:`matgen.evaluate.hull.load_hull`);
            default ``$MATGEN_HULL`` or the ``mp_hull`` folder next to the MP-20 folder.
        test_limit: use a seeded random subset of this many test crystals as the coverage reference.
        train_limit: use the first ``train_limit`` training rows for novelty (quick runs only).
        relax_steps, fmax: FIRE step cap and force threshold (eV/A), as chgnet's ``StructOptimizer``.
        batch_atoms: atoms per batched CHGNet call (default 8192 on CUDA, 256 on CPU).
        seed: seed of the ``test_limit`` subset.
        workers: extra processes for fingerprinting and for building CHGNet graphs during relaxation
            (0 = none; on a GPU machine use most of the spare cores).
        cache_dir: where test-set fingerprints are cached (default ``$MATGEN_CACHE/evaluate`` or
            ``~/.cache/matgen/evaluate``).
        chunk_size: crystals per journal write in stage 1.
        cov_cutoffs: (structure, composition) fingerprint distance cut-offs of coverage: CDVAE's (0.4, 10)
            for MP-20, (0.2, 4) for carbon-24 and perov-5.
        overwrite: replace the tables of an earlier evaluation in ``out_dir`` of crystals these inputs
            lack (refused otherwise, :class:`OtherEvaluation`); a rerun of the same inputs, or of more,
            needs no flag.
        progress: show progress bars; console: print the summary table.

    Returns:
        The summary dictionary (also written to ``summary.json``).
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    _check_settings(
        relax_steps=relax_steps,
        fmax=fmax,
        batch_atoms=batch_atoms,
        workers=workers,
        test_limit=test_limit,
        train_limit=train_limit,
        chunk_size=chunk_size,
        cov_cutoffs=cov_cutoffs,
    )
    out = Path(out_dir)  # a file there was refused by the folder lock
    hull_ref = None
    if not skip_stability:  # a bad --device or --hull fails now, not after the cheap stages
        resolve_device(device)
        hull_ref = load_hull(hull, data_dir)
    from matgen.data import check_split

    # a wrong --data-dir or a bad split table fails now (or downloads now), not after stage 1
    check_split("test", data_dir)
    check_split("train", data_dir, limit=train_limit)

    # 1. read, parse, validity, fingerprints --------------------------------------------------------------
    t0 = time.perf_counter()
    items = read_inputs(inputs)
    if not items:
        where = _described(inputs)
        raise ValueError(
            f"no crystals found in {where} (expected .cif[.gz] files, a table with a 'cif' column, a .zip of CIFs, an .extxyz or a POSCAR)"
        )
    ids = [it.id for it in items]
    digests = {it.id: it.digest for it in items}
    relax_settings = {"step_cap": relax_steps, "fmax_target": fmax}  # kept in each relax record
    _check_out_folder(out, ids, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    journal = Journal(out / "journal.jsonl", {"format": JOURNAL_FORMAT})
    remove_outputs(out)  # written again at the end: a killed run leaves no earlier run's tables behind

    def current(stage: str, id_: str) -> bool:
        """A journal record for ``id_`` made from the same input (and, for relaxations, the same settings)."""
        rec = journal.get(stage, id_)
        if rec is None or rec.get("digest") != digests[id_]:
            return False
        return stage != "relax" or all(rec.get(k) == v for k, v in relax_settings.items())

    try:
        todo = [it for it in items if not current("basic", it.id)]
        n_changed = sum(journal.has("basic", it.id) for it in todo)
        if n_changed:
            warnings.warn(
                f"{n_changed} crystal(s) in {out} were evaluated from other input under the same id, or by "
                "earlier reading rules; they are evaluated again",
                stacklevel=3,
            )
        buffer: list[dict[str, Any]] = []
        last_write = time.monotonic()
        try:
            for rec in parallel_map(
                analyze_crystal,
                [_payload(it) for it in todo],
                workers,
                desc="validity + fingerprints",
                progress=progress,
            ):
                buffer.append({**rec, "digest": digests[rec["id"]]})
                # every chunk_size crystals, and at least every JOURNAL_EVERY_S: large cells take seconds
                # each, and a SIGKILL (no finally) must not lose minutes of them
                if len(buffer) >= chunk_size or time.monotonic() - last_write > JOURNAL_EVERY_S:
                    journal.append(buffer)
                    buffer, last_write = [], time.monotonic()
        finally:  # also when interrupted: the crystals finished so far are not done again
            journal.append(buffer)
        basic = [journal.get("basic", i) for i in ids]
        timings["validity_fingerprints_s"] = time.perf_counter() - t0

        # 2. reference ------------------------------------------------------------------------------------
        t0 = time.perf_counter()
        reference = load_test_reference(
            data_dir,
            test_limit=test_limit,
            seed=seed,
            cache_dir=cache_dir,
            workers=workers,
            progress=progress,
        )
        timings["reference_s"] = time.perf_counter() - t0

        # structures for relaxation / S.U.N. (parsing again is cheap next to everything else)
        structures: list[Structure | None] = []
        for it, rec in zip(items, basic, strict=True):
            structures.append(_parse_item(it)[0] if rec and rec["sane"] else None)

        # 3. relaxation -----------------------------------------------------------------------------------
        relax_recs: dict[str, dict[str, Any]] = {}
        if not skip_stability:
            t0 = time.perf_counter()
            to_relax = [
                k
                for k, rec in enumerate(basic)
                if rec["struct_valid"] and structures[k] is not None and not current("relax", ids[k])
            ]
            if to_relax:
                from matgen.evaluate.relax import relax_structures

                def on_results(batch: list[tuple[int, Any]]) -> None:
                    recs = []
                    for local, res in batch:
                        k = to_relax[local]
                        recs.append(_relax_record(ids[k], digests[ids[k]], relax_settings, res))
                    journal.append(recs)

                relax_structures(
                    [structures[k] for k in to_relax],
                    device=device,
                    fmax=fmax,
                    steps=relax_steps,
                    batch_atoms=batch_atoms,
                    graph_workers=workers,
                    on_results=on_results,
                    progress=progress,
                )
            timings["relax_s"] = time.perf_counter() - t0
            for i in ids:
                if current("relax", i):
                    relax_recs[i] = journal.get("relax", i)
    finally:
        journal.close()

    # 4. E_hull -------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    hull_bar = tqdm(
        zip(ids, basic, strict=True),
        total=len(ids),
        desc="E_hull",
        disable=not progress or skip_stability,
        leave=False,
    )
    rows = [
        _stability_row(i, rec, structures[k], relax_recs.get(i), hull_ref, skip_stability)
        for k, (i, rec) in enumerate(hull_bar)
    ]
    timings["hull_s"] = time.perf_counter() - t0

    # 5. uniqueness and novelty ---------------------------------------------------------------------------
    t0 = time.perf_counter()
    from matgen.evaluate.sun import TrainingSet, known_as, novelty_flags, uniqueness_flags

    sun_structures = []
    for i, s in zip(ids, structures, strict=True):
        r = relax_recs.get(i)
        relaxed = structure_from_json(r.get("relaxed")) if r else None
        sun_structures.append(relaxed if relaxed is not None else s)
    unique = uniqueness_flags(sun_structures, progress=progress)
    training = TrainingSet(data_dir, limit=train_limit)
    novel = novelty_flags(sun_structures, training, progress=progress)
    timings["unique_novel_s"] = time.perf_counter() - t0

    for row, u, n in zip(rows, unique, novel, strict=True):
        row["unique"] = u
        row["novel"] = n
        row.update(_stability_flags(row, skip_stability))

    # 6. outputs ------------------------------------------------------------------------------------------
    results = pd.DataFrame(rows)
    # candidates that a held-out split holds are known crystals, not discoveries (novel = new to train)
    chosen = results["id"][candidate_mask(results) & results["id"].isin(list(relax_recs))]
    by_id = dict(zip(ids, sun_structures, strict=True))
    known = known_as({i: by_id[i] for i in chosen}, _held_out_sets(data_dir)) if len(chosen) else {}
    results["known_as"] = results["id"].map(known).fillna("")
    summary = _summarize(
        results,
        basic,
        reference,
        skip_stability,
        hull_ref,
        train_limit,
        training,
        data_set_name(data_dir),  # "MP-20", or the name of a data folder of one's own
        cov_cutoffs,
    )
    summary["settings"] = {
        "inputs": _described(inputs, len(items)),
        "data_dir": str(resolve_data_dir(data_dir).resolve()),  # the folder used, $MATGEN_DATA's too
        "device": device,
        "relax_steps": relax_steps,
        "fmax": fmax,
        "batch_atoms": batch_atoms,
        "seed": seed,
        "test_limit": test_limit,
        "train_limit": train_limit,
        "cov_cutoffs": list(cov_cutoffs),
    }
    timings["total_s"] = time.perf_counter() - t_start
    summary["timings"] = {k: round(v, 2) for k, v in timings.items()}

    from matgen.evaluate.report import write_outputs

    write_outputs(out, results, summary, reference, relax_recs, console=console)
    return summary


def _relax_record(id_: str, digest: str, relax_settings: dict[str, Any], res: Any) -> dict[str, Any]:
    """The journal record of one relaxation (a :class:`matgen.evaluate.relax.RelaxResult`)."""
    return {
        "stage": "relax",
        "id": id_,
        "digest": digest,
        **relax_settings,
        "e_initial_per_atom": res.initial_energy_per_atom,
        "e_relaxed": res.energy,
        "e_relaxed_per_atom": res.energy_per_atom,
        "relax_steps": res.n_steps,
        "relax_converged": res.converged,
        "relax_fmax": res.fmax,
        "relax_error": res.error,
        "relaxed": structure_to_json(res.structure) if res.structure is not None else None,
    }


def _stability_row(
    id_: str,
    rec: dict[str, Any],
    structure: Structure | None,
    r: dict[str, Any] | None,
    hull_ref: Any,
    skip_stability: bool,
) -> dict[str, Any]:
    """One crystal's row of ``results.csv`` up to S.U.N.: its stage-1 record (fingerprints left out), the
    vacuum gap, and, unless ``skip_stability``, its relaxation (journal record ``r``) and E_hull, or why
    there are none."""
    nan = float("nan")
    row = {key: rec.get(key) for key in rec if key not in ("stage", "struct_fp", "comp_fp")}
    row["id"] = id_
    row["vacuum_gap"] = round(largest_vacuum_gap(structure), 3) if structure is not None else nan
    row.update(
        e_initial_per_atom=nan,
        e_relaxed=nan,
        e_relaxed_per_atom=nan,
        relax_steps=None,
        relax_converged=None,
        e_hull=nan,
        hull_compounds=nan,
        stability_reason=None,
    )
    if skip_stability:
        return row
    if r is None:
        row["stability_reason"] = "not relaxed: " + (
            "structurally invalid" if rec["parsed"] and rec["sane"] else "not parsed / failed sanity bounds"
        )
        return row
    if r.get("relax_error"):
        row["stability_reason"] = r["relax_error"]
        row["relax_steps"] = r.get("relax_steps")
        return row
    row.update(
        e_initial_per_atom=r["e_initial_per_atom"],
        e_relaxed=r["e_relaxed"],
        e_relaxed_per_atom=r["e_relaxed_per_atom"],
        relax_steps=r["relax_steps"],
        relax_converged=r["relax_converged"],
    )
    assert hull_ref is not None  # stability on: the hull was loaded before stage 1
    try:
        composition = structure_from_json(r["relaxed"]).composition
        row["e_hull"] = float(hull_ref.e_above_hull(composition, r["e_relaxed_per_atom"]))
        row["hull_compounds"] = hull_compounds(hull_ref, composition)
    except Exception as exc:
        row["stability_reason"] = f"E_hull failed: {exc}"
    if not r["relax_converged"]:
        row["stability_reason"] = f"relaxation not converged in {r['relax_steps']} steps (E_hull kept)"
    return row


def _stability_flags(row: dict[str, Any], skip_stability: bool) -> dict[str, bool | None]:
    """stable (E_hull <= 0 with >= 2 elements, the paper's rule), metastable (<= METASTABLE_CUTOFF) and
    S.U.N. (stable, unique, novel) of a row that has its ``unique`` and ``novel`` flags."""
    if skip_stability:
        return {"stable": None, "metastable": None, "sun": None}
    eh = row["e_hull"]
    multi = (row.get("n_elements") or 0) >= 2
    known = eh is not None and not math.isnan(eh)
    stable = bool(multi and known and eh <= 0.0)
    return {
        "stable": stable,
        "metastable": bool(multi and known and eh <= METASTABLE_CUTOFF),
        "sun": bool(stable and row["unique"] and row["novel"]),
    }


def _summarize(
    results: pd.DataFrame,
    basic: list[dict[str, Any]],
    reference: Any,
    skip_stability: bool,
    hull_ref: Any,
    train_limit: int | None,
    training: Any,
    data_name: str = "MP-20",
    cov_cutoffs: tuple[float, float] = (COV_STRUCT_CUTOFF, COV_COMP_CUTOFF),
) -> dict[str, Any]:
    n = len(results)
    frac = (lambda x: float(np.sum(x)) / n) if n else (lambda x: float("nan"))
    s: dict[str, Any] = {"n_inputs": n, "data_set": data_name}
    parsed = results["parsed"].astype(bool)
    sane = results["sane"].astype(bool)
    s["n_parsed"] = int(parsed.sum())
    s["n_unparsable"] = int((~parsed).sum())
    s["n_failed_sanity_bounds"] = int((parsed & ~sane).sum())
    s["struct_valid"] = frac(results["struct_valid"].astype(bool))
    s["comp_valid"] = frac(results["comp_valid"].astype(bool))
    s["valid"] = frac(results["valid"].astype(bool))
    s["n_valid"] = int(results["valid"].astype(bool).sum())
    reasons: Counter = Counter()
    for r, ok in zip(results["reason"], results["parsed"], strict=True):
        if isinstance(r, str) and r:
            reasons.update({_reason_category(part) for part in _reason_parts(r, bool(ok))})
    s["invalid_reasons"] = dict(reasons.most_common())

    # coverage (CDVAE convention: every fingerprinted crystal; and valid crystals only)
    fps = [(decode_array(b["struct_fp"]), decode_array(b["comp_fp"]), bool(b["valid"])) for b in basic]
    have = [(sf, cf, v) for sf, cf, v in fps if sf is not None and cf is not None]
    ref_ok = np.isfinite(reference.struct_fp).all(axis=1)
    subset = ", seeded subset" if reference.sampled else ""
    s["reference"] = f"{data_name} test ({len(reference)} crystals{subset})"
    s["n_reference"] = len(reference)
    if have:
        gs = np.stack([h[0] for h in have])
        gc = np.stack([h[1] for h in have])
        cut = dict(struct_cutoff=cov_cutoffs[0], comp_cutoff=cov_cutoffs[1])
        cov = coverage_metrics(
            gs, gc, reference.struct_fp[ref_ok], reference.comp_fp[ref_ok], n_generated=n, **cut
        )
        valid_mask = np.array([h[2] for h in have])
        cov_v = coverage_metrics(
            gs[valid_mask],
            gc[valid_mask],
            reference.struct_fp[ref_ok],
            reference.comp_fp[ref_ok],
            n_generated=n,
            **cut,
        )
    else:
        cov = coverage_metrics(
            np.zeros((0, 61)), np.zeros((0, 132)), reference.struct_fp, reference.comp_fp, n
        )
        cov_v = dict(cov)
    s.update(cov)
    s["cov_cutoffs"] = {"structure": cov_cutoffs[0], "composition": cov_cutoffs[1]}
    s["cov_recall_valid"] = cov_v["cov_recall"]
    s["cov_precision_valid"] = cov_v["cov_precision"]

    valid = results["valid"].astype(bool)
    s.update(
        wasserstein_metrics(
            results.loc[valid, "density"].to_numpy(float),
            results.loc[valid, "n_elements"].to_numpy(float),
            reference.density,
            reference.n_elements.astype(float),
        )
    )

    uniq, nov = judged_true(results["unique"]), judged_true(results["novel"])
    s["unique_rate"] = frac(uniq)
    s["novel_rate"] = frac(nov)
    s["unique_novel_rate"] = frac(uniq & nov)
    undetermined = (results["unique"].isna() | results["novel"].isna()) & results["sane"].astype(bool)
    if undetermined.any():  # StructureMatcher failed on them: counted as neither unique nor novel
        s["n_match_undetermined"] = int(undetermined.sum())
    unreadable = f", {training.unreadable} unreadable and left out" if training.unreadable else ""
    s["novelty_reference"] = (
        f"{data_name} train ({training.size} rows{', limited' if train_limit else ''}{unreadable})"
    )

    if not skip_stability:
        eh = results["e_hull"].to_numpy(float)
        relaxed = np.isfinite(results["e_relaxed_per_atom"].to_numpy(float))
        s["n_relaxed"] = int(relaxed.sum())
        s["n_relax_attempted"] = int(results["struct_valid"].astype(bool).sum())
        s["n_relax_failed"] = int(s["n_relax_attempted"] - relaxed.sum())
        conv = results["relax_converged"]
        s["n_relax_unconverged"] = int(((conv == False) & relaxed).sum())  # noqa: E712
        s["stable_rate"] = frac(results["stable"].astype(bool))
        s["metastable_rate"] = frac(results["metastable"].astype(bool))
        s["sun_rate"] = frac(results["sun"].astype(bool))
        s["msun_rate"] = frac(results["metastable"].astype(bool) & uniq & nov)
        s["n_stable"] = int(results["stable"].astype(bool).sum())
        s["n_stable_no_reference_compounds"] = int(
            (results["stable"].astype(bool) & (results["hull_compounds"] == 0)).sum()
        )
        s["n_sun"] = int(results["sun"].astype(bool).sum())
        s["n_candidates_known"] = int((results["known_as"].fillna("").astype(str) != "").sum())
        s["n_slab_like"] = int((results["vacuum_gap"].to_numpy(float) > SLAB_GAP).sum())
        # the distribution of E_hull: converged relaxations only (one stopped at the step cap can sit eV
        # above its minimum, and a few such dominate a mean); the rates above count every crystal
        finite = eh[np.isfinite(eh) & (conv == True).to_numpy()]  # noqa: E712
        s["e_hull_mean"] = float(finite.mean()) if len(finite) else float("nan")
        s["e_hull_median"] = float(np.median(finite)) if len(finite) else float("nan")
        clipped = np.clip(finite, EHULL_BINS[0], EHULL_BINS[-1])
        counts, _ = np.histogram(clipped, bins=EHULL_BINS)
        s["e_hull_histogram"] = {
            "bin_edges": EHULL_BINS.tolist(),
            "counts": counts.tolist(),
            "note": "converged relaxations only; values outside the range are counted in the first/last bin",
        }
        s["hull_reference"] = getattr(hull_ref, "description", str(hull_ref))
        s["stability_note"] = STABILITY_NOTE
        stab_reasons = Counter(r.split(":")[0].split(" (")[0] for r in results["stability_reason"].dropna())
        s["stability_reasons"] = dict(stab_reasons.most_common(12))
    return json.loads(json.dumps(s, default=_json_default))


_REASON_CATEGORIES = (
    ("empty cif", "empty CIF"),
    ("unparsable", "unparsable CIF"),
    ("unreadable", "unreadable file"),
    ("sanity", "outside sanity bounds"),
    ("apart", "atoms closer than 0.5 A"),
    ("volume ", "cell volume < 0.1 A^3"),
    ("smact", "composition fails SMACT"),
    ("crystalnn", "CrystalNN fingerprint failed"),
    ("composition", "composition error"),
    ("structurally invalid", "not relaxed: structurally invalid"),
    ("not parsed", "not relaxed: unparsed or outside sanity bounds"),
    ("diverged", "relaxation diverged"),
    ("graph construction", "CHGNet graph construction failed"),
    ("out of memory", "CUDA out of memory"),
    ("not converged", "relaxation hit the step cap (E_hull kept)"),
    ("e_hull failed", "E_hull failed (e.g. no elemental reference)"),
)


def _reason_parts(reason: str, parsed: bool) -> list[str]:
    """The separate reasons in one crystal's ``reason`` text (joined by '; '). An unparsed crystal has one
    reason, a read or parse error whose message may itself hold '; ' (:func:`error_text` joins its lines
    so); so does the "analysis failed" reason, which always comes last."""
    if not parsed:
        return [reason]
    parts = reason.split("; ")
    for k, part in enumerate(parts):
        if part.startswith("analysis failed"):
            return [*parts[:k], "; ".join(parts[k:])]
    return parts


def _reason_category(reason: str) -> str:
    """A short, countable label for a free-text reason (the full text stays in results.csv)."""
    low = reason.lower()
    for needle, label in _REASON_CATEGORIES:
        if needle in low:
            return label
    return reason.split(":")[0][:60]


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
