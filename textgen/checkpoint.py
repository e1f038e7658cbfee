"""Released text models: safetensors weights plus everything needed to rebuild the path.

A textgen checkpoint is a safetensors file written by :func:`dfm_core.checkpoints.export_safetensors` whose
metadata holds ``format = "textgen-checkpoint-v1"``, the ``kind`` (``dfm`` or ``ar``), the
``model_config``, the ``path`` config (source, beta0, scheduler), ``seq_len`` and the training run's
facts. For the data-statistics source (eq 38) the source PMF itself is stored as the float64 tensor
``path.source_pmf`` (50,258 entries), so a model is sampled and evaluated without its training text.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dfm_core.checkpoints import CheckpointError, export_safetensors, load_model_weights, read_checkpoint
from dfm_core.paths import MixturePath
from dfm_core.runtime import resolve_device
from textgen.model import TextModelConfig, build_model
from textgen.path import TextPathConfig, build_path, text_source

__all__ = ["CHECKPOINT_FORMAT", "SOURCE_PMF_KEY", "CheckpointError", "TextModel", "export_text_model"]

CHECKPOINT_FORMAT = "textgen-checkpoint-v1"
SOURCE_PMF_KEY = "path.source_pmf"


def export_text_model(
    model: nn.Module,
    out: str | os.PathLike,
    metadata: dict[str, Any],
    source_pmf: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model``'s weights (and the source PMF of a stats path) with ``metadata`` as safetensors."""
    state = dict(getattr(model, "_orig_mod", model).state_dict())
    if source_pmf is not None:
        state[SOURCE_PMF_KEY] = torch.as_tensor(source_pmf, dtype=torch.float64)
    meta = {"format": CHECKPOINT_FORMAT, **metadata}
    return export_safetensors(state, out, meta, dtype=dtype)


@dataclass
class TextModel:
    """A loaded text model with its path (None for the AR baseline) and metadata."""

    model: nn.Module
    kind: str
    path: MixturePath | None
    path_config: TextPathConfig | None
    metadata: dict[str, Any]
    device: torch.device
    checkpoint: Path

    @classmethod
    def load(cls, checkpoint: str | os.PathLike, device: str = "auto") -> TextModel:
        file = Path(checkpoint).expanduser()
        state, meta = read_checkpoint(
            file,
            "textgen",
            CHECKPOINT_FORMAT,
            folder_advice="give a .safetensors file (a `textgen train` run writes <run-dir>/model.safetensors)",
        )
        kind = meta.get("kind", "dfm")
        if kind not in ("dfm", "ar"):
            raise CheckpointError(f"{file}: metadata kind must be 'dfm' or 'ar', got {kind!r}")
        if kind == "dfm" and "path" not in meta:
            raise CheckpointError(
                f"{file}: a flow-matching (dfm) checkpoint whose metadata lacks its path config"
            )
        seq_len = meta.get("seq_len", 256)
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise CheckpointError(f"{file}: metadata seq_len must be a whole number >= 1, got {seq_len!r}")
        pmf = state.pop(SOURCE_PMF_KEY, None)
        model = load_model_weights(
            lambda: build_model(kind, TextModelConfig.from_dict(meta["model_config"])),
            {k: v.float() if v.is_floating_point() else v for k, v in state.items()},
            file,
            "textgen",
        )
        path = path_config = None
        if kind == "dfm":
            try:
                path_config = TextPathConfig.from_dict(meta["path"])
            except (ValueError, TypeError) as e:
                raise CheckpointError(f"{file}: bad path config in its metadata: {e}") from e
            if path_config.source == "stats" and pmf is None:
                raise CheckpointError(f"{file}: a stats-source model without its {SOURCE_PMF_KEY} tensor")
            path = build_path(path_config, pmf if pmf is not None else text_source(path_config))
        dev = resolve_device(device)
        model.to(dev).eval()
        return cls(model, kind, path, path_config, meta, dev, file)

    @property
    def seq_len(self) -> int:
        return int(self.metadata.get("seq_len", 256))

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Warn when ``tokenizer`` is not the one the model was trained with (its ``tokenizer.json`` digest
        differs from the checkpoint's): prompts and texts would map to other ids."""
        trained = self.metadata.get("tokenizer_sha256")
        if trained and getattr(tokenizer, "digest", trained) != trained:
            warnings.warn(
                f"the tokenizer {getattr(tokenizer, 'file', '?')} is not the one {self.checkpoint} was trained with "
                f"(tokenizer.json sha256 {tokenizer.digest[:12]}... vs {trained[:12]}...): its ids may mean other text",
                stacklevel=3,
            )

    @property
    def label(self) -> str:
        """A short name: ``AR`` or ``<scheduler>/<source>`` (e.g. ``ko/beta0=1024``)."""
        if self.kind == "ar":
            return "AR"
        return self.path_config.label if self.path_config is not None else "dfm"

    def logits_fn(self):
        """``f(x_t, t) -> fp32 logits`` for the sampler and ELBO, under bf16 autocast on CUDA, with the
        posterior pinned where the path knows it (unmasked tokens of a mask-source model), as in training."""
        use_bf16 = self.device.type == "cuda"
        path = self.path

        def fn(x: Tensor, t: Tensor) -> Tensor:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                logits = self.model(x, t).float()
            return path.pin_known_tokens(logits, x) if path is not None else logits

        return fn
