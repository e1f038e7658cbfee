"""Sampling time of one batch as one group (the reference: every crystal padded to the batch's largest) against
groups of similar atom count (`CrystalGenerator.sample_tokens(length_buckets=K)`, what `matgen generate` does
by default on CPU), same model, same atom counts, same run, interleaved repeats.

    OMP_NUM_THREADS=2 python benchmarks/bench_length_buckets.py --batch 100 500 --steps 20 --threads 2
    python benchmarks/bench_length_buckets.py --device cuda --batch 10000 --steps 100 --buckets 1 2 3 4
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import UTC, datetime

import torch

from matgen.sampling import CrystalGenerator, length_groups


def timed(gen: CrystalGenerator, counts: torch.Tensor, steps: int, buckets: int) -> float:
    if gen.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    gen.sample_tokens(
        counts, steps=steps, generator=torch.Generator(gen.device).manual_seed(1), length_buckets=buckets
    )
    if gen.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="default: the shipped model")
    parser.add_argument("--batch", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--steps", type=int, default=20, help="NFE (time is linear in it)")
    parser.add_argument("--buckets", type=int, nargs="+", default=None, help="default: 1 and max_atoms")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads on CPU (0: leave)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = CrystalGenerator.from_checkpoint(args.checkpoint, args.device)
    buckets = args.buckets or [1, gen.max_atoms]
    dist = gen.atom_count_distribution()
    print(
        f"# {datetime.now(UTC).isoformat(timespec='seconds')} | {platform.processor() or platform.machine()} | "
        f"{gen.device} | torch {torch.__version__} | threads {torch.get_num_threads()} | NFE {args.steps} | "
        f"median of {args.repeats}"
    )
    for batch in args.batch:
        counts = torch.multinomial(dist, batch, replacement=True, generator=torch.Generator().manual_seed(0))
        times: dict[int, list[float]] = {k: [] for k in buckets}
        timed(gen, counts[: min(batch, 8)], 2, 1)  # warm-up
        for _ in range(args.repeats):
            for k in buckets:
                times[k].append(timed(gen, counts, args.steps, k))
        ref = statistics.median(times[buckets[0]])
        for k in buckets:
            med = statistics.median(times[k])
            sizes = [len(g) for g in length_groups(counts.to(gen.device), k)]
            print(
                f"batch {batch:6d}  buckets <= {k:3d}  groups {sizes}  {med:8.2f} s  "
                f"{med / args.steps * 1e3:8.1f} ms/step  ratio {med / ref:.3f}"
            )


if __name__ == "__main__":
    main()
