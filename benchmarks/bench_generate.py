"""End-to-end throughput of matgen.generate.generate (sampling + decoding + CIF writing), crystals/s.

Runs ``generate(n, out_dir, checkpoint, steps, batch_size, ...)`` and splits its time into

* ``sampling``: ``CrystalGenerator.sample_tokens`` (the DFM sampler with the model, device-synchronised);
* ``decode``:   ``matgen.generate._decode_and_write`` in this process (tokens -> checks -> CIF files; with
  ``--workers`` it runs in other processes and is not timed here);
* ``write``:    the rest of the loop: the batch's ``os.sync()``, samples.csv, waiting for workers.

crystals/s = n / (wall time of generate's batch loop, i.e. after loading the checkpoint; failed decodes
count, they get a samples.csv row but no CIF). Wall times, with the process CPU time of sampling and
decoding beside them (on a shared CPU the CPU time is the steadier figure).

Reference in the same run (``--reference``, on by default): the identical pipeline with
``dfm_core.sampler.sample`` swapped for flow_matching's ``MixtureDiscreteEulerSolver`` (same model,
same masked/temperature-scaled posterior, same kappa_t through a ``ConvexScheduler`` adapter around
the checkpoint's dfm_core scheduler, same NFE, same batches), so the ratio isolates the sampler. Ours
runs the network only on the crystals that change in a step (``skip_idle_rows``, the default of
``sample_tokens``); flow_matching's solver runs every crystal in every step.

Checkpoint: ``--checkpoint`` if given, else the shipped ``matgen/checkpoints/ko_dfm_mp20.safetensors``,
else a random-weight checkpoint of ``--size`` built in a temp dir (KO scheduler, atom counts uniform
on 1..20 unless ``--num-atoms`` fixes them).

    OMP_NUM_THREADS=1 python benchmarks/bench_generate.py --n 64 --steps 20 --batch-size 32
    python benchmarks/bench_generate.py --device cuda --n 10000 --steps 500 --batch-size 10000 --no-reference
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sampler import SIZES, _version, build_crystal_model, machine_description, sync  # noqa: E402


def build_random_checkpoint(path: Path, size: str, seed: int, scheduler: str = "ko") -> Path:
    from dfm_core.checkpoints import export_safetensors
    from dfm_core.nn import count_parameters
    from matgen.train import CHECKPOINT_FORMAT

    model = build_crystal_model(size, seed)
    max_atoms = model.config.max_atoms
    dist = [0.0] + [1.0 / max_atoms] * max_atoms
    meta = {
        "format": CHECKPOINT_FORMAT,
        "kind": "dfm",
        "scheduler": scheduler,
        "model_config": model.config.to_dict(),
        "atom_count_distribution": dist,
        "parameters": count_parameters(model),
        "note": f"random weights ({size}) for benchmarking",
    }
    return export_safetensors(model, path, meta)


def flow_matching_sample(
    model,
    path,
    x0,
    steps=None,
    time_grid=None,
    velocity=None,
    temperature=1.0,
    allowed=None,
    clamp_mask=None,
    clamp_values=None,
    float64=True,
    generator=None,
    **_unused,
):
    """Drop-in for dfm_core.sampler.sample (mixture path, KO velocity) running flow_matching's solver."""
    from flow_matching.path import MixtureDiscreteProbPath
    from flow_matching.path.scheduler.scheduler import ConvexScheduler, SchedulerOutput
    from flow_matching.solver import MixtureDiscreteEulerSolver
    from flow_matching.utils import ModelWrapper

    from dfm_core.paths import MixturePath
    from dfm_core.sampler import SampleResult, posterior_probs
    from dfm_core.velocities import KineticOptimalVelocity

    if not isinstance(path, MixturePath) or path.scheduler.token_dependent:
        raise ValueError(
            "the flow_matching reference needs a mixture path with a token-independent scheduler"
        )
    if velocity is not None and type(velocity) is not KineticOptimalVelocity:
        raise ValueError("the flow_matching reference supports only the plain KO velocity (no corrector)")
    ours = path.scheduler

    class Adapter(ConvexScheduler):
        """kappa_t of the dfm_core scheduler as flow_matching's alpha_t (sigma_t = 1 - kappa_t)."""

        def __call__(self, t: Tensor) -> SchedulerOutput:
            k, dk = ours.kappa(t), ours.d_kappa(t)
            return SchedulerOutput(alpha_t=k, sigma_t=1 - k, d_alpha_t=dk, d_sigma_t=-dk)

        def kappa_inverse(self, kappa: Tensor) -> Tensor:
            return ours.t_of_kappa(kappa)

    class ProbWrapper(ModelWrapper):
        def __init__(self) -> None:
            super().__init__(None)

        def forward(self, x: Tensor, t: Tensor, **extras) -> Tensor:
            return posterior_probs(model(x, t), temperature, allowed, dtype=torch.float32)

    if allowed is not None and allowed.ndim == 2:
        allowed = allowed.unsqueeze(0).expand(x0.shape[0], -1, -1)
    if generator is not None:  # flow_matching draws from the global RNG
        torch.manual_seed(generator.initial_seed())
    if time_grid is None:
        time_grid = torch.linspace(0.0, 1.0, steps + 1)
    solver = MixtureDiscreteEulerSolver(
        model=ProbWrapper(), path=MixtureDiscreteProbPath(Adapter()), vocabulary_size=path.vocab_size
    )
    x = solver.sample(
        x_init=x0,
        step_size=None,
        time_grid=time_grid.to(x0.device, torch.float32),
        dtype_categorical=torch.float64 if float64 else torch.float32,
    )
    if clamp_mask is not None:
        x = torch.where(clamp_mask, clamp_values, x)
    return SampleResult(tokens=x)


