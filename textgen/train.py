"""Training of the text models (section 8.1, Appendix E.1 of the KO-DFM paper).

Data flow: corpora -> GPT-2 token stream (cached) -> packed chunks of ``seq_len`` -> held-out
validation chunks -> p_stats of the training chunks (for the eq 38 source) -> per step:
``t ~ U[0, 1 - 1e-3]``, ``x_t ~ p_t(. | x_1)`` -> :class:`TextDiT` -> mixture-path ELBO (eq 37; or the
cross-entropy of eq 11). The autoregressive baseline trains the causal DiT on next-token NLL.

The shared loop :func:`dfm_core.training.train` gives bf16, EMA, resumable checkpoints and progress;
the EMA weights of the best validation step are exported to ``run_dir/model.safetensors``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfm_core.atomic_io import check_writable, holds_folder_lock
from dfm_core.checkpoints import EXPORTED_MODEL
from dfm_core.config import config_from_dict, load_config
from dfm_core.nn import count_parameters
from dfm_core.objectives import cross_entropy_loss, mixture_elbo_loss, sample_training_time
from dfm_core.paths import MixturePath
from dfm_core.runtime import keeps_global_rng, seed_everything
from dfm_core.training import TrainConfig, TrainResult, best_weights_metadata, train
from textgen.checkpoint import export_text_model
from textgen.data import TokenCorpus, load_corpora, pack
from textgen.model import TextARModel, TextModelConfig, build_model
from textgen.path import TextPathConfig, build_path, text_source, text_token_statistics
from textgen.tokenizer import TextTokenizer

__all__ = [
    "TextgenTrainConfig",
    "TextData",
    "load_train_config",
    "prepare_data",
    "make_loss",
    "train_text_model",
]


def _default_train_config() -> TrainConfig:
    # Appendix E.1: AdamW (0.9, 0.999), weight decay 0.03, lr 3e-4 after 2500 warmup steps, held constant
    return TrainConfig(
        steps=200_000,
        batch_size=64,
        lr=3e-4,
        warmup_steps=2500,
        lr_schedule="constant",
        weight_decay=0.03,
        ema_decay=0.9999,
        eval_every=1000,
        eval_batches=10,
        ckpt_every=1000,
    )


@dataclass
class TextgenTrainConfig:
    """Everything that defines a text training run; saved into every checkpoint.

    Attributes:
        kind: ``"dfm"`` (mixture-path DFM) or ``"ar"`` (autoregressive baseline).
        path: source (mask / eq 38 stats with beta0) and scheduler (linear / ko).
        loss: ``"elbo"`` (eq 37, t ~ U[0, t_max]) or ``"ce"`` (eq 11, t ~ U[0, 1]).
        t_max: upper end of the training times for the ELBO loss (E.1: 1 - 1e-3).
        seq_len: tokens per packed sequence.
        model / train: architecture and optimisation.
        data: corpus names (``train`` = the five training corpora) or text files / folders.
        data_dir / tokenizer / cache_dir: where the text, the GPT-2 files and the token cache live
            (None: ``$TEXTGEN_DATA`` / ``$TEXTGEN_TOKENIZER`` / ``$TEXTGEN_CACHE`` or the defaults).
        val_fraction / max_val_sequences: held-out share of the packed sequences (a seeded draw).
        train_limit: keep only this many training sequences (quick runs, tests).
        stats_smoothing: additive smoothing of the token counts behind p_stats.
    """

    kind: Literal["dfm", "ar"] = "dfm"
    path: TextPathConfig = field(default_factory=TextPathConfig)
    loss: Literal["elbo", "ce"] = "elbo"
    t_max: float = 1.0 - 1e-3
    seq_len: int = 256
    model: TextModelConfig = field(default_factory=TextModelConfig)
    train: TrainConfig = field(default_factory=_default_train_config)
    data: tuple[str, ...] = ("train",)
    data_dir: str | None = None
    tokenizer: str | None = None
    cache_dir: str | None = None
    val_fraction: float = 0.01
    max_val_sequences: int = 512
    train_limit: int | None = None
    stats_smoothing: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.path, dict):
            self.path = TextPathConfig.from_dict(self.path)
        if isinstance(self.model, dict):
            self.model = TextModelConfig.from_dict(self.model)
        if isinstance(self.train, dict):
            self.train = TrainConfig.from_dict(self.train)
        if isinstance(self.data, str):
            self.data = (self.data,)
        self.data = tuple(self.data)
        if self.kind not in ("dfm", "ar"):
            raise ValueError(f"kind must be 'dfm' or 'ar', got {self.kind!r}")
        if self.loss not in ("elbo", "ce"):
            raise ValueError(f"loss must be 'elbo' or 'ce', got {self.loss!r}")
        if not 0.0 < self.t_max <= 1.0:
            raise ValueError(f"t_max must lie in (0, 1], got {self.t_max}")
        if self.seq_len < 2 or self.seq_len > self.model.max_len:
            raise ValueError(
                f"seq_len must lie in [2, model.max_len={self.model.max_len}], got {self.seq_len}"
            )
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1), got {self.val_fraction}")
        if not self.data:
            raise ValueError("no training data given")
        if self.train_limit is not None and self.train_limit < 1:
            raise ValueError(f"train_limit must be >= 1 sequence (or None for all), got {self.train_limit}")
        if self.max_val_sequences < 1:
            raise ValueError(f"max_val_sequences must be >= 1, got {self.max_val_sequences}")
        if not (math.isfinite(self.stats_smoothing) and self.stats_smoothing > 0):
            raise ValueError(f"stats_smoothing must be a finite number > 0, got {self.stats_smoothing}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["path"] = self.path.to_dict()
        d["model"] = self.model.to_dict()
        d["train"] = self.train.to_dict()
        d["data"] = list(self.data)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextgenTrainConfig:
        return config_from_dict(cls, data)


def load_train_config(path: str | os.PathLike) -> TextgenTrainConfig:
    """Read a TOML or JSON file with top-level keys and ``[path]``, ``[model]``, ``[train]`` tables."""
    return load_config(path, TextgenTrainConfig)


@dataclass
class TextData:
    """Packed training and validation sequences, the training stream's p_stats and provenance."""

    train: Tensor
    val: Tensor
    p_stats: Tensor
    corpus: TokenCorpus

    def facts(self) -> dict[str, Any]:
        return {
            "corpus": self.corpus.name,
            "sources": self.corpus.sources,
            "num_documents": self.corpus.num_documents,
            "num_tokens": len(self.corpus),
            "n_train_sequences": int(self.train.shape[0]),
            "n_val_sequences": int(self.val.shape[0]),
            "train_sha256": hashlib.sha256(self.train.numpy().astype(np.uint16).tobytes()).hexdigest(),
        }


