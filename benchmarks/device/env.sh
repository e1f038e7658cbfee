# Sourced at the start of every device command: installs the carried wheels once per machine and points
# matgen at the carried data and caches. See BENCHMARKS.md, "GPU (H100)", for what to carry.
set -o pipefail
install_wheels() {  # $1: folder of wheels, $2: target; skipped when the machine already has them
    [ -f "$2/.installed" ] && return 0
    ls "$1"/*.whl >/dev/null 2>&1 || { echo "no wheels in $1" >&2; return 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$2" "$1"/*.whl \
        && touch "$2/.installed"
}
install_wheels .whl /tmp/site || exit 1
[ -d .whl2 ] && { install_wheels .whl2 /tmp/site2 || exit 1; }
[ -d .devdata/mp_20 ] || { echo "no .devdata/mp_20 on this machine: carry .devdata" >&2; exit 1; }
export PYTHONPATH=/tmp/site:/tmp/site2:$PWD PYTHONUNBUFFERED=1
export MATGEN_DATA=$PWD/.devdata/mp_20 XDG_CACHE_HOME=$PWD/.devdata/cache
export OUT=${OUT:-$PWD/out/device}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name())"
