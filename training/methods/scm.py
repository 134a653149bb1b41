"""sCT and sCD (Lu & Song 2024, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models",
Algorithm 1) as training methods: continuous-time consistency training / distillation of a TrigFlow network
(training.networks.trigflow.TrigFlowPrecond), with tangent warm-up, tangent normalisation, adaptive weighting and
the prior weight 1/σ. The loss pieces are in scm_loss.py; the method, its defaults and where they come from, and
how it differs from NVlabs/FastGen's sCM are in docs/SCM.md.

One step per micro-batch: draw σ (truncated log-normal) and z, form x̂ = cos t̂·x0 + sin t̂·z, its tangent dx̂/dt (the
conditional velocity in sCT, the frozen teacher's PF-ODE velocity in sCD), then the stop-gradient JVP of F_θ⁻ in
float32 under no_grad on the unwrapped network (recording the dropout masks), then the gradient-carrying pass through
the (DDP-wrapped) network, replaying them: both passes see the same masks.
"""

import math

import torch

import dnnlib
from training.methods import scm_loss
from training.methods.base import Method
from training.methods.consistency_models import load_teacher
from training.methods.loss import _unwrap, tuning_kwargs
from training.networks.jvp import require_jvp_support
from training.networks.randomness import sharing_draws
from training.networks.trigflow import trig_time, trigflow_velocity

JVP_MODES = ('autograd', 'finite_difference')
MAX_FD_STEP = 0.1   # largest relative finite-difference step (a fraction of min(t̂, π/2 − t̂))


def _check(condition, flag, message):
    if not condition:
        raise dnnlib.UserError(f'{flag}: {message}')


class SCM(Method):
    """sCM's loss on a TrigFlowPrecond network; subclasses give the tangent dx̂/dt (sCT: data, sCD: teacher)."""

    name = 'sCM'

    def __init__(self,
        sigma_data      = 0.5,          # standard deviation of the data (TrigFlow's σd)
        P_mean          = -1.0,         # mean of ln σ of the time proposal
        P_std           = 1.4,          # standard deviation of ln σ of the time proposal
        sigma_min       = 0.002,        # lower truncation of the proposal's σ
        sigma_max       = 80.0,         # upper truncation of the proposal's σ
        warmup_steps    = 10000,        # tangent warm-up H: r = min(1, step / H); 0 = none
        tangent_c       = 0.1,          # tangent normalisation constant c: g / (‖g‖ + c)
        tangent_norm    = 'l2',         # 'l2' (‖g‖, the paper) or 'rms' (‖g‖/√D, FastGen's default)
        prior_weighting = True,         # multiply the loss by the prior weight 1/σ = 1/(σd tan t̂)
        adaptive_weighting = True,      # learn w_φ(t) (the network's logvar head)
        jvp             = 'autograd',   # 'autograd' (forward-mode AD) or 'finite_difference' (no forward AD needed)
        fd_step         = 1e-3,         # relative finite-difference step ε / min(t̂, π/2 − t̂)
    ):
        _check(sigma_data > 0, 'sigma_data', f'must be positive, got {sigma_data}')
        _check(P_std > 0, 'P_std', f'must be positive, got {P_std}')
        _check(0 < sigma_min < sigma_max, 'sigma_min/sigma_max', f'need 0 < sigma_min < sigma_max, got '
                                                               f'{sigma_min}, {sigma_max}')
        _check(warmup_steps >= 0, 'warmup_steps', f'must be 0 or more, got {warmup_steps}')
        _check(tangent_c >= 0, 'tangent_c', f'must be 0 or more, got {tangent_c}')
        _check(tangent_norm in scm_loss.TANGENT_NORMS, 'tangent_norm', f'"{tangent_norm}" is not one of '
                                                                       f'{", ".join(scm_loss.TANGENT_NORMS)}')
        _check(jvp in JVP_MODES, 'jvp', f'"{jvp}" is not one of {", ".join(JVP_MODES)}')
        _check(jvp != 'finite_difference' or 0 < fd_step <= MAX_FD_STEP, 'fd_step',
               f'the relative finite-difference step must be in (0, {MAX_FD_STEP}], got {fd_step}')
        self.sigma_data, self.P_mean, self.P_std = sigma_data, P_mean, P_std
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.warmup_steps, self.tangent_c, self.tangent_norm = warmup_steps, tangent_c, tangent_norm
        self.prior_weighting, self.adaptive_weighting = prior_weighting, adaptive_weighting
        self.jvp, self.fd_step = jvp, fd_step
        self.r = 0.0   # tangent warm-up factor of the current step

    def setup(self, net, device):
        self.check_network(_unwrap(net))

    def check_network(self, net):
        _check(getattr(net, 'is_trigflow', False), '--precond', f'{self.name} trains a TrigFlow network '
               f'(training.networks.trigflow.TrigFlowPrecond), not {type(net).__name__}')
        _check(net.sigma_data == self.sigma_data, 'sigma_data', f'{self.sigma_data} differs from the network\'s '
                                                               f'{net.sigma_data}')
        _check(net.has_logvar == self.adaptive_weighting, 'adaptive_weighting',
               f'{self.adaptive_weighting} needs a network built with logvar_head={self.adaptive_weighting}')
        if self.jvp == 'autograd':
            require_jvp_support(net, f'{self.name} (jvp=\'autograd\'; jvp=\'finite_difference\' needs no JVP)')

    def schedule(self, progress):
        self.r = scm_loss.tangent_warmup(progress.step, self.warmup_steps)
        return dict(tangent_warmup=self.r)

    def snapshot_metadata(self):
        return dict(method=self.name, sampler='trigflow', sigma_data=self.sigma_data)

    def tangent_target(self, images, noise, x_hat, t_hat, labels):
        """dx̂/dt at (x̂, t̂) (float32, no gradient)."""
        raise NotImplementedError

    def _jvp(self, module, x_hat, t_hat, dxdt, labels, tape):
        """cos t sin t · dF⁻/dt in float32 without gradients on the unwrapped network, recording its dropout masks."""
        def fn(x, t):
            return module(x, t, labels, force_fp32=True, trigflow=True)
        with torch.no_grad(), torch.autocast(x_hat.device.type, enabled=False):
            if self.jvp == 'finite_difference':
                return scm_loss.jvp_finite_difference(fn, x_hat, t_hat, dxdt, self.fd_step, tape)
            with tape.recording():
                return scm_loss.jvp_autograd(fn, x_hat, t_hat, dxdt)

    # sCM Algorithm 1: one micro-batch's per-sample losses (docs/SCM.md §3).
    def loss(self, net, images, labels=None):
        sigma = scm_loss.truncated_lognormal_sigma(images.shape[0], self.P_mean, self.P_std, self.sigma_min,
                                                   self.sigma_max, images.device)
        t_hat = trig_time(sigma, self.sigma_data).to(torch.float32)
        noise = torch.randn_like(images) * self.sigma_data
        t4 = t_hat.reshape(-1, 1, 1, 1)
        x_hat = t4.cos() * images + t4.sin() * noise
        dxdt = self.tangent_target(images, noise, x_hat, t_hat, labels).to(torch.float32)
        with sharing_draws(net) as tape:
            F_jvp = self._jvp(_unwrap(net), x_hat, t_hat, dxdt, labels, tape)
            with tape.replaying():
                out = net(x_hat, t_hat, labels, trigflow=True, return_logvar=self.adaptive_weighting)
        F, logvar = out if self.adaptive_weighting else (out, None)
        F = F.to(torch.float32)
        g = scm_loss.scm_tangent(F.detach(), F_jvp, x_hat, dxdt, t_hat, self.r, self.sigma_data)
        g = scm_loss.normalize_tangent(g, self.tangent_c, self.tangent_norm)
        weight = (1 / sigma).to(torch.float32) if self.prior_weighting else 1.0
        return scm_loss.scm_loss(F, g, logvar, weight)


