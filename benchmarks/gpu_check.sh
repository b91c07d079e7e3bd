#!/usr/bin/env bash
# Every GPU figure, in two invocations of about 6-8 minutes each on one H100/H200:
#
#   benchmarks/gpu_check.sh OUT [SHARED]                       # tests, measure, epochs, full runs
#   PARTS=bench benchmarks/gpu_check.sh OUT2 [SHARED]          # the bench of every method on $TASKS
#
# (On an H200 the test suite needs about 200 s with 14 workers, each 100-epoch run 40-60 s, and
# each bench cell 4-30 s: docs/benchmarks-gpu.md.)
# SHARED holds weights/dinov2-small-imgfocus and data/vtab1k-mini/<task> (default ../shared).
# Runs from the source tree without installing. Each part has its own time limit, so the
# script always ends and leaves what it measured in OUT (at most 8 files):
#   check.log            everything printed, with the environment
#   tests.log            the test suite, run with CUDA visible (pytest-xdist where installed)
#   measure-vit-s.json   one training step of every method, shared DINOv2-S/14, batch 64, bf16
#   measure-vit-b.json   the same with a random ViT-B/16
#   epochs.json          VQT epoch: features in GPU memory vs streamed from the cache vs live trunk
#   compile.json         the GPU-resident VQT epoch eager vs with the step compiled ($COMPILE_MODES)
#   full-run-vit-s.json  100 VQT epochs on cifar10 end to end, caching train and test included
#   full-run-vit-b.json  the same with the random ViT-B/16 (timing only: its accuracy means nothing)
#   (check.log)          grid: VQT's 20-member grid as one stack vs one member alone (grid_speed.py)
#   bench.tar.gz         quick-profile bench of every method on $TASKS (report.md, results, pareto.png)
#
# A dry run on a CPU with toy sizes checks the plumbing:
#   DEVICE=cpu BATCH=4 SIZE=112 EPOCHS=2 EPOCH_IMAGES=32 TASKS=cifar10 BENCH_METHODS=linear,vqt,full \
#     MEASURE_METHODS=linear,vqt,full TEST_ARGS="-k placement" LIMIT_SCALE=4 PYTHON=.venv/bin/python \
#     benchmarks/gpu_check.sh /tmp/out
set -uo pipefail
OUT=$(realpath -m "$1")
SHARED=$(realpath "${2:-../shared}")
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
BATCH=${BATCH:-64}
SIZE=${SIZE:-224}
EPOCHS=${EPOCHS:-100}
EPOCH_IMAGES=${EPOCH_IMAGES:-1000}
WORKERS=${WORKERS:-8}
TASKS=${TASKS:-cifar10 pneumoniamnist shapes_ori}
ALL_METHODS=linear,vqt,vqt-naive,synqt,memory,full,vpt,lora,adaptformer,bitfit,vqt+lora,vqt+adaptformer,vqt+vpt
MEASURE_METHODS=${MEASURE_METHODS:-$ALL_METHODS}
BENCH_METHODS=${BENCH_METHODS:-linear,vqt,synqt,memory,full,vpt,lora,adaptformer,bitfit,vqt+lora,vqt+adaptformer,vqt+vpt}
TEST_ARGS=${TEST_ARGS:-}
COMPILE_MODES=${COMPILE_MODES:-default,reduce-overhead}  # the torch.compile modes the compile part times
PARTS=${PARTS:-tests random measure epochs compile full grid}  # any of those and bench
LIMIT_SCALE=${LIMIT_SCALE:-1}  # multiplies every part's time limit (a CPU dry run needs more)

mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
WORK=$(mktemp -d)
BACKBONE=$SHARED/weights/dinov2-small-imgfocus
VIT_B=$WORK/vit-b16-random.safetensors
exec > >(tee "$OUT/check.log") 2>&1

part() {  # part NAME SECONDS COMMAND...: run with a time limit, say how long it took and how it ended
    local name=$1 limit=$(($2 * LIMIT_SCALE)) started=$SECONDS
    shift 2
    [[ " $PARTS " == *" ${name%%-*} "* ]] || { echo "=== $name: not asked for (PARTS)"; return; }
    echo "=== $name (limit ${limit} s)"
    timeout --kill-after=5 "$limit" "$@"
    echo "=== $name: exit $? after $((SECONDS - started)) s"
}

echo "=== environment"
date -u
$PYTHON -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
nproc
# the tests look for ../shared beside the checkout
[ -e ../shared ] || ln -s "$SHARED" ../shared

