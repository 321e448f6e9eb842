#!/usr/bin/env bash
# The small-scale pretraining study (benchmarks/study/README.md), one step per call:
#
#   bash benchmarks/study/run.sh build       # curated corpus of ../shared/data without the test images
#   bash benchmarks/study/run.sh pretrain    # MoCoV2, benchmarks/study/moco_cpu.yaml (about an hour on one core)
#   bash benchmarks/study/run.sh export      # the encoder folder that fine-tuning loads
#   bash benchmarks/study/run.sh transfer    # frozen-encoder transfer, 3 tasks x 3 inits x 3 seeds
#   bash benchmarks/study/run.sh probe       # linear probe and kNN on frozen features (VNC organelles)
#   bash benchmarks/study/run.sh analyze     # pretrain analyze (paper Fig. 3), MoCo against random
#   bash benchmarks/study/run.sh ablation    # raw vs curated corpus at equal steps, scored by the probe and a transfer
#
# Outputs go to $STUDY (default: study_runs/ in the repository root, ignored by git); the data
# root is $CEM_DATA (default ../shared/data). Every step resumes or redoes only what is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=.venv/bin
STUDY=${STUDY:-study_runs}
DATA=${CEM_DATA:-../shared/data}
VNC=$DATA/drosophila_vnc_gerhard/stack1
# The fine-tuning data root: links to the VNC and ISBI folders and the NeuroProof split.
BENCH_ROOT=${BENCH_ROOT:-$STUDY/bench_root}
# One torch thread per process: the machine's two cores run two processes side by side.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
TRAIN=(--iters 200 --arch resnet18 --batch-size 4 --crop 128 --workers 0 --device cpu --quiet
       --set class_weighting=balanced --data-root "$BENCH_ROOT")
INITS=(random "random frozen=random+frozen" "MoCo frozen=$STUDY/moco/export")

probe() {  # probe NAME=SPEC ... -- OUT ORGANELLE
  local out=${*: -2:1} organelle=${*: -1}
  $BIN/pretrain probe "${@:1:$#-3}" --arch resnet18 --mask-threshold 127 --device cpu \
    --train-images "$VNC/raw/0?.tif" "$VNC/raw/1[0-5].tif" \
    --train-masks "$VNC/$organelle/0?.png" "$VNC/$organelle/1[0-5].png" \
    --test-images "$VNC/raw/1[6-9].tif" --test-masks "$VNC/$organelle/1[6-9].png" --out "$out"
}

case "${1:-}" in
  build)
    $BIN/cemcurate build "$DATA" "$STUDY/curated" --sources benchmarks/study/sources.yaml --quiet ;;
  pretrain)
    $BIN/pretrain moco --config benchmarks/study/moco_cpu.yaml --data "$STUDY/curated" --out "$STUDY/moco" --gpus 0 ;;
  export)
    $BIN/pretrain export "$STUDY/moco/checkpoint.pth" "$STUDY/moco/export" ;;
  transfer)
    mkdir -p "$BENCH_ROOT"
    for d in drosophila_vnc_gerhard isbi2012_unet; do ln -sfn "$(realpath "$DATA/$d")" "$BENCH_ROOT/$d"; done
    [ -d "$BENCH_ROOT/neuroproof_boundary" ] || $BIN/python benchmarks/prepare_neuroproof.py --out "$BENCH_ROOT"
    # The two 2D tasks with two label fractions, and NeuroProof (one training volume: all of it),
    # side by side on the two cores.
    $BIN/finetune benchmark benchmarks/finetune/vnc_mito.yaml benchmarks/finetune/isbi2012.yaml \
      --inits "${INITS[@]}" --fractions 1 0.25 --seeds 0 1 2 "${TRAIN[@]}" --out "$STUDY/transfer/2d" &
    $BIN/finetune benchmark benchmarks/finetune/neuroproof_boundary.yaml \
      --inits "${INITS[@]}" --fractions 1 --seeds 0 1 2 "${TRAIN[@]}" --out "$STUDY/transfer/neuroproof"
    wait ;;
  probe)
    for organelle in mitochondria synapses; do
      probe "MoCo=$STUDY/moco/export" random=random -- "$STUDY/probe/$organelle" "$organelle"
    done ;;
  analyze)
    $BIN/pretrain analyze "MoCo=$STUDY/moco/export" random=random --arch resnet18 --noise-images 300 \
      --device cpu --out "$STUDY/analyze" ;;
  ablation)
    # Equal steps on the raw corpus (no dedup, no filter) and the curated one, each probed.
    $BIN/cemcurate build "$DATA" "$STUDY/raw" --sources benchmarks/study/sources.yaml --no-dedup --filter none --quiet
    for corpus in raw curated; do
      $BIN/pretrain moco --config benchmarks/study/moco_cpu.yaml --data "$STUDY/$corpus" \
        --out "$STUDY/ablation/$corpus" --gpus 0 --image-size 64 --max-steps 300 \
        --lr-schedule step --lr-milestones 100000 &  # constant lr: the corpora differ in epoch length
    done
    wait
    for corpus in raw curated; do
      $BIN/pretrain export "$STUDY/ablation/$corpus/checkpoint.pth" "$STUDY/ablation/$corpus/export"
    done
    probe "raw=$STUDY/ablation/raw/export" "curated=$STUDY/ablation/curated/export" -- \
      "$STUDY/ablation/probe" mitochondria
    # ... and by the frozen transfer to VNC mitochondria, the study's clearest task.
    mkdir -p "$BENCH_ROOT"
    ln -sfn "$(realpath "$DATA/drosophila_vnc_gerhard")" "$BENCH_ROOT/drosophila_vnc_gerhard"
    $BIN/finetune benchmark benchmarks/finetune/vnc_mito.yaml --fractions 1 --seeds 0 1 2 "${TRAIN[@]}" \
      --inits "raw corpus=$STUDY/ablation/raw/export" "curated corpus=$STUDY/ablation/curated/export" \
      --out "$STUDY/ablation/transfer" ;;
  *)
    sed -n '2,13p' "$0"; exit 2 ;;
esac
