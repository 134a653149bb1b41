"""sCM's few-step TrigFlow sampler (Lu & Song 2024 §3; docs/SCM.md §6) for any EDM-form network: multistep
consistency sampling (Song et al. 2023, Algorithm 1) in TrigFlow time.

Times are TrigFlow times t in (0, π/2): the first is where sampling starts, the intermediate ones are where the
sample is re-noised (searchable like ECT's mid_t: `make_trigflow_steps(t_max, mid_t)`), the last is 0. The
consistency function f(x̂, t) = cos t·x̂ − σd sin t·F_θ(x̂/σd, t) is evaluated through the network's EDM interface
as D(x̂/cos t, σd tan t) (training.networks.trigflow), so t = π/2 itself (σ = ∞) is outside what these networks
take; the default first time is arctan(80/σd), EDM's σmax = 80.
"""

import math

import torch

from training.sampling.time_steps import check_time_steps

SIGMA_MAX = 80.0         # EDM's largest noise level: the sampler starts at t_max = arctan(SIGMA_MAX / σd)
SIGMA_DATA = 0.5         # the data standard deviation σd of this project's networks
TRIG_T_MAX = math.atan(SIGMA_MAX / SIGMA_DATA)   # 1.5645 rad
# 2-step intermediate time: FastGen's recommended CIFAR-10 sCT/sCD t_list [80, 0.821, 0] (config_sct_cifar10.py:14,
# config_scd_cifar10.py:14) in EDM's σ, i.e. t = arctan(0.821/σd) = 1.0238 rad.
TRIG_MID_T = math.atan(0.821 / SIGMA_DATA)


def _check_trigflow_steps(steps):
    return check_time_steps(steps, 'TrigFlow', '--t-max/--mid_t', math.nextafter(math.pi / 2, 0), 'in (0, π/2)')


def make_trigflow_steps(t_max=TRIG_T_MAX, mid_t=None):
    """The TrigFlow times (t_max, *mid_t, 0) of `trigflow_sampler`; `mid_t` (radians) is None or a list."""
    return _check_trigflow_steps((t_max, *(mid_t or []), 0.0))


def _consistency(net, x_hat, t, class_labels, sigma_data):
    """f(x̂, t) = D(x̂/cos t, σd tan t) for the whole batch, in float64."""
    sigma = torch.full([x_hat.shape[0]], sigma_data * math.tan(t), dtype=torch.float64, device=x_hat.device)
    return net(x_hat / math.cos(t), sigma, class_labels).to(torch.float64)


# Multistep consistency sampling (Song et al. 2023, Alg. 1) in TrigFlow form (sCM §3; docs/SCM.md eq. P1):
# x̂ = σd sin(t_0)·z (σd·z at t_0 = π/2); for each step x0 = f(x̂, t_i), then x̂ = cos(t_{i+1})·x0 +
# sin(t_{i+1})·σd·z' unless t_{i+1} = 0. NFE = len(t_steps) − 1. `latents` are N(0, I).
def trigflow_sampler(net, latents, class_labels=None, t_steps=(TRIG_T_MAX, 0.0), randn_like=torch.randn_like):
    t_steps = _check_trigflow_steps(t_steps)
    sigma_data = float(getattr(net, 'sigma_data', SIGMA_DATA))
    x = latents.to(torch.float64) * (sigma_data * math.sin(t_steps[0]))
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        x = _consistency(net, x, t_cur, class_labels, sigma_data)
        if t_next > 0:
            x = math.cos(t_next) * x + math.sin(t_next) * sigma_data * randn_like(x)
    return x
