"""The training loop every app shares: AdamW, warmup + cosine LR, grad clipping, EMA, bf16, checkpoints.

An app supplies a model, a ``loss_fn(model, batch, generator) -> scalar`` (e.g. the cross-entropy of
eq 11 of the KO-DFM paper on ``path.sample`` draws), and a batch source; :func:`train` does the rest:

* AdamW with linear warmup then cosine decay (or constant), gradient-norm clipping, an EMA of the
  weights (validation runs on the EMA weights), bf16 autocast on CUDA, optional ``torch.compile``;
* ``run_dir/metrics.jsonl`` (one JSON object per log/eval event) and a tqdm bar (loss, lr, items/s);
* ``run_dir/last.pt`` every ``ckpt_every`` steps and at the end, ``run_dir/best.pt`` by validation
  loss, both written atomically. A checkpoint holds the model, optimizer, scheduler, EMA, step, the
  data and loss generators and the global python/numpy/torch RNG states, so a run killed after ``k``
  steps and resumed ends with exactly the weights of an uninterrupted run;
* the best EMA weights of a run and their facts, ready to export for release
  (:func:`best_weights_metadata`); :mod:`dfm_core.checkpoints` writes the safetensors file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from dfm_core.atomic_io import (
    atomic_write,
    atomic_write_text,
    check_writable,
    holds_folder_lock,
    remove_stale_temps,
)
from dfm_core.checkpoints import EXPORTED_MODEL, unwrap_compiled
from dfm_core.config import config_from_dict
from dfm_core.runtime import keeps_global_rng, resolve_device, seed_everything

__all__ = [
    "EMA",
    "TrainConfig",
    "fit_steps_to_budget",
    "TrainResult",
    "TrainingStopped",
    "WarmupSchedule",
    "best_weights_metadata",
    "load_best_weights",
    "load_checkpoint",
    "saved_run_facts",
    "train",
]


LossFn = Callable[[nn.Module, Any, torch.Generator], Tensor]
ValLossFn = Callable[[nn.Module, torch.Generator], Tensor | float]
BatchSource = Callable[[torch.Generator], Any] | Iterable[Any]


@dataclass
class TrainConfig:
    """Hyperparameters of :func:`train`.

    Attributes:
        steps: total optimizer steps.
        batch_size: items per step (used by the app's batch source; reported as items/s).
        lr: peak learning rate.
        weight_decay: AdamW decoupled weight decay.
        betas: AdamW betas.
        warmup_steps: linear warmup from ``lr / warmup_steps`` to ``lr``.
        lr_schedule: ``"cosine"`` (decay to ``min_lr_ratio * lr`` at ``steps``) or ``"constant"``.
        min_lr_ratio: floor of the cosine schedule, as a fraction of ``lr``.
        decay_start: with ``"cosine"``, hold ``lr`` until this step and decay from there
            (warmup-stable-decay); ``None`` decays right after the warmup.
        grad_clip: max global gradient norm; ``<= 0`` disables clipping.
        ema_decay: EMA decay; 0 makes the EMA a copy of the weights.
        bf16: bf16 autocast for forward/loss (on CUDA only; CPU runs stay fp32).
        eval_every: validation every this many steps (and at the end); 0 disables.
        eval_batches: batches per validation.
        ckpt_every: write ``last.pt`` every this many steps (and at the end); 0 only at the end.
        log_every: append a train record to ``metrics.jsonl`` every this many steps.
        seed: seeds the weights' init (by the caller), the data and loss generators and dropout.
        device: ``"auto"`` (CUDA if available), ``"cpu"`` or ``"cuda"``/``"cuda:N"``.
        compile: wrap the model in ``torch.compile`` for the forward passes.
        time_budget_s: wall-clock seconds this invocation may train for. After a short calibration
            (at most 70 steps) ``steps`` is lowered to what fits, with a safety margin, and
            the LR schedule is rebuilt for the new length, so a budgeted run still ends its cosine decay.
            ``None`` trains all ``steps``. Never raises ``steps``.
    """

    steps: int = 10_000
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    decay_start: int | None = None
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    bf16: bool = True
    eval_every: int = 1000
    eval_batches: int = 10
    ckpt_every: int = 1000
    log_every: int = 50
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    time_budget_s: float | None = None

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if self.steps < 0 or self.warmup_steps < 0:
            raise ValueError("steps and warmup_steps must be >= 0")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if min(self.log_every, self.eval_batches) < 1:
            raise ValueError("log_every and eval_batches must be >= 1")
        if min(self.ckpt_every, self.eval_every) < 0:
            raise ValueError("ckpt_every and eval_every must be >= 0 (0: only at the end / never)")
        if self.decay_start is not None and not 0 <= self.decay_start <= self.steps:
            raise ValueError(f"decay_start must be in [0, steps={self.steps}], got {self.decay_start}")
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.time_budget_s is not None and not (
            math.isfinite(self.time_budget_s) and self.time_budget_s > 0
        ):
            raise ValueError(f"time_budget_s must be a positive number of seconds, got {self.time_budget_s}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        return config_from_dict(cls, data)


# --------------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------------


_BUDGET_MARGIN = 0.92  # share of the remaining budget planned for steps (validation, checkpoints, jitter)


class _BudgetClock:
    """Times a run's steps for ``time_budget_s``: skips ``skip`` steps (allocation, autotuning,
    compilation), then times ``timed`` steps; each phase is cut short at 10 % of the budget so a slow
    run calibrates in time. ``tick`` returns the seconds per step when the timing is done, and then every
    ``every`` steps the average since the timing began (validation and checkpoints included), so the
    step count can be fitted again when later steps turn out slower."""

    def __init__(
        self, step: int, start: float, budget_s: float, skip: int = 10, timed: int = 60, every: int = 100
    ) -> None:
        self.first, self.start, self.budget_s = step, start, budget_s
        self.skip, self.timed, self.every = skip, timed, every
        self.mark: tuple[int, float] | None = None
        self.refits = 0  # how many rates tick has returned

    def tick(self, step: int) -> float | None:
        now = time.perf_counter()
        if self.mark is None:
            if step - self.first >= self.skip or now - self.start > 0.1 * self.budget_s:
                self.mark = (step, now)
            return None
        mark_step, mark_time = self.mark
        if self.refits == 0:
            due = step - mark_step >= self.timed or (
                now - mark_time > 0.1 * self.budget_s and step - mark_step >= 2
            )
        else:
            due = (step - mark_step) % self.every == 0
        if not due:
            return None
        self.refits += 1
        return (now - mark_time) / (step - mark_step)


def fit_steps_to_budget(
    config: TrainConfig, step: int, seconds_per_step: float, remaining_s: float
) -> TrainConfig:
    """``config`` with ``steps`` lowered so the run ends within ``remaining_s`` from ``step``.

    ``decay_start`` is scaled with ``steps`` so the schedule keeps its shape; the warmup keeps its
    length unless it would exceed half the run. ``steps`` is never raised nor set below ``step + 1``.
    """
    fit = step + int(_BUDGET_MARGIN * max(remaining_s, 0.0) / max(seconds_per_step, 1e-9))
    new_steps = max(step + 1, min(config.steps, fit))
    if new_steps == config.steps:
        return config
    ratio = new_steps / max(config.steps, 1)
    decay_start = config.decay_start
    if decay_start is not None:
        decay_start = min(max(step, round(decay_start * ratio)), new_steps)
    warmup = min(config.warmup_steps, max(step, new_steps // 2))  # absolute, unless over half the run
    return dataclasses.replace(config, steps=new_steps, warmup_steps=warmup, decay_start=decay_start)


class WarmupSchedule:
    """LR multiplier: linear warmup ``(s + 1) / W``, then 1 until ``decay_start`` (default: the end of the
    warmup), then cosine to ``min_ratio`` at ``total``; or constant after the warmup.

    A callable object (not a lambda) so ``LambdaLR.state_dict`` round-trips it.
    """

    def __init__(
        self,
        warmup: int,
        total: int,
        kind: str = "cosine",
        min_ratio: float = 0.0,
        decay_start: int | None = None,
    ) -> None:
        self.warmup, self.total, self.kind, self.min_ratio = warmup, total, kind, min_ratio
        self.decay_start = decay_start

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        start = max(self.warmup, self.decay_start or 0)
        if self.kind == "constant" or step < start:
            return 1.0
        progress = min(1.0, (step - start) / max(1, self.total - start))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of a model's floating-point parameters.

    .. math:: \\bar\\theta \\leftarrow d_n \\bar\\theta + (1 - d_n)\\theta,\\qquad
              d_n = \\min(d, (1 + n) / (10 + n))

    The warmup ``d_n`` (``warmup=True``) keeps short runs from averaging in the random init.

    Args:
        model: the model whose parameters are tracked (shadows are fp32 copies on its device).
        decay: the asymptotic decay ``d``.
        warmup: use ``d_n`` rather than ``d``.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow: dict[str, Tensor] = {
            name: p.detach().clone().float()
            for name, p in unwrap_compiled(model).named_parameters()
            if p.dtype.is_floating_point
        }

    def current_decay(self) -> float:
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow weights towards ``model``'s."""
        d = self.current_decay()
        self.num_updates += 1
        for name, p in unwrap_compiled(model).named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().float(), 1.0 - d)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s parameters with the shadow weights."""
        for name, p in unwrap_compiled(model).named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name])

    @contextmanager
    def average_parameters(self, model: nn.Module) -> Iterator[None]:
        """Temporarily swap the EMA weights into ``model`` (restored on exit)."""
        model = unwrap_compiled(model)
        backup = {name: p.detach().clone() for name, p in model.named_parameters() if name in self.shadow}
        self.copy_to(model)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in backup:
                        p.copy_(backup[name])

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": self.shadow,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state lacks parameters: {sorted(missing)[:5]}")
        self.decay = state["decay"]
        self.warmup = state["warmup"]
        self.num_updates = state["num_updates"]
        for name, value in state["shadow"].items():
            if name in self.shadow:
                self.shadow[name].copy_(value)


# --------------------------------------------------------------------------------------------------
# Checkpoint IO
# --------------------------------------------------------------------------------------------------


def _rng_state(data_gen: torch.Generator, loss_gen: torch.Generator) -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "data_gen": data_gen.get_state(),
        "loss_gen": loss_gen.get_state(),
    }
    return state


def _set_rng_state(state: Mapping[str, Any], data_gen: torch.Generator, loss_gen: torch.Generator) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    data_gen.set_state(state["data_gen"])
    loss_gen.set_state(state["loss_gen"])


def _architecture(model: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in unwrap_compiled(model).state_dict().items()}


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    use_ema: bool = True,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Read a ``last.pt``/``best.pt`` written by :func:`train`; optionally load its weights into ``model``.

    Args:
        path: the checkpoint.
        model: if given, receives the weights (strictly).
        use_ema: load the EMA weights rather than the raw ones.
        map_location: where tensors go.

    Returns:
        The checkpoint dict (keys ``model``, ``ema``, ``optimizer``, ``scheduler``, ``step``, ``rng``,
        ``config``, ``metadata``, ``architecture``, ``best_val_loss``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{path} is not a readable training checkpoint ({type(e).__name__}: {_first_line(e)}); delete it or start "
            "afresh (resume=False; --no-resume on the command line)"
        ) from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "step" not in ckpt:
        raise ValueError(f"{path} is not a training checkpoint written by dfm_core.training.train")
    if model is not None:
        target = unwrap_compiled(model)
        target.load_state_dict(ckpt["model"])
        if use_ema and ckpt.get("ema") is not None:
            with torch.no_grad():
                for name, p in target.named_parameters():
                    if name in ckpt["ema"]["shadow"]:
                        p.copy_(ckpt["ema"]["shadow"][name])
    return ckpt


def saved_run_facts(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The ``identity`` and ``metadata`` that :func:`train` saved in ``run_dir/last.pt``, read without
    loading its tensors (memory-mapped); ``None`` when there is no such checkpoint or it cannot be read
    (:func:`train` then reports the problem itself). Lets an app refuse a mismatched resume before it
    spends time preparing data."""
    path = Path(run_dir) / "last.pt"
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    if not isinstance(ckpt, dict):
        return None
    return {"identity": ckpt.get("identity") or {}, "metadata": ckpt.get("metadata") or {}}


