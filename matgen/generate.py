"""Crystal generation: checkpoint -> posterior sampler (section 3, App. A) -> tokens -> Structure -> CIF.

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
import hashlib
import io
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dfm_core.atomic_io import (
    LOCK_NAME,
    atomic_write_text,
    file_sha256,
    holds_folder_lock,
    remove_stale_temps,
)
from dfm_core.checkpoints import load_safetensors
from dfm_core.runtime import resolve_device
from dfm_core.sampler import check_temperature, sample
from dfm_core.velocities import make_velocity
from matgen import tokenizer as tok
from matgen.cif import formula_fields, p1_cif
from matgen.data import MP20_TRAIN_ABSENT_ELEMENTS, MP20_TRAIN_IDS_SHA256
from matgen.model import CrystalDiTConfig, build_model, token_valid_mask
from matgen.train import CHECKPOINT_FORMAT, crystal_path

__all__ = [
    "DEFAULT_CHECKPOINT",
    "CrystalGenerator",
    "GenerationSummary",
    "generate",
    "length_groups",
    "SAMPLES_COLUMNS",
]

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "ko_dfm_mp20.safetensors"
COINCIDENT_TOLERANCE = 1e-3  # A
GROUP_COST = 64.0  # crystal-positions per extra sampler group (length_groups), fitted on a 2-core CPU
AUTO_MAX_GROUPS = 16  # default cap on CPU (the split is O(groups * distinct counts^2))
PAPER_TEMPERATURE = 0.7
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


class CheckpointError(ValueError):
    """The file is missing, unreadable, or not a matgen checkpoint."""


@dataclass
class CrystalGenerator:
    """A loaded crystal model with its path and the metadata it was trained with."""

    model: torch.nn.Module
    metadata: dict[str, Any]
    device: torch.device
    checkpoint: Path

    def unseen_elements(self, elements: Sequence[str]) -> list[str] | None:
        """Of ``elements``, those that no training crystal of this model held (:func:`unseen_elements`)."""
        return unseen_elements(self.metadata, elements)

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str | os.PathLike | None = None, device: str = "auto", compile: bool = False
    ) -> CrystalGenerator:
        """Load a matgen checkpoint; ``compile`` wraps the network in ``torch.compile`` (worth it on a GPU
        for long runs: every step calls the network on the same shapes)."""
        path = Path(checkpoint) if checkpoint is not None else DEFAULT_CHECKPOINT
        if path.is_dir():
            inside = path / "model.safetensors"
            hint = f"; did you mean {inside}?" if inside.is_file() else ""
            raise CheckpointError(f"{path} is a folder, not a checkpoint file{hint}")
        if not path.is_file():
            hint = " (the shipped default model is missing from this install)" if checkpoint is None else ""
            raise CheckpointError(f"checkpoint not found: {path}{hint}")
        try:
            state, meta = load_safetensors(path)
        except (ValueError, OSError) as e:
            exported = path.parent / "model.safetensors"
            hint = f"; {exported} is the model this training run exported" if exported.is_file() else ""
            raise CheckpointError(f"cannot read checkpoint {path}: {e}{hint}") from e
        if meta.get("format") != CHECKPOINT_FORMAT or "model_config" not in meta:
            raise CheckpointError(
                f"{path} is a safetensors file but not a matgen checkpoint (format={meta.get('format')!r}); "
                "train one with `matgen train` or pass the shipped default"
            )
        kind = meta.get("kind", "dfm")
        for key, kind_of, what in (
            ("scheduler", str, "a scheduler name"),
            ("sampling", dict, "a table of sampling settings"),
        ):
            value = meta.get(key)
            if value is not None and not isinstance(value, kind_of):
                raise CheckpointError(f"{path}: its metadata {key!r} is not {what}: {value!r}")
        try:
            if not isinstance(meta["model_config"], dict):
                raise ValueError("model_config is not a table of settings")
            model = build_model(kind, CrystalDiTConfig.from_dict(meta["model_config"]))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: its metadata does not describe a matgen model: {e}") from None
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            first = next((line for line in lines if "size mismatch" in line or "Missing" in line), lines[-1])
            more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
            raise CheckpointError(
                f"{path}: weights do not fit the architecture in its metadata: {first}{more}"
            ) from None
        dev = resolve_device(device)
        model.to(dev).eval()
        if compile:
            model = torch.compile(model, dynamic=False)
        return cls(model=model, metadata=meta, device=dev, checkpoint=path)

    @property
    def kind(self) -> str:
        return self.metadata.get("kind", "dfm")

    @property
    def max_atoms(self) -> int:
        return int(self.metadata["model_config"].get("max_atoms", 20))

    def atom_count_distribution(self) -> Tensor:
        dist = self.metadata.get("atom_count_distribution")
        if dist is None:
            raise CheckpointError(f"{self.checkpoint} records no atom-count distribution; pass num_atoms")
        try:
            probs = torch.tensor(dist, dtype=torch.float64)
        except (TypeError, ValueError):
            probs = torch.zeros(0)
        if (
            probs.ndim != 1
            or len(probs) != self.max_atoms + 1
            or not torch.isfinite(probs).all()
            or (probs < 0).any()
            or probs[0] != 0  # a crystal of 0 atoms: never in training data, nothing to write
            or probs.sum() <= 0
        ):
            raise CheckpointError(
                f"{self.checkpoint}: its atom_count_distribution is not {self.max_atoms + 1} non-negative "
                "weights (counts 0 ... max_atoms, none on 0 atoms); pass num_atoms or re-export the model"
            )
        return probs

    def _fill(
        self,
        known: Tensor,
        free: Tensor,
        num_atoms: Tensor,
        path: Any,
        temperature: float,
        velocity: str,
        corrector: float,
        elements: Sequence[str] | None,
        generator: torch.Generator | None,
        float64: bool,
        steps: int | None = None,
        time_grid: Tensor | None = None,
        progress: bool = False,
    ) -> Tensor:
        """Run the posterior sampler (section 3) on the ``free`` positions from the mask, holding every
        other position at ``known``; the network sees these atom counts (bf16 autocast on CUDA)."""
        A = (known.shape[1] - 6) // 4
        allowed = tok.CrystalTokenizer().allowed_token_mask(num_atoms.cpu(), A, elements).to(self.device)
        use_bf16 = self.device.type == "cuda"

        def logits(x: Tensor, t: Tensor) -> Tensor:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                return self.model(x, t, num_atoms).float()

        return sample(
            logits,
            path,
            torch.where(free, torch.full_like(known, tok.MASK_ID), known),
            steps=steps,
            time_grid=time_grid,
            velocity=make_velocity(velocity, corrector=corrector),
            temperature=temperature,
            allowed=allowed,
            clamp_mask=~free,
            clamp_values=known,
            float64=float64,
            generator=generator,
            progress=progress,
        ).tokens

    @torch.no_grad()
    def sample_tokens(
        self,
        num_atoms: Tensor,
        steps: int = 500,
        temperature: float = 0.7,
        scheduler: str | None = None,
        velocity: str = "ko",
        corrector: float = 0.0,
        elements: Sequence[str] | None = None,
        generator: torch.Generator | None = None,
        float64: bool = True,
        progress: bool = False,
        length_buckets: int = 1,
    ) -> Tensor:
        """Sample token sequences (B, 6 + 4 max(num_atoms)) for the given atom counts.

        ``length_buckets`` > 1 samples the batch in up to that many groups of similar atom count, one
        after the other, each padded only to its own largest crystal (:func:`length_groups`): less work
        for the same distribution, other draws than one group for the same generator.
        """
        num_atoms = num_atoms.to(self.device)
        out = torch.full(
            (len(num_atoms), 6 + 4 * int(num_atoms.max())), tok.PAD_ID, dtype=torch.long, device=self.device
        )
        path = None if self.kind == "ar" else crystal_path(scheduler or self.metadata.get("scheduler", "ko"))
        for rows in length_groups(num_atoms, length_buckets):
            counts = num_atoms[rows]
            A = int(counts.max())
            if self.kind == "ar":
                allowed = tok.CrystalTokenizer().allowed_token_mask(counts.cpu(), A, elements).to(self.device)
                part = self.model.sample(
                    counts, allowed_mask=allowed, temperature=temperature, generator=generator
                )
            else:
                valid = token_valid_mask(counts, 6 + 4 * A)
                empty = torch.full_like(valid, tok.PAD_ID, dtype=torch.long)
                part = self._fill(
                    empty, valid, counts, path, temperature, velocity, corrector, elements, generator, float64,
                    steps=steps, progress=progress,
                )  # fmt: skip
            out[rows, : part.shape[1]] = part
        return out

    @torch.no_grad()
    def resample_coincident_atoms(
        self,
        tokens: Tensor,
        num_atoms: Tensor,
        rounds: int,
        steps: int = 500,
        temperature: float = 0.7,
        scheduler: str | None = None,
        velocity: str = "ko",
        corrector: float = 0.0,
        elements: Sequence[str] | None = None,
        generator: torch.Generator | None = None,
        float64: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Re-draw the coordinates of atoms that landed on an earlier atom's site (beyond the paper).

        Each round masks those atoms' three coordinate tokens, keeps every other token, and runs the
        posterior sampler (section 3) from the time t_0 where kappa_{t_0} equals the fraction of tokens
        kept, to t = 1 (inpainting with the trained model, at the step density of ``steps``). Returns the
        tokens and, per crystal, how many atom re-draws it took (0: untouched).
        """
        if rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {rounds}")
        tokens = tokens.to(self.device).clone()
        num_atoms = num_atoms.to(self.device)
        resampled = torch.zeros(len(tokens), dtype=torch.long, device=self.device)
        if self.kind != "dfm":
            return tokens, resampled
        path = crystal_path(scheduler or self.metadata.get("scheduler", "ko"))
        A = (tokens.shape[1] - 6) // 4
        for _ in range(rounds):
            bad = coincident_atom_mask(tokens, num_atoms)
            rows = bad.any(1).nonzero().squeeze(1)
            if len(rows) == 0:
                break
            sub, counts = tokens[rows], num_atoms[rows]
            remask = torch.zeros_like(sub, dtype=torch.bool)
            remask[:, 6:].view(len(rows), A, 4)[..., 1:] = bad[rows][:, :, None]
            kept = 1.0 - float((remask.sum(1) / (6 + 4 * counts)).max())
            t0 = min(_time_where_kappa_reaches(path, kept), 1.0 - 1.0 / steps)
            n_steps = max(2, round(steps * (1.0 - t0)))
            grid = torch.linspace(t0, 1.0, n_steps + 1, dtype=torch.float64, device=self.device)
            tokens[rows] = self._fill(
                sub,
                remask,
                counts,
                path,
                temperature,
                velocity,
                corrector,
                elements,
                generator,
                float64,
                time_grid=grid,
            )
            resampled[rows] += bad[rows].sum(1)
        return tokens, resampled


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


