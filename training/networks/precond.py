"""EDM's preconditioners D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) (EDM Eq. 7, Table 1): VP, VE, EDM, and
ECT's ECM with its boundary-condition form (docs/ECT.md §2)."""

import torch

from torch_utils import persistence
from training.networks.dhariwal_unet import DhariwalUNet
from training.networks.layers import batch_values, check_choice
from training.networks.song_unet import SongUNet

#----------------------------------------------------------------------------
# Preconditioning common to all variants: D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) (EDM Eq. 7).

def _sqrt(x):
    """IEEE-rounded float32 square root: float64 sqrt rounded once (exact, as 53 >= 2*24 + 2 bits). Some CPU builds of
    torch round float32 sqrt to 1 ulp only; the VP noise label amplifies such ulps, so coefficients use this."""
    return x.double().sqrt().to(x.dtype)


def _build_model(model_type, **model_kwargs):
    classes = dict(SongUNet=SongUNet, DhariwalUNet=DhariwalUNet)
    check_choice('model_type', model_type, list(classes))
    return classes[model_type](**model_kwargs)


def label_input(class_labels, label_dim, x):
    """Class labels as the inner network takes them: None when unconditional, zeros [1, label_dim] when not given
    (EDM's convention), else float32 [N, label_dim]."""
    if label_dim == 0:
        return None
    if class_labels is None:
        return torch.zeros([1, label_dim], device=x.device)
    return class_labels.to(torch.float32).reshape(-1, label_dim)


class _Precond(torch.nn.Module):
    """Shared constructor and forward pass; subclasses define coefficients(sigma) -> c_skip, c_out, c_in, c_noise."""

    def __init__(self, img_resolution, img_channels, label_dim, use_fp16, sigma_min, sigma_max, sigma_data, model_type, model_kwargs):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self.model = _build_model(model_type, img_resolution=img_resolution, in_channels=img_channels,
            out_channels=img_channels, label_dim=label_dim, **model_kwargs)


    def _prepare(self, x, sigma):
        """Inputs in float32; sigma shaped [N, 1, 1, 1] (a scalar sigma is broadcast over the batch)."""
        x = x.to(torch.float32)
        return x, batch_values(sigma, x, torch.float32)

    def _precondition(self, x, coefficients, class_labels, force_fp32, model_kwargs):
        c_skip, c_out, c_in, c_noise = coefficients
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == 'cuda') else torch.float32
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=label_input(class_labels, self.label_dim, x), **model_kwargs)
        return c_skip * x + c_out * F_x.to(torch.float32)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma = self._prepare(x, sigma)
        return self._precondition(x, self.coefficients(sigma), class_labels, force_fp32, model_kwargs)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

#----------------------------------------------------------------------------
# Variance-preserving preconditioning (EDM Table 1, "VP"; Song et al. 2021).

@persistence.persistent_class
class VPPrecond(_Precond):
    def __init__(self,
        img_resolution,                 # Image resolution.
        img_channels,                   # Number of color channels.
        label_dim       = 0,            # Number of class labels, 0 = unconditional.
        use_fp16        = False,        # Run the inner model in FP16 on CUDA?
        beta_d          = 19.9,         # Extent of the noise level schedule.
        beta_min        = 0.1,          # Initial slope of the noise level schedule.
        M               = 1000,         # Original number of timesteps in the DDPM formulation.
        epsilon_t       = 1e-5,         # Minimum t-value used during training.
        sigma_data      = 0.5,          # Data standard deviation (used by losses; not by the VP formulas).
        model_type      = 'SongUNet',   # Class name of the inner network.
        **model_kwargs,                 # Keyword arguments of the inner network.
    ):
        sigma_min = float(_vp_sigma(epsilon_t, beta_d, beta_min))
        sigma_max = float(_vp_sigma(1, beta_d, beta_min))
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, sigma_min, sigma_max, sigma_data, model_type, model_kwargs)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t

    def sigma(self, t):
        return _vp_sigma(t, self.beta_d, self.beta_min)

    def sigma_inv(self, sigma):
        return _vp_sigma_inv(sigma, self.beta_d, self.beta_min)

    # VP coefficients (docs/ECT.md §2): c_skip 1, c_out -sigma, c_in 1/sqrt(sigma^2+1), c_noise (M-1) sigma^-1(sigma).
    def coefficients(self, sigma):
        return 1, -sigma, 1 / _sqrt(sigma ** 2 + 1), (self.M - 1) * self.sigma_inv(sigma)


def _as_cpu_tensor(value):
    return value if torch.is_tensor(value) else torch.as_tensor(value, device='cpu')


# VP noise schedule sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) (EDM Table 1; docs/ECT.md §2).
def _vp_sigma(t, beta_d, beta_min):
    t = _as_cpu_tensor(t)
    return _sqrt((0.5 * beta_d * (t ** 2) + beta_min * t).exp() - 1)


# Inverse VP schedule sigma^-1(s) = (sqrt(beta_min^2 + 2 beta_d ln(1 + s^2)) - beta_min) / beta_d (EDM Table 1).
def _vp_sigma_inv(sigma, beta_d, beta_min):
    sigma = _as_cpu_tensor(sigma)
    return (_sqrt(beta_min ** 2 + 2 * beta_d * (1 + sigma ** 2).log()) - beta_min) / beta_d

