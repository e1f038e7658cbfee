# Sourced by the matgen device scripts after they set W (work folder) and DEVICE: on the device (default)
# env.sh installs the carried wheels and points matgen at the carried data; with MG_LOCAL=1 (a CPU smoke
# test here) the repo and the current environment are used as they are. Then env_common.sh gives the
# deadline helpers (run_step, say), and step times go to $OUT/timing.txt.
if [ -z "${MG_LOCAL:-}" ]; then
    source benchmarks/device/env.sh
else
    export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OUT=${OUT:-$PWD/$W/device}
    mkdir -p "$OUT"
fi
DEV_DEVICE=$DEVICE source benchmarks/device/env_common.sh
export TIMING_FILE=$OUT/timing.txt