def length_groups(num_atoms: Tensor, max_groups: int, group_cost: float = GROUP_COST) -> list[Tensor]:
    """Rows of a batch split into at most ``max_groups`` groups of similar atom count, in increasing order.

    The network runs over ``6 + max(a)`` pooled positions per crystal of a group, and each group costs a
    sampler loop of its own, so the split minimises ``sum_g  n_g * (6 + max a in g) + group_cost`` over
    contiguous ranges of the sorted counts (exact, by dynamic programming over the distinct counts).
    ``group_cost`` is in crystal-positions; the default was fitted on a 2-core CPU (a group of 5 small
    crystals costs more than it saves there). One group (``max_groups`` 1) is the whole batch in its order.
    """
    if max_groups < 1:
        raise ValueError(f"max_groups must be >= 1, got {max_groups}")
    rows = torch.arange(len(num_atoms), device=num_atoms.device)
    values, counts = torch.unique(num_atoms, return_counts=True)  # sorted
    values, counts = values.tolist(), counts.tolist()
    m = len(values)
    if max_groups == 1 or m == 1:
        return [rows]
    k_max = min(max_groups, m)
    prefix = [0]
    for c in counts:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][j]: least cost of the first j distinct values in k groups; cut[k][j]: start of the last group
    best = [[inf] * (m + 1) for _ in range(k_max + 1)]
    cut = [[0] * (m + 1) for _ in range(k_max + 1)]
    best[0][0] = 0.0
    for k in range(1, k_max + 1):
        for j in range(1, m + 1):
            for i in range(k - 1, j):
                cost = best[k - 1][i] + (prefix[j] - prefix[i]) * (6 + values[j - 1]) + group_cost
                if cost < best[k][j]:
                    best[k][j], cut[k][j] = cost, i
    k = min(range(1, k_max + 1), key=lambda kk: best[kk][m])
    bounds, j = [], m
    while k > 0:
        i = cut[k][j]
        bounds.append((values[i], values[j - 1]))
        j, k = i, k - 1
    return [rows[(num_atoms >= lo) & (num_atoms <= hi)] for lo, hi in reversed(bounds)]