def prepare_data(config: TextgenTrainConfig, tokenizer: TextTokenizer | None = None) -> TextData:
    """Load, pack and split the training text; compute p_stats on the training sequences."""
    tokenizer = tokenizer or TextTokenizer(config.tokenizer)
    corpus = load_corpora(config.data, tokenizer, config.data_dir, config.cache_dir)
    seqs = pack(corpus.tokens, config.seq_len)
    if seqs.shape[0] < 2:
        raise ValueError(  # the token count shows empty files: one <|endoftext|> per document
            f"the training text gives {seqs.shape[0]} sequence(s) of {config.seq_len} tokens ({len(corpus)} "
            f"tokens in {corpus.num_documents} document(s)): need at least 2; give more text or a shorter --seq-len"
        )
    n_val = min(config.max_val_sequences, max(1, round(config.val_fraction * seqs.shape[0])))
    perm = torch.randperm(seqs.shape[0], generator=torch.Generator().manual_seed(12345))
    val, train_seqs = seqs[perm[:n_val].sort().values], seqs[perm[n_val:].sort().values]
    if config.train_limit is not None:
        train_seqs = train_seqs[: config.train_limit]
    p_stats = text_token_statistics(train_seqs, smoothing=config.stats_smoothing)
    return TextData(train_seqs, val, p_stats, corpus)


