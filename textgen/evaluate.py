"""Evaluation of text models: a Table-1 style likelihood table and sample quality.

* Likelihood (section 8.1, Appendix E.1): for a DFM model the perplexity bound ``exp(nats/token)`` from
  the negative ELBO of eq 37 evaluated by :func:`dfm_core.objectives.fair_elbo` (change of variables to
  the reference kappa, 1024 stratified points by default); for the AR baseline the exact perplexity.
  Each evaluation set (WikiText-2/103, PTB, LAMBADA test; or any text file) is detokenised, tokenized
  with EOT after each document and packed into chunks of the model's ``seq_len``.
* Sample quality: the unigram entropy of each sample (nats; low values flag repetitive text) and the
  generative perplexity under a judge model (:mod:`textgen.judge`), at one or several NFE.

The report prints with rich and is written as ``likelihood.csv``, ``samples.csv`` and ``report.json``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dfm_core.atomic_io import (
    ResultLog,
    atomic_write,
    atomic_write_text,
    check_writable,
    file_sha256,
    holds_folder_lock,
    remove_stale_temps,
)
from dfm_core.objectives import fair_elbo
from dfm_core.velocities import make_velocity
from textgen.checkpoint import TextModel
from textgen.data import EVAL_CORPORA, load_corpora, pack
from textgen.generate import check_alpha, check_temperature, generate_tokens
from textgen.judge import Judge
from textgen.tokenizer import TextTokenizer

__all__ = [
    "DEFAULT_EVAL_SETS",
    "RESULT_LOG",
    "LikelihoodResult",
    "SampleQuality",
    "EvaluationReport",
    "eval_sequences",
    "plot_samples_vs_nfe",
    "sequence_nats",
    "unigram_entropy",
    "sample_quality",
    "score_samples",
    "evaluate",
]

DEFAULT_EVAL_SETS = tuple(EVAL_CORPORA)
RESULT_LOG = "cells.jsonl"  # finished table cells of an evaluation, for resuming it


@dataclass
class LikelihoodResult:
    """One cell of the likelihood table. ``exact`` is True for the AR model, False for an ELBO bound."""

    model: str
    checkpoint: str
    dataset: str
    nats_per_token: float
    exact: bool
    num_sequences: int
    num_tokens: int
    n_points: int | None
    seconds: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats_per_token)

    def cell(self) -> str:
        return f"{self.perplexity:.2f}" if self.exact else f"< {self.perplexity:.2f}"


@dataclass
class SampleQuality:
    """Sample statistics of one model at one NFE."""

    model: str
    checkpoint: str
    nfe: int | None
    n: int
    length: int
    temperature: float
    unigram_entropy: float
    gen_perplexity: float | None
    judge: str | None
    seconds: float


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 sequence per data set (or None for all), got {limit}")


def eval_sequences(
    dataset: str,
    tokenizer: TextTokenizer,
    seq_len: int,
    limit: int | None = None,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Tensor:
    """Packed ``(N, seq_len)`` sequences of an evaluation set (a name of :data:`EVAL_CORPORA` or a path);
    the first ``limit`` (>= 1) if given."""
    _check_limit(limit)
    corpus = load_corpora([dataset], tokenizer, data_dir, cache_dir)
    seqs = pack(corpus.tokens, seq_len)
    if seqs.shape[0] == 0:
        raise ValueError(f"{dataset} holds fewer than {seq_len} tokens")
    return seqs[:limit] if limit is not None else seqs


@torch.no_grad()
def sequence_nats(
    model: TextModel,
    sequences: Tensor,
    n_points: int = 1024,
    batch_size: int = 16,
    chunk: int = 1,
    seed: int = 0,
    progress: bool = False,
) -> Tensor:
    """Negative log-likelihood in nats per sequence ``(N,)``: exact for AR, the fair ELBO bound (E.1) for DFM."""
    _check_counts(n_points=n_points, batch_size=batch_size, chunk=chunk)
    if sequences.shape[0] == 0:
        raise ValueError("no sequences to evaluate")
    out = []
    g = torch.Generator(device=model.device).manual_seed(seed)
    batches = range(0, sequences.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="likelihood", unit="batch", leave=False)
    for start in batches:
        x1 = sequences[start : start + batch_size].to(model.device)
        if model.kind == "ar":
            with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=model.device.type == "cuda"):
                out.append(model.model.token_nll(x1).double().sum(-1).cpu())
        else:
            res = fair_elbo(model.logits_fn(), x1, model.path, n_points=n_points, generator=g, chunk=chunk)
            out.append(res.nats_per_sequence.cpu())
    return torch.cat(out)


def unigram_entropy(tokens: Tensor, ignore: Sequence[int] = ()) -> Tensor:
    """Entropy (nats) of each row's token histogram: ``(n, L) -> (n,)``; ``ignore`` ids are not counted."""
    rows = []
    for row in tokens:
        if ignore:
            keep = torch.ones_like(row, dtype=torch.bool)
            for i in ignore:
                keep &= row != i
            row = row[keep]
        if row.numel() == 0:
            rows.append(0.0)
            continue
        p = torch.unique(row, return_counts=True)[1].double() / row.numel()
        rows.append(float(-(p * p.log()).sum()))
    return torch.tensor(rows, dtype=torch.float64)


