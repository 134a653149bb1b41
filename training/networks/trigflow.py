"""TrigFlow (Lu & Song 2024, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models", sCM) on top
of this project's EDM-form networks, without converting their weights (docs/SCM.md §1-§2).

TrigFlow noises data as x̂_t = cos(t)·x0 + sin(t)·z, z ~ N(0, σd² I), t in [0, π/2]. It is EDM's x_σ = x0 + σ·n seen
through t̂ = arctan(σ/σd), σ = σd·tan(t̂), x̂ = cos(t̂)·x_σ (same noise n = z/σd). Its probability-flow velocity is
dx̂/dt = σd·F_θ(x̂/σd, t) and its consistency function f_θ(x̂, t) = cos(t)·x̂ − σd·sin(t)·F_θ; written with any
denoiser D(x_σ, σ) of the same ODE, f_θ(x̂, t̂) = D(x̂/cos t̂, σd tan t̂) and σd·F_θ = (cos t̂·x̂ − D)/sin t̂. For
EDM's preconditioning (c_skip, c_out, c_in) this is F_θ = −F_EDM(x̂/σd, ln(σd tan t̂)/4): the same weights.

`TrigFlowPrecond` wraps an EDM-form preconditioner (EDMPrecond, ECMPrecond in its tuning form, EDM2's Precond)
and owns sCM's adaptive-weighting head w_φ(t). Its state-dict names are the wrapped preconditioner's (so an EDM
checkpoint transfers by name) plus `logvar_linear.*` for the head, which is a submodule like any other: the loop's
optimiser, EMA, snapshots and training states see it.
"""

import inspect

import torch

from torch_utils import persistence
from training.networks.edm2 import Precond as EDM2Precond
from training.networks.layers import Linear, batch_values, check_choice
from training.networks.precond import ECMPrecond, EDMPrecond

DENOISERS = dict(edm=EDMPrecond, ecm=ECMPrecond, edm2=EDM2Precond)   # denoiser= names of the wrapped classes
EDM2_LOGVAR_CHANNELS = 128   # EDM2's default width of its uncertainty head (EDM2 Precond, logvar_channels)


def trig_time(sigma, sigma_data):
    """TrigFlow time t̂ = arctan(σ/σd) of EDM's noise level σ (docs/SCM.md §1)."""
    return torch.atan(torch.as_tensor(sigma) / sigma_data)


def edm_sigma(t_hat, sigma_data):
    """EDM's noise level σ = σd·tan(t̂) of TrigFlow time t̂ (docs/SCM.md §1)."""
    return sigma_data * torch.tan(torch.as_tensor(t_hat))


# sCM §3 (TrigFlow PF-ODE): dx̂/dt = (cos t̂·x̂ − D(x̂/cos t̂, σd tan t̂)) / sin t̂ for a denoiser D of x_σ = x0 + σ·n
# (docs/SCM.md §1, eq. T2); σd·F_θ of a TrigFlow network, the teacher's tangent in sCD.
def trigflow_velocity(denoiser, x_hat, t_hat, sigma_data, class_labels=None, **denoiser_kwargs):
    t = batch_values(t_hat, x_hat).to(x_hat.dtype)
    cos_t, sin_t = t.cos(), t.sin()
    denoised = denoiser(x_hat / cos_t, (sigma_data * t.tan()).flatten(), class_labels, **denoiser_kwargs)
    return (cos_t * x_hat - denoised.to(x_hat.dtype)) / sin_t