@contextlib.contextmanager
def instrumented(device: torch.device, sampler: str, workers: int = 0):
    """Patch generate's sampler choice and time sample_tokens / _decode_and_write; yields the timer dict."""
    import matgen.generate as mg
    import matgen.sampling as ms

    timers = {"sampling": 0.0, "decode": 0.0, "sampling_cpu": 0.0, "decode_cpu": 0.0}
    orig_sample_tokens = mg.CrystalGenerator.sample_tokens
    orig_decode = mg._decode_and_write
    orig_sample = ms.sample

    def sample_tokens(self, *a, **k):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        out = orig_sample_tokens(self, *a, **k)
        sync(device)
        timers["sampling"] += time.perf_counter() - t0
        timers["sampling_cpu"] += time.process_time() - c0
        return out

    def decode_and_write(*a, **k):
        t0, c0 = time.perf_counter(), time.process_time()
        out = orig_decode(*a, **k)
        timers["decode"] += time.perf_counter() - t0
        timers["decode_cpu"] += time.process_time() - c0
        return out

    mg.CrystalGenerator.sample_tokens = sample_tokens
    if workers == 0:  # worker processes must get the module's own (picklable) function
        mg._decode_and_write = decode_and_write
    if sampler == "flow_matching":
        ms.sample = flow_matching_sample
    try:
        yield timers
    finally:
        mg.CrystalGenerator.sample_tokens = orig_sample_tokens
        mg._decode_and_write = orig_decode
        ms.sample = orig_sample


