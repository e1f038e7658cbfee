"""What `matgen generate` does after sampling, per crystal: decode tokens, check for two atoms on one site,
write the CIF. This project's path (`matgen.generate._decode_and_write`: tokenizer parts + `matgen.cif.p1_cif`)
against the pymatgen path it replaced (decode to a `Structure`, `distance_matrix`, `Structure.to(fmt="cif")`),
on the same token rows in the same run; both write the same bytes (checked here on every crystal).

Token rows come from MP-20 test crystals (or a folder of CIFs) with the atoms of each crystal shuffled, as a
sampler emits them, and a share of rows given a second atom on an existing site (the generator's main
failure, 28 % at NFE 500), padded to one (B, L) array.

    python benchmarks/bench_decode_write.py --n 10000 --repeats 3
    python benchmarks/bench_decode_write.py --cifs path/to/cifs --n 2000
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pymatgen.core import Structure

from dfm_core.atomic_io import atomic_write_text
from matgen import tokenizer as tok
from matgen.cif import _formula_fields_of
from matgen.data import load_structures
from matgen.generate import COINCIDENT_TOLERANCE, _decode_and_write


def pymatgen_decode_and_write(tokens: np.ndarray, out_dir: str) -> list[dict[str, Any]]:
    """The reference: what `matgen generate` did per crystal up to commit 5f454ab."""
    cif_tok = tok.CrystalTokenizer()
    rows = []
    for j, seq in enumerate(tokens):
        row: dict[str, Any] = {"id": f"crystal_{j:06d}", "file": "", "error": ""}
        structure, reason = cif_tok.try_decode(seq)
        if structure is not None and len(structure) > 1:
            d = structure.distance_matrix
            d[range(len(structure)), range(len(structure))] = np.inf
            if d.min() < COINCIDENT_TOLERANCE:
                structure, reason = None, "same site"
        if structure is None:
            row["error"] = reason
        else:
            row["file"] = f"crystal_{j:06d}.cif"
            atomic_write_text(Path(out_dir) / row["file"], structure.to(fmt="cif"), durable=False)
            row["formula"] = structure.composition.reduced_formula
        rows.append(row)
    return rows


def token_rows(structures: list[Structure], n: int, collide: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cif_tok = tok.CrystalTokenizer()
    seqs = []
    for i in range(n):
        seq = cif_tok.encode(structures[i % len(structures)]).numpy()
        atoms = seq[6:].reshape(-1, 4)[rng.permutation((len(seq) - 6) // 4)]
        if len(atoms) > 1 and rng.random() < collide:
            atoms[1, 1:] = atoms[0, 1:]
        seqs.append(np.concatenate([seq[:6], atoms.reshape(-1)]))
    width = max(len(s) for s in seqs)
    out = np.full((n, width), tok.PAD_ID, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10000, help="token rows (crystals)")
    parser.add_argument("--cifs", type=Path, default=None, help="folder of CIFs (default: MP-20 test)")
    parser.add_argument("--data-dir", default=None, help="MP-20 folder (default: MATGEN_DATA / the cache)")
    parser.add_argument("--collide", type=float, default=0.28, help="share of rows with a same-site atom")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if args.cifs is not None:
            structures = [Structure.from_file(p) for p in sorted(args.cifs.glob("*.cif"))[: args.n]]
        else:
            structures = load_structures("test", data_dir=args.data_dir, limit=args.n, progress=False)[1]
    if not structures:
        raise SystemExit("no structures to encode")
    tokens = token_rows(structures, args.n, args.collide, seed=0)
    scratch = Path(tempfile.mkdtemp(dir=args.out))
    print(
        f"# {datetime.now(UTC).isoformat(timespec='seconds')} | {platform.processor() or platform.machine()}"
        f" | {args.n} rows from {len(structures)} crystals, {args.collide:.0%} with a same-site atom"
        f" | scratch {scratch}"
    )
    paths = {
        "pymatgen Structure + to(cif)": lambda d: pymatgen_decode_and_write(tokens, d),
        "decode_parts + p1_cif": lambda d: _decode_and_write(tokens, 0, 0, "crystal", "none", d),
    }
    times: dict[str, list[float]] = {name: [] for name in paths}
    written: dict[str, int] = {}
    try:
        for r in range(args.repeats):  # interleaved
            for k, (name, run) in enumerate(paths.items()):
                folder = scratch / f"{r}_{k}"
                folder.mkdir()
                _formula_fields_of.cache_clear()  # every repeat starts cold, as a fresh run does
                start = time.perf_counter()
                rows = run(str(folder))
                os.sync()
                times[name].append(time.perf_counter() - start)
                written[name] = sum(1 for row in rows if row["file"])
        ref_dir, new_dir = scratch / "0_0", scratch / "0_1"
        ref_files = sorted(p.name for p in ref_dir.glob("*.cif"))
        same = ref_files == sorted(p.name for p in new_dir.glob("*.cif")) and all(
            (ref_dir / f).read_bytes() == (new_dir / f).read_bytes() for f in ref_files
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"identical CIF files: {same} ({len(ref_files)} written of {args.n})")
    ref = statistics.median(times["pymatgen Structure + to(cif)"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"{name:30s} {med:7.3f} s  {med / args.n * 1e3:6.3f} ms/row  written {written[name]}"
            f"  ratio {med / ref:.3f}"
        )
    if not same:
        raise SystemExit("the two paths wrote different files")


if __name__ == "__main__":
    main()