def coincident_atom_mask(tokens: Tensor, num_atoms: Tensor) -> Tensor:
    """``(B, A)`` bool: atom j has the fractional-coordinate tokens of an earlier atom i < j, modulo 1
    (0.00 and 1.00 are one site). These are the crystals that decode with two atoms on one site."""
    B, L = tokens.shape
    A = (L - 6) // 4
    coords = (tokens[:, 6:].reshape(B, A, 4)[..., 1:] - tok.FRAC_OFFSET) % tok.FRAC_STEPS
    same = (coords[:, :, None, :] == coords[:, None, :, :]).all(-1)  # (B, A, A)
    real = torch.arange(A, device=tokens.device)[None, :] < num_atoms.to(tokens.device)[:, None]
    earlier = torch.ones(A, A, dtype=torch.bool, device=tokens.device).tril(-1)  # [j, i]: i < j
    return (same & real[:, :, None] & real[:, None, :] & earlier).any(-1)


def _time_where_kappa_reaches(path: Any, fraction: float, points: int = 4097) -> float:
    """The last grid time t with kappa_t <= ``fraction`` (token-independent kappa, e.g. the mask source)."""
    t = torch.linspace(0.0, 1.0, points, dtype=torch.float64)
    kappa = path.scheduler.kappa(t).reshape(points, -1)[:, 0]
    below = (kappa <= fraction).nonzero()
    return float(t[int(below[-1])]) if len(below) else 0.0


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