def make_loss(config: TextgenTrainConfig, path: MixturePath | None):
    """``loss_fn(model, x1 (B, L), generator)`` of the run: ELBO (eq 37) / CE (eq 11) / AR NLL."""
    if config.kind == "ar":

        def ar_loss(model: nn.Module, x1: Tensor, generator: torch.Generator) -> Tensor:
            # through forward, so a torch.compile wrapper is used
            logits = model(TextARModel.shift_right(x1)).float()
            return F.cross_entropy(logits.transpose(1, 2), x1)

        return ar_loss
    assert path is not None

    def dfm_loss(model: nn.Module, x1: Tensor, generator: torch.Generator) -> Tensor:
        B = x1.shape[0]
        if config.loss == "elbo":
            t = sample_training_time(B, config.t_max, generator=generator, device=x1.device)
        else:
            t = torch.rand(B, generator=generator, device=x1.device)
        xt = path.sample(x1, t, generator=generator)
        logits = model(xt, t)
        # the posterior is exact where the path knows it (unmasked tokens): those terms are 0
        if config.loss == "elbo":
            return mixture_elbo_loss(logits, x1, xt, t, path, pin_known=True)
        unknown = ~path.known_tokens(xt)
        return cross_entropy_loss(logits, x1, valid=unknown) * unknown.float().mean()

    return dfm_loss


@holds_folder_lock("run_dir", "run folder")
@keeps_global_rng
def train_text_model(
    config: TextgenTrainConfig,
    run_dir: str | os.PathLike,
    resume: bool = True,
    export: str | os.PathLike | None = None,
    progress: bool = True,
    data: TextData | None = None,
    export_dtype: torch.dtype | None = None,
) -> TrainResult:
    """Train a text model; writes ``run_dir/{last,best}.pt``, ``metrics.jsonl``, ``config.json`` and
    ``run_dir/model.safetensors`` (best EMA weights + metadata + the stats source PMF), copied to
    ``export`` if given (its weights in ``export_dtype``, e.g. bfloat16; the source PMF stays float64)."""
    run_dir = Path(run_dir)
    if export is not None:
        check_writable(export, "export path")
    tokenizer = TextTokenizer(config.tokenizer)
    data = data or prepare_data(config, tokenizer)
    seed_everything(config.train.seed)
    model = build_model(config.kind, config.model)
    path = source_pmf = None
    if config.kind == "dfm":
        pmf = text_source(config.path, data.p_stats)
        path = build_path(config.path, pmf)
        source_pmf = pmf if config.path.source == "stats" else None  # stored in the export
    loss_fn = make_loss(config, path)
    bs = config.train.batch_size
    train_seqs, val_seqs = data.train, data.val

    def train_batches(generator: torch.Generator) -> Tensor:
        return train_seqs[torch.randint(train_seqs.shape[0], (bs,), generator=generator)]

    def val_loss(model: nn.Module, generator: torch.Generator) -> Tensor:
        idx = torch.randint(val_seqs.shape[0], (bs,), generator=generator, device=generator.device).cpu()
        device = next(model.parameters()).device
        return loss_fn(model, val_seqs[idx].to(device), generator)

    metadata = {
        "model_config": config.model.to_dict(),
        "textgen_config": config.to_dict(),
        "kind": config.kind,
        "path": config.path.to_dict() if config.kind == "dfm" else None,
        "seq_len": config.seq_len,
        "tokenizer_sha256": tokenizer.digest,
        "data": data.facts(),
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
            "path": metadata["path"],
            "loss": config.loss,
            "seq_len": config.seq_len,
            "tokenizer_sha256": tokenizer.digest,
            "train_sha256": metadata["data"]["train_sha256"],
        },
    )
    meta = best_weights_metadata(run_dir, model, metadata, "textgen_config")
    export_text_model(model, run_dir / EXPORTED_MODEL, meta, source_pmf)
    if export is not None:
        export_text_model(model, export, meta, source_pmf, dtype=export_dtype)
    return result
