"""Crystal generation into a folder: :class:`~matgen.sampling.CrystalGenerator` tokens -> checks -> CIF files.

Output folder layout (``generate(n, out_dir)``):

* ``crystal_000000.cif`` ...: one CIF per decoded crystal, written atomically (temp file + rename);
* ``samples.csv``: id, file, formula, atom count, lattice, the constraint that produced it, and the
  reason for any crystal that did not decode;
* ``generation.json``: the settings, so that ``resume=True`` continues exactly the same run.

Batch ``k`` draws from its own generator seeded by ``(seed, k)``, so a resumed run writes exactly the
crystals an uninterrupted one would.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dfm_core.atomic_io import (
    LOCK_NAME,
    atomic_write_text,
    file_sha256,
    holds_folder_lock,
    remove_stale_temps,
)
from dfm_core.runtime import batch_seed
from dfm_core.sampler import check_temperature
from dfm_core.velocities import make_velocity
from matgen import tokenizer as tok
from matgen.cif import formula_fields, p1_cif
from matgen.sampling import (
    PAPER_TEMPERATURE,
    CheckpointError,
    CrystalGenerator,
    normalize_elements,
)
from matgen.train import crystal_path

if TYPE_CHECKING:
    import pandas as pd
    from pymatgen.core import Structure

__all__ = [
    "GenerationSummary",
    "generate",
    "SAMPLES_COLUMNS",
]

COINCIDENT_TOLERANCE = 1e-3  # A
SAMPLES_COLUMNS = [
    "id",
    "file",
    "formula",
    "num_atoms",
    "a",
    "b",
    "c",
    "alpha",
    "beta",
    "gamma",
    "volume",
    "constraint",
    "batch",
    "error",
    "resampled_atoms",
]


@dataclass
class GenerationSummary:
    """What a :func:`generate` call did."""

    out_dir: Path
    requested: int
    written: int
    failed: int
    skipped_batches: int
    seconds: float
    resampled: int = 0  # written crystals that needed a re-draw of atoms sharing a site

    @property
    def crystals_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else float("nan")

    def samples(self) -> pd.DataFrame:
        """``samples.csv`` of the folder: one row per requested crystal (``file`` empty where it failed)."""
        import pandas as pd

        return pd.read_csv(
            self.out_dir / "samples.csv", dtype={"file": str, "error": str}, keep_default_na=False
        )

    def structures(self) -> dict[str, Structure]:
        """The written crystals as pymatgen Structures, by sample id (in the order of ``samples.csv``)."""
        from pymatgen.core import Structure

        rows = self.samples()
        return {row.id: Structure.from_file(self.out_dir / row.file) for row in rows.itertuples() if row.file}


def _coincident_atoms(crystal: tok.DecodedCrystal) -> str | None:
    """Two atoms on the same site make a CIF that CIF readers reject (merged, occupancy > 1).

    Decoded coordinates lie on a 1/FRAC_STEPS grid, so two distinct sites differ by a nonzero grid vector
    ``m / FRAC_STEPS`` (any periodic image included), whose length is at least ``sigma_min(lattice) /
    FRAC_STEPS``. Where that bound clears the tolerance, only equal coordinates can coincide (an exact,
    cheap test); other cells get pymatgen's minimum-image distances.
    """
    n = len(crystal.species)
    if n < 2:
        return None
    frac = crystal.frac_coords
    same = (frac[:, None, :] == frac[None, :, :]).all(-1)
    same[range(n), range(n)] = False
    if same.any():
        i, j = divmod(int(same.argmax()), n)
        return f"atoms {i} and {j} sit on the same site (distance 0.0000 A); no CIF written"
    matrix = crystal.lattice.matrix
    if np.linalg.svd(matrix, compute_uv=False)[-1] / tok.FRAC_STEPS > COINCIDENT_TOLERANCE * (1 + 1e-6):
        return None
    d = crystal.lattice.get_all_distances(frac, frac)  # minimum image
    d[range(n), range(n)] = float("inf")
    if d.min() < COINCIDENT_TOLERANCE:
        i, j = divmod(int(d.argmin()), n)
        return f"atoms {i} and {j} sit on the same site (distance {d[i, j]:.4f} A); no CIF written"
    return None


def _decode_and_write(
    tokens, first_id: int, batch: int, prefix: str, constraint: str, out_dir: str, resampled=None
) -> list[dict[str, Any]]:
    """Decode rows of tokens (numpy (B, L)), write one CIF per valid crystal, return samples.csv rows.

    A top-level function so that it can run in worker processes. No ``Structure`` is built: the CIF text
    comes from :func:`matgen.cif.p1_cif` (the same bytes as pymatgen's writer, in about half the time).
    """
    cif_tok = tok.CrystalTokenizer()
    out = Path(out_dir)
    rows = []
    for j, seq in enumerate(tokens):
        cid = f"{prefix}_{first_id + j:06d}"
        row: dict[str, Any] = {k: "" for k in SAMPLES_COLUMNS}
        n_atoms = (int((seq != tok.PAD_ID).sum()) - 6) // 4
        row.update(id=cid, num_atoms=n_atoms, constraint=constraint, batch=batch)
        if resampled is not None:
            row["resampled_atoms"] = int(resampled[j])
        try:
            crystal = cif_tok.decode_parts(seq)
            reason = _coincident_atoms(crystal)
        except tok.DecodeError as exc:
            crystal, reason = None, str(exc)
        if reason:
            row["error"] = reason
            rows.append(row)
            continue
        fname = f"{cid}.cif"
        # not fsynced one by one (a third of the time per crystal): the batch is synced at once
        # before samples.csv lists it; the rename alone already keeps a killed run's CIFs whole
        atomic_write_text(out / fname, p1_cif(*crystal), durable=False)
        lat = crystal.lattice
        row.update(
            file=fname,
            formula=formula_fields(crystal.species)[1],
            a=round(lat.a, 4),
            b=round(lat.b, 4),
            c=round(lat.c, 4),
            alpha=round(lat.alpha, 3),
            beta=round(lat.beta, 3),
            gamma=round(lat.gamma, 3),
            volume=round(lat.volume, 4),
        )
        rows.append(row)
    return rows


def _read_done_rows(samples: Path, size_of: Callable[[int], int]) -> list[dict[str, str]]:
    """Rows of complete batches in samples.csv (a torn last line, a partial batch, or a batch with a
    listed CIF that is missing from the folder, empty or not a whole CIF is dropped, so that it is
    generated again)."""
    if not samples.exists():
        return []
    text = samples.read_text()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    rows = list(csv.DictReader(io.StringIO(text)))
    by_batch: dict[int, list[dict[str, str]]] = {}
    for r in rows:
        if any("\x00" in str(v) for v in r.values()):  # zeroed blocks of a crash: the batch is redone
            continue
        try:
            by_batch.setdefault(int(r["batch"]), []).append(r)
        except (KeyError, ValueError, TypeError):
            continue
    done = []
    for b, rs in sorted(by_batch.items()):
        unique = {r["id"]: r for r in rs}
        files_there = all(_whole_cif(samples.parent / r["file"]) for r in unique.values() if r.get("file"))
        if len(unique) == size_of(b) and files_there:
            done.extend(unique.values())
    return done


def _whole_cif(path: Path) -> bool:
    """Whether ``path`` still holds a CIF as written here: a data block with its atom-site loop, ending
    in a newline (an empty, truncated, or overwritten file is not)."""
    try:
        with open(path, "rb") as f:
            text = f.read(1 << 20)
    except (OSError, ValueError):  # missing, a folder, unreadable, a name with a NUL byte
        return False
    return text.endswith(b"\n") and b"\ndata_" in text and b"_atom_site_occupancy" in text


def _sort_samples(samples: Path) -> None:
    """Rewrite ``samples.csv`` (atomically) in batch, then id order, if it is not in that order."""
    rows = list(csv.DictReader(io.StringIO(samples.read_text())))
    ordered = sorted(rows, key=lambda r: (int(r["batch"]), r["id"]))
    if ordered != rows:
        atomic_write_text(samples, _rows_to_csv(ordered, header=True))


def _rows_to_csv(rows: list[dict[str, Any]], header: bool) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SAMPLES_COLUMNS, lineterminator="\n")
    if header:
        w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _check_arguments(
    n: int,
    workers: int,
    batch_size: int,
    steps: int,
    overwrite: bool,
    resume: bool,
    length_buckets: int | None,
    resample_collisions: int,
    num_atoms: int | None,
) -> None:
    """The checks of :func:`generate`'s arguments that need no checkpoint (a ValueError naming the value)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if overwrite and resume:
        raise ValueError("choose one of overwrite and resume")
    if length_buckets is not None and (isinstance(length_buckets, bool) or not 1 <= length_buckets <= 1000):
        raise ValueError(f"length_buckets must be a whole number in [1, 1000], got {length_buckets}")
    if isinstance(resample_collisions, bool) or not 0 <= resample_collisions <= 100:
        raise ValueError(f"resample_collisions must be a whole number in [0, 100], got {resample_collisions}")
    if num_atoms is not None and (isinstance(num_atoms, bool) or int(num_atoms) != num_atoms):
        raise ValueError(f"num_atoms must be a whole number, got {num_atoms}")


def _sampling_temperature(gen: CrystalGenerator, temperature: float | None) -> float:
    """``temperature``, or when None the checkpoint's recommended one (else the paper's 0.7)."""
    if temperature is not None:
        return temperature
    recommended = (gen.metadata.get("sampling") or {}).get("temperature", PAPER_TEMPERATURE)
    try:
        if isinstance(recommended, bool):
            raise TypeError("a bool")
        return float(recommended)
    except (TypeError, ValueError):
        raise CheckpointError(
            f"{gen.checkpoint}: its recommended sampling temperature {recommended!r} is not a number; "
            "pass --temperature"
        ) from None


def _prepare_folder(
    out: Path,
    settings: dict[str, Any],
    resume: bool,
    overwrite: bool,
    auto_buckets: bool,
    size_of: Callable[[int], int],
) -> list[dict[str, str]]:
    """Make ``out`` ready for a run with ``settings``; returns the rows of batches already done (resume).

    A folder with files is refused unless ``overwrite`` (this run's CIFs, ``samples.csv`` and
    ``generation.json`` are removed) or ``resume`` (the earlier settings must match; ``settings`` takes
    the earlier run's grouping when it was chosen automatically, and its order of the same elements).
    """
    samples_path, settings_path = out / "samples.csv", out / "generation.json"
    if not (out.exists() and any(p.name != LOCK_NAME for p in out.iterdir())):
        return []
    if overwrite:
        for f in out.glob(f"{settings['prefix']}_*.cif"):
            f.unlink()
        for f in (samples_path, settings_path):
            f.unlink(missing_ok=True)
        return []
    if not resume:
        raise FileExistsError(
            f"{out} is not empty: pass --overwrite to replace its crystals or --resume to continue the run "
            "(overwrite=True / resume=True in Python)"
        )
    if not settings_path.exists():
        raise FileExistsError(f"{out} holds no generation.json: nothing to resume there")
    try:
        old = json.loads(settings_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot resume: {settings_path} is not valid JSON ({exc})") from None
    if not isinstance(old, dict):
        raise ValueError(f"cannot resume: {settings_path} does not hold generation settings")
    if auto_buckets:  # continue with the grouping the folder was written with
        settings.pop("length_buckets", None)
        if int(old.get("length_buckets", 1)) > 1:
            settings["length_buckets"] = int(old["length_buckets"])
    if old.get("elements") and settings["elements"] and set(old["elements"]) == set(settings["elements"]):
        settings["elements"] = list(old["elements"])  # the same system, other order
    if old != settings:
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        raise ValueError(f"cannot resume {out}: settings differ from the earlier run (old, new): {diff}")
    remove_stale_temps(out)  # CIFs half-written when the earlier run was killed
    return _read_done_rows(samples_path, size_of)


def _sample_batch(
    gen: CrystalGenerator,
    size: int,
    seed: int,
    dist: torch.Tensor | None,
    num_atoms: int | None,
    sampling: dict[str, Any],
    resample_collisions: int,
) -> tuple[torch.Tensor, np.ndarray | None]:
    """One batch of ``size`` token sequences (on the CPU), its atom counts drawn from ``dist`` (or all
    ``num_atoms``) with a generator of its own seed; with ``resample_collisions``, also how many atoms
    each crystal had re-drawn. ``sampling`` holds :meth:`CrystalGenerator.sample_tokens`' settings."""
    g = torch.Generator(device=gen.device).manual_seed(seed)
    if dist is None:
        counts = torch.full((size,), int(num_atoms), dtype=torch.long)
    else:
        counts = torch.multinomial(
            dist, size, replacement=True, generator=torch.Generator().manual_seed(seed ^ 1)
        )
    tokens = gen.sample_tokens(counts, generator=g, **sampling)
    resampled = None
    if resample_collisions:
        settings = {k: v for k, v in sampling.items() if k not in ("progress", "length_buckets")}
        tokens, drawn = gen.resample_coincident_atoms(
            tokens, counts, resample_collisions, generator=g, **settings
        )
        resampled = drawn.cpu().numpy()
    return tokens.cpu(), resampled


def _check_model_options(
    gen: CrystalGenerator,
    temperature: float | None,
    velocity: str,
    corrector: float,
    scheduler: str | None,
    resample_collisions: int,
    num_atoms: int | None,
    elements: Sequence[str] | None,
) -> float:
    """The checks of :func:`generate`'s options against the loaded model, before any file is written (a
    ValueError naming the option; a warning for elements no training crystal held); returns the
    temperature to sample at (the checkpoint's recommended one when ``temperature`` is None)."""
    if gen.kind == "ar" and (velocity != "ko" or corrector or scheduler is not None):
        raise ValueError(
            f"{gen.checkpoint} is an autoregressive model: it samples token by token, so velocity, corrector "
            "and scheduler do not apply (leave them at their defaults)"
        )
    if resample_collisions and gen.kind != "dfm":
        raise ValueError(
            f"resample_collisions needs a DFM checkpoint; {gen.checkpoint} is an autoregressive ({gen.kind}) model"
        )
    if num_atoms is not None and not 1 <= num_atoms <= gen.max_atoms:
        raise ValueError(
            f"num_atoms (--num-atoms) must be between 1 and {gen.max_atoms} for this model, got {num_atoms}"
        )
    unseen = gen.unseen_elements(elements) if elements else None
    if unseen:
        warnings.warn(
            f"no training crystal of {gen.checkpoint.name} holds {', '.join(unseen)}: the model never learned "
            "where such atoms go, so crystals with them follow no learned chemistry",
            stacklevel=4,  # the caller of generate (past generate and its folder-lock wrapper)
        )

    temperature = check_temperature(_sampling_temperature(gen, temperature))
    if velocity.strip().lower() == "power":
        raise ValueError(
            "the power velocity needs an alpha, which matgen takes none of: use ko, power-inf or campbell"
        )
    make_velocity(velocity, corrector=corrector)  # an unknown velocity or scheduler fails before any file
    crystal_path(scheduler or gen.metadata.get("scheduler", "ko"))
    return temperature


def _constraint_label(elements: Sequence[str] | None, num_atoms: int | None) -> str:
    """What ``samples.csv`` says produced each crystal: ``elements=Li,Fe;num_atoms=8``, or ``none``."""
    parts = [
        f"elements={','.join(elements)}" if elements else "",
        f"num_atoms={num_atoms}" if num_atoms else "",
    ]
    return ";".join(p for p in parts if p) or "none"


@holds_folder_lock("out_dir", "output folder")
def generate(
    n: int,
    out_dir: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    steps: int = 500,
    temperature: float | None = None,
    scheduler: str | None = None,
    velocity: str = "ko",
    corrector: float = 0.0,
    seed: int = 0,
    batch_size: int = 500,
    device: str = "auto",
    num_atoms: int | None = None,
    elements: Sequence[str] | None = None,
    overwrite: bool = False,
    resume: bool = False,
    prefix: str = "crystal",
    progress: bool = True,
    workers: int = 0,
    compile: bool = False,
    resample_collisions: int = 0,
    length_buckets: int | None = None,
) -> GenerationSummary:
    """Generate ``n`` crystals into ``out_dir`` as CIF files plus ``samples.csv``.

    Args:
        n: number of crystals.
        checkpoint: a matgen safetensors checkpoint (default: the shipped KO-DFM model).
        steps: NFE of the sampler (paper: 500). temperature: posterior softmax temperature (default:
            the checkpoint's recommended ``sampling.temperature``, else the paper's 0.7).
        scheduler: kappa_t used for sampling (default: the one trained with). velocity: 'ko', 'power-inf',
            'campbell'; corrector: weight of the eq 35 corrector (0 = none).
        seed: same seed, same output. batch_size: crystals per sampler batch.
        num_atoms: fix the atom count (default: drawn from the training distribution).
        elements: restrict atom types to these element symbols (logit masking).
        overwrite: replace a previous run's files in ``out_dir``; resume: continue a previous run.
        workers: processes that decode and write CIFs while the next batch samples (0: in this process).
        compile: ``torch.compile`` the network (GPU runs; same samples up to float rounding).
        resample_collisions: rounds of :meth:`CrystalGenerator.resample_coincident_atoms` for crystals
            with two atoms on one site (0: the paper's sampler, such sequences are not written).
        length_buckets: sample each batch in up to this many groups of similar atom count
            (:func:`length_groups`; padding only to each group's largest crystal). Default: 1. Since the
            sampler skips idle crystals, groups took 0.99-1.35 of its time on a 2-core CPU (1.04-1.10
            at the default batch of 500), and on an H100 they took 1.06-1.09 even before
            (``benchmarks/bench_length_buckets.py``). On ``resume``, what the earlier run used.
    """
    _check_arguments(
        n, workers, batch_size, steps, overwrite, resume, length_buckets, resample_collisions, num_atoms
    )
    if elements is not None:
        elements = normalize_elements(elements)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {out} exists and is not a folder")
    gen = CrystalGenerator.from_checkpoint(checkpoint, device, compile=compile)
    temperature = _check_model_options(
        gen, temperature, velocity, corrector, scheduler, resample_collisions, num_atoms, elements
    )
    num_atoms = int(num_atoms) if num_atoms is not None else None
    dist = None if num_atoms is not None else gen.atom_count_distribution()
    settings = {
        "n": n,
        "checkpoint_sha256": file_sha256(gen.checkpoint),
        "steps": steps,
        "temperature": temperature,
        "scheduler": scheduler or gen.metadata.get("scheduler", "ko"),
        "velocity": velocity,
        "corrector": corrector,
        "seed": seed,
        "batch_size": batch_size,
        "num_atoms": num_atoms,
        "elements": list(elements) if elements else None,
        "prefix": prefix,
    }
    if resample_collisions:  # absent when 0, so folders written before the option still resume
        settings["resample_collisions"] = int(resample_collisions)
    auto_buckets = length_buckets is None
    if auto_buckets:
        length_buckets = 1  # with idle crystals skipped, groups' extra loops cost about what they save
    if length_buckets > 1:  # absent when 1 (one group per batch), as folders written before the option
        settings["length_buckets"] = int(length_buckets)
    samples_path, settings_path = out / "samples.csv", out / "generation.json"
    n_batches = (n + batch_size - 1) // batch_size

    def size_of(b: int) -> int:
        return min(batch_size, n - b * batch_size) if 0 <= b < n_batches else -1

    done_rows = _prepare_folder(out, settings, resume, overwrite, auto_buckets, size_of)
    length_buckets = int(settings.get("length_buckets", 1))  # on resume: what the earlier run used
    elements = settings["elements"]  # on resume: the earlier run's order of the same elements
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(settings_path, json.dumps(settings, indent=2) + "\n")
    atomic_write_text(samples_path, _rows_to_csv(done_rows, header=True))
    done_batches = {int(r["batch"]) for r in done_rows}

    constraint = _constraint_label(elements, num_atoms)
    sampling = {
        "steps": steps,
        "temperature": temperature,
        "scheduler": scheduler,
        "velocity": velocity,
        "corrector": corrector,
        "elements": elements,
        "progress": progress,
        "length_buckets": length_buckets,
    }
    start = time.perf_counter()
    written = failed = repaired = 0
    todo = (b for b in range(n_batches) if b not in done_batches)
    iterator: Any = todo
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(todo, desc="generating", unit="batch", total=n_batches - len(done_batches))
    # Decoding and CIF writing are CPU work in Python; with workers they run in other processes while
    # the next batch samples, one batch in flight.
    pool = None
    if workers > 0:
        from matgen.workers import process_pool

        pool = process_pool(workers, preload=("pymatgen.core", "matgen.tokenizer"))
    pending: list[tuple[int, list]] = []

    def finish(b: int, futures: list) -> None:
        nonlocal written, failed, repaired
        rows = [row for fut in futures for row in (fut.result() if pool is not None else fut)]
        written += sum(1 for r in rows if r["file"])
        repaired += sum(1 for r in rows if r["file"] and r.get("resampled_atoms"))
        if hasattr(os, "sync") and any(r["file"] for r in rows):
            os.sync()  # the batch's CIFs reach the disk before samples.csv lists them (power cuts)
        failed += sum(1 for r in rows if not r["file"])
        with open(samples_path, "a") as f:
            f.write(_rows_to_csv(rows, header=False))
            f.flush()
            os.fsync(f.fileno())

    try:
        for b in iterator:
            size = size_of(b)
            tokens, resampled = _sample_batch(
                gen, size, batch_seed(seed, b), dist, num_atoms, sampling, resample_collisions
            )
            first_id = b * batch_size
            if pool is None:
                futures = [
                    _decode_and_write(tokens.numpy(), first_id, b, prefix, constraint, str(out), resampled)
                ]
            else:
                chunks = torch.arange(size).chunk(workers)
                futures = [
                    pool.submit(
                        _decode_and_write,
                        tokens[c].numpy(),
                        first_id + int(c[0]),
                        b,
                        prefix,
                        constraint,
                        str(out),
                        None if resampled is None else resampled[c.numpy()],
                    )
                    for c in chunks
                    if len(c)
                ]
            pending.append((b, futures))
            while len(pending) > (1 if pool is not None else 0):
                finish(*pending.pop(0))
        while pending:
            finish(*pending.pop(0))
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    if done_batches:  # a resumed run may have redone an early batch: list the rows as a fresh run would
        _sort_samples(samples_path)
    return GenerationSummary(
        out_dir=out,
        requested=n,
        written=written,
        failed=failed,
        skipped_batches=len(done_batches),
        seconds=time.perf_counter() - start,
        resampled=repaired,
    )
