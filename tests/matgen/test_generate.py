"""Training a tiny crystal model, generating CIFs from it, and the matgen CLI around both."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pymatgen.core import Structure
from typer.testing import CliRunner

from cli.matgen import app
from dfm_core.checkpoints import export_safetensors, load_safetensors
from dfm_core.training import TrainConfig
from matgen import tokenizer as tok
from matgen.generate import generate
from matgen.model import CrystalDiTConfig
from matgen.sampling import DEFAULT_CHECKPOINT, CheckpointError, CrystalGenerator, coincident_atom_mask
from matgen.train import MatgenTrainConfig, train_crystal_model

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_run(shared_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny KO-DFM model trained for 60 steps on 64 MP-20 crystals (a few seconds on CPU)."""
    run_dir = tmp_path_factory.mktemp("tiny_run")
    cfg = MatgenTrainConfig(
        model=CrystalDiTConfig.tiny(),
        train=TrainConfig(
            steps=60,
            batch_size=32,
            lr=3e-3,
            warmup_steps=0,
            eval_every=30,
            eval_batches=2,
            ckpt_every=30,
            log_every=10,
            device="cpu",
            ema_decay=0.5,
            bf16=False,
        ),
        data_dir=str(shared_data_dir / "mp_20"),
        train_limit=64,
        val_limit=32,
    )
    train_crystal_model(cfg, run_dir, resume=False, progress=False)
    return run_dir


def _cif_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("crystal_*.cif"))


def _rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "samples.csv") as f:
        return list(csv.DictReader(f))


def test_training_loss_falls_and_checkpoint_has_metadata(tiny_run: Path) -> None:
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if "loss" in r and r.get("split", "train") == "train"]
    assert len(train_losses) >= 4
    assert train_losses[-1] < train_losses[0] - 0.5, train_losses
    gen = CrystalGenerator.from_checkpoint(tiny_run / "model.safetensors", device="cpu")
    meta = gen.metadata
    assert meta["kind"] == "dfm" and meta["scheduler"] == "ko"
    assert meta["data"]["n_train"] == 64 and len(meta["data"]["train_ids_sha256"]) == 64
    dist = gen.atom_count_distribution()
    assert dist[0] == 0 and abs(float(dist.sum()) - 1) < 1e-9


def test_a_time_budgeted_run_exports_the_step_count_it_ran(shared_data_dir: Path, tmp_path: Path) -> None:
    cfg = MatgenTrainConfig(
        model=CrystalDiTConfig.tiny(),
        train=TrainConfig(
            steps=100_000, batch_size=8, eval_every=0, device="cpu", time_budget_s=1.0, bf16=False
        ),
        data_dir=str(shared_data_dir / "mp_20"),
        train_limit=16,
        val_limit=8,
    )
    result = train_crystal_model(cfg, tmp_path, resume=False, progress=False)
    assert 1 < result.step < 100_000
    meta = CrystalGenerator.from_checkpoint(tmp_path / "model.safetensors", device="cpu").metadata
    assert meta["step"] == result.step and meta["matgen_config"]["train"]["steps"] == result.step
    assert meta["matgen_config"]["train"]["time_budget_s"] == 1.0


