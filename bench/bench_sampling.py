"""Benchmark 1-step consistency sampling: throughput (img/s) at a large batch and batch-1 latency.

    python bench/bench_sampling.py                                   # CUDA if present, batch 512
    python bench/bench_sampling.py --device=cpu --batch=16 --iters=3 # a quick CPU run
    python bench/bench_sampling.py --precision=fp32,tf32,bf16 --json=rows.json
    python bench/bench_sampling.py --precision=bf16 --steps=2
    python bench/bench_sampling.py --score=5000 --ref=fid-refs/cifar10-32x32.npz   # + fid50k_full end to end

With --score=N the script also times `fid50k_full` end to end through metrics.metric_main.calc_metric (sampling
N images in memory, Inception features, float64 statistics, Fréchet distance against --ref) and extrapolates
linearly to 50,000 images; the detector is loaded once beforehand and not counted.

The network is ECMPrecond around the DDPM++ CIFAR-10 U-Net (model_channels 128, channel_mult [2,2,2],
randomly initialised: the speed does not depend on the weights). On CUDA every timing is bracketed by
torch.cuda.synchronize() and the peak allocated memory is reported; cudnn.benchmark is on unless
--no-cudnn-benchmark (it picks the fastest convolution algorithms for the fixed batch shape).
"""

import json
import os
import statistics
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dnnlib  # noqa: E402
from torch_utils import distributed as dist  # noqa: E402
from configs import presets  # noqa: E402
from metrics import metric_main  # noqa: E402
from training.sampling import samplers  # noqa: E402

# The CIFAR-10 ECM network: DDPM++ (model_channels 128, channel_mult [2,2,2]) in ECMPrecond, unconditional.
DDPMPP_CIFAR10 = dict(class_name=presets.PRECONDS['ecm'], img_resolution=32, img_channels=3, label_dim=0,
                      dropout=0.0, **presets.ARCHS['ddpmpp'])


def set_precision(precision, device):
    """TF32 switches for fp32/tf32; an autocast context for bf16 (a no-op context otherwise)."""
    tf32 = precision == 'tf32'
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if precision == 'bf16':
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_sampling(net, batch_size, t_steps, iters, warmup, device, autocast):
    """Seconds per call of the consistency sampler on `batch_size` latents (one value per timed call)."""
    latents = torch.randn([batch_size, net.img_channels, net.img_resolution, net.img_resolution], device=device)
    seconds = []
    for i in range(warmup + iters):
        synchronize(device)
        start = time.perf_counter()
        with torch.no_grad(), autocast:
            samplers.consistency_sampler(net, latents, t_steps=t_steps)
        synchronize(device)
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    return seconds


def sampling_rows(net, precision, batch_size, t_steps, iters, warmup, device):
    """Throughput (at `batch_size`) and latency (batch 1) rows of one precision: dict(kind, run, precision, batch,
    ms_per_call, img_per_s, peak_gib)."""
    autocast = set_precision(precision, device)
    rows = []
    for label, batch in (('throughput', batch_size), ('latency', 1)):
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
        median = statistics.median(time_sampling(net, batch, t_steps, iters, warmup, device, autocast))
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else None
        rows.append(dict(kind='sampling', run=label, precision=precision, batch=batch, ms_per_call=median * 1e3,
                         img_per_s=batch / median, peak_gib=peak))
    return rows


def time_scoring(net, num_images, ref, detector_path, batch_size, device):
    """Seconds for fid50k_full on `num_images` generated images, end to end (detector loaded beforehand)."""
    detector = metric_main.load_metric_detector('fid50k_full', detector_path, device=device)
    synchronize(device)
    start = time.perf_counter()
    metric_main.calc_metric('fid50k_full', net, ref=ref, detector=detector, num_samples=num_images,
                            batch_size=batch_size, device=device, rank=0, num_gpus=1)
    synchronize(device)
    return time.perf_counter() - start


