"""E_hull reference speed: this project's linear-program hull vs a pymatgen PhaseDiagram per system.

For each element count k, draws compositions of k elements from the reference data's common elements and
times ``FormationEnergyHull.hull_formation_energy_per_atom`` (LP, fresh cache per composition) against
building a pymatgen ``PhaseDiagram`` of the same candidate entries and calling
``get_hull_energy_per_atom`` (the previous implementation), run in a child process with a time cap.
Prints one row per k with both times, their ratio and the largest disagreement.

    OMP_NUM_THREADS=1 python benchmarks/bench_hull.py --hull ../shared/data/mp_hull --ks 2 3 4 5 6 8 10 --per-k 5
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import time
import warnings

import numpy as np


def _phase_diagram_hull(
    fractions: np.ndarray, energies: np.ndarray, elements: tuple, target: dict, q
) -> None:
    from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
    from pymatgen.core import Composition

    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    entries = [
        PDEntry(Composition({el: x for el, x in zip(elements, row, strict=True) if x > 0}), e)
        for row, e in zip(fractions, energies, strict=True)
    ]
    value = PhaseDiagram(entries).get_hull_energy_per_atom(Composition(target))
    q.put((time.perf_counter() - t0, float(value)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hull", default="../shared/data/mp_hull")
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 3, 4, 5, 6, 8, 10])
    parser.add_argument("--per-k", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=120.0, help="cap per PhaseDiagram build (s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import platform
    import subprocess
    import sys

    import pymatgen.core
    import scipy
    from pymatgen.core import Composition

    from matgen.evaluate.hull import FormationEnergyHull, load_hull

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model = next(
        (ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?"
    )
    print("command: python " + " ".join(sys.argv))
    print(
        f"machine: {model}; Python {platform.python_version()}, scipy {scipy.__version__}, pymatgen "
        f"{pymatgen.core.__version__}; clock: wall, one process each"
    )
    hull = load_hull(args.hull)
    assert isinstance(hull, FormationEnergyHull)
    counts: dict[str, int] = {}
    for system, rows in hull._raw.items():
        for el in system:
            counts[el] = counts.get(el, 0) + len(rows)
    common = sorted(counts, key=counts.get, reverse=True)[:40]
    rng = random.Random(args.seed)
    ctx = mp.get_context("spawn")
    print(f"{'k':>3} {'entries':>8} {'LP ms':>9} {'PhaseDiagram ms':>16} {'PD/LP':>8} {'max |diff|':>11}")
    for k in args.ks:
        lp_t, pd_t, sizes, diffs, timeouts = [], [], [], [], 0
        for _ in range(args.per_k):
            elements = tuple(sorted(rng.sample(common, k)))
            target = {el: rng.randint(1, 4) for el in elements}
            hull._cache.clear()
            t0 = time.perf_counter()
            lp = hull.hull_formation_energy_per_atom(Composition(target))
            lp_t.append(time.perf_counter() - t0)
            fractions, energies = hull._system(elements)
            sizes.append(len(energies))
            q = ctx.Queue()
            proc = ctx.Process(target=_phase_diagram_hull, args=(fractions, energies, elements, target, q))
            proc.start()
            proc.join(args.timeout)
            if proc.is_alive():
                proc.kill()
                timeouts += 1
                pd_t.append(args.timeout)
                continue
            seconds, value = q.get()
            pd_t.append(seconds)
            diffs.append(abs(value - lp))
        pd_ms = 1e3 * float(np.mean(pd_t))
        note = f" ({timeouts} hit the {args.timeout:.0f} s cap)" if timeouts else ""
        print(
            f"{k:>3} {np.mean(sizes):>8.0f} {1e3 * np.mean(lp_t):>9.1f} {pd_ms:>16.1f} "
            f"{pd_ms / (1e3 * np.mean(lp_t)):>8.1f} {max(diffs, default=float('nan')):>11.1e}{note}"
        )


if __name__ == "__main__":
    main()
