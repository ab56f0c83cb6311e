#!/usr/bin/env bash
# Launch `pretrain train` with torchrun on this node, or on several nodes (run it on each).
# Prints the command it runs.
#
#   launch/torchrun.sh CONFIG [--set section.field=value ...]
#
# Environment (defaults in brackets):
#   NPROC_PER_NODE  processes per node [number of visible GPUs, or 2 without GPUs]
#   NNODES          nodes [1]
#   NODE_RANK       this node's index [0]
#   MASTER_ADDR     rendezvous host: the first node's name or address [localhost]
#   MASTER_PORT     rendezvous port [29500]
#   RDZV_ID         rendezvous id, the same on every node of one run [pretrain]
#   MAX_RESTARTS    torchrun restarts of all ranks after one fails, each resuming from the
#                   newest complete checkpoint (`pretrain train` resumes with --resume auto) [0]
#   LOG_DIR         when set, each rank's stdout/stderr also go to files under it
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
  # c10d assigns the node ranks; NODE_RANK only orders the logs
  rdzv=(--node-rank="${NODE_RANK:-0}" --rdzv-backend=c10d
        --rdzv-endpoint="${MASTER_ADDR:?set MASTER_ADDR for multi-node}:${MASTER_PORT:-29500}"
        --rdzv-id="${RDZV_ID:-pretrain}")
else
  rdzv=(--standalone)
fi
logs=()
if [ -n "${LOG_DIR:-}" ]; then
  logs=(--log-dir="$LOG_DIR/node-${NODE_RANK:-0}" --tee=3)
fi
cmd=(torchrun --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" "${rdzv[@]}"
     --max-restarts="${MAX_RESTARTS:-0}" "${logs[@]}" -m pretrain train "$@")
echo "+ $(printf '%q ' "${cmd[@]}")"
exec "${cmd[@]}"
