"""Sampling time with every crystal through the network in every step (the reference) against
``skip_idle_rows`` (only the crystals with a token unmasked in the step), same model, same atom counts
drawn from the checkpoint's training distribution, same seed, same run, interleaved repeats.

Also prints the network rows each variant ran (summed over the steps) and the fraction of crystals whose
tokens agree between the two (the draws are the same; only the network's float rounding at other batch
sizes can flip one).

``--fractions`` prints instead, for a mask source with the KO and linear schedulers, the fraction of
sequence-steps that need the network at several lengths and NFE (a property of the path and the grid,
found with a stand-in network; how textgen's and imagegen's sampling compare).

    OMP_NUM_THREADS=2 python benchmarks/bench_skip_idle_rows.py --batch 100 --steps 500 --threads 2
    python benchmarks/bench_skip_idle_rows.py --device cuda --batch 10000 --steps 500 --repeats 2
    python benchmarks/bench_skip_idle_rows.py --fractions
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import UTC, datetime

import torch

import matgen.sampling as sampling
from matgen.sampling import CrystalGenerator

_network_rows: list[int] = []


def _counting_sample(*args, **kwargs):
    result = _sample(*args, **kwargs)
    _network_rows.append(result.network_rows)
    return result


_sample = sampling.sample
sampling.sample = _counting_sample  # record SampleResult.network_rows of each call


def timed(gen: CrystalGenerator, counts: torch.Tensor, steps: int, skip: bool) -> tuple[float, torch.Tensor]:
    if gen.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = gen.sample_tokens(
        counts, steps=steps, generator=torch.Generator(gen.device).manual_seed(1), skip_idle_rows=skip
    )
    if gen.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, tokens


def fractions(lengths: tuple[int, ...] = (46, 256, 1024), nfes: tuple[int, ...] = (64, 256, 1024)) -> None:
    from dfm_core import KineticOptimalScheduler, LinearScheduler, MixturePath, mask_source, sample

    V = 50  # the vocabulary size does not change which positions jump
    print("scheduler  length  NFE  network rows / (batch x NFE)")
    for name, scheduler in (("ko", KineticOptimalScheduler()), ("linear", LinearScheduler())):
        path = MixturePath(mask_source(V + 1, V), scheduler)
        for length in lengths:
            for nfe in nfes:
                x0 = path.sample_source((256, length))
                result = sample(
                    lambda x, t, rows: torch.zeros(*x.shape, V + 1).index_fill_(-1, torch.tensor([V]), -1e9),
                    path,
                    x0,
                    steps=nfe,
                    generator=torch.Generator().manual_seed(0),
                    skip_idle_rows=True,
                )
                print(f"{name:9s}  {length:6d}  {nfe:4d}  {result.network_rows / (len(x0) * nfe):.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="default: the shipped model")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--steps", type=int, default=500, help="NFE")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads on CPU (0: leave)")
    parser.add_argument("--fractions", action="store_true", help="only the network-row fractions (no model)")
    args = parser.parse_args(argv)
    if args.fractions:
        fractions()
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = CrystalGenerator.from_checkpoint(args.checkpoint, args.device)
    counts = torch.multinomial(
        gen.atom_count_distribution(),
        args.batch,
        replacement=True,
        generator=torch.Generator().manual_seed(0),
    )
    print(
        f"# {datetime.now(UTC).isoformat(timespec='seconds')} | {platform.processor() or platform.machine()} | "
        f"{gen.device} | torch {torch.__version__} | threads {torch.get_num_threads()} | batch {args.batch} "
        f"(mean {counts.float().mean():.2f} atoms) | NFE {args.steps} | median of {args.repeats}"
    )
    timed(gen, counts[:8], 2, False)  # warm-up
    variants = {"every crystal, every step": False, "skip_idle_rows": True}
    times: dict[str, list[float]] = {name: [] for name in variants}
    rows: dict[str, int] = {}
    tokens: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for name, skip in variants.items():
            _network_rows.clear()
            seconds, tokens[name] = timed(gen, counts, args.steps, skip)
            times[name].append(seconds)
            rows[name] = sum(_network_rows)
    ref_name = next(iter(variants))
    ref = statistics.median(times[ref_name])
    for name in variants:
        med = statistics.median(times[name])
        print(
            f"{name:28s} {med:8.2f} s  {med / args.steps * 1e3:8.1f} ms/step  network rows {rows[name]:9d} "
            f"({rows[name] / rows[ref_name]:.3f})  ratio {med / ref:.3f}"
        )
    same = (tokens[ref_name] == tokens["skip_idle_rows"]).all(1).float().mean()
    print(f"crystals with identical tokens in both variants: {same:.4f}")


if __name__ == "__main__":
    main()
