"""Structure and composition fingerprints (CDVAE coverage features) and the cached MP-20 test reference.

Structure fingerprint
    matminer ``CrystalNNFingerprint.from_preset("ops")`` (61 local order-parameter features per site,
    Zimmermann & Jain 2020) averaged over all sites, as in CDVAE ``Crystal.get_fingerprints``. A crystal
    whose fingerprint raises gets ``None`` (CDVAE then marks it invalid and drops it from coverage).

Composition fingerprint
    matminer ``ElementProperty.from_preset("magpie", impute_nan=False)`` (22 elemental properties x 6
    statistics = 132 features, Ward et al. 2016); matminer >= 0.9 imputes missing elemental data by default,
    CDVAE's matminer did not, so imputation is switched off. Before distances the features are standardised
    with CDVAE's fixed ``CompScaler`` (:mod:`._cdvae_constants`), and NaN becomes 0 (``replace_nan_token``).

Reference set
    Fingerprints, densities, element counts and atom counts of the MP-20 test split, computed once and
    cached in ``<cache_dir>/mp20-test-reference-<sha of the split file>.npz`` (another data set's folder
    name replaces ``mp20``). CrystalNN costs ~0.25 s per crystal: ~40 CPU-minutes for all 9,046. The cache
    grows incrementally: a ``test_limit`` run fills in its seeded subset, a later full run computes only
    what is missing.
"""

from __future__ import annotations

import base64
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pymatgen.core import Composition, Structure

from dfm_core.atomic_io import atomic_write, file_sha256, user_cache_dir
from matgen.evaluate._cdvae_constants import COMP_SCALER_MEANS, COMP_SCALER_STDS

__all__ = [
    "ReferenceSet",
    "composition_fingerprint",
    "decode_array",
    "default_cache_dir",
    "encode_array",
    "load_test_reference",
    "parallel_map",
    "scale_composition_fingerprints",
    "structure_fingerprint",
]

STRUCT_FP_DIM = 61
_REFERENCE_FORMAT = 2  # 2: rows pass the sanity bounds (format-1 caches are migrated, not rebuilt)
_FEATURIZERS: dict[str, Any] = {}


def default_cache_dir() -> Path:
    """``$MATGEN_CACHE/evaluate``, else ``$XDG_CACHE_HOME/matgen/evaluate`` (``~/.cache/matgen/evaluate``)."""
    return user_cache_dir("matgen", "MATGEN_CACHE") / "evaluate"


def _featurizer(name: str) -> Any:
    if name not in _FEATURIZERS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if name == "crystalnn":
                from matminer.featurizers.site.fingerprint import CrystalNNFingerprint

                _FEATURIZERS[name] = CrystalNNFingerprint.from_preset("ops")
            else:
                from matminer.featurizers.composition.composite import ElementProperty

                _FEATURIZERS[name] = ElementProperty.from_preset("magpie", impute_nan=False)
    return _FEATURIZERS[name]


