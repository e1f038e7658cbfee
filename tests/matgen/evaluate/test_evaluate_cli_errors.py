"""`matgen evaluate` reports a missing MP-20 reference as a clear error and keeps the work done so far."""

from pathlib import Path

import pytest
from evaluate_helpers import evaluate_cli, rock_salt, write_cif


def test_missing_reference_data_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matgen.data

    def offline(url: str, target: Path, timeout: float) -> None:
        raise OSError("Name or service not known")

    monkeypatch.setattr(matgen.data, "_download", offline)
    monkeypatch.delenv("MATGEN_DATA", raising=False)
    empty = tmp_path / "no_data"
    empty.mkdir()
    cifs = tmp_path / "cifs"
    cifs.mkdir()
    write_cif(cifs / "nacl.cif", rock_salt())
    result = evaluate_cli(
        [
            str(cifs),
            "--out",
            str(tmp_path / "out"),
            "--skip-stability",
            "--data-dir",
            str(empty),
            "--no-progress",
        ],
    )
    assert result.exit_code == 2
    assert "MATGEN_DATA" in result.output and "--data-dir" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()  # refused before any crystal was evaluated


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [("--device", "cuda:7", "CUDA"), ("--device", "tpu", "unknown device"), ("--hull", "missing", "hull")],
)
def test_a_bad_device_or_hull_fails_before_any_work(
    tmp_path: Path, flag: str, value: str, message: str
) -> None:
    import torch

    if value.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    cifs = tmp_path / "cifs"
    cifs.mkdir()
    write_cif(cifs / "nacl.cif", rock_salt())
    value = str(tmp_path / value) if flag == "--hull" else value
    args = [str(cifs), "--out", str(tmp_path / "out"), flag, value, "--no-progress"]
    result = evaluate_cli(args)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fmax", "nan"], "fmax must be a positive number"),
        (["--fmax", "0"], "fmax must be a positive number"),
        (["--relax-steps", "0"], "relax_steps must be at least 1"),
        (["--test-limit", "0"], "test_limit must be at least 1"),
        (["--train-limit", "-5"], "train_limit must be at least 1"),
        (["--batch-atoms", "0"], "batch_atoms must be at least 1"),
        (["--workers", "-1"], "workers must be >= 0"),
        (["--out", "{tmp}/a_file"], "is a file, not a folder"),
    ],
)
def test_impossible_settings_are_refused_before_any_work(
    tmp_path: Path, args: list[str], message: str
) -> None:
    cifs = tmp_path / "cifs"
    cifs.mkdir()
    write_cif(cifs / "nacl.cif", rock_salt())
    (tmp_path / "a_file").write_text("keep me")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    base = [str(cifs), "--skip-stability", "--no-progress"]
    if "--out" not in args:
        base += ["--out", str(tmp_path / "out")]
    result = evaluate_cli([*base, *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert "kept in" not in result.output  # nothing was computed, so nothing is claimed to be kept
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "a_file").read_text() == "keep me"
