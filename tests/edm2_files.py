"""Stand-ins for files the official EDM2 code writes, built the way it builds them (tiny weights).

- Raw power-EMA snapshots: EDM2's training/training_loop.py pickles
  `dnnlib.EasyDict(encoder=..., dataset_kwargs=..., loss_fn=..., ema=<fp16 eval copy of the EMA network>)` to
  `network-snapshot-{nimg // 1000:07d}-{std:.3f}.pkl`, every object of a persistent class as a
  torch_utils.persistence record.
- Reference statistics: EDM2's calculate_metrics.py pickles
  `dict(num_images=N, fid=dict(mu=ndarray, sigma=ndarray), fd_dinov2=dict(mu=..., sigma=...))` (float64 arrays).

The persistent classes below carry EDM2's class names, so the records name them as EDM2's files do.
"""

import copy
import os
import pickle

import numpy as np
import torch

import dnnlib
from torch_utils import persistence


@persistence.persistent_class
class EDM2Loss:
    def __init__(self, P_mean=-0.4, P_std=1.0, sigma_data=0.5):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data


@persistence.persistent_class
class StandardRGBEncoder:
    def __init__(self):
        pass


@persistence.persistent_class
class StabilityVAEEncoder:
    """EDM2's latent-space encoder: its state holds numpy float32 arrays (scale, bias), never the VAE itself."""

    def __init__(self, vae_name='stabilityai/sd-vae-ft-mse', raw_mean=(5.81, 3.25, 0.12, -2.15),
                 raw_std=(4.17, 4.62, 3.71, 3.28), final_mean=0, final_std=0.5, batch_size=8):
        self.vae_name = vae_name
        self.scale = np.float32(final_std) / np.float32(raw_std)
        self.bias = np.float32(final_mean) - np.float32(raw_mean) * self.scale
        self.batch_size = int(batch_size)
        self._vae = None


def edm2_snapshot_name(nimg, std):
    return f'network-snapshot-{nimg // 1000:07d}-{std:.3f}.pkl'


def write_edm2_snapshot(run_dir, nimg, std, ema_net, encoder=None):
    """One raw snapshot as EDM2's training loop writes it; returns its path."""
    data = dnnlib.EasyDict(encoder=encoder if encoder is not None else StandardRGBEncoder(),
                           dataset_kwargs=dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset',
                                                          path='datasets/img64.zip'),
                           loss_fn=EDM2Loss(P_mean=-0.8, P_std=1.6))
    data.ema = copy.deepcopy(ema_net).cpu().eval().requires_grad_(False).to(torch.float16)
    path = os.path.join(run_dir, edm2_snapshot_name(nimg, std))
    with open(path, 'wb') as f:
        pickle.dump(data, f)
    return path


def write_edm2_reference(path, stats):
    """A reference .pkl as EDM2's calculate_metrics.py writes it; `stats` maps a metric name ('fid', 'fd_dinov2')
    to (mu, sigma)."""
    data = dict(num_images=50000)
    data.update({metric: dict(mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))
                 for metric, (mu, sigma) in stats.items()})
    with open(path, 'wb') as f:
        pickle.dump(data, f)
    return path