XDIST=$($PYTHON -c "import xdist" 2>/dev/null && echo "-n 14" || echo "")
# -v: a line per test, so that a run stopped at its limit still says which tests failed
part tests 200 $PYTHON -m pytest -v -rf -p no:cacheprovider -p no:benchmark $XDIST $TEST_ARGS > "$OUT/tests.log" 2>&1
grep -E "FAILED|ERROR" "$OUT/tests.log" | head -n 40
tail -n 3 "$OUT/tests.log"

PRECISION=$([ "$DEVICE" = cuda ] && echo bf16 || echo fp32)  # bench's own default, auto, stays on a CPU
part random-vit-b 20 $PYTHON benchmarks/gpu_figures.py random-vit --out "$VIT_B"
part measure-vit-s 40 $PYTHON benchmarks/gpu_figures.py measure --backbone "$BACKBONE" --methods "$MEASURE_METHODS" \
    --batch "$BATCH" --image-size "$SIZE" --precision "$PRECISION" --device "$DEVICE" --out "$OUT/measure-vit-s.json"
part measure-vit-b 40 $PYTHON benchmarks/gpu_figures.py measure --backbone "$VIT_B" --methods "$MEASURE_METHODS" \
    --batch "$BATCH" --image-size "$SIZE" --precision "$PRECISION" --device "$DEVICE" --out "$OUT/measure-vit-b.json"
part epochs 30 $PYTHON benchmarks/gpu_figures.py epochs --backbone "$BACKBONE" --task "$SHARED/data/vtab1k-mini/cifar10" \
    --epoch-images "$EPOCH_IMAGES" --image-size "$SIZE" --workers "$WORKERS" --precision "$PRECISION" --device "$DEVICE" \
    --cache-root "$WORK" --out "$OUT/epochs.json"
# the cached VQT step is launch-bound on a GPU: torch.compile (reduce-overhead: CUDA graphs) against eager
part compile 120 $PYTHON benchmarks/gpu_figures.py epochs --placements device --compile "$COMPILE_MODES" \
    --backbone "$BACKBONE" --task "$SHARED/data/vtab1k-mini/cifar10" --epoch-images "$EPOCH_IMAGES" \
    --image-size "$SIZE" --workers "$WORKERS" --precision "$PRECISION" --device "$DEVICE" --cache-root "$WORK" --out "$OUT/compile.json"
for model in vit-s vit-b; do
    source=$([ $model = vit-s ] && echo "$BACKBONE" || echo "$VIT_B")
    part full-run-$model 60 $PYTHON benchmarks/gpu_figures.py full-run --backbone "$source" \
        --task "$SHARED/data/vtab1k-mini/cifar10" --epochs "$EPOCHS" --image-size "$SIZE" --workers "$WORKERS" --precision "$PRECISION" --device "$DEVICE" \
        --cache-root "$WORK" --out "$OUT/full-run-$model.json"
done

# one tiny VQT member leaves a GPU idle: the stack of 20 should cost little more than one
part grid 60 $PYTHON benchmarks/grid_speed.py --backbone "$BACKBONE" --task "$SHARED/data/vtab1k-mini/cifar10" \
    --images 800 --repeats 2 --image-size "$SIZE" --precision "$PRECISION" --device "$DEVICE" --cache "$WORK/grid-cache"

mkdir -p "$WORK/suite"
for task in $TASKS; do ln -s "$SHARED/data/vtab1k-mini/$task" "$WORK/suite/$task"; done
TASK_GROUPS=$(for task in $TASKS; do grep "^$task " benchmarks/vtab1k-mini-groups.txt | tr ' ' '='; done | paste -sd,)
part bench 330 $PYTHON -m querytune bench --suite "$WORK/suite" --groups "$TASK_GROUPS" \
    --methods "$BENCH_METHODS" --backbone "$BACKBONE" --profile quick --precision "$([ "$DEVICE" = cuda ] && echo bf16 || echo auto)" --image-size "$SIZE" \
    --device "$DEVICE" --workers "$WORKERS" --out "$WORK/bench" --quiet > "$WORK/bench.log" 2>&1
tail -n 40 "$WORK/bench.log"
cp "$WORK/bench.log" "$WORK/bench/" 2>/dev/null
tar -czf "$OUT/bench.tar.gz" -C "$WORK/bench" --exclude runs --exclude feature-cache . 2>/dev/null
rm -rf "$WORK"
echo "=== done after $SECONDS s"