# --------------------------------------------------------------------------------------------------
# Exporting a run
# --------------------------------------------------------------------------------------------------


def load_best_weights(run_dir: str | os.PathLike, model: nn.Module) -> dict[str, Any]:
    """Load the EMA weights of ``run_dir/best.pt`` (else ``last.pt``) into ``model``, on the CPU.

    Returns the facts an export records: ``step``, ``best_val_loss``, ``source_checkpoint`` and
    ``train_config`` (the :class:`TrainConfig` the checkpoint ran with, e.g. as fitted to a time budget).
    """
    run_dir = Path(run_dir)
    src = run_dir / "best.pt" if (run_dir / "best.pt").exists() else run_dir / "last.pt"
    ckpt = load_checkpoint(src, model=model, use_ema=True, map_location="cpu")
    model.cpu()
    return {
        "step": int(ckpt["step"]),
        "best_val_loss": float(ckpt.get("best_val_loss", float("nan"))),
        "source_checkpoint": src.name,
        "train_config": dict(ckpt.get("config", {})),
    }


def best_weights_metadata(
    run_dir: str | os.PathLike, model: nn.Module, metadata: Mapping[str, Any], config_key: str
) -> dict[str, Any]:
    """:func:`load_best_weights` into ``model`` and return ``metadata`` plus its facts for an export,
    with ``metadata[config_key]["train"]`` set to the :class:`TrainConfig` the checkpoint ran with (e.g.
    the step count a ``time_budget_s`` fitted) instead of the one the run was started with."""
    facts = load_best_weights(run_dir, model)
    ran_with = facts.pop("train_config")
    out = dict(metadata)
    if ran_with and isinstance(out.get(config_key), Mapping):
        out[config_key] = {**out[config_key], "train": ran_with}
    return {**out, **facts}


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        step: the final step.
        final_loss: mean training loss over the last logging window (nan if no step ran).
        best_val_loss: best validation loss on the EMA weights (inf if never validated).
        run_dir: the run directory.
        last_checkpoint: ``run_dir/last.pt``.
        best_checkpoint: ``run_dir/best.pt`` or None.
        resumed_from: the step the run resumed from, or None for a fresh run.
        wall_time_s: seconds spent in this call.
        ema: the EMA (``ema.copy_to(model)`` for the averaged weights).
    """

    step: int
    final_loss: float
    best_val_loss: float
    run_dir: Path
    last_checkpoint: Path
    best_checkpoint: Path | None
    resumed_from: int | None
    wall_time_s: float
    ema: EMA = field(repr=False)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: _to_device(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(v, device) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(
            batch, **{f.name: _to_device(getattr(batch, f.name), device) for f in dataclasses.fields(batch)}
        )
    return batch


def _append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


class TrainingStopped(KeyboardInterrupt):
    """A Ctrl-C or SIGTERM that :func:`train` honoured: the step finished, ``last.pt`` holds it, and the
    way to go on was printed."""


def _first_line(exc: BaseException) -> str:
    """An exception's first non-empty message line (torch's C++ errors run to many lines)."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)[:200]


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records past ``step`` (written by a run killed after its last checkpoint), and lines that are
    not records (a torn last line of a killed append, or text that is not JSON), with a warning."""
    if not path.exists():
        return
    kept, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            record_step = record["step"] if isinstance(record, dict) else None
        except (json.JSONDecodeError, KeyError):
            record_step = None
        if isinstance(record_step, int) and record_step <= step:
            kept.append(line)
        elif line.strip() and not isinstance(record_step, int):
            dropped += 1
    if dropped:
        warnings.warn(f"dropped {dropped} unreadable line(s) of {path} (a torn write?)", stacklevel=4)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


_START_AFRESH = "Use a new run folder, or start afresh (resume=False; --no-resume on the command line)."


class _DeferredInterrupt:
    """Ctrl-C (SIGINT) or SIGTERM (``kill``, ``timeout``, batch schedulers) during training: the first one
    lets the current step finish, so that the loop can checkpoint a consistent state and stop; a second one
    interrupts at once. Only in the main thread."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.SIGNALS:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            self.uninstall()
            raise KeyboardInterrupt
        self.requested = True
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\nstopping after this step ({name} again to stop at once)", file=sys.stderr)


