"""The latent metric path (eq 107) with a K x K distance matrix vs rows computed on demand.

`imagegen.latent.latent_path` keeps a float64 K x K matrix d[x1, x] up to `MATRIX_CODES_MAX` codes and
computes the rows d(., x1) it needs from the scaled code embeddings above that. This script builds both
forms for one random codebook, each in a fresh process so that the peak memory is its own, and times
`probs` + `probs_dt` on the same (B, L) tokens, as one training step and one sampler step use them.

    python benchmarks/bench_latent_distances.py --codes 16384 --dim 64 --batch 4 --length 256
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime


def run_one(mode: str, codes: int, dim: int, batch: int, length: int, repeats: int) -> dict:
    """Build the path in ``mode`` ("matrix" or "on_demand") and time it; runs in a child process."""
    import torch

    from dfm_core.paths import MetricPath
    from dfm_core.schedulers import BetaSchedule
    from imagegen.latent import codebook_distances, distance_scale

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(codes, dim, generator=g)
    start = time.perf_counter()
    beta = BetaSchedule(3.0, 0.9)
    if mode == "matrix":
        path = MetricPath(codebook_distances(codebook, 4.0), beta=beta)
    else:
        path = MetricPath.from_embeddings(codebook.double() / distance_scale(codebook), power=4.0, beta=beta)
    build_s = time.perf_counter() - start
    x1 = torch.randint(codes, (batch, length), generator=g)
    t = torch.rand(batch, generator=g, dtype=torch.float64)
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        start = time.perf_counter()
        p, dp = path.probs(x1, t), path.probs_dt(x1, t)
        times.append(time.perf_counter() - start)
    checksum = float(p[0, 0, :8].sum() + dp[0, 0, :8].sum())
    return {
        "mode": mode,
        "build_s": round(build_s, 2),
        "probs_and_dt_ms": round(1e3 * sorted(times[1:])[len(times[1:]) // 2], 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "checksum": checksum,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codes", type=int, default=16384)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = (args.codes, args.dim, args.batch, args.length, args.repeats)
    if args.child:
        print(json.dumps(run_one(args.child, *sizes)))
        return
    rows = []
    for mode in ("matrix", "on_demand"):
        cmd = [sys.executable, __file__, "--child", mode, "--codes", str(args.codes), "--dim", str(args.dim)]
        cmd += ["--batch", str(args.batch), "--length", str(args.length), "--repeats", str(args.repeats)]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    matrix, lazy = rows
    assert abs(matrix["checksum"] - lazy["checksum"]) < 1e-6 * max(1.0, abs(matrix["checksum"])), rows
    print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, one thread")
    print(
        f"K = {args.codes} codes of dim {args.dim}; probs + probs_dt on ({args.batch}, {args.length}) tokens"
    )
    for r in rows:
        print(
            f"  {r['mode']:>9}: build {r['build_s']} s, call {r['probs_and_dt_ms']} ms, peak RSS {r['peak_rss_gb']} GB"
        )
    print(
        f"  on_demand / matrix: build {lazy['build_s'] / matrix['build_s']:.2f}, call "
        f"{lazy['probs_and_dt_ms'] / matrix['probs_and_dt_ms']:.2f}, peak memory "
        f"{lazy['peak_rss_gb'] / matrix['peak_rss_gb']:.2f}"
    )


if __name__ == "__main__":
    main()
