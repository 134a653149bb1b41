#!/usr/bin/env bash
# One script for a GPU machine: at most 8 minutes (the per-section limits below add up to BUDGET_S, checked
# before anything runs; a section past its limit is killed and reported, the others still run):
#   1. CUDA correctness: ECT's prediction and target passes share dropout masks bit for bit (r = t, dropout 0.5;
#      fp32/bf16/fp16), the fp16 GradScaler skips overflowing steps (RAdam foreach, Adam fused), no host sync
#      inside steady-state training steps (torch.cuda.set_sync_debug_mode), one step of the real Trainer in 2
#      processes (NCCL with 2 GPUs, else both on cuda:0 over gloo), dropout 0.2, gives one process's gradient of
#      the whole batch with every rank's own noise, and the ranks' noise differs (bench/ddp_check.py),
#      torch.compile of the network equals eager (graph breaks reported by torch._dynamo.explain);
#   2. throughput: the ECT training step (DDPM++ CIFAR-10 batch 128 in fp32/tf32/bf16, bf16 NHWC; the official locuslab/ect
#      arithmetic in fp32/tf32 when OFFICIAL_ECT names a checkout of it; EDM2-S ImageNet-64 batch 64), the sCT and
#      MeanFlow steps against ECT's (cifar10-ecm, cifar10-sct, cifar10-meanflow at their CIFAR-10 widths, batch 128,
#      bf16 with the JVPs in float32, interleaved rounds mid-run: their ratios and peak memory) and 1-step sampling
#      at batch 512.
# Results: bench/results/gpu_check-<UTC time>-<GPU>.json and .md (the raw per-section JSON and the log in the
# folder of the same name); the exit status is 1 when any check or section failed or timed out.
#
#   bash bench/gpu_check.sh
#   OFFICIAL_ECT=/path/to/locuslab-ect bash bench/gpu_check.sh
#   bash bench/gpu_check.sh --allow-cpu      # dry run of every section on the CPU: tiny sizes, limits x6
set -u
cd "$(dirname "$0")/.."
allow_cpu=0
if [ "${1:-}" = --allow-cpu ]; then allow_cpu=1; fi

# Per-section wall-time limits in seconds on a GPU; their sum must stay within BUDGET_S. The compile section
# compiles five graphs from a cold inductor cache (a device machine starts bare): 216 s on the 2-core CPU dry run
# (52 s warm), of which Dynamo tracing and lowering (single-threaded; estimated at 40%) do not shrink with the GPU
# machine's 16 cores while the kernel builds do: 216 x (0.4 + 0.6 / 6) = 108 s, hence 120.
# The continuous-time section (train_ct: three 55.7M states built on the host, cuDNN autotuning of bf16 and float32
# convolutions, 7 steps each of about 0.1-0.5 s) is estimated at 35 s, hence 45, taken from the other limits:
# info 15 -> 10, checks 45 -> 40, train 60 -> 50, train_nhwc 25 -> 20, official 45 -> 35, imagenet 45 -> 40,
# sampling 35 -> 30 (estimates too: no GPU has run this script yet).
BUDGET_S=480
L_INFO=10 L_CHECKS=40 L_NOSYNC=40 L_DDP=40 L_TRAIN=50 L_TRAIN_NHWC=20 L_OFFICIAL=35 L_IMAGENET=40 L_TRAIN_CT=45
L_SAMPLING=30 L_COMPILE=120 L_REPORT=10
total=$((L_INFO + L_CHECKS + L_NOSYNC + L_DDP + L_TRAIN + L_TRAIN_NHWC + L_OFFICIAL + L_IMAGENET + L_TRAIN_CT + L_SAMPLING
         + L_COMPILE + L_REPORT))
if [ "$total" -gt "$BUDGET_S" ]; then echo "bench/gpu_check.sh: section limits add up to ${total} s > ${BUDGET_S} s" >&2; exit 2; fi

# Preflight: every module the sections import, and torchrun, before any budget is spent.
missing=$(python - <<'PY'
import importlib.util
names = ['torch', 'numpy', 'click', 'PIL', 'scipy', 'requests', 'psutil']
print(' '.join(n for n in names if importlib.util.find_spec(n) is None))
PY
)
if [ -n "$missing" ] || ! command -v torchrun > /dev/null; then
    echo "bench/gpu_check.sh: missing before any check ran: ${missing:-} $(command -v torchrun > /dev/null || echo torchrun)" \
         "(install requirements.txt into this Python first)" >&2
    exit 2
fi
gpu=$(python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_') if torch.cuda.is_available() else 'none')")
scale=1
if [ "$gpu" = none ]; then
    if [ "$allow_cpu" = 0 ]; then echo "bench/gpu_check.sh: no CUDA device visible (--allow-cpu for a CPU dry run)" >&2; exit 2; fi
    gpu=cpu-dry-run scale=6   # CPU_SCALE: the CPU is slower; the 8-minute budget is the GPU's
fi
name="gpu_check-$(date -u +%Y%m%d-%H%M%S)-${gpu}"
raw="bench/results/$name"
mkdir -p "$raw"
log="$raw/log.txt"
status=0
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

# run NAME LIMIT COMMAND...: run with a time limit (x scale), log it, record exit status and seconds as JSON;
# a failed benchmark section (train, train_nhwc, official, imagenet, train_ct, sampling) leaves a 'missing' row saying
# why.
run() {
    local section=$1 limit=$(($2 * scale)); shift 2
    echo "== $section: $* (limit ${limit}s)" | tee -a "$log"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | grep -v 'FutureWarning\|DistributedDataParallel(' | tee -a "$log"
    local rc=${PIPESTATUS[0]} seconds=$((SECONDS - start))
    echo "-- $section: exit $rc after ${seconds} s" | tee -a "$log"
    printf '{"kind": "section", "name": "%s", "exit": %d, "seconds": %d, "limit": %d}\n' "$section" "$rc" "$seconds" "$limit" > "$raw/section-$section.json"
    if [ "$rc" -ne 0 ]; then
        status=1
        local why="exit $rc after ${seconds} s"; [ "$rc" -eq 124 ] && why="timed out after ${limit} s"
        case $section in train|train_nhwc|official|imagenet|train_ct|sampling)
            printf '{"kind": "missing", "what": "section %s", "reason": "%s"}\n' "$section" "$why" > "$raw/missing-$section.json";;
        esac
    fi
}

