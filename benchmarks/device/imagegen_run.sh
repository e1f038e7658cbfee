#!/usr/bin/env bash
# One device call for imagegen (issue 6): train one CIFAR-10 model (imagegen/configs/cifar10_default.toml,
# the 29M U-Net, on the metric or the mask path) with a wall-clock budget, then in the same call
#   * score vs NFE (Figure 2, middle): FD-EffNetLite0 of IMG_N samples against the 10,000 test images at
#     each NFE of IMG_NFE, for velocity ko and power-inf (metric path; on the mask path every safe velocity
#     coincides, so ko only), each without and with the corrector (w = IMG_W, p = q = 0.25), plus the data
#     baseline (IMG_N training images) -> nfe_PATH/results.csv, fd_vs_nfe.png, one 64-image grid per point
#   * a sample grid: 64 images at NFE IMG_GRID_NFE with the corrector, scaled x2 -> PATH_samples.png
#   * metric path only (IMG_EXTRAS=1): corrector weights 0.5 and 8 at NFE 64 (0 and IMG_W are in the sweep)
#     -> corrector_metric/, and the campbell velocity at NFE 32 and 128 (expected to fail on the metric
#     path, section 4) -> campbell_metric/
# Steps run in that order and each stops at the call's deadline (DEV_DEADLINE), so a slow sampler costs
# the last extras, not the results. The train split is decoded once per machine (~10 s) into
# .devwork/cache/imagegen, the FD statistics of the test split likewise.
# Back under $OUT: log_TAG.txt, TAG.tgz (run metrics + config, train log, evaluation folders with their
# grids, timing.txt), PATH_samples.png, and the weights in bf16 as cifar_PATH.bf16.safetensors.partNN
# (58 MB for the default U-Net: 4 parts).
#
#   bash benchmarks/device/imagegen_run.sh PATH MINUTES     (PATH: metric | mask; carry .devimg)
#
# Overrides (environment): IMG_CONFIG, IMG_TRAIN_FLAGS (extra `imagegen train` flags, e.g. --size small),
# IMG_COMPILE (0 default: no torch.compile, whose compile time would come out of the budget; 1: compile),
# IMG_N, IMG_NFE, IMG_VELOCITIES, IMG_W, IMG_BATCH (sampling batch), IMG_GRIDS, IMG_GRID_NFE,
# IMG_REF_N (a random subset of the test split as reference; default: all), IMG_EXTRAS, IMG_CORR_NFE (64),
# IMG_CAMPBELL_NFE (32,128); and those of
# env_common.sh (DEV_DEVICE=cpu, OUT, DEV_WORK, DEV_DEADLINE, DEV_SHIP_CKPT).
source benchmarks/device/env_common.sh || exit 1
path=${1:?usage: imagegen_run.sh metric|mask MINUTES}
minutes=${2:?usage: imagegen_run.sh metric|mask MINUTES}
case $path in metric | mask) ;; *) echo "PATH must be metric or mask, got '$path'" >&2; exit 2 ;; esac
tag=img_$path
LOG=$OUT/log_$tag.txt
RUNS=$DEV_WORK/runs/image
RES=$DEV_WORK/results/$tag
TIMING_FILE=$RES/timing.txt  # run_step records each step's wall time there
CK=$RUNS/cifar_$path/model.safetensors

IMG_CONFIG=${IMG_CONFIG:-imagegen/configs/cifar10_default.toml}
IMG_TRAIN_FLAGS=${IMG_TRAIN_FLAGS:-}
IMG_COMPILE=${IMG_COMPILE:-0}
IMG_N=${IMG_N:-1000}
IMG_NFE=${IMG_NFE:-8,16,32,64,128}
[ "$path" = metric ] && IMG_VELOCITIES=${IMG_VELOCITIES:-ko,power-inf} || IMG_VELOCITIES=${IMG_VELOCITIES:-ko}
IMG_W=${IMG_W:-2}
IMG_BATCH=${IMG_BATCH:-250}
IMG_GRIDS=${IMG_GRIDS:-64}
IMG_GRID_NFE=${IMG_GRID_NFE:-256}
IMG_REF_N=${IMG_REF_N:-}
IMG_EXTRAS=${IMG_EXTRAS:-1}
IMG_CORR_NFE=${IMG_CORR_NFE:-64}
IMG_CAMPBELL_NFE=${IMG_CAMPBELL_NFE:-32,128}
PQ=(--corrector-p 0.25 --corrector-q 0.25)
REF=()
[ -n "$IMG_REF_N" ] && REF=(--reference-n "$IMG_REF_N")
[ "$IMG_COMPILE" = 1 ] && COMPILE=--compile || COMPILE=--no-compile

{
    say "imagegen_run.sh $path $minutes  (device $DEV_DEVICE, deadline ${DEV_DEADLINE} s)"
    dev_info || exit 1
    unpack_images || exit 1
    rm -rf "$RES" && mkdir -p "$RES/run" "$RUNS" || exit 1

    # shellcheck disable=SC2086
    run_step 60 "train $path" "$PY" -m cli.imagegen train --config "$IMG_CONFIG" --run-dir "$RUNS/cifar_$path" \
        --path "$path" --no-resume --quiet --time-budget "$minutes" --device "$DEV_DEVICE" $COMPILE $IMG_TRAIN_FLAGS \
        2>&1 | tee "$RES/run/train.log"
    cp "$RUNS/cifar_$path"/{metrics.jsonl,config.json} "$RES/run/" 2>/dev/null
    [ -f "$CK" ] || { say "no $CK: nothing to evaluate"; exit 1; }
    ship_ckpt "$CK" "cifar_$path"

    run_step 60 "score vs NFE" "$PY" -m cli.imagegen evaluate --checkpoint "$CK" --out "$RES/nfe_$path" \
        --n "$IMG_N" --nfe "$IMG_NFE" --velocity "$IMG_VELOCITIES" --corrector "0,$IMG_W" "${PQ[@]}" \
        --data-baseline --grids "$IMG_GRIDS" --batch-size "$IMG_BATCH" --device "$DEV_DEVICE" --quiet "${REF[@]}"

    run_step 20 "sample grid" "$PY" -m cli.imagegen sample --checkpoint "$CK" --n 64 --steps "$IMG_GRID_NFE" \
        --corrector "$IMG_W" "${PQ[@]}" --scale 2 --seed 0 --device "$DEV_DEVICE" --quiet \
        --out "$RES/${path}_samples.png" && cp "$RES/${path}_samples.png" "$OUT/"

    if [ "$path" = metric ] && [ "$IMG_EXTRAS" = 1 ]; then
        run_step 30 "corrector weights" "$PY" -m cli.imagegen evaluate --checkpoint "$CK" --out "$RES/corrector_$path" \
            --n "$IMG_N" --nfe "$IMG_CORR_NFE" --velocity ko --corrector 0.5,8 "${PQ[@]}" --grids "$IMG_GRIDS" \
            --batch-size "$IMG_BATCH" --device "$DEV_DEVICE" --quiet "${REF[@]}"
        run_step 30 "campbell" "$PY" -m cli.imagegen evaluate --checkpoint "$CK" --out "$RES/campbell_$path" \
            --n "$IMG_N" --nfe "$IMG_CAMPBELL_NFE" --velocity campbell --grids "$IMG_GRIDS" \
            --batch-size "$IMG_BATCH" --device "$DEV_DEVICE" --quiet "${REF[@]}"
    fi
    say "done; packing"
} 2>&1 | tee -a "$LOG"
finish_call "${PIPESTATUS[0]}" "$tag.tgz"
