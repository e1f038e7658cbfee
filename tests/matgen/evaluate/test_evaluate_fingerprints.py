"""CDVAE's fixed composition scaler matches today's matminer Magpie feature order (fast)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from matgen.evaluate import composition_fingerprint, coverage_metrics, scale_composition_fingerprints


def test_comp_scaler_constants_fit_mp20_magpie_features(mp20_dir):
    """Scaled MP-20 train features have mean ~0 and std ~1 per feature; a feature-order or preset change
    (e.g. matminer reordering the Magpie properties) would blow this up."""
    formulas = pd.read_csv(mp20_dir / "train.csv.gz", nrows=300)["pretty_formula"]
    z = scale_composition_fingerprints(np.stack([composition_fingerprint(f) for f in formulas]))
    assert z.shape == (300, 132)
    assert np.abs(z.mean(axis=0)).max() < 0.6
    assert 0.7 < np.median(z.std(axis=0)) < 1.3


def test_coverage_counts_per_side():
    rng = np.random.default_rng(0)
    ref_s, ref_c = rng.random((4, 61)), np.tile(scale_back(np.zeros(132)), (4, 1))
    gen_s = np.concatenate([ref_s[:2] + 0.01, ref_s[:1] + 5.0])  # two near refs 0 and 1, one far away
    gen_c = np.tile(scale_back(np.zeros(132)), (3, 1))
    cov = coverage_metrics(gen_s, gen_c, ref_s, ref_c, n_generated=4)  # one more crystal had no fingerprint
    assert cov["cov_recall"] == 0.5  # refs 0 and 1 of 4
    assert cov["cov_precision"] == 0.5  # 2 matching of 4 generated


def scale_back(z: np.ndarray) -> np.ndarray:
    from matgen.evaluate._cdvae_constants import COMP_SCALER_MEANS, COMP_SCALER_STDS

    return z * np.asarray(COMP_SCALER_STDS) + np.asarray(COMP_SCALER_MEANS)


def test_an_interrupted_reference_build_keeps_the_rows_it_finished(mp20_dir, tmp_path, monkeypatch):
    """Ctrl-C while fingerprinting the test set: the finished rows are in the cache; a rerun does the rest."""
    import matgen.evaluate.fingerprints as fingerprints

    real_row, done = fingerprints._reference_row, []

    def row_then_interrupt(item):
        if len(done) == 3:
            raise KeyboardInterrupt
        done.append(item[0])
        return real_row(item)

    monkeypatch.setattr(fingerprints, "_reference_row", row_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        fingerprints.load_test_reference(mp20_dir, test_limit=5, seed=1, cache_dir=tmp_path, progress=False)
    (cache_file,) = tmp_path.glob("*.npz")
    with np.load(cache_file) as z:
        assert sorted(z["ids"].tolist()) == sorted(done)
    monkeypatch.setattr(
        fingerprints, "_reference_row", lambda item: (done.append(item[0]), real_row(item))[1]
    )
    ref = fingerprints.load_test_reference(mp20_dir, test_limit=5, seed=1, cache_dir=tmp_path, progress=False)
    assert len(ref) == 5 and len(done) == 5 and len(set(done)) == 5  # the last two only, no repeats


def test_two_evaluations_building_the_reference_at_once_keep_each_others_rows(mp20_dir, tmp_path):
    """Two `matgen evaluate` runs on one machine both found the cache incomplete; the one that wrote last
    used to replace the file with its own rows only, so the rows of the other were computed again."""
    import matgen.evaluate.fingerprints as fingerprints
    from matgen.data import load_split

    first = fingerprints.load_test_reference(
        mp20_dir, test_limit=3, seed=1, cache_dir=tmp_path, progress=False
    )
    (cache_file,) = tmp_path.glob("*.npz")
    frame = load_split("test", mp20_dir)
    others = [
        (m, c) for m, c in zip(frame["material_id"], frame["cif"], strict=True) if m not in set(first.ids)
    ]
    # the second run read the file before the first wrote it (stored = {}), and now saves its two rows
    fingerprints._fingerprint_into_cache(others[:2], {}, cache_file, "test", 0, False, {})
    with np.load(cache_file) as z:
        ids = z["ids"].tolist()
        assert z["struct_fp"].shape[0] == len(ids)
    assert sorted(ids) == sorted([*first.ids.tolist(), others[0][0], others[1][0]])
