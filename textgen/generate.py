"""Text generation: checkpoint -> posterior sampler (section 3, App. A) -> GPT-2 ids -> text.

Conditioning by clamping: a *template* fixes some positions and leaves the rest to the model.
``"Once upon a time"`` is a prompt (its tokens open every sample, the rest is generated);
``"The cat [[8]] on the mat."`` asks for 8 generated tokens between the two fixed pieces (infilling);
anything after the template's end is generated too. The AR baseline accepts prompts only.

Batch ``k`` draws from its own generator seeded by ``(seed, k)``, so the same seed and ``batch_size``
give the same texts whatever else runs in the process (another ``batch_size`` regroups the draws and so
gives other texts).

Temperature: a finite number > 0; 0 means greedy decoding and is accepted only by the AR baseline.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dfm_core.atomic_io import atomic_write_text, check_writable
from dfm_core.runtime import batch_seed
from dfm_core.sampler import sample
from dfm_core.velocities import make_velocity
from textgen.checkpoint import TextModel
from textgen.tokenizer import TextTokenizer

__all__ = [
    "Template",
    "GeneratedTexts",
    "check_temperature",
    "check_alpha",
    "resolve_length",
    "parse_template",
    "generate_tokens",
    "generate_texts",
    "write_texts",
]

_GAP = re.compile(r"\[\[\s*(\d+)\s*\]\]")
_GAP_LIKE = re.compile(r"\[\[\s*\d[^\]]*\]\]")  # "[[8 tokens]]", "[[2.5]]": kept as text, with a warning


@dataclass
class Template:
    """Positions fixed by a template: ``mask (L,)`` bool and ``values (L,)`` long; ``is_prompt`` when only a prefix."""

    mask: Tensor
    values: Tensor
    is_prompt: bool

    @property
    def prefix(self) -> Tensor:
        """The fixed tokens at the start (the whole template for a prompt)."""
        n = int(self.mask.long().cumprod(0).sum())
        return self.values[:n]


def check_temperature(temperature: float, kind: str = "dfm") -> float:
    """A sampling temperature as a float: finite and > 0; 0 (greedy) only for ``kind == "ar"``.

    Raises:
        ValueError: NaN, infinite or negative, or 0 for a flow model.
    """
    t = float(temperature)
    if not math.isfinite(t) or t < 0:
        bound = ">= 0 (0: greedy)" if kind == "ar" else "> 0"
        raise ValueError(f"temperature must be a finite number {bound}, got {temperature}")
    if t == 0 and kind != "ar":
        raise ValueError(
            "temperature 0 (greedy decoding) works only for the AR baseline; "
            "a flow model needs a temperature > 0"
        )
    return t


def check_alpha(alpha: float | None, velocity: str | None = None) -> float | None:
    """alpha of the power velocity: None (not given) or a finite number > 0; refused with any other
    ``velocity`` (when given), which would ignore it."""
    if alpha is None:
        return None
    if velocity is not None and velocity.strip().lower() != "power":
        raise ValueError(f"alpha applies to the power velocity, not {velocity!r}")
    a = float(alpha)
    if not (math.isfinite(a) and a > 0):
        hint = " (use the power-inf velocity for alpha -> inf)" if a == math.inf else ""
        raise ValueError(f"alpha must be a finite number > 0, got {alpha}{hint}")
    return a


def resolve_length(model: TextModel, length: int | None) -> int:
    """Tokens per sample: ``length`` (>= 1, <= the model's max_len) or, if None, the training ``seq_len``."""
    if length is None:
        return model.seq_len
    if length < 1:
        raise ValueError(f"length must be >= 1 token (or None for the training length), got {length}")
    max_len = model.model.config.max_len
    if length > max_len:
        raise ValueError(f"length {length} exceeds the model's max_len {max_len}")
    return int(length)


def parse_template(template: str, tokenizer: TextTokenizer, length: int) -> Template:
    """Tokenize ``template`` into fixed positions of a ``length``-token sequence; ``[[N]]`` is a gap of N tokens.

    Raises:
        ValueError: the template needs more than ``length`` tokens, or all of them (nothing to generate).
    """
    mask = torch.zeros(length, dtype=torch.bool)
    values = torch.zeros(length, dtype=torch.long)
    pos, pieces = 0, _GAP.split(template)
    for i, piece in enumerate(pieces):
        if i % 2:  # a gap [[N]]
            pos += int(piece)
            continue
        if (odd := _GAP_LIKE.search(piece)) is not None:
            warnings.warn(
                f"{odd.group(0)!r} in the prompt is kept as text: a gap is written [[N]], N a whole number",
                stacklevel=2,
            )
        if i + 1 < len(pieces):
            piece = piece.rstrip()  # "The cat [[3]] the mat": the gap owns the space before it
        if not piece:
            continue
        ids = tokenizer.encode(piece)
        if pos + len(ids) <= length:  # else only counted, to say how many tokens the template needs
            mask[pos : pos + len(ids)] = True
            values[pos : pos + len(ids)] = torch.tensor(ids, dtype=torch.long)
        pos += len(ids)
    if pos > length:
        raise ValueError(
            f"the prompt needs {pos} tokens, more than the {length} of a sequence: shorten it, or give "
            "a longer length (--length, at most the model's max_len)"
        )
    if bool(mask.all()):  # nothing would be sampled: the "sample" would only repeat the prompt
        raise ValueError(
            f"the prompt fills all {length} tokens of a sequence, leaving none to generate: shorten it, "
            "or give a longer length (--length, at most the model's max_len)"
        )
    # a prompt: the fixed tokens are a prefix (a trailing gap, "Hello [[3]]", only continues it)
    free = (~mask).nonzero()
    is_prompt = len(free) == 0 or not bool(mask[int(free[0]) :].any())
    return Template(mask, values, is_prompt=is_prompt)


@dataclass
class GeneratedTexts:
    """Sampled ids ``(n, L)``, their texts, and the settings that produced them."""

    tokens: Tensor
    texts: list[str]
    settings: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def generate_tokens(
    model: TextModel,
    n: int,
    steps: int = 256,
    length: int | None = None,
    temperature: float = 1.0,
    velocity: str = "ko",
    corrector: float = 0.0,
    alpha: float | None = None,
    float64: bool = True,
    template: Template | None = None,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = False,
) -> Tensor:
    """Sample ``(n, length)`` token ids (default length: the training ``seq_len``).

    Args:
        steps: NFE of the posterior sampler (ignored by the AR baseline: one step per token).
        temperature: posterior softmax temperature (:func:`check_temperature`; 0 = greedy, AR only).
        velocity / corrector / alpha: the conditional velocity (``ko``, ``power``, ``power-inf``,
            ``campbell``), the eq 35 corrector weight, and alpha for ``power``.
        float64: categorical draws in float64 (avoids the low-precision bias of Zheng et al. 2024).
        template: positions to clamp (:func:`parse_template`).
        seed: the same seed and ``batch_size`` give the same tokens (``batch_size`` groups the draws).

    Raises:
        ValueError: a count below 1, a bad length, temperature, alpha or velocity, or a template that
            does not fit.
    """
    for name, value in (("n", n), ("batch_size", batch_size), ("steps", steps)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    length = resolve_length(model, length)
    temperature = check_temperature(temperature, model.kind)
    alpha = check_alpha(alpha, velocity)
    if template is not None and template.mask.shape[0] != length:
        raise ValueError("the template was built for another length")
    if model.kind == "ar" and template is not None and not template.is_prompt:
        raise ValueError("the autoregressive baseline can only continue a prompt, not infill")
    vel = make_velocity(velocity, alpha=alpha, corrector=corrector) if model.kind == "dfm" else None
    logits = model.logits_fn() if model.kind == "dfm" else None
    out = []
    for b, start in enumerate(range(0, n, batch_size)):
        size = min(batch_size, n - start)
        g = torch.Generator(device=model.device).manual_seed(batch_seed(seed, b, "textgen:"))
        if model.kind == "ar":
            prefix = template.prefix if template is not None else None
            out.append(model.model.sample(size, length, prefix, temperature, g, float64).cpu())
            continue
        x0 = model.path.sample_source((size, length), generator=g, device=model.device)
        clamp_mask = clamp_values = None
        if template is not None:
            clamp_mask = template.mask.to(model.device).expand(size, -1)
            clamp_values = template.values.to(model.device).expand(size, -1)
        res = sample(
            lambda x, t, rows: logits(x, t),  # the network needs nothing per sequence but the tokens
            model.path,
            x0,
            steps=steps,
            velocity=vel,
            temperature=temperature,
            clamp_mask=clamp_mask,
            clamp_values=clamp_values,
            float64=float64,
            generator=g,
            progress=progress,
            skip_idle_rows=True,  # a sequence goes through the network only in the steps where it changes
        )
        out.append(res.tokens.cpu())
    return torch.cat(out)


_DFM_ONLY = ("steps", "velocity", "corrector", "alpha")  # sampler settings that an AR model ignores


def generate_texts(
    model: TextModel,
    tokenizer: TextTokenizer,
    n: int,
    prompt: str | None = None,
    show_special: bool = True,
    **kwargs: Any,
) -> GeneratedTexts:
    """Sample ``n`` texts; ``prompt`` is a template (see the module docstring). Other options as
    :func:`generate_tokens`; an autoregressive model refuses a velocity other than ``ko`` or a corrector."""
    if model.kind == "ar" and (kwargs.get("velocity", "ko") != "ko" or kwargs.get("corrector", 0.0) != 0):
        raise ValueError(
            "this is an autoregressive checkpoint: it samples token by token, so velocity, corrector and "
            "alpha do not apply"
        )
    model.check_tokenizer(tokenizer)
    length = resolve_length(model, kwargs.pop("length", None))
    template = parse_template(prompt, tokenizer, length) if prompt else None
    tokens = generate_tokens(model, n, length=length, template=template, **kwargs)
    settings = {
        "checkpoint": str(model.checkpoint),
        "model": model.label,
        "n": n,
        "length": length,
        "prompt": prompt,
        # what produced the texts: the AR baseline samples token by token, so no NFE or velocity
        **{
            k: v
            for k, v in kwargs.items()
            if k not in ("progress", *(_DFM_ONLY if model.kind == "ar" else ()))
        },
    }
    return GeneratedTexts(tokens, tokenizer.decode_batch(tokens, show_special), settings)


def write_texts(result: GeneratedTexts, out: str | os.PathLike) -> Path:
    """Write the texts atomically: ``.jsonl`` gives one object per text (text, tokens, settings), any
    other suffix plain text with ``=== sample i ===`` headers."""
    out = check_writable(out)
    if out.suffix == ".jsonl":
        lines = [
            json.dumps({"id": i, "text": t, "tokens": result.tokens[i].tolist(), **result.settings})
            for i, t in enumerate(result.texts)
        ]
        text = "\n".join(lines) + "\n"
    else:
        text = "".join(f"=== sample {i} ===\n{t}\n" for i, t in enumerate(result.texts))
    return atomic_write_text(out, text)