def unseen_elements(metadata: dict[str, Any], elements: Sequence[str]) -> list[str] | None:
    """Of ``elements``, those that no training crystal of the checkpoint with ``metadata`` held (the model
    never learned where they go); ``None`` if the checkpoint does not say what it was trained on."""
    data = metadata.get("data") if isinstance(metadata.get("data"), dict) else {}
    counts = data.get("train_element_counts")
    if isinstance(counts, dict):
        return [e for e in elements if not counts.get(e)]
    if data.get("train_ids_sha256") == MP20_TRAIN_IDS_SHA256:  # MP-20 train, before counts were kept
        return [e for e in elements if e in MP20_TRAIN_ABSENT_ELEMENTS]
    return None


def _batch_seed(seed: int, batch: int) -> int:
    digest = hashlib.sha256(f"{seed}:{batch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def normalize_elements(elements: str | Sequence[str]) -> list[str]:
    """Element symbols as a duplicate-free list in the given order; a string is split on commas ("Li,Fe,P,O").
    Case is normalised ("li" and "LI" are Li)."""
    if isinstance(elements, str):
        elements = elements.split(",")
    given = {e.strip().capitalize(): e.strip() for e in reversed(list(elements)) if e.strip()}
    symbols = list(dict.fromkeys(e.strip().capitalize() for e in elements if e.strip()))
    if not symbols:
        raise ValueError("no element symbols given: use symbols such as Li,Fe,P,O")
    isotopes = [e for e in symbols if e in ("D", "T")]
    if isotopes:
        what = "is an isotope" if len(isotopes) == 1 else "are isotopes"
        raise ValueError(
            f"{' and '.join(isotopes)} {what} of hydrogen, which the tokenizer writes as H: use H"
        )
    beyond = [given[e] for e in symbols if e not in tok.ELEMENT_SYMBOLS and _is_element(e)]
    if beyond:
        raise ValueError(
            f"element(s) {beyond} are beyond the model's vocabulary, which stops at Pu (Z = {tok.MAX_Z})"
        )
    unknown = [given[e] for e in symbols if e not in tok.ELEMENT_SYMBOLS]
    if unknown:
        separators = any(c in "".join(unknown) for c in ";: /|")
        hint = (
            "separate symbols with commas, as in Li,Fe,P,O" if separators else "use symbols such as Li,Fe,P,O"
        )
        raise ValueError(f"unknown element symbol(s) {unknown}: {hint}")
    return symbols


def _is_element(symbol: str) -> bool:
    from pymatgen.core import Element

    return Element.is_valid_symbol(symbol)


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
            (:func:`length_groups`; padding only to each group's largest crystal). Default: up to 16 on
            CPU, where it takes 0.5-0.8 of the time; 1 on GPUs, where each group adds a sampler loop's
            launches (not timed there yet); on ``resume``, what the earlier run used.
    """
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
    if elements is not None:
        elements = normalize_elements(elements)
    if num_atoms is not None and (isinstance(num_atoms, bool) or int(num_atoms) != num_atoms):
        raise ValueError(f"num_atoms must be a whole number, got {num_atoms}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {out} exists and is not a folder")
    gen = CrystalGenerator.from_checkpoint(checkpoint, device, compile=compile)
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
    num_atoms = int(num_atoms) if num_atoms is not None else None
    unseen = gen.unseen_elements(elements) if elements else None
    if unseen:
        warnings.warn(
            f"no training crystal of {gen.checkpoint.name} holds {', '.join(unseen)}: the model never learned "
            "where such atoms go, so crystals with them follow no learned chemistry",
            stacklevel=2,
        )

    if temperature is None:
        recommended = (gen.metadata.get("sampling") or {}).get("temperature", PAPER_TEMPERATURE)
        try:
            if isinstance(recommended, bool):
                raise TypeError("a bool")
            temperature = float(recommended)
        except (TypeError, ValueError):
            raise CheckpointError(
                f"{gen.checkpoint}: its recommended sampling temperature {recommended!r} is not a number; "
                "pass --temperature"
            ) from None
    check_temperature(temperature)
    if velocity.strip().lower() == "power":
        raise ValueError(
            "the power velocity needs an alpha, which matgen takes none of: use ko, power-inf or campbell"
        )
    make_velocity(velocity, corrector=corrector)  # an unknown velocity or scheduler fails before any file
    crystal_path(scheduler or gen.metadata.get("scheduler", "ko"))
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
        length_buckets = min(gen.max_atoms, AUTO_MAX_GROUPS) if gen.device.type == "cpu" else 1
    if length_buckets > 1:  # absent when 1 (one group per batch), as folders written before the option
        settings["length_buckets"] = int(length_buckets)
    samples_path, settings_path = out / "samples.csv", out / "generation.json"
    n_batches = (n + batch_size - 1) // batch_size

    def size_of(b: int) -> int:
        return min(batch_size, n - b * batch_size) if 0 <= b < n_batches else -1

    done_rows: list[dict[str, str]] = []
    if out.exists() and any(p.name != LOCK_NAME for p in out.iterdir()):
        if resume:
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
                length_buckets = int(old.get("length_buckets", 1))
                if length_buckets > 1:
                    settings["length_buckets"] = length_buckets
            if (
                old.get("elements")
                and settings["elements"]
                and set(old["elements"]) == set(settings["elements"])
            ):
                settings["elements"] = elements = list(old["elements"])  # the same system, other order
            if old != settings:
                diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
                raise ValueError(
                    f"cannot resume {out}: settings differ from the earlier run (old, new): {diff}"
                )
            remove_stale_temps(out)  # CIFs half-written when the earlier run was killed
            done_rows = _read_done_rows(samples_path, size_of)
        elif overwrite:
            for f in out.glob(f"{prefix}_*.cif"):
                f.unlink()
            for f in (samples_path, settings_path):
                f.unlink(missing_ok=True)
        else:
            raise FileExistsError(
                f"{out} is not empty: pass --overwrite to replace its crystals or --resume to continue the run "
                "(overwrite=True / resume=True in Python)"
            )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(settings_path, json.dumps(settings, indent=2) + "\n")
    atomic_write_text(samples_path, _rows_to_csv(done_rows, header=True))
    done_batches = {int(r["batch"]) for r in done_rows}

    constraint = (
        ";".join(
            c
            for c in (
                f"elements={','.join(elements)}" if elements else "",
                f"num_atoms={num_atoms}" if num_atoms else "",
            )
            if c
        )
        or "none"
    )
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
            g = torch.Generator(device=gen.device).manual_seed(_batch_seed(seed, b))
            if dist is None:
                counts = torch.full((size,), int(num_atoms), dtype=torch.long)
            else:
                counts = torch.multinomial(
                    dist,
                    size,
                    replacement=True,
                    generator=torch.Generator().manual_seed(_batch_seed(seed, b) ^ 1),
                )
            tokens = gen.sample_tokens(
                counts,
                steps=steps,
                temperature=temperature,
                scheduler=scheduler,
                velocity=velocity,
                corrector=corrector,
                elements=elements,
                generator=g,
                progress=progress,
                length_buckets=length_buckets,
            )
            resampled = None
            if resample_collisions:
                tokens, resampled = gen.resample_coincident_atoms(
                    tokens,
                    counts,
                    resample_collisions,
                    steps=steps,
                    temperature=temperature,
                    scheduler=scheduler,
                    velocity=velocity,
                    corrector=corrector,
                    elements=elements,
                    generator=g,
                )
                resampled = resampled.cpu().numpy()
            tokens = tokens.cpu()
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