_PER_INVOCATION = ("device", "compile", "time_budget_s", "bf16")  # may differ between sessions of a run


def _write_run_config(run_dir: Path, config: TrainConfig, metadata: Mapping[str, Any]) -> None:
    """``run_dir/config.json``, a record of the settings (not read back), written whole or not at all."""
    atomic_write_text(
        run_dir / "config.json",
        json.dumps({"train": config.to_dict(), "metadata": metadata}, indent=2) + "\n",
    )


def _resumed_config(config: TrainConfig, ckpt: Mapping[str, Any]) -> TrainConfig:
    """The config a resumed run trains with: ``config``, except that the seed stays the run's (the data
    and loss generators continue from the checkpoint's RNG state, so another seed would only mislabel the
    weights), and that a run whose time budget fitted its step count keeps that count and its LR schedule
    when the same command (same ``steps`` ceiling, a budget again) is re-issued: a re-fit from the ceiling
    would restart the cosine decay near the peak LR and train about twice the budget."""
    saved = ckpt["config"]
    config = dataclasses.replace(config, seed=int(saved.get("seed", config.seed)))
    ceiling = (ckpt.get("budget") or {}).get("requested_steps")
    if (
        config.time_budget_s is None
        or ceiling is None
        or config.steps != ceiling
        or saved["steps"] >= ceiling
    ):
        return config
    print(
        f"resuming a run that its time budget fitted to {saved['steps']} of {ceiling} steps: keeping that step "
        "count and its LR schedule (to train longer, resume without --time-budget and with a larger --steps)",
        file=sys.stderr,
    )
    return dataclasses.replace(
        config,
        steps=int(saved["steps"]),
        warmup_steps=int(saved["warmup_steps"]),
        decay_start=saved.get("decay_start"),
    )