@click.command()
@click.option('--device', help='Device  [default: cuda if available, else cpu]', metavar='STR', type=str, default=None)
@click.option('--batch', 'batch_size', help='Batch size of the throughput run', metavar='INT', type=click.IntRange(min=1), default=512, show_default=True)
@click.option('--iters', help='Timed calls per measurement', metavar='INT', type=click.IntRange(min=1), default=20, show_default=True)
@click.option('--warmup', help='Untimed calls first', metavar='INT', type=click.IntRange(min=0), default=3, show_default=True)
@click.option('--precision', 'precision_text', help='Comma list of fp32, tf32, bf16', metavar='LIST', type=str, default='fp32', show_default=True)
@click.option('--steps', 'num_steps', help='Consistency steps (2 uses the CIFAR-10 recipe\'s mid_t)', type=click.IntRange(min=1, max=2), default=1, show_default=True)
@click.option('--score', 'score_images', help='Also time fid50k_full end to end on N images (0 = skip)', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--ref', help='Reference statistics for --score', metavar='NPZ|URL', type=str, default='https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz', show_default=True)
@click.option('--detector', 'detector_path', help='Inception detector for --score  [default: official]', metavar='PATH|URL', type=str, default=None)
@click.option('--cudnn-benchmark/--no-cudnn-benchmark', help='torch.backends.cudnn.benchmark', default=True, show_default=True)
@click.option('--json', 'json_path', help='Also write the rows to this JSON file', metavar='FILE', type=str, default=None)
def main(device, batch_size, iters, warmup, precision_text, num_steps, score_images, ref, detector_path,
         cudnn_benchmark, json_path):
    """Time 1-step (or 2-step) consistency sampling with a DDPM++ CIFAR-10 sized ECM network."""
    try:
        device = dist.resolve_device(device)
    except dnnlib.UserError as e:
        raise click.UsageError(str(e)) from None
    precisions = [p for p in precision_text.split(',') if p]
    if not precisions or any(p not in ('fp32', 'tf32', 'bf16') for p in precisions):
        raise click.BadParameter(f'"{precision_text}" is not a comma list of fp32, tf32, bf16', param_hint='--precision')
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.manual_seed(0)
    net = dnnlib.util.construct_class_by_name(**DDPMPP_CIFAR10).eval().requires_grad_(False).to(device)
    num_params = sum(p.numel() for p in net.parameters())
    t_steps = samplers.make_consistency_steps(samplers.T_MAX, [samplers.CIFAR10_MID_T] if num_steps == 2 else None)
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
    records = []
    for precision in precisions:
        records += sampling_rows(net, precision, batch_size, t_steps, iters, warmup, device)
        print(f'DDPM++ CIFAR-10 ECMPrecond, {num_params / 1e6:.1f}M params, {num_steps}-step, {precision}, {name}, '
              f'cudnn.benchmark {cudnn_benchmark}')
        print(f'{"run":<12}{"batch":>8}{"ms/call":>12}{"img/s":>12}{"peak GiB":>10}')
        for r in records[-2:]:
            print(f'{r["run"]:<12}{r["batch"]:>8}{r["ms_per_call"]:>12.2f}{r["img_per_s"]:>12.1f}'
                  f'{"-" if r["peak_gib"] is None else format(r["peak_gib"], ".2f"):>10}')
    if json_path:
        with dnnlib.util.atomic_write(json_path, 'w') as f:
            json.dump([dict(r, steps=num_steps, device=name, iters=iters) for r in records], f, indent=1)
    if score_images:
        try:
            seconds = time_scoring(net, score_images, ref, detector_path, batch_size, device)
        except dnnlib.UserError as e:
            raise click.ClickException(str(e)) from None
        print(f'fid50k_full end to end: {score_images} images in {seconds:.1f} s '
              f'-> {seconds * 50000 / score_images / 60:.1f} min for 50k ({name}, 1 process)')


if __name__ == '__main__':
    main()
