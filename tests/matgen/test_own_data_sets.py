"""A crystal data set of one's own (not MP-20) in the layouts people have: parquet splits, files in a
format that is not read, repeated ids; and the checkpoint and the evaluation say which data they used."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from matgen.data import ensure_split_file, load_split, load_token_dataset
from matgen.evaluate.fingerprints import load_test_reference

SPLITS = ("train", "val", "test")


pytestmark = pytest.mark.usefixtures("isolated_matgen_env")


@pytest.fixture
def rows(shared_data_dir: Path) -> pd.DataFrame:
    path = shared_data_dir / "mp_20" / "test.csv.gz"
    if not path.is_file():
        pytest.skip("MP-20 split files not found")
    return pd.read_csv(path, nrows=6)[["material_id", "cif", "pretty_formula"]]


@pytest.fixture
def remote(tmp_path: Path, rows: pd.DataFrame) -> Path:
    """A fake MP-20 upstream (file://): a folder a download would copy ``{split}.csv`` from."""
    folder = tmp_path / "remote"
    folder.mkdir()
    for split in SPLITS:
        rows.to_csv(folder / f"{split}.csv")
    return folder


def test_parquet_splits_are_read_not_replaced_by_a_download(tmp_path, rows, remote):
    own = tmp_path / "own"
    own.mkdir()
    for split in SPLITS:
        rows.head(4).assign(material_id=lambda f: "own-" + f["material_id"]).to_parquet(
            own / f"{split}.parquet"
        )
    assert ensure_split_file("train", own, base_url=remote.as_uri()) == own / "train.parquet"
    frame = load_split("val", own, limit=3)
    assert list(frame["material_id"]) == ["own-" + m for m in rows["material_id"][:3]]
    split = load_token_dataset("train", own, cache=False, progress=False)
    assert len(split) == 4 and all(i.startswith("own-") for i in split.ids)
    assert sorted(p.name for p in own.iterdir()) == [f"{s}.parquet" for s in sorted(SPLITS)]


def test_splits_in_a_format_that_is_not_read_are_refused_not_downloaded_over(tmp_path, rows, remote):
    own = tmp_path / "own"
    own.mkdir()
    for split in SPLITS:
        rows.to_csv(own / f"{split}.csv.bz2", index=False)
    with pytest.raises(
        FileNotFoundError, match=r"holds test.csv.bz2, train.csv.bz2, val.csv.bz2 but no train"
    ):
        ensure_split_file("train", own, base_url=remote.as_uri())
    assert sorted(p.name for p in own.iterdir()) == [f"{s}.csv.bz2" for s in sorted(SPLITS)]
    cif_folders = tmp_path / "cif_folders"  # train/, val/, test/ folders of .cif files
    for split in SPLITS:
        (cif_folders / split).mkdir(parents=True)
        (cif_folders / split / "x.cif").write_text(rows["cif"][0])
    with pytest.raises(FileNotFoundError, match=r"holds test, train, val but no train.csv\[.gz\]"):
        ensure_split_file("train", cif_folders, base_url=remote.as_uri())
    assert sorted(p.name for p in cif_folders.iterdir()) == sorted(SPLITS)


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (["a", "b", "a", "c", "d", "a"], r"material_id 'a' appears in 3 rows \(data rows 1, 3, 6\)"),
        ([None] * 6, r"6 row\(s\) have no material_id"),
    ],
)
def test_repeated_or_blank_ids_are_refused_before_they_mix_up_reference_rows(tmp_path, rows, ids, message):
    """The reference fingerprints are cached per material_id: with repeated ids every row would read the
    first row's crystal, and the coverage reference would be one crystal six times."""
    own = tmp_path / "own"
    own.mkdir()
    for split in SPLITS:
        rows.assign(material_id=ids).to_csv(own / f"{split}.csv", index=False)
    with pytest.raises(ValueError, match=message):
        load_split("train", own)
    with pytest.raises(ValueError, match=message):
        load_test_reference(own, cache_dir=tmp_path / "fp", progress=False)


