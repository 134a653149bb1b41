"""Samplers: the few-step consistency sampler, EDM's Heun sampler, per-seed random generators, and the rules
that choose a network's sampler and the recipes' sampling defaults (written here once for every caller).

Both samplers keep their state in float64, call the network with the noise level broadcast to the batch
and convert what it returns to float64. They never switch any module between train and eval mode:
callers pass networks already in `eval()` (ECM networks are called in their evaluation form,
`boundary=True`, which does not depend on the mode anyway).
"""

import collections
import inspect

import numpy as np
import torch

import dnnlib
from torch_utils import misc
from training.sampling import samplers_karras, samplers_meanflow, samplers_trigflow
from training.sampling.time_steps import check_time_steps

# Recipe defaults of consistency sampling (docs/ECT.md §5).
T_MAX = 80.0                # first time step t_max of consistency sampling
CIFAR10_MID_T = 0.821       # 2-step intermediate time of the CIFAR-10 recipe (DDPM++/NCSN++/ADM networks)
IMAGENET64_MID_T = 1.526    # 2-step intermediate time of the ImageNet-64 recipe (EDM2 networks)
HEUN_NUM_STEPS = 18         # EDM's Heun sampler: N = 18 noise levels, NFE 2N − 1 = 35 (docs/ECT.md §5)

# ----------------------------------------------------------------------------------------------------------
# Per-seed random numbers.


class StackedRandomGenerator:
    """One `torch.Generator` per seed; every draw is made per seed and stacked along the batch dimension.

    By default the generators live on the CPU and the numbers are moved to `device` afterwards, so the
    draws of seed `s` are bit-identical whatever the device, the batch size or the number of processes.
    Pass `generator_device=device` to draw on the device instead (EDM's generate.py does that on CUDA;
    faster for large stochastic samplers, but the numbers then depend on the device kind).
    """

    def __init__(self, device, seeds, generator_device='cpu'):
        self.device = torch.device(device)                         # where the drawn tensors are returned
        self.generator_device = torch.device(generator_device)     # where the per-seed generators draw
        self.generators = [torch.Generator(self.generator_device).manual_seed(int(seed) % (1 << 32))
                           for seed in seeds]                       # one generator per seed, in batch order

    def _check_batch(self, size):
        if len(size) == 0 or size[0] != len(self.generators):
            raise ValueError(f'StackedRandomGenerator: leading size {list(size)[:1]} does not match the '
                             f'{len(self.generators)} seeds')

    def randn(self, size, dtype=torch.float32, device=None):
        """Standard normal numbers of shape `size`; row `i` comes from seed `i` alone."""
        size = list(size)
        self._check_batch(size)
        rows = [torch.randn(size[1:], dtype=dtype, device=self.generator_device, generator=gen)
                for gen in self.generators]
        return misc.to_device_async(torch.stack(rows), self.device if device is None else device)

    def randn_like(self, x):
        """`randn` with the shape, dtype and device of `x`."""
        return self.randn(x.shape, dtype=x.dtype, device=x.device)

    def randint(self, high, size, device=None):
        """Integers in [0, high) of shape `size` (int64); row `i` comes from seed `i` alone."""
        size = list(size)
        self._check_batch(size)
        rows = [torch.randint(high, size=size[1:], device=self.generator_device, generator=gen)
                for gen in self.generators]
        return misc.to_device_async(torch.stack(rows), self.device if device is None else device)



# ----------------------------------------------------------------------------------------------------------
# Consistency sampler.


def _check_consistency_steps(steps):
    return check_time_steps(steps, 'consistency', '--t-max/--mid_t')


def make_consistency_steps(t_max=T_MAX, mid_t=None):
    """The time steps (t_max, *mid_t, 0) of the consistency sampler; `mid_t` is None or a list."""
    return _check_consistency_steps((t_max, *(mid_t or []), 0.0))


def _denoise(net, x, t, class_labels):
    """One network evaluation at noise level `t` (a python float or a 0-d CPU tensor) for the whole batch; the
    noise levels are filled in on the device, so no host-to-device copy waits for the device's queue."""
    sigma = torch.full([x.shape[0]], float(t), dtype=torch.float64, device=x.device)
    return net(x, sigma, class_labels).to(torch.float64)


# Consistency sampling (ECT paper, Sec. 3 / docs/ECT.md §5; Song et al. 2023, Algorithm 1):
# x = z·t_0; for each step x = f(x, t_i), then re-noise to t_{i+1} unless it is 0. NFE = len(t_steps) − 1.
def consistency_sampler(net, latents, class_labels=None, t_steps=(T_MAX, CIFAR10_MID_T, 0.0),
                        randn_like=torch.randn_like):
    t_steps = _check_consistency_steps(t_steps)
    x = latents.to(torch.float64) * t_steps[0]
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        x = _denoise(net, x, t_cur, class_labels)
        if t_next > 0:
            x = x + t_next * randn_like(x)
    return x


# ----------------------------------------------------------------------------------------------------------
# EDM Heun sampler.


