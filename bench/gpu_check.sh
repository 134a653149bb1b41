#!/usr/bin/env bash
# One script for a GPU machine (about 4 minutes on an H100/H200, at most 8 by the timeouts below):
#   1. CUDA correctness: ECT's prediction and target passes share dropout masks bit for bit (r = t, dropout 0.5;
#      fp32/bf16/fp16), the fp16 GradScaler skips overflowing steps, DDP over NCCL (2 processes when 2 GPUs
#      exist, else 1) gives one process's gradient;
#   2. throughput tables: the ECT training step (DDPM++ CIFAR-10 batch 128, EDM2-S ImageNet-64 batch 64) in
#      fp32/tf32/bf16, 1-step sampling at batch 512;
#   3. torch.compile of the network vs eager (informational: no --compile switch exists yet).
# Everything is printed and written to bench/results/gpu_check-<UTC time>-<GPU name>.txt; the exit status is 1
# when any check failed or timed out.
#
#   bash bench/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
mkdir -p bench/results
gpu=$(python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_') if torch.cuda.is_available() else 'none')")
if [ "$gpu" = none ]; then echo "bench/gpu_check.sh: no CUDA device visible" >&2; exit 2; fi
ngpu=$(python -c "import torch; print(min(torch.cuda.device_count(), 2))")
out="bench/results/gpu_check-$(date -u +%Y%m%d-%H%M)-${gpu}.txt"
status=0
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

# run SECONDS COMMAND...: print and record the command's output; a FAIL line when it fails or times out.
run() {
    local limit=$1; shift
    echo "== $* (limit ${limit}s)" | tee -a "$out"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | grep -v 'FutureWarning\|DistributedDataParallel(' | tee -a "$out"
    local rc=${PIPESTATUS[0]}
    echo "-- ${*:1:3}: exit $rc after $((SECONDS - start)) s" | tee -a "$out"
    if [ "$rc" -ne 0 ]; then echo "FAIL  exit $rc: $*" | tee -a "$out"; status=1; fi
}

run 15 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
run 15 python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
run 60 python bench/gpu_check.py checks
run 60 torchrun --standalone --nproc_per_node="$ngpu" bench/gpu_check.py ddp
run 90 python bench/bench_train.py --preset=cifar10-ecm --batch=128 --precision=fp32,tf32,bf16 --iters=10 --warmup=3
run 75 python bench/bench_train.py --preset=imagenet64-ecm-s --batch=64 --resolution=64 --label-dim=1000 \
    --precision=fp32,tf32,bf16 --iters=5 --warmup=2
for precision in fp32 tf32 bf16; do
    run 30 python bench/bench_sampling.py --batch=512 --precision="$precision" --iters=10
done
run 90 python bench/gpu_check.py compile
echo "== summary: $(grep -c '^PASS' "$out") PASS, $(grep -c '^FAIL' "$out") FAIL; written to $out" | tee -a "$out"
exit $status
