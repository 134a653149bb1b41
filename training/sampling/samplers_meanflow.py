"""One- and few-step sampling of MeanFlow networks (Geng et al. 2025; docs/MEANFLOW.md §4).

A MeanFlow network predicts the average velocity u(z, r, t) between times r <= t, with data at t = 0 and noise
at t = 1 (training.networks.meanflow_unet.MeanFlowPrecond, marked `is_meanflow`, called as net(x, r, t, labels)).
The sampler starts from z ~ N(0, I) at t_steps[0] and jumps x_r = x_t − (t − r)·u(x_t, r, t) through the remaining
steps. Like the consistency sampler it keeps its state in float64, converts what the network returns to float64
and never switches a module between train and eval mode (callers pass networks in eval()); it draws nothing.
"""

import torch

from training.sampling.time_steps import check_time_steps

MEANFLOW_T_MAX = 1.0    # the noise end: py-meanflow's one-step sampler starts at t = 1 (meanflow.py MeanFlow.sample)
MEANFLOW_MID_T = 0.5    # a 2-step intermediate time: NVlabs/FastGen config_mf_cifar10.py (t_list [0.999, 0.5, 0])


def check_meanflow_steps(steps):
    return check_time_steps(steps, 'MeanFlow', '--t-max/--mid_t', 1.0, 'in (0, 1]')


def make_meanflow_steps(t_max=MEANFLOW_T_MAX, mid_t=None):
    """The time steps (t_max, *mid_t, 0) of meanflow_sampler; `mid_t` is None or a list (the searched times)."""
    return check_meanflow_steps((t_max, *(mid_t or []), 0.0))


# MeanFlow Eq. 12 (one step: x_0 = z − u(z, 0, 1)) and its few-step form x_r = x_t − (t − r)·u(x_t, r, t), §4.2.
def meanflow_sampler(net, latents, class_labels=None, t_steps=(MEANFLOW_T_MAX, 0.0), randn_like=None):
    """Images (float64, unclipped, data range [-1, 1]) from `latents` ~ N(0, I); NFE = len(t_steps) − 1.
    `randn_like` is accepted for the samplers' common signature and never called."""
    del randn_like  # deterministic: every step is a jump along the predicted average velocity
    t_steps = check_meanflow_steps(t_steps)
    x = latents.to(torch.float64)
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        t = torch.full([x.shape[0]], t_cur, dtype=torch.float32, device=x.device)
        r = torch.full([x.shape[0]], t_next, dtype=torch.float32, device=x.device)
        x = x - (t_cur - t_next) * net(x, r, t, class_labels).to(torch.float64)
    return x