# Noise levels of EDM (Karras et al. 2022, Eq. 5): sigma_i = (smax^(1/rho) + i/(N-1)(smin^(1/rho) - smax^(1/rho)))^rho,
# rounded to what the network represents, followed by sigma_N = 0.
def edm_sigma_steps(net, num_steps=HEUN_NUM_STEPS, sigma_min=0.002, sigma_max=80.0, rho=7.0, device=None):
    if num_steps < 2:
        raise dnnlib.UserError(f'--steps: the Heun sampler needs at least 2 steps, got {num_steps}')
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + i / (num_steps - 1) * (lo - hi)) ** rho
    sigmas = torch.as_tensor(net.round_sigma(sigmas), dtype=torch.float64, device=device)
    return torch.cat([sigmas, torch.zeros_like(sigmas[:1])])


# One stochastic Heun step of EDM (Karras et al. 2022, Algorithm 2): churn the noise level up to t_hat,
# take an Euler step to t_next, and correct it with the slope at t_next unless t_next is the final 0.
def _heun_step(net, x_cur, t_cur, t_next, class_labels, gamma, S_noise, randn_like):
    t_hat = torch.as_tensor(net.round_sigma(t_cur + gamma * t_cur), dtype=torch.float64)
    noise = randn_like(x_cur)  # Drawn on every step, as EDM does, so churn settings never shift later draws.
    x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * noise
    d_cur = (x_hat - _denoise(net, x_hat, t_hat, class_labels)) / t_hat
    x_next = x_hat + (t_next - t_hat) * d_cur
    if t_next > 0:
        d_next = (x_next - _denoise(net, x_next, t_next, class_labels)) / t_next
        x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_next)
    return x_next


# EDM's deterministic / stochastic sampler (Karras et al. 2022, Algorithm 2); NFE = 2·num_steps − 1.
# The noise levels stay on the CPU: the step's tests (t_next > 0, S_min <= t_cur) then never wait for the device.
def edm_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=HEUN_NUM_STEPS,
                sigma_min=0.002, sigma_max=80.0, rho=7.0, S_churn=0.0, S_min=0.0, S_max=float('inf'), S_noise=1.0):
    t_steps = edm_sigma_steps(net, num_steps, sigma_min, sigma_max, rho)
    x = latents.to(torch.float64) * t_steps[0]
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        x = _heun_step(net, x, t_cur, t_next, class_labels, gamma, S_noise, randn_like)
    return x


# ----------------------------------------------------------------------------------------------------------
# Which sampler a network gets, with the recipe's defaults.


def is_karras_net(net):
    """True for openai consistency_models networks (training.networks.karras.KarrasDenoiser), in either form."""
    return getattr(net, 'parameterization', None) in ('edm', 'consistency')


def is_consistency_net(net):
    """True for networks with a consistency evaluation form: EDM2 nets with `ecm_sigma_min` set, ECMPrecond, or
    KarrasDenoiser in the consistency form."""
    if is_karras_net(net):
        return net.is_consistency
    if hasattr(net, 'ecm_sigma_min'):
        return net.ecm_sigma_min is not None
    return 'boundary' in inspect.signature(net.forward).parameters


# Few-step samplers by family, each in its own time variable: 'consistency' (ECT, CD/CT, TCM: noise level σ, from
# T_MAX = 80), 'trigflow' (sCT/sCD: TrigFlow time in radians, from arctan(80/σd)), 'meanflow' (MeanFlow: flow time,
# noise at 1). make_steps(t_max, mid_t) -> t_steps; mid_t: the 2-step default (None: by network, default_mid_t).
FewStep = collections.namedtuple('FewStep', ['sampler', 'make_steps', 't_max', 'mid_t'])
FEW_STEP = dict(
    consistency=FewStep(consistency_sampler, make_consistency_steps, T_MAX, None),
    trigflow=FewStep(samplers_trigflow.trigflow_sampler, samplers_trigflow.make_trigflow_steps,
                     samplers_trigflow.TRIG_T_MAX, [samplers_trigflow.TRIG_MID_T]),
    meanflow=FewStep(samplers_meanflow.meanflow_sampler, samplers_meanflow.make_meanflow_steps,
                     samplers_meanflow.MEANFLOW_T_MAX, [samplers_meanflow.MEANFLOW_MID_T]),
)


def few_step_family(net, metadata=None):
    """The few-step sampler family of `net` (a FEW_STEP key), or None for a diffusion network: the snapshot's
    recorded `sampler` first (its training method's), else recognised from the network."""
    if metadata and metadata.get('sampler') in FEW_STEP:
        return metadata['sampler']
    if getattr(net, 'is_trigflow', False):
        return 'trigflow'
    if getattr(net, 'is_meanflow', False):
        return 'meanflow'
    return 'consistency' if is_consistency_net(net) else None


