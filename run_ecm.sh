#!/usr/bin/env bash
# ECT on CIFAR-10 (docs/ECT.md §6): bash run_ecm.sh <NGPUs> <PORT> [train.py options]
# Multi-node: set NNODES, NODE_RANK and MASTER_ADDR in the environment (same command on every node).
set -euo pipefail

if [ "$#" -lt 2 ]; then
    echo "usage: bash run_ecm.sh <NGPUs> <PORT> [train.py options, e.g. --data=datasets/cifar10-32x32.zip]" >&2
    exit 1
fi

NGPUS="$1"
PORT="$2"
shift 2

NODE_ARGS=()
if [ -n "${NNODES:-}" ] || [ -n "${NODE_RANK:-}" ] || [ -n "${MASTER_ADDR:-}" ]; then
    if [ -z "${NNODES:-}" ] || [ -z "${NODE_RANK:-}" ] || [ -z "${MASTER_ADDR:-}" ]; then
        echo "run_ecm.sh: multi-node runs need all of NNODES, NODE_RANK and MASTER_ADDR" >&2
        exit 1
    fi
    NODE_ARGS=(--nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR")
fi

exec torchrun --nproc_per_node="$NGPUS" --master_port="$PORT" ${NODE_ARGS[@]+"${NODE_ARGS[@]}"} \
    train.py --preset=cifar10-ecm "$@"