def test_the_checkpoint_names_the_data_it_was_trained_on_when_it_came_from_matgen_data(
    tmp_path, rows, monkeypatch
):
    from dfm_core.atomic_io import file_sha256
    from dfm_core.checkpoints import load_safetensors
    from dfm_core.training import TrainConfig
    from matgen.model import CrystalDiTConfig
    from matgen.train import MatgenTrainConfig, train_crystal_model

    own = tmp_path / "carbon_like"
    own.mkdir()
    for split in SPLITS:
        rows.to_csv(own / f"{split}.csv", index=False)
    monkeypatch.setenv("MATGEN_DATA", str(own))  # no data_dir in the config: it names nothing
    cfg = MatgenTrainConfig(
        model=CrystalDiTConfig.tiny(),
        max_atoms=24,
        train=TrainConfig(steps=1, batch_size=2, eval_every=0, device="cpu", bf16=False),
    )
    train_crystal_model(cfg, tmp_path / "run", resume=False, progress=False)
    _, meta = load_safetensors(tmp_path / "run" / "model.safetensors")
    data = meta["data"]
    assert meta["matgen_config"]["data_dir"] is None
    assert data["data_set"] == "carbon_like" and data["data_dir"] == str(own.resolve())
    assert data["train_file_sha256"] == file_sha256(own / "train.csv")
    assert data["val_file_sha256"] == file_sha256(own / "val.csv")
    assert data["val_skipped"] == 0 and data["n_train"] == 6
    # the config records the max_atoms the model was built with, not the preset's 20 beside it
    assert meta["matgen_config"]["model"]["max_atoms"] == meta["model_config"]["max_atoms"] == 24

    # the same ids with edited crystals are other data: the run is not continued on them
    edited = rows.copy()
    edited.loc[0, "cif"] = re.sub(r"(_cell_length_a\s+)\S+", r"\g<1>9.5", rows.loc[0, "cif"])
    assert edited.loc[0, "cif"] != rows.loc[0, "cif"]
    edited.to_csv(own / "train.csv", index=False)
    more = MatgenTrainConfig(
        model=CrystalDiTConfig.tiny(), max_atoms=24, train=dataclasses.replace(cfg.train, steps=2)
    )
    with pytest.raises(ValueError, match="trained on other data.*train_tokens_sha256"):
        train_crystal_model(more, tmp_path / "run", progress=False)


def test_the_evaluation_names_the_data_folder_it_used_when_it_came_from_matgen_data(
    tmp_path, rows, monkeypatch
):
    from matgen.evaluate import evaluate

    own = tmp_path / "mine"
    own.mkdir()
    for split in SPLITS:
        rows.head(2).to_csv(own / f"{split}.csv", index=False)
    monkeypatch.setenv("MATGEN_DATA", str(own))
    summary = evaluate(
        rows["cif"][0],
        tmp_path / "out",
        skip_stability=True,
        cache_dir=tmp_path / "fp",
        progress=False,
        console=False,
    )
    assert summary["reference"].startswith("'mine' test (2 crystals")
    assert summary["settings"]["data_dir"] == str(own.resolve())
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["settings"]["data_dir"] == str(own.resolve())


def test_a_test_split_with_repeated_ids_is_refused_before_the_evaluation_does_any_work(tmp_path, rows):
    from matgen.evaluate import evaluate

    own = tmp_path / "own"
    own.mkdir()
    for split in SPLITS:
        rows.assign(
            material_id=["a", "b", "c", "d", "e", "a"] if split == "test" else rows["material_id"]
        ).to_csv(own / f"{split}.csv", index=False)
    with pytest.raises(ValueError, match=r"test.csv: material_id 'a' appears in 2 rows"):
        evaluate(
            list(rows["cif"]),
            tmp_path / "out",
            data_dir=own,
            skip_stability=True,
            progress=False,
            console=False,
        )
    assert not (tmp_path / "out").exists()  # refused before stage 1 made its journal


