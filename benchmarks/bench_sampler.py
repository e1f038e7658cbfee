"""dfm_core.sampler.sample vs flow_matching's MixtureDiscreteEulerSolver on the same model and path.

Both samplers run the same matgen ``AtomPoolingDiT`` (random weights), the same mask mixture path with
the same polynomial scheduler, the same NFE, batch and temperature, and the same per-slot token
constraints (``CrystalTokenizer.allowed_token_mask``; padded slots allow only PAD):

* ours:   ``dfm_core.sampler.sample(model_fn, MixturePath(mask_source, PolynomialScheduler(n)), x0,
          steps, allowed=..., clamp_mask=padding, clamp_values=PAD, float64=...)``, model_fn -> logits;
* theirs: ``MixtureDiscreteEulerSolver(wrapper, MixtureDiscreteProbPath(PolynomialConvexScheduler(n)), V)
          .sample(x0, step_size=None, time_grid=linspace(0, 1, steps + 1), dtype_categorical=...,
          num_atoms=...)``; the wrapper returns probabilities (their API) = softmax of the same masked,
          temperature-scaled logits that ours computes inside the sampler.

Scheduler parameterisation: dfm_core's ``PolynomialScheduler(n)`` gives ``kappa_t = t^n`` (weight of x1);
flow_matching's ``PolynomialConvexScheduler(n)`` gives ``alpha_t = t^n`` (= kappa_t, weight of x1) and
``sigma_t = 1 - t^n`` (the probability of still being at the source). n = 1 is also flow_matching's
``CondOTScheduler`` and dfm_core's ``LinearScheduler``.

Reported per library (warm-up runs excluded, median over ``--repeats`` interleaved repeats), in seconds
of the ``--clock``: wall time, or (the default for ``--device cpu --threads 1``) process CPU time, which
other jobs time-slicing a shared machine do not inflate:

* ``run_s``: one full sampling run of ``--steps`` NFE;
* ``step_s``: ``run_s / steps``;
* ``one_step_s``: median wall time of one intermediate step (model call to next model call, i.e. one
  forward plus one sampler update) over all steps of all repeats. On CPU the timestamps are taken in
  the timed runs themselves; on CUDA in a separate instrumented run per repeat (one sync per step);
* ``overhead_step_s``: ``(run_s - steps * forward_s) / steps``, time per step beyond the DiT forward
  (forward_s: the median time of one plain DiT forward at the same batch, timed in the same run);
* ``cached_overhead_step_s``: per-step time of a run whose "model" returns precomputed logits, i.e.
  the sampler's own cost measured directly (softmax/masking included for both);
* ratio ours / theirs for each.

    OMP_NUM_THREADS=1 python benchmarks/bench_sampler.py --size small --batch 64 --atoms 20 --steps 50
    python benchmarks/bench_sampler.py --device cuda --size default --batch 10000 --steps 500 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor

SIZES = ("tiny", "small", "default")


def machine_description(device: torch.device, threads: int | None) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    name = platform.processor() or "cpu"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {threads or torch.get_num_threads()} thread(s)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# The clock of every figure: wall time (perf_counter), or, for single-threaded CPU runs on a shared
# machine, the process CPU time (process_time), which time-slicing by other jobs does not inflate.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


def set_clock(name: str, device: torch.device, threads: int | None) -> str:
    """``auto``: CPU time for a 1-thread CPU run, wall time otherwise (always wall on CUDA)."""
    global clock
    if name == "auto":
        name = "cpu" if device.type == "cpu" and threads == 1 else "wall"
    if name == "cpu" and device.type != "cpu":
        raise ValueError("--clock cpu only makes sense for --device cpu")
    clock = CLOCKS[name]
    return name


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    sync(device)
    t0 = clock()
    out = fn()
    sync(device)
    return clock() - t0, out


def randomize_zero_init(model: torch.nn.Module, seed: int) -> None:
    """adaLN-Zero leaves the blocks as identities and the logits at zero: give those weights random values
    so that the network computes something non-trivial (timing is the same either way)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def build_crystal_model(size: str, seed: int):
    from matgen.model import AtomPoolingDiT, CrystalDiTConfig

    torch.manual_seed(seed)
    cfg = {"tiny": CrystalDiTConfig.tiny, "small": CrystalDiTConfig.small, "default": CrystalDiTConfig}[
        size
    ]()
    model = AtomPoolingDiT(cfg)
    randomize_zero_init(model, seed)
    return model.eval()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="small", help="CrystalDiTConfig preset")
    parser.add_argument("--batch", type=int, default=64, help="crystals per batch")
    parser.add_argument("--atoms", type=int, default=20, help="atoms per crystal (padded length 6 + 4A)")
    parser.add_argument(
        "--mixed-atoms",
        action="store_true",
        help="atom counts cycle through 1..atoms (padding exercised) instead of all = atoms",
    )
    parser.add_argument("--steps", type=int, default=50, help="NFE of a full run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs of each variant")
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=5,
        help="NFE of a warm-up run (enough to trigger lazy init / compilation)",
    )
    parser.add_argument("--libs", default="dfm_core,flow_matching", help="which samplers to run")
    parser.add_argument(
        "--cached",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time runs with cached logits (the samplers' own cost)",
    )
    parser.add_argument(
        "--step-clock",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on CUDA: an extra instrumented run per repeat for the one-step time",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on CPU (0: leave)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--poly-n", type=float, default=1.0, help="kappa_t = t^n for both libraries")
    parser.add_argument(
        "--amp",
        choices=("auto", "bf16", "off"),
        default="auto",
        help="bf16 autocast of the model (auto: on for cuda, as matgen.generate does)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (both libraries)")
    parser.add_argument(
        "--dtypes",
        default="float64,float32",
        help="categorical precisions to run (ours: float64=True/False; theirs: dtype_categorical)",
    )
    parser.add_argument(
        "--clock",
        choices=("auto", "wall", "cpu"),
        default="auto",
        help="auto: process CPU time for 1-thread CPU runs (robust to other jobs), else wall",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    from flow_matching.path import MixtureDiscreteProbPath
    from flow_matching.path.scheduler import PolynomialConvexScheduler
    from flow_matching.solver import MixtureDiscreteEulerSolver
    from flow_matching.utils import ModelWrapper

    from dfm_core.nn import count_parameters
    from dfm_core.paths import MixturePath
    from dfm_core.sampler import posterior_probs, sample
    from dfm_core.schedulers import PolynomialScheduler
    from dfm_core.sources import mask_source
    from matgen import tokenizer as tok
    from matgen.model import token_valid_mask

    device = torch.device(args.device)
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads() if device.type == "cpu" else None
    clock_name = set_clock(args.clock, device, threads)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in ("float64", "float32"):
            parser.error(f"--dtypes: unknown {d!r}")

    model = build_crystal_model(args.size, args.seed).to(device)
    n_params = count_parameters(model)
    net = torch.compile(model) if args.compile else model
    use_bf16 = args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda")

    B, A = args.batch, args.atoms
    if args.mixed_atoms:
        num_atoms = (torch.arange(B) % A + 1).to(device)
    else:
        num_atoms = torch.full((B,), A, dtype=torch.long, device=device)
    L = 6 + 4 * A
    V = tok.VOCAB_SIZE
    valid = token_valid_mask(num_atoms, L)
    allowed = tok.CrystalTokenizer().allowed_token_mask(num_atoms.cpu(), A).to(device)
    x0 = torch.full((B, L), tok.PAD_ID, dtype=torch.long, device=device)
    x0[valid] = tok.MASK_ID
    temperature = args.temperature

    def logits_fn(x: Tensor, t: Tensor) -> Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            return net(x, t, num_atoms).float()

    # --- the two samplers -------------------------------------------------------------------------
    our_path = MixturePath(mask_source(V, tok.MASK_ID), PolynomialScheduler(args.poly_n))
    fm_path = MixtureDiscreteProbPath(PolynomialConvexScheduler(args.poly_n))

    class ProbWrapper(ModelWrapper):
        """flow_matching's model API: model(x=, t=, **extras) -> posterior probabilities (..., V)."""

        def __init__(self, fn: Callable[[Tensor, Tensor], Tensor]) -> None:
            super().__init__(None)
            self.fn = fn

        def forward(self, x: Tensor, t: Tensor, **extras) -> Tensor:
            return posterior_probs(self.fn(x, t), temperature, allowed, dtype=torch.float32)

    def run_ours(fn: Callable[[Tensor, Tensor], Tensor], dtype: str, steps: int = args.steps) -> Tensor:
        g = torch.Generator(device=device).manual_seed(args.seed)
        return sample(
            fn,
            our_path,
            x0,
            steps=steps,
            temperature=temperature,
            allowed=allowed,
            clamp_mask=~valid,
            clamp_values=x0,
            float64=(dtype == "float64"),
            generator=g,
        ).tokens

    def run_theirs(fn: Callable[[Tensor, Tensor], Tensor], dtype: str, steps: int = args.steps) -> Tensor:
        torch.manual_seed(args.seed)
        solver = MixtureDiscreteEulerSolver(model=ProbWrapper(fn), path=fm_path, vocabulary_size=V)
        grid = torch.linspace(0.0, 1.0, steps + 1, device=device)
        return solver.sample(
            x_init=x0,
            step_size=None,
            time_grid=grid,
            dtype_categorical=getattr(torch, dtype),
            num_atoms=num_atoms,
        )

    def check(tokens: Tensor, label: str) -> dict:
        masked = int((tokens == tok.MASK_ID).sum())
        pad_ok = bool((tokens[~valid] == tok.PAD_ID).all())
        in_allowed = bool(allowed.gather(-1, tokens.unsqueeze(-1)).all())
        ok = masked == 0 and pad_ok and in_allowed and tokens.shape == x0.shape
        if not ok:
            print(
                f"WARNING {label}: MASK left={masked}, padding intact={pad_ok}, all allowed={in_allowed}",
                file=sys.stderr,
            )
        return {"mask_left": masked, "padding_intact": pad_ok, "all_tokens_allowed": in_allowed, "ok": ok}

    libs = [x.strip() for x in args.libs.split(",") if x.strip()]
    runners = {"dfm_core": run_ours, "flow_matching": run_theirs}
    if not libs or any(x not in runners for x in libs):
        parser.error(f"--libs: choose from {sorted(runners)}")
    variants = [(lib, d, runners[lib]) for d in dtypes for lib in libs]

    # --- plain forward, cached-logits model, instrumented runs --------------------------------------
    grid = torch.linspace(0.0, 1.0, args.steps + 1, device=device)
    t_batches = [grid[k].expand(B) for k in range(args.steps)]

    def forward_once(k: int = args.steps // 2) -> Tensor:
        with torch.no_grad():
            return logits_fn(x0, t_batches[k])

    with torch.no_grad():
        cached = logits_fn(x0, t_batches[args.steps // 2]).clone()

    def cached_fn(x: Tensor, t: Tensor) -> Tensor:
        return cached

    class StepClock:
        """Wraps a model fn; records the (synchronised) time of every call: consecutive entries bracket
        exactly one sampler step (model + update)."""

        def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], sync_on_entry: bool) -> None:
            self.fn, self.entries, self.sync_on_entry = fn, [], sync_on_entry

        def __call__(self, x: Tensor, t: Tensor) -> Tensor:
            if self.sync_on_entry:
                sync(device)
            self.entries.append(clock())
            return self.fn(x, t)

    # warm-up (excluded): forward, every variant with the model and with cached logits
    for _ in range(max(args.warmup, 0)):
        forward_once()
        for _, d, runner in variants:
            runner(logits_fn, d, steps=min(args.warmup_steps, args.steps))
            if args.cached:
                runner(cached_fn, d, steps=min(args.warmup_steps, args.steps))

    fwd_times: list[float] = []
    results = {(lib, d): {"run": [], "cached": [], "one_step": [], "checks": []} for lib, d, _ in variants}

    def measure(lib: str, d: str, runner: Callable[..., Tensor]) -> None:
        for k in range(2):
            fwd_times.append(timed(lambda k=k: forward_once(k), device)[0])
        r = results[(lib, d)]
        # On CPU every op is synchronous, so the step clock rides along in the timed run at the cost of
        # one clock read per step; on CUDA it syncs, so it gets a run of its own.
        step_clock = StepClock(logits_fn, sync_on_entry=device.type == "cuda")
        secs, out = timed(lambda: runner(logits_fn if device.type == "cuda" else step_clock, d), device)
        r["run"].append(secs)
        r["checks"].append(check(out, f"{lib}/{d}"))
        if args.cached:
            r["cached"].append(timed(lambda: runner(cached_fn, d), device)[0])
        if device.type == "cuda" and args.step_clock:
            timed(lambda: runner(step_clock, d), device)
        # entries k -> k+1 bracket step k; the last (exact) step has no successor and is left out
        e = step_clock.entries
        r["one_step"] += [b - a for a, b in zip(e[:-1], e[1:], strict=True)]

    for _ in range(args.repeats):
        # interleave everything so that load drift on a shared machine hits all variants alike
        for lib, d, runner in variants:
            measure(lib, d, runner)
    peak_mem = None
    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**30

    fwd = statistics.median(fwd_times)
    S = args.steps
    rows = []
    for (lib, d), r in results.items():
        run = statistics.median(r["run"])
        rows.append(
            {
                "library": lib,
                "categorical_dtype": d,
                "run_s": run,
                "step_s": run / S,
                "one_step_s": statistics.median(r["one_step"]) if r["one_step"] else float("nan"),
                "overhead_step_s": (run - S * fwd) / S,
                "cached_overhead_step_s": statistics.median(r["cached"]) / S if r["cached"] else float("nan"),
                "runs_s": r["run"],
                "outputs_ok": all(c["ok"] for c in r["checks"]),
                "mask_left": max(c["mask_left"] for c in r["checks"]),
            }
        )

    meta = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_description(device, threads),
        "torch": torch.__version__,
        "flow_matching": _version("flow_matching"),
        "device": str(device),
        "model": f"AtomPoolingDiT[{args.size}] {n_params / 1e6:.2f}M params (random weights)",
        "batch": B,
        "atoms": A,
        "mixed_atoms": args.mixed_atoms,
        "seq_len": L,
        "pooled_len": 6 + A,
        "vocab": V,
        "steps": S,
        "repeats": args.repeats,
        "temperature": temperature,
        "scheduler": f"kappa_t = t^{args.poly_n:g}",
        "amp_bf16": use_bf16,
        "compile": args.compile,
        "clock": clock_name,
        "forward_s": fwd,
        "peak_cuda_mem_gib": peak_mem,
    }
    print_report(meta, rows)
    out = {"meta": meta, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return "?"


def print_report(meta: dict, rows: list[dict]) -> None:
    print(f"# {meta['command']}")
    print(
        f"# {meta['date']} | {meta['machine']} | torch {meta['torch']} | flow_matching {meta['flow_matching']}"
    )
    print(
        f"# {meta['model']}, batch {meta['batch']} x {meta['seq_len']} tokens ({meta['pooled_len']} pooled),"
        f" V={meta['vocab']}, NFE {meta['steps']}, {meta['scheduler']}, T={meta['temperature']:g},"
        f" bf16={meta['amp_bf16']}, compile={meta['compile']}, median of {meta['repeats']},"
        f" clock={meta['clock']}"
    )
    print(
        f"# plain DiT forward: {meta['forward_s'] * 1e3:.2f} ms/call"
        + (f" | peak CUDA memory {meta['peak_cuda_mem_gib']:.2f} GiB" if meta["peak_cuda_mem_gib"] else "")
    )
    hdr = (
        f"{'library':<14} {'draws':<8} {'run s':>9} {'s/step':>9} {'one step s':>11} "
        f"{'overhead s/step':>16} {'cached-logits s/step':>21} {'ok':>3}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(
            f"{r['library']:<14} {r['categorical_dtype']:<8} {r['run_s']:>9.3f} {r['step_s']:>9.4f} "
            f"{r['one_step_s']:>11.4f} {r['overhead_step_s']:>16.4f} {r['cached_overhead_step_s']:>21.4f} "
            f"{'yes' if r['outputs_ok'] else 'NO':>3}"
        )
    by = {(r["library"], r["categorical_dtype"]): r for r in rows}
    print("ratio ours/theirs (< 1: dfm_core faster)")
    for (lib, d), r in by.items():
        if lib != "dfm_core" or ("flow_matching", d) not in by:
            continue
        o = by[("flow_matching", d)]
        print(
            f"  {d}: run {r['run_s'] / o['run_s']:.3f} | one step {_ratio(r['one_step_s'], o['one_step_s'])} | "
            f"overhead {_ratio(r['overhead_step_s'], o['overhead_step_s'])} | "
            f"cached-logits {_ratio(r['cached_overhead_step_s'], o['cached_overhead_step_s'])}"
        )
    if ("dfm_core", "float64") in by and ("flow_matching", "float32") in by:
        r, o = by[("dfm_core", "float64")], by[("flow_matching", "float32")]
        print(
            f"  each library's default (ours float64 draws, theirs dtype_categorical=float32): "
            f"run {r['run_s'] / o['run_s']:.3f} | "
            f"cached-logits {_ratio(r['cached_overhead_step_s'], o['cached_overhead_step_s'])}"
        )


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b > 0 and a == a else "n/a"


if __name__ == "__main__":
    main()
