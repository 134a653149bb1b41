"""The pieces of sCM's loss (Lu & Song 2024, Algorithm 1; docs/SCM.md §3): the truncated log-normal time proposal,
the tangent g by JVP rearrangement with its warm-up and normalisation, the JVP of F_θ⁻ (forward-mode AD or a
central finite difference along dx̂/dt), and the adaptively weighted loss. Pure functions of tensors."""

import math

import torch

from training.networks.jvp import network_jvp

TANGENT_NORMS = ('l2', 'rms')   # ‖g‖ over all D elements (the paper's), or ‖g‖/√D (FastGen's default)


def _per_sample(value, like):
    """A per-sample value [N] shaped [N, 1, ..., 1] to broadcast against `like`."""
    return value.reshape([-1] + [1] * (like.ndim - 1))


# FastGen EDMNoiseSchedule._truncated_lognormal_sample (docs/SCM.md §3, proposal): ln σ ~ N(P_mean, P_std²)
# restricted to [σmin, σmax] by inverting the normal CDF on a uniform draw between the bounds' CDFs, in float64.
def truncated_lognormal_sigma(num, P_mean, P_std, sigma_min, sigma_max, device):
    normal = torch.distributions.Normal(torch.tensor(P_mean, dtype=torch.float64),
                                        torch.tensor(P_std, dtype=torch.float64))
    lo, hi = (normal.cdf(torch.tensor(math.log(s), dtype=torch.float64)) for s in (sigma_min, sigma_max))
    u = torch.rand(num, dtype=torch.float64, device=device) * (hi - lo).to(device) + lo.to(device)
    return normal.icdf(u).exp().clamp(sigma_min, sigma_max)


def tangent_warmup(step, warmup_steps):
    """sCM Algorithm 1, tangent warm-up: r = min(1, step / H) (H = 0: no warm-up)."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


# sCM Algorithm 1 ("JVP rearrangement"): g = −cos²t (σd F⁻ − dx̂/dt) − r cos t sin t (x̂ + σd dF⁻/dt), with
# F_jvp = cos t sin t · dF⁻/dt (the JVP along (cos t sin t)(dx̂/dt, 1), docs/SCM.md eq. S4).
def scm_tangent(F_minus, F_jvp, x_hat, dxdt, t_hat, r, sigma_data):
    t = _per_sample(t_hat, x_hat)
    cos_t, sin_t = t.cos(), t.sin()
    return -cos_t.square() * (sigma_data * F_minus - dxdt) - r * (cos_t * sin_t * x_hat + sigma_data * F_jvp)


# sCM Algorithm 1, tangent normalisation: g / (‖g‖ + c); 'rms' divides ‖g‖ by √D first (FastGen's
# g_norm_spatial_invariance).
def normalize_tangent(g, c, norm='l2'):
    g_norm = torch.linalg.vector_norm(g.flatten(1), dim=1)
    if norm == 'rms':
        g_norm = g_norm / math.sqrt(g[0].numel())
    return g / (_per_sample(g_norm, g) + c)


# sCM §4.2 (adaptive weighting) / Algorithm 1: L = λ(t)·e^{w_φ(t)}/D ‖F_θ − F_θ⁻ − g‖² − w_φ(t) per sample, with
# the head's log-variance u = −w_φ (FastGen's convention) and λ the prior weight; D divides once (docs/SCM.md §5).
def scm_loss(F, g, logvar=None, weight=1.0):
    dim = F[0].numel()
    squared = (F - F.detach() - g).square().flatten(1).sum(dim=1) * weight / dim
    return squared if logvar is None else squared * torch.exp(-logvar) + logvar


def _tangent_scale(t_hat):
    """cos t sin t, the scale of the JVP's tangent (dx̂/dt, 1) that keeps the time derivative bounded near 0, π/2."""
    return t_hat.cos() * t_hat.sin()


def jvp_autograd(fn, x_hat, t_hat, dxdt):
    """cos t sin t · dF/dt of F = fn(x̂, t̂) along (dx̂/dt, 1), by forward-mode AD (training.networks.jvp)."""
    scale = _tangent_scale(t_hat)
    return network_jvp(fn, (x_hat, t_hat), (_per_sample(scale, dxdt) * dxdt, scale))[1]


def jvp_finite_difference(fn, x_hat, t_hat, dxdt, rel_step, tape):
    """cos t sin t · dF/dt by the central difference [F(x̂ + ε ẋ, t̂ + ε) − F(x̂ − ε ẋ, t̂ − ε)] / 2ε along ẋ = dx̂/dt,
    ε = rel_step · min(t̂, π/2 − t̂) (both points inside (0, π/2)); the second pass replays the first's dropout
    masks from `tape`, which keeps them for the gradient pass too."""
    eps = rel_step * torch.minimum(t_hat, math.pi / 2 - t_hat)
    step = _per_sample(eps, x_hat) * dxdt
    with tape.recording():
        plus = fn(x_hat + step, t_hat + eps)
    with tape.replaying():
        minus = fn(x_hat - step, t_hat - eps)
    return _per_sample(_tangent_scale(t_hat) / (2 * eps), plus) * (plus - minus)
