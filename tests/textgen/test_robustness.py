"""Bad input gives one clear line (exit code 2), never a traceback or silently wrong output."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from checkpoint_edit import with_raw_metadata
from typer.testing import CliRunner

from cli.textgen import app
from textgen.checkpoint import CheckpointError, TextModel, export_text_model
from textgen.data import read_documents
from textgen.generate import generate_tokens
from textgen.model import TextARModel, TextModelConfig
from textgen.path import TextPathConfig

runner = CliRunner()


def _invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def _error(*args: str) -> str:
    """Run a command that must fail cleanly; return its one-line message."""
    code, output = _invoke(*args)
    assert code == 2, output
    assert "Traceback" not in output and output.splitlines()[-1].startswith("error: "), output
    return output.splitlines()[-1]


def _sample_args(ckpt: Path, tokenizer_dir: Path) -> list[str]:
    return ["sample", "--checkpoint", str(ckpt), "--n", "2", "--steps", "2", "--device", "cpu"] + [
        "--tokenizer",
        str(tokenizer_dir),
    ]


def _eval_args(ckpt: Path, corpus: Path, tokenizer_dir: Path, out: Path) -> list[str]:
    return [
        "evaluate",
        "--checkpoint",
        str(ckpt),
        "--datasets",
        f"tiny={corpus}",
        "--limit",
        "2",
        "--points",
        "4",
        "--device",
        "cpu",
        "--tokenizer",
        str(tokenizer_dir),
        "--out",
        str(out),
        "--quiet",
    ]


def _train_args(run_dir: Path, corpus: Path, tokenizer_dir: Path) -> list[str]:
    return [
        "train",
        "--run-dir",
        str(run_dir),
        "--size",
        "tiny",
        "--seq-len",
        "16",
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--warmup",
        "0",
        "--eval-every",
        "0",
        "--ckpt-every",
        "0",
        "--device",
        "cpu",
        "--data",
        str(corpus),
        "--tokenizer",
        str(tokenizer_dir),
        "--quiet",
    ]


@pytest.fixture(scope="module")
def ar_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = TextARModel(TextModelConfig.tiny(max_len=16))
    meta = {"kind": "ar", "model_config": model.config.to_dict(), "seq_len": 8}
    return export_text_model(model, tmp_path_factory.mktemp("ar") / "ar.safetensors", meta)


# 1. temperature ----------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", ["0", "-1", "nan", "inf"])
def test_flow_model_refuses_bad_temperatures(tiny_run: Path, tokenizer_dir: Path, temperature: str):
    args = _sample_args(tiny_run / "model.safetensors", tokenizer_dir)
    assert "temperature" in _error(*args, "--temperature", temperature)


def test_ar_model_is_greedy_at_zero_and_refuses_negative_or_nan(ar_checkpoint: Path, tokenizer_dir: Path):
    code, out = _invoke(*_sample_args(ar_checkpoint, tokenizer_dir), "--temperature", "0")
    assert code == 0, out
    texts = out.split("===\n")[1:]
    assert len(texts) == 2 and texts[0].split("\n=== ")[0] == texts[1].strip()  # greedy: identical
    for bad in ("-1", "nan"):
        assert "temperature" in _error(*_sample_args(ar_checkpoint, tokenizer_dir), "--temperature", bad)
    model = TextModel.load(ar_checkpoint, "cpu")
    with pytest.raises(ValueError, match="temperature"):
        model.model.sample(1, 4, temperature=float("nan"))


def test_evaluate_refuses_temperature_zero_before_any_work(
    tiny_run: Path, tiny_corpus: Path, tokenizer_dir: Path, tmp_path: Path
):
    args = _eval_args(tiny_run / "model.safetensors", tiny_corpus, tokenizer_dir, tmp_path / "ev")
    assert "temperature 0" in _error(*args, "--samples", "2", "--temperature", "0")
    assert not (tmp_path / "ev").exists()


# 2. evaluate --alpha -----------------------------------------------------------------------------


def test_evaluate_power_velocity_takes_alpha(
    tiny_run: Path, tiny_corpus: Path, tokenizer_dir: Path, tmp_path: Path
):
    args = _eval_args(tiny_run / "model.safetensors", tiny_corpus, tokenizer_dir, tmp_path / "ev")
    args += ["--samples", "1", "--nfe", "2", "--velocity", "power"]
    assert "alpha" in _error(*args)
    code, out = _invoke(*args, "--alpha", "2")
    assert code == 0, out
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["settings"]["alpha"] == 2.0 and report["settings"]["velocity"] == "power"


# 3 and 5. one-line errors that name the flag or value --------------------------------------------


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--length", "-5"], "length"),
        (["--length", "0"], "length"),
        (["--alpha", "nan", "--velocity", "power"], "alpha"),
        (["--n", "0"], "n must be"),
    ],
)
def test_sample_refuses_nonsense(tiny_run: Path, tokenizer_dir: Path, extra: list[str], needle: str):
    assert needle in _error(*_sample_args(tiny_run / "model.safetensors", tokenizer_dir), *extra)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--points", "0"], "n_points"),
        (["--points", "-2"], "n_points"),
        (["--seq-len", "0"], "seq_len"),
        (["--chunk", "0"], "chunk"),
        (["--samples", "-1"], "samples"),
        (["--limit", "-1"], "limit"),
        (["--limit", "0"], "limit"),
        (["--batch-size", "0"], "batch_size"),
        (["--samples", "1", "--nfe", "abc"], "--nfe"),
        (["--samples", "1", "--nfe", "0"], "nfe"),
    ],
)
def test_evaluate_refuses_nonsense(
    tiny_run: Path, tiny_corpus: Path, tokenizer_dir: Path, tmp_path: Path, extra: list[str], needle: str
):
    args = _eval_args(tiny_run / "model.safetensors", tiny_corpus, tokenizer_dir, tmp_path / "ev")
    assert needle in _error(*args, *extra)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--source", "stats", "--beta0", "nan"], "beta0"),
        (["--source", "stats", "--beta0", "inf"], "beta0"),
        (["--train-limit", "0"], "train_limit"),
        (["--hidden", "0"], "hidden"),
    ],
)
def test_train_refuses_nonsense(
    tmp_path: Path, tiny_corpus: Path, tokenizer_dir: Path, extra: list[str], needle: str
):
    assert needle in _error(*_train_args(tmp_path / "run", tiny_corpus, tokenizer_dir), *extra)
    with pytest.raises(ValueError, match="beta0"):
        TextPathConfig("stats", beta0=float("nan"))


def test_sample_out_is_checked_before_sampling(
    tiny_run: Path, tokenizer_dir: Path, tmp_path: Path, monkeypatch
):
    args = _sample_args(tmp_path / "missing.safetensors", tokenizer_dir)  # loading would fail later
    assert "is a folder" in _error(*args, "--out", str(tmp_path))
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    assert "which is a file" in _error(*args, "--out", str(a_file / "s.jsonl"))
    access = os.access  # tmp_path made read-only (root ignores real permissions)
    monkeypatch.setattr(os, "access", lambda p, mode, **k: Path(p) != tmp_path and access(p, mode, **k))
    assert "permission" in _error(*args, "--out", str(tmp_path / "ro" / "s.jsonl"))


# 4. a diverging loss ------------------------------------------------------------------------------


def test_diverging_training_is_one_line_without_a_missing_checkpoint(
    tmp_path: Path, tiny_corpus: Path, tokenizer_dir: Path
):
    run_dir = tmp_path / "run"
    message = _error(*_train_args(run_dir, tiny_corpus, tokenizer_dir), "--lr", "1e30")
    assert "non-finite" in message and "last.pt" not in message and not (run_dir / "last.pt").exists()
    assert message.count("no checkpoint was written") == 1 and "lr 1e+30: try a lower lr" in message


# 6. non-UTF-8 text --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["latin.txt", "latin.jsonl"])
def test_non_utf8_text_names_the_file(tmp_path: Path, name: str):
    path = tmp_path / name
    path.write_bytes(b'"ok"\n"caf\xe9"\n' if name.endswith(".jsonl") else b"ok\ncaf\xe9\n")
    with pytest.raises(ValueError, match=r"latin\..* is not UTF-8 text \(byte 0xe9 on line 2\)"):
        read_documents(path)


def test_a_byte_order_mark_is_not_text_and_utf16_is_named(tmp_path: Path):
    bom = tmp_path / "bom.txt"
    bom.write_text("The cat sat.\n", encoding="utf-8-sig")
    assert read_documents(bom) == read_documents(_plain(tmp_path, "The cat sat.\n"))
    wide = tmp_path / "wide.txt"
    wide.write_text("The cat sat.\n", encoding="utf-16")
    with pytest.raises(ValueError, match="is UTF-16 text"):
        read_documents(wide)


def _plain(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "plain.txt"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_file_that_is_not_a_tokenizer_is_named(tmp_path: Path):
    from textgen.tokenizer import TextTokenizer

    bad = tmp_path / "tok"
    bad.mkdir()
    (bad / "tokenizer.json").write_text('{"version": "1.0", "model": {}}')
    with pytest.raises(ValueError, match="is not a tokenizer file"):
        TextTokenizer(bad)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="notes.txt is not a tokenizer file"):
        TextTokenizer(tmp_path / "notes.txt")


# 7. a folder given as checkpoint ------------------------------------------------------------------


def test_checkpoint_folder_suggests_the_file(tiny_run: Path, tmp_path: Path, tokenizer_dir: Path):
    message = _error(*_sample_args(tiny_run, tokenizer_dir))
    assert "is a folder" in message and str(tiny_run / "model.safetensors") in message
    with pytest.raises(CheckpointError, match="is a folder"):
        TextModel.load(tmp_path)


# 8. the seed fixes the texts together with the batch size ----------------------------------------


def test_same_seed_and_batch_size_give_the_same_tokens(tiny_run: Path):
    model = TextModel.load(tiny_run / "model.safetensors", "cpu")
    a = generate_tokens(model, 4, steps=2, seed=3, batch_size=2)
    assert torch.equal(a, generate_tokens(model, 4, steps=2, seed=3, batch_size=2))
    assert not torch.equal(a, generate_tokens(model, 4, steps=2, seed=3, batch_size=4))


def test_judges_of_one_file_name_are_told_apart(tmp_path: Path, tokenizer) -> None:
    """Every `textgen train` writes model.safetensors: a judge's identity holds its weights' digest, so a
    resumed evaluation never reuses one AR judge's perplexities for another."""
    from textgen.judge import ARJudge

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = TextARModel(TextModelConfig.tiny(max_len=16))
        meta = {"kind": "ar", "model_config": model.config.to_dict(), "seq_len": 8}
        paths.append(export_text_model(model, tmp_path / f"run{seed}" / "model.safetensors", meta))
    a, b = (ARJudge(p, tokenizer, "cpu") for p in paths)
    assert a.name == b.name and a.identity != b.identity
    assert ARJudge(paths[0], tokenizer, "cpu").identity == a.identity


