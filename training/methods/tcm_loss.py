"""The stage-2 loss of Truncated Consistency Models (Lee et al. 2024; NVlabs/TCM training/loss.py, ECMLoss with a
TCMPrecond network), per sample. Formulas and sources: docs/TCM.md §3-§5.

One step draws, in NVlabs/TCM's order: the times t (one uniform per sample; NVlabs/TCM draws them from numpy's global
RNG, here from torch's global CPU generator), the boundary samples (torch.randperm on the CPU generator, as
NVlabs/TCM), the noise eps (randn_like on the images' device), then the networks' dropout masks. Times and mappings
are computed on the CPU in float64, as NVlabs/TCM computes them (numpy/scipy, then a float64 tensor), so choosing which
network evaluates which sample never waits for the device.
"""

import collections
import math

import numpy as np
import scipy.special
import torch

import dnnlib
from training.methods.loss import _build_component, _unwrap
from training.networks.randomness import sharing_draws
from training.networks.tcm_precond import TCMPrecond, to_device

R_MIN = 1e-6                # NVlabs/TCM training/loss.py:44 (delta_sigmoid): r is clamped at 1e-6
BOUNDARY_OFFSET = 1e-8      # NVlabs/TCM training/loss.py:106: boundary samples sit at t′ + 1e-8 (on the trained side)

TCMNoise = collections.namedtuple('TCMNoise', ['u', 'perm', 'eps'])   # the random inputs of one step


