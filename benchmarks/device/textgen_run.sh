#!/usr/bin/env bash
# One device call for textgen (issue 5): train one or more text models one after the other, each with the
# same wall-clock budget, then in the same call
#   * the Table-1 rows of these models: `textgen evaluate` (ELBO bound for DFM, exact for AR) on
#     wikitext2, wikitext103, ptb, lambada -> table1/likelihood.csv, report.json
#   * for every DFM model, TG_SAMPLES samples at each NFE of TG_NFE, kept with their token ids
#     (textgen_samples.py sample -> samples/NAME_nfeK.jsonl)
#   * if an AR model was trained in this call: unigram entropy and generative perplexity of every sample
#     file of this call and of the carried .devsamples/ (earlier calls' .tgz), judged by that AR model
#     (textgen_samples.py judge -> genppl.csv). The AR call therefore comes last.
# Back under $OUT: log_TAG.txt, TAG.tgz (runs/*/metrics.jsonl + config.json + train logs, table1/,
# samples/, genppl.csv, timing.txt) and each model's weights in bf16 as NAME.bf16.safetensors.partNN.
#
#   bash benchmarks/device/textgen_run.sh NAME[,NAME...] MINUTES      (carry .devtext [.devsamples])
# NAME: ar | lin_mask | ko_mask | cos_mask | lin_bX | ko_bX | cos_bX (X = beta0 of the eq 38 source,
#       e.g. ko_b1024, ko_b64, ko_b-0.5); MINUTES: --time-budget of each model.
#
# Overrides (environment; defaults = the README's GPU plan): TG_TRAIN_FLAGS (the shared training flags),
# TG_SIZE, TG_SEQ_LEN, TG_BATCH, TG_DATASETS, TG_LIMIT, TG_POINTS, TG_EVAL_BATCH, TG_CHUNK, TG_NFE,
# TG_SAMPLES, TG_SAMPLE_BATCH, TG_JUDGE (an AR checkpoint to judge with when no AR is trained here);
# and those of env_common.sh (DEV_DEVICE=cpu, OUT, DEV_WORK, DEV_DEADLINE, DEV_SHIP_CKPT).
source benchmarks/device/env_common.sh || exit 1
names=${1:?usage: textgen_run.sh NAME[,NAME...] MINUTES}
minutes=${2:?usage: textgen_run.sh NAME[,NAME...] MINUTES}
IFS=, read -ra NAMES <<<"$names"
tag=text_${names//,/-}
LOG=$OUT/log_$tag.txt
RUNS=$DEV_WORK/runs/text
RES=$DEV_WORK/results/$tag
TIMING_FILE=$RES/timing.txt  # run_step records each step's wall time there

TG_SIZE=${TG_SIZE:-small}
TG_SEQ_LEN=${TG_SEQ_LEN:-256}
TG_BATCH=${TG_BATCH:-32}
TG_TRAIN_FLAGS=${TG_TRAIN_FLAGS:-"--size $TG_SIZE --seq-len $TG_SEQ_LEN --steps 100000 --batch-size $TG_BATCH \
--lr 1e-3 --warmup 200 --lr-schedule cosine --ema-decay 0.999 --eval-every 1000 --ckpt-every 5000 --seed 0"}
TG_DATASETS=${TG_DATASETS:-wikitext2,wikitext103,ptb,lambada}
TG_LIMIT=${TG_LIMIT:-64}
TG_POINTS=${TG_POINTS:-256}
TG_EVAL_BATCH=${TG_EVAL_BATCH:-16}
TG_CHUNK=${TG_CHUNK:-4}
TG_NFE=${TG_NFE:-16,32,64,128,256}
TG_SAMPLES=${TG_SAMPLES:-64}
TG_SAMPLE_BATCH=${TG_SAMPLE_BATCH:-32}

spec_of() {  # NAME -> textgen train flags
    local sched src
    [ "$1" = ar ] && { echo "--kind ar"; return 0; }
    sched=${1%%_*} src=${1#*_}
    case $sched in lin) sched=linear ;; ko) sched=ko ;; cos) sched=cosine ;; *) return 1 ;; esac
    case $src in
        mask) echo "--kind dfm --source mask --scheduler $sched" ;;
        b*) [[ ${src#b} =~ ^-?[0-9]+(\.[0-9]+)?$ ]] || return 1
            echo "--kind dfm --source stats --beta0 ${src#b} --scheduler $sched" ;;
        *) return 1 ;;
    esac
}
for name in "${NAMES[@]}"; do
    spec_of "$name" >/dev/null || { echo "unknown model name '$name' (ar, lin_mask, ko_mask, ko_b1024, ...)" >&2; exit 2; }
done

{
    say "textgen_run.sh $names $minutes  (device $DEV_DEVICE, deadline ${DEV_DEADLINE} s)"
    dev_info || exit 1
    unpack_tar_xz .devtext/textgen-data.tar.xz "$DEV_WORK/textdata" || exit 1
    export TEXTGEN_DATA=$DEV_WORK/textdata/text TEXTGEN_TOKENIZER=$DEV_WORK/textdata/tokenizer/gpt2
    export TEXTGEN_CACHE=$DEV_WORK/textdata/cache
    say "text data ready in $DEV_WORK/textdata"
    rm -rf "$RES" && mkdir -p "$RES/runs" "$RUNS" || exit 1
    # rough need on an H100: per model the budget + ~25 s (start, data, export) + ~40 s of evaluation
    need=$(awk -v n=${#NAMES[@]} -v m="$minutes" 'BEGIN {print int(n * (60 * m + 65))}')
    [ "$need" -gt "$(time_left)" ] && say "WARNING: ${#NAMES[@]} x $minutes min of training + evaluation (~$need s) may not fit before the deadline ($(time_left) s left): the last steps would be skipped"

    trained=() dfm=() ar=
    for name in "${NAMES[@]}"; do
        # shellcheck disable=SC2046,SC2086
        run_step 60 "train $name" "$PY" -m cli.textgen train --run-dir "$RUNS/$name" --no-resume --quiet \
            $TG_TRAIN_FLAGS $(spec_of "$name") --time-budget "$minutes" --device "$DEV_DEVICE" \
            2>&1 | tee "$RES/runs/train_$name.log"
        mkdir -p "$RES/runs/$name"
        cp "$RUNS/$name"/{metrics.jsonl,config.json} "$RES/runs/$name/" 2>/dev/null
        if [ -f "$RUNS/$name/model.safetensors" ]; then
            trained+=("$name")
            if [ "$name" = ar ]; then ar=$RUNS/ar/model.safetensors; else dfm+=("$name"); fi
        else
            say "no model.safetensors for $name"
        fi
    done
    for name in "${trained[@]}"; do ship_ckpt "$RUNS/$name/model.safetensors" "$name"; done

    if [ ${#trained[@]} -gt 0 ]; then
        args=()
        for name in "${trained[@]}"; do args+=(--checkpoint "$RUNS/$name/model.safetensors" --name "$name"); done
        run_step 30 "evaluate (Table 1 rows)" "$PY" -m cli.textgen evaluate "${args[@]}" --datasets "$TG_DATASETS" \
            --limit "$TG_LIMIT" --points "$TG_POINTS" --batch-size "$TG_EVAL_BATCH" --chunk "$TG_CHUNK" \
            --device "$DEV_DEVICE" --quiet --out "$RES/table1"
    fi
    for name in "${dfm[@]}"; do
        run_step 20 "samples $name" "$PY" benchmarks/device/textgen_samples.py sample \
            --checkpoint "$RUNS/$name/model.safetensors" --name "$name" --nfe "$TG_NFE" --n "$TG_SAMPLES" \
            --batch-size "$TG_SAMPLE_BATCH" --seed 0 --device "$DEV_DEVICE" --out "$RES/samples"
    done
    judge=${ar:-${TG_JUDGE:-}}
    sources=()
    [ -d "$RES/samples" ] && sources+=("$RES/samples")
    [ -d .devsamples ] && sources+=(.devsamples)
    if [ ${#sources[@]} -gt 0 ]; then
        run_step 15 "judge (entropy${judge:+ and gen. perplexity})" "$PY" benchmarks/device/textgen_samples.py judge \
            ${judge:+--judge "$judge"} --device "$DEV_DEVICE" --out "$RES/genppl.csv" "${sources[@]}"
    fi
    say "done; packing"
} 2>&1 | tee -a "$LOG"
finish_call "${PIPESTATUS[0]}" "$tag.tgz"
