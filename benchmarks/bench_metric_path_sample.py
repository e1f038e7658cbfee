"""Drawing x_t ~ p_t(. | x1) on the pixel metric path (eq 27): dfm_core's inverse-CDF draw vs torch.multinomial.

Every training step of an imagegen pixel model draws one x_t per pixel from softmax(-beta_t d(., x1)) over
256 levels. `MetricPath.sample` does it with `dfm_core.draws.categorical` (float64 cumulative sums and
`searchsorted`), from `probs` that gather a cached float32 distance matrix. The reference is the plain
PyTorch way, as dfm_core did it before: gather the float64 matrix and cast, build the t >= 1 delta from an
int64 `one_hot`, then `torch.multinomial` over the rows in float64. Both run in this process on the same
tokens and times; the histograms of x_t - x1 of the two draws are compared (total variation), next to the distance
between two draws of the reference itself, which is the noise level.

    python benchmarks/bench_metric_path_sample.py --batch 64 --pixels 784 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime

import torch
from bench_sampler import machine_description, sync  # the script's folder is on sys.path

from dfm_core.paths import MetricPath


def reference_sample(
    path: MetricPath, x1: torch.Tensor, t: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """The reference: float64 gather + cast, int64 one_hot for t >= 1, torch.multinomial in float64."""
    tt = t.to(torch.float32).unsqueeze(-1).expand(x1.shape)
    d = path._matrix.to(x1.device)[x1].to(torch.float32)
    b = path.beta.beta(tt.clamp(max=1.0 - 1e-7)).unsqueeze(-1)
    p = torch.softmax(-b * d, dim=-1)
    onehot = torch.nn.functional.one_hot(x1, path.vocab_size).to(p.dtype)
    p = torch.where((tt >= 1.0).unsqueeze(-1), onehot, p)
    flat = p.reshape(-1, p.shape[-1]).to(torch.float64).clamp_min(0.0)
    return torch.multinomial(flat, 1, generator=generator).reshape(x1.shape)


def _interleaved(fns: dict, repeats: int, device: torch.device) -> tuple[dict, dict]:
    """Median wall seconds of each ``fns[name]()`` over ``repeats`` rounds (one call of each per round,
    in turn, after one warm-up call each), and each one's last result."""
    out = {name: fn() for name, fn in fns.items()}
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            out[name] = fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64, help="images per training step")
    ap.add_argument("--pixels", type=int, default=784, help="tokens per image (784: 28x28x1, 3072: 32x32x3)")
    ap.add_argument("--levels", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    path = MetricPath.ordinal(args.levels)
    g = torch.Generator(device=device).manual_seed(0)
    x1 = torch.randint(args.levels, (args.batch, args.pixels), generator=g, device=device)
    t = torch.rand(args.batch, generator=g, device=device)
    fns = {
        "dfm_core": lambda: path.sample(x1, t, generator=g),
        "reference": lambda: reference_sample(path, x1, t, g),
    }
    secs, out = _interleaved(fns, args.repeats, device)
    ours_s, ref_s, ours, ref = secs["dfm_core"], secs["reference"], out["dfm_core"], out["reference"]

    # the two draws follow one law: their histograms of x_t - x1 agree up to sampling noise
    # (the noise level: the same distance between two draws of the reference itself)
    def hist(x: torch.Tensor) -> torch.Tensor:
        h = torch.bincount((x - x1).flatten() + args.levels, minlength=2 * args.levels).double()
        return h / h.sum()

    def tv(a: torch.Tensor, b: torch.Tensor) -> float:
        return round(0.5 * float((hist(a) - hist(b)).abs().sum()), 4)

    print(
        json.dumps(
            {
                "command": "python " + " ".join(sys.argv),
                "date": datetime.now(UTC).strftime("%Y-%m-%d"),
                "machine": machine_description(device, None),
                "torch": torch.__version__,
                "clock": "wall, median, repeats interleaved",
                "batch": args.batch,
                "pixels": args.pixels,
                "dfm_core_ms": round(1e3 * ours_s, 1),
                "reference_ms": round(1e3 * ref_s, 1),
                "ratio": round(ours_s / ref_s, 3),
                "tv_of_x_t_minus_x1": tv(ours, ref),
                "tv_reference_vs_itself": tv(ref, reference_sample(path, x1, t, g)),
            }
        )
    )


if __name__ == "__main__":
    main()