def check_number(owner, name, value, low=-math.inf, high=math.inf, low_open=True, high_open=True):
    """`value` as a float when low < value < high (or <= with a closed end); a one-line UserError otherwise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        bounds = f'{"(" if low_open else "["}{low}, {high}{")" if high_open else "]"}'
        raise dnnlib.UserError(f'{owner}: {name} must be a number in {bounds}, got {value!r}')
    return float(value)


class LogStudentT:
    """ln t = P_mean + P_std·T, T ~ Student-t(df), truncated to [t_min, t_max]: docs/TCM.md eq. (T4)."""

    def __init__(self,
        P_mean  = 0.0,      # location of ln t (NVlabs/TCM --mean)
        P_std   = 0.2,      # scale of ln t (--std)
        df      = 0.01,     # degrees of freedom of the Student-t (--df)
        t_min   = 1.0,      # lower end of t (--t_lower)
        t_max   = 80.0,     # upper end of t (--t_upper)
    ):
        self.P_mean = check_number('TCM', 'P_mean', P_mean)
        self.P_std = check_number('TCM', 'P_std', P_std, low=0)
        self.df = check_number('TCM', 'df', df, low=0)
        self.t_min = check_number('TCM', 't_min', t_min, low=0)
        self.t_max = check_number('TCM', 't_max', t_max, low=self.t_min)
        standardized = (np.log([self.t_min, self.t_max]) - self.P_mean) / self.P_std
        self.cdf_low, self.cdf_high = scipy.special.stdtr(self.df, standardized)

    # docs/TCM.md eq. (T4): inverse-CDF sampling inside [F(ln t_min), F(ln t_max)] (NVlabs/TCM torch_utils/misc.py:379).
    def from_uniform(self, u):
        """t (float64, CPU) for uniforms u ∈ [0, 1) (float64, CPU), as NVlabs/TCM's truncated_t maps numpy's."""
        q = self.cdf_low + (self.cdf_high - self.cdf_low) * u.numpy()
        log_t = scipy.special.stdtrit(self.df, q) * self.P_std + self.P_mean
        return torch.from_numpy(np.asarray(log_t, dtype=np.float64)).exp()


class TCMMapping:
    """ECT's sigmoid mapping as NVlabs/TCM computes it (training/loss.py:40-47, update_schedule :79-84):
    docs/TCM.md eqs. (T5)-(T6)."""

    def __init__(self,
        q           = 2.0,      # base of the geometric decay of (t − r)/t per stage (-q)
        ratio_limit = 0.999,    # the largest ratio 1 − q^−(stage+1) (--ratio_limit)
    ):
        self.q = check_number('TCM', 'q', q, low=1)
        self.ratio_limit = check_number('TCM', 'ratio_limit', ratio_limit, low=0, high=1)

    def ratio(self, stage):
        """docs/TCM.md eq. (T5): min(1 − q^−(stage+1), ratio_limit)."""
        return min(1 - 1 / self.q ** (stage + 1), self.ratio_limit)

    # docs/TCM.md eq. (T6): r = max(t − t·(1 − ratio)·(1 + 8·sigmoid(−t)), 1e-6).
    def __call__(self, t, stage):
        dt = t * (1 - self.ratio(stage)) * (1 + 8 * (1 / (1 + t.exp())))
        return (t - dt).clamp(min=R_MIN)


class TCMLoss:
    """Per-sample stage-2 losses: docs/TCM.md eqs. (T3) and (T7)."""

    def __init__(self,
        times,              # LogStudentT of the non-boundary samples
        mapping,            # TCMMapping: r from t and the curriculum stage
        transition_t,       # t′
        boundary_prob,      # share of each micro-batch placed at t′ (int(N·boundary_prob) samples)
        w_boundary,         # weight of the boundary loss
        c,                  # pseudo-Huber constant; 0 = the plain l2 distance
        weighting,          # dict(class_name=...) of w(t, r), or a callable
        sigma_data,         # standard deviation of the data (for weightings that take it)
    ):
        self.times, self.mapping = times, mapping
        self.transition_t = float(transition_t)
        self.boundary_prob, self.w_boundary, self.c = float(boundary_prob), float(w_boundary), float(c)
        self.weighting = _build_component('TCM', 'weighting', weighting, dict(sigma_data=sigma_data))
        self.stage = 0

    def sample_noise(self, images):
        """The random inputs of one step in NVlabs/TCM's order: uniforms of t (CPU), boundary permutation (CPU), eps."""
        u = torch.rand([images.shape[0]], dtype=torch.float64)
        perm = torch.randperm(images.shape[0])
        return TCMNoise(u, perm, torch.randn_like(images))

    def num_boundary(self, batch):
        return int(batch * self.boundary_prob)

    # docs/TCM.md eq. (T3): boundary samples at t′ + 1e-8, the rest from (T4); r from (T6). NVlabs/TCM loss.py:92-108.
    def times_of(self, noise):
        """(t, r, boundary) on the CPU: float64 [N] times and the boolean boundary mask."""
        t = self.times.from_uniform(noise.u)
        boundary = torch.zeros_like(t, dtype=torch.bool)
        boundary[noise.perm[:self.num_boundary(len(t))]] = True
        t = torch.where(boundary, torch.full_like(t, self.transition_t + BOUNDARY_OFFSET), t)
        return t, self.mapping(t, self.stage), boundary

    def sample_weights(self, boundary):
        """Per-sample factors that turn mean(consistency) + w_boundary·mean(boundary) into a sum over the batch / N
        (docs/TCM.md eq. (T7)); CPU float64 [N]."""
        n, n_b = len(boundary), int(boundary.sum())
        if n_b == 0:
            return torch.ones(n, dtype=torch.float64)
        return torch.where(boundary, torch.tensor(self.w_boundary * n / n_b, dtype=torch.float64),
                           torch.tensor(n / (n - n_b), dtype=torch.float64))

    def predictions(self, net, stage1, x0, t, r_cpu, eps, labels, net_kwargs):
        """(f(x_t, t) with gradients, f(x_r, r) without, same dropout masks): docs/TCM.md eq. (T7)."""
        trained = _unwrap(net)
        with sharing_draws(torch.nn.ModuleList([trained, stage1])) as tape:
            with tape.recording():
                f_t = net(x0 + eps * t, t, labels, **net_kwargs)
            target = TCMPrecond(stage1, trained, self.transition_t)
            with torch.no_grad():
                r = to_device(r_cpu, x0.device).reshape(-1, 1, 1, 1)
                f_r = target(x0 + eps * r, r_cpu, labels, tape=tape, **net_kwargs).nan_to_num()
        return f_t, f_r

    # docs/TCM.md eq. (T7): w(t, r)·(sqrt(‖f_t − f_r‖² + c²) − c), scaled per sample by sample_weights.
    def losses(self, f_t, f_r, t_cpu, r_cpu, boundary):
        """Per-sample losses [N] (float32) of given predictions; their sum / N is NVlabs/TCM's step objective."""
        distance = torch.linalg.vector_norm(f_t - f_r, dim=tuple(range(1, f_t.ndim)))
        if self.c > 0:
            distance = (distance.square() + self.c ** 2).sqrt() - self.c
        factors = self.weighting(t_cpu, r_cpu) * self.sample_weights(boundary)
        return (distance * to_device(factors, f_t.device)).to(torch.float32)

    def loss_from_noise(self, net, stage1, images, noise, labels=None, net_kwargs=None):
        """Per-sample losses [N] (float32) for given random inputs (docs/TCM.md §5)."""
        t_cpu, r_cpu, boundary = self.times_of(noise)
        t = to_device(t_cpu, images.device).reshape(-1, 1, 1, 1)
        f_t, f_r = self.predictions(net, stage1, images, t, r_cpu, noise.eps, labels, net_kwargs or {})
        return self.losses(f_t, f_r, t_cpu, r_cpu, boundary)

    def __call__(self, net, stage1, images, labels=None, net_kwargs=None):
        """Per-sample losses [N] with freshly drawn random inputs (sample_noise)."""
        return self.loss_from_noise(net, stage1, images, self.sample_noise(images), labels, net_kwargs)
