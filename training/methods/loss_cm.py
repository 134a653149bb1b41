"""Losses of the original Consistency Models (Song et al., ICML 2023) and of their baselines, written to give the
numbers of openai/consistency_models (`cm/karras_diffusion.py`) in float32 (docs/CONSISTENCY_MODELS.md).

Networks are called in the project's convention `net(x, sigma, labels, **kwargs) -> denoised`: the student and
the target in their default (evaluation) form — the consistency form for CD/CT, the EDM form for progressive
distillation — and a teacher in its EDM form (`tuning_kwargs`: boundary=False for ECM-style preconditioners).

Random numbers are drawn in the official order from the global generators of the images' device: the noise
`randn_like(x0)` first, then the level indices `randint`. Per-sample losses [N] are returned; the training loop
sums them and divides by the global batch size (the official `(losses * weights).mean()` with uniform weights).
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

import dnnlib
from torch_utils import misc
from training.methods import loss_compiled
from training.methods.loss import tuning_kwargs

WEIGHT_SCHEDULES = ('snr', 'snr+1', 'karras', 'truncated-snr', 'uniform')
LOSS_NORMS = ('l2', 'l1', 'l2-32', 'lpips')
SOLVERS = ('heun', 'euler')

#----------------------------------------------------------------------------
# Noise levels, weightings, schedules.

def check_choice(flag, value, choices):
    if value not in choices:
        raise dnnlib.UserError(f'{flag}: must be one of {", ".join(choices)}, got {value!r}')
    return value


# Consistency Models, Table 3 / `get_weightings`: λ(σ) from snr = σ^-2.
def get_weightings(weight_schedule, snrs, sigma_data=0.5):
    """The per-sample weights λ for signal-to-noise ratios `snrs` (tensor)."""
    check_choice('--weighting', weight_schedule, WEIGHT_SCHEDULES)
    if weight_schedule == 'snr':
        return snrs
    if weight_schedule == 'snr+1':
        return snrs + 1
    if weight_schedule == 'karras':
        return snrs + 1.0 / sigma_data ** 2
    if weight_schedule == 'truncated-snr':
        return torch.clamp(snrs, min=1.0)
    return torch.ones_like(snrs)


# Karras et al. 2022 eq. 5: σ_i = (σmax^(1/ρ) + i/(n−1)·(σmin^(1/ρ) − σmax^(1/ρ)))^ρ, i = 0..n−1, then 0.
def karras_sigmas(n, sigma_min=0.002, sigma_max=80.0, rho=7.0, device='cpu'):
    """The n Karras levels from σmax down to σmin plus a final 0, in float32 as `get_sigmas_karras` computes
    them (through torch.linspace, so the first level is 79.999985, not 80)."""
    ramp = torch.linspace(0, 1, n)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros([1])]).to(device)


# Consistency Models eq. 5 / Karras et al. 2022 eq. 5 at a fractional index: t(i) = (σmax^(1/ρ) + i/d·(σmin^(1/ρ) − σmax^(1/ρ)))^ρ.
def level_sigma(index, denominator, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """Noise level of (possibly fractional) level `index` (tensor) of a grid with `denominator` intervals, float32."""
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + index / denominator * (min_inv_rho - max_inv_rho)) ** rho


# Consistency Models §6 / Appendix C.1 (`create_ema_and_scales_fn`): N(k) = M(k) + 1 with
# M(k) = max(1, ⌈√(k/K·((s1 + 1)² − s0²) + s0²) − 1⌉), adaptive μ(k) = exp(s0·ln μ0 / M(k)); progressive
# distillation halves N every `distill_steps` steps (Salimans & Ho 2022).
def ema_and_scales(step, target_ema_mode='fixed', start_ema=0.95, scale_mode='fixed', start_scales=40,
                   end_scales=40, total_steps=600000, distill_steps=50000):
    """(target EMA μ(k), number of levels N(k)) at optimiser step `step`, as the official schedule gives them."""
    if scale_mode == 'fixed' and target_ema_mode == 'fixed':
        return float(start_ema), int(start_scales)
    if scale_mode == 'progressive' and target_ema_mode in ('fixed', 'adaptive'):
        m = np.ceil(np.sqrt(step / total_steps * ((end_scales + 1) ** 2 - start_scales ** 2) + start_scales ** 2)
                    - 1).astype(np.int32)
        m = np.maximum(m, 1)
        ema = start_ema if target_ema_mode == 'fixed' else np.exp(-(-np.log(start_ema) * start_scales) / m)
        return float(ema), int(m + 1)
    if scale_mode == 'progdist' and target_ema_mode == 'fixed':
        scales = max(start_scales // 2 ** (step // distill_steps), 2)
        if scales == 2:
            sub_stage = max(step - distill_steps * (math.log2(start_scales) - 1), 0) // (distill_steps * 2)
            scales = max(2 // 2 ** int(sub_stage), 1)
        return 1.0, int(scales)
    raise dnnlib.UserError(f'--target-ema-mode={target_ema_mode} with --scale-mode={scale_mode}: not a schedule '
                           f'(fixed|adaptive with progressive, fixed with fixed|progdist)')

#----------------------------------------------------------------------------
# Distances and ODE steps.

def _mean_flat(x):
    return x.mean(dim=list(range(1, x.ndim)))


def _resize(x, size):
    return F.interpolate(x, size=size, mode='bilinear')


# Consistency Models §3 / Appendix C: d(x, y) = ‖x − y‖² (l2), ‖x − y‖₁ (l1), l2 at 32 px, or LPIPS on [0, 1].
def distance(loss_norm, x, y, lpips=None):
    """Per-sample distances [N] between images x and y in [-1, 1] (LPIPS on images upsampled to 224 below 256 px)."""
    check_choice('--loss-norm', loss_norm, LOSS_NORMS)
    if loss_norm == 'l1':
        return _mean_flat((x - y).abs())
    if loss_norm == 'l2':
        return _mean_flat((x - y).square())
    if loss_norm == 'l2-32':
        return _mean_flat((_resize(x, 32) - _resize(y, 32)).square())
    if lpips is None:
        raise dnnlib.UserError('--loss-norm=lpips: no LPIPS network was built (call setup first)')
    # In float32 whatever the training precision, as openai computes it: under bf16 autocast the normalised
    # features of two close images (their difference is the loss) keep almost no significant digits.
    with torch.autocast(x.device.type, enabled=False):
        x, y = x.float(), y.float()
        if x.shape[-1] < 256:
            x, y = _resize(x, 224), _resize(y, 224)
        return lpips((x + 1) / 2.0, (y + 1) / 2.0)


def _col(t, ndim):
    return t.reshape([-1] + [1] * (ndim - 1))


# Karras et al. 2022 Alg. 1 (one step): Euler x' = x + (t' − t)·(x − D(x, t))/t, Heun's correction with D(x', t').
@torch.no_grad()
def ode_step(x, t, t_next, denoiser, solver='heun'):
    """One probability-flow ODE step of x from level t to t_next (tensors [N]) with `denoiser(x, t)`."""
    d = (x - denoiser(x, t)) / _col(t, x.ndim)
    x_next = x + d * _col(t_next - t, x.ndim)
    if solver == 'euler':
        return x_next
    d_next = (x_next - denoiser(x_next, t_next)) / _col(t_next, x.ndim)
    return x + (d + d_next) * _col((t_next - t) / 2, x.ndim)

#----------------------------------------------------------------------------
# The losses, given their random inputs.

def call_net(net, x, t, labels, edm_form=False):
    """net(x, t, labels) in its default form, or in its EDM form for a teacher."""
    return net(x, t, labels, **(tuning_kwargs(net) if edm_form else {}))


# Consistency Models Alg. 2 (CD) and Alg. 3 (CT), eq. 7: λ(t_n)·d(f_θ(x_{t_n}, t_n), f_θ⁻(x̂_{t_{n+1}}, t_{n+1})).
def consistency_loss(net, target, x0, noise, indices, num_scales, labels=None, teacher=None, solver='heun',
                     loss_norm='l2', weight_schedule='uniform', lpips=None, shared_dropout=True,
                     sigma_min=0.002, sigma_max=80.0, rho=7.0, sigma_data=0.5):
    """Per-sample CD (with `teacher`) or CT (without: the Euler step toward x0) losses [N].

    The index n ~ U{0, ..., N − 2} runs from σmax (n = 0) down; the student sees level n, the target level
    n + 1 after one ODE step. The target pass reuses the student's dropout masks: the RNG states of the CPU and
    of a CUDA device are restored for it, so the masks agree on every device (the official code restores only
    the CPU generator). A torch.compile'd `net` (--compile) draws its masks in the graph, so the target pass runs
    the student's graph with `target`'s weights (training/methods/loss_compiled.py); `target` must then be a copy of it."""
    grid = dict(denominator=num_scales - 1, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    t, t_next = level_sigma(indices, **grid), level_sigma(indices + 1, **grid)
    x_t = x0 + noise * _col(t, x0.ndim)
    rng = misc.TorchRNGSnapshot(x0.device)
    student = call_net(net, x_t, t, labels)
    if teacher is None:
        x_next = ode_step(x_t, t, t_next, lambda x, s: x0, 'euler')
    else:
        x_next = ode_step(x_t, t, t_next, lambda x, s: call_net(teacher, x, s, labels, edm_form=True), solver)

    compiled = loss_compiled.compiled_network(net)

    def target_pass():
        if compiled is not None:
            return loss_compiled.target_pass(compiled, (x_next.detach(), t_next, labels), weights=target)
        with torch.no_grad():
            return call_net(target, x_next.detach(), t_next, labels)
    target_out = (rng.replay(target_pass) if shared_dropout else target_pass()).detach()
    weights = get_weightings(weight_schedule, t ** -2, sigma_data)
    return distance(loss_norm, student, target_out.to(student.dtype), lpips) * weights


# Progressive distillation, Salimans & Ho 2022 Alg. 2 (`progdist_losses`): the student's one step over an
# interval of N levels matches the teacher's two Euler half-steps, x̃ = x_t − t·(x_t'' − x_t)/(t'' − t).
def progdist_loss(net, teacher, x0, noise, indices, num_scales, labels=None, loss_norm='l2',
                  weight_schedule='uniform', lpips=None, sigma_min=0.002, sigma_max=80.0, rho=7.0, sigma_data=0.5):
    """Per-sample progressive-distillation losses [N] for level indices n ~ U{0, ..., N − 1}."""
    grid = dict(denominator=num_scales, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    t, t_half, t_end = (level_sigma(indices + offset, **grid) for offset in (0, 0.5, 1))
    x_t = x0 + noise * _col(t, x0.ndim)
    denoised = call_net(net, x_t, t, labels, edm_form=True)
    teacher_fn = lambda x, s: call_net(teacher, x, s, labels, edm_form=True)
    x_half = ode_step(x_t, t, t_half, teacher_fn, 'euler')
    x_end = ode_step(x_half, t_half, t_end, teacher_fn, 'euler')
    target_x = (x_t - _col(t, x0.ndim) * (x_end - x_t) / _col(t_end - t, x0.ndim)).detach()
    weights = get_weightings(weight_schedule, t ** -2, sigma_data)
    return distance(loss_norm, denoised, target_x.to(denoised.dtype), lpips) * weights


# Karras et al. 2022 eq. 2 as `training_losses` computes it: mean over pixels of λ(σ)·(D(x + σn, σ) − x)².
def denoising_loss(net, x0, noise, sigma, labels=None, weight_schedule='karras', sigma_data=0.5):
    """Per-sample EDM pretraining losses [N] (mean over pixels, the official `terms['loss']`)."""
    denoised = call_net(net, x0 + noise * _col(sigma, x0.ndim), sigma, labels, edm_form=True)
    weights = _col(get_weightings(weight_schedule, sigma ** -2, sigma_data), x0.ndim)
    return _mean_flat(weights * (denoised - x0).square())