def score_samples(
    tokens: Tensor, tokenizer: TextTokenizer, judge: Judge | None
) -> tuple[float, float | None]:
    """Mean unigram entropy of sampled token rows and, with a judge, their generative perplexity (the
    texts decoded with end-of-text as a line break)."""
    entropy = float(unigram_entropy(tokens).mean())
    if judge is None:
        return entropy, None
    texts = [t.replace("<|endoftext|>", "\n") for t in tokenizer.decode_batch(tokens, show_special=False)]
    return entropy, judge.perplexity(texts)


def sample_quality(
    model: TextModel,
    tokenizer: TextTokenizer,
    n: int = 16,
    nfe: int = 256,
    judge: Judge | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    name: str | None = None,
    **sampler: Any,
) -> SampleQuality:
    """Draw ``n`` samples and score them: mean unigram entropy and (with a judge) generative perplexity."""
    start = time.perf_counter()
    tokens = generate_tokens(
        model, n, steps=nfe, temperature=temperature, seed=seed, batch_size=batch_size, **sampler
    )
    entropy, gen_ppl = score_samples(tokens, tokenizer, judge)
    return SampleQuality(
        model=name or model.label,
        checkpoint=str(model.checkpoint),
        nfe=nfe if model.kind == "dfm" else None,
        n=n,
        length=int(tokens.shape[1]),
        temperature=temperature,
        unigram_entropy=entropy,
        gen_perplexity=gen_ppl,
        judge=judge.name if judge is not None else None,
        seconds=time.perf_counter() - start,
    )


REPORT_FILES = (
    "likelihood.csv",
    "samples.csv",
    "report.json",
    "samples_vs_nfe.png",
)  # EvaluationReport.write