def run_once(
    sampler: str, args, checkpoint: Path, out_dir: Path, device: torch.device, n: int, steps: int
) -> dict:
    from matgen.generate import generate

    with instrumented(device, sampler, args.workers) as timers:
        t0, c0 = time.perf_counter(), time.process_time()
        summary = generate(
            n,
            out_dir,
            checkpoint=checkpoint,
            steps=steps,
            temperature=args.temperature,
            seed=args.seed,
            batch_size=args.batch_size,
            device=str(device),
            num_atoms=args.num_atoms,
            overwrite=True,
            progress=False,
            workers=args.workers,
            resample_collisions=args.resample_collisions,
        )
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    loop = summary.seconds  # generate's own clock: the batch loop, after loading the checkpoint
    cifs = len(list(out_dir.glob("crystal_*.cif")))
    return {
        "sampler": sampler,
        "wall_s": wall,
        "loop_s": loop,
        "sampling_s": timers["sampling"],
        "decode_s": timers["decode"],
        "write_s": loop - timers["sampling"] - timers["decode"],
        "load_s": wall - loop,
        "cpu_s": cpu,
        "sampling_cpu_s": timers["sampling_cpu"],
        "decode_cpu_s": timers["decode_cpu"],
        "written": summary.written,
        "failed": summary.failed,
        "cif_files": cifs,
        "crystals_per_s": n / loop,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="crystals to generate")
    parser.add_argument("--steps", type=int, default=20, help="NFE")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--size", choices=SIZES, default="small", help="random checkpoint size")
    parser.add_argument("--num-atoms", type=int, default=None, help="fix the atom count")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on CPU (0: leave)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the pipeline with flow_matching's solver (same run, interleaved)",
    )
    parser.add_argument("--out-dir", default=None, help="where CIFs go (default: a temp dir, removed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="decode/write processes, as `matgen generate --workers` (decode s is then not measured)",
    )
    parser.add_argument("--resample-collisions", type=int, default=0, help="as `matgen generate`")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import warnings

    from matgen.sampling import DEFAULT_CHECKPOINT

    warnings.filterwarnings("ignore")  # pymatgen's electronegativity warnings for noble gases

    device = torch.device(args.device)
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads() if device.type == "cpu" else None

    with tempfile.TemporaryDirectory(prefix="bench_generate_") as tmp:
        tmp = Path(tmp)
        if args.checkpoint:
            checkpoint, ckpt_desc = Path(args.checkpoint), args.checkpoint
        elif DEFAULT_CHECKPOINT.is_file():
            checkpoint, ckpt_desc = DEFAULT_CHECKPOINT, f"shipped {DEFAULT_CHECKPOINT.name}"
        else:
            checkpoint = build_random_checkpoint(tmp / "random.safetensors", args.size, args.seed)
            ckpt_desc = f"random-weight AtomPoolingDiT[{args.size}] (shipped checkpoint absent)"
        from dfm_core.checkpoints import load_safetensors

        _, meta_ckpt = load_safetensors(checkpoint)
        base = Path(args.out_dir) if args.out_dir else tmp
        samplers = ["dfm_core"] + (["flow_matching"] if args.reference else [])

        for s in samplers:  # warm-up (excluded): imports, allocator, first pymatgen calls
            run_once(s, args, checkpoint, base / f"warmup_{s}", device, min(args.n, args.batch_size, 8), 2)
        runs: dict[str, list[dict]] = {s: [] for s in samplers}
        for _ in range(args.repeats):
            for s in samplers:
                runs[s].append(run_once(s, args, checkpoint, base / s, device, args.n, args.steps))

    rows = []
    for s, rs in runs.items():
        med = {
            k: statistics.median(r[k] for r in rs)
            for k in (
                "wall_s",
                "loop_s",
                "sampling_s",
                "decode_s",
                "write_s",
                "load_s",
                "cpu_s",
                "sampling_cpu_s",
                "decode_cpu_s",
            )
        }
        med["crystals_per_s"] = args.n / med["loop_s"]
        rows.append(
            {
                "sampler": s,
                **med,
                "written": rs[-1]["written"],
                "failed": rs[-1]["failed"],
                "cif_files": rs[-1]["cif_files"],
                "runs": rs,
            }
        )
    meta = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_description(device, threads),
        "torch": torch.__version__,
        "flow_matching": _version("flow_matching"),
        "checkpoint": ckpt_desc,
        "parameters": meta_ckpt.get("parameters"),
        "scheduler": meta_ckpt.get("scheduler"),
        "n": args.n,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "num_atoms": args.num_atoms,
        "temperature": args.temperature,
        "repeats": args.repeats,
        "workers": args.workers,
        "resample_collisions": args.resample_collisions,
    }
    print_report(meta, rows)
    out = {"meta": meta, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


def print_report(meta: dict, rows: list[dict]) -> None:
    print(f"# {meta['command']}")
    print(
        f"# {meta['date']} | {meta['machine']} | torch {meta['torch']} | flow_matching {meta['flow_matching']}"
    )
    params = f"{meta['parameters'] / 1e6:.2f}M params, " if meta.get("parameters") else ""
    print(
        f"# checkpoint: {meta['checkpoint']} ({params}scheduler {meta['scheduler']}); n={meta['n']}, "
        f"NFE {meta['steps']}, batch {meta['batch_size']}, num_atoms={meta['num_atoms'] or 'drawn'}, "
        f"T={meta['temperature']:g}, median of {meta['repeats']}"
    )
    hdr = (
        f"{'sampler':<14} {'crystals/s':>10} {'loop s':>8} {'sampling s':>11} {'decode s':>9} "
        f"{'sync+csv s':>10} {'load s':>7} {'written':>8} {'failed':>7}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(
            f"{r['sampler']:<14} {r['crystals_per_s']:>10.2f} {r['loop_s']:>8.2f} {r['sampling_s']:>11.2f} "
            f"{r['decode_s']:>9.2f} {r['write_s']:>10.2f} {r['load_s']:>7.2f} {r['written']:>8} {r['failed']:>7}"
        )
    print("process CPU time (not inflated by other jobs on a shared CPU; excludes I/O waits):")
    for r in rows:
        after = r["decode_s"] + r["write_s"]
        per_cif = f"{after / r['written'] * 1e3:.2f} ms" if r["written"] else "n/a"
        print(
            f"  {r['sampler']:<14} sampling {r['sampling_cpu_s']:.2f} s | decode {r['decode_cpu_s']:.2f} s | "
            f"whole call {r['cpu_s']:.2f} s | wall after sampling per written crystal {per_cif}"
        )
    if len(rows) == 2:
        a, b = rows
        print(
            f"ratio dfm_core/flow_matching (time; < 1: dfm_core faster): loop {a['loop_s'] / b['loop_s']:.3f} | "
            f"sampling {a['sampling_s'] / b['sampling_s']:.3f} | "
            f"sampling CPU time {a['sampling_cpu_s'] / b['sampling_cpu_s']:.3f}"
        )


if __name__ == "__main__":
    main()
