"""Our ECT training step against the official ECT code's step (locuslab/ect), side by side on one machine.

    python bench/bench_vs_official.py --official-root=/path/to/locuslab-ect            # CPU, 1 thread, batch 4
    python bench/bench_vs_official.py --official-root=... --rounds=12 --stage=0,3 --threads=2
    python bench/bench_vs_official.py --official-root=... --ours-precision=bf16     # ours in bf16 autocast
    python bench/bench_vs_official.py --official-root=... --device=cuda --batch=128 --precision=fp32,tf32 --rounds=1 --steps=10 --warmup=3

Each round runs one process per side, alternating which side goes first, and each process times `--steps`
steps after `--warmup` untimed ones; the per-round ratio is ours / official (median step time of each process),
and the table reports the median ratio over the rounds with its interquartile range. The two sides never share
a process: both code bases name their packages `training`, `torch_utils` and `dnnlib`.

What each side runs, per step (DDPM++ at CIFAR-10 width, ECMPrecond, dropout 0.2, RAdam lr 1e-4, EMA 0.9999,
synthetic uint8 images; the speed does not depend on the data):
  * official: the body of locuslab/ect's training/ct_training_loop.py loop (zero_grad, ECMLoss, loss report,
    mean().backward(), per-parameter nan_to_num, RAdam as its ct_train.py builds it, per-parameter EMA lerp)
    with its own training/networks.py and training/loss.py imported from --official-root. On the CPU its loss
    calls torch.cuda.get_rng_state / set_rng_state; the worker points them at the CPU generator, which is what
    that code does on a GPU (share the dropout masks of its two passes).
  * ours: training.loop.training_loop.training_step + the preset's EMA update, exactly as the training loop runs them.
Both sides are at curriculum stage `--stage` (several stages = one table row each); the official loss skips
its target pass when every r of the batch is 0 (likely at stage 0 with small batches), so stage >= 2 is the
steady state of a run.

With --device=cuda both sides run on the GPU (synthetic images already on it, like a device-resident dataset),
each timing bracketed by torch.cuda.synchronize(); --precision=tf32 sets the TF32 switches on both sides (the
official `--tf32`), fp32 clears them. --ours-precision=bf16 runs our side in bf16 autocast (fp32 master weights
and loss) against the official fp32/TF32 step: our default on CUDA, and on CPUs with native bf16 an opt-in. On the CPU nothing changes: the official loss's CUDA RNG calls are pointed
at the CPU generator, as before.
"""

import json
import os
import statistics
import subprocess
import sys
import time

import click

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DDPMPP_CIFAR = dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                    decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
                    channel_mult=[2, 2, 2], dropout=0.2)