def _check_resumable(
    ckpt: Mapping[str, Any],
    model: nn.Module,
    config: TrainConfig,
    metadata: Mapping,
    identity: Mapping | None = None,
    identity_added_later: tuple[str, ...] = (),
) -> None:
    saved, current = ckpt["architecture"], _architecture(model)
    if saved != current:
        diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        details = "; ".join(f"{k}: saved {saved.get(k)} vs model {current.get(k)}" for k in diff[:5])
        raise ValueError(
            f"cannot resume: the checkpoint's architecture differs from the model ({len(diff)} tensors, "
            f"e.g. {details}). {_START_AFRESH}"
        )
    saved_meta = ckpt.get("metadata") or {}
    if "model_config" in saved_meta and "model_config" in metadata:
        if saved_meta["model_config"] != metadata["model_config"]:
            raise ValueError(
                "cannot resume: metadata['model_config'] differs from the checkpoint's "
                f"({saved_meta['model_config']} vs {metadata['model_config']}). {_START_AFRESH}"
            )
    saved_identity = ckpt.get("identity")
    unchecked = [k for k in identity_added_later if saved_identity and identity and k not in saved_identity]
    if unchecked:  # a checkpoint of an earlier version, which did not record these facts yet
        identity = {k: v for k, v in (identity or {}).items() if k not in unchecked}
        warnings.warn(
            f"this checkpoint predates the record of {', '.join(unchecked)}: resuming without checking them",
            stacklevel=4,
        )
    if saved_identity and identity is not None and saved_identity != identity:
        diff = {k: (saved_identity.get(k), identity.get(k)) for k in set(saved_identity) | set(identity)}
        diff = {k: v for k, v in diff.items() if v[0] != v[1]}
        raise ValueError(
            f"cannot resume: this run was trained on other data or another objective (saved -> now: {diff}). "
            f"{_START_AFRESH}"
        )
    old = ckpt["config"]
    changed = {
        k: (old.get(k), v)
        for k, v in config.to_dict().items()
        if old.get(k) != v and k not in _PER_INVOCATION and k != "seed"
    }
    if changed:
        warnings.warn(
            f"resuming with a changed TrainConfig (saved -> now): {changed}; the new settings apply from "
            f"step {ckpt['step']} on",
            stacklevel=4,
        )