def structure_fingerprint(structure: Structure) -> np.ndarray | None:
    """Site-averaged CrystalNN "ops" fingerprint ``(61,)``, or ``None`` if matminer fails."""
    cnn = _featurizer("crystalnn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sites = [cnn.featurize(structure, i) for i in range(len(structure))]
        fp = np.asarray(sites, dtype=float).mean(axis=0)
    except Exception:
        return None
    return fp if fp.shape == (STRUCT_FP_DIM,) else None


def composition_fingerprint(composition: Composition | Structure) -> np.ndarray:
    """Raw Magpie ``ElementProperty`` features ``(132,)`` (NaN where elemental data is missing)."""
    if isinstance(composition, Structure):
        composition = composition.composition
    ep = _featurizer("magpie")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(ep.featurize(Composition(composition).element_composition), dtype=float)


def scale_composition_fingerprints(x: np.ndarray) -> np.ndarray:
    """CDVAE ``CompScaler.transform``: ``(x - mean) / std`` with NaN -> 0. Shape ``(N, 132)``."""
    x = np.asarray(x, dtype=float)
    z = (x - np.asarray(COMP_SCALER_MEANS)) / np.asarray(COMP_SCALER_STDS)
    return np.where(np.isnan(z), 0.0, z)


def encode_array(x: np.ndarray | None) -> str | None:
    """float64 array -> base64 text (lossless, compact in JSON)."""
    return None if x is None else base64.b64encode(np.asarray(x, dtype="<f8").tobytes()).decode("ascii")


def decode_array(text: str | None) -> np.ndarray | None:
    return None if text is None else np.frombuffer(base64.b64decode(text), dtype="<f8").copy()


def parallel_map(
    func: Callable[[Any], Any], items: list[Any], workers: int = 0, desc: str = "", progress: bool = True
) -> Iterable[Any]:
    """Ordered map over ``items`` in ``workers`` spawned processes (0 = in this process), with a bar."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(items), desc=desc, disable=not progress, leave=False)
    try:
        if workers and workers > 0 and len(items) > 1:
            from matgen.workers import process_pool

            pool = process_pool(workers)
            try:
                for out in pool.map(func, items, chunksize=max(1, min(64, len(items) // (4 * workers)))):
                    bar.update(1)
                    yield out
            finally:  # interrupted (Ctrl-C, SIGTERM): the queued chunks are dropped, not all computed first
                pool.shutdown(wait=True, cancel_futures=True)
        else:
            for item in items:
                out = func(item)
                bar.update(1)
                yield out
    finally:
        bar.close()


# ------------------------------------------------------------------------------------------- reference
@dataclass
class ReferenceSet:
    """Per-crystal features of a reference split (rows aligned).

    Attributes:
        ids: material ids ``(N,)``.
        struct_fp: ``(N, 61)`` CrystalNN fingerprints (NaN rows where matminer failed).
        comp_fp: ``(N, 132)`` raw Magpie features.
        density: ``(N,)`` g/cm^3.
        n_elements, n_atoms: ``(N,)``.
        formulas: ``(N,)`` full formulas (``Composition.formula``), for element statistics.
        sampled: whether the rows are a seeded random subset of the split (``test_limit`` below its size).
    """

    ids: np.ndarray
    struct_fp: np.ndarray
    comp_fp: np.ndarray
    density: np.ndarray
    n_elements: np.ndarray
    n_atoms: np.ndarray
    formulas: np.ndarray
    sampled: bool = False

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, mask: np.ndarray) -> ReferenceSet:
        rows = {k: getattr(self, k)[mask] for k in self.__dataclass_fields__ if k != "sampled"}
        return ReferenceSet(**rows, sampled=self.sampled)


def _sanity_problem(structure: Any) -> str | None:
    """Why a reference crystal fails the sanity bounds that generated crystals must pass, or None. A partly
    occupied site, for one, has no fingerprint, and its density would still enter the distributions."""
    from matgen.evaluate.validity import check_sanity, in_reduced_cell

    return check_sanity(in_reduced_cell(structure))


def _reference_row(item: tuple[str, str]) -> dict[str, Any]:
    """The reference fields of one data-set row, or ``{"ids", "error"}`` when the row cannot be read or
    described (a data set of one's own may hold a dummy species, a broken CIF ...)."""
    from matgen.evaluate.inputs import error_text, parse_cif

    material_id, cif = item
    try:
        s = parse_cif(cif if isinstance(cif, str) else "")
        if (insane := _sanity_problem(s)) is not None:
            return {"ids": material_id, "error": f"fails the sanity bounds: {insane}"}
        fp = structure_fingerprint(s)
        return {
            "ids": material_id,
            "struct_fp": fp if fp is not None else np.full(STRUCT_FP_DIM, np.nan),
            "comp_fp": composition_fingerprint(s),
            "density": float(s.density),
            "n_elements": len(s.composition.elements),
            "n_atoms": len(s),
            "formulas": s.composition.formula,
        }
    except Exception as exc:  # one bad reference row must not stop an evaluation
        return {"ids": material_id, "error": f"{type(exc).__name__}: {error_text(exc, 120)}"}


def _save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    atomic_write(path, lambda tmp: np.savez_compressed(tmp, **arrays), suffix=".npz")


_REFERENCE_FIELDS = ("ids", "struct_fp", "comp_fp", "density", "n_elements", "n_atoms", "formulas")
_SAVE_EVERY_S = 60.0  # a killed reference build loses at most about this much work


def _read_cache(path: Path) -> dict[str, np.ndarray]:
    """The reference rows cached in ``path`` ({} when missing or unreadable: they are computed again)."""
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as z:
            stored = {k: z[k] for k in z.files}
    except Exception:
        return {}
    return stored if all(f in stored for f in _REFERENCE_FIELDS) else {}


def _union_rows(*parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The rows of all ``parts`` (column dicts), each id once (its first occurrence)."""
    parts = tuple(p for p in parts if p and len(p["ids"]))
    merged = {f: np.concatenate([p[f] for p in parts]) for f in _REFERENCE_FIELDS}
    merged["ids"] = merged["ids"].astype(str)
    merged["formulas"] = merged["formulas"].astype(str)
    _, first = np.unique(merged["ids"], return_index=True)
    keep = np.sort(first)
    return {f: v[keep] for f, v in merged.items()}


def _fingerprint_into_cache(
    todo: list[tuple[str, str]],
    stored: dict[str, np.ndarray],
    path: Path,
    split: str,
    workers: int,
    progress: bool,
    failed: dict[str, str],
) -> dict[str, np.ndarray]:
    """Fingerprint ``todo`` rows and merge them into ``stored``, rewriting the cache file atomically every
    minute, at the end, and when interrupted (Ctrl-C), so that a long first build is never lost whole.
    Rows that cannot be read go to ``failed`` (id -> reason), not to the cache."""
    pending: list[dict[str, Any]] = []

    def flush() -> None:
        nonlocal stored, pending
        if not pending:
            return
        new = {f: np.array([r[f] for r in pending]) for f in _REFERENCE_FIELDS}
        # another evaluation may have written rows since this one read the file: keep them too
        merged = _union_rows(_read_cache(path), stored, new)
        try:
            _save_npz_atomic(path, merged)
        except OSError as exc:  # a read-only cache must not stop the evaluation
            warnings.warn(
                f"could not write the reference cache {path}: {exc} (set MATGEN_CACHE or pass --cache-dir to "
                "cache elsewhere; without a cache the fingerprints are computed again next run)",
                stacklevel=3,
            )
        stored, pending = merged, []

    if len(todo) >= 1000:  # a notice, not a bar: said with --no-progress too (a silent wait of minutes)
        print(
            f"fingerprinting {len(todo)} reference crystals of the {split} split once (cached in {path.parent} for "
            f"later runs), with {max(workers, 1)} process(es); --workers N or --test-limit makes this shorter",
            file=sys.stderr,
        )
    last_save = time.monotonic()
    try:
        for row in parallel_map(
            _reference_row, todo, workers, desc=f"fingerprinting the {split} split", progress=progress
        ):
            if "error" in row:
                failed[str(row["ids"])] = row["error"]
                continue
            pending.append(row)
            if time.monotonic() - last_save > _SAVE_EVERY_S:
                flush()
                last_save = time.monotonic()
    finally:
        flush()
    return stored


def _migrated_format_1(old: Path, new: Path, frame: Any) -> dict[str, np.ndarray]:
    """The rows of a format-1 cache (built before reference rows had to pass the sanity bounds) that pass
    them, saved as ``new``: parsing the CIFs again takes seconds, fingerprinting them took many minutes.
    ``{}`` when there is no such cache."""
    from matgen.evaluate.inputs import parse_cif

    stored = _read_cache(old)
    if not stored:
        return {}
    cifs = dict(zip(frame["material_id"].astype(str), frame["cif"], strict=True))

    def passes(material_id: str) -> bool:
        try:
            return _sanity_problem(parse_cif(cifs[material_id])) is None
        except Exception:  # unreadable now: computed (and reported) again with the rows not cached
            return False

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen's per-CIF notes
        keep = np.array([passes(str(i)) for i in stored["ids"]], dtype=bool)
    migrated = {f: v[keep] for f, v in stored.items()}
    try:
        _save_npz_atomic(new, migrated)
    except OSError:  # a read-only cache: used as it is, migrated again next time
        pass
    return migrated


def load_test_reference(
    data_dir: str | Path | None = None,
    *,
    split: str = "test",
    test_limit: int | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    workers: int = 0,
    progress: bool = True,
) -> ReferenceSet:
    """Fingerprints etc. of the MP-20 ``split`` (all rows, or a seeded random ``test_limit`` subset).

    Rows are computed only when absent from the cache, which is rewritten atomically as they come in
    (every minute, at the end, and on Ctrl-C).
    """
    from matgen.data import cache_file_prefix, ensure_split_file, load_split

    frame = whole = load_split(split, data_dir)
    n = len(frame)
    sampled = test_limit is not None and test_limit < n  # against the split's rows, readable or not
    if sampled:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=test_limit, replace=False))
        frame = frame.iloc[rows].reset_index(drop=True)
    split_file = ensure_split_file(split, data_dir, download=False)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    prefix = cache_file_prefix(split_file)
    stem = f"{prefix}-{split}-reference-{file_sha256(split_file)[:16]}"
    path = cache / f"{stem}-v{_REFERENCE_FORMAT}.npz"

    stored = _read_cache(path) or _migrated_format_1(cache / f"{stem}-v1.npz", path, whole)
    have = {str(i): k for k, i in enumerate(stored.get("ids", np.array([], dtype=str)))}
    todo = [(m, c) for m, c in zip(frame["material_id"], frame["cif"], strict=True) if m not in have]
    failed: dict[str, str] = {}
    if todo:
        stored = _fingerprint_into_cache(todo, stored, path, split, workers, progress, failed)
        have = {str(i): k for k, i in enumerate(stored.get("ids", np.array([], dtype=str)))}
    if failed:
        examples = "; ".join(f"{m}: {why}" for m, why in list(failed.items())[:3])
        warnings.warn(
            f"{len(failed)} row(s) of {split_file} could not be read or fail the sanity bounds, and are left "
            f"out of the reference set (e.g. {examples})",
            stacklevel=2,
        )
    kept = [m for m in frame["material_id"] if m in have]
    if not kept:
        raise ValueError(f"no row of {split_file} could be read as a crystal: no reference set")
    idx = np.array([have[m] for m in kept], dtype=np.int64)
    return ReferenceSet(
        ids=stored["ids"][idx],
        struct_fp=stored["struct_fp"][idx].astype(float),
        comp_fp=stored["comp_fp"][idx].astype(float),
        density=stored["density"][idx].astype(float),
        n_elements=stored["n_elements"][idx].astype(int),
        n_atoms=stored["n_atoms"][idx].astype(int),
        formulas=stored["formulas"][idx].astype(str),
        sampled=sampled,
    )
