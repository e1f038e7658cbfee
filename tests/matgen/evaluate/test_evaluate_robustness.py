"""Inputs and output folders nobody meant to give `matgen evaluate`: encrypted or oddly packed zips, a
folder of one's own files as --out, a journal.jsonl that is not ours or holds non-record lines (fast)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from evaluate_helpers import evaluate_cli, rock_salt, write_cif

from matgen.evaluate import read_inputs


def _patched_zip(entries: dict[str, str], *, flag_bits: int = 0, method: int | None = None) -> bytes:
    """A zip of ``entries`` whose first member claims ``flag_bits`` (bit 0: encrypted) and compression
    ``method`` (9: deflate64, which zipfile cannot unpack), in its local and central headers."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, text in entries.items():
            zf.writestr(name, text)
    data = bytearray(buf.getvalue())
    local, central = data.find(b"PK\x03\x04"), data.find(b"PK\x01\x02")
    if flag_bits:
        data[local + 6 : local + 8] = flag_bits.to_bytes(2, "little")
        data[central + 8 : central + 10] = flag_bits.to_bytes(2, "little")
    if method is not None:
        data[local + 8 : local + 10] = method.to_bytes(2, "little")
        data[central + 10 : central + 12] = method.to_bytes(2, "little")
    return bytes(data)


@pytest.mark.parametrize(
    ("patch", "reason"),
    [({"flag_bits": 1}, "encrypted archive member"), ({"method": 9}, "compression method")],
)
def test_an_encrypted_or_deflate64_member_is_a_failure_row_of_its_own(tmp_path: Path, patch, reason):
    cif = write_cif(tmp_path / "salt.cif", rock_salt()).read_text()
    (tmp_path / "gen.zip").write_bytes(_patched_zip({"a.cif": cif, "b.cif": cif}, **patch))
    items = read_inputs(tmp_path / "gen.zip")
    assert [i.id for i in items] == ["gen.zip/a.cif", "gen.zip/b.cif"]
    assert items[0].cif is None and reason in (items[0].read_error or "")
    assert items[1].read_error is None and "data_" in (items[1].cif or "")


@pytest.mark.parametrize(
    "text",
    ["my lab notes\nday 2\n", '{"event": "start"}\n{"event": "stop"}\n', "one line, no newline"],
)
def test_a_journal_jsonl_that_is_not_ours_is_left_untouched(tmp_path: Path, text: str):
    from matgen.evaluate.journal import Journal, JournalMismatch

    path = tmp_path / "journal.jsonl"
    path.write_text(text)
    with pytest.raises(JournalMismatch, match="is not a journal of matgen evaluate"):
        Journal(path, {"format": 1})
    assert path.read_text() == text


@pytest.mark.parametrize(
    "line", [b'{"id": "b"}', b"[1, 2]", b"null", b"3", b'{"stage": "basic"}', b'{"x": "\xff"}']
)
def test_lines_that_are_not_records_end_the_journal_like_a_torn_write(tmp_path: Path, line: bytes):
    from matgen.evaluate.journal import Journal

    path = tmp_path / "journal.jsonl"
    with Journal(path, {"format": 1}) as j:
        j.append([{"stage": "basic", "id": "a", "x": 1}])
    good = path.read_bytes()
    path.write_bytes(good + line + b'\n{"stage":"basic","id":"c","x":2}\n')
    with Journal(path, {"format": 1}) as j:
        assert list(j.records) == [("basic", "a")]
        j.append([{"stage": "basic", "id": "c", "x": 3}])
    with Journal(path, {"format": 1}) as j:
        assert {k[1]: r["x"] for k, r in j.records.items()} == {"a": 1, "c": 3}
    assert path.read_bytes().startswith(good)


def _cli(args: list[str], cache: Path):
    quick = ["--test-limit", "6", "--train-limit", "50", "--cache-dir", str(cache)]  # if it runs at all
    return evaluate_cli([*args, *quick, "--skip-stability", "--no-progress"])


