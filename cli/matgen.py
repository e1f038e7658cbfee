"""`matgen` command-line app: crystal generation with discrete flow matching.

Each command is a thin layer over the Python API: ``matgen.generate.generate``,
``matgen.train.train_crystal_model`` and ``matgen.evaluate.evaluate``.
"""

from __future__ import annotations

import dataclasses
import errno
from pathlib import Path

import typer

from cli._common import (
    CommandGroup,
    TrainFlags,
    fail,
    folder_flag,
    given,
    report_training,
    run_options,
    train_overrides,
    version_option,
)

app = typer.Typer(
    help="matgen: generate and evaluate crystals with kinetic-optimal discrete flow matching.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=CommandGroup,
)


@app.callback()
def main(version: bool = version_option("matgen")) -> None:
    """Crystal generation with discrete flow matching (MP-20)."""


@app.command()
def generate(
    n: int = typer.Option(100, "--n", min=1, help="Number of crystals to generate."),
    out_text: str = typer.Option(
        "cifs", "--out", metavar="PATH", help="Output folder for CIF files and samples.csv."
    ),
    checkpoint: Path | None = typer.Option(
        None, help="matgen checkpoint (.safetensors); default: the shipped model."
    ),
    steps: int = typer.Option(
        500,
        min=1,
        help="Sampler steps (NFE); the paper uses 500. A crystal goes through the network only in the "
        "steps where one of its tokens is unmasked.",
    ),
    temperature: float | None = typer.Option(
        None,
        help="Posterior softmax temperature (default: the checkpoint's recommendation, else the paper's 0.7).",
    ),
    scheduler: str | None = typer.Option(
        None, help="kappa_t for sampling: ko, linear, cosine (default: as trained)."
    ),
    velocity: str = typer.Option("ko", help="Velocity: ko, power-inf or campbell."),
    corrector: float = typer.Option(
        0.0, help="Weight of the probability-preserving corrector (eq 35); 0 = off."
    ),
    seed: int = typer.Option(0, help="Random seed: the same seed gives the same crystals."),
    batch_size: int = typer.Option(500, min=1, help="Crystals per sampler batch."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    num_atoms: int | None = typer.Option(
        None, min=1, help="Fix the atom count (default: the training distribution)."
    ),
    elements: str | None = typer.Option(
        None,
        help="Restrict atom types to these elements, e.g. Li,Fe,P,O: every atom is one of them (a subset, so a "
        "crystal need not hold all of them).",
    ),
    overwrite: bool = typer.Option(False, help="Replace the crystals of an earlier run in --out."),
    resume: bool = typer.Option(False, help="Continue an interrupted run in --out with the same settings."),
    workers: int = typer.Option(
        0, min=0, help="Processes that decode and write CIFs while sampling goes on (0: none)."
    ),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the network (for long GPU runs)."),
    resample_collisions: int = typer.Option(
        0,
        min=0,
        max=100,
        help="Rounds of re-drawing the coordinates of atoms that landed on another atom's site (beyond "
        "the paper; 0: such sequences are not written, as in the paper's protocol).",
    ),
    length_buckets: int | None = typer.Option(
        None,
        min=1,
        max=1000,
        help="Sample each batch in up to K groups of similar atom count, padded only to each group's "
        "largest crystal (default: 1; on --resume, as before).",
    ),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Generate crystals to CIF files (one per crystal) plus samples.csv."""
    from matgen.generate import generate as run
    from matgen.sampling import CheckpointError

    out = folder_flag(out_text, "--out", "cifs/")  # never write into (or --overwrite) the current folder
    try:
        summary = run(
            n,
            out,
            checkpoint=checkpoint,
            steps=steps,
            temperature=temperature,
            scheduler=scheduler,
            velocity=velocity,
            corrector=corrector,
            seed=seed,
            batch_size=batch_size,
            device=device,
            num_atoms=num_atoms,
            elements=elements.split(",") if elements is not None else None,
            overwrite=overwrite,
            resume=resume,
            progress=not quiet,
            workers=workers,
            compile=compile,
            resample_collisions=resample_collisions,
            length_buckets=length_buckets,
        )
    except (CheckpointError, FileExistsError, ValueError, FloatingPointError) as e:
        fail(str(e))
    except OSError as e:  # an --out that cannot be created or written, a full disk
        where = f" {e.filename}" if e.filename else f" into {out}"
        full = "; the finished batches are kept: free some space, then run again with --resume"
        fail(f"cannot write{where}: {e.strerror or e}{full if e.errno == errno.ENOSPC else ''}")
    except KeyboardInterrupt:
        if not (out / "samples.csv").is_file():
            fail("interrupted before the first batch was written; nothing to keep", code=130)
        fail(
            f"interrupted; the crystals of finished batches are kept in {out} (listed in samples.csv); "
            "run the same command with --resume to continue",
            code=130,
        )
    kept = (
        f"; {summary.skipped_batches} batch(es) kept from the earlier run" if summary.skipped_batches else ""
    )
    if summary.resampled:
        kept += f"; {summary.resampled} written after re-drawing atoms that shared a site"
    typer.echo(
        f"wrote {summary.written} CIF file(s) to {summary.out_dir} ({summary.failed} sequence(s) did not "
        f"decode{kept}) in {summary.seconds:.1f} s; list: {summary.out_dir / 'samples.csv'}"
    )


@app.command()
def train(
    run_dir_text: str = typer.Option(
        "runs/matgen", "--run-dir", metavar="PATH", help="Folder for checkpoints and metrics (resumable)."
    ),
    config: Path | None = typer.Option(None, help="TOML/JSON config with model and train tables."),
    kind: str | None = typer.Option(None, help="dfm (atom-pooling DiT) or ar (autoregressive baseline)."),
    scheduler: str | None = typer.Option(None, help="ko (KO-DFM, eq 33) or linear (DFM)."),
    size: str | None = typer.Option(None, help="Model size preset: tiny, small or default (~25M)."),
    steps: int | None = typer.Option(None, min=1, help="Optimizer steps."),
    batch_size: int | None = typer.Option(None, min=1, help="Crystals per step."),
    lr: float | None = typer.Option(None, help="Peak learning rate."),
    warmup: int | None = TrainFlags.warmup,
    ema_decay: float | None = TrainFlags.ema_decay,
    eval_every: int | None = TrainFlags.eval_every,
    ckpt_every: int | None = TrainFlags.ckpt_every,
    seed: int | None = TrainFlags.seed,
    device: str | None = typer.Option(None, help="auto, cpu or cuda."),
    data_dir: Path | None = typer.Option(
        None,
        help="Data folder with train/val/test .csv[.gz] or .parquet (material_id, cif columns); default: "
        "$MATGEN_DATA, else the MP-20 download cache.",
    ),
    train_limit: int | None = typer.Option(None, help="Use only the first N training crystals."),
    val_limit: int | None = typer.Option(None, help="Use only the first N validation crystals."),
    max_atoms: int | None = typer.Option(
        None, help="Largest crystal the model takes (MP-20: 20); larger ones are left out with a warning."
    ),
    export: str | None = TrainFlags.export,
    export_bf16: bool = TrainFlags.export_bf16,
    no_resume: bool = TrainFlags.no_resume,
    quiet: bool = TrainFlags.quiet,
    time_budget: float | None = TrainFlags.time_budget,
) -> None:
    """Train DFM / KO-DFM (cross-entropy, eq 11) or the AR baseline on MP-20."""
    run_dir = folder_flag(run_dir_text, "--run-dir", "runs/matgen/")
    from matgen.model import CrystalDiTConfig
    from matgen.train import MatgenTrainConfig, load_train_config, train_crystal_model

    try:
        cfg = load_train_config(config) if config else MatgenTrainConfig()
        top = given(
            kind=kind,
            scheduler=scheduler,
            train_limit=train_limit,
            val_limit=val_limit,
            max_atoms=max_atoms,
            data_dir=data_dir,
        )
        tr = train_overrides(
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            warmup=warmup,
            ema_decay=ema_decay,
            eval_every=eval_every,
            ckpt_every=ckpt_every,
            seed=seed,
            device=device,
            time_budget=time_budget,
        )
        model_cfg = cfg.model
        if size is not None:
            try:
                model_cfg = CrystalDiTConfig.preset(size)
            except ValueError as e:
                raise ValueError(f"--size: {e}") from None
        cfg = dataclasses.replace(cfg, **top, model=model_cfg, train=dataclasses.replace(cfg.train, **tr))
        result = train_crystal_model(
            cfg, run_dir, **run_options(no_resume, export, export_bf16, quiet, run_dir)
        )
    except (ValueError, FileNotFoundError, OSError, FloatingPointError) as e:  # FloatingPointError: diverged
        fail(str(e))
    report_training(result, run_dir)


@app.command()
def info(
    checkpoint: Path | None = typer.Argument(
        None, help="matgen checkpoint (.safetensors); default: the shipped model."
    ),
    as_json: bool = typer.Option(False, "--json", help="All of the metadata as JSON."),
) -> None:
    """Describe a checkpoint: config, data, training, sampling defaults (read from its header)."""
    from cli._info import show_checkpoint
    from matgen import tokenizer as tok
    from matgen.sampling import DEFAULT_CHECKPOINT, unseen_elements
    from matgen.train import CHECKPOINT_FORMAT

    def notes(meta: dict) -> list[str]:
        never = unseen_elements(meta, tok.ELEMENT_SYMBOLS)
        if never is None:
            return []
        return [f"elements no training crystal holds: {', '.join(never) if never else 'none'}"]

    show_checkpoint(checkpoint or DEFAULT_CHECKPOINT, (CHECKPOINT_FORMAT,), as_json, notes)


def _register_evaluate() -> None:
    from cli.matgen_evaluate import evaluate_command

    app.command("evaluate")(evaluate_command)


_register_evaluate()


if __name__ == "__main__":  # python -m cli.matgen, where the console script is not installed
    app()