def test_gap_markers_with_spaces_and_look_alikes(tokenizer) -> None:
    from textgen.generate import parse_template

    spaced, plain = (
        parse_template("The cat [[ 3 ]] the mat", tokenizer, 16),
        parse_template("The cat [[3]] the mat", tokenizer, 16),
    )
    assert torch.equal(spaced.mask, plain.mask) and torch.equal(spaced.values, plain.values)
    assert not plain.is_prompt and parse_template("Hello [[3]]", tokenizer, 16).is_prompt
    assert (
        parse_template("Hello", tokenizer, 16).is_prompt
        and not parse_template("[[2]] end", tokenizer, 16).is_prompt
    )
    with pytest.warns(UserWarning, match=r"\[\[8 tokens\]\].*kept as text"):
        odd = parse_template("The cat [[8 tokens]] here", tokenizer, 32)
    assert odd.is_prompt and tokenizer.decode(odd.values[odd.mask].tolist()) == "The cat [[8 tokens]] here"


def test_evaluate_takes_a_lone_checkpoint_data_set_name_and_nfe(tiny_run: Path, tiny_corpus: Path, tokenizer):
    """A notebook call with one string per argument means one item, not one item per character."""
    from textgen.evaluate import evaluate

    report = evaluate(
        str(tiny_run / "model.safetensors"),
        datasets=f"tiny={tiny_corpus}",
        names="m",
        limit=2,
        n_points=4,
        samples=1,
        nfe=2,
        tokenizer=tokenizer,
        device="cpu",
    )
    assert report.models() == ["m"] and report.datasets() == ["tiny"]
    assert [s.nfe for s in report.samples] == [2]
    as_path = evaluate(
        tiny_run / "model.safetensors", tiny_corpus, limit=2, n_points=4, tokenizer=tokenizer, device="cpu"
    )
    assert as_path.datasets() == [tiny_corpus.stem]  # a lone Path is one data set, named by its stem


