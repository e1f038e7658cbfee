"""Encoding one long text with GPT-2's tokenizer: in one call vs in pieces cut at pre-token boundaries.

`textgen.tokenizer.TextTokenizer.encode_batch` cuts a text longer than `piece_chars` where GPT-2's
pre-tokenizer cuts anyway, so the ids are the same as in one call (the script checks it). Each variant runs
in its own child process, so that the peak memory is its own.

    python benchmarks/bench_text_encode.py --file ../shared/data/text/moby_dick/moby_dick.txt --repeat 16
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time


def run_one(file: str, repeat: int, piece_chars: int, tokenizer: str | None) -> dict:
    from textgen.tokenizer import TextTokenizer

    tok = TextTokenizer(tokenizer)
    with open(file, encoding="utf-8") as f:
        text = f.read() * repeat
    start = time.perf_counter()
    ids = tok.encode_batch([text], piece_chars=piece_chars)[0]
    seconds = time.perf_counter() - start
    return {
        "piece_chars": piece_chars,
        "chars": len(text),
        "ids": len(ids),
        "ids_sha256": hashlib.sha256(str(ids).encode()).hexdigest(),
        "seconds": round(seconds, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", required=True)
    ap.add_argument("--repeat", type=int, default=16, help="the file's text repeated this many times")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: $TEXTGEN_TOKENIZER)")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(run_one(args.file, args.repeat, args.child, args.tokenizer)))
        return
    rows = []
    for piece_chars in (1 << 40, 1 << 20):  # one call; pieces of about 1 M characters (the default)
        cmd = [sys.executable, __file__, "--file", args.file, "--repeat", str(args.repeat)]
        cmd += ["--child", str(piece_chars)] + (["--tokenizer", args.tokenizer] if args.tokenizer else [])
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    whole, pieces = rows
    assert whole["ids_sha256"] == pieces["ids_sha256"], "the pieces gave other ids"
    print(f"{whole['chars'] / 1e6:.1f} M characters -> {whole['ids']} ids (identical in both)")
    print(f"  one call:  {whole['seconds']} s, peak RSS {whole['peak_rss_gb']} GB")
    print(f"  pieces:    {pieces['seconds']} s, peak RSS {pieces['peak_rss_gb']} GB")
    print(
        f"  pieces / one call: time {pieces['seconds'] / whole['seconds']:.2f}, "
        f"memory {pieces['peak_rss_gb'] / whole['peak_rss_gb']:.2f}"
    )


if __name__ == "__main__":
    main()