if [ "$scale" = 1 ]; then
    run info "$L_INFO" nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    dev=--device=cuda
    train_sizes=(--batch=128 --iters=10 --warmup=3)
    imagenet_sizes=(--batch=64 --resolution=64 --iters=5 --warmup=2)
    ct_sizes=(--batch=128 --iters=5 --warmup=2)
    sampling_sizes=(--batch=512 --iters=10 --warmup=3)
    official_sizes=(--device=cuda --batch=128 --rounds=1 --steps=10 --warmup=3 --precision=fp32,tf32)
    cpu_flag=()
else
    dev=--device=cpu
    train_sizes=(--batch=2 --iters=1 --warmup=0 '--arch-kwargs={"model_channels":16,"channel_mult":[1,2],"num_blocks":1,"attn_resolutions":[16]}')
    imagenet_sizes=(--batch=2 --resolution=16 --iters=1 --warmup=0 '--arch-kwargs={"model_channels":16,"channel_mult":[1,2],"num_blocks":1,"attn_resolutions":[8]}')
    ct_sizes=(--batch=2 --iters=1 --warmup=0 --no-cpu-memory '--arch-kwargs={"model_channels":16,"channel_mult":[1,2],"num_blocks":1,"attn_resolutions":[16]}')
    sampling_sizes=(--batch=2 --iters=1 --warmup=0)
    official_sizes=(--device=cpu --batch=2 --rounds=1 --steps=1 --warmup=0 --precision=fp32)
    cpu_flag=(--allow-cpu)
fi
versions=$(python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())")
echo "$versions" | tee -a "$log"

run checks "$L_CHECKS" python bench/gpu_check.py checks "${cpu_flag[@]}"
run nosync "$L_NOSYNC" python bench/gpu_check.py nosync "${cpu_flag[@]}"
run ddp "$L_DDP" torchrun --standalone --nproc_per_node=2 bench/gpu_check.py ddp "${cpu_flag[@]}"
run train "$L_TRAIN" python bench/bench_train.py --preset=cifar10-ecm "$dev" --precision=fp32,tf32,bf16 "${train_sizes[@]}" \
    --json="$raw/train-cifar10.json"
run train_nhwc "$L_TRAIN_NHWC" python bench/bench_train.py --preset=cifar10-ecm "$dev" --precision=bf16 --channels-last \
    "${train_sizes[@]}" --json="$raw/train-cifar10-nhwc.json"
if [ -n "${OFFICIAL_ECT:-}" ] && [ -f "${OFFICIAL_ECT}/training/loss.py" ]; then
    run official "$L_OFFICIAL" python bench/bench_vs_official.py --official-root="$OFFICIAL_ECT" "${official_sizes[@]}" \
        --out="$raw/vs-official.json"
else
    reason="OFFICIAL_ECT is not set to a checkout of locuslab/ect (got '${OFFICIAL_ECT:-}'): no official rows"
    echo "== official: skipped: $reason" | tee -a "$log"
    printf '{"kind": "missing", "what": "ECT train step, DDPM++ CIFAR-10 (official locuslab/ect arithmetic)", "reason": "%s"}\n' "$reason" > "$raw/missing-official.json"
fi
run imagenet "$L_IMAGENET" python bench/bench_train.py --preset=imagenet64-ecm-s "$dev" --label-dim=1000 \
    --precision=fp32,tf32,bf16 "${imagenet_sizes[@]}" --json="$raw/train-imagenet64.json"
run train_ct "$L_TRAIN_CT" python bench/bench_train.py --preset=cifar10-ecm,cifar10-sct,cifar10-meanflow "$dev" \
    --precision=bf16 --progress=0.5 "${ct_sizes[@]}" --json="$raw/train-ct.json"
run sampling "$L_SAMPLING" python bench/bench_sampling.py "$dev" --precision=fp32,tf32,bf16 "${sampling_sizes[@]}" \
    --json="$raw/sampling.json"
run compile "$L_COMPILE" python bench/gpu_check.py compile "${cpu_flag[@]}"

fails=$(grep -c '^FAIL' "$log")
header="device: ${gpu}; ${versions}
GPU budget: ${total} s of section limits within ${BUDGET_S} s; this run: limits x${scale}, wall time so far ${SECONDS} s
official checkout: ${OFFICIAL_ECT:-none} $( [ -n "${OFFICIAL_ECT:-}" ] && git -C "$OFFICIAL_ECT" rev-parse --short HEAD 2>/dev/null)"
run report "$L_REPORT" python bench/gpu_check.py report "$raw" --out="bench/results/$name" --header="$header"
if [ "$fails" -ne 0 ]; then status=1; fi
echo "== summary: $fails failed check(s), exit $status, ${SECONDS} s; bench/results/$name.md" | tee -a "$log"
exit $status
