#!/usr/bin/env bash
# The small-data study of issue 38 (docs/small-data.md) at the scale a shared 2-core CPU allows: vtab1k-mini cut to
# 100, 200 and 400 images, the frozen-trunk methods without and with --search, 3 seeds, in priority order so that
# what finishes first is what matters most. Resumable: run it again and finished cells are read back.
#
#   CODE=/path/to/querytune-checkout OUT=/tmp/qt-study benchmarks/small_data_study.sh
#
# Scale (the full study's 224 px, paper profile does not fit the machine): --image-size 56, --precision fp32, the
# quick profile (20 epochs for frozen-trunk methods, no step floor). Phase 1: linear and head2toe on every task;
# phase 2: vqt, synqt and memory without the search at each size, a task of each group first; phase 3: the same
# with the search.
#
#   CODE=... OUT=/tmp/qt-floor benchmarks/small_data_study.sh floor TASK...
#
# The step floor at 100 images: the paper profile (so every run is floored), no search, per task the linear probe
# and Head2Toe with 3 seeds, then VQT, SynQT and memory with 1 seed (REPORT folders $OUT-lh and $OUT-qsm; give
# each process its own OUT and disjoint tasks, as the machine's cores allow).
set -u
CODE=${CODE:-$(cd "$(dirname "$0")/.." && pwd)}
OUT=${OUT:-/tmp/qt-study}
SUITES=${SUITES:-/tmp/qt-study-suite}
DATA=${DATA:-/work/shared/data/vtab1k-mini}
BACKBONE=${BACKBONE:-/work/shared/weights/dinov2-small-imgfocus}
SCALE=${SCALE:---image-size 56 --precision fp32 --profile quick}
# a task of each group first, so that a partial phase still has every group
ORDER="dtd10 mednist shapes_count cifar10 pneumoniamnist shapes_loc flowers102 shapes_ori signdigits"
export OMP_NUM_THREADS=1 PYTHONPATH=$CODE
PYTHON=${PYTHON:-/work/main/.venv/bin/python}

bench() {  # size, search flag ("" or --search), methods, tasks
    local size=$1 search=$2 methods=$3 tasks=$4
    "$PYTHON" -m querytune bench --suite "$SUITES-$size" --groups "$CODE/benchmarks/vtab1k-mini-groups.txt" \
        --methods "$methods" --backbone "$BACKBONE" --out "$OUT-$size${search:+-search}" --seeds 3 $search $SCALE \
        --tasks "$tasks" --cache "$OUT-cache" --cache-splits train800val200,test --workers 0 -q \
        > "$OUT-$size${search:+-search}.log.$(date +%s)" 2>&1
    echo "$(date -u +%T) done: $size ${search:-no-search} $methods $tasks"
}

if [ "${1:-}" = floor ]; then
    shift
    [ -d "$SUITES-100" ] || "$PYTHON" "$CODE/benchmarks/small_data.py" --suite "$DATA" --images 100 \
        --out "$SUITES-100" > /dev/null
    for task in "$@"; do
        for cell in "linear,head2toe 3 lh" "vqt,synqt,memory 1 qsm"; do
            read -r methods seeds report <<< "$cell"
            "$PYTHON" -m querytune bench --suite "$SUITES-100" --groups "$CODE/benchmarks/vtab1k-mini-groups.txt" \
                --methods "$methods" --backbone "$BACKBONE" --out "$OUT-$report" --seeds "$seeds" --image-size 56 \
                --precision fp32 --profile paper --tasks "$task" --cache "$OUT-cache" \
                --cache-splits train800val200,test --workers 0 -q > "$OUT-$report.$task.log" 2>&1
            echo "$(date -u +%T) done: floor $methods $task"
        done
    done
    exit 0
fi
for size in 100 200 400; do
    [ -d "$SUITES-$size" ] || "$PYTHON" "$CODE/benchmarks/small_data.py" --suite "$DATA" --images "$size" \
        --out "$SUITES-$size" > /dev/null
done
all=$(echo $ORDER | tr ' ' ,)
for size in 100 200 400; do
    for search in "" --search; do
        bench $size "$search" linear,head2toe "$all"
    done
done
for search in "" --search; do
    for size in 100 200 400; do
        for task in $ORDER; do
            bench $size "$search" linear,head2toe,vqt,synqt,memory $task
        done
    done
done