def test_evaluate_with_an_out_dir_writes_what_the_command_writes(
    tiny_run: Path, tiny_corpus: Path, tokenizer, tmp_path
):
    """One call does what `textgen evaluate --out` does: cells kept as they finish, tables at the end."""
    import csv

    from textgen.evaluate import evaluate

    out = tmp_path / "eval"
    run = dict(
        datasets=f"tiny={tiny_corpus}", names="m", limit=2, n_points=4, tokenizer=tokenizer, device="cpu"
    )
    report = evaluate(str(tiny_run / "model.safetensors"), out_dir=out, **run)
    with open(out / "likelihood.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["m"] and float(rows[0]["tiny"]) == pytest.approx(
        report.cell("m", "tiny").perplexity, rel=1e-3
    )
    assert (out / "report.json").is_file() and (out / "cells.jsonl").is_file()
    lines: list[str] = []
    again = evaluate(str(tiny_run / "model.safetensors"), out_dir=out, log=lines.append, **run)
    assert again.cell("m", "tiny").perplexity == report.cell("m", "tiny").perplexity and lines  # reused


def test_a_tokenizer_other_than_the_trained_one_is_pointed_out(
    tiny_run: Path, tokenizer, tokenizer_dir: Path, tmp_path: Path
):
    import shutil

    from textgen.checkpoint import TextModel
    from textgen.generate import generate_texts
    from textgen.tokenizer import TextTokenizer

    model = TextModel.load(tiny_run / "model.safetensors", "cpu")
    other = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, other)
    (other / "tokenizer.json").write_text((other / "tokenizer.json").read_text() + "\n")  # another file
    with pytest.warns(UserWarning, match="is not the one .* was trained with"):
        generate_texts(model, TextTokenizer(other), 1, steps=2, length=8)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the trained tokenizer: no warning
        generate_texts(model, tokenizer, 1, steps=2, length=8)


