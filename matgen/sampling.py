"""A loaded crystal model and how it samples: checkpoint -> posterior sampler (section 3, App. A) -> tokens.

:class:`CrystalGenerator` loads a matgen checkpoint and samples token sequences for given atom counts
(with per-slot masks of allowed tokens, optionally restricted to a chemical system), and re-draws atoms
that landed on an occupied site. Writing crystals to a folder is :mod:`matgen.generate`'s job.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dfm_core.checkpoints import CheckpointError, load_model_weights, read_checkpoint
from dfm_core.runtime import resolve_device
from dfm_core.sampler import sample
from dfm_core.velocities import make_velocity
from matgen import tokenizer as tok
from matgen.data import MP20_TRAIN_ABSENT_ELEMENTS, MP20_TRAIN_IDS_SHA256
from matgen.model import CrystalDiTConfig, build_model, token_valid_mask
from matgen.train import CHECKPOINT_FORMAT, crystal_path

__all__ = [
    "DEFAULT_CHECKPOINT",
    "PAPER_TEMPERATURE",
    "CheckpointError",
    "CrystalGenerator",
    "coincident_atom_mask",
    "length_groups",
    "normalize_elements",
    "unseen_elements",
]

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "ko_dfm_mp20.safetensors"
GROUP_COST = 64.0  # crystal-positions per extra sampler group (length_groups), fitted on a 2-core CPU
PAPER_TEMPERATURE = 0.7


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
        path = Path(checkpoint).expanduser() if checkpoint is not None else DEFAULT_CHECKPOINT
        missing = " (the shipped default model is missing from this install)" if checkpoint is None else ""
        state, meta = read_checkpoint(
            path,
            "matgen",
            CHECKPOINT_FORMAT,
            missing_hint=missing,
            train_advice="train one with `matgen train` or pass the shipped default",
        )
        kind = meta.get("kind", "dfm")
        for key, kind_of, what in (
            ("model_config", dict, "a table of settings"),
            ("scheduler", str, "a scheduler name"),
            ("sampling", dict, "a table of sampling settings"),
        ):
            value = meta.get(key)
            if value is not None and not isinstance(value, kind_of):
                raise CheckpointError(f"{path}: its metadata {key!r} is not {what}: {value!r}")
        model = load_model_weights(
            lambda: build_model(kind, CrystalDiTConfig.from_dict(meta["model_config"])), state, path, "matgen"
        )
        dev = resolve_device(device)
        model.to(dev).eval()
        if compile:
            model = torch.compile(model, dynamic=True)  # the sampler passes a varying number of crystals
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
        skip_idle_rows: bool = True,
    ) -> Tensor:
        """Run the posterior sampler (section 3) on the ``free`` positions from the mask, holding every
        other position at ``known``; the network sees these atom counts (bf16 autocast on CUDA) and, with
        ``skip_idle_rows``, only the crystals that change in a step."""
        A = (known.shape[1] - 6) // 4
        allowed = tok.CrystalTokenizer().allowed_token_mask(num_atoms.cpu(), A, elements).to(self.device)
        use_bf16 = self.device.type == "cuda"

        def logits(x: Tensor, t: Tensor, rows: Tensor | None = None) -> Tensor:
            counts = num_atoms if rows is None else num_atoms[rows]
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                return self.model(x, t, counts).float()

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
            skip_idle_rows=skip_idle_rows,
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
        skip_idle_rows: bool = True,
    ) -> Tensor:
        """Sample token sequences (B, 6 + 4 max(num_atoms)) for the given atom counts.

        ``skip_idle_rows`` (on by default) passes a crystal through the network only in the steps where
        one of its tokens is unmasked (:func:`dfm_core.sampler.sample`): the same law, about a tenth of the
        network work at NFE 500. Off, every crystal goes through every step. The random draws are the
        same either way, so the tokens differ only where the network's float rounding differs between
        batch sizes.

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
                    steps=steps, progress=progress, skip_idle_rows=skip_idle_rows,
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
