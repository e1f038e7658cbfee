"""What pinning the known posteriors of a mask-source text model costs in its training loss (eq 37).

Three ways to compute the training loss, forward and backward, on the same random logits and the same x_t
drawn from the path, in the same run:

* raw: `mixture_elbo_loss(logits, ...)`, the loss before pinning;
* pinned logits: `mixture_elbo_loss(path.pin_known_tokens(logits, x_t), ...)`, rewriting V logits per
  unmasked position in place;
* pin_known: `mixture_elbo_loss(logits, ..., pin_known=True)`, zeroing the integrand there (what
  `textgen train` does); the same value as pinned logits.

The network's own forward and backward, which dominate a real step, are not included.

    python benchmarks/bench_pin_tokens.py --batch 4 --seq-len 256 --repeats 5
    python benchmarks/bench_pin_tokens.py --device cuda --batch 32 --seq-len 256
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import UTC, datetime

import torch

from dfm_core.objectives import mixture_elbo_loss
from dfm_core.paths import MixturePath
from dfm_core.schedulers import KineticOptimalScheduler
from dfm_core.sources import mask_source

VOCAB = 50258  # GPT-2's 50257 tokens + the mask, as in textgen


def timed(fn, device: torch.device, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats + 1):  # the first call warms up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - start)
    return out[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    g = torch.Generator(device=device).manual_seed(0)
    path = MixturePath(mask_source(VOCAB, VOCAB - 1), KineticOptimalScheduler())
    x1 = torch.randint(VOCAB - 1, (args.batch, args.seq_len), generator=g, device=device)
    t = torch.rand(args.batch, generator=g, device=device) * 0.999
    xt = path.sample(x1, t, generator=g)
    base = torch.randn(args.batch, args.seq_len, VOCAB, generator=g, device=device)

    def step(mode: str) -> None:
        logits = base.clone().requires_grad_(True)
        out = logits * 1.0  # an op between leaf and pinning, as a network's output layer is
        if mode == "pinned logits":
            out = path.pin_known_tokens(out, xt)
        mixture_elbo_loss(out, x1, xt, t, path, pin_known=mode == "pin_known").backward()

    medians = {}
    for mode in ("raw", "pinned logits", "pin_known"):
        medians[mode] = statistics.median(timed(lambda mode=mode: step(mode), device, args.repeats))
    masked = float((xt == VOCAB - 1).float().mean())
    print(f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, torch {torch.__version__}, {device}")
    print(
        f"logits ({args.batch}, {args.seq_len}, {VOCAB}), masked share {masked:.2f}, median of {args.repeats}"
    )
    for mode, sec in medians.items():
        print(f"ELBO loss fwd+bwd, {mode:13s}: {1e3 * sec:8.1f} ms   ratio to raw {sec / medians['raw']:.3f}")


if __name__ == "__main__":
    main()
