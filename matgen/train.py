"""Training of the crystal models: DFM (mask source, linear kappa), KO-DFM (mask source, eq 33 kappa),
and the autoregressive baseline (App. E.2), with the cross-entropy loss of eq 11.

Data flow: MP-20 split -> tokens (6 + 4a) -> padded batch -> x_t ~ p_t(. | x_1) on real tokens (padding
stays PAD) -> atom-pooling DiT -> cross-entropy on real tokens.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from dfm_core.atomic_io import atomic_write_text, check_writable, file_sha256, holds_folder_lock
from dfm_core.checkpoints import EXPORTED_MODEL, export_safetensors
from dfm_core.config import config_from_dict, load_config
from dfm_core.nn import count_parameters
from dfm_core.objectives import cross_entropy_loss
from dfm_core.paths import MixturePath
from dfm_core.runtime import keeps_global_rng, seed_everything
from dfm_core.schedulers import make_scheduler
from dfm_core.sources import mask_source
from dfm_core.training import TrainConfig, TrainResult, best_weights_metadata, train
from matgen import tokenizer as tok
from matgen.data import (
    atom_count_distribution,
    data_set_name,
    ensure_split_file,
    load_token_dataset,
    resolve_data_dir,
)
from matgen.model import CrystalDiTConfig, build_model, token_valid_mask

__all__ = [
    "MatgenTrainConfig",
    "crystal_path",
    "PaddedCrystals",
    "train_crystal_model",
    "load_train_config",
    "MAX_ATOMS",
]

MAX_ATOMS = 20
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"  # installed with the package
CHECKPOINT_FORMAT = "matgen-checkpoint-v1"


@dataclass
class MatgenTrainConfig:
    """Everything that defines a crystal training run; saved into every checkpoint.

    Attributes:
        kind: "dfm" (atom-pooling DiT with a mixture path) or "ar" (autoregressive baseline).
        scheduler: kappa_t of the mask mixture path: "ko" (eq 33, KO-DFM) or "linear" (DFM) or "cosine".
        model: network architecture.
        train: optimisation settings.
        data_dir: MP-20 folder (else $MATGEN_DATA, else the download cache).
        train_limit / val_limit: use only the first N crystals of each split (quick runs, tests).
        max_atoms: crystals with more atoms are skipped (MP-20 has at most 20).
    """

    kind: Literal["dfm", "ar"] = "dfm"
    scheduler: str = "ko"
    model: CrystalDiTConfig = field(default_factory=CrystalDiTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data_dir: str | None = None
    train_limit: int | None = None
    val_limit: int | None = None
    max_atoms: int = MAX_ATOMS

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = CrystalDiTConfig.from_dict(self.model)
        if isinstance(self.train, dict):
            self.train = TrainConfig.from_dict(self.train)
        if self.kind not in ("dfm", "ar"):
            raise ValueError(f"kind must be 'dfm' or 'ar', got {self.kind!r}")
        make_scheduler(self.scheduler)  # validates the name
        for name in ("train_limit", "val_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or unset for all rows), got {value}")
        if self.max_atoms < 1:
            raise ValueError(f"max_atoms must be at least 1, got {self.max_atoms}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        d["train"] = self.train.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MatgenTrainConfig:
        return config_from_dict(cls, data)


def load_train_config(path: str | os.PathLike) -> MatgenTrainConfig:
    """Read a TOML or JSON file with top-level keys and [model] / [train] tables; a relative path that is
    not found is looked up by name among the shipped configs (``matgen/configs``)."""
    return load_config(path, MatgenTrainConfig, shipped=SHIPPED_CONFIGS)


def crystal_path(scheduler: str = "ko") -> MixturePath:
    """The mask mixture path over the 878-token crystal vocabulary."""
    source = mask_source(tok.VOCAB_SIZE, tok.MASK_ID)
    return MixturePath(source, make_scheduler(scheduler, source))


@dataclass
class PaddedCrystals:
    """A tokenized split padded to ``max_atoms``: tokens (N, 6 + 4 max_atoms) and num_atoms (N,)."""

    tokens: Tensor
    num_atoms: Tensor
    ids: list[str]

    @classmethod
    def from_split(cls, split, max_atoms: int) -> PaddedCrystals:
        keep = [i for i, n in enumerate(split.num_atoms.tolist()) if n <= max_atoms]
        L = 6 + 4 * max_atoms
        tokens = torch.full((len(keep), L), tok.PAD_ID, dtype=torch.long)
        for row, i in enumerate(keep):
            seq = split.tokens[i]
            tokens[row, : len(seq)] = seq
        return cls(tokens, split.num_atoms[keep].clone(), [split.ids[i] for i in keep])

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Rows ``idx``, trimmed to the largest atom count among them."""
        n = self.num_atoms[idx]
        A = int(n.max())
        return self.tokens[idx, : 6 + 4 * A], n

    def __len__(self) -> int:
        return len(self.ids)

    def digest(self) -> str:
        """SHA-256 of what training sees (ids and tokens): an edited CIF under the same id changes it."""
        h = hashlib.sha256(ids_digest(self.ids).encode())
        h.update(self.tokens.numpy().tobytes())
        return h.hexdigest()

    def element_counts(self) -> dict[str, int]:
        """How many crystals hold each element (symbols of Z = 1..94, zero counts left out)."""
        atoms = self.tokens[:, 6:].reshape(len(self), -1, 4)[:, :, 0]
        z = atoms - tok.ELEMENT_OFFSET
        present = torch.zeros(len(self), tok.MAX_Z, dtype=torch.bool)
        inside = (z >= 0) & (z < tok.MAX_Z)
        present[torch.nonzero(inside)[:, 0], z[inside]] = True
        counts = present.sum(0).tolist()
        return {symbol: int(c) for symbol, c in zip(tok.ELEMENT_SYMBOLS, counts, strict=True) if c}