@holds_folder_lock("run_dir", "run folder")
@keeps_global_rng
def train(
    model: nn.Module,
    loss_fn: LossFn,
    train_batches: BatchSource,
    config: TrainConfig,
    run_dir: str | os.PathLike,
    val_loss_fn: ValLossFn | None = None,
    resume: bool = True,
    extra_metadata: Mapping[str, Any] | None = None,
    progress: bool = True,
    identity: Mapping[str, Any] | None = None,
    exported: str = EXPORTED_MODEL,
    identity_added_later: tuple[str, ...] = (),
) -> TrainResult:
    """Train ``model`` to minimise ``loss_fn``; see the module docstring for what it writes.

    Args:
        model: the network (moved to the configured device; its parameters are trained in place).
        loss_fn: ``loss_fn(model, batch, generator) -> scalar``; ``generator`` lives on the training
            device and is the only randomness the loss should use (e.g. for ``t`` and ``x_t``), so
            resumed runs replay it exactly.
        train_batches: ``train_batches(generator) -> batch`` drawing with the CPU ``generator`` (exactly
            resumable), or an iterable of batches (restarted from its start on resume, with a warning).
            Tensors in tuples, lists, dicts and dataclasses are moved to the device.
        config: :class:`TrainConfig`.
        run_dir: directory for ``metrics.jsonl``, ``last.pt``, ``best.pt``, ``config.json``.
        val_loss_fn: ``val_loss_fn(model, generator) -> scalar`` on one validation batch, called
            ``eval_batches`` times with a generator re-seeded identically at every validation, under
            ``torch.no_grad`` with the EMA weights swapped in.
        resume: continue from ``run_dir/last.pt`` if present (refused if the architecture differs).
        extra_metadata: JSON-serialisable facts stored in checkpoints and ``config.json`` (e.g.
            ``{"model_config": ...}``, which must also match on resume).
        progress: show a tqdm bar.
        identity: JSON-serialisable facts that define the run (data digests, path, objective): resuming a
            checkpoint whose identity differs is refused. Changed :class:`TrainConfig` settings are allowed
            on resume (with a warning) and take effect: the LR schedule, weight decay and betas follow the
            new config from the resumed step on (e.g. more ``steps`` extend the cosine decay).
        exported: the file in ``run_dir`` the app exports the run's weights to; a run started afresh
            (``resume=False``) removes an old one with the run's other outputs.
        identity_added_later: keys of ``identity`` that checkpoints of earlier versions lack: such a
            checkpoint still resumes (with a warning that those facts were not checked).

    Returns:
        :class:`TrainResult`.
    """
    from tqdm.auto import tqdm

    run_dir = check_writable(run_dir, "run folder", folder=True)  # a file there: a clear error
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(run_dir)  # half-written checkpoints of a killed run
    # JSON round trip: fails early on non-serialisable metadata and makes resume comparisons exact
    metadata = json.loads(json.dumps(dict(extra_metadata or {})))
    identity = json.loads(json.dumps(dict(identity or {})))
    device = resolve_device(config.device)
    use_bf16 = config.bf16 and device.type == "cuda"
    last_path, best_path, metrics_path = run_dir / "last.pt", run_dir / "best.pt", run_dir / "metrics.jsonl"

    model.to(device)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=config.betas,
        fused=device.type == "cuda",
    )

    def lr_scheduler(done_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
        """The config's schedule, positioned after ``done_steps`` optimizer steps."""
        for group in optimizer.param_groups:
            group["initial_lr"] = config.lr
        schedule = WarmupSchedule(
            config.warmup_steps, config.steps, config.lr_schedule, config.min_lr_ratio, config.decay_start
        )
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule, last_epoch=done_steps - 1)

    scheduler = lr_scheduler(0)
    ema = EMA(model, config.ema_decay)
    data_gen = torch.Generator().manual_seed(config.seed)
    loss_gen = torch.Generator(device=device).manual_seed(config.seed + 1)

    step, best_val, resumed_from = 0, math.inf, None
    requested_steps = config.steps  # the ceiling a time budget fits the step count under
    resumed_window = {"loss_sum": 0.0, "steps": 0}  # a partly filled logging window, for identical logs
    if resume and last_path.exists():
        ckpt = load_checkpoint(last_path, map_location=device)
        if config.seed != ckpt["config"].get("seed", config.seed):
            warnings.warn(
                f"resuming with seed {config.seed}: the run keeps its seed {ckpt['config']['seed']}, as its "
                "random state comes from the checkpoint",
                stacklevel=3,
            )
        config = _resumed_config(config, ckpt)
        _check_resumable(ckpt, model, config, metadata, identity, identity_added_later)
        unwrap_compiled(model).load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])  # moments; the hyperparameters come from config:
        for group, weight_decay in zip(optimizer.param_groups, (config.weight_decay, 0.0), strict=True):
            group["weight_decay"], group["betas"] = weight_decay, config.betas
        scheduler = lr_scheduler(int(ckpt["step"]))
        ema.load_state_dict(ckpt["ema"])
        ckpt["rng"]["torch"] = ckpt["rng"]["torch"].cpu()
        ckpt["rng"]["data_gen"] = ckpt["rng"]["data_gen"].cpu()
        ckpt["rng"]["loss_gen"] = ckpt["rng"]["loss_gen"].cpu()
        ckpt["rng"]["cuda"] = [s.cpu() for s in ckpt["rng"]["cuda"]]
        _set_rng_state(ckpt["rng"], data_gen, loss_gen)
        step = resumed_from = int(ckpt["step"])
        # said now, not only at the end: a rerun into a used run dir goes on, it does not restart
        if progress:
            print(
                f"resuming from step {step} of {last_path} (resume=False, --no-resume, starts afresh)",
                file=sys.stderr,
            )
        best_val = float(ckpt.get("best_val_loss", math.inf))
        resumed_window = ckpt.get("log_window", {"loss_sum": 0.0, "steps": 0})
        _truncate_metrics(metrics_path, step)
        if not callable(train_batches):
            warnings.warn(
                "train_batches is an iterable: resuming restarts it from its beginning", stacklevel=3
            )
        del ckpt
    else:
        # a fresh run must not export an old model; one asked to start afresh (resume=False) also drops
        # the old export, which would otherwise sit beside the new config.json until the run ends
        old_export = [] if resume else [run_dir / exported]
        for stale in (metrics_path, last_path, best_path, *old_export):
            if stale.exists():
                stale.unlink()
        # dropout and any global-RNG use are seeded too (weights were initialised by the caller)
        seed_everything(config.seed)
    _write_run_config(run_dir, config, metadata)

    forward_model = torch.compile(model) if config.compile else model
    batches = None if callable(train_batches) else iter(train_batches)

    def next_batch() -> Any:
        batch = train_batches(data_gen) if batches is None else next(batches)  # type: ignore[operator]
        return _to_device(batch, device)

    def autocast():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()

    def checkpoint(path: Path) -> None:
        state = {
            "model": unwrap_compiled(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "ema": ema.state_dict(),
            "step": step,
            "best_val_loss": best_val,
            "log_window": {
                "loss_sum": float(window_loss),
                "steps": window_steps,
                "time_s": time_offset + time.perf_counter() - start_time,
            },
            "rng": _rng_state(data_gen, loss_gen),
            "config": config.to_dict(),
            "metadata": metadata,
            "identity": identity,
            "budget": {"requested_steps": requested_steps},
            "architecture": _architecture(model),
            "versions": {"torch": str(torch.__version__), "numpy": str(np.__version__)},
        }
        try:
            atomic_write(path, lambda tmp: torch.save(state, tmp))
        except (RuntimeError, OSError) as e:  # torch reports a full disk as "unexpected pos ..."
            free = shutil.disk_usage(path.parent).free / 2**20
            kept = "the previous one is kept" if path.exists() else "none was written before"
            raise OSError(
                f"could not write the checkpoint {path} ({_first_line(e)}; {free:.0f} MiB free on its disk); {kept}"
            ) from e

    def validate() -> float:
        val_gen = torch.Generator(device=device).manual_seed(config.seed + 2)
        was_training = model.training
        model.eval()
        total = 0.0
        try:
            with ema.average_parameters(model), torch.no_grad(), autocast():
                for _ in range(config.eval_batches):
                    total += float(val_loss_fn(forward_model, val_gen))  # type: ignore[misc]
        finally:
            model.train(was_training)
        return total / max(1, config.eval_batches)

    # the first step whose loss or gradient norm was not finite (-1: none yet); kept on the device, so that
    # watching it costs no synchronisation per step; read where the loop syncs anyway
    bad_step = torch.full((), -1, dtype=torch.long, device=device)

    def diverged(loss: float) -> FloatingPointError:
        kept = f"last good checkpoint: {last_path}" if last_path.exists() else "no checkpoint was written"
        first = int(bad_step)
        return FloatingPointError(
            f"non-finite training loss or gradient at step {first if first >= 0 else step} (logged loss {loss}); "
            f"{kept} (lr {config.lr:g}: try a lower lr)"
        )

    start_time = time.perf_counter()
    time_offset = float(resumed_window.get("time_s", 0.0))  # training time of earlier sessions of this run
    window_loss = torch.tensor(resumed_window["loss_sum"], device=device)
    window_steps, window_start = int(resumed_window["steps"]), time.perf_counter()
    timed_steps = 0  # steps of the current window run in this session: the throughput's numerator
    final_loss = math.nan
    clean = True  # state is consistent (between steps) and may be checkpointed on interrupt
    budget_clock = _BudgetClock(step, start_time, config.time_budget_s) if config.time_budget_s else None
    bar = tqdm(total=config.steps, initial=step, disable=not progress, dynamic_ncols=True, desc="train")
    model.train()
    interrupt = _DeferredInterrupt()
    try:
        interrupt.install()
        while step < config.steps:
            clean = False
            batch = next_batch()
            with autocast():
                loss = loss_fn(forward_model, batch, loss_gen)
            loss.backward()
            clip = config.grad_clip if config.grad_clip > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
            bad_step.masked_fill_((bad_step < 0) & ~finite, step + 1)  # NaN weights follow a NaN gradient
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            ema.update(model)
            step += 1
            clean = True
            window_loss += loss.detach().float()
            window_steps += 1
            timed_steps += 1

            if step % config.log_every == 0 or step == config.steps:
                final_loss = float(window_loss) / window_steps
                if not math.isfinite(final_loss) or int(bad_step) >= 0:
                    raise diverged(final_loss)
                elapsed = time.perf_counter() - window_start
                record = {
                    "step": step,
                    "loss": final_loss,
                    "lr": optimizer.param_groups[0]["lr"],
                    "grad_norm": float(grad_norm),
                    "items_per_s": timed_steps * config.batch_size / max(elapsed, 1e-9),
                    "time_s": time_offset + time.perf_counter() - start_time,
                }
                _append_jsonl(metrics_path, record)
                bar.set_postfix(
                    loss=f"{final_loss:.4f}", lr=f"{record['lr']:.2e}", items_s=f"{record['items_per_s']:.0f}"
                )
                window_loss.zero_()
                window_steps, timed_steps, window_start = 0, 0, time.perf_counter()
            bar.update(1)

            if val_loss_fn is not None and config.eval_every > 0:
                if step % config.eval_every == 0 or step == config.steps:
                    val = validate()
                    _append_jsonl(metrics_path, {"step": step, "val_loss": val, "ema": True})
                    if val < best_val:
                        best_val = val
                        checkpoint(best_path)
            if (config.ckpt_every > 0 and step % config.ckpt_every == 0) or step == config.steps:
                if int(bad_step) >= 0:  # never save diverged weights as last.pt
                    raise diverged(float(window_loss))
                checkpoint(last_path)
            per_step = budget_clock.tick(step) if budget_clock is not None else None
            if per_step is not None:
                assert config.time_budget_s is not None
                remaining = config.time_budget_s - (time.perf_counter() - start_time)
                fitted = fit_steps_to_budget(config, step, per_step, remaining)
                if fitted.steps != config.steps:
                    if budget_clock.refits == 1:
                        print(
                            f"time budget {config.time_budget_s:.0f} s at {per_step * 1e3:.1f} ms/step: "
                            f"training {fitted.steps} steps instead of {config.steps}",
                            file=sys.stderr,
                        )
                    config = fitted
                    scheduler = lr_scheduler(step)
                    bar.total = config.steps
                    _write_run_config(run_dir, config, metadata)
            if interrupt.requested:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        if clean and step > 0 and int(bad_step) < 0:
            checkpoint(last_path)
            bar.close()
            print(
                f"interrupted at step {step}; checkpoint saved to {last_path}. Train again with the same run "
                f"folder to continue, or with steps = {step} to only export the weights trained so far.",
                file=sys.stderr,
            )
            raise TrainingStopped(f"stopped at step {step}; checkpoint saved to {last_path}") from None
        raise
    finally:
        interrupt.uninstall()
        bar.close()
    if step == (resumed_from or 0) and not last_path.exists():
        checkpoint(last_path)  # zero-step run: still leave a valid checkpoint
    return TrainResult(
        step=step,
        final_loss=final_loss,
        best_val_loss=best_val,
        run_dir=run_dir,
        last_checkpoint=last_path,
        best_checkpoint=best_path if best_path.exists() else None,
        resumed_from=resumed_from,
        wall_time_s=time.perf_counter() - start_time,
        ema=ema,
    )
