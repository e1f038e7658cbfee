"""``matgen evaluate``: a thin typer layer over :func:`matgen.evaluate.evaluate`.

Registered in ``cli/matgen.py`` with ``app.command("evaluate")(evaluate_command)``.
"""

from __future__ import annotations

from pathlib import Path

import typer

from cli._common import fail, float_list, folder_flag

__all__ = ["evaluate_command"]


def evaluate_command(
    inputs: Path = typer.Argument(
        ...,
        help="Generated crystals: a folder of .cif files (POSCARs and .extxyz files in it are read too), one "
        ".cif, a .csv/.parquet with a 'cif' column, a .zip of CIFs, an .extxyz of periodic frames, or a POSCAR.",
        exists=True,
    ),
    out_text: str = typer.Option(
        "eval_out",
        "--out",
        "-o",
        metavar="PATH",
        help="Output folder (re-running with the same inputs resumes; other inputs need --overwrite).",
    ),
    data_dir: Path | None = typer.Option(
        None,
        "--data-dir",
        help="Reference data: a folder with {train,test}.csv[.gz] or .parquet (MP-20 or one's own), or a data "
        "root holding mp_20/ (default: $MATGEN_DATA, else the MP-20 download cache, filled on first use).",
    ),
    skip_stability: bool = typer.Option(
        False, "--skip-stability", help="Skip CHGNet relaxation, E_hull, S.U.N."
    ),
    device: str = typer.Option("auto", "--device", help="CHGNet device: auto, cpu, cuda, cuda:1, ..."),
    hull: Path | None = typer.Option(
        None,
        "--hull",
        help="Hull reference: folder like mp_hull, CSV (formula, formation_energy_per_atom) or "
        "PatchedPhaseDiagram .pkl[.gz] (default: $MATGEN_HULL or mp_hull next to the data folder).",
    ),
    test_limit: int | None = typer.Option(
        None, "--test-limit", help="Seeded random subset of the MP-20 test set as coverage reference."
    ),
    train_limit: int | None = typer.Option(None, "--train-limit", help="First N training rows for novelty."),
    relax_steps: int = typer.Option(500, "--relax-steps", help="FIRE step cap."),
    fmax: float = typer.Option(0.1, "--fmax", help="Force convergence threshold (eV/A)."),
    batch_atoms: int | None = typer.Option(
        None, "--batch-atoms", help="Atoms per batched CHGNet call (default 8192 on CUDA, 256 on CPU)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the --test-limit subset."),
    workers: int = typer.Option(
        0, "--workers", help="Extra processes for fingerprinting and CHGNet graph building (0 = none)."
    ),
    cache_dir: Path | None = typer.Option(
        None, "--cache-dir", help="Cache for test-set fingerprints (default: $MATGEN_CACHE/evaluate)."
    ),
    cov_cutoffs: str = typer.Option(
        "0.4,10",
        "--cov-cutoffs",
        metavar="STRUCT,COMP",
        help="Coverage cut-offs of the structure and composition fingerprint distances: CDVAE's 0.4,10 for "
        "MP-20; 0.2,4 for carbon-24 and perov-5.",
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an earlier evaluation of other crystals in --out."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    quiet: bool = typer.Option(
        False, "--quiet", help="No progress bars (as --no-progress; the other commands' flag)."
    ),
) -> None:
    """Evaluate generated crystals: validity, coverage, distributions, CHGNet stability, S.U.N."""
    from dfm_core.atomic_io import FolderInUse
    from matgen.data import DownloadError
    from matgen.evaluate import evaluate
    from matgen.evaluate.journal import JournalMismatch, NotAJournal
    from matgen.evaluate.pipeline import OtherEvaluation

    out = folder_flag(out_text, "--out", "eval_out/")

    def kept() -> str:
        journal = out / "journal.jsonl"
        return f"; results computed so far are kept in {out}" if journal.is_file() else ""

    try:
        summary = evaluate(
            inputs,
            out,
            data_dir=data_dir,
            skip_stability=skip_stability,
            device=device,
            hull=hull,
            test_limit=test_limit,
            train_limit=train_limit,
            relax_steps=relax_steps,
            fmax=fmax,
            batch_atoms=batch_atoms,
            seed=seed,
            workers=workers,
            cache_dir=cache_dir,
            overwrite=overwrite,
            cov_cutoffs=tuple(float_list(cov_cutoffs, "--cov-cutoffs")),  # evaluate checks the two numbers
            progress=progress and not quiet,
            console=True,
        )
    except DownloadError as e:
        fail(
            f"{e}\nthe MP-20 reference (test set for coverage, train set for novelty) is needed: pass --data-dir or "
            f"set MATGEN_DATA to a folder with train/val/test.csv[.gz]{kept()}"
        )
    except (FolderInUse, NotAJournal, OtherEvaluation) as e:  # refused before any work: nothing to keep
        fail(str(e))
    except (ValueError, FileNotFoundError, JournalMismatch) as e:
        fail(f"{e}{kept()}")
    except OSError as e:  # an output folder that cannot be written, a disk that is full, ...
        where = f" ({e.filename})" if e.filename else ""
        fail(f"cannot read or write a file{where}: {e.strerror or e}{kept()}")
    except KeyboardInterrupt:
        fail(f"interrupted{kept()}; run the same command again to continue from there", code=130)
    typer.echo(f"wrote {out / 'results.csv'}, {out / 'summary.json'}, {out / 'report.md'}")
    if not skip_stability:
        n = len(list((out / "candidates").glob("*.cif")))
        known = summary.get("n_candidates_known", 0)
        also = (
            f"; {known} of them match held-out crystals of the data set (candidates.csv, known_as)"
            if known
            else ""
        )
        typer.echo(
            f"{n} candidate crystal(s) (metastable, unique, novel; relaxed) in {out / 'candidates'}{also}"
        )
