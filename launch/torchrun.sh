#!/usr/bin/env bash
# Launch `pretrain train` with torchrun on this node, or on several nodes.
#
#   launch/torchrun.sh CONFIG [--set section.field=value ...]
#
# Environment (defaults in brackets):
#   NPROC_PER_NODE  processes per node [number of visible GPUs, or 2 without GPUs]
#   NNODES          nodes [1]
#   NODE_RANK       this node's index [0]
#   MASTER_ADDR     rendezvous host [localhost]
#   MASTER_PORT     rendezvous port [29500]
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG [--set section.field=value ...]" >&2
  exit 2
fi
if [ -z "${NPROC_PER_NODE:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NPROC_PER_NODE=$(nvidia-smi -L | wc -l)
  else
    NPROC_PER_NODE=2
  fi
fi
NNODES=${NNODES:-1}
if [ "$NNODES" -gt 1 ]; then
  rdzv=(--rdzv-backend=c10d --rdzv-endpoint="${MASTER_ADDR:?set MASTER_ADDR for multi-node}:${MASTER_PORT:-29500}" --rdzv-id="${RDZV_ID:-pretrain}")
else
  rdzv=(--standalone)
fi
exec torchrun --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" "${rdzv[@]}" \
  -m pretrain train "$@"