@persistence.persistent_class
class TrigFlowPrecond(torch.nn.Module):
    """F_θ(x̂/σd, t̂) and w_φ(t̂) of sCM from an EDM-form preconditioner; forward() is EDM's D(x, σ) by default."""

    is_trigflow = True      # samplers and methods recognise the TrigFlow form by this

    def __init__(self,
        img_resolution,                 # Image resolution.
        img_channels,                   # Number of color channels.
        label_dim       = 0,            # Number of class labels, 0 = unconditional.
        denoiser        = 'edm',        # wrapped preconditioner: 'edm' (EDMPrecond), 'ecm' (ECMPrecond), 'edm2'
        logvar_head     = True,         # build sCM's adaptive-weighting head w_φ(t) (a logvar on the time embedding)
        **denoiser_kwargs,              # Keyword arguments of the wrapped preconditioner (model_type, channels, ...).
    ):
        check_choice('TrigFlowPrecond denoiser', denoiser, list(DENOISERS))
        super().__init__()
        if denoiser == 'edm2' and logvar_head:
            denoiser_kwargs.setdefault('logvar_channels', EDM2_LOGVAR_CHANNELS)
        inner = DENOISERS[denoiser](img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                                    **denoiser_kwargs)
        if inner._parameters or inner._buffers:
            raise TypeError(f'TrigFlowPrecond: {type(inner).__name__} holds tensors of its own; only submodules wrap')
        object.__setattr__(self, 'wrapped', inner)   # not a submodule: its submodules are registered as ours
        for name, child in inner.named_children():
            self.add_module(name, child)
        if denoiser != 'edm2':
            self.logvar_linear = Linear(self.model.map_layer0.in_features, 1) if logvar_head else None
        self.plain_form = dict(boundary=False) if 'boundary' in inspect.signature(inner.forward).parameters else {}
        for key in ('img_resolution', 'img_channels', 'label_dim', 'use_fp16', 'sigma_data', 'sigma_min', 'sigma_max'):
            setattr(self, key, getattr(inner, key))

    @property
    def has_logvar(self):
        """True when the network has an adaptive-weighting head."""
        return getattr(self, 'logvar_linear', None) is not None

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def normalize_weights_(self):
        """EDM2's forced weight normalisation of the wrapped network (nothing for the others)."""
        if hasattr(self.wrapped, 'normalize_weights_'):
            self.wrapped.normalize_weights_()

    def denoise(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        """EDM's D(x, σ) of the wrapped preconditioner in its plain (EDM) form."""
        return self.wrapped(x, sigma, class_labels, force_fp32=force_fp32, **self.plain_form, **model_kwargs)

    def logvar(self, sigma):
        """The head's log-variance u(σ) = −w_φ(t̂) [N], from the time embedding of EDM's c_noise = ln(σ)/4 (as
        FastGen's EDM networks: the U-Net's noise embedding; EDM2: its own Fourier features)."""
        if not self.has_logvar:
            raise RuntimeError('TrigFlowPrecond: this network was built without a logvar head (logvar_head=False)')
        c_noise = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).log() / 4
        embed = self.logvar_fourier if hasattr(self, 'unet') else self.model.map_noise
        return self.logvar_linear(embed(c_noise)).reshape(-1).to(torch.float32)

    # sCM §3: F_θ(x̂/σd, t̂) = (cos t̂·x̂ − D(x̂/cos t̂, σd tan t̂)) / (σd sin t̂) (docs/SCM.md §1, eq. T3).
    def forward(self, x, sigma, class_labels=None, force_fp32=False, trigflow=False, return_logvar=False,
                **model_kwargs):
        """trigflow=False: D(x, σ) (EDM's interface, for samplers and metrics); trigflow=True: x is x̂, sigma is
        t̂, and the result F_θ(x̂/σd, t̂). return_logvar=True also returns the head's log-variance [N] (float32)."""
        if not trigflow:
            out = self.denoise(x, sigma, class_labels, force_fp32, **model_kwargs)
            return (out, self.logvar(torch.as_tensor(sigma, device=x.device))) if return_logvar else out
        out = trigflow_velocity(self.denoise, x, sigma, self.sigma_data, class_labels,
                                force_fp32=force_fp32, **model_kwargs) / self.sigma_data
        if not return_logvar:
            return out
        return out, self.logvar(edm_sigma(batch_values(sigma, x).flatten().to(torch.float32), self.sigma_data))