@dataclass
class EvaluationReport:
    """Likelihood cells (rows = models, columns = data sets), sample-quality rows, and the settings."""

    likelihood: list[LikelihoodResult] = field(default_factory=list)
    samples: list[SampleQuality] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def models(self) -> list[str]:
        seen: dict[str, None] = {}
        for r in self.likelihood:
            seen.setdefault(r.model)
        return list(seen)

    def datasets(self) -> list[str]:
        seen: dict[str, None] = {}
        for r in self.likelihood:
            seen.setdefault(r.dataset)
        return list(seen)

    def cell(self, model: str, dataset: str) -> LikelihoodResult | None:
        return next((r for r in self.likelihood if r.model == model and r.dataset == dataset), None)

    def likelihood_table(self):
        """A rich Table like the paper's Table 1: perplexity (``<`` marks an ELBO bound)."""
        from rich.markup import escape
        from rich.table import Table

        table = Table(title="Perplexity (< : ELBO bound, eq 37 / E.1; AR: exact)")
        table.add_column("model")
        for d in self.datasets():
            table.add_column(escape(d), justify="right")  # user names: "[red]" is text, not a style
        for m in self.models():
            table.add_row(
                escape(m), *[(c.cell() if (c := self.cell(m, d)) else "-") for d in self.datasets()]
            )
        return table

    def samples_table(self):
        from rich.markup import escape
        from rich.table import Table

        judge = next((s.judge for s in self.samples if s.judge), None)
        table = Table(title=f"Samples (judge: {escape(judge or 'none')})")
        for col in ("model", "NFE", "n", "unigram entropy", "gen. perplexity"):
            table.add_column(col, justify="left" if col == "model" else "right")
        for s in self.samples:
            table.add_row(
                escape(s.model),
                str(s.nfe) if s.nfe else "AR",
                str(s.n),
                f"{s.unigram_entropy:.3f}",
                f"{s.gen_perplexity:.2f}" if s.gen_perplexity is not None else "-",
            )
        return table

    def write(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Write ``likelihood.csv`` (one row per model), ``samples.csv``, ``report.json`` and the figure
        ``samples_vs_nfe.png``; a table or figure this report has no rows for is removed, so that a folder
        never mixes two runs."""
        out = check_writable(out_dir, "output folder", folder=True)
        for name, rows in (("likelihood.csv", self.likelihood), ("samples.csv", self.samples)):
            if not rows:
                (out / name).unlink(missing_ok=True)
        paths = {}
        if self.likelihood:
            p = out / "likelihood.csv"
            with io.StringIO(newline="") as f:
                w = csv.writer(f)
                w.writerow(["model", "checkpoint", "kind", *self.datasets()])
                for m in self.models():
                    cells = [self.cell(m, d) for d in self.datasets()]
                    first = next(c for c in cells if c is not None)
                    w.writerow(
                        [
                            m,
                            first.checkpoint,
                            "exact" if first.exact else "elbo_bound",
                            *[f"{c.perplexity:.4f}" if c else "" for c in cells],
                        ]
                    )
                atomic_write_text(p, f.getvalue())
            paths["likelihood"] = p
        if self.samples:
            p = out / "samples.csv"
            with io.StringIO(newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(asdict(self.samples[0])))
                w.writeheader()
                w.writerows(asdict(s) for s in self.samples)
                atomic_write_text(p, f.getvalue())
            paths["samples"] = p
        p = out / "report.json"
        atomic_write_text(
            p,
            json.dumps(
                {
                    "settings": self.settings,
                    "likelihood": [dict(asdict(r), perplexity=r.perplexity) for r in self.likelihood],
                    "samples": [asdict(s) for s in self.samples],
                },
                indent=2,
            )
            + "\n",
        )
        paths["report"] = p
        plot = out / "samples_vs_nfe.png"
        if plot_samples_vs_nfe(self.samples, plot) is not None:
            paths["plot"] = plot
        else:
            plot.unlink(missing_ok=True)  # a folder never shows an older run's figure
        return paths


def plot_samples_vs_nfe(samples: Sequence[SampleQuality], path: str | os.PathLike) -> Path | None:
    """Generative perplexity (when a judge scored them) and unigram entropy vs NFE, one line per model,
    log-2 NFE axis; AR rows as dashed horizontal lines. None (nothing written) without a DFM row."""
    if not any(s.nfe for s in samples):
        return None
    from matplotlib.figure import Figure  # not pyplot: a notebook's backend and open figures stay as they are

    judged = any(s.gen_perplexity is not None for s in samples)
    panels = [("unigram_entropy", "unigram entropy (nats)")]
    if judged:
        judge = next(s.judge for s in samples if s.judge)
        panels.insert(0, ("gen_perplexity", f"gen. perplexity ({judge})"))
    fig = Figure(figsize=(5.5 * len(panels), 4))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (field_name, label) in zip(axes[0], panels, strict=True):
        curves: dict[str, list[tuple[int, float]]] = {}
        for s in samples:
            value = getattr(s, field_name)
            if value is None:
                continue
            if s.nfe:
                curves.setdefault(s.model, []).append((s.nfe, value))
            else:
                ax.axhline(value, linestyle="--", color="gray", label=f"{s.model} (exact AR sampling)")
        for model, pts in curves.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=model)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("NFE (sampler steps)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Samples vs NFE ({samples[0].n} per point, {samples[0].length} tokens)")
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"), suffix=".png")
    return path


def _as_list(value: Any) -> list:
    """``value`` as a list, a lone string or path being one item (not a sequence of characters)."""
    return [value] if isinstance(value, (str, os.PathLike)) else list(value)


def _check_counts(**counts: int) -> None:
    """Each count must be a whole number >= 1 (the message names the first that is not)."""
    for name, value in counts.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _dataset_spec(spec: str) -> tuple[str, str]:
    """``NAME=PATH`` -> (NAME, PATH); a corpus name -> itself; a path -> (its stem, path)."""
    if "=" in spec:
        name, target = (part.strip() for part in spec.split("=", 1))
        if not name or not target:
            raise ValueError(f"data set {spec!r}: NAME=PATH needs both a name and a path")
        return name, target
    return (spec if spec in EVAL_CORPORA else Path(spec).stem), spec


def _unique_names(names: Sequence[str]) -> list[str]:
    """Names made distinct for table rows and columns: a repeat gets " #2", " #3", ..."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} #{seen[name]}")
    return out