def test_cache_files_are_named_after_the_data_set_they_come_from(tmp_path, rows):
    own = tmp_path / "carbon 24"
    own.mkdir()
    for split in SPLITS:
        rows.head(3).to_csv(own / f"{split}.csv", index=False)
    load_token_dataset("val", own, cache_dir=tmp_path / "tokens", progress=False)
    load_test_reference(own, cache_dir=tmp_path / "fp", progress=False)
    assert [p.name.split("-")[:2] for p in (tmp_path / "tokens").iterdir()] == [["carbon_24", "val"]]
    assert [p.name.split("-")[:3] for p in (tmp_path / "fp").iterdir()] == [
        ["carbon_24", "test", "reference"]
    ]
    mp20 = tmp_path / "mp_20"
    mp20.mkdir()
    (own / "val.csv").rename(mp20 / "val.csv")
    load_token_dataset("val", mp20, cache_dir=tmp_path / "tokens", progress=False)
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "tokens").iterdir()) == ["carbon_24", "mp20"]


def test_ids_are_text_cifs_may_be_bytes_and_a_truncated_gzip_is_named(tmp_path, rows):
    """Ids "00000" and "0" are two crystals (pandas read both as the number 0: a false "repeated id"); a
    parquet column of CIF bytes is read like text; a half-copied .csv.gz is one error naming the file
    (its EOFError reached click, which printed only "Aborted.")."""
    from matgen.evaluate.inputs import read_inputs

    own = tmp_path / "own"
    own.mkdir()
    numbered = rows.assign(material_id=["00000", "0", "007", "7", "1e3", "1000"])
    for split in SPLITS:
        numbered.to_csv(own / f"{split}.csv", index=False)
    assert list(load_split("train", own)["material_id"]) == ["00000", "0", "007", "7", "1e3", "1000"]
    split = load_token_dataset("train", own, cache=False, progress=False)
    assert sorted(split.ids) == sorted(["00000", "0", "007", "7", "1e3", "1000"])
    assert [item.id for item in read_inputs(own / "test.csv")] == ["00000", "0", "007", "7", "1e3", "1000"]

    as_bytes = tmp_path / "bytes"
    as_bytes.mkdir()
    for split in SPLITS:
        rows.assign(cif=rows["cif"].str.encode("utf-8")).to_parquet(as_bytes / f"{split}.parquet")
    assert len(load_token_dataset("val", as_bytes, cache=False, progress=False)) == len(rows)
    # and as the evaluation's reference and novelty sets, which read the splits themselves
    from matgen.evaluate.sun import TrainingSet

    assert len(load_test_reference(as_bytes, cache_dir=tmp_path / "fp", progress=False)) == len(rows)
    assert TrainingSet(as_bytes).unreadable == 0

    cut = tmp_path / "cut"
    cut.mkdir()
    for split in SPLITS:
        rows.to_csv(cut / f"{split}.csv.gz", index=False)
    whole = (cut / "train.csv.gz").read_bytes()
    (cut / "train.csv.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"cannot read .*train.csv.gz as a CSV table: Compressed file ended"):
        load_split("train", cut)


def test_the_reference_set_holds_only_crystals_that_pass_the_sanity_bounds_and_says_when_it_is_sampled(
    tmp_path, rows
):
    """A partly occupied test row had no structure fingerprint, so coverage left it out while the
    distributions and the reference count kept it; now it is left out of the reference, with a warning.
    "seeded subset" is said when a limit below the split's rows really samples it, not otherwise."""
    from pymatgen.core import Lattice, Structure

    disordered = Structure(
        Lattice.cubic(4.0), [{"Ba": 0.5, "Sr": 0.5}, "Ti", "O"], [[0, 0, 0], [0.5] * 3, [0.5, 0.5, 0]]
    )
    own = tmp_path / "own"
    own.mkdir()
    table = pd.concat(
        [
            rows,
            pd.DataFrame(
                {"material_id": ["half-ba"], "cif": [disordered.to(fmt="cif")], "pretty_formula": ["x"]}
            ),
        ]
    )
    table.to_csv(own / "test.csv", index=False)
    with pytest.warns(
        UserWarning, match=r"1 row\(s\) .* left out .*half-ba: fails the sanity bounds: disordered"
    ):
        reference = load_test_reference(own, cache_dir=tmp_path / "fp", progress=False)
    assert len(reference) == len(rows) and "half-ba" not in reference.ids and not reference.sampled
    assert np.isfinite(reference.struct_fp).all()
    whole = load_test_reference(own, test_limit=len(table), cache_dir=tmp_path / "fp", progress=False)
    assert not whole.sampled  # a limit of the split's size takes all of it
    part = load_test_reference(own, test_limit=len(table) - 1, cache_dir=tmp_path / "fp", progress=False)
    assert part.sampled and part.subset(np.ones(len(part), bool)).sampled


def test_a_reference_cache_of_the_earlier_format_is_migrated_not_rebuilt(tmp_path, rows, monkeypatch):
    """A format-1 cache (rows not yet held to the sanity bounds) keeps its fingerprints, which took minutes
    to compute, and loses the rows that fail the bounds."""
    from pymatgen.core import Lattice, Structure

    import matgen.evaluate.fingerprints as fingerprints
    import matgen.evaluate.validity as validity

    disordered = Structure(Lattice.cubic(4.0), [{"Ba": 0.5, "Sr": 0.5}, "Ti"], [[0, 0, 0], [0.5] * 3])
    own = tmp_path / "own"
    own.mkdir()
    extra = pd.DataFrame(
        {"material_id": ["half-ba"], "cif": [disordered.to(fmt="cif")], "pretty_formula": ["x"]}
    )
    pd.concat([rows, extra]).to_csv(own / "test.csv", index=False)
    with monkeypatch.context() as old_rules:  # the earlier version: no sanity bounds for reference rows
        old_rules.setattr(validity, "check_sanity", lambda *a, **k: None)
        assert "half-ba" in load_test_reference(own, cache_dir=tmp_path / "fp", progress=False).ids
    (built,) = (tmp_path / "fp").iterdir()
    built.rename(built.with_name(built.name.replace(f"-v{fingerprints._REFERENCE_FORMAT}.", "-v1.")))

    def no_fingerprints(*a, **k):
        raise AssertionError("a cached row was fingerprinted again")

    monkeypatch.setattr(fingerprints, "structure_fingerprint", no_fingerprints)
    with pytest.warns(UserWarning, match="half-ba: fails the sanity bounds"):
        reference = load_test_reference(own, cache_dir=tmp_path / "fp", progress=False)
    assert sorted(reference.ids) == sorted(rows["material_id"])
    assert sorted(p.name.rsplit("-", 1)[1] for p in (tmp_path / "fp").iterdir()) == ["v1.npz", "v2.npz"]


def test_a_crystal_in_a_needlessly_skewed_cell_is_trained_on_in_its_reduced_cell(tmp_path, rows):
    """A row written in a basis with a 60 A axis (the same crystal as a 4 A cube) does not fit the
    vocabulary as written; it is tokenized in its Niggli cell instead of being skipped. A cell that is
    really too large is still skipped with the reason."""
    from pymatgen.analysis.structure_matcher import StructureMatcher
    from pymatgen.core import Lattice, Structure

    from matgen.tokenizer import CrystalTokenizer

    skewed = Structure(Lattice([[4, 0, 0], [0, 4, 0], [60, 0, 4]]), ["Na", "Cl"], [[0, 0, 0], [0.5] * 3])
    huge = Structure(Lattice.cubic(60.0), ["Na"], [[0, 0, 0]])
    extra = pd.DataFrame(
        {
            "material_id": ["skewed", "huge"],
            "cif": [skewed.to(fmt="cif"), huge.to(fmt="cif")],
            "pretty_formula": ["NaCl", "Na"],
        }
    )
    own = tmp_path / "own"
    own.mkdir()
    for split in SPLITS:
        pd.concat([rows, extra]).to_csv(own / f"{split}.csv", index=False)
    with pytest.warns(UserWarning, match="skipped 1 of"):
        split = load_token_dataset("train", own, cache=False, progress=False)
    assert "skewed" in split.ids and "huge" in split.skipped and "49.9" in split.skipped["huge"]
    decoded = CrystalTokenizer().decode(split.tokens[split.ids.index("skewed")])
    assert max(decoded.lattice.abc) < 5 and StructureMatcher().fit(decoded, skewed)
