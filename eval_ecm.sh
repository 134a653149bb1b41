#!/usr/bin/env bash
# Score ECM snapshots (1- and 2-step FID by default) with torchrun; already-recorded pairs are skipped.
#   bash eval_ecm.sh <NGPUs> <PORT> --resume <snapshot | run dir> [--metrics=fid50k_full,two_step_fid50k_full] [--ref=...] [...]
# Other options are those of `python -m metrics.evaluate --help` (e.g. --detector, --vgg16, --dinov2: the
# detector files, as train.py takes them). The reference defaults to EDM's CIFAR-10 statistics unless --ref is given. On a terminal, rank 0 shows progress bars (snapshot x metric, and the
# sampling/feature extraction of each metric); --no-progress or ECT_NO_PROGRESS=1 turns them off.
set -euo pipefail

usage() {
    echo "usage: $0 <NGPUs> <PORT> --resume <snapshot|run dir> [--metrics=LIST] [--ref=NPZ|URL] [other metrics.evaluate options]" >&2
    exit 2
}

[[ $# -ge 3 ]] || usage
NGPUS=$1
PORT=$2
shift 2
[[ "$NGPUS" =~ ^[1-9][0-9]*$ ]] || { echo "eval_ecm.sh: NGPUs must be a positive integer, got '$NGPUS'" >&2; exit 2; }
[[ "$PORT" =~ ^[0-9]+$ ]] || { echo "eval_ecm.sh: PORT must be a port number, got '$PORT'" >&2; exit 2; }

REF_ARGS=(--ref=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz)
HAVE_RESUME=0
for arg in "$@"; do
    case "$arg" in
        --ref|--ref=*) REF_ARGS=() ;;
        --resume|--resume=*) HAVE_RESUME=1 ;;
    esac
done
[[ $HAVE_RESUME -eq 1 ]] || usage

ROOT="$(cd "$(dirname "$0")" && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Check the arguments in one plain process first: a mistake is then one line and exit code 2, not a
# torchrun failure report per rank.
python -m metrics.evaluate ${REF_ARGS[@]+"${REF_ARGS[@]}"} "$@" --dry-run --device=cpu >/dev/null
exec torchrun --nnodes=1 --nproc_per_node="$NGPUS" --master_addr=127.0.0.1 --master_port="$PORT" \
    -m metrics.evaluate ${REF_ARGS[@]+"${REF_ARGS[@]}"} "$@"