def test_an_out_folder_of_ones_own_files_is_refused_not_overwritten(
    mp20_dir: Path, fp_cache: Path, tmp_path: Path
):
    """--out at a folder that holds a report.md or results.csv of the user's (no journal): nothing there
    is deleted or replaced, and the error names the files in one line."""
    cifs = tmp_path / "cifs"
    cifs.mkdir()
    write_cif(cifs / "nacl.cif", rock_salt())
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "report.md").write_text("my notes\n")
    (mine / "results.csv").write_text("a,b\n1,2\n")
    result = _cli([str(cifs), "--out", str(mine), "--data-dir", str(mp20_dir)], fp_cache)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "results.csv, report.md" in result.output and "no journal" in result.output
    assert (mine / "report.md").read_text() == "my notes\n"
    assert (mine / "results.csv").read_text() == "a,b\n1,2\n"
    assert sorted(p.name for p in mine.iterdir()) == ["report.md", "results.csv"]

    (mine / "journal.jsonl").write_text("not ours\n")
    result = _cli([str(cifs), "--out", str(mine), "--data-dir", str(mp20_dir)], fp_cache)
    assert result.exit_code == 2, result.output
    assert "is not a journal of matgen evaluate" in result.output and "kept in" not in result.output
    assert (mine / "journal.jsonl").read_text() == "not ours\n"
    assert (mine / "report.md").read_text() == "my notes\n"


def test_a_parse_error_of_several_lines_counts_as_one_reason(
    mp20_dir: Path, hull_dir: Path, fp_cache: Path, tmp_path: Path
):
    """pymatgen puts the cause of a parse error on its second line; the summary's reason counts must not
    turn that line into a category of its own ("cannot convert float NaN to integer": 1)."""
    cif = write_cif(tmp_path / "salt.cif", rock_salt()).read_text()
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "ok.cif").write_text(cif)
    x = next(line for line in cif.splitlines() if line.strip().startswith("Na"))
    (folder / "nan.cif").write_text(cif.replace(x, x.replace("0.00000000", "nan", 1)))
    summary = _cheap_evaluation(folder, tmp_path / "out", mp20_dir, hull_dir, fp_cache)
    assert summary["n_unparsable"] == 1
    assert summary["invalid_reasons"] == {"unparsable CIF": 1}, summary["invalid_reasons"]


def test_importing_matgen_silences_pymatgens_noble_gas_electronegativity_warning() -> None:
    """MP-20 test holds Ar, Xe and HeSiO2: the first evaluation printed pymatgen's "No Pauling
    electronegativity for Ar" (once per process, worker processes too) into the user's output."""
    import subprocess
    import sys

    code = "import matgen\nfrom pymatgen.core import Composition\nprint(Composition('ArXeHe2Ne').formula)\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Ar" in done.stdout and "Pauling" not in done.stderr, done.stderr


def test_coverage_cut_offs_are_a_setting_recorded_in_the_summary(
    mp20_dir: Path, fp_cache: Path, tmp_path: Path
) -> None:
    """CDVAE's coverage cut-offs are 0.4/10 for MP-20 but 0.2/4 for carbon-24 and perov-5: a data set of
    one's own needs its own, and the summary must say which were used."""
    import json

    cifs = tmp_path / "cifs"
    cifs.mkdir()
    write_cif(cifs / "nacl.cif", rock_salt())
    base = [str(cifs), "--data-dir", str(mp20_dir)]
    precision = {}
    for cuts in ("1e9,1e9", "1e-9,1e-9"):
        out = tmp_path / f"out_{cuts}"
        result = _cli([*base, "--out", str(out), "--cov-cutoffs", cuts], fp_cache)
        assert result.exit_code == 0, result.output
        summary = json.loads((out / "summary.json").read_text())
        assert summary["cov_cutoffs"] == {
            "structure": float(cuts.split(",")[0]),
            "composition": float(cuts.split(",")[1]),
        }
        assert summary["settings"]["cov_cutoffs"] == [float(c) for c in cuts.split(",")]
        assert "Coverage cut-offs: structure" in (out / "report.md").read_text()
        precision[cuts] = summary["cov_precision"]
    assert precision == {"1e9,1e9": 1.0, "1e-9,1e-9": 0.0}  # every crystal is near enough, or none is
    for bad in ("0.4", "0.4,10,3", "0,10", "0.4,-1", "0.4,nan"):
        result = _cli([*base, "--out", str(tmp_path / "bad"), "--cov-cutoffs", bad], fp_cache)
        assert result.exit_code == 2 and "cov" in result.output.lower(), (bad, result.output)
        assert not (tmp_path / "bad").exists()


