# One device call: train a model of matgen/configs/ko_dfm_ship_gpu.toml under a wall-clock budget, export
# its best EMA weights (bf16, split in 15 MB parts for the way back), then generate crystals with it at
# NFE 500, timed by benchmarks/bench_generate.py; the CIFs come back as a .tgz.
#   bash benchmarks/device/train_generate.sh SCHEDULER(ko|linear) BUDGET_MINUTES N_CRYSTALS
source benchmarks/device/env.sh
sched=${1:?scheduler} budget=${2:?minutes} n=${3:?crystals}
log=$OUT/log_$sched.txt
python3 -m cli.matgen train --config matgen/configs/ko_dfm_ship_gpu.toml --scheduler "$sched" \
    --run-dir "runs/$sched" --no-resume --time-budget "$budget" --quiet \
    --export "runs/${sched}_dfm_mp20.safetensors" --export-bf16 2>&1 | tee -a "$log" || exit 1
cp "runs/$sched/metrics.jsonl" "$OUT/metrics_$sched.jsonl"
split -b 15M -d "runs/${sched}_dfm_mp20.safetensors" "$OUT/${sched}_dfm_mp20.safetensors.part"
python3 benchmarks/bench_generate.py --device cuda --n "$n" --steps 500 --batch-size "$n" \
    --checkpoint "runs/${sched}_dfm_mp20.safetensors" --no-reference --out-dir "out/gen_$sched" \
    --json "$OUT/generate_$sched.json" 2>&1 | tee -a "$log"
tar czf "$OUT/gen_$sched.tgz" -C out "gen_$sched"