def test_generate_writes_parseable_cifs_and_table(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "cifs"
    summary = generate(
        8,
        out,
        checkpoint=tiny_run / "model.safetensors",
        steps=12,
        batch_size=3,
        device="cpu",
        progress=False,
    )
    rows = _rows(out)
    assert [r["id"] for r in rows] == [f"crystal_{i:06d}" for i in range(8)]
    assert summary.written + summary.failed == 8
    files = _cif_files(out)
    assert len(files) == summary.written == sum(1 for r in rows if r["file"])
    for r in rows:
        if r["file"]:
            s = Structure.from_file(out / r["file"])
            assert len(s) == int(r["num_atoms"])
            assert s.composition.reduced_formula == r["formula"]
        else:
            assert r["error"]  # every sequence that did not decode says why
    assert not list(out.glob(".*tmp*"))  # no temp files left behind


def test_seed_reproduces_and_differs(tiny_run: Path, tmp_path: Path) -> None:
    ck = tiny_run / "model.safetensors"
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        generate(
            6,
            tmp_path / name,
            checkpoint=ck,
            steps=10,
            batch_size=4,
            device="cpu",
            seed=seed,
            num_atoms=4,
            progress=False,
        )
    a, b, c = (sorted((tmp_path / n).glob("*.cif")) for n in "abc")
    assert [f.read_text() for f in a] == [f.read_text() for f in b]
    assert (tmp_path / "a" / "samples.csv").read_text() == (tmp_path / "b" / "samples.csv").read_text()
    assert (tmp_path / "a" / "samples.csv").read_text() != (tmp_path / "c" / "samples.csv").read_text()


def test_worker_processes_write_the_same_files(tiny_run: Path, tmp_path: Path) -> None:
    ck = tiny_run / "model.safetensors"
    generate(7, tmp_path / "w0", checkpoint=ck, steps=6, batch_size=4, device="cpu", seed=5, progress=False)
    generate(
        7,
        tmp_path / "w2",
        checkpoint=ck,
        steps=6,
        batch_size=4,
        device="cpu",
        seed=5,
        progress=False,
        workers=2,
    )
    assert (tmp_path / "w0" / "samples.csv").read_text() == (tmp_path / "w2" / "samples.csv").read_text()
    assert [f.read_text() for f in _cif_files(tmp_path / "w0")] == [
        f.read_text() for f in _cif_files(tmp_path / "w2")
    ]


def test_elements_constraint_holds(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "lifepo"
    summary = generate(
        8,
        out,
        checkpoint=tiny_run / "model.safetensors",
        steps=10,
        batch_size=8,
        device="cpu",
        elements=["Li", "Fe", "P", "O"],
        progress=False,
    )
    rows = _rows(out)
    assert all(r["constraint"] == "elements=Li,Fe,P,O" for r in rows)
    for f in _cif_files(out):
        assert {el.symbol for el in Structure.from_file(f).composition.elements} <= {"Li", "Fe", "P", "O"}
    # the same, from the returned summary, as a notebook reads it
    assert list(summary.samples()["id"]) == [r["id"] for r in rows] and len(rows) == 8
    structures = summary.structures()
    assert len(structures) == summary.written == len(_cif_files(out))
    assert all(
        {el.symbol for el in s.composition.elements} <= {"Li", "Fe", "P", "O"} for s in structures.values()
    )
    # token-level check independent of decoding: every element slot holds one of the four
    gen = CrystalGenerator.from_checkpoint(tiny_run / "model.safetensors", device="cpu")
    tokens = gen.sample_tokens(
        torch.tensor([3, 5]),
        steps=5,
        elements=["Li", "Fe", "P", "O"],
        generator=torch.Generator().manual_seed(0),
    )
    from matgen.tokenizer import element_token

    allowed = {element_token(s) for s in ("Li", "Fe", "P", "O")}
    for row, n in zip(tokens, (3, 5), strict=True):
        assert {int(row[6 + 4 * i]) for i in range(n)} <= allowed


def test_elements_the_model_never_saw_in_training_are_named_in_a_warning(
    tiny_run: Path, tmp_path: Path, shared_data_dir: Path
) -> None:
    from pymatgen.core import Composition

    from matgen.data import load_split

    frame = load_split("train", shared_data_dir / "mp_20", limit=64)
    expected: dict[str, int] = {}
    for formula in frame["pretty_formula"]:
        for el in Composition(formula).elements:
            expected[el.symbol] = expected.get(el.symbol, 0) + 1
    _, meta = load_safetensors(tiny_run / "model.safetensors")
    assert meta["data"]["train_element_counts"] == expected
    never = next(s for s in tok.ELEMENT_SYMBOLS if s not in expected)
    seen = sorted(expected, key=expected.get)[-2:]
    run = dict(checkpoint=tiny_run / "model.safetensors", steps=2, device="cpu", progress=False)
    with pytest.warns(
        UserWarning, match=rf"no training crystal of model.safetensors holds {never}:"
    ) as caught:
        generate(1, tmp_path / "a", elements=[*seen, never], **run)
    assert caught[0].filename == __file__  # attributed to the caller's line, not to matgen's internals
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(1, tmp_path / "b", elements=seen, **run)
    shipped = CrystalGenerator.from_checkpoint(device="cpu")  # made before the counts were kept
    assert shipped.unseen_elements(["Fe", "Ar", "O", "Ra"]) == ["Ar", "Ra"]


def test_the_recorded_facts_of_mp20_train_hold_for_the_shared_copy(shared_data_dir: Path) -> None:
    from pymatgen.core import Composition

    from matgen.data import MP20_TRAIN_ABSENT_ELEMENTS, MP20_TRAIN_IDS_SHA256, load_split
    from matgen.train import ids_digest

    frame = load_split("train", shared_data_dir / "mp_20")
    assert ids_digest(list(frame["material_id"])) == MP20_TRAIN_IDS_SHA256
    present = {el.symbol for formula in frame["pretty_formula"] for el in Composition(formula).elements}
    assert [s for s in tok.ELEMENT_SYMBOLS if s not in present] == list(MP20_TRAIN_ABSENT_ELEMENTS)


def test_resume_after_crash_equals_uninterrupted_run(tiny_run: Path, tmp_path: Path) -> None:
    ck = tiny_run / "model.safetensors"
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    generate(7, full, checkpoint=ck, steps=8, batch_size=3, device="cpu", seed=3, progress=False)
    generate(7, crashed, checkpoint=ck, steps=8, batch_size=3, device="cpu", seed=3, progress=False)
    # simulate a kill in the middle of batch 1: its rows are torn and one of its CIFs is missing
    text = (crashed / "samples.csv").read_text().splitlines(keepends=True)
    kept = [line for line in text if not line.split(",")[-2:-1] == ["1"]]
    torn = [line for line in text if line.split(",")[-2:-1] == ["1"]][:1]
    (crashed / "samples.csv").write_text("".join(kept[:3] + [torn[0][:10]]) if torn else "".join(kept[:3]))
    for f in _cif_files(crashed)[3:]:
        f.unlink()
    with pytest.raises(FileExistsError):
        generate(7, crashed, checkpoint=ck, steps=8, batch_size=3, device="cpu", seed=3, progress=False)
    with pytest.raises(ValueError, match="settings differ"):
        generate(
            7,
            crashed,
            checkpoint=ck,
            steps=9,
            batch_size=3,
            device="cpu",
            seed=3,
            resume=True,
            progress=False,
        )
    generate(
        7, crashed, checkpoint=ck, steps=8, batch_size=3, device="cpu", seed=3, resume=True, progress=False
    )
    rows_full = sorted(_rows(full), key=lambda r: r["id"])
    rows_crashed = sorted(_rows(crashed), key=lambda r: r["id"])
    assert rows_full == rows_crashed and len(rows_full) == 7
    assert [f.read_text() for f in _cif_files(full)] == [f.read_text() for f in _cif_files(crashed)]


def test_temperature_defaults_to_the_checkpoints_recommendation(tiny_run: Path, tmp_path: Path) -> None:
    from dfm_core.checkpoints import export_safetensors, load_safetensors

    state, meta = load_safetensors(tiny_run / "model.safetensors")
    export_safetensors(state, tmp_path / "rec.safetensors", {**meta, "sampling": {"temperature": 1.3}})
    generate(
        2, tmp_path / "a", checkpoint=tmp_path / "rec.safetensors", steps=3, device="cpu", progress=False
    )
    generate(
        2, tmp_path / "b", checkpoint=tiny_run / "model.safetensors", steps=3, device="cpu", progress=False
    )
    assert json.loads((tmp_path / "a" / "generation.json").read_text())["temperature"] == 1.3
    assert json.loads((tmp_path / "b" / "generation.json").read_text())["temperature"] == 0.7
    with pytest.raises(ValueError, match="temperature"):
        generate(
            2,
            tmp_path / "c",
            checkpoint=tmp_path / "rec.safetensors",
            steps=3,
            temperature=0.0,
            progress=False,
        )


def test_bad_checkpoints_give_clear_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        CrystalGenerator.from_checkpoint(garbage)
    with pytest.raises(CheckpointError, match="not found"):
        CrystalGenerator.from_checkpoint(tmp_path / "missing.safetensors")
    from dfm_core.checkpoints import export_safetensors

    other = tmp_path / "other.safetensors"
    export_safetensors({"w": torch.zeros(2)}, other, {"format": "something-else"})
    with pytest.raises(CheckpointError, match="not a matgen checkpoint"):
        CrystalGenerator.from_checkpoint(other)


def test_a_training_checkpoint_points_to_the_exported_model(tiny_run: Path) -> None:
    with pytest.raises(CheckpointError, match="torch .pt") as err:
        CrystalGenerator.from_checkpoint(tiny_run / "last.pt")
    assert str(tiny_run / "model.safetensors") in str(err.value)


def test_cli_generate_and_refusals(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    ck = str(tiny_run / "model.safetensors")
    args = [
        "generate",
        "--n",
        "4",
        "--out",
        str(out),
        "--checkpoint",
        ck,
        "--steps",
        "6",
        "--device",
        "cpu",
        "--quiet",
        "--num-atoms",
        "2",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "samples.csv" in result.output
    assert len(_rows(out)) == 4
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    bad = runner.invoke(app, [*args[:4], str(tmp_path / "x"), *args[5:], "--elements", "Li,Xx"])
    assert bad.exit_code == 2 and "Xx" in bad.output
    assert not (tmp_path / "x" / "samples.csv").exists()
    over = runner.invoke(app, [*args, "--overwrite"])
    assert over.exit_code == 0, over.output


def test_cli_train_tiny(shared_data_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "train",
            "--run-dir",
            str(run_dir),
            "--size",
            "tiny",
            "--steps",
            "4",
            "--batch-size",
            "8",
            "--device",
            "cpu",
            "--data-dir",
            str(shared_data_dir / "mp_20"),
            "--train-limit",
            "16",
            "--val-limit",
            "8",
            "--max-atoms",
            "10",
            "--export",
            str(tmp_path / "half.safetensors"),
            "--export-bf16",
            "--time-budget",
            "5",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (run_dir / "model.safetensors").is_file()
    assert json.loads((run_dir / "config.json").read_text())["train"]["time_budget_s"] == 300.0
    from dfm_core.checkpoints import load_safetensors

    full, _ = load_safetensors(run_dir / "model.safetensors")
    half, _ = load_safetensors(tmp_path / "half.safetensors")
    assert {t.dtype for t in half.values() if t.is_floating_point()} == {torch.bfloat16}
    assert all(torch.equal(half[k], full[k].to(half[k].dtype)) for k in full)
    written = generate(
        3, tmp_path / "from_half", checkpoint=tmp_path / "half.safetensors", steps=4, device="cpu"
    )
    assert written.requested == 3 and written.written + written.failed == 3
    meta = json.loads((run_dir / "config.json").read_text())["metadata"]
    data = meta["data"]  # crystals above --max-atoms are left out, and counted
    assert meta["model_config"]["max_atoms"] == 10 and data["train_over_max_atoms"] > 0
    assert data["n_train"] + data["train_over_max_atoms"] + data["train_skipped"] == 16
    bad = runner.invoke(app, ["train", "--run-dir", str(tmp_path / "r2"), "--size", "huge"])
    assert bad.exit_code == 2 and "--size" in bad.output


@pytest.mark.skipif(not DEFAULT_CHECKPOINT.is_file(), reason="the shipped checkpoint is not in this checkout")
def test_shipped_checkpoint_generates_valid_crystals(tmp_path: Path) -> None:
    gen = CrystalGenerator.from_checkpoint(device="cpu")
    assert gen.metadata["kind"] == "dfm" and gen.metadata["data"]["n_train"] > 27000
    out = tmp_path / "shipped"
    summary = generate(16, out, steps=100, batch_size=16, device="cpu", seed=0, progress=False)
    # a trained model mostly writes decodable crystals (about 3 in 4 for the shipped one); an untrained or
    # mis-loaded one writes almost none
    assert summary.written >= 8, summary
    from matgen.evaluate.validity import structure_validity

    valid = [structure_validity(Structure.from_file(f))[0] for f in _cif_files(out)]
    assert sum(valid) >= 6
    shutil.rmtree(out)


CONFIG_DIR = Path(__file__).resolve().parents[2] / "matgen" / "configs"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIG_DIR.glob("*.toml")))
def test_shipped_training_configs_load(name: str) -> None:
    from dfm_core.nn import count_parameters
    from matgen.model import build_model
    from matgen.train import load_train_config

    cfg = load_train_config(CONFIG_DIR / name)
    assert cfg.kind == "dfm" and cfg.scheduler == "ko" and cfg.train.steps > 0
    if "ship" in name:  # a config meant to make the shipped model must fit the repo's ~25 MB in bf16
        assert 2 * count_parameters(build_model(cfg.kind, cfg.model)) < 25e6


def test_a_shipped_config_is_found_from_any_folder_by_its_path_in_the_repo_or_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An installed package has no matgen/configs/ under the user's folder: the README's
    `--config matgen/configs/ko_dfm_small_cpu.toml` must still find the file that ships with it."""
    from matgen.train import load_train_config

    monkeypatch.chdir(tmp_path)
    expected = load_train_config(CONFIG_DIR / "ko_dfm_small_cpu.toml")
    assert load_train_config("matgen/configs/ko_dfm_small_cpu.toml") == expected
    assert load_train_config("ko_dfm_small_cpu") == expected
    (tmp_path / "ko_dfm_small_cpu.toml").write_text('kind = "dfm"\nscheduler = "linear"\n')
    assert load_train_config("ko_dfm_small_cpu.toml").scheduler == "linear"  # a file of one's own wins
    with pytest.raises(FileNotFoundError, match=r"nope.toml \(the shipped configs are: ko_dfm_default_gpu, "):
        load_train_config("nope.toml")
    with pytest.raises(FileNotFoundError, match=r"config file not found: /nowhere/x.toml$"):
        load_train_config("/nowhere/x.toml")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": float("nan")}, "temperature must be a positive number"),
        ({"temperature": float("inf")}, "temperature must be a positive number"),
        ({"velocity": "foo"}, "velocity"),
        ({"scheduler": "foo"}, "foo"),
        ({"num_atoms": 3.5}, "whole number"),
        ({"elements": "Fe,Xx"}, "unknown element"),
    ],
)
def test_rejected_settings_leave_no_output_folder(tiny_run: Path, tmp_path: Path, kwargs, message) -> None:
    out = tmp_path / "never"
    with pytest.raises(ValueError, match=message):
        generate(
            2, out, checkpoint=tiny_run / "model.safetensors", steps=2, device="cpu", progress=False, **kwargs
        )
    assert not out.exists()  # so the corrected command can run into the same folder


def test_output_path_that_is_a_file_is_refused(tiny_run: Path, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("keep")
    with pytest.raises(ValueError, match="not a folder"):
        generate(
            2, tmp_path / "afile", checkpoint=tiny_run / "model.safetensors", device="cpu", progress=False
        )
    assert (tmp_path / "afile").read_text() == "keep"


def test_resume_regenerates_a_batch_whose_cif_was_deleted(tiny_run: Path, tmp_path: Path) -> None:
    run = dict(checkpoint=tiny_run / "model.safetensors", steps=4, batch_size=4, device="cpu", progress=False)
    generate(8, tmp_path / "ref", **run)
    generate(8, tmp_path / "x", **run)
    victim = _cif_files(tmp_path / "x")[0]  # batch 0: redone after batch 1 is kept
    victim.unlink()
    summary = generate(8, tmp_path / "x", resume=True, **run)
    assert summary.skipped_batches == 1 and victim.is_file()
    assert [f.read_text() for f in _cif_files(tmp_path / "x")] == [
        f.read_text() for f in _cif_files(tmp_path / "ref")
    ]
    # rows in the order of a fresh run
    assert (tmp_path / "x" / "samples.csv").read_text() == (tmp_path / "ref" / "samples.csv").read_text()
    whole = victim.read_text()
    for damaged in ("", whole[: len(whole) // 2], "junk\n"):  # emptied, cut short, overwritten
        victim.write_text(damaged)
        summary = generate(8, tmp_path / "x", resume=True, **run)
        assert summary.skipped_batches == 1 and victim.read_text() == whole
    # zeroed bytes in a row of samples.csv (a block a crash left as NULs): that batch is redone, cleanly
    listing = (tmp_path / "x" / "samples.csv").read_text().splitlines(keepends=True)
    row = listing[1]
    listing[1] = row[:3] + "\x00" * 6 + row[9:]
    (tmp_path / "x" / "samples.csv").write_text("".join(listing))
    summary = generate(8, tmp_path / "x", resume=True, **run)
    assert summary.skipped_batches == 1
    assert (tmp_path / "x" / "samples.csv").read_text() == (tmp_path / "ref" / "samples.csv").read_text()


def test_element_order_and_repeats_do_not_change_the_run(tiny_run: Path, tmp_path: Path) -> None:
    run = dict(checkpoint=tiny_run / "model.safetensors", steps=3, batch_size=2, device="cpu", progress=False)
    generate(2, tmp_path / "x", elements="Li,O,Li", **run)
    assert all(r["constraint"] == "elements=Li,O" for r in _rows(tmp_path / "x"))
    summary = generate(4, tmp_path / "y", elements=["O", "Li"], **run)
    again = generate(4, tmp_path / "y", elements=["Li", "O"], resume=True, **run)  # same system: resumes
    assert summary.skipped_batches == 0 and again.skipped_batches == 2
    from matgen.sampling import normalize_elements

    assert normalize_elements("li, FE ,o") == ["Li", "Fe", "O"]
    cases = (
        ("", "no element symbols"),
        ("Am,Fe", "stops at Pu"),
        ("Li,Xx", "unknown element"),
        ("D,O", "D is an isotope of hydrogen"),
        ("Fe;O", r"\['Fe;O'\]: separate symbols with commas"),  # as typed, not 'Fe;o'
    )
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            normalize_elements(bad)
    result = runner.invoke(app, ["generate", "--n", "1", "--out", str(tmp_path / "z"), "--elements", ""])
    assert result.exit_code == 2 and "no element symbols" in result.output


def test_tampered_atom_count_distribution_is_a_checkpoint_error(tiny_run: Path, tmp_path: Path) -> None:
    state, meta = load_safetensors(tiny_run / "model.safetensors")
    bad_temperature = tmp_path / "hot.safetensors"
    export_safetensors(
        {k: v.contiguous() for k, v in state.items()},
        bad_temperature,
        {**meta, "sampling": {"temperature": "hot"}},
    )
    with pytest.raises(CheckpointError, match="hot.safetensors.*'hot' is not a number"):
        generate(2, tmp_path / "out", checkpoint=bad_temperature, steps=2, device="cpu", progress=False)
    for bad in ([-1.0] * 21, [1.0] * 5, "x"):
        path = tmp_path / "bad.safetensors"
        export_safetensors(
            {k: v.contiguous() for k, v in state.items()}, path, {**meta, "atom_count_distribution": bad}
        )
        with pytest.raises(CheckpointError, match="atom_count_distribution"):
            generate(2, tmp_path / "out", checkpoint=path, steps=2, device="cpu", progress=False)
    with pytest.raises(CheckpointError, match="is a folder.*model.safetensors"):
        generate(2, tmp_path / "out", checkpoint=tiny_run, steps=2, device="cpu", progress=False)


def test_coincident_atom_mask_finds_shared_sites_modulo_one() -> None:
    def atom(z: int, *fracs: float) -> list[int]:
        return [tok.ELEMENT_OFFSET + z - 1] + [tok.FRAC_OFFSET + round(f * 100) for f in fracs]

    lattice = [tok.LENGTH_OFFSET + 40] * 3 + [tok.ANGLE_OFFSET + 90] * 3
    rows = [
        lattice + atom(8, 0.0, 0.5, 0.5) + atom(8, 1.0, 0.5, 0.5) + atom(3, 0.5, 0.5, 0.5),  # 0.00 == 1.00
        lattice + atom(8, 0.1, 0.2, 0.3) + atom(3, 0.1, 0.2, 0.3) + atom(3, 0.1, 0.2, 0.3),  # three on one
        lattice + atom(8, 0.1, 0.2, 0.3) + atom(3, 0.1, 0.2, 0.31) + [tok.PAD_ID] * 4,  # padding ignored
    ]
    tokens, counts = torch.tensor(rows), torch.tensor([3, 3, 2])
    mask = coincident_atom_mask(tokens, counts)
    assert mask.tolist() == [[False, True, False], [False, True, True], [False, False, False]]
    # the decoder agrees: exactly the flagged crystals have two atoms on one site
    for seq, flagged in zip(tokens, mask.any(1).tolist(), strict=True):
        structure = tok.CrystalTokenizer().decode(seq)
        distances = structure.distance_matrix + 9.0 * np.eye(len(structure))
        assert (distances.min() < 1e-3) == flagged


def test_resampling_redraws_only_the_coordinates_of_coinciding_atoms(tiny_run: Path) -> None:
    gen = CrystalGenerator.from_checkpoint(tiny_run / "model.safetensors", device="cpu")
    counts = torch.full((12,), 5)
    g = torch.Generator().manual_seed(3)
    tokens = gen.sample_tokens(counts, steps=10, generator=g)
    tokens[:8, 6 + 4 * 2 + 1 : 6 + 4 * 3] = tokens[:8, 6 + 1 : 6 + 4]  # atom 2 onto atom 0's site
    before = coincident_atom_mask(tokens, counts)
    assert before[:8, 2].all()
    fixed, resampled = gen.resample_coincident_atoms(tokens, counts, rounds=4, steps=10, generator=g)
    changed = fixed != tokens
    redrawn = torch.zeros_like(changed)
    redrawn[:, 6:].view(12, 5, 4)[..., 1:] = before[:, :, None]
    assert not (changed & ~redrawn).any()  # lattice, elements and the other atoms are kept
    assert (resampled[:8] >= 1).all() and (resampled[before.any(1) == 0] == 0).all()
    after = coincident_atom_mask(fixed, counts)
    assert int(after.sum()) < int(before.sum())
    coords = fixed[:, 6:].view(12, 5, 4)[..., 1:]
    assert ((coords >= tok.FRAC_OFFSET) & (coords < tok.FRAC_OFFSET + tok.NUM_FRAC_TOKENS)).all()


def test_generate_with_resampling_keeps_untouched_crystals_and_records_redraws(
    tiny_run: Path, tmp_path: Path
) -> None:
    kw = dict(checkpoint=tiny_run / "model.safetensors", steps=10, batch_size=16, device="cpu", seed=5)
    plain = generate(16, tmp_path / "plain", progress=False, **kw)
    fixed = generate(16, tmp_path / "fixed", progress=False, resample_collisions=3, **kw)
    rows_plain, rows_fixed = _rows(tmp_path / "plain"), _rows(tmp_path / "fixed")
    for p, f in zip(rows_plain, rows_fixed, strict=True):
        if f["resampled_atoms"] == "0":  # not touched: the very same crystal as without resampling
            assert (
                p["file"]
                and (tmp_path / "plain" / p["file"]).read_text()
                == (tmp_path / "fixed" / f["file"]).read_text()
            )
    assert all(r["resampled_atoms"] == "" for r in rows_plain)
    assert fixed.resampled >= 1 and fixed.written > plain.written  # this seed has shared sites to fix
    assert fixed.resampled == sum(1 for r in rows_fixed if r["file"] and r["resampled_atoms"] != "0")
    settings = json.loads((tmp_path / "fixed" / "generation.json").read_text())
    assert settings["resample_collisions"] == 3
    assert "resample_collisions" not in json.loads((tmp_path / "plain" / "generation.json").read_text())
    with pytest.raises(ValueError, match="resample_collisions"):
        generate(2, tmp_path / "bad", progress=False, resample_collisions=-1, **kw)


def test_sampler_options_are_refused_for_an_autoregressive_checkpoint(
    shared_data_dir: Path, tmp_path: Path
) -> None:
    cfg = MatgenTrainConfig(
        kind="ar",
        model=CrystalDiTConfig.tiny(),
        train=TrainConfig(steps=2, batch_size=4, eval_every=0, device="cpu", bf16=False),
        data_dir=str(shared_data_dir / "mp_20"),
        train_limit=8,
        val_limit=4,
    )
    train_crystal_model(cfg, tmp_path / "ar", resume=False, progress=False)
    with pytest.raises(ValueError, match="autoregressive"):
        generate(
            2,
            tmp_path / "out",
            checkpoint=tmp_path / "ar" / "model.safetensors",
            device="cpu",
            resample_collisions=2,
            progress=False,
        )
    assert not (tmp_path / "out").exists()
    for kwargs in ({"velocity": "power-inf"}, {"corrector": 1.0}, {"scheduler": "linear"}):
        with pytest.raises(ValueError, match="do not apply"):
            generate(2, tmp_path / "out", checkpoint=tmp_path / "ar" / "model.safetensors", **kwargs)
    assert not (tmp_path / "out").exists()
    # the AR baseline samples well-formed crystals with the atom counts it was given (E.2)
    summary = generate(
        3,
        tmp_path / "ar_out",
        checkpoint=tmp_path / "ar" / "model.safetensors",
        device="cpu",
        num_atoms=2,
        progress=False,
    )
    assert summary.written + summary.failed == 3


def _brute_force_groups(values: list[int], sizes: list[int], max_groups: int, group_cost: float) -> float:
    """Least cost over every split of the sorted distinct counts into at most max_groups ranges."""
    from itertools import combinations

    best = float("inf")
    m = len(values)
    for k in range(1, min(max_groups, m) + 1):
        for cuts in combinations(range(1, m), k - 1):
            bounds = [0, *cuts, m]
            cost = sum(
                sum(sizes[bounds[g] : bounds[g + 1]]) * (6 + values[bounds[g + 1] - 1]) + group_cost
                for g in range(k)
            )
            best = min(best, cost)
    return best


def test_length_groups_partition_the_batch_at_least_cost() -> None:
    from matgen.sampling import length_groups

    rng = torch.Generator().manual_seed(0)
    for trial in range(30):
        counts = torch.randint(1, 21, (int(torch.randint(1, 200, (1,), generator=rng)),), generator=rng)
        k, cost_per_group = int(torch.randint(1, 8, (1,), generator=rng)), float(trial % 3) * 40.0
        groups = length_groups(counts, k, group_cost=cost_per_group)
        rows = torch.cat(groups)
        assert sorted(rows.tolist()) == list(range(len(counts)))  # every row once
        assert 1 <= len(groups) <= k
        ranges = [(int(counts[g].min()), int(counts[g].max())) for g in groups]
        assert all(hi < lo for (_, hi), (lo, _) in zip(ranges, ranges[1:], strict=False))  # disjoint, sorted
        cost = sum(len(g) * (6 + hi) + cost_per_group for g, (_, hi) in zip(groups, ranges, strict=True))
        values, sizes = torch.unique(counts, return_counts=True)
        expected = _brute_force_groups(values.tolist(), sizes.tolist(), k, cost_per_group)
        assert cost == pytest.approx(expected)
    same = torch.tensor([3, 9, 1, 9])
    assert [g.tolist() for g in length_groups(same, 1)] == [[0, 1, 2, 3]]  # one group keeps the order
    with pytest.raises(ValueError, match="max_groups"):
        length_groups(same, 0)


def test_grouped_sampling_gives_well_formed_rows_and_reproduces(tiny_run: Path) -> None:
    gen = CrystalGenerator.from_checkpoint(tiny_run / "model.safetensors", "cpu")
    counts = torch.tensor([1, 9, 2, 10, 2, 5, 9, 1])
    runs = [
        gen.sample_tokens(counts, steps=6, generator=torch.Generator().manual_seed(4), length_buckets=k)
        for k in (4, 4, 1)
    ]
    assert torch.equal(runs[0], runs[1])
    assert runs[0].shape == runs[2].shape == (8, 6 + 4 * 10)
    for tokens in runs:
        decoded = 0
        for row, a in zip(tokens, counts.tolist(), strict=True):
            assert (row[6 + 4 * a :] == tok.PAD_ID).all() and (row[: 6 + 4 * a] != tok.PAD_ID).all()
            assert (row != tok.MASK_ID).all()
            structure, _ = tok.CrystalTokenizer().try_decode(row)
            decoded += structure is not None and len(structure) == a
        assert decoded >= 4


def test_skipping_crystals_that_do_not_change_keeps_the_samples(tiny_run: Path) -> None:
    """Each crystal goes through the network only in the steps where it changes, with its own atom count:
    the same tokens as running every crystal in every step (up to float rounding of other batch sizes, which
    could flip a rare draw; here it flips none)."""
    gen = CrystalGenerator.from_checkpoint(tiny_run / "model.safetensors", "cpu")
    counts = torch.tensor([1, 9, 2, 10, 2, 5, 9, 1, 3, 7, 4, 6])
    skipped, full = (
        gen.sample_tokens(counts, steps=60, generator=torch.Generator().manual_seed(5), skip_idle_rows=skip)
        for skip in (True, False)
    )
    assert (skipped == full).all(1).sum() >= len(counts) - 1


def test_resuming_a_folder_keeps_the_grouping_it_was_written_with(tiny_run: Path, tmp_path: Path) -> None:
    """A folder written without grouping (as before the option) resumes without it, whatever the default."""
    ck = tiny_run / "model.safetensors"
    kw = dict(checkpoint=ck, steps=6, batch_size=4, device="cpu", seed=2, progress=False)
    generate(8, tmp_path / "whole", length_buckets=1, **kw)
    generate(8, tmp_path / "cut", length_buckets=1, **kw)
    lines = (tmp_path / "cut" / "samples.csv").read_text().splitlines(keepends=True)
    (tmp_path / "cut" / "samples.csv").write_text("".join(lines[:5]))  # header + batch 0 only
    assert "length_buckets" not in json.loads((tmp_path / "cut" / "generation.json").read_text())
    generate(8, tmp_path / "cut", resume=True, **kw)  # default grouping: taken from the folder
    assert (tmp_path / "cut" / "samples.csv").read_text() == (tmp_path / "whole" / "samples.csv").read_text()
    with pytest.raises(ValueError, match="length_buckets"):
        generate(8, tmp_path / "cut", resume=True, length_buckets=3, **kw)
    generate(8, tmp_path / "grouped", length_buckets=3, **kw)
    assert json.loads((tmp_path / "grouped" / "generation.json").read_text())["length_buckets"] == 3


def test_training_lists_the_rows_it_left_out(shared_data_dir: Path, tmp_path: Path) -> None:
    """A data folder with a broken CIF and an uncovered element: training goes on and names both rows."""
    import pandas as pd

    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "val"):
        frame = pd.read_csv(shared_data_dir / "mp_20" / f"{split}.csv.gz").head(12)
        if split == "train":
            americium = Structure(np.eye(3) * 4.0, ["Am"], [[0, 0, 0]]).to(fmt="cif")
            shared = Structure(
                np.eye(3) * 4.0,
                ["Mg", "O", "O"],
                [[0, 0, 0], [0.5, 0.5, 0.5], [0, 0, 0]],
                validate_proximity=False,
            ).to(fmt="cif")  # matgen evaluate reads it as written; training must not learn from it
            extra = pd.DataFrame(
                {
                    "material_id": ["bad-cif", "am-1", "shared-site", "two-crystals"],
                    "cif": ["data_x\nnot a cif", americium, shared, frame["cif"][0] + "\n" + frame["cif"][1]],
                }
            )
            frame = pd.concat([frame, extra], ignore_index=True)
        frame.to_csv(data / f"{split}.csv", index=False)
    cfg = MatgenTrainConfig(
        model=CrystalDiTConfig.tiny(),
        train=TrainConfig(steps=1, batch_size=4, eval_every=0, device="cpu"),
        data_dir=str(data),
    )
    with pytest.warns(UserWarning, match="left out 4 train rows"):
        train_crystal_model(cfg, tmp_path / "run", progress=False)
    listed = list(csv.DictReader((tmp_path / "run" / "skipped_rows.csv").open()))
    assert {r["material_id"] for r in listed} == {"bad-cif", "am-1", "shared-site", "two-crystals"}
    assert {r["split"] for r in listed} == {"train"}
    assert "Z=95" in next(r["reason"] for r in listed if r["material_id"] == "am-1")


def test_ctrl_c_says_what_is_kept_and_how_to_go_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matgen.evaluate
    import matgen.generate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(matgen.generate, "generate", interrupted)
    result = runner.invoke(app, ["generate", "--n", "2", "--out", str(tmp_path / "g")])
    assert result.exit_code == 130 and "before the first batch was written; nothing to keep" in result.output
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "samples.csv").write_text("id,file\n")  # a batch was written before the Ctrl-C
    result = runner.invoke(app, ["generate", "--n", "2", "--out", str(tmp_path / "g"), "--resume"])
    assert result.exit_code == 130 and "--resume to continue" in result.output
    monkeypatch.setattr(matgen.evaluate, "evaluate", interrupted)
    result = runner.invoke(app, ["evaluate", str(tmp_path), "--out", str(tmp_path / "e")])
    assert result.exit_code == 130 and "run the same command again" in result.output


_SIGTERM_SCRIPT = """
import os, signal, sys, time
import matgen.generate
from typer.testing import CliRunner
from cli.matgen import app

def terminated(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)  # the handler interrupts this at once
    raise AssertionError("SIGTERM did not interrupt")

before = signal.getsignal(signal.SIGTERM)
matgen.generate.generate = terminated
result = CliRunner().invoke(app, ["generate", "--n", "2", "--out", sys.argv[1]])
print(result.exit_code, signal.getsignal(signal.SIGTERM) == before)
print(result.output)
"""


def test_sigterm_stops_like_ctrl_c_and_restores_the_handler(tmp_path: Path) -> None:
    """`kill` / `timeout` / a batch scheduler send SIGTERM: Python died without a word (no "--resume" hint,
    the folder lock left behind); now it takes the Ctrl-C path, and the handler is put back afterwards.
    In a subprocess: without the handler the signal would end the test run itself."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _SIGTERM_SCRIPT, str(tmp_path / "g")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    first, rest = done.stdout.split("\n", 1)
    assert first == "130 True" and "interrupted before the first batch" in rest, done.stdout


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--n", "0"),
        ("--steps", "0"),
        ("--batch-size", "0"),
        ("--num-atoms", "0"),
        ("--workers", "-1"),
        ("--resample-collisions", "101"),
        ("--length-buckets", "0"),
    ],
)
def test_cli_names_the_flag_it_refuses(flag: str, value: str, tmp_path: Path) -> None:
    result = runner.invoke(app, ["generate", flag, value, "--out", str(tmp_path / "g")])
    assert result.exit_code == 2 and flag in result.output
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("scheduler", 5, "'scheduler' is not a scheduler name"),
        ("sampling", "hot", "'sampling' is not a table of sampling settings"),
        ("sampling", {"temperature": True}, "True is not a number"),
        ("atom_count_distribution", [1.0] + [0.0] * 20, "none on 0 atoms"),
        ("atom_count_distribution", [0.5] * 21, "none on 0 atoms"),
    ],
)
def test_malformed_checkpoint_metadata_is_one_clear_cli_error(
    tiny_run: Path, tmp_path: Path, key: str, value, message: str
) -> None:
    """Metadata of the wrong type (a hand-edited or foreign export) is a CheckpointError naming the file,
    not a traceback; a distribution that draws 0-atom crystals is refused before any file is written."""
    state, meta = load_safetensors(tiny_run / "model.safetensors")
    path = tmp_path / "odd.safetensors"
    export_safetensors({k: v.contiguous() for k, v in state.items()}, path, {**meta, key: value})
    with pytest.raises(CheckpointError, match=message):
        generate(2, tmp_path / "py", checkpoint=path, steps=2, device="cpu", progress=False)
    assert not (tmp_path / "py").exists()
    out = tmp_path / "cli"
    result = runner.invoke(
        app, ["generate", "--n", "2", "--steps", "2", "--out", str(out), "--checkpoint", str(path), "--quiet"]
    )
    assert result.exit_code == 2 and "odd.safetensors" in result.output, result.output
    assert "Traceback" not in result.output and not out.exists()


def test_cli_refuses_an_empty_out_instead_of_using_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--out "$DIR"`` with DIR unset must not generate into (or, with --overwrite, clear) the cwd."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "crystal_mine.cif").write_text("data_mine\n")
    for extra in ([], ["--overwrite"]):
        result = runner.invoke(app, ["generate", "--n", "1", "--steps", "1", "--out", "", "--quiet", *extra])
        assert result.exit_code == 2 and "--out is empty" in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crystal_mine.cif"]
