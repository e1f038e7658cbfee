"""End-to-end `evaluate`: self-coverage, broken inputs, kill-and-resume, the CLI (CPU, ~1-2 min)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from evaluate_helpers import close_pair, evaluate_cli, rattled, rock_salt, write_cif

import matgen.evaluate.pipeline as pipeline
from matgen.evaluate import evaluate, load_test_reference
from matgen.evaluate.journal import Journal

TEST_LIMIT = 6
FLOAT_COLS = ["e_initial_per_atom", "e_relaxed", "e_relaxed_per_atom", "e_hull"]


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def reference_folder(mp20_dir, fp_cache, tmp_path_factory) -> Path:
    """The seeded MP-20 test subset that also serves as the coverage reference, written as CIF files."""
    ref = load_test_reference(mp20_dir, test_limit=TEST_LIMIT, seed=0, cache_dir=fp_cache, progress=False)
    frame = pd.read_csv(mp20_dir / "test.csv.gz")
    frame = frame.set_index("material_id").loc[list(ref.ids)]
    folder = tmp_path_factory.mktemp("reference_cifs")
    for material_id, cif in zip(frame.index, frame["cif"], strict=True):
        (folder / f"{material_id}.cif").write_text(cif)
    return folder


def _run(inputs, out, mp20_dir, hull_dir, fp_cache, **kw):
    kw.setdefault("skip_stability", True)
    return evaluate(
        inputs,
        out,
        data_dir=mp20_dir,
        hull=hull_dir,
        test_limit=TEST_LIMIT,
        train_limit=50,
        cache_dir=fp_cache,
        device="cpu",
        progress=False,
        console=False,
        **kw,
    )


def test_self_coverage_is_complete(reference_folder, mp20_dir, hull_dir, fp_cache, tmp_path):
    summary = _run(reference_folder, tmp_path / "out", mp20_dir, hull_dir, fp_cache)
    assert summary["n_inputs"] == TEST_LIMIT == summary["n_reference"]
    assert summary["cov_recall"] == 1.0
    assert summary["cov_precision"] == 1.0
    assert summary["amsd_recall"] == pytest.approx(0.0, abs=1e-9)
    assert summary["wdist_density"] < 1e-9 or summary["valid"] < 1.0
    assert summary["unique_rate"] == 1.0


def _broken_folder(root: Path) -> Path:
    folder = root / "broken"
    folder.mkdir()
    write_cif(folder / "nacl.cif", rock_salt())
    write_cif(folder / "overlap.cif", close_pair())
    (folder / "garbage.cif").write_text("this is not a CIF\nloop_\n_x 1 2 3\n")
    (folder / "empty.cif").write_text("")
    huge = write_cif(folder / "huge.cif", rock_salt()).read_text()
    lines = [
        "_cell_length_a   1000000000000.0" if line.startswith("_cell_length_a") else line
        for line in huge.splitlines()
    ]
    (folder / "huge.cif").write_text("\n".join(lines) + "\n")
    return folder


def test_broken_inputs_are_counted_with_reasons(mp20_dir, hull_dir, fp_cache, tmp_path):
    folder = _broken_folder(tmp_path)
    summary = _run(
        folder, tmp_path / "out", mp20_dir, hull_dir, fp_cache, skip_stability=False, relax_steps=100
    )
    assert summary["n_inputs"] == 5
    assert summary["n_unparsable"] == 2
    assert summary["n_failed_sanity_bounds"] == 1
    assert summary["struct_valid"] == pytest.approx(1 / 5)
    rows = pd.read_csv(tmp_path / "out" / "results.csv").set_index("id")
    assert "unparsable" in rows.loc["garbage.cif", "reason"]
    assert "empty" in rows.loc["empty.cif", "reason"]
    assert "sanity" in rows.loc["huge.cif", "reason"]
    assert "apart" in rows.loc["overlap.cif", "reason"]
    assert rows.loc["overlap.cif", "stability_reason"].startswith("not relaxed")
    assert np.isfinite(rows.loc["nacl.cif", "e_hull"])
    assert rows.loc["nacl.cif", "hull_compounds"] >= 1  # Na-Cl compounds of MP-20 are in the reference
    assert bool(rows.loc["nacl.cif", "valid"])
    assert summary["n_relaxed"] == 1 and summary["stability_note"]


def _rows(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "results.csv")


def _assert_same_rows(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a["id"]) == list(b["id"]) and b["id"].is_unique
    other = [c for c in a.columns if c not in FLOAT_COLS]
    pd.testing.assert_frame_equal(a[other], b[other])
    for c in FLOAT_COLS:
        np.testing.assert_allclose(a[c].to_numpy(float), b[c].to_numpy(float), atol=2e-4, equal_nan=True)


def test_resume_after_crash_in_validity_stage(
    reference_folder, mp20_dir, hull_dir, fp_cache, tmp_path, monkeypatch
):
    folder = tmp_path / "inputs"
    folder.mkdir()
    for p in sorted(reference_folder.iterdir()):
        (folder / p.name).write_text(p.read_text())
    (folder / "zz_garbage.cif").write_text("garbage")
    _run(folder, tmp_path / "clean", mp20_dir, hull_dir, fp_cache)

    real = pipeline.analyze_crystal
    calls = {"n": 0}

    def dying(payload):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt("simulated kill")
        return real(payload)

    monkeypatch.setattr(pipeline, "analyze_crystal", dying)
    with pytest.raises(KeyboardInterrupt):
        _run(folder, tmp_path / "crashed", mp20_dir, hull_dir, fp_cache, chunk_size=2)
    monkeypatch.setattr(pipeline, "analyze_crystal", real)
    journal = tmp_path / "crashed" / "journal.jsonl"
    # all 3 finished crystals are kept, not only the full chunk of 2 (a Ctrl-C lost up to a chunk)
    assert sum('"basic"' in line for line in journal.read_text().splitlines()) == 3
    with journal.open("a") as f:  # a torn write: half a record, no newline
        f.write('{"stage":"basic","id":"mp-')
    _run(folder, tmp_path / "crashed", mp20_dir, hull_dir, fp_cache, chunk_size=2)
    _assert_same_rows(_rows(tmp_path / "clean"), _rows(tmp_path / "crashed"))
    lines = [json.loads(x) for x in journal.read_text().splitlines()]
    keys = [(r["stage"], r["id"]) for r in lines]
    assert len(keys) == len(set(keys)) == 1 + 7  # header + one record per crystal


def test_resume_after_crash_in_relaxation(mp20_dir, hull_dir, fp_cache, tmp_path, monkeypatch):
    folder = tmp_path / "inputs"
    folder.mkdir()
    for k, a in enumerate((5.5, 5.64, 5.8)):
        write_cif(folder / f"nacl{k}.cif", rattled(rock_salt(a), 0.0, 0.05, seed=k))
    kw = {"skip_stability": False, "relax_steps": 40, "batch_atoms": 2}
    _run(folder, tmp_path / "clean", mp20_dir, hull_dir, fp_cache, **kw)

    real_append = Journal.append
    seen = {"relax": 0}

    def dying_append(self, records):
        if records and records[0]["stage"] == "relax":
            seen["relax"] += 1
            if seen["relax"] == 2:
                raise KeyboardInterrupt("simulated kill during relaxation")
        return real_append(self, records)

    monkeypatch.setattr(Journal, "append", dying_append)
    with pytest.raises(KeyboardInterrupt):
        _run(folder, tmp_path / "crashed", mp20_dir, hull_dir, fp_cache, **kw)
    monkeypatch.setattr(Journal, "append", real_append)
    text = (tmp_path / "crashed" / "journal.jsonl").read_text()
    assert sum('"relax"' in line for line in text.splitlines()) == 1
    _run(folder, tmp_path / "crashed", mp20_dir, hull_dir, fp_cache, **kw)
    _assert_same_rows(_rows(tmp_path / "clean"), _rows(tmp_path / "crashed"))
    text = (tmp_path / "crashed" / "journal.jsonl").read_text()
    assert sum('"relax"' in line for line in text.splitlines()) == 3


def test_cli_writes_outputs(mp20_dir, hull_dir, fp_cache, tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    write_cif(folder / "nacl.cif", rock_salt())
    write_cif(folder / "overlap.cif", close_pair())
    out = tmp_path / "out"
    args = [
        str(folder), "--out", str(out), "--data-dir", str(mp20_dir), "--hull", str(hull_dir),
        "--test-limit", str(TEST_LIMIT), "--train-limit", "50", "--relax-steps", "50", "--device", "cpu",
        "--cache-dir", str(fp_cache), "--no-progress",
    ]  # fmt: skip
    result = evaluate_cli(args)
    assert result.exit_code == 0, result.output
    for name in ("results.csv", "summary.json", "report.md", "relaxed.csv.gz", "e_hull_hist.png",
                 "element_frequency.png", "density.png", "n_atoms.png", "journal.jsonl"):  # fmt: skip
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_inputs"] == 2 and summary["struct_valid"] == 0.5
    assert "APPROXIMATE" in (out / "report.md").read_text()
    assert "APPROXIMATE" in result.output
    relaxed = pd.read_csv(out / "relaxed.csv.gz")
    assert list(relaxed["id"]) == ["nacl.cif"]
    rows = _rows(out)
    chosen = rows[rows["metastable"].astype(bool) & rows["unique"].astype(bool) & rows["novel"].astype(bool)]
    candidates = pd.read_csv(out / "candidates.csv")
    assert list(candidates["id"]) == list(chosen["id"])
    assert sorted(p.name for p in (out / "candidates").glob("*.cif")) == sorted(
        Path(f).name for f in candidates["file"]
    )
    assert f"{len(candidates)} candidate crystal(s)" in result.output


def test_candidates_are_the_relaxed_msun_crystals_by_e_hull_with_safe_unique_names(tmp_path):
    from pymatgen.io.cif import CifWriter

    from matgen.evaluate.report import _candidates_md, _write_candidates, remove_outputs

    ids = ["sub/a b.cif", "sub/a_b.cif", "dup.cif", "high.cif", "plain", "unrelaxed.cif"]
    results = pd.DataFrame(
        {
            "id": ids,
            "formula": ["NaCl"] * 6,
            "n_atoms": [2] * 6,
            "e_hull": [0.05, -0.02, 0.0, 0.3, 0.01, -0.1],
            "metastable": [True, True, True, False, True, True],
            "stable": [False, True, True, False, False, True],
            "unique": [True, True, False, True, True, True],
            "novel": [True, True, True, True, True, True],
            "sun": [False, True, False, False, False, True],
        }
    )
    cif = str(CifWriter(rock_salt()))
    relaxed = {i: cif for i in ids if i != "unrelaxed.cif"}
    table = _write_candidates(tmp_path, results, relaxed)
    assert list(table["id"]) == ["sub/a_b.cif", "plain", "sub/a b.cif"]  # by E_hull; M.S.U.N. and relaxed
    assert list(table["file"]) == [
        "candidates/sub__a_b.cif",
        "candidates/plain.cif",
        "candidates/sub__a_b_2.cif",
    ]
    assert pd.read_csv(tmp_path / "candidates.csv")["id"].tolist() == list(table["id"])
    for f in table["file"]:
        assert (tmp_path / f).read_text() == cif
    md = "\n".join(_candidates_md(table, shown=2))
    assert "[sub/a_b.cif](candidates/sub__a_b.cif)" in md and "the first 2 of 3" in md
    (tmp_path / "candidates" / "mine.txt").write_text("a note of the user's")
    remove_outputs(tmp_path)
    assert [p.name for p in (tmp_path / "candidates").iterdir()] == ["mine.txt"]
    assert not (tmp_path / "candidates.csv").exists()


def test_rerun_with_other_inputs_under_the_same_ids_recomputes_them(mp20_dir, hull_dir, fp_cache, tmp_path):
    """Ids alone do not identify a crystal: a rerun into the same folder must not reuse stale rows."""
    cifs = {
        k: write_cif(tmp_path / f"{k}.cif", rock_salt(a)).read_text() for k, a in (("a", 5.6), ("b", 6.4))
    }
    pd.DataFrame({"cif": [cifs["a"]]}).to_csv(tmp_path / "first.csv", index=False)
    pd.DataFrame({"cif": [cifs["b"]]}).to_csv(tmp_path / "second.csv", index=False)
    out = tmp_path / "out"
    _run(tmp_path / "first.csv", out, mp20_dir, hull_dir, fp_cache)
    first = _rows(out).set_index("id").loc["row0", "density"]
    with pytest.warns(UserWarning, match="evaluated again"):
        _run(tmp_path / "second.csv", out, mp20_dir, hull_dir, fp_cache)
    second = _rows(out).set_index("id").loc["row0", "density"]
    assert second == pytest.approx(rock_salt(6.4).density, rel=1e-6)
    assert first == pytest.approx(rock_salt(5.6).density, rel=1e-6)


def test_a_cheap_rerun_after_a_stability_run_with_other_settings(mp20_dir, hull_dir, fp_cache, tmp_path):
    """Relaxation settings live with the relaxations: a --skip-stability rerun (or new settings) is fine."""
    folder = tmp_path / "one"
    folder.mkdir()
    write_cif(folder / "nacl.cif", rattled(rock_salt(), 0.04, 0.2))
    out = tmp_path / "out"
    capped = _run(folder, out, mp20_dir, hull_dir, fp_cache, skip_stability=False, relax_steps=3)
    assert not bool(_rows(out).loc[0, "relax_converged"])  # 3 steps: E_hull kept, out of the distribution
    assert np.isfinite(_rows(out).loc[0, "e_hull"]) and math.isnan(capped["e_hull_median"])
    assert sum(capped["e_hull_histogram"]["counts"]) == 0 and capped["n_relax_unconverged"] == 1
    assert _run(folder, out, mp20_dir, hull_dir, fp_cache)["n_inputs"] == 1
    summary = _run(folder, out, mp20_dir, hull_dir, fp_cache, skip_stability=False, relax_steps=60)
    rows = _rows(out)
    assert (
        summary["n_relaxed"] == 1 and rows.loc[0, "relax_steps"] > 3 or bool(rows.loc[0, "relax_converged"])
    )
    recs = Journal(out / "journal.jsonl").records
    assert recs[("relax", "nacl.cif")]["step_cap"] == 60


def test_a_data_set_of_ones_own_with_bad_rows_and_a_crystal_in_a_skewed_cell(mp20_dir, fp_cache, tmp_path):
    """A custom --data-dir whose test split holds a dummy species and a broken CIF: those rows are left out
    of the reference with a warning, the summary names the data set, and a training crystal written in a
    needlessly skewed cell (lengths near 50 A, an angle of 5 deg) is valid and not novel."""
    from pymatgen.core import Structure

    from matgen.evaluate.validity import check_sanity

    good = pd.read_csv(mp20_dir / "test.csv.gz", nrows=4)[["material_id", "cif"]]
    data = tmp_path / "mydata"
    data.mkdir()
    for split in ("train", "val"):
        good.to_csv(data / f"{split}.csv", index=False)
    dummy = write_cif(tmp_path / "x.cif", rock_salt()).read_text().replace("Cl", "X")
    bad_rows = pd.DataFrame(
        {"material_id": ["dummy", "broken"], "cif": [dummy, "data_x\n_cell_length_a 4\n"]}
    )
    pd.concat([good, bad_rows]).to_csv(data / "test.csv", index=False)

    crystal = Structure.from_str(good["cif"][0], fmt="cif")
    shear = np.array([[1, 0, 0], [12, 1, 0], [0, 0, 1]])  # det 1: the same lattice in another basis
    frac = crystal.frac_coords @ np.linalg.inv(shear) % 1.0
    skewed = Structure(shear @ crystal.lattice.matrix, crystal.species, frac)
    np.testing.assert_allclose(skewed.volume, crystal.volume)
    assert check_sanity(skewed) is not None  # too narrow as written
    with pytest.warns(UserWarning, match=r"2 row\(s\) of .*test.csv could not be read"):
        summary = evaluate(
            [skewed],
            tmp_path / "out",
            data_dir=data,
            skip_stability=True,
            cache_dir=fp_cache,
            device="cpu",
            progress=False,
            console=False,
        )
    assert summary["data_set"] == "'mydata'" and summary["n_reference"] == 4
    assert summary["reference"].startswith("'mydata' test (4 crystals")
    row = pd.read_csv(tmp_path / "out" / "results.csv").iloc[0]
    assert bool(row["valid"]) and not bool(row["novel"]), row.to_dict()


def test_a_killed_rerun_leaves_no_earlier_tables_looking_current(
    reference_folder, mp20_dir, hull_dir, fp_cache, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    _run(reference_folder, out, mp20_dir, hull_dir, fp_cache)
    assert (out / "results.csv").is_file() and (out / "summary.json").is_file()

    def killed(payload):
        raise KeyboardInterrupt("simulated kill")

    other = tmp_path / "other"
    other.mkdir()
    write_cif(other / "salt.cif", rock_salt())
    with pytest.raises(pipeline.OtherEvaluation, match=r"holds the evaluation of other crystals: 6 of its 6"):
        _run(other, out, mp20_dir, hull_dir, fp_cache)  # another evaluation's tables are not replaced unasked
    assert (out / "results.csv").is_file()
    monkeypatch.setattr(pipeline, "analyze_crystal", killed)
    with pytest.raises(KeyboardInterrupt):
        _run(other, out, mp20_dir, hull_dir, fp_cache, overwrite=True)
    left = {p.name for p in out.iterdir()}
    assert left == {"journal.jsonl"}, left  # the journal keeps the work; no table of the earlier inputs
    monkeypatch.undo()
    _run(other, out, mp20_dir, hull_dir, fp_cache)  # no tables left to protect: no flag needed
    assert list(_rows(out)["id"]) == ["salt.cif"]
    more = tmp_path / "more"  # the same crystal and one more: nothing of the earlier run is dropped
    more.mkdir()
    write_cif(more / "salt.cif", rock_salt())
    write_cif(more / "salt2.cif", rock_salt(5.0))
    _run(more, out, mp20_dir, hull_dir, fp_cache)
    assert sorted(_rows(out)["id"]) == ["salt.cif", "salt2.cif"]


def test_records_of_earlier_reading_rules_are_redone(mp20_dir, hull_dir, fp_cache, tmp_path, monkeypatch):
    """A folder evaluated before the reading rules changed (READ_RULES) gets the new verdicts on a rerun."""
    import matgen.evaluate.inputs as inputs

    folder = tmp_path / "in"
    folder.mkdir()
    write_cif(folder / "salt.cif", rock_salt())
    _run(folder, tmp_path / "out", mp20_dir, hull_dir, fp_cache)
    analysed = []
    real = pipeline.analyze_crystal
    monkeypatch.setattr(pipeline, "analyze_crystal", lambda p: analysed.append(p[0]) or real(p))
    _run(folder, tmp_path / "out", mp20_dir, hull_dir, fp_cache)
    assert analysed == []  # same rules, same input: nothing redone
    monkeypatch.setattr(inputs, "READ_RULES", inputs.READ_RULES + 1)
    with pytest.warns(UserWarning, match="or by earlier reading rules; they are evaluated again"):
        _run(folder, tmp_path / "out", mp20_dir, hull_dir, fp_cache)
    assert analysed == ["salt.cif"]


def test_stage_one_writes_its_journal_on_a_clock_too(
    reference_folder, mp20_dir, hull_dir, fp_cache, tmp_path, monkeypatch
):
    """A SIGKILL runs no `finally`: with large cells (seconds each) a run killed before a full chunk of 64
    lost all its crystals. The journal is now also written every JOURNAL_EVERY_S."""
    monkeypatch.setattr(pipeline, "JOURNAL_EVERY_S", -1.0)  # the clock always says "write now"
    journal, on_disk = tmp_path / "out" / "journal.jsonl", []
    real = pipeline.analyze_crystal

    def watching(payload):
        on_disk.append(
            sum('"basic"' in line for line in journal.read_text().splitlines()) if journal.exists() else 0
        )
        return real(payload)

    monkeypatch.setattr(pipeline, "analyze_crystal", watching)
    _run(reference_folder, tmp_path / "out", mp20_dir, hull_dir, fp_cache, chunk_size=1000)
    assert on_disk == list(range(TEST_LIMIT))  # before crystal k, the k crystals before it were on disk
