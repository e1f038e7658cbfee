"""Writing generated CIFs: per-file fsync (the reference, what `matgen generate` did first) against one
`os.sync()` per batch, through the generic callback writer (`atomic_write`, what `atomic_write_text` was up
to commit 0c4247f) and through the lean `atomic_write_text` (create, write, close, rename). All rename a temp
file onto the target, so none leaves a half-written CIF when the process is killed.

    python benchmarks/bench_cif_write.py --cifs path/to/cifs --n 2000 --repeats 3
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

from dfm_core.atomic_io import atomic_write, atomic_write_text


def callback_write_text(path: Path, text: str, durable: bool) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), durable=durable)


def lean_write_text(path: Path, text: str, durable: bool) -> None:
    atomic_write_text(path, text, durable=durable)


def write_batch(texts: list[str], folder: Path, durable: bool, write=lean_write_text) -> float:
    folder.mkdir(parents=True)
    start = time.perf_counter()
    for i, text in enumerate(texts):
        write(folder / f"crystal_{i:06d}.cif", text, durable)
    if not durable:
        os.sync()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cifs", type=Path, required=True, help="folder of CIFs to write again")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        texts = [p.read_text() for p in sorted(args.cifs.glob("*.cif"))[: args.n]]
    if not texts:
        raise SystemExit(f"no .cif files in {args.cifs}")
    scratch = Path(tempfile.mkdtemp(dir=args.out))
    print(
        f"# {datetime.now(UTC).isoformat(timespec='seconds')} | {platform.processor() or platform.machine()}"
        f" | {len(texts)} CIFs | scratch {scratch}"
    )
    variants = {
        "fsync per file": (True, callback_write_text),
        "one sync, callback writer": (False, callback_write_text),
        "one sync, lean writer": (False, lean_write_text),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for r in range(args.repeats):  # interleaved
            for k, (name, (durable, write)) in enumerate(variants.items()):
                times[name].append(write_batch(texts, scratch / f"{r}_{k}", durable, write))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    ref = statistics.median(times["fsync per file"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:26s} {med:7.3f} s  {med / len(texts) * 1e3:6.3f} ms/CIF  ratio {med / ref:.3f}")


if __name__ == "__main__":
    main()
