"""Per-op profile of one ECT training step (torch.profiler): where the step's time goes.

    python bench/bench_step_breakdown.py                       # tiny DDPM++ (width 16), batch 4, CPU
    python bench/bench_step_breakdown.py --width=128 --batch=4 # CIFAR-10 width (slow on a shared CPU)
    python bench/bench_step_breakdown.py --device=cuda --width=128 --batch=128 --precision=bf16

The step is the one bench/bench_train.py times (the training loop's training_step plus the EMA update) on
synthetic data. Prints the top ops by self time (CPU, and CUDA on a GPU) after `--warmup` untimed steps.
"""

import os
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dnnlib  # noqa: E402
from torch_utils import distributed as dist  # noqa: E402
from configs import checks, presets  # noqa: E402
from training.loop import runtime  # noqa: E402
from training.loop import training_loop as tl  # noqa: E402
from bench.bench_train import SyntheticData, synthetic_batches, synchronize  # noqa: E402


def build_step(options, data, precision, device):
    """A closure running one training step plus the EMA update (the state persists across calls)."""
    runtime.setup_runtime(0, precision)
    batch_gpu, rounds = runtime.check_batch(options.batch_size, options.batch_gpu, 1)
    state = tl.build_state(options.replace(precision=precision, transfer=None), data, device)
    iterator = synthetic_batches(data, batch_gpu)
    nimg = [0]

    def step():
        tl.training_step(state.net, state.net, state.method.loss, state.optimizer, iterator, rounds,
                         options.batch_size, options.optimizer_kwargs['lr'], device,
                         tl.AUTOCAST_DTYPES[precision], state.scaler)
        nimg[0] += options.batch_size
        state.ema.update(nimg[0], options.batch_size)
    return step


def profile_steps(step, device, steps, warmup):
    """The profiler of `steps` steps after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    synchronize(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == 'cuda':
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    return prof


@click.command()
@click.option('--preset', help='Training preset', type=click.Choice(sorted(presets.PRESETS)), default='cifar10-ecm', show_default=True)
@click.option('--device', help='Device  [default: cuda if available, else cpu]', metavar='STR', type=str, default=None)
@click.option('--width', help='model_channels (16 = tiny, 128 = CIFAR-10)', metavar='INT', type=click.IntRange(min=1), default=16, show_default=True)
@click.option('--batch', help='Batch (one process)', metavar='INT', type=click.IntRange(min=1), default=4, show_default=True)
@click.option('--resolution', help='Image resolution', metavar='INT', type=click.IntRange(min=4), default=32, show_default=True)
@click.option('--precision', help='Precision', type=click.Choice(checks.PRECISIONS), default='fp32', show_default=True)
@click.option('--steps', help='Profiled steps', metavar='INT', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--warmup', help='Untimed steps first', metavar='INT', type=click.IntRange(min=0), default=2, show_default=True)
@click.option('--top', help='Rows of the table', metavar='INT', type=click.IntRange(min=1), default=25, show_default=True)
def main(preset, device, width, batch, resolution, precision, steps, warmup, top):
    """Print the per-op profile of the ECT training step of a preset's network."""
    try:
        device = dist.resolve_device(device)
        options = presets.resolve(preset, dict(batch=batch, transfer='none', network_kwargs=dict(model_channels=width)))
    except dnnlib.UserError as e:
        raise click.ClickException(str(e)) from None
    step = build_step(options, SyntheticData(resolution, 3, 0), precision, device)
    prof = profile_steps(step, device, steps, warmup)
    sort_by = 'self_cuda_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    print(f'{preset}, width {width}, batch {batch}, {resolution}x{resolution}, {precision}, {device}, {steps} steps')
    print(prof.key_averages().table(sort_by=sort_by, row_limit=top))


if __name__ == '__main__':
    main()