def _model_names(models: Sequence[TextModel], names: Sequence[str] | None) -> list[str]:
    if names:
        if len(names) != len(models):
            raise ValueError(f"{len(names)} names for {len(models)} checkpoints")
        return list(names)
    labels = [m.label for m in models]
    return [
        f"{lab} [{m.checkpoint.stem}]" if labels.count(lab) > 1 else lab
        for lab, m in zip(labels, models, strict=True)
    ]


@holds_folder_lock("out_dir", "output folder")
def evaluate(
    checkpoints: Sequence[str | os.PathLike],
    datasets: Sequence[str] = DEFAULT_EVAL_SETS,
    names: Sequence[str] | None = None,
    limit: int | None = None,
    n_points: int = 1024,
    batch_size: int = 16,
    chunk: int = 1,
    seq_len: int | None = None,
    samples: int = 0,
    nfe: Sequence[int] = (256,),
    temperature: float = 1.0,
    judge: Judge | None = None,
    tokenizer: TextTokenizer | None = None,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: bool = False,
    out_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
    **sampler: Any,
) -> EvaluationReport:
    """Likelihood of every checkpoint on every data set, and (``samples > 0``) sample quality per NFE.

    Args:
        datasets: names of :data:`EVAL_CORPORA` or text files; ``NAME=PATH`` names a file's column.
        limit: evaluate only the first ``limit`` sequences of each set.
        n_points: stratified kappa points of the fair ELBO (E.1 uses 1024).
        batch_size / chunk: sequences per batch and kappa points per model call for the ELBO.
        seq_len: sequence length (default: each model's training length).
        samples / nfe / temperature / judge: sample-quality settings (``samples = 0`` skips them);
            temperature 0 (greedy) only for AR checkpoints.
        sampler: ``velocity``, ``alpha``, ``corrector``, ``float64`` of :func:`generate_tokens`.
        out_dir: the evaluation folder (what ``textgen evaluate --out`` names): each finished cell is kept
            in ``out_dir/cells.jsonl`` as it is computed and the cells found there are reused, keyed by
            the checkpoint's and sequences' digests and every setting the number depends on (a killed
            run loses at most the cell in flight); at the end the report's tables and figure are written
            there (:meth:`EvaluationReport.write`). None: nothing is written.
        log: called with a line for each reused cell.

    Raises:
        ValueError: a bad setting (checked before any likelihood pass), checkpoint or data set.
    """
    # one checkpoint, data set, name or NFE may be given alone (a string would otherwise be iterated)
    checkpoints, datasets = _as_list(checkpoints), _as_list(datasets)
    names = None if names is None else _as_list(names)
    nfe = [nfe] if isinstance(nfe, int) else nfe
    # every setting is checked before the first (slow) likelihood pass, so no work is thrown away
    _check_counts(n_points=n_points, batch_size=batch_size, chunk=chunk)
    _check_limit(limit)
    if seq_len is not None and seq_len < 1:
        raise ValueError(f"seq_len must be >= 1 (or None for each model's own), got {seq_len}")
    if samples < 0:
        raise ValueError(f"samples must be >= 0 (0: no sample statistics), got {samples}")
    nfe = list(nfe)
    if samples > 0:
        if not nfe:
            raise ValueError("nfe is empty: give at least one sampler NFE")
        for k in nfe:
            if k < 1:
                raise ValueError(f"every nfe must be >= 1, got {k}")
    check_temperature(temperature, "ar")  # finite and >= 0; 0 is refused per model below
    sampler["alpha"] = check_alpha(sampler.get("alpha"), sampler.get("velocity", "ko"))
    tokenizer = tokenizer or TextTokenizer()
    if not datasets:
        raise ValueError("give at least one data set to evaluate on")
    specs = [_dataset_spec(os.fspath(spec)) for spec in datasets]
    columns = list(
        zip(_unique_names([name for name, _ in specs]), [target for _, target in specs], strict=True)
    )
    models = [TextModel.load(c, device) for c in checkpoints]
    for model in models:
        model.check_tokenizer(tokenizer)
    labels = _unique_names(_model_names(models, names))
    done_here: set[str] = set()  # cells computed by this run (keys as JSON), to word a repeat rightly
    for model, label in zip(models, labels, strict=True):
        L = seq_len or model.seq_len
        if L > model.model.config.max_len:
            raise ValueError(f"seq_len {L} exceeds the max_len {model.model.config.max_len} of {label}")
        if samples > 0:
            try:
                check_temperature(temperature, model.kind)
            except ValueError as e:
                raise ValueError(f"{label}: {e}") from None
    if samples > 0 and any(m.kind == "dfm" for m in models):
        make_velocity(
            sampler.get("velocity", "ko"), alpha=sampler["alpha"], corrector=sampler.get("corrector", 0.0)
        )
    report = EvaluationReport(
        settings={
            "checkpoints": [str(c) for c in checkpoints],
            "datasets": list(datasets),
            "limit": limit,
            "n_points": n_points,
            "seq_len": seq_len,
            "samples": samples,
            "nfe": list(nfe),
            "temperature": temperature,
            "judge": judge.name if judge is not None else None,
            "seed": seed,
            **sampler,
        }
    )
    if out_dir is not None:
        remove_stale_temps(out_dir)  # half-written tables or figure of a killed run
    cells = ResultLog(Path(out_dir) / RESULT_LOG) if out_dir is not None else None
    # every data set is read (and tokenized, cached) before the first likelihood pass: a missing, short or
    # badly encoded file stops the run now, not after hours of work on the columns before it
    cache: dict[tuple[str, int], tuple[Tensor, str]] = {}
    for L in dict.fromkeys(seq_len or m.seq_len for m in models):
        for name, target in columns:
            try:
                seqs = eval_sequences(target, tokenizer, L, limit, data_dir, cache_dir)
            except (ValueError, OSError) as e:
                raise ValueError(f"data set {name!r}: {e}") from None
            cache[(target, L)] = seqs, hashlib.sha256(seqs.numpy().tobytes()).hexdigest()
    if out_dir is not None:  # the tables of an earlier run go now: a killed run must not leave them current
        for name in REPORT_FILES:
            (Path(out_dir) / name).unlink(missing_ok=True)
    done_here: set[str] = set()  # cells computed by this run (keys as JSON), to word a repeat rightly
    for model, label in zip(models, labels, strict=True):
        L = seq_len or model.seq_len
        model_digest = file_sha256(model.checkpoint) if cells is not None else ""
        for name, target in columns:
            seqs, seqs_digest = cache[(target, L)]
            key = {
                "cell": "likelihood",
                "checkpoint_sha256": model_digest,
                "sequences_sha256": seqs_digest,  # of the bytes: the same stream cut at another length
                "sequences_shape": list(seqs.shape),  # can have the same bytes, so the shape is kept too
                "n_points": n_points,
                "batch_size": batch_size,
                "chunk": chunk,
                "seed": seed,
            }
            if cells is not None and (found := _likelihood_cell(cells, key, seqs)) is not None:
                _reused(log, f"{label} on {name}", json.dumps(key, sort_keys=True) in done_here)
                report.likelihood.append(
                    LikelihoodResult(
                        **{**found, "model": label, "dataset": name, "checkpoint": str(model.checkpoint)}
                    )
                )
                continue
            start = time.perf_counter()
            nats = sequence_nats(model, seqs, n_points, batch_size, chunk, seed, progress)
            result = LikelihoodResult(
                model=label,
                checkpoint=str(model.checkpoint),
                dataset=name,
                nats_per_token=float(nats.sum() / seqs.numel()),
                exact=model.kind == "ar",
                num_sequences=int(seqs.shape[0]),
                num_tokens=int(seqs.numel()),
                n_points=None if model.kind == "ar" else n_points,
                seconds=time.perf_counter() - start,
            )
            report.likelihood.append(result)
            if cells is not None:
                cells.add(key, asdict(result))
                done_here.add(json.dumps(key, sort_keys=True))
        if samples > 0:
            for k in nfe if model.kind == "dfm" else nfe[:1]:
                key = {
                    "cell": "samples",
                    "checkpoint_sha256": model_digest,
                    "tokenizer_sha256": tokenizer.digest,
                    "n": samples,
                    "nfe": k,
                    "length": L,
                    "temperature": temperature,
                    "judge": judge.identity if judge is not None else None,
                    "seed": seed,
                    "batch_size": batch_size,
                    **sampler,
                }
                if cells is not None and (found := cells.get(key)) is not None:
                    _reused(log, f"{label} samples at NFE {k}", json.dumps(key, sort_keys=True) in done_here)
                    report.samples.append(
                        SampleQuality(**{**found, "model": label, "checkpoint": str(model.checkpoint)})
                    )
                    continue
                quality = sample_quality(
                    model,
                    tokenizer,
                    samples,
                    k,
                    judge,
                    temperature,
                    seed,
                    batch_size,
                    name=label,
                    length=L,
                    **sampler,
                )
                report.samples.append(quality)
                if cells is not None:
                    cells.add(key, asdict(quality))
                    done_here.add(json.dumps(key, sort_keys=True))
    if out_dir is not None:
        report.write(out_dir)
    return report


def _likelihood_cell(cells: ResultLog, key: dict[str, Any], seqs: Tensor) -> dict[str, Any] | None:
    """The finished likelihood cell of ``key``; also one logged by the earlier version, whose key lacked the
    sequences' shape, when its result was computed on as many sequences (same bytes, same rows: same shape)."""
    found = cells.get(key)
    if found is None:
        legacy = cells.get({k: v for k, v in key.items() if k != "sequences_shape"})
        if legacy is not None and legacy.get("num_sequences") == int(seqs.shape[0]):
            found = legacy
    return found


def _reused(log: Callable[[str], None] | None, what: str, in_this_run: bool = False) -> None:
    if log is not None:
        if in_this_run:  # e.g. two data sets that tokenize to the same sequences
            log(f"{what}: the same cell as one computed above in this run, reused")
        else:
            log(f"{what}: finished in an earlier run ({RESULT_LOG}), reused")
