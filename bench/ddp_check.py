"""The multi-process check of bench/gpu_check.py's `ddp` section: one step of the real Trainer under DDP.

Every rank builds `training.loop.training_loop.Trainer` from the cifar10-ecm preset (a small DDPM++, dropout > 0,
fp32), captures its RNG states and takes one `Trainer.step()`. Rank 0 then recomputes the step alone: for each
rank r, the method's loss on rank r's micro-batch (the sampler's shard r) with rank r's RNG states restored, so
its noise, times and dropout masks are the ones rank r drew; the sum of those per-sample losses over the global
batch gives one process's gradient of the concatenated batch, which must equal the DDP gradient. It also checks
that the ranks draw different noise: a fresh run whose ranks share their CUDA stream (issue 22, item 1) fails
here, while the gradient check alone would pass.

With fewer GPUs than processes (one H100), the processes share cuda:0 over gloo (NCCL refuses two ranks on one
device); the CUDA generators, the Trainer and DDP's gradient averaging are exercised all the same.
"""

import copy
import os
import tempfile

import torch

from configs import presets
from torch_utils import distributed as dist
from training.loop import runtime
from training.loop import training_loop as tl

SMALL_NET = dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[16])


def init_processes():
    """Join torchrun's group: NCCL with a GPU per process (dist.init), gloo when the processes share a GPU."""
    shared_gpu = torch.cuda.is_available() and torch.cuda.device_count() < int(os.environ.get('WORLD_SIZE', '1'))
    if shared_gpu:
        os.environ.setdefault('CUDA_VISIBLE_DEVICES', '0')   # dist.cuda_index: one visible GPU for every process
        torch.cuda.set_device(0)
        torch.distributed.init_process_group('gloo')
    else:
        dist.init()
    return 'gloo (processes share cuda:0)' if shared_gpu else (torch.distributed.get_backend()
                                                               if dist.is_distributed() else 'one process')


def _rng_states(device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == 'cuda' else None)


def _replay(states, device, fn):
    """fn() with torch's CPU generator and `device`'s CUDA generator set to `states` (restored afterwards)."""
    cpu_state, cuda_state = states
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)
        return fn()


def _reference_gradients(trainer, progress, net, method, states):
    """One process's gradient of the global batch: every rank's per-sample losses with its own RNG states."""
    o, device, world_size = trainer.run_ctx.options, trainer.run_ctx.device, len(states)
    dataset = runtime.build_dataset(o.dataset_kwargs)
    batch_gpu = o.batch_size // world_size
    method.schedule(progress)
    for rank, rank_states in enumerate(states):
        images, labels = next(runtime.build_data_iterator(dataset, o.data_loader_kwargs, batch_gpu, o.seed, 0, device,
                                                          rank=rank, num_replicas=world_size))
        images = images.to(device).to(torch.float32) / 127.5 - 1
        labels = labels.to(device).to(torch.float32)
        loss = _replay(rank_states, device, lambda: method.loss(net=net, images=images, labels=labels))
        (loss.sum() / o.batch_size).backward()
    return [p.grad for p in net.parameters()]


def _first_draws(states, device):
    """What each rank's generator of `device` draws first (the method's noise comes from it)."""
    return [_replay(s, device, lambda: torch.randn(8, device=device)) for s in states]


def check_trainer_ddp(device, report, batch_size=8, dropout=0.2, write_dataset=None):
    """Run the check on every rank; rank 0 reports (`report(name, ok, detail)`) and returns the verdict."""
    rank, world = dist.get_rank(), dist.get_world_size()
    with tempfile.TemporaryDirectory() as tmp:
        options = presets.resolve('cifar10-ecm', dict(
            data=write_dataset(os.path.join(tmp, 'data')), transfer='none', batch=batch_size,
            network_kwargs=SMALL_NET, dropout=dropout, precision='fp32', workers=0))
        trainer = tl.Trainer(options, tmp)
        state = trainer.run_ctx.state
        net, method = copy.deepcopy(state.net), copy.deepcopy(state.method)
        progress, mine = trainer.progress(), _rng_states(device)
        trainer.step()
        states = [mine]
        if world > 1:
            states = [None] * world
            torch.distributed.all_gather_object(states, mine)
        if rank != 0:
            return True
        reference = _reference_gradients(trainer, progress, net, method, states)
        worst = max(((a.grad - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()
                    for a, b in zip(state.net.parameters(), reference))
        draws = _first_draws(states, device)
    distinct = all(not torch.equal(draws[i], draws[j]) for i in range(world) for j in range(i))
    name = f'Trainer DDP, {world} processes, dropout {dropout}'
    return report(name, worst < 1e-4 and distinct,
                  f'max relative gradient difference vs one process of the whole batch {worst:.3g}; the ranks\' '
                  f'{device.type} noise streams differ: {distinct}')
