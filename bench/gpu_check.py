"""Correctness checks that need a CUDA device; bench/gpu_check.sh runs them with the throughput tables.

    python bench/gpu_check.py checks                                   # shared dropout, fp16 GradScaler
    python bench/gpu_check.py compile                                  # torch.compile vs eager (minutes)
    torchrun --standalone --nproc_per_node=2 bench/gpu_check.py ddp    # NCCL DDP gradient equality (1 or 2 GPUs)

Every check prints one `PASS`/`FAIL` line with its measured numbers and the command exits with status 1 when
any failed. The networks are small DDPM++ U-Nets (random weights) so the whole run takes seconds.
"""

import copy
import os
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch_utils import distributed as dist  # noqa: E402
from configs import presets  # noqa: E402
from training import runtime  # noqa: E402
from training import training_loop as tl  # noqa: E402
from training.loss import ECTLoss, tuning_kwargs  # noqa: E402
from bench.bench_train import SyntheticData, synthetic_batches  # noqa: E402

SMALL_NET = dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[16])
DATA = SyntheticData(32, 3, 0)


def small_net(device, dropout, seed=0):
    """A small DDPM++ ECMPrecond (train mode) of the cifar10-ecm preset with the given dropout."""
    options = presets.resolve('cifar10-ecm', dict(transfer='none', dropout=dropout, network_kwargs=SMALL_NET))
    return runtime.build_network(options.network_kwargs, DATA, None, device, seed)


def report(name, ok, detail):
    print(f'{"PASS" if ok else "FAIL"}  {name}: {detail}', flush=True)
    return bool(ok)


def _passes(net, device, dtype, shared):
    """(f_t, f_r, the CUDA generator's next draw) of ECT's two passes with r = t, batch 16."""
    gen = torch.Generator(device).manual_seed(1)
    x0 = torch.randn([16, 3, 32, 32], device=device, generator=gen)
    eps = torch.randn(x0.shape, device=device, generator=gen)
    t = torch.rand([16, 1, 1, 1], device=device, generator=gen) * 2 + 0.1
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        f_t, f_r = ECTLoss().prediction_and_target(net, x0, t, t, eps, None, tuning_kwargs(net), shared_dropout=shared)
    return f_t.detach(), f_r, torch.rand([4], device=device)


def check_shared_dropout(device):
    """ECT's prediction and target passes with r = t and dropout 0.5 agree bit for bit (CUDA RNG restored)."""
    net = small_net(device, dropout=0.5)
    with torch.no_grad():   # away from the (near) zero initialisation of the output layers, so masks show
        gen = torch.Generator().manual_seed(2)
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(device) * 0.05)
    ok = True
    for name, dtype in [('fp32', None), ('bf16', torch.bfloat16), ('fp16', torch.float16)]:
        _passes(net, device, dtype, True)   # warm-up: cudnn.benchmark picks its algorithms here
        torch.manual_seed(5)
        f_t, f_r, after = _passes(net, device, dtype, True)
        torch.manual_seed(5)
        g_t, g_r, _ = _passes(net, device, dtype, False)
        torch.manual_seed(5)
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            net(torch.zeros(16, 3, 32, 32, device=device), torch.ones(16, 1, 1, 1, device=device), **tuning_kwargs(net))
        alone = torch.rand([4], device=device)
        detail = (f'{name}: shared max|f_t - f_r| = {(f_t - f_r).abs().max().item():.3g}, '
                  f'fresh masks max diff = {(g_t - g_r).abs().max().item():.3g}, RNG continues as after one pass: '
                  f'{torch.equal(after, alone)}')
        ok &= report('shared dropout', torch.equal(f_t, f_r) and not torch.equal(g_t, g_r) and torch.equal(after, alone),
                     detail)
    return ok


def check_grad_scaler(device):
    """fp16 + GradScaler: overflowing steps are skipped (weights unchanged, scale backs off), later ones apply."""
    options = presets.resolve('cifar10-ecm', dict(transfer='none', batch=8, network_kwargs=SMALL_NET,
                                                  precision='fp16'))
    state = tl.build_state(options, DATA, device)
    state.scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 40)
    net, iterator = state.net, synthetic_batches(DATA, 8)
    before = [p.detach().clone() for p in net.parameters()]
    tl.training_step(net, net, state.method.loss, state.optimizer, iterator, 1, 8, 1e-4, device, torch.float16,
                     state.scaler)
    skipped = all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    first_scale = state.scaler.get_scale()
    for steps in range(2, 61):   # each overflow halves the scale; stop at the first step that applies
        scale = state.scaler.get_scale()
        tl.training_step(net, net, state.method.loss, state.optimizer, iterator, 1, 8, 1e-4, device, torch.float16,
                         state.scaler)
        if state.scaler.get_scale() >= scale:
            break
    moved = not all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    finite = all(bool(torch.isfinite(p).all()) for p in net.parameters())
    return report('fp16 GradScaler', skipped and first_scale == 2.0 ** 39 and moved and finite,
                  f'first step skipped: {skipped}, scale 2^40 -> {first_scale:g}, applied after {steps} steps at '
                  f'scale {state.scaler.get_scale():g}: {moved}, weights finite: {finite}')


