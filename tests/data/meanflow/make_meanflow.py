"""Reference numbers of py-meanflow (Gsunshine/py-meanflow) for tests/test_meanflow.py: run its real modules on the
CPU with a tiny U-Net and write meanflow.npz next to this script (see README.md for what each key holds).

Usage: python tests/data/meanflow/make_meanflow.py /path/to/py-meanflow   (an extracted checkout: the folder that
holds meanflow/models/). Only torch and numpy are needed (py-meanflow's models/ import nothing else).
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

# The tiny U-Net: py-meanflow's CIFAR-10 settings (model_configs.py) at 8x8 with 8 channels and one block per level.
UNET = dict(img_resolution=8, in_channels=3, out_channels=3, model_channels=8, channel_mult=[1, 1], num_blocks=1,
            attn_resolutions=[4], channel_mult_noise=2, resample_filter=[1, 3, 3, 1], encoder_type='standard',
            decoder_type='standard', embedding_type='positional', dropout=0.2, augment_dim=6)
V1 = dict(tr_sampler='v1', P_mean_t=-0.6, P_std_t=1.6, P_mean_r=-4.0, P_std_r=1.6, ratio=0.75)   # cifar10_v1.sh
V0 = dict(tr_sampler='v0', P_mean_t=-2.0, P_std_t=2.0, P_mean_r=-2.0, P_std_r=2.0, ratio=0.75)   # cifar10_v0.sh
WEIGHTING = dict(norm_p=0.75, norm_eps=1e-3)                                                     # train_arg_parser.py
BATCH = 4
INIT_SEED, PERTURB_SEED, DATA_SEED = 0, 5, 7
SEEDS = dict(loss_v1=11, loss_v0=12, times=13, sample=14)
NUM_TIMES = 256


def _args(sampler):
    return argparse.Namespace(ema_decay=0.9999, ema_decays=[], **sampler, **WEIGHTING)


class _CaptureMean(TorchFunctionMode):
    """Keeps the operand of the last Tensor.mean over a 1-D tensor: the per-sample losses in forward_with_loss."""

    def __init__(self):
        super().__init__()
        self.per_sample = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.mean and args[0].dim() == 1:
            self.per_sample = args[0].detach().clone()
        return func(*args, **(kwargs or {}))


def init_fingerprint(net):
    """(the first up-to-8 values of every parameter, concatenated; every parameter's norm) in parameter order."""
    params = list(net.parameters())
    return torch.cat([p.detach().flatten()[:8] for p in params]), torch.stack([p.detach().norm() for p in params])


def build_model(MeanFlow, SongUNet, sampler, out):
    """py-meanflow's MeanFlow module with the tiny U-Net (its initialisation's fingerprint into `out`); its weights
    moved away from the (near-zero-output) initialisation by seeded noise and rounded to float16 values, so they
    are stored exactly."""
    torch.manual_seed(INIT_SEED)
    model = MeanFlow(SongUNet, _args(sampler), dict(UNET))
    out['init_heads'], out['init_norms'] = init_fingerprint(model.net)
    gen = torch.Generator().manual_seed(PERTURB_SEED)
    with torch.no_grad():
        for p in model.net.parameters():
            scale = 0.5 / p[0].numel() ** 0.5 if p.dim() > 1 else 0.1
            p.add_(torch.randn(p.shape, generator=gen) * scale)
            p.copy_(p.half().float())
    return model


def loss_case(model, x, aug, seed):
    """Per-sample losses and the flat gradient (zeros for unused tensors) of forward_with_loss (train mode,
    dropout on) under `seed`, in the order of the U-Net's parameters."""
    model.net.train()
    model.net.zero_grad(set_to_none=True)
    capture = _CaptureMean()
    torch.manual_seed(seed)
    with capture:
        loss = model.forward_with_loss(x, aug)
    loss.backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.net.parameters()]
    grad = torch.cat([g.flatten() for g in grads])
    return capture.per_sample, grad


def jvp_case(net, x, aug, gen):
    """u and du/dt of py-meanflow's u_func (meanflow.py) at fixed (z, t, r) along (v, 1, 0), eval mode."""
    net.eval()
    t = torch.rand([BATCH, 1, 1, 1], generator=gen)
    r = t * torch.rand([BATCH, 1, 1, 1], generator=gen)
    r[0] = t[0]
    e = torch.randn(x.shape, generator=gen)
    z, v = (1 - t) * x + t * e, e - x

    def u_func(z, t, r):
        return net(z, (t.view(-1), (t - r).view(-1)), aug)

    with torch.no_grad():
        u, dudt = torch.func.jvp(u_func, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    return dict(jvp_z=z, jvp_v=v, jvp_t=t.view(-1), jvp_r=r.view(-1), jvp_u=u, jvp_dudt=dudt)


def main(root):
    sys.path.insert(0, os.path.join(root, 'meanflow'))
    from models.meanflow import MeanFlow
    from models.time_sampler import sample_two_timesteps
    from models.unet import SongUNet
    torch.set_num_threads(1)
    out = {}
    gen = torch.Generator().manual_seed(DATA_SEED)
    x = (torch.rand([BATCH, 3, 8, 8], generator=gen) * 2 - 1)
    aug = torch.randn([BATCH, UNET['augment_dim']], generator=gen)
    out.update(x=x, aug=aug)
    for name, sampler, case_aug in (('loss_v1', V1, aug), ('loss_v0', V0, None)):
        model = build_model(MeanFlow, SongUNet, sampler, out)
        out[f'{name}_per_sample'], out[f'{name}_grad'] = loss_case(model, x, case_aug, SEEDS[name])
    out.update({f'w.{k}': v.half() for k, v in model.net.state_dict().items()})
    out.update(jvp_case(model.net, x, aug, gen))
    for name, sampler in (('v1', V1), ('v0', V0)):
        torch.manual_seed(SEEDS['times'])
        out[f'times_{name}_t'], out[f'times_{name}_r'] = sample_two_timesteps(_args(sampler), NUM_TIMES, 'cpu')
    torch.manual_seed(SEEDS['sample'])
    model.net.eval()
    with torch.no_grad():
        out['sample_out'] = model.sample((BATCH, 3, 8, 8), net=model.net, device='cpu')
    torch.manual_seed(SEEDS['sample'])
    out['sample_latents'] = torch.randn((BATCH, 3, 8, 8))
    meta = dict(unet=UNET, v1=V1, v0=V0, weighting=WEIGHTING, batch=BATCH, seeds=SEEDS, num_times=NUM_TIMES,
                torch=torch.__version__)
    arrays = {k: v.detach().numpy() for k, v in out.items()}
    arrays['meta'] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez_compressed(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'meanflow.npz'), **arrays)


if __name__ == '__main__':
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
