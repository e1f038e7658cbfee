#!/usr/bin/env bash
# One device call for the discrete-latent variant of imagegen (issue 6 stretch, section 8.4 / E.4): train the
# VQ-VAE tokenizer on CIFAR-10, then a latent DFM model on its code grids with the metric path on the codebook
# embeddings (eq 107) and one with the mask path, each with a wall-clock budget, then in the same call
#   * the VQ-VAE's reconstruction floor: FD-EffNetLite0 of LAT_N decoded test images (encode -> decode) is
#     not measured here; its validation MSE and code usage are in the VQ-VAE metadata (vq/vqvae_meta.json)
#   * score vs NFE for each latent model: FD-EffNetLite0 of LAT_N samples against the test images at each
#     NFE of LAT_NFE (velocity ko) -> nfe_latent_PATH/results.csv, fd_vs_nfe.png, grids
#   * a 64-image sample grid per latent model at NFE LAT_GRID_NFE -> latent_PATH_samples.png
# Steps stop at the call's deadline (DEV_DEADLINE). Back under $OUT: log_img_latent.txt, img_latent.tgz, the
# sample grids, and the metric model's weights in bf16 parts when there is room (DEV_SHIP_CKPT=0: none).
#
#   bash benchmarks/device/imagegen_latent_run.sh VQ_MINUTES DFM_MINUTES     (carry .devimg)
#
# Overrides (environment): LAT_VQ_FLAGS (extra `imagegen train-vq` flags), LAT_TRAIN_FLAGS (extra
# `imagegen train` flags, default --size small), LAT_PATHS (metric,mask), LAT_N (1000), LAT_NFE (16,64,128),
# LAT_BATCH (250), LAT_GRID_NFE (128), LAT_REF_N (a random subset of the test split as the FD reference;
# default: all); and those of env_common.sh (DEV_DEVICE=cpu, OUT, DEV_WORK, ...).
source benchmarks/device/env_common.sh || exit 1
vq_minutes=${1:?usage: imagegen_latent_run.sh VQ_MINUTES DFM_MINUTES}
dfm_minutes=${2:?usage: imagegen_latent_run.sh VQ_MINUTES DFM_MINUTES}
tag=img_latent
LOG=$OUT/log_$tag.txt
RUNS=$DEV_WORK/runs/latent
RES=$DEV_WORK/results/$tag
TIMING_FILE=$RES/timing.txt
VQ=$RUNS/vq/vqvae.safetensors

LAT_VQ_FLAGS=${LAT_VQ_FLAGS:-}
LAT_TRAIN_FLAGS=${LAT_TRAIN_FLAGS:---size small}
LAT_PATHS=${LAT_PATHS:-metric,mask}
LAT_N=${LAT_N:-1000}
LAT_NFE=${LAT_NFE:-16,64,128}
LAT_BATCH=${LAT_BATCH:-250}
LAT_GRID_NFE=${LAT_GRID_NFE:-128}
LAT_REF_N=${LAT_REF_N:-}
REF=()
[ -n "$LAT_REF_N" ] && REF=(--reference-n "$LAT_REF_N")

{
    say "imagegen_latent_run.sh $vq_minutes $dfm_minutes  (device $DEV_DEVICE, deadline ${DEV_DEADLINE} s)"
    dev_info || exit 1
    unpack_images || exit 1
    rm -rf "$RES" && mkdir -p "$RES/vq" "$RUNS" || exit 1

    # shellcheck disable=SC2086
    run_step 60 "train-vq" "$PY" -m cli.imagegen train-vq --dataset cifar10 --run-dir "$RUNS/vq" --no-resume \
        --quiet --time-budget "$vq_minutes" --device "$DEV_DEVICE" $LAT_VQ_FLAGS 2>&1 | tee "$RES/vq/train.log"
    [ -f "$VQ" ] || { say "no $VQ: nothing to train on"; exit 1; }
    cp "$RUNS/vq/metrics.jsonl" "$RES/vq/" 2>/dev/null
    "$PY" -c "import json, sys; from dfm_core.training import load_safetensors; \
json.dump(load_safetensors(sys.argv[1])[1], open(sys.argv[2], 'w'), indent=2, default=str)" \
        "$VQ" "$RES/vq/vqvae_meta.json"

    for path in ${LAT_PATHS//,/ }; do
        ck=$RUNS/latent_$path/model.safetensors
        mkdir -p "$RES/latent_$path"
        # shellcheck disable=SC2086
        run_step 60 "train latent $path" "$PY" -m cli.imagegen train --dataset cifar10 --latent "$VQ" \
            --path "$path" --run-dir "$RUNS/latent_$path" --no-resume --quiet --time-budget "$dfm_minutes" \
            --device "$DEV_DEVICE" $LAT_TRAIN_FLAGS 2>&1 | tee "$RES/latent_$path/train.log"
        cp "$RUNS/latent_$path"/{metrics.jsonl,config.json} "$RES/latent_$path/" 2>/dev/null
        [ -f "$ck" ] || { say "no $ck: skipping its evaluation"; continue; }
        [ "$path" = metric ] && ship_ckpt "$ck" "cifar_latent_metric"
        run_step 60 "score vs NFE, latent $path" "$PY" -m cli.imagegen evaluate --checkpoint "$ck" \
            --out "$RES/nfe_latent_$path" --n "$LAT_N" --nfe "$LAT_NFE" --velocity ko --grids 64 \
            --batch-size "$LAT_BATCH" --device "$DEV_DEVICE" --quiet "${REF[@]}"
        run_step 20 "sample grid, latent $path" "$PY" -m cli.imagegen sample --checkpoint "$ck" --n 64 \
            --steps "$LAT_GRID_NFE" --scale 2 --seed 0 --device "$DEV_DEVICE" --quiet \
            --out "$RES/latent_${path}_samples.png" && cp "$RES/latent_${path}_samples.png" "$OUT/"
    done
    say "done; packing"
} 2>&1 | tee -a "$LOG"
finish_call "${PIPESTATUS[0]}" "$tag.tgz"