#----------------------------------------------------------------------------
# Variance-exploding preconditioning (EDM Table 1, "VE"; Song et al. 2021).

@persistence.persistent_class
class VEPrecond(_Precond):
    def __init__(self,
        img_resolution,                 # Image resolution.
        img_channels,                   # Number of color channels.
        label_dim       = 0,            # Number of class labels, 0 = unconditional.
        use_fp16        = False,        # Run the inner model in FP16 on CUDA?
        sigma_min       = 0.02,         # Minimum supported noise level.
        sigma_max       = 100,          # Maximum supported noise level.
        sigma_data      = 0.5,          # Data standard deviation (used by losses; not by the VE formulas).
        model_type      = 'SongUNet',   # Class name of the inner network.
        **model_kwargs,                 # Keyword arguments of the inner network.
    ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, sigma_min, sigma_max, sigma_data, model_type, model_kwargs)

    # VE coefficients (docs/ECT.md §2): c_skip 1, c_out sigma, c_in 1, c_noise ln(sigma / 2).
    def coefficients(self, sigma):
        return 1, sigma, 1, (0.5 * sigma).log()

#----------------------------------------------------------------------------
# EDM preconditioning (Karras et al. 2022, Table 1 / Eq. 7).

@persistence.persistent_class
class EDMPrecond(_Precond):
    def __init__(self,
        img_resolution,                 # Image resolution.
        img_channels,                   # Number of color channels.
        label_dim       = 0,            # Number of class labels, 0 = unconditional.
        use_fp16        = False,        # Run the inner model in FP16 on CUDA?
        sigma_min       = 0,            # Minimum supported noise level.
        sigma_max       = float('inf'), # Maximum supported noise level.
        sigma_data      = 0.5,          # Expected standard deviation of the training data.
        model_type      = 'DhariwalUNet', # Class name of the inner network.
        **model_kwargs,                 # Keyword arguments of the inner network.
    ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, sigma_min, sigma_max, sigma_data, model_type, model_kwargs)

    def coefficients(self, sigma):
        return _edm_coefficients(sigma, self.sigma_data)


# c_skip and c_out of EDM (EDM Table 1) and of ECT's boundary form (docs/ECT.md §2):
# c_skip = sd^2/((s-s_min)^2+sd^2), c_out = (s-s_min) sd/sqrt(s^2+sd^2); s_min = 0 gives EDM's, and s_min > 0
# gives D(x, s_min) = x. `sqrt` is the square root to use (this module's _sqrt, or torch.sqrt for EDM2's networks).
def skip_out_scalings(sigma, sigma_data, sigma_min=0, sqrt=torch.sqrt):
    shifted = sigma - sigma_min if sigma_min else sigma
    c_skip = sigma_data ** 2 / (shifted ** 2 + sigma_data ** 2)
    c_out = shifted * sigma_data / sqrt(sigma ** 2 + sigma_data ** 2)
    return c_skip, c_out


# EDM coefficients (EDM Table 1; docs/ECT.md §2): c_skip and c_out as above with s_min = 0 (plain) or ECM's
# s_min (boundary form), c_in 1/sqrt(s^2+sd^2), c_noise ln(s)/4.
def _edm_coefficients(sigma, sigma_data, sigma_min=0):
    c_skip, c_out = skip_out_scalings(sigma, sigma_data, sigma_min, sqrt=_sqrt)
    c_in = 1 / _sqrt(sigma_data ** 2 + sigma ** 2)
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise

#----------------------------------------------------------------------------
# ECM preconditioning (Geng et al. 2024, "Consistency Models Made Easy"; docs/ECT.md §2). boundary=True is the
# evaluation form with f(x, sigma_min) = x (skip_out_scalings with s_min = sigma_min);
# boundary=False is the tuning-pass form, identical to EDM's. The form is chosen by the caller, never by
# module.training.

@persistence.persistent_class
class ECMPrecond(_Precond):
    def __init__(self,
        img_resolution,                 # Image resolution.
        img_channels,                   # Number of color channels.
        label_dim       = 0,            # Number of class labels, 0 = unconditional.
        use_fp16        = False,        # Run the inner model in FP16 on CUDA?
        sigma_min       = 0.003,        # Noise level of the boundary condition f(x, sigma_min) = x.
        sigma_max       = 80.0,         # Maximum supported noise level.
        sigma_data      = 0.5,          # Expected standard deviation of the training data.
        model_type      = 'DhariwalUNet', # Class name of the inner network.
        **model_kwargs,                 # Keyword arguments of the inner network.
    ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, sigma_min, sigma_max, sigma_data, model_type, model_kwargs)

    def coefficients(self, sigma, boundary=True):
        return _edm_coefficients(sigma, self.sigma_data, self.sigma_min if boundary else 0)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, boundary=True, **model_kwargs):
        x, sigma = self._prepare(x, sigma)
        return self._precondition(x, self.coefficients(sigma, boundary=boundary), class_labels, force_fp32, model_kwargs)

