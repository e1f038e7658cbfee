"""Coverage (COV-R / COV-P) against the MP-20 test set and Wasserstein distances of property distributions.

Coverage (CDVAE, Xie et al. 2021, ``scripts/eval_utils.py::compute_cov``; thresholds for MP-20 from
``scripts/compute_metrics.py::COV_Cutoffs``: structure 0.4, composition 10)
    With ``d_s`` the Euclidean distance between structure fingerprints and ``d_c`` between CompScaler-scaled
    composition fingerprints (see :mod:`.fingerprints`):

    * recall   = fraction of reference crystals ``r`` with ``min_g d_s(g, r) <= 0.4`` and
      ``min_g d_c(g, r) <= 10`` (the two minima may come from different generated crystals, as in CDVAE);
    * precision = number of generated ``g`` with ``min_r d_s(g, r) <= 0.4`` and ``min_r d_c(g, r) <= 10``,
      divided by the number of *all* generated crystals.

    Which generated crystals enter: CDVAE uses every generated crystal whose fingerprints could be computed
    (valid or not) and divides precision by the total count. ``coverage_metrics`` does the same for the
    ``generated`` rows it is given; :func:`matgen.evaluate.evaluate` reports it twice, once over all
    fingerprinted crystals (``cov_recall``, ``cov_precision``: the CDVAE/DiffCSP/FlowMM convention) and once
    over valid crystals only (``cov_recall_valid``, ``cov_precision_valid``; precision still over all).
    Also returned: AMSD/AMCD (mean of those minimum distances).

Wasserstein distances (CDVAE ``GenEval.get_density_wdist`` / ``get_num_elem_wdist``)
    ``scipy.stats.wasserstein_distance`` between the densities (g/cm^3) and between the numbers of distinct
    elements of the *valid* generated crystals and of the reference crystals. (CDVAE draws 1,000 valid
    crystals at random first; here all valid crystals are used.)
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.distance import cdist
from scipy.stats import wasserstein_distance

from matgen.evaluate.fingerprints import scale_composition_fingerprints

__all__ = ["COV_COMP_CUTOFF", "COV_STRUCT_CUTOFF", "coverage_metrics", "wasserstein_metrics"]

COV_STRUCT_CUTOFF = 0.4
COV_COMP_CUTOFF = 10.0


def _min_dists(a: np.ndarray, b: np.ndarray, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise and column-wise minima of ``cdist(a, b)`` without holding more than ``chunk`` rows."""
    row_min = np.full(len(a), np.inf)
    col_min = np.full(len(b), np.inf)
    for lo in range(0, len(a), chunk):
        d = cdist(a[lo : lo + chunk], b)
        row_min[lo : lo + chunk] = d.min(axis=1)
        col_min = np.minimum(col_min, d.min(axis=0))
    return row_min, col_min


def coverage_metrics(
    gen_struct_fp: np.ndarray,
    gen_comp_fp: np.ndarray,
    ref_struct_fp: np.ndarray,
    ref_comp_fp: np.ndarray,
    n_generated: int | None = None,
    struct_cutoff: float = COV_STRUCT_CUTOFF,
    comp_cutoff: float = COV_COMP_CUTOFF,
) -> dict[str, float]:
    """CDVAE coverage recall/precision (see module docstring).

    Args:
        gen_struct_fp, gen_comp_fp: ``(G, 61)`` and ``(G, 132)`` raw fingerprints of the generated crystals
            that take part (rows with a NaN structure fingerprint are dropped here).
        ref_struct_fp, ref_comp_fp: ``(R, 61)``, ``(R, 132)`` of the reference set.
        n_generated: precision denominator (all generated crystals); default ``G``.

    Returns:
        ``cov_recall, cov_precision, amsd_recall, amsd_precision, amcd_recall, amcd_precision``.
    """
    gs, gc = np.asarray(gen_struct_fp, float).reshape(-1, 61), np.asarray(gen_comp_fp, float).reshape(-1, 132)
    rs, rc = np.asarray(ref_struct_fp, float).reshape(-1, 61), np.asarray(ref_comp_fp, float).reshape(-1, 132)
    keep_g = np.isfinite(gs).all(axis=1)
    keep_r = np.isfinite(rs).all(axis=1)
    gs, gc, rs, rc = gs[keep_g], gc[keep_g], rs[keep_r], rc[keep_r]
    total = int(n_generated if n_generated is not None else len(keep_g))
    nan = float("nan")
    if len(gs) == 0 or len(rs) == 0:
        return {
            "cov_recall": 0.0 if len(rs) else nan,
            "cov_precision": 0.0 if total else nan,
            "amsd_recall": nan,
            "amsd_precision": nan,
            "amcd_recall": nan,
            "amcd_precision": nan,
        }
    gc, rc = scale_composition_fingerprints(gc), scale_composition_fingerprints(rc)
    s_prec, s_rec = _min_dists(gs, rs)
    c_prec, c_rec = _min_dists(gc, rc)
    recall = float(np.mean((s_rec <= struct_cutoff) & (c_rec <= comp_cutoff)))
    precision = float(np.sum((s_prec <= struct_cutoff) & (c_prec <= comp_cutoff)) / max(total, 1))
    return {
        "cov_recall": recall,
        "cov_precision": precision,
        "amsd_recall": float(s_rec.mean()),
        "amsd_precision": float(s_prec.mean()),
        "amcd_recall": float(c_rec.mean()),
        "amcd_precision": float(c_prec.mean()),
    }


def wasserstein_metrics(
    gen_density: np.ndarray, gen_n_elements: np.ndarray, ref_density: np.ndarray, ref_n_elements: np.ndarray
) -> dict[str, float]:
    """``wdist_density`` (g/cm^3) and ``wdist_num_elems`` between generated and reference distributions."""
    out = {"wdist_density": float("nan"), "wdist_num_elems": float("nan")}
    if len(gen_density) and len(ref_density):
        out["wdist_density"] = float(wasserstein_distance(gen_density, ref_density))
        out["wdist_num_elems"] = float(wasserstein_distance(gen_n_elements, ref_n_elements))
    return out
