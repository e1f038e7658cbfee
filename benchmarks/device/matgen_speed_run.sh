# One device call for what issues 3 and 4 still need measured on the GPU, in this order, each step stopped
# in time to pack what it has (deadline: DEV_DEADLINE s after the start):
#   1. benchmarks/bench_skip_idle_rows.py at batch 10,000, NFE 500: every crystal in every step (the
#      sampler before session 13) vs skip_idle_rows, same run;
#   2. `matgen generate --n 10000 --batch-size 10000 --workers 12` with the shipped model, timed by
#      /usr/bin/time (issue 3's target: 30 s at NFE 500, CIF writing included); then the same with --compile;
#   3. benchmarks/relax_vs_chgnet.py on 128 MP-20 test crystals (issue 4's same-run ratio at its size).
#   bash benchmarks/device/matgen_speed_run.sh      # carry .whl .whl2 .devdata
# CPU smoke test here (no wheels to install; small numbers):
#   MG_LOCAL=1 MG_N=16 MG_STEPS=5 MG_RELAX=2 MG_DEVICE=cpu OUT=/tmp/mgspeed bash benchmarks/device/matgen_speed_run.sh
export DEV_T0=${DEV_T0:-$(date +%s)}  # the deadline counts from the start of the call, wheel installs included
N=${MG_N:-10000} STEPS=${MG_STEPS:-500} DEVICE=${MG_DEVICE:-cuda} RELAX=${MG_RELAX:-128} W=${MG_WORK:-out}
source benchmarks/device/matgen_env.sh
exec > >(tee -a "$OUT/log_speed.txt") 2>&1
dev_info || exit 1

# 1. the sampler with and without skipping idle crystals -----------------------------------------------------
run_step 60 "skip_idle_rows vs every row" python3 benchmarks/bench_skip_idle_rows.py --device "$DEVICE" \
    --batch "$N" --steps "$STEPS"

# 2. issue 3: the whole command, eager and compiled ----------------------------------------------------------
for variant in eager compile; do
    flag=$([ $variant = compile ] && echo --compile)
    rm -rf "$W/g_$variant"
    run_step 60 "generate $N $variant" /usr/bin/time -f "%e s wall %M KB maxrss" \
        python3 -m cli.matgen generate --n "$N" --out "$W/g_$variant" --batch-size "$N" \
        --workers 12 --steps "$STEPS" --device "$DEVICE" --quiet --seed 0 $flag
    ls "$W/g_$variant" | grep -c '\.cif$'
    [ -f "$W/g_$variant/samples.csv" ] && cp "$W/g_$variant/samples.csv" "$OUT/samples_$variant.csv"
done

# 3. issue 4: batched CHGNet relaxation vs StructOptimizer at the size -------------------------------
run_step 120 "relax $RELAX crystals" python3 benchmarks/relax_vs_chgnet.py --n "$RELAX" --max-atoms 20 \
    --strain 0.05 --rattle 0.2 --device "$DEVICE"
say "done"
