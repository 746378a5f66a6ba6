#!/usr/bin/env bash
# The first run on a GPU machine, in at most 10 minutes on one H100: the Triton kernel tests on CUDA,
# the kernels' self-check, bench/loss_kernels.py (fused vs eager vs torch.compile: time, peak memory),
# bench/train_step.py's GPU step (ViT-L 280² bf16: images/s, MFU; then FSDP2 steps on one GPU) and
# bench/inference.py predict (ViT-L 644² bf16: forward alone vs the whole predict loop). Every figure
# goes into one Markdown table, OUTDIR/device_check.md (bench/device_table.py builds it from the
# RESULT lines of each step's log).
#
#   bash bench/device_check.sh [OUTDIR]            # OUTDIR defaults to $OUT, else ./device_check
#   bash bench/device_check.sh --dry-run [OUTDIR]  # every step on the CPU at tiny sizes (tests/test_device_check.py)
#   bash bench/device_check.sh --commands          # print each step's name and command, run nothing
#
# Each step runs under its own timeout, and all of them under one overall deadline (570 s), so a hang
# costs that step only; a failing step records its error in the table and the next one runs.
# Environment: PYTHON (default .venv/bin/python when present, else python3).
# Exit status: 0 every step ok, 1 some step failed or timed out (the table is written either way), 2 bad arguments.

set -u
cd "$(dirname "$0")/.."

DRY=0
LIST=0
OUTDIR=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        --commands) LIST=1 ;;
        -h|--help) sed -n "2,17p" "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "error: unknown option $arg (use --dry-run or --help)" >&2; exit 2 ;;
        *) [ -n "$OUTDIR" ] && { echo "error: one OUTDIR only" >&2; exit 2; }; OUTDIR=$arg ;;
    esac
done
OUTDIR=${OUTDIR:-${OUT:-device_check}}
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1
if [ "$LIST" -eq 0 ]; then
    mkdir -p "$OUTDIR/logs" || exit 2
    : > "$OUTDIR/steps.tsv"
fi

START=$(date +%s)
DEADLINE=$((START + 570))  # leaves the table and the machine's own start within 10 minutes
FAILED=0

# step NAME LIMIT_S COMMAND...: run it under min(LIMIT_S, time left), log to OUTDIR/logs/NAME.log
step() {
    local name=$1 limit=$2
    shift 2
    if [ "$LIST" -eq 1 ]; then
        printf '%s\t%s\n' "$name" "$*"
        return
    fi
    local left=$((DEADLINE - $(date +%s)))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 5 ]; then
        echo "no time left before the overall deadline" > "$OUTDIR/logs/$name.log"
        printf '%s\t%s\t%s\t%s\t%s\n' "$name" -1 0 0 "$*" >> "$OUTDIR/steps.tsv"
        echo "[$name] skipped: no time left"
        FAILED=1
        return
    fi
    local t0 t1 rc
    t0=$(date +%s.%N)
    timeout --kill-after=5 "$limit" "$@" > "$OUTDIR/logs/$name.log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    local secs
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$limit" "$secs" "$*" >> "$OUTDIR/steps.tsv"
    echo "[$name] exit $rc after ${secs} s (limit ${limit} s)"
    [ "$rc" -ne 0 ] && FAILED=1
}

if [ "$DRY" -eq 1 ]; then
    # the same steps on the CPU: kernels under the Triton interpreter, tiny models, a few images;
    # one thread each, so a busy machine slows the run down instead of stalling competing thread teams
    export OMP_NUM_THREADS=1
    step kernel_tests 90 env TRITON_INTERPRET=1 "$PYTHON" -m pytest -q -p no:cacheprovider \
        tests/test_kernels_interpreted.py -k "sem_fp32 or inst_thin or triton_backend"
    step kernel_selfcheck 60 env TRITON_INTERPRET=1 "$PYTHON" kernels/check.py --device cpu
    step loss_kernels 60 "$PYTHON" bench/loss_kernels.py --device cpu
    step train_step 90 "$PYTHON" bench/train_step.py --device cpu --step-only --cpu-arch tiny --cpu-size 28 \
        --cpu-batch 1 --cpu-steps 1 --fsdp-steps 1
    step inference 90 "$PYTHON" bench/inference.py predict --device cpu --arch tiny --size 28 --jpeg-size 42x28 \
        --images 4 --batch-size 2 --repeats 1
else
    step kernel_tests 80 env GENPAN_KERNEL_TEST_DEVICE=cuda "$PYTHON" -m pytest -q -p no:cacheprovider \
        tests/test_kernels_interpreted.py
    step kernel_selfcheck 40 "$PYTHON" kernels/check.py --device cuda
    # one step per case: a slow torch.compile of one case cannot take the others' figures with it
    for case in inst_stage1 inst_stage3 sem_stage3; do
        step "loss_kernels_$case" 60 "$PYTHON" bench/loss_kernels.py --device cuda --cases "$case"
    done
    step train_step 140 "$PYTHON" bench/train_step.py --device cuda --step-only --gpu-arch vit_large --gpu-size 280 \
        --gpu-batch 32 --gpu-steps 10 --fsdp-steps 5
    step inference 120 "$PYTHON" bench/inference.py predict --device cuda --arch vit_large --size 644 \
        --jpeg-size 644x644 --bf16 --images 32 --batch-size 4 --repeats 2
fi

[ "$LIST" -eq 1 ] && exit 0
TABLE_ARGS=("$OUTDIR")
[ "$DRY" -eq 1 ] && TABLE_ARGS+=(--dry-run)
"$PYTHON" bench/device_table.py "${TABLE_ARGS[@]}" || FAILED=1
echo "table: $OUTDIR/device_check.md ($(( $(date +%s) - START )) s in all)"
exit "$FAILED"
