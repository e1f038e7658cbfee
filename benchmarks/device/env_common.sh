# Sourced by textgen_run.sh, imagegen_run.sh and imagegen_latent_run.sh, and by the matgen scripts through
# matgen_env.sh (after env.sh, which installs the wheels): no wheels, the repo on PYTHONPATH, a work folder
# for unpacked data / caches / runs, a deadline for the whole call,
# and helpers that put results under $OUT within its limits (8 files, 16 MiB each, 64 MiB together).
# See benchmarks/device/PLAN_text_images.md.
#
# Overrides (environment), for CPU smoke tests and for tuning:
#   OUT           where results go (the device sets it; default out/device)
#   DEV_WORK      unpacked data, caches and runs (default .devwork, git-ignored; kept while the machine is warm)
#   DEV_DEVICE    cuda (default) or cpu
#   DEV_DEADLINE  seconds after the start of the call by which everything must be packed (default 570;
#                 a device call is killed at 600 s and then only what is already under $OUT comes back)
#   DEV_RESERVE   seconds kept free at the end for packing (default 20)
#   DEV_SHIP_CKPT 1 (default): bring exported weights back in bf16, split in 15 MB parts; 0: don't
set -o pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export OUT=${OUT:-$PWD/out/device}
export DEV_WORK=${DEV_WORK:-$PWD/.devwork}
DEV_DEVICE=${DEV_DEVICE:-cuda}
DEV_DEADLINE=${DEV_DEADLINE:-570}
DEV_RESERVE=${DEV_RESERVE:-20}
DEV_SHIP_CKPT=${DEV_SHIP_CKPT:-1}
DEV_T0=${DEV_T0:-$(date +%s)}
PY=${PY:-python3}
mkdir -p "$OUT" "$DEV_WORK" || exit 1

elapsed() { echo $(($(date +%s) - DEV_T0)); }
time_left() { echo $((DEV_T0 + DEV_DEADLINE - $(date +%s))); }
say() { echo "[$(elapsed) s] $*"; }

dev_info() {  # the machine, for the log
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda' if torch.cuda.is_available() else 'no cuda', torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
    echo "cpus $(nproc --all)"
    if [ "$DEV_DEVICE" = cuda ]; then
        "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
            || { echo "DEV_DEVICE=cuda but torch sees no GPU (set DEV_DEVICE=cpu for a CPU run)" >&2; return 1; }
    fi
}

# run_step MIN_SECONDS LABEL CMD...: runs CMD under `timeout -s INT` so that it ends DEV_RESERVE seconds
# before the deadline; skipped (status 3) when fewer than MIN_SECONDS would be left for it. Its wall time
# goes to $TIMING_FILE as "LABEL: N s wall" when that is set.
run_step() {
    local min=$1 label=$2 left rc
    shift 2
    left=$(($(time_left) - DEV_RESERVE))
    if [ "$left" -lt "$min" ]; then
        say "SKIPPED $label: ${left} s left before the deadline, it needs ${min} s"
        return 3
    fi
    say "start $label (at most ${left} s)"
    local t0=$(date +%s)
    timeout -k 10 -s INT "$left" "$@"
    rc=$?
    [ -n "${TIMING_FILE:-}" ] && echo "$label: $(($(date +%s) - t0)) s wall" >>"$TIMING_FILE"
    [ $rc -eq 124 ] && say "TIMED OUT $label (deadline)"
    say "end $label (exit $rc)"
    return $rc
}

# unpack_xz SRC.xz DEST: decompress one file (python's lzma, else the xz program), skipped when DEST
# already holds the same bytes (.sha256 beside SRC, written by the prepare script).
unpack_xz() {
    local src=$1 dest=$2 want
    [ -f "$src" ] || { echo "missing $src: run the prepare script here and carry its folder" >&2; return 1; }
    want=$(cut -d' ' -f1 "$src.sha256" 2>/dev/null)
    if [ -f "$dest" ] && [ -n "$want" ] && [ "$(sha256sum "$dest" | cut -d' ' -f1)" = "$want" ]; then
        return 0
    fi
    mkdir -p "$(dirname "$dest")"
    "$PY" - "$src" "$dest.tmp" <<'PYEOF' || xz -dc "$src" >"$dest.tmp" || return 1
import lzma, shutil, sys
with lzma.open(sys.argv[1]) as f, open(sys.argv[2], "wb") as g:
    shutil.copyfileobj(f, g, 1 << 22)
PYEOF
    if [ -n "$want" ] && [ "$(sha256sum "$dest.tmp" | cut -d' ' -f1)" != "$want" ]; then
        echo "checksum mismatch after unpacking $src" >&2
        return 1
    fi
    mv "$dest.tmp" "$dest"
}