def ids_digest(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def make_dfm_loss(path: MixturePath):
    """Eq 11 on a batch: t ~ U[0, 1], x_t ~ p_t(. | x_1) on real tokens, CE of the posterior."""

    def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor], generator: torch.Generator) -> Tensor:
        tokens, num_atoms = batch
        valid = token_valid_mask(num_atoms, tokens.shape[1])
        t = torch.rand(tokens.shape[0], generator=generator, device=tokens.device)
        xt = torch.where(valid, path.sample(tokens, t, generator=generator), tokens)
        logits = model(xt, t, num_atoms)
        return cross_entropy_loss(logits, tokens, valid)

    return loss_fn


def _ar_loss(model: nn.Module, batch: tuple[Tensor, Tensor], generator: torch.Generator) -> Tensor:
    tokens, num_atoms = batch
    return model.loss(tokens, num_atoms)


@holds_folder_lock("run_dir", "run folder")
@keeps_global_rng
def train_crystal_model(
    config: MatgenTrainConfig,
    run_dir: str | os.PathLike,
    resume: bool = True,
    export: str | os.PathLike | None = None,
    progress: bool = True,
    export_dtype: torch.dtype | None = None,
) -> TrainResult:
    """Train a crystal model on MP-20 train, validating on MP-20 val (test is never touched).

    Writes ``run_dir/{last,best}.pt`` and ``metrics.jsonl`` (resumable), and ``run_dir/model.safetensors``
    (EMA weights of the best validation step, with the config, data ids digest and atom-count
    distribution in its metadata), copied to ``export`` if given, with floating-point weights cast to
    ``export_dtype`` there (``torch.bfloat16`` halves the file).
    """
    run_dir = Path(run_dir)
    if export is not None:
        check_writable(export, "export path")
    seed_everything(config.train.seed)
    train_split = load_token_dataset("train", config.data_dir, limit=config.train_limit, progress=progress)
    val_split = load_token_dataset("val", config.data_dir, limit=config.val_limit, progress=progress)
    _record_skipped_rows(run_dir, {"train": train_split.skipped, "val": val_split.skipped})
    train_data = PaddedCrystals.from_split(train_split, config.max_atoms)
    val_data = PaddedCrystals.from_split(val_split, config.max_atoms)
    too_large = {
        name: len(split.ids) - len(data)
        for name, split, data in (("train", train_split, train_data), ("val", val_split, val_data))
    }
    if any(too_large.values()):
        largest = max(int(s.num_atoms.max()) for s in (train_split, val_split) if len(s.ids))
        warnings.warn(
            f"left out {too_large['train']} train and {too_large['val']} val crystals with more than "
            f"max_atoms={config.max_atoms} atoms (the largest has {largest}); raise max_atoms to keep them",
            stacklevel=3,
        )
    if len(train_data) == 0 or len(val_data) == 0:
        raise ValueError(
            f"no crystals to train on ({len(train_data)} train, {len(val_data)} val with at most "
            f"max_atoms={config.max_atoms} atoms): check the data directory, the limits and max_atoms"
        )

    model_cfg = dataclasses.replace(config.model, max_atoms=config.max_atoms)
    model = build_model(config.kind, model_cfg)
    path = crystal_path(config.scheduler)
    loss_fn = make_dfm_loss(path) if config.kind == "dfm" else _ar_loss
    bs = config.train.batch_size

    def train_batches(generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return train_data.batch(torch.randint(len(train_data), (bs,), generator=generator))

    def val_loss(model: nn.Module, generator: torch.Generator) -> Tensor:
        idx = torch.randint(len(val_data), (bs,), generator=generator, device=generator.device).cpu()
        tokens, num_atoms = val_data.batch(idx)
        device = next(model.parameters()).device
        return loss_fn(model, (tokens.to(device), num_atoms.to(device)), generator)

    metadata = {
        "model_config": model_cfg.to_dict(),
        # the model section as built (one max_atoms: the one used, not the preset's)
        "matgen_config": dataclasses.replace(config, model=model_cfg).to_dict(),
        "data": {  # which data, even when it came from $MATGEN_DATA (config.data_dir is then None)
            "data_set": data_set_name(config.data_dir).strip("'"),
            "data_dir": str(resolve_data_dir(config.data_dir).resolve()),
            **{
                f"{split}_file_sha256": file_sha256(ensure_split_file(split, config.data_dir))
                for split in ("train", "val")
            },
            "train_ids_sha256": ids_digest(train_data.ids),
            "val_ids_sha256": ids_digest(val_data.ids),
            "train_tokens_sha256": train_data.digest(),
            "val_tokens_sha256": val_data.digest(),
            "n_train": len(train_data),
            "n_val": len(val_data),
            "train_skipped": len(train_split.skipped),
            "val_skipped": len(val_split.skipped),
            "train_over_max_atoms": too_large["train"],
            "val_over_max_atoms": too_large["val"],
            "train_element_counts": train_data.element_counts(),  # generate warns of elements never seen
        },
        "atom_count_distribution": atom_count_distribution(train_data.num_atoms, config.max_atoms).tolist(),
        "parameters": count_parameters(model),
    }
    result = train(
        model,
        loss_fn,
        train_batches,
        config.train,
        run_dir,
        val_loss_fn=val_loss,
        resume=resume,
        extra_metadata=metadata,
        progress=progress,
        identity={
            "kind": config.kind,
            "scheduler": config.scheduler if config.kind == "dfm" else None,
            "train_ids_sha256": metadata["data"]["train_ids_sha256"],
            "val_ids_sha256": metadata["data"]["val_ids_sha256"],
            # the crystals themselves: a split edited under the same ids is other data
            "train_tokens_sha256": metadata["data"]["train_tokens_sha256"],
            "val_tokens_sha256": metadata["data"]["val_tokens_sha256"],
        },
        identity_added_later=("train_tokens_sha256", "val_tokens_sha256"),  # runs of before 2026-11-24
    )
    out = run_dir / EXPORTED_MODEL
    export_checkpoint(run_dir, out, config, metadata)
    if export is not None:
        export_checkpoint(run_dir, Path(export), config, metadata, dtype=export_dtype)
    return result


def _record_skipped_rows(run_dir: Path, skipped: dict[str, dict[str, str]]) -> None:
    """List the data rows left out (unparsable CIF, not tokenizable) in ``run_dir/skipped_rows.csv``."""
    rows = [(split, mid, why) for split, reasons in skipped.items() for mid, why in reasons.items()]
    if not rows:
        return
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["split", "material_id", "reason"])
    writer.writerows(rows)
    path = run_dir / "skipped_rows.csv"
    atomic_write_text(path, buf.getvalue())
    counts = ", ".join(f"{len(reasons)} {split}" for split, reasons in skipped.items() if reasons)
    warnings.warn(f"left out {counts} rows that did not parse or tokenize; listed in {path}", stacklevel=4)


def export_checkpoint(
    run_dir: Path,
    out: Path,
    config: MatgenTrainConfig,
    metadata: dict[str, Any],
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the EMA weights of ``best.pt`` (else ``last.pt``) as safetensors with run metadata."""
    model = build_model(config.kind, CrystalDiTConfig.from_dict(metadata["model_config"]))
    meta = {
        **best_weights_metadata(run_dir, model, metadata, "matgen_config"),
        "format": CHECKPOINT_FORMAT,
        "kind": config.kind,
        "scheduler": config.scheduler,
    }
    return export_safetensors(model, out, meta, dtype=dtype)