def default_mid_t(net, metadata=None, family='consistency'):
    """The 2-step recipe's intermediate time of `family` for `net`: the snapshot's metadata first (when it was
    recorded for the same family), else the family's, else (consistency) by network."""
    metadata = metadata or {}
    if metadata.get('sampler', 'consistency') == family and metadata.get('mid_t') is not None:
        mid_t = metadata['mid_t']
        return [float(t) for t in (mid_t if isinstance(mid_t, (list, tuple)) else [mid_t])]
    if FEW_STEP[family].mid_t is not None:
        return list(FEW_STEP[family].mid_t)
    return [IMAGENET64_MID_T if hasattr(net, 'unet') else CIFAR10_MID_T]


def few_step_kwargs(net, num_steps=None, mid_t=None, t_max=None, metadata=None, family='consistency'):
    """Keyword arguments of the `family` sampler: 2 steps with the recipe's mid_t unless told otherwise."""
    if mid_t is None:
        if num_steps is not None and num_steps > 2:
            raise dnnlib.UserError(f'--steps={num_steps}: more than 2 {family} steps need --mid_t with '
                                   f'{num_steps - 1} intermediate times')
        mid_t = [] if num_steps == 1 else default_mid_t(net, metadata, family)
    elif num_steps is not None and num_steps != len(mid_t) + 1:
        raise dnnlib.UserError(f'--steps={num_steps} does not match --mid_t with {len(mid_t)} values '
                               f'({len(mid_t) + 1} steps)')
    spec = FEW_STEP[family]
    return dict(t_steps=spec.make_steps(spec.t_max if t_max is None else t_max, mid_t))


def consistency_kwargs(net, num_steps=None, mid_t=None, t_max=T_MAX, metadata=None):
    """Keyword arguments of `consistency_sampler`: 2 steps with the recipe's mid_t unless told otherwise."""
    return few_step_kwargs(net, num_steps, mid_t, t_max, metadata, 'consistency')


def _default_sampler(net, ts, metadata):
    if is_karras_net(net):
        return ('multistep' if ts is not None else 'onestep') if net.is_consistency else 'heun'
    return few_step_family(net, metadata) or 'heun'


def resolve_sampler(net, sampler=None, num_steps=None, mid_t=None, t_max=None, metadata=None, ts=None,
                    clip_denoised=None, **heun_kwargs):
    """(sampler name, sampler kwargs) for `net`: its few-step family (few_step_family: consistency for ECM
    networks, trigflow / meanflow for sCM / MeanFlow networks), Heun for diffusion networks;
    openai's networks (KarrasDenoiser) default to onestep (multistep with `ts`) or openai's Heun with 40 steps.
    The names of samplers_karras.SAMPLERS select openai's karras_sample ('karras', kwargs naming the sampler) for
    any network; 'heun' is openai's for KarrasDenoiser and EDM's for every other network.

    Options of the other sampler are refused (a UserError naming the flag) rather than silently ignored.
    """
    sampler = sampler or _default_sampler(net, ts, metadata)
    if sampler in samplers_karras.SAMPLERS and (sampler != 'heun' or is_karras_net(net)):
        _refuse_few_step_flags(mid_t, t_max)
        return 'karras', samplers_karras.karras_kwargs(sampler, num_steps, ts, clip_denoised, **heun_kwargs)
    if ts is not None or clip_denoised is not None:
        raise dnnlib.UserError(f'--{"ts" if ts is not None else "clip_denoised"}: only used by openai\'s samplers '
                               f'({", ".join(samplers_karras.SAMPLERS)})')
    if sampler in FEW_STEP:
        if heun_kwargs:
            raise dnnlib.UserError(f'--{next(iter(heun_kwargs))}: only used by --sampler=heun')
        return sampler, few_step_kwargs(net, num_steps, mid_t, t_max, metadata, sampler)
    _refuse_few_step_flags(mid_t, t_max)
    if num_steps is not None:
        heun_kwargs['num_steps'] = num_steps
    return 'heun', heun_kwargs


def _refuse_few_step_flags(mid_t, t_max):
    if mid_t is not None or t_max is not None:
        raise dnnlib.UserError(f'--{"mid_t" if mid_t is not None else "t-max"}: only used by the few-step samplers '
                               f'(--sampler={"/".join(FEW_STEP)})')


def sampler_nfe(sampler, sampler_kwargs):
    """Network evaluations per image: len(t_steps) − 1 (few-step samplers; consistency's default is 2 steps),
    2N − 1 (Heun, N = 18)."""
    if sampler in FEW_STEP:
        default = (T_MAX, CIFAR10_MID_T, 0.0) if sampler == 'consistency' else (FEW_STEP[sampler].t_max, 0.0)
        return len(sampler_kwargs.get('t_steps', default)) - 1
    if sampler == 'karras':
        return samplers_karras.karras_nfe(**sampler_kwargs)
    return 2 * sampler_kwargs.get('num_steps', HEUN_NUM_STEPS) - 1


SAMPLERS = dict(heun=edm_sampler, karras=samplers_karras.karras_sample,
               **{name: spec.sampler for name, spec in FEW_STEP.items()})

# ----------------------------------------------------------------------------------------------------------
# Output conversion.


def to_uint8(x):
    """Images in [-1, 1] (N,C,H,W) to uint8 N,H,W,C as EDM writes PNGs: (x·127.5 + 128) clipped, truncated."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