# unpack_tar_xz ARCHIVE DEST: extract a .tar.xz into DEST (replaced), skipped when DEST/.archive_sha256
# already names this archive.
unpack_tar_xz() {
    local src=$1 dest=$2 sha
    [ -f "$src" ] || { echo "missing $src: run the prepare script here and carry its folder" >&2; return 1; }
    sha=$(sha256sum "$src" | cut -d' ' -f1)
    [ "$(cat "$dest/.archive_sha256" 2>/dev/null)" = "$sha" ] && return 0
    rm -rf "$dest" && mkdir -p "$dest" || return 1
    "$PY" -c "import sys, tarfile; tarfile.open(sys.argv[1], 'r:xz').extractall(sys.argv[2], filter='data')" \
        "$src" "$dest" || tar -xJf "$src" -C "$dest" || return 1
    echo "$sha" >"$dest/.archive_sha256"
}

# unpack_images: CIFAR-10 and the EfficientNet-Lite0 weights from .devimg (prepare_images.sh) into $DEV_WORK,
# and the IMAGEGEN_* variables that point imagegen at them (imagegen calls).
unpack_images() {
    local split f weights
    for split in train test; do
        f=cifar10_jpegbytes_$split.npz
        unpack_xz ".devimg/cifar10_jpeg/$f.xz" "$DEV_WORK/images/cifar10_jpeg/$f" || return 1
    done
    weights=$(ls .devimg/effnet/*.pth.xz 2>/dev/null | head -1)
    [ -n "$weights" ] || { echo "no .devimg/effnet/*.pth.xz: run prepare_images.sh here and carry .devimg" >&2; return 1; }
    unpack_xz "$weights" "$DEV_WORK/effnet/$(basename "$weights" .xz)" || return 1
    export IMAGEGEN_DATA=$DEV_WORK/images IMAGEGEN_CACHE=$DEV_WORK/cache/imagegen
    export IMAGEGEN_FEATURES=$DEV_WORK/effnet/$(basename "$weights" .xz)
    say "image data and EfficientNet-Lite0 weights ready in $DEV_WORK"
}

out_bytes() { du -cb "$OUT" 2>/dev/null | tail -1 | cut -f1; }
out_files() { find "$OUT" -type f | wc -l; }

# ship_ckpt SRC NAME: SRC (.safetensors) cast to bf16 (float64 tensors such as textgen's source PMF are
# kept) and split into 15 MB parts $OUT/NAME.bf16.safetensors.partNN, if that leaves room under $OUT for
# FILES_AFTER more files and MIB_AFTER MiB (defaults 3 and 5). Rebuild: cat NAME.bf16.safetensors.part* > NAME.bf16.safetensors
ship_ckpt() {
    local src=$1 name=$2 tmp parts size
    [ "$DEV_SHIP_CKPT" = 1 ] || return 0
    [ -f "$src" ] || { say "no $src to ship"; return 1; }
    mkdir -p "$DEV_WORK/ship" || return 1
    tmp=$DEV_WORK/ship/$name.bf16.safetensors
    "$PY" benchmarks/device/to_bf16.py "$src" "$tmp" || return 1
    size=$(stat -c %s "$tmp")
    parts=$(((size + 15 * 1048576 - 1) / (15 * 1048576)))
    if [ $(($(out_files) + parts + ${FILES_AFTER:-3})) -gt 8 ] \
        || [ $(($(out_bytes) + size + ${MIB_AFTER:-5} * 1048576)) -gt $((64 * 1048576)) ]; then
        say "not shipping $name ($((size / 1048576)) MiB in $parts parts): no room under \$OUT (8 files, 64 MiB)"
        return 0
    fi
    split -b 15M -d "$tmp" "$OUT/$name.bf16.safetensors.part" || return 1
    say "shipped $name: $size bytes of bf16 weights in $parts part(s) (sha256 $(sha256sum "$tmp" | cut -c1-16))"
}

# pack_results TGZ_NAME DIR: tar DIR's contents into $OUT/TGZ_NAME (last thing a call does).
pack_results() {
    tar czf "$OUT/$1" -C "$2" . && say "packed $OUT/$1 ($(stat -c %s "$OUT/$1") bytes); \$OUT holds $(out_files) files, $(out_bytes) bytes"
}

# finish_call RC TGZ_NAME: keep $LOG with the results in $RES, pack $RES under $OUT, exit with RC.
finish_call() {
    cp "$LOG" "$RES/" 2>/dev/null
    pack_results "$2" "$RES" 2>&1 | tee -a "$LOG"
    exit "$1"
}
