"""The samplers of openai/consistency_models' `karras_sample`: onestep and multistep consistency sampling, and the
heun, euler, ancestral, dpm and progdist diffusion samplers, in openai's float32 arithmetic.

Every sampler starts from `latents * sigma_max`, calls the network with its noise level broadcast to the batch,
clamps each denoised output to [-1, 1] (`clip_denoised`, the default) and the result at the end. `randn_like`
gives the noise in the order the official samplers draw it, in the state's dtype (float32): with the per-seed
generators of `training.sampling.samplers.StackedRandomGenerator`, seed `N*S + i` gives image `i` of openai's
`--generator determ-indiv --seed S --num_samples N` (one batch on one process).
"""

import math

import numpy as np
import torch

import dnnlib

SAMPLERS = ('onestep', 'multistep', 'heun', 'euler', 'ancestral', 'dpm', 'progdist')
CONSISTENCY_SAMPLERS = ('onestep', 'multistep')
DEFAULT_TS = (0, 22, 39)    # openai's 2-step ImageNet-64 CD schedule (scripts/launch.sh) with steps 40.

# ----------------------------------------------------------------------------------------------------------
# Noise levels.


# Karras et al. 2022, Eq. 5: sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho, then 0; float32
# as openai's get_sigmas_karras (so sigma_0 is 79.999985, not 80), on the CPU.
def karras_sigmas(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    ramp = torch.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros([1])])


# Multistep consistency times (Song et al. 2023, Algorithm 1 with openai's schedule): the Karras level ts_i of a
# `steps` grid, t_i = (smax^(1/rho) + ts_i/(steps-1) (smin^(1/rho) - smax^(1/rho)))^rho, in python floats.
def multistep_times(ts, steps=40, t_min=0.002, t_max=80.0, rho=7.0):
    lo, hi = t_min ** (1 / rho), t_max ** (1 / rho)
    return [(hi + i / (steps - 1) * (lo - hi)) ** rho for i in ts]


def check_ts(ts, steps):
    """`ts` as a list of ints after checking it increases within [0, steps - 1] and has at least 2 entries."""
    ts = [int(i) for i in ts]
    if len(ts) < 2 or any(b <= a for a, b in zip(ts[:-1], ts[1:])) or ts[0] < 0 or ts[-1] > steps - 1:
        raise dnnlib.UserError(f'--ts={",".join(map(str, ts))}: needs at least 2 increasing levels in '
                               f'[0, {steps - 1}] (--steps={steps})')
    return ts

# ----------------------------------------------------------------------------------------------------------
# The samplers; `denoise(x, sigma)` is the clamped denoiser, sigma a float32 0-d CPU tensor or a python float.
# The levels' arithmetic runs on 0-d CPU tensors (openai's float32 ops, and no host sync per step on a GPU); they
# enter the device arithmetic as CPU scalars, read on the host, except the divisor of the slope below.


def _slope(x, sigma, denoised):
    """(x - D) / sigma, divided by sigma filled in on x's device: a CPU-scalar divisor would be turned into a
    multiplication by its reciprocal on CUDA (not openai's division); filling needs no host-to-device copy."""
    return (x - denoised) / torch.full([], float(sigma), dtype=x.dtype, device=x.device)


def _onestep(denoise, x, sigmas, randn_like):
    return denoise(x, sigmas[0])


# Consistency multistep sampling (Song et al. 2023, Algorithm 1): x <- f(x, t_i) + z sqrt(t_{i+1}^2 - t_min^2),
# t_{i+1} clipped to [t_min, t_max]; a draw is made on every step, the last included.
def _multistep(denoise, x, sigmas, randn_like, ts, steps, t_min, t_max, rho):
    times = multistep_times(ts, steps, t_min, t_max, rho)
    for t, t_next in zip(times[:-1], times[1:]):
        x0 = denoise(x, t)
        t_next = float(np.clip(t_next, t_min, t_max))
        x = x0 + randn_like(x) * math.sqrt(t_next ** 2 - t_min ** 2)
    return x