class SCT(SCM):
    """sCT: the tangent is the conditional velocity dx̂/dt = cos t̂·z − sin t̂·x0 (sCM Algorithm 1)."""

    name = 'sCT'

    def tangent_target(self, images, noise, x_hat, t_hat, labels):
        t4 = t_hat.reshape(-1, 1, 1, 1)
        return t4.cos() * noise - t4.sin() * images


class SCD(SCM):
    """sCD: the tangent is the frozen teacher's velocity σd·F_pretrain(x̂/σd, t̂) (sCM Algorithm 1), optionally
    with classifier-free guidance v_c + (w − 1)(v_c − v_u) (the unconditional call with zero labels)."""

    name = 'sCD'

    def __init__(self,
        teacher         = None,         # frozen diffusion network file/URL (any file load_network reads)
        guidance        = None,         # classifier-free guidance scale w of the teacher; None = no guidance
        **scm_kwargs,                   # the SCM arguments above
    ):
        super().__init__(**scm_kwargs)
        _check(bool(teacher), '--teacher', 'sCD needs a teacher network (a diffusion model file)')
        _check(guidance is None or (math.isfinite(guidance) and guidance >= 1), 'guidance',
               f'the guidance scale must be at least 1 (or None), got {guidance}')
        self.teacher_path, self.guidance = teacher, guidance
        self.teacher, self.teacher_kwargs = None, None

    def setup(self, net, device):
        super().setup(net, device)
        _check(self.guidance is None or _unwrap(net).label_dim > 0, 'guidance',
               'classifier-free guidance needs a class-conditional network (--cond)')
        self.teacher = load_teacher(self.teacher_path, _unwrap(net), device)
        self.teacher_kwargs = tuning_kwargs(self.teacher)

    def snapshot_metadata(self):
        return dict(super().snapshot_metadata(), teacher=str(self.teacher_path), guidance=self.guidance)

    def _velocity(self, x_hat, t_hat, labels):
        return trigflow_velocity(self.teacher, x_hat, t_hat, self.sigma_data, labels, **self.teacher_kwargs)

    def tangent_target(self, images, noise, x_hat, t_hat, labels):
        if self.teacher is None:
            raise RuntimeError('SCD.loss: call setup(net, device) first')
        with torch.no_grad():
            velocity = self._velocity(x_hat, t_hat, labels)
            if self.guidance is not None:
                unconditional = self._velocity(x_hat, t_hat, torch.zeros_like(labels))
                velocity = velocity + (self.guidance - 1) * (velocity - unconditional)
        return velocity
