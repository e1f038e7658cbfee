"""Batched CHGNet relaxation (matgen.evaluate.relax) vs chgnet's own StructOptimizer, on the same crystals.

Both run FIRE + FrechetCellFilter with fmax 0.1 eV/A and a 500-step cap. Reports the final energy per atom
of each crystal from both, their difference, steps, and wall time per crystal.

    OMP_NUM_THREADS=1 python benchmarks/relax_vs_chgnet.py --n 6 --device cpu
    python benchmarks/relax_vs_chgnet.py --n 256 --device cuda --skip-reference   # throughput only

Crystals: the first ``--n`` MP-20 test crystals with at most ``--max-atoms`` atoms, each strained by up to
``--strain`` per axis and rattled by ``--rattle`` A (seeded) so that the relaxation has work to do.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time
import warnings

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--max-atoms", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--fmax", type=float, default=0.1)
    parser.add_argument("--batch-atoms", type=int, default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strain", type=float, default=0.03, help="max |strain| per axis")
    parser.add_argument("--rattle", type=float, default=0.1, help="std of the displacement (A)")
    parser.add_argument("--skip-reference", action="store_true", help="time the batched relaxer only")
    args = parser.parse_args()

    import torch
    from pymatgen.core import Structure

    from matgen.data import load_split
    from matgen.evaluate.inputs import parse_cif
    from matgen.evaluate.relax import CHGNetBatchPotential, relax_structures

    warnings.filterwarnings("ignore")
    if args.device == "cpu":
        torch.set_num_threads(1)
    frame = load_split("test", args.data_dir, limit=max(20 * args.n, 200))
    rng = np.random.default_rng(args.seed)
    structures, ids = [], []
    for material_id, cif in zip(frame["material_id"], frame["cif"], strict=True):
        s = parse_cif(cif)
        if len(s) > args.max_atoms:
            continue
        s.apply_strain(rng.uniform(-args.strain, args.strain, 3).tolist())
        s = Structure(
            s.lattice,
            s.species,
            s.cart_coords + rng.normal(0, args.rattle, (len(s), 3)),
            coords_are_cartesian=True,
        )
        structures.append(s)
        ids.append(material_id)
        if len(structures) == args.n:
            break

    pot = CHGNetBatchPotential(device=args.device)
    pot.predict_structures(structures[:1])  # warm-up
    t0 = time.perf_counter()
    ours = relax_structures(
        structures,
        potential=pot,
        fmax=args.fmax,
        steps=args.steps,
        batch_atoms=args.batch_atoms,
        progress=False,
    )
    if pot.device.type == "cuda":
        torch.cuda.synchronize()
    t_ours = time.perf_counter() - t0
    print(
        f"batched: {len(structures)} crystals, {sum(map(len, structures))} atoms, {t_ours:.1f} s "
        f"({t_ours / len(structures):.2f} s/crystal) on {pot.device}"
    )
    if args.skip_reference:
        return

    from chgnet.model import StructOptimizer

    opt = StructOptimizer(model=pot.model, use_device=args.device)
    ref_e, ref_steps = [], []
    t0 = time.perf_counter()
    for s in structures:
        with contextlib.redirect_stdout(io.StringIO()):
            out = opt.relax(s.copy(), fmax=args.fmax, steps=args.steps, verbose=False)
        traj = out["trajectory"]
        ref_e.append(traj.energies[-1] / len(s))
        ref_steps.append(len(traj.energies) - 2)
    t_ref = time.perf_counter() - t0
    print(f"StructOptimizer: {t_ref:.1f} s ({t_ref / len(structures):.2f} s/crystal)")
    print(f"{'id':>12} {'n':>3} {'E_batched':>10} {'E_ref':>10} {'diff':>9} {'steps':>6} {'ref':>5}")
    diffs = []
    for mid, s, r, e, n in zip(ids, structures, ours, ref_e, ref_steps, strict=True):
        d = r.energy_per_atom - e
        diffs.append(abs(d))
        print(f"{mid:>12} {len(s):>3} {r.energy_per_atom:10.4f} {e:10.4f} {d:+9.1e} {r.n_steps:>6} {n:>5}")
    print(f"max |dE| = {max(diffs):.1e} eV/atom, mean |dE| = {np.mean(diffs):.1e} eV/atom")


if __name__ == "__main__":
    main()
