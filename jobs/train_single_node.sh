#!/usr/bin/env bash
# The three COCO training stages of the paper (5.1) on one node, one after the other.
#   NPROC=8 DINOV2=/weights/dinov2_vitl14_pretrain.pth SHARDS=/data/shards/coco/train OUT=/runs/coco bash jobs/train_single_node.sh
# Each stage resumes by itself if it was interrupted (--resume), and starts from the previous stage's final.pt.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
NPROC=${NPROC:-8}
: "${DINOV2:?set DINOV2 to the official dinov2_vitl14_pretrain.pth}" "${SHARDS:?set SHARDS to the COCO shard folder}"
OUT=${OUT:-runs/coco}
run() {  # stage, extra args...
  local stage=$1; shift
  torchrun --standalone --nproc_per_node="$NPROC" train/main.py --config "train/configs/$stage.toml" \
    --data.shards="$SHARDS" --run.out="$OUT/$stage" --resume "$@"
}
run stage1 --backbone-weights "$DINOV2"
run stage2 --init-from "$OUT/stage1/final.pt"
run stage3 --init-from "$OUT/stage2/final.pt"
