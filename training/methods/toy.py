"""A toy training method, the example of docs/ADDING_A_METHOD.md: denoising at log-uniform noise levels whose
upper end grows linearly over the run."""

import torch

from training.methods.loss import tuning_kwargs
from training.methods.base import Method


class ToyDenoising(Method):
    """Denoising with σ log-uniform in [sigma_min, sigma_max], sigma_max ramped from sigma_start to sigma_end."""

    def __init__(self,
        sigma_min   = 0.002,    # smallest noise level
        sigma_start = 1.0,      # largest noise level at the start of training
        sigma_end   = 80.0,     # largest noise level at the end of training
        sigma_data  = 0.5,      # standard deviation of the data
    ):
        self.sigma_min, self.sigma_start, self.sigma_end = sigma_min, sigma_start, sigma_end
        self.sigma_data = sigma_data
        self.sigma_max = sigma_start
        self.net_kwargs = None

    def setup(self, net, device):
        self.net_kwargs = tuning_kwargs(net)   # e.g. boundary=False for consistency-model preconditioners

    def schedule(self, progress):
        done = min(progress.cur_nimg / progress.total_nimg, 1.0)
        self.sigma_max = self.sigma_start + done * (self.sigma_end - self.sigma_start)
        return dict(sigma_max=self.sigma_max)

    # EDM loss, Karras et al. 2022 eq. 2 with λ(σ) = (σ² + σd²)/(σ·σd)², here with log-uniform σ.
    def loss(self, net, images, labels=None):
        u = torch.rand([images.shape[0], 1, 1, 1], device=images.device)
        sigma = self.sigma_min * (self.sigma_max / self.sigma_min) ** u
        denoised = net(images + sigma * torch.randn_like(images), sigma, labels, **self.net_kwargs)
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        return (weight * (denoised - images).square()).flatten(1).sum(dim=1)
