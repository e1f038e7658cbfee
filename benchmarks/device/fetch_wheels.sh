#!/usr/bin/env bash
# Download the wheel set in benchmarks/device/wheels.txt into .whl/ (git-ignored) for the GPU machine
# (Python 3.12, x86_64 Linux, no internet). Run from the repo root on the developer machine:
#   bash benchmarks/device/fetch_wheels.sh [--clean]     (--clean: delete .whl/*.whl not in the list)
# Install there with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site
set -euo pipefail

PY=${PY:-/work/venv/bin/python}
[ -x "$PY" ] || PY=python3
LIST=benchmarks/device/wheels.txt
DEST=.whl
CLEAN=0
[ "${1:-}" = "--clean" ] && CLEAN=1

[ -f "$LIST" ] || { echo "run from the repo root ($LIST not found)" >&2; exit 1; }
mkdir -p "$DEST"

PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

norm() { echo "$1" | tr 'A-Z' 'a-z' | sed -E 's/[-_.]+/_/g'; }

wanted=()
while read -r spec; do
    spec=${spec%%#*}; spec=$(echo "$spec" | tr -d '[:space:]')
    [ -z "$spec" ] && continue
    name=${spec%%==*}; ver=${spec#*==}
    wanted+=("$(norm "$name")-$ver")
    if ls "$DEST"/"$(norm "$name")"-"$ver"-*.whl >/dev/null 2>&1; then
        echo "have  $spec"; continue
    fi
    echo "fetch $spec"
    if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            "${PLAT[@]}" -d "$DEST" "$spec"; then
        # No wheel on the index (e.g. nvidia-ml-py3 is sdist-only): build it here, but only accept a pure-Python wheel.
        echo "      no binary wheel; building $spec from its sdist"
        tmp=$(mktemp -d)
        "$PY" -m pip wheel -q --no-deps --no-binary "$name" -w "$tmp" "$spec"
        built=$(ls "$tmp"/*.whl)
        case "$built" in
            *-py3-none-any.whl|*-py2.py3-none-any.whl) mv "$built" "$DEST"/ ;;
            *) echo "built $built is not pure Python; cannot carry it" >&2; rm -rf "$tmp"; exit 1 ;;
        esac
        rm -rf "$tmp"
    fi
done < "$LIST"

# Anything in .whl/ that is not in the list would also be installed by `.whl/*.whl`: report (or delete) it.
for f in "$DEST"/*.whl; do
    base=$(basename "$f")
    n=$(norm "${base%%-*}"); rest=${base#*-}; v=${rest%%-*}
    ok=0
    for w in "${wanted[@]}"; do [ "$w" = "$n-$v" ] && ok=1 && break; done
    if [ $ok = 0 ]; then
        if [ $CLEAN = 1 ]; then echo "removing extra $base"; rm -f "$f"; else echo "WARNING: extra wheel not in $LIST: $base" >&2; fi
    fi
done

count=$(ls "$DEST"/*.whl | wc -l)
bytes=$(cat "$DEST"/*.whl | wc -c)
echo "$count wheels in $DEST/, total $(awk -v b="$bytes" 'BEGIN{printf "%.1f MB (%.1f MiB)", b/1e6, b/1048576}')"