def check_compile(device):
    """torch.compile of the network (no --compile switch exists yet): eval output vs eager, and shared dropout."""
    eager = small_net(device, dropout=0.5)
    compiled = torch.compile(eager)
    x = torch.randn(16, 3, 32, 32, device=device)
    sigma = torch.rand(16, device=device) + 0.1
    with torch.no_grad():
        eager.eval()
        diff = (compiled(x, sigma, **tuning_kwargs(eager)) - eager(x, sigma, **tuning_kwargs(eager))).abs().max().item()
        eager.train()
    torch.manual_seed(5)
    f_t, f_r, _ = _passes(compiled, device, None, True)
    return report('compiled vs eager', diff < 1e-4 and torch.equal(f_t, f_r),
                  f'eval max|compiled - eager| = {diff:.3g}; compiled passes with r = t bit-identical: '
                  f'{torch.equal(f_t, f_r)} (max diff {(f_t - f_r).abs().max().item():.3g})')


def _fixed_noise_loss(net, images, labels=None):
    """A deterministic per-sample loss (noise level and perturbation from the pixels) for the DDP check."""
    sigma = images.mean(dim=[1, 2, 3], keepdim=True).abs() + 0.5
    out = net(images + sigma * torch.cos(images * 7), sigma, labels, **tuning_kwargs(net))
    return (out - images).square().flatten(1).sum(1)


def check_ddp(device, batch_size=16):
    """Gradients of a DDP (NCCL) step over the ranks' shards equal one process's gradient of the whole batch."""
    rank, world = dist.get_rank(), dist.get_world_size()
    net = small_net(device, dropout=0.0)
    reference = copy.deepcopy(net)
    images = torch.randint(0, 256, [batch_size, 3, 32, 32], generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    labels = torch.zeros([batch_size, 0])
    shard = batch_size // world
    mine = iter([(images[rank * shard:(rank + 1) * shard], labels[:shard])])
    ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == 'cuda' else None,
                                                  broadcast_buffers=False)
    tl.accumulate_gradients(ddp, _fixed_noise_loss, mine, 1, batch_size, device)
    x = images.to(device).float() / 127.5 - 1
    (_fixed_noise_loss(reference, x).sum() / batch_size).backward()
    worst = max(((a.grad - b.grad).abs().max() / b.grad.abs().max().clamp(min=1e-12)).item()
                for a, b in zip(net.parameters(), reference.parameters()))
    return report(f'DDP {torch.distributed.get_backend()} rank {rank}/{world}', worst < 1e-4,
                  f'max relative gradient difference vs one process {worst:.3g}')


@click.group()
def main():
    """CUDA correctness checks of the training step."""


def _device(allow_cpu):
    """This process's CUDA device (the training loop's flags set); the CPU only with --allow-cpu (a dry run)."""
    device = runtime.setup_runtime(0, 'fp32')
    if device.type != 'cuda' and not allow_cpu:
        raise click.ClickException('no CUDA device: these checks need a GPU (--allow-cpu for a dry run)')
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
    print(f'device: {name}, torch {torch.__version__}', flush=True)
    return device


ALLOW_CPU = click.option('--allow-cpu', help='Run on the CPU when there is no GPU (a dry run of the code)', is_flag=True)


@main.command()
@ALLOW_CPU
def checks(allow_cpu):
    """Shared dropout and the fp16 GradScaler on this process's device."""
    device = _device(allow_cpu)
    results = [check_shared_dropout(device), check_grad_scaler(device)]
    sys.exit(0 if all(results) else 1)


@main.command(name='compile')
@ALLOW_CPU
def compile_check(allow_cpu):
    """torch.compile of the network against eager (compile time included: minutes)."""
    sys.exit(0 if check_compile(_device(allow_cpu)) else 1)


@main.command()
@ALLOW_CPU
def ddp(allow_cpu):
    """The DDP equality check; run under torchrun (1 or more processes, one GPU each; gloo on the CPU)."""
    dist.init()
    ok = check_ddp(_device(allow_cpu))
    if dist.is_distributed():
        torch.distributed.destroy_process_group()
    sys.exit(0 if ok else 1)


if __name__ == '__main__':
    main()