# 9. a checkpoint whose metadata is damaged --------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"path": None}, "lacks its path config"),
        ({"path": "[1, 2]"}, "bad path config"),
        ({"seq_len": "abc"}, "seq_len must be a whole number"),
        ({"seq_len": "0"}, "seq_len must be a whole number"),
        ({"model_config": "not json"}, "does not describe a textgen model"),
        ({"kind": "xyz"}, "kind must be 'dfm' or 'ar'"),
    ],
)
def test_damaged_checkpoint_metadata_is_one_line_naming_the_file(
    tiny_run: Path, tokenizer_dir: Path, tmp_path: Path, changes: dict, needle: str
):
    ckpt = with_raw_metadata(tiny_run / "model.safetensors", tmp_path / "damaged.safetensors", **changes)
    message = _error(*_sample_args(ckpt, tokenizer_dir))
    assert needle in message and str(ckpt) in message, message
    with pytest.raises(CheckpointError, match=needle):
        TextModel.load(ckpt)


# 10. --out ending in a slash means a folder -------------------------------------------------------


def test_sample_out_with_a_trailing_slash_is_not_written_as_a_file(
    tiny_run: Path, tokenizer_dir: Path, tmp_path: Path
):
    """`--out texts/` (a folder that does not exist yet) used to write a file named `texts`."""
    args = _sample_args(tiny_run / "model.safetensors", tokenizer_dir)
    assert "--out must name a file" in _error(*args, "--out", f"{tmp_path / 'texts'}/")
    assert not (tmp_path / "texts").exists()


# 11. names with square brackets are printed as they are, not read as rich markup ---------------------


def test_tables_print_bracketed_names_verbatim():
    from rich.console import Console

    from textgen.evaluate import EvaluationReport, LikelihoodResult, SampleQuality

    report = EvaluationReport(
        likelihood=[LikelihoodResult("ko/mask [model] #2", "c", "[red]", 1.0, False, 1, 8, 4, 0.1)],
        samples=[SampleQuality("run[bold]A", "c", 4, 2, 8, 1.0, 3.0, None, "[i]judge", 0.1)],
    )
    console = Console(record=True, width=200)
    console.print(report.likelihood_table())
    console.print(report.samples_table())
    text = console.export_text()
    for name in ("ko/mask [model] #2", "[red]", "run[bold]A", "[i]judge"):
        assert name in text, text
