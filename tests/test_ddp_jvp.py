"""DDP with JVPs: sCT (training/methods/scm.py) and MeanFlow (training/methods/meanflow.py) under a real 2-process
gloo DistributedDataParallel run, each rank with half the batch, through the loop's own pieces (runtime.wrap_ddp,
training_loop.accumulate_gradients). Both methods take their JVP under no_grad on the unwrapped network and the
gradient-carrying pass through the DDP-wrapped `net`; the synced gradient must then be the gradient of the whole
batch's mean loss on one process. The control run hands the methods the unwrapped network (the JVP and the
gradient pass bypass DDP): its ranks keep their own half-batch gradients, which shows the check can fail.

Dropout (p = 0.3) is on, so each loss records masks in its JVP pass and replays them in the gradient pass. Every
rank seeds the global RNG before its loss call (SEED + rank): the single-process reference draws the same σ / t, r,
noise, augmentations and masks by computing each rank's half batch on its own with that rank's seed.
"""

import os

import torch

from multiprocess import free_port, run_ranks
from training.loop import runtime
from training.loop import training_loop as tl
from training.methods.base import Progress
from training.methods.meanflow import MeanFlow
from training.methods.scm import SCT
from training.networks.meanflow_unet import MeanFlowPrecond
from training.networks.trigflow import TrigFlowPrecond
from torch_utils import distributed as dist

WORLD = 2               # processes
BATCH = 4               # global batch: 2 images per rank
SEED = 1000             # rank k seeds its loss call with SEED + k
DROPOUT = 0.3
TOL = 1e-5              # relative error of the whole flattened float32 gradient
UNET = dict(img_resolution=8, img_channels=3, label_dim=0, model_channels=16, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[4], dropout=DROPOUT, embedding_type='positional', channel_mult_noise=1,
            resample_filter=[1, 1])
AUGMENT = dict(class_name='training.data.augment.AugmentPipe', p=0.5, xflip=1e8, scale=1, aniso=1,
               translate_frac=1)   # MeanFlow preset's transforms (configs/presets_ct.py), 6 augment labels
METHODS = ('sct', 'meanflow')


def _perturbed(net):
    """Weights far from their (partly zero) initialisation, the same on every process, so every path matters."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return net.train().requires_grad_(True)


def build(name):
    """(network, method set up for it) of sCT (r = 0.5: the JVP enters the target) or MeanFlow (augmented)."""
    torch.manual_seed(0)
    if name == 'sct':
        net = _perturbed(TrigFlowPrecond(denoiser='edm', model_type='SongUNet', logvar_head=True, **UNET))
        method = SCT(warmup_steps=4, adaptive_weighting=True)
        method.schedule(Progress(cur_nimg=2 * BATCH, batch_size=BATCH, total_nimg=100 * BATCH, tick_kimg=1))
    else:
        net = _perturbed(MeanFlowPrecond(model_type='MeanFlowUNet', augment_dim=6, **UNET))
        method = MeanFlow(augment_kwargs=AUGMENT)
    method.setup(net, torch.device('cpu'))
    return net, method


def batch():
    """The global batch as the data loader gives it: uint8 images [BATCH, 3, 8, 8], empty labels."""
    images = torch.randint(0, 256, (BATCH, 3, 8, 8), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    return images, torch.zeros(BATCH, 0)


def _flat_grad(net):
    return torch.cat([p.grad.flatten() for p in net.parameters()])


def step_gradient(ddp, net, method, rank, bypass=False):
    """The flattened gradient after the loop's forward/backward (accumulate_gradients: the loss scaled by the world
    size for DDP's average) of rank `rank`'s half batch on `ddp`; `bypass` hands the method the unwrapped network."""
    images, labels = batch()
    half = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)

    def loss_fn(net, images, labels):
        torch.manual_seed(SEED + rank)
        return method.loss(net.module if bypass else net, images, labels)
    net.zero_grad(set_to_none=True)
    tl.accumulate_gradients(ddp, loss_fn, iter([(images[half], labels[half])]), 1, BATCH, torch.device('cpu'))
    return _flat_grad(net)


def half_gradients(name):
    """[g_k]: on one process outside any process group, a network without DDP, the gradient of sum(per-sample
    losses of rank k's half) / BATCH with rank k's seed, written out here (not the loop's scaling); their sum is the
    gradient of the whole batch's mean loss."""
    assert not dist.is_distributed()
    net, method = build(name)
    images, labels = batch()
    images = images.to(torch.float32) / 127.5 - 1
    grads = []
    for rank in range(WORLD):
        half = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        net.zero_grad(set_to_none=True)
        torch.manual_seed(SEED + rank)
        (method.loss(net, images[half], labels[half]).sum() / BATCH).backward()
        grads.append(_flat_grad(net))
    return grads


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    # gloo on the CPU even where CUDA is available (dist.init() would choose NCCL there, which a forked child
    # cannot initialise).
    torch.distributed.init_process_group(backend='gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank,
                                         world_size=WORLD)
    assert dist.get_world_size() == WORLD
    grads = {}
    for name in METHODS:
        net, method = build(name)
        ddp = runtime.wrap_ddp(net, torch.device('cpu'), find_unused_parameters=False)   # the presets' setting
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        grads[name] = step_gradient(ddp, net, method, rank)
        grads[f'{name}.bypass'] = step_gradient(ddp, net, method, rank, bypass=True)
    torch.distributed.destroy_process_group()
    for name in METHODS[rank::WORLD]:   # each method's reference on one process, once it has left the group
        grads[f'{name}.halves'] = half_gradients(name)
    torch.save(grads, os.path.join(out_dir, f'grads{rank}.pt'))


def run_workers(out_dir):
    """Each rank's saved gradients {method: synced, method.bypass: the control run's}; the single-process reference
    {method.halves: [g_0, g_1]} (half_gradients) is in the file of one rank per method. The ranks are forked
    (tests/multiprocess.py)."""
    run_ranks(_worker, (free_port(), str(out_dir)), nprocs=WORLD)
    return [torch.load(out_dir / f'grads{rank}.pt') for rank in range(WORLD)]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# One test for both methods, so that the workers start once (also under pytest-xdist, which would run the
# fixture of separate tests once per worker).
def test_ddp_syncs_the_gradients_of_jvp_methods(tmp_path):
    ranks = run_workers(tmp_path)
    for i, name in enumerate(METHODS):
        halves = ranks[i % WORLD][f'{name}.halves']
        reference = halves[0] + halves[1]
        assert rel_err(halves[0], halves[1]) > 0.1, name   # the halves differ: an unsynced rank would show
        # Through DDP: every rank holds the whole batch's gradient, the same on both.
        for rank in range(WORLD):
            assert rel_err(ranks[rank][name], reference) < TOL, (name, rank)
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        # The control run (the loss on ddp.module) syncs nothing: each rank keeps WORLD × its half's gradient.
        for rank in range(WORLD):
            bypass = ranks[rank][f'{name}.bypass']
            assert rel_err(bypass, WORLD * halves[rank]) < TOL, (name, rank)
            assert rel_err(bypass, reference) > 0.1, (name, rank)
        assert rel_err(ranks[0][f'{name}.bypass'], ranks[1][f'{name}.bypass']) > 0.1, name
