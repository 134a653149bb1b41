"""The MeanFlow loss (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"): the time samplers of its
PyTorch code (Gsunshine/py-meanflow, meanflow/models/time_sampler.py) and the per-sample loss of
MeanFlow.forward_with_loss (meanflow/models/meanflow.py), docs/MEANFLOW.md §3.

The loss evaluates the network twice with the same dropout masks: a forward-mode JVP under no_grad on the
unwrapped network gives du/dt for the stop-gradient target (it records its masks on a DrawTape), and a plain
forward through the (maybe DDP-wrapped) network gives u with gradients (it replays them). py-meanflow takes the
gradient through the JVP's primal output instead; the gradients agree to float32 rounding (tests/test_meanflow.py).
"""

import torch

from training.methods.loss import _unwrap
from training.networks.jvp import network_jvp
from training.networks.randomness import sharing_draws

TIME_SAMPLERS = ('v0', 'v1')


# Logit-normal time distribution (MeanFlow §4.3; py-meanflow time_sampler.py): t = sigmoid(P_mean + P_std·n).
def logit_normal(P_mean, P_std, num_samples, device):
    return torch.sigmoid(torch.randn((num_samples,), device=device) * P_std + P_mean).clip(min=0.0, max=1.0)


# py-meanflow time_sampler.py, sample_two_timesteps_t_r_v0 / _v1 (MeanFlow §4.3 and Table 1a): t and r
# logit-normal, drawn in the order t, r, then one uniform per sample; a fraction 1 − ratio of the samples get r = t.
# v0 (the paper's) orders the pair first, (t, r) = (max, min); v1 keeps t and sets r = min(t, r) after the mask.
def sample_times(version, num_samples, device, P_mean_t, P_std_t, P_mean_r, P_std_r, ratio):
    """(t, r), each float32 [num_samples] with 0 <= r <= t <= 1, from the global torch RNG."""
    t = logit_normal(P_mean_t, P_std_t, num_samples, device)
    r = logit_normal(P_mean_r, P_std_r, num_samples, device)
    if version == 'v0':
        t, r = torch.maximum(t, r), torch.minimum(t, r)
    same = torch.rand(num_samples, device=device) < 1 - ratio
    r = torch.where(same, t, r)
    if version == 'v1':
        r = torch.minimum(t, r)
    return t, r


def average_velocity_target(module, z, v, r, t, net_kwargs):
    """u_tgt = v − (t − r)·du/dt (MeanFlow Eq. 10), du/dt = ∂_z u·v + ∂_t u by a JVP along (v, 0, 1) in (z, r, t)
    (Eq. 8), under no_grad in float32 on the unwrapped `module`. r and t are [N]."""
    def u_func(z, r, t):
        return module(z, r, t, **net_kwargs)

    with torch.no_grad(), torch.autocast(z.device.type, enabled=False):
        _, dudt = network_jvp(u_func, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
        return v - (t - r).reshape(-1, 1, 1, 1) * dudt


# MeanFlow Eq. 9 with the adaptive weighting of §4.3 (py-meanflow meanflow.py forward_with_loss):
# L = ‖Δ‖² / sg(‖Δ‖² + c)^p, Δ = u_θ(z_t, r, t) − sg(u_tgt), z_t = (1 − t)·x + t·ε, v = ε − x.
def meanflow_loss(net, images, noise, r, t, norm_p, norm_eps, net_kwargs=None):
    """Per-sample MeanFlow losses [N] for given noise and times (r, t: [N], r <= t); `net` may be DDP-wrapped."""
    kwargs = net_kwargs or {}
    t4 = t.reshape(-1, 1, 1, 1)
    z = (1 - t4) * images + t4 * noise
    v = noise - images
    with sharing_draws(net) as tape:
        with tape.recording():
            target = average_velocity_target(_unwrap(net), z, v, r, t, kwargs)
        with tape.replaying():
            u = net(z, r, t, **kwargs)
    delta_sq = (u.to(torch.float32) - target).square().sum(dim=(1, 2, 3))
    return delta_sq / (delta_sq.detach() + norm_eps) ** norm_p
