#!/usr/bin/env bash
# One training stage on several nodes with torchrun's c10d rendezvous. Run the same command on every
# node (HEAD = node 0's address, reachable from all nodes; OUT on a filesystem every node sees):
#   NNODES=2 NPROC=8 HEAD=10.0.0.1 STAGE=stage1 SHARDS=/data/shards/coco/train OUT=/shared/runs/coco \
#     bash jobs/train_multi_node.sh --backbone-weights /weights/dinov2_vitl14_pretrain.pth
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${HEAD:?set HEAD to node 0's address}" "${SHARDS:?set SHARDS}" "${OUT:?set OUT (shared filesystem)}"
STAGE=${STAGE:-stage1}
exec torchrun --nnodes="${NNODES:-2}" --nproc_per_node="${NPROC:-8}" \
  --rdzv_backend=c10d --rdzv_endpoint="$HEAD:${PORT:-29500}" --rdzv_id="genpan-$STAGE" \
  train/main.py --config "train/configs/$STAGE.toml" --data.shards="$SHARDS" --run.out="$OUT/$STAGE" --resume "$@"
