"""Benchmark one consistency-distillation training step of openai's ImageNet-64 network: ours vs the official
code's arithmetic, sec/step and img/s on the same machine.

    python bench/bench_cm_train.py --device=cuda --batch=32             # the released network (295.9M parameters)
    python bench/bench_cm_train.py --device=cpu --tiny --batch=4        # a quick CPU run on a tiny network

Both variants run the same step — student forward, one Heun step of the frozen EDM-form teacher (two
forwards), the target network's pass with the student's dropout masks, l2 loss, backward, RAdam step, three
EMA updates (0.999, 0.9999, 0.9999432189950708) and the target update with μ = 0.95 — on synthetic data:

- `ours`: training.methods.consistency_models.ConsistencyDistillation with the loop's EMA trackers;
- `official`: the arithmetic of openai's CMTrainLoop.run_step — per-parameter `update_ema`
  (mul_(rate).add_(src, alpha=1 − rate)) for every EMA and the target, the CPU generator saved and restored
  with get_rng_state/set_rng_state around the target's pass, the loss mean over the batch.
Timings are bracketed by torch.cuda.synchronize(); the first `--warmup` steps are not counted.
"""

import os
import statistics
import sys
import tempfile
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dnnlib  # noqa: E402
from torch_utils import distributed as dist  # noqa: E402
from training.checkpoints import checkpoint
from training.methods import loss_cm  # noqa: E402
from training.methods import consistency_models as cmm  # noqa: E402
from training.methods.base import Progress  # noqa: E402
from training.networks.karras import KarrasDenoiser, RELEASED_UNETS  # noqa: E402

EMA_RATES = (0.999, 0.9999, 0.9999432189950708)
TINY_UNET = dict(model_channels=32, channel_mult=[1, 1], num_blocks=1, attn_resolutions=[8], adaptive_scale=True,
                 channels_per_head=16)


def build_nets(tiny, device, teacher_path):
    """(student in consistency form, train mode; the teacher file written in EDM form) of the chosen shape."""
    unet, resolution, label_dim = (TINY_UNET, 16, 10) if tiny else (RELEASED_UNETS['imagenet64'], 64, 1000)
    torch.manual_seed(0)
    teacher = KarrasDenoiser(img_resolution=resolution, label_dim=label_dim, parameterization='edm', **unet)
    checkpoint.save_network_snapshot(teacher_path, teacher)
    student = KarrasDenoiser(img_resolution=resolution, label_dim=label_dim, parameterization='consistency', **unet)
    student.load_state_dict(teacher.state_dict())
    return student.train().requires_grad_(True).to(device)


def official_update_ema(target_params, source_params, rate):
    for targ, src in zip(target_params, source_params):
        targ.detach().mul_(rate).add_(src, alpha=1 - rate)


def official_step(net, method, emas, optimizer, images, labels):
    """openai's run_step arithmetic around the same loss (CPU-generator-only mask sharing, as the official)."""
    optimizer.zero_grad(set_to_none=True)
    noise, indices = method.draw(images, method.num_scales - 1)
    loss = loss_cm.consistency_loss(net, method.target, images, noise, indices, method.num_scales, labels,
                                    teacher=method.teacher, shared_dropout=images.device.type == 'cpu')
    loss.mean().backward()
    optimizer.step()
    params = list(net.parameters())
    for ema, rate in zip(emas, EMA_RATES):
        official_update_ema(ema, params, rate)
    official_update_ema(list(method.target.parameters()), params, method.target_ema)


def our_step(net, method, ema, optimizer, images, labels, progress):
    optimizer.zero_grad(set_to_none=True)
    (method.loss(net, images, labels).sum() / images.shape[0]).backward()
    optimizer.step()
    ema.update(progress.cur_nimg + images.shape[0], images.shape[0])
    method.after_step(net, progress)


def make_step(variant, net, method, images, labels):
    """A closure running one step of `variant` ('ours' or 'official') with its own optimiser and EMAs."""
    optimizer = torch.optim.RAdam(net.parameters(), lr=8e-6, weight_decay=0.0)
    progress = Progress(cur_nimg=0, batch_size=images.shape[0], total_nimg=images.shape[0] * 10**6, tick_kimg=1.0)
    if variant == 'ours':
        ema = dnnlib.util.construct_class_by_name(net, class_name='training.loop.ema.CombinedEMA', trackers=[
            dict(class_name='training.loop.ema.ConstantEMA', beta=rate, suffix=f'-{rate}') for rate in EMA_RATES])
        return lambda: our_step(net, method, ema, optimizer, images, labels, progress)
    emas = [[p.detach().clone() for p in net.parameters()] for _ in EMA_RATES]
    return lambda: official_step(net, method, emas, optimizer, images, labels)


def time_variants(net, method, batch, device, iters, warmup):
    """{variant: seconds per step}, the two variants alternating step by step (so machine load hits both)."""
    res, label_dim = net.img_resolution, net.label_dim
    images = torch.rand([batch, 3, res, res], device=device) * 2 - 1
    labels = torch.eye(label_dim, device=device)[torch.randint(label_dim, [batch], device=device)]
    steps = {variant: make_step(variant, net, method, images, labels) for variant in ('official', 'ours')}
    times = {variant: [] for variant in steps}
    progress = Progress(cur_nimg=0, batch_size=batch, total_nimg=batch * 10**6, tick_kimg=1.0)
    for i in range(warmup + iters):
        for variant, step in steps.items():
            method.schedule(progress)
            start = time.perf_counter()
            step()
            if device.type == 'cuda':
                torch.cuda.synchronize(device)
            if i >= warmup:
                times[variant].append(time.perf_counter() - start)
    return times


@click.command()
@click.option('--device', help='cpu | cuda | cuda:N', default='cuda' if torch.cuda.is_available() else 'cpu', show_default=True)
@click.option('--batch', help='Batch size', type=click.IntRange(min=1), default=32, show_default=True)
@click.option('--iters', help='Timed steps per variant', type=click.IntRange(min=1), default=5, show_default=True)
@click.option('--warmup', help='Untimed steps first', type=click.IntRange(min=0), default=1, show_default=True)
@click.option('--tiny', help='A tiny network of the same kind instead of the released one', is_flag=True)
def main(device, batch, iters, warmup, tiny):
    """Time a CD training step, ours vs the official arithmetic."""
    device = dist.resolve_device(device)
    with tempfile.TemporaryDirectory() as tmp:
        teacher_path = os.path.join(tmp, 'edm_teacher.pt')
        net = build_nets(tiny, device, teacher_path)
        params = sum(p.numel() for p in net.parameters())
        print(f'CD step, {"tiny" if tiny else "ImageNet-64"} network ({params / 1e6:.1f}M parameters), batch {batch}, '
              f'{device}')
        method = cmm.ConsistencyDistillation(teacher=teacher_path, loss_norm='l2')
        method.setup(net, device)
        for variant, times in time_variants(net, method, batch, device, iters, warmup).items():
            sec = statistics.median(times)
            print(f'{variant:9s} {sec:8.3f} sec/step  {batch / sec:8.1f} img/s  (median of {len(times)})')

if __name__ == '__main__':
    main()
