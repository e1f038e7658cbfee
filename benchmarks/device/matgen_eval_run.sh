# One device call of the crystal slice end to end (issues 3 and 4). It does whatever is still left, in
# this order, and stops each step in time to pack what it has (deadline: DEV_DEADLINE s after the start):
#   1. `matgen generate --n 10000` with the shipped model (timed, --batch-size 10000 --workers 12), into
#      out/g10k; then the same with --batch-size 2500, so that CIF writing overlaps sampling (timed only);
#   2. `matgen evaluate out/g10k --device cuda --workers 14` into out/ev10k (resumes from its journal);
#   3. the MP-20 test anchor (MG_ANCHOR; default a seeded 1,000-crystal subset of the test split), whose validity and
#      fingerprints were computed on the CPU beforehand (its journal travels), so only the CHGNet part runs;
#   4. if time is left: `bench_length_buckets.py` on the GPU.
# What a cold machine needs comes from .devcarry/ (carry it): g10k.tgz and ev10k.tar.xz from an earlier
# call's $OUT, and mp20_test_1k_seed0.csv + ev_test1k/ (made here, see BENCHMARKS.md).
#   bash benchmarks/device/matgen_eval_run.sh      # carry .whl .whl2 .devdata .devcarry
# CPU smoke test here (no wheels to install; small numbers):
#   MG_LOCAL=1 MG_N=40 MG_STEPS=5 MG_DEVICE=cpu MG_WORKERS=2 OUT=/tmp/mgout bash benchmarks/device/matgen_eval_run.sh
export DEV_T0=${DEV_T0:-$(date +%s)}  # the deadline counts from the start of the call, wheel installs included
CARRY=${MG_CARRY:-.devcarry} W=${MG_WORK:-out}
# the anchor: its input, and the name of the folder holding the journal of its CPU-only run
# (`matgen evaluate INPUT --skip-stability --out .devcarry/NAME`; NAME.tar.xz when it is large), e.g. the full
# test split: MG_ANCHOR=.devdata/mp_20/test.csv.gz MG_ANCHOR_NAME=ev_test. MG_ANCHOR_ONLY=1: steps 3-4 only
ANCHOR=${MG_ANCHOR:-$CARRY/mp20_test_1k_seed0.csv} ANAME=${MG_ANCHOR_NAME:-ev_test1k}
N=${MG_N:-10000} STEPS=${MG_STEPS:-500} DEVICE=${MG_DEVICE:-cuda} WORKERS=${MG_WORKERS:-14}
source benchmarks/device/matgen_env.sh
log=$OUT/log_eval.txt
exec > >(tee -a "$log") 2>&1
nproc --all

# 1. the crystals (generated here, or the earlier call's, unpacked) ----------------------------------------
if [ ! -f $W/g10k/samples.csv ] && [ -f $CARRY/g10k.tgz ]; then
    mkdir -p "$W" && tar xzf $CARRY/g10k.tgz -C "$W" && say "unpacked the earlier call's $W/g10k"
fi
if [ ! -f $W/g10k/samples.csv ] && [ -z "${MG_ANCHOR_ONLY:-}" ]; then
    run_step 120 "generate 10k batch 10000 workers 12" /usr/bin/time -f "%e s wall %M KB maxrss" \
        python3 -m cli.matgen generate --n "$N" --out $W/g10k --batch-size "$N" --workers 12 \
        --steps "$STEPS" --device "$DEVICE" --quiet --seed 0 || exit 1
    tar czf "$OUT/g10k.tgz" -C "$W" g10k
    ls $W/g10k/*.cif | wc -l
    run_step 120 "generate 10k batch 2500 workers 12" /usr/bin/time -f "%e s wall %M KB maxrss" \
        python3 -m cli.matgen generate --n "$N" --out $W/g10k_b2500 --batch-size $((N / 4)) --workers 12 \
        --steps "$STEPS" --device "$DEVICE" --quiet --seed 0
    ls $W/g10k_b2500/*.cif | wc -l
    rm -rf $W/g10k_b2500
fi

# 2. the 10,000-crystal evaluation -------------------------------------------------------------------------
if [ ! -f $W/ev10k/journal.jsonl ] && [ -f $CARRY/ev10k.tar.xz ]; then
    mkdir -p "$W" && tar xJf $CARRY/ev10k.tar.xz -C "$W" && say "unpacked the earlier call's $W/ev10k"
fi
if [ ! -f $W/ev10k/summary.json ] && [ -z "${MG_ANCHOR_ONLY:-}" ]; then
    run_step 60 "evaluate g10k" python3 -m cli.matgen evaluate $W/g10k --out $W/ev10k --device "$DEVICE" --workers "$WORKERS" --no-progress
fi
[ -d $W/ev10k ] && XZ_OPT=-T0 tar cJf "$OUT/ev10k.tar.xz" -C "$W" ev10k

# 3. the MP-20 test anchor (MG_ANCHOR, default the 1,000-crystal subset) -----------------------------------
if { [ -f $W/ev10k/summary.json ] || [ -n "${MG_ANCHOR_ONLY:-}" ]; } && [ ! -f $W/$ANAME/summary.json ]; then
    if [ ! -d $W/$ANAME ]; then  # the stage-1 journal made on a CPU: a folder, or a .tar.xz of it
        if [ -f $CARRY/$ANAME.tar.xz ]; then tar xJf $CARRY/$ANAME.tar.xz -C "$W"; else cp -r $CARRY/$ANAME $W/$ANAME; fi
    fi
    run_step 120 "evaluate anchor $ANAME" python3 -m cli.matgen evaluate "$ANCHOR" --out $W/$ANAME \
        --device "$DEVICE" --workers "$WORKERS" --no-progress
    [ -d $W/$ANAME ] && XZ_OPT=-T0 tar cJf "$OUT/$ANAME.tar.xz" -C "$W" $ANAME
fi

# 4. sampling in length groups on the GPU ------------------------------------------------------------------
if [ -f $W/$ANAME/summary.json ]; then
    run_step 90 "length buckets" python3 benchmarks/bench_length_buckets.py --device "$DEVICE" --batch "$N" \
        --steps $((STEPS < 100 ? STEPS : 100)) --buckets 1 2 3 4 --repeats 1
fi
say "done"