def _churn(x, sigma, randn_like, num_steps, s_churn, s_tmin, s_tmax, s_noise):
    """EDM's churn (Karras et al. 2022, Algorithm 2, lines 4-6): (x_hat, sigma_hat); a draw on every step."""
    gamma = min(s_churn / num_steps, 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    eps = randn_like(x) * s_noise
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + eps * (sigma_hat ** 2 - sigma ** 2) ** 0.5
    return x, sigma_hat


# Heun's 2nd-order sampler (Karras et al. 2022, Algorithm 2); an Euler step onto sigma = 0.
def _heun(denoise, x, sigmas, randn_like, **churn):
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x, sigma_hat = _churn(x, sigma, randn_like, len(sigmas) - 1, **churn)
        d = _slope(x, sigma_hat, denoise(x, sigma_hat))
        dt = sigma_next - sigma_hat
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = _slope(x_2, sigma_next, denoise(x_2, sigma_next))
            x = x + (d + d_2) / 2 * dt
    return x


# DPM-Solver-2-like midpoint sampler (k-diffusion's sample_dpm_2 with Karras churn): the midpoint on a rho = 3 grid,
# sigma_mid = ((sigma_hat^(1/3) + sigma_next^(1/3)) / 2)^3.
def _dpm(denoise, x, sigmas, randn_like, **churn):
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x, sigma_hat = _churn(x, sigma, randn_like, len(sigmas) - 1, **churn)
        d = _slope(x, sigma_hat, denoise(x, sigma_hat))
        sigma_mid = ((sigma_hat ** (1 / 3) + sigma_next ** (1 / 3)) / 2) ** 3
        x_2 = x + d * (sigma_mid - sigma_hat)
        d_2 = _slope(x_2, sigma_mid, denoise(x_2, sigma_mid))
        x = x + d_2 * (sigma_next - sigma_hat)
    return x


# Euler's method on the probability-flow ODE (Karras et al. 2022, Eq. 3).
def _euler(denoise, x, sigmas, randn_like):
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + _slope(x, sigma, denoise(x, sigma)) * (sigma_next - sigma)
    return x


# Ancestral Euler sampling (k-diffusion): sigma_up = sqrt(s_to^2 (s_from^2 - s_to^2) / s_from^2),
# sigma_down = sqrt(s_to^2 - sigma_up^2); an Euler step to sigma_down, then noise of scale sigma_up (every step).
def _ancestral(denoise, x, sigmas, randn_like):
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = denoise(x, sigma)
        sigma_up = (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5
        sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
        x = x + _slope(x, sigma, denoised) * (sigma_down - sigma)
        x = x + randn_like(x) * sigma_up
    return x


def _progdist(denoise, x, sigmas, randn_like):
    """Progressive distillation's sampler (Salimans & Ho 2022): Euler steps down to sigma_min, none to 0."""
    return _euler(denoise, x, sigmas[:-1], randn_like)


_FUNCTIONS = dict(onestep=_onestep, multistep=_multistep, heun=_heun, euler=_euler, ancestral=_ancestral, dpm=_dpm,
                  progdist=_progdist)

# ----------------------------------------------------------------------------------------------------------
# Entry point.


def _denoiser(net, class_labels, clip_denoised):
    def denoise(x, sigma):
        sigma = torch.full([x.shape[0]], float(sigma), dtype=torch.float32, device=x.device)
        denoised = net(x, sigma, class_labels).to(x.dtype)
        return denoised.clamp(-1, 1) if clip_denoised else denoised
    return denoise


def _sampler_args(sampler, steps, sigma_min, sigma_max, rho, ts, churn):
    if sampler == 'multistep':
        return dict(ts=check_ts(DEFAULT_TS if ts is None else ts, steps), steps=steps, t_min=sigma_min,
                    t_max=sigma_max, rho=rho)
    return churn if sampler in ('heun', 'dpm') else {}


def karras_sample(net, latents, class_labels=None, randn_like=torch.randn_like, sampler='heun', steps=40,
                  sigma_min=0.002, sigma_max=80.0, rho=7.0, s_churn=0.0, s_tmin=0.0, s_tmax=float('inf'),
                  s_noise=1.0, ts=None, clip_denoised=True):
    """openai's karras_sample for standard normal `latents` (N,C,H,W); float32 images clamped to [-1, 1].
    `ts` is multistep's list of levels of the `steps` grid (default 0,22,39); progdist uses steps + 1 levels."""
    if sampler not in _FUNCTIONS:
        raise dnnlib.UserError(f'--sampler={sampler}: must be one of {", ".join(SAMPLERS)}')
    if steps < 1 or (steps < 2 and sampler == 'multistep'):
        raise dnnlib.UserError(f'--steps={steps}: too few for --sampler={sampler}')
    churn = dict(s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
    args = _sampler_args(sampler, steps, sigma_min, sigma_max, rho, ts, churn)
    sigmas = karras_sigmas(steps + 1 if sampler == 'progdist' else steps, sigma_min, sigma_max, rho)
    x = latents.to(torch.float32) * sigma_max
    x = _FUNCTIONS[sampler](_denoiser(net, class_labels, clip_denoised), x, sigmas, randn_like, **args)
    return x.clamp(-1, 1)


# ----------------------------------------------------------------------------------------------------------
# Labels and options for generate.py, fid.py and metrics.

LABEL_STREAM = 1 << 32      # Label generator of seed s: torch.Generator seeded LABEL_STREAM + s % 2^32.
_CHURN_FLAGS = dict(S_churn='s_churn', S_min='s_tmin', S_max='s_tmax', S_noise='s_noise')


def seed_labels(seeds, label_dim, device=None):
    """One class index per seed (int64), from a generator of its own that the image's generator never sees, so
    images equal openai's determ-indiv samples (whose labels come from the global RNG) given the same labels."""
    gens = [torch.Generator().manual_seed(LABEL_STREAM + int(seed) % (1 << 32)) for seed in seeds]
    return torch.stack([torch.randint(label_dim, [], generator=g) for g in gens]).to(device)


def karras_kwargs(sampler, num_steps=None, ts=None, clip_denoised=None, **options):
    """Keyword arguments of karras_sample from command-line options (EDM's S_* names or openai's s_* names);
    an option the sampler does not use is a UserError naming its flag."""
    kwargs = dict(sampler=sampler, steps=40 if num_steps is None else num_steps)
    if ts is not None:
        if sampler != 'multistep':
            raise dnnlib.UserError(f'--ts: only used by --sampler=multistep, not {sampler}')
        kwargs['ts'] = check_ts(ts, kwargs['steps'])
    for flag, value in options.items():
        name = _CHURN_FLAGS.get(flag, flag)
        if name.startswith('s_') and sampler not in ('heun', 'dpm'):
            raise dnnlib.UserError(f'--{name}: only used by --sampler=heun or dpm, not {sampler}')
        if name not in ('sigma_min', 'sigma_max', 'rho') and not name.startswith('s_'):
            raise dnnlib.UserError(f'--{flag}: not an option of --sampler={sampler}')
        kwargs[name] = value
    if clip_denoised is not None:
        kwargs['clip_denoised'] = bool(clip_denoised)
    return kwargs


def karras_nfe(sampler='heun', steps=40, ts=None, **_):
    """Network evaluations per image of karras_sample with these arguments."""
    if sampler == 'onestep':
        return 1
    if sampler == 'multistep':
        return len(DEFAULT_TS if ts is None else ts) - 1
    return dict(heun=2 * steps - 1, dpm=2 * steps).get(sampler, steps)


def to_uint8_openai(x):
    """Images in [-1, 1] (N,C,H,W) to uint8 N,H,W,C as openai's image_sample.py: ((x + 1) 127.5) clamped, truncated."""
    return ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