def test_a_file_name_that_is_not_utf8_gets_a_printable_id_and_the_tables_are_written(
    mp20_dir: Path, hull_dir: Path, fp_cache: Path, tmp_path: Path
):
    """A CIF named with a Latin-1 byte (b'x\\xfe.cif', from an old archive) made the run fail at its very
    end: the results table could not encode the name."""
    import os

    import pandas as pd

    folder = tmp_path / "in"
    folder.mkdir()
    cif = write_cif(tmp_path / "salt.cif", rock_salt()).read_text()
    (folder / os.fsdecode(b"x\xfe.cif")).write_text(cif)
    (folder / "x\\xfe.cif").write_text(cif)  # the printable form of the other name, taken already
    assert sorted(it.id for it in read_inputs(folder)) == ["x\\xfe.cif", "x\\xfe.cif#1"]
    summary = _cheap_evaluation(folder, tmp_path / "out", mp20_dir, hull_dir, fp_cache)
    assert summary["n_inputs"] == 2 and summary["struct_valid"] == 1.0
    assert sorted(pd.read_csv(tmp_path / "out" / "results.csv")["id"]) == ["x\\xfe.cif", "x\\xfe.cif#1"]


def _cheap_evaluation(inputs: Path, out: Path, mp20_dir: Path, hull_dir: Path, fp_cache: Path) -> dict:
    """``evaluate`` without stability against a small seeded reference (a few seconds)."""
    from matgen.evaluate import evaluate

    return evaluate(
        inputs,
        out,
        data_dir=mp20_dir,
        hull=hull_dir,
        skip_stability=True,
        test_limit=6,
        train_limit=50,
        cache_dir=fp_cache,
        progress=False,
        console=False,
    )


def test_a_folder_is_read_for_poscars_and_extxyz_too_but_not_for_an_evaluations_outputs(tmp_path: Path):
    """A folder holding only a POSCAR found no crystals; and with --out inside the folder of crystals, a
    rerun read the evaluation's own relaxed candidates/*.cif as new inputs."""
    from ase.io import write as ase_write
    from pymatgen.io.ase import AseAtomsAdaptor
    from pymatgen.io.vasp import Poscar

    folder = tmp_path / "crystals"
    (folder / "vasp").mkdir(parents=True)
    write_cif(folder / "salt.cif", rock_salt())
    (folder / "vasp" / "POSCAR").write_text(str(Poscar(rock_salt(5.0))))
    atoms = AseAtomsAdaptor.get_atoms(rock_salt(5.2))
    ase_write(folder / "frames.extxyz", [atoms, atoms], format="extxyz")
    evaluation = folder / "eval"  # an evaluation's folder inside the input folder
    (evaluation / "candidates").mkdir(parents=True)
    (evaluation / "journal.jsonl").write_text('{"format": 1}\n')
    write_cif(evaluation / "candidates" / "salt.cif", rock_salt())
    items = read_inputs(folder)
    assert sorted(it.id for it in items) == ["frames.extxyz:0", "frames.extxyz:1", "salt.cif", "vasp/POSCAR"]
    assert all(it.read_error is None for it in items)


def test_summary_prints_bracketed_paths_verbatim(capsys: pytest.CaptureFixture[str]):
    """Data folders and hull files named with square brackets are text on the terminal, not rich markup."""
    from matgen.evaluate.report import print_summary

    print_summary(
        {
            "n_inputs": 1,
            "reference": "[red]my data[/red] test (2 crystals)",
            "novelty_reference": "[b]train",
            "stability_note": "CHGNet numbers [approx]",
            "hull_reference": "/data/[hull]/mp.csv",
        }
    )
    out = capsys.readouterr().out
    for text in ("[red]my data[/red] test", "[b]train", "CHGNet numbers [approx]", "/data/[hull]/mp.csv"):
        assert text in out, out