def _batches(torch, batch, resolution, device):
    images = torch.randint(0, 256, [batch, 3, resolution, resolution], dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    images, labels = images.to(device), torch.zeros([batch, 0], device=device)
    while True:
        yield images, labels


def _time(step, steps, warmup, device):
    """Seconds per call of `step` after `warmup` calls; on CUDA each call is bracketed by synchronize()."""
    import torch
    synchronize = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    seconds = []
    for i in range(warmup + steps):
        synchronize()
        start = time.perf_counter()
        step()
        synchronize()
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    return seconds


def official_worker(root, batch, resolution, stage, steps, warmup, device):
    """Seconds per step of locuslab/ect's arithmetic, imported from `root`."""
    sys.path.insert(0, root)
    import copy
    import torch
    import dnnlib
    from torch_utils import training_stats
    if device.type == 'cpu':
        torch.cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
        torch.cuda.set_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    torch.manual_seed(0)
    net = dnnlib.util.construct_class_by_name(class_name='training.networks.ECMPrecond', img_resolution=resolution,
                                              img_channels=3, label_dim=0, **DDPMPP_CIFAR).train().requires_grad_(True)
    net = net.to(device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    loss_fn = dnnlib.util.construct_class_by_name(class_name='training.loss.ECMLoss', P_mean=-1.1, P_std=2.0, q=2,
                                                  c=0.0, k=8.0, b=1.0, adj='sigmoid')
    loss_fn.update_schedule(stage)
    optimizer = torch.optim.RAdam(net.parameters(), lr=1e-4, betas=[0.9, 0.999], eps=1e-8)
    data = _batches(torch, batch, resolution, device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        images, labels = next(data)
        images = images.to(torch.float32) / 127.5 - 1
        loss = loss_fn(net=net, images=images, labels=labels)
        training_stats.report('Loss/loss', loss)
        loss.mul(1).mean().backward()
        for param in net.parameters():
            if param.grad is not None:
                torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
        optimizer.step()
        for p_ema, p_net in zip(ema.parameters(), net.parameters()):
            p_ema.copy_(p_net.detach().lerp(p_ema, 0.9999))
    return _time(step, steps, warmup, device)


def ours_worker(batch, resolution, stage, steps, warmup, device, precision, flags):
    """Seconds per step of training.loop.training_loop.training_step (cifar10-ecm preset, no transfer) in `precision`
    (fp32 or tf32: the official code's arithmetic; bf16: our autocast), with train.py's `flags` (channels_last)."""
    sys.path.insert(0, REPO_ROOT)
    import torch
    from configs import presets
    from training.loop import runtime
    from training.loop import training_loop as tl
    options = presets.resolve('cifar10-ecm', dict(batch=batch, transfer='none', precision=precision, **flags))
    runtime.setup_runtime(0, options.precision)

    class Data:
        num_channels, label_dim = 3, 0
    Data.resolution = resolution
    state = tl.build_state(options, Data, device)
    state.method.loss_fn.set_stage(stage)
    data = _batches(torch, batch, resolution, device)
    lr = options.optimizer_kwargs['lr']

    autocast_dtype = tl.AUTOCAST_DTYPES[options.precision]

    def step():
        tl.training_step(state.net, state.net, state.method.loss, state.optimizer, data, 1, batch, lr, device,
                         autocast_dtype, state.scaler)
        state.ema.update(batch, batch)
    return _time(step, steps, warmup, device)


def run_worker(side, official_root, batch, resolution, stage, threads, steps, warmup, device, precision, ours_precision,
               flags):
    """One process's timing as a dict (run in a subprocess by the parent)."""
    import torch
    torch.set_num_threads(threads)
    device = torch.device(device)
    tf32 = precision == 'tf32'   # the official --tf32 switches (our setup_runtime sets the same ones)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True   # as both training loops set it
    if side == 'official':
        seconds = official_worker(official_root, batch, resolution, stage, steps, warmup, device)
    else:
        seconds = ours_worker(batch, resolution, stage, steps, warmup, device, ours_precision or precision, flags)
    return dict(side=side, stage=stage, seconds=seconds, median=statistics.median(seconds))


def spawn(side, args):
    env = dict(os.environ, OMP_NUM_THREADS=str(args['threads']), MKL_NUM_THREADS=str(args['threads']))
    cmd = [sys.executable, os.path.abspath(__file__), f'--worker={side}'] + [f'--{k.replace("_", "-")}={v}' for k, v in args.items()
                                                                 if v is not None]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise click.ClickException(f'{side} worker failed:\n{out.stderr[-3000:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def quartiles(values):
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method='inclusive')
    return q[0], q[2]


def compare(official_root, batch, resolution, stage, threads, steps, warmup, rounds, device='cpu', precision='fp32',
            ours_precision=None, flags=None):
    """Per-round ours/official ratios at one stage, sides alternating which runs first."""
    args = dict(official_root=official_root, batch=batch, resolution=resolution, stage=stage, threads=threads,
                steps=steps, warmup=warmup, device=device, precision=precision, ours_precision=ours_precision,
                **(flags or {}))
    ratios, ours, official = [], [], []
    for i in range(rounds):
        order = ('ours', 'official') if i % 2 == 0 else ('official', 'ours')
        result = {side: spawn(side, args)['median'] for side in order}
        ours.append(result['ours'])
        official.append(result['official'])
        ratios.append(result['ours'] / result['official'])
        print(f'{precision} stage {stage} round {i + 1}/{rounds}: ours {result["ours"]:.3f} s, official {result["official"]:.3f} s, '
              f'ratio {ratios[-1]:.3f}', flush=True)
    return ratios, ours, official


@click.command()
@click.option('--official-root', help='A checkout of locuslab/ect', metavar='DIR', type=click.Path(exists=True, file_okay=False), required=True)
@click.option('--batch', help='Images per step', metavar='INT', type=click.IntRange(min=1), default=4, show_default=True)
@click.option('--resolution', help='Image side', metavar='INT', type=click.IntRange(min=8), default=32, show_default=True)
@click.option('--stage', help='Curriculum stage(s), comma list', metavar='LIST', type=str, default='3', show_default=True)
@click.option('--threads', help='torch threads per process', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--steps', help='Timed steps per process', metavar='INT', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--warmup', help='Untimed steps per process', metavar='INT', type=click.IntRange(min=0), default=1, show_default=True)
@click.option('--rounds', help='Alternating process pairs per stage', metavar='INT', type=click.IntRange(min=1), default=6, show_default=True)
@click.option('--out', help='Also write the table as JSON here', metavar='FILE', type=str, default=None)
@click.option('--device', help='Where both sides run', type=click.Choice(['cpu', 'cuda']), default='cpu', show_default=True)
@click.option('--precision', 'precision_text', help='Comma list of fp32,tf32 (the official arithmetic: --tf32 off/on)', metavar='LIST', type=str, default='fp32', show_default=True)
@click.option('--ours-precision', help='Our side only: fp32, tf32 or bf16  [default: --precision]', type=click.Choice(['fp32', 'tf32', 'bf16']), default=None)
@click.option('--channels-last', help='Our side trains in NHWC (train.py --channels-last)', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--worker', help='(internal) run one side and print its timing', type=click.Choice(['ours', 'official']), default=None, hidden=True)
def main(official_root, batch, resolution, stage, threads, steps, warmup, rounds, out, device, precision_text, ours_precision,
         channels_last, worker):
    """Time our ECT step against the official one, interleaved, and print ours/official."""
    if not os.path.isfile(os.path.join(official_root, 'training', 'loss.py')):
        raise click.BadParameter(f'{official_root} has no training/loss.py; expected a checkout of locuslab/ect', param_hint='--official-root')
    try:
        stages = [int(s) for s in stage.split(',') if s]
    except ValueError:
        raise click.BadParameter(f'"{stage}" is not a comma list of integers', param_hint='--stage') from None
    precisions = [p for p in precision_text.split(',') if p]
    if not precisions or any(p not in ('fp32', 'tf32') for p in precisions):
        raise click.BadParameter(f'"{precision_text}" is not a comma list of fp32, tf32', param_hint='--precision')
    flags = dict(channels_last=channels_last)
    if worker is not None:
        print(json.dumps(run_worker(worker, official_root, batch, resolution, stages[0], threads, steps, warmup,
                                    device, precisions[0], ours_precision, flags)))
        return
    rows = []
    for precision in precisions:
        for s in stages:
            ratios, ours, official = compare(official_root, batch, resolution, s, threads, steps, warmup, rounds,
                                             device, precision, ours_precision, flags)
            lo, hi = quartiles(ratios)
            rows.append(dict(kind='vs_official', precision=precision, ours_precision=ours_precision or precision,
                             **flags, stage=s,
                             ratio_median=statistics.median(ratios), ratio_q1=lo, ratio_q3=hi,
                             ours_s=statistics.median(ours), official_s=statistics.median(official),
                             ratios=ratios, batch=batch, device=device,
                             ours_img_per_s=batch / statistics.median(ours),
                             official_img_per_s=batch / statistics.median(official)))
    print(f'ECT step, DDPM++ {resolution}x{resolution} batch {batch}, {device}, {threads} thread(s), {rounds} rounds '
          f'x {steps} steps ({os.uname().machine}, torch threads {threads})')
    print(f'{"official":>9}{"ours":>14}{"stage":>6}{"ours s":>10}{"official s":>12}{"ours/official":>15}{"IQR":>16}')
    for r in rows:
        ours_label = r['ours_precision'] + ''.join(f'+{name}' for name in flags if r[name])
        print(f'{r["precision"]:>9}{ours_label:>14}{r["stage"]:>6}{r["ours_s"]:>10.3f}{r["official_s"]:>12.3f}{r["ratio_median"]:>15.3f}'
              f'{r["ratio_q1"]:>8.3f}-{r["ratio_q3"]:.3f}')
    if out:
        with open(out, 'w') as f:
            json.dump(rows, f, indent=1)


if __name__ == '__main__':
    main()
