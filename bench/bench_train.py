"""Benchmark the ECT training step of a preset: sec/step, img/s and peak memory per precision.

    python bench/bench_train.py                                         # CUDA if present, cifar10-ecm, batch 128
    python bench/bench_train.py --device=cpu --batch=8 --iters=2        # a quick CPU run
    python bench/bench_train.py --precision=fp32,tf32,bf16 --batch-gpu=64
    python bench/bench_train.py --device=cpu --batch=2 --arch-kwargs='{"model_channels":16}' --json=rows.json
    python bench/bench_train.py --compile                               # each precision eager AND compiled

The step is the training loop's own (training.loop.training_loop.training_step: forward, target pass, backward,
nan_to_num, optimiser step) plus the EMA update, on synthetic uint8 images of the preset's resolution already
on the device, as with --data-on-device (the speed does not depend on the data or the weights). Timings are
bracketed by torch.cuda.synchronize(). 'auto' is resolved as the training loop does (bf16 on A100/H100).
With --compile every precision is timed twice, eager and with the network torch.compile'd as train.py --compile
does; the first step (where the compile happens) is never among the timed ones and is reported on its own:
'compile s' is the first step's time minus the median step.
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
from configs import checks, presets  # noqa: E402
from training import compile as tc  # noqa: E402
from training.loop import runtime  # noqa: E402
from training.loop import training_loop as tl  # noqa: E402


class SyntheticData:
    """Fixed shape stand-in for a dataset: the attributes build_network reads."""

    def __init__(self,
                 resolution,   # image side in pixels
                 channels,     # colour channels
                 label_dim,    # 0 = unconditional
                 ):
        self.resolution = resolution
        self.num_channels = channels
        self.label_dim = label_dim


def synthetic_batches(data, batch_gpu, device='cpu'):
    """Endless (uint8 images, one-hot labels) micro-batches on `device` (the CPU: as the DataLoader yields them)."""
    images = torch.randint(0, 256, [batch_gpu, data.num_channels, data.resolution, data.resolution], dtype=torch.uint8)
    labels = torch.eye(max(data.label_dim, 1))[torch.randint(max(data.label_dim, 1), [batch_gpu])][:, :data.label_dim]
    images, labels = images.to(device), labels.to(device)
    while True:
        yield images, labels


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_steps(options, data, precision, device, iters, warmup, compiled=False):
    """(seconds per step list, first step's seconds, peak GiB or None on the CPU, parameter count, precision) for
    one precision ('auto' resolved for `device` as the training loop does), eager or `compiled` (the first step
    is never timed: it compiles)."""
    precision = runtime.resolve_precision(precision, device)
    runtime.setup_runtime(0, precision)
    batch_gpu, rounds = runtime.check_batch(options.batch_size, options.batch_gpu, 1)
    state = tl.build_state(options.replace(precision=precision, transfer=None), data, device)
    net, optimizer, ema, scaler = state.net, state.optimizer, state.ema, state.scaler
    loss_fn, base_lr = state.method.loss, options.optimizer_kwargs['lr']
    ddp = tc.compile_network(net, compiled)
    iterator = synthetic_batches(data, batch_gpu, device)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for i in range(max(warmup, 1) + iters):
        synchronize(device)
        start = time.perf_counter()
        tl.training_step(ddp, net, loss_fn, optimizer, iterator, rounds, options.batch_size, base_lr, device,
                         tl.AUTOCAST_DTYPES[precision], scaler)
        ema.update((i + 1) * options.batch_size, options.batch_size)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else None
    return seconds[-iters:], seconds[0], peak, sum(p.numel() for p in net.parameters()), precision


def parse_precisions(text):
    values = [p for p in text.split(',') if p]
    bad = [p for p in values if p not in checks.PRECISIONS]
    if bad or not values:
        raise click.BadParameter(f'{bad or text} not in {", ".join(checks.PRECISIONS)}', param_hint='--precision')
    return values


@click.command()
@click.option('--preset', help='Training preset', type=click.Choice(sorted(presets.PRESETS)), default='cifar10-ecm', show_default=True)
@click.option('--device', help='Device  [default: cuda if available, else cpu]', metavar='STR', type=str, default=None)
@click.option('--batch', help='Global batch (one process)', metavar='INT', type=click.IntRange(min=1), default=128, show_default=True)
@click.option('--batch-gpu', help='Micro-batch (accumulation rounds = batch / batch-gpu)', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--resolution', help='Image resolution', metavar='INT', type=click.IntRange(min=4), default=32, show_default=True)
@click.option('--label-dim', help='Classes (0 = unconditional)', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--precision', 'precision_text', help='Comma list of fp32,tf32,bf16,fp16', metavar='LIST', type=str, default='fp32,tf32,bf16', show_default=True)
@click.option('--iters', help='Timed steps per precision', metavar='INT', type=click.IntRange(min=1), default=10, show_default=True)
@click.option('--warmup', help='Untimed steps first (at least one)', metavar='INT', type=click.IntRange(min=0), default=3, show_default=True)
@click.option('--compile', 'compile_too', help='Also time each precision with the network torch.compile\'d (train.py --compile)', is_flag=True)
@click.option('--arch-kwargs', help='Network kwargs over the preset\'s, as JSON (e.g. a tiny width for a dry run)', metavar='JSON', type=str, default=None)
@click.option('--channels-last', help='Train the network in NHWC layout (train.py --channels-last)', is_flag=True)
@click.option('--json', 'json_path', help='Also write the rows to this JSON file', metavar='FILE', type=str, default=None)
def main(preset, device, batch, batch_gpu, resolution, label_dim, precision_text, iters, warmup, compile_too, arch_kwargs,
         channels_last, json_path):
    """Time the ECT training step of a preset's network and loss."""
    try:
        device = dist.resolve_device(device)
        network_kwargs = json.loads(arch_kwargs) if arch_kwargs else None
        options = presets.resolve(preset, dict(batch=batch, batch_gpu=batch_gpu, transfer='none',
                                               network_kwargs=network_kwargs, channels_last=channels_last))
    except (dnnlib.UserError, json.JSONDecodeError) as e:
        raise click.UsageError(str(e)) from None
    precisions = parse_precisions(precision_text)
    data = SyntheticData(resolution, 3, label_dim)
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
    rows = []
    for precision in precisions:
        for compiled in (False, True) if compile_too else (False,):
            seconds, first, peak, num_params, resolved = time_steps(options, data, precision, device, iters, warmup,
                                                                    compiled)
            median = statistics.median(seconds)
            label = (precision if resolved == precision else f'{precision}={resolved}') + (' NHWC' if channels_last else '')
            rows.append((label, 'compiled' if compiled else 'eager', median, batch / median, peak,
                         first - median if compiled else None))
    print(f'{preset}: {options.network_kwargs["class_name"]}, {num_params / 1e6:.1f}M params, {resolution}x{resolution}, '
          f'batch {batch} (batch-gpu {batch_gpu or batch}), {name}')
    print(f'{"precision":<18}{"mode":>9}{"sec/step":>10}{"img/s":>10}{"peak GiB":>10}{"compile s":>11}')
    for precision, mode, sec, rate, peak, compile_sec in rows:
        peak_text = '-' if peak is None else f'{peak:.2f}'
        compile_text = '-' if compile_sec is None else f'{compile_sec:.1f}'
        print(f'{precision:<18}{mode:>9}{sec:>10.3f}{rate:>10.1f}{peak_text:>10}{compile_text:>11}')
    if json_path:
        records = [dict(kind='train', preset=preset, precision=precision, mode=mode, batch=batch,
                        batch_gpu=batch_gpu or batch, resolution=resolution, label_dim=label_dim, sec_per_step=sec,
                        img_per_s=rate, peak_gib=peak, compile_sec=compile_sec, params_m=num_params / 1e6, device=name,
                        iters=iters, arch_kwargs=network_kwargs, channels_last=channels_last)
                   for precision, mode, sec, rate, peak, compile_sec in rows]
        with dnnlib.util.atomic_write(json_path, 'w') as f:
            json.dump(records, f, indent=1)


if __name__ == '__main__':
    main()
