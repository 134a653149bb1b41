"""Consistency Models (Song et al., ICML 2023) as openai/consistency_models released them: `KarrasDenoiser`, the
preconditioning of its EDM-form (`edm_*.pt`) and consistency-form (`cd_*.pt`, `ct_*.pt`) networks, around this
project's ADM U-Net (`DhariwalUNet`) in openai's configuration (docs/ECT.md §2).

The U-Net is the same ADM as EDM's, built with four options that reproduce guided-diffusion's `UNetModel`: 32
groups in every GroupNorm, noise-embedding frequencies rounded as `exp(-ln(10000) i / half)`, the head width from
`num_head_channels` and scale-shift norm on or off. Class labels enter through `map_label`, a bias-free linear
layer on one-hot labels, which equals openai's `nn.Embedding` exactly. One difference is deliberate: openai's
attention casts q, k, v to float16 (`qkv.half()`) whatever the model's precision; here attention runs in the
network's precision (float32, or float16 with `use_fp16` on CUDA), which changes outputs by about 1e-4.
"""

import torch

import dnnlib
from torch_utils import persistence
from training.networks import DhariwalUNet

PARAMETERIZATIONS = ('edm', 'consistency')

# guided-diffusion's UNetModel, as DhariwalUNet options; the architecture itself (channels, levels, blocks,
# attention, scale-shift) comes from the checkpoint (training.checkpoints.openai_state.infer_unet_kwargs).
OPENAI_ADM_OPTIONS = dict(min_channels_per_group=1, exp_freqs=True, channel_mult_emb=4, augment_dim=0, dropout=0.0)

# The released networks (openai's scripts/launch.sh): ImageNet-64 and LSUN-256 (Bedroom, Cat).
RELEASED_UNETS = {
    'imagenet64': dict(model_channels=192, channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[32, 16, 8],
                       adaptive_scale=True, channels_per_head=64),
    'lsun256': dict(model_channels=256, channel_mult=[1, 1, 2, 2, 4, 4], num_blocks=2, attn_resolutions=[32, 16, 8],
                    adaptive_scale=False, channels_per_head=64),
}


@persistence.persistent_class
class KarrasDenoiser(torch.nn.Module):
    def __init__(self,
        img_resolution,                     # Image resolution.
        img_channels        = 3,            # Number of color channels.
        label_dim           = 0,            # Number of class labels, 0 = unconditional.
        parameterization    = 'consistency', # 'edm' (edm_*.pt) or 'consistency' (cd_*.pt, ct_*.pt).
        use_fp16            = False,        # Run the U-Net in FP16 on CUDA?
        sigma_min           = 0.002,        # Lowest noise level; f(x, sigma_min) = x in the consistency form.
        sigma_max           = 80.0,         # Highest noise level.
        sigma_data          = 0.5,          # Expected standard deviation of the training data.
        **unet_kwargs,                      # DhariwalUNet arguments (model_channels, channel_mult, ...).
    ):
        if parameterization not in PARAMETERIZATIONS:
            raise dnnlib.UserError(f'--parameterization={parameterization}: must be one of {", ".join(PARAMETERIZATIONS)}')
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.parameterization = parameterization
        self.use_fp16 = use_fp16
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self.model = DhariwalUNet(img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels,
                                  label_dim=label_dim, **{**OPENAI_ADM_OPTIONS, **unet_kwargs})

    @property
    def is_consistency(self):
        """True for the consistency form (cd_*/ct_*), whose output at sigma_min is its input."""
        return self.parameterization == 'consistency'

    # Karras denoiser coefficients (Song et al. 2023, Sec. 3 and Appendix C; docs/ECT.md §2), in openai's float32
    # arithmetic: c_in = 1/sqrt(s^2 + sd^2), c_noise = 1000 * 0.25 * ln(s + 1e-44); EDM form c_skip = sd^2/(s^2 + sd^2),
    # c_out = s sd/sqrt(s^2 + sd^2); consistency form c_skip = sd^2/((s - s_min)^2 + sd^2),
    # c_out = (s - s_min) sd/sqrt(s^2 + sd^2).
    def coefficients(self, sigma):
        sd2 = self.sigma_data ** 2
        root = (sigma ** 2 + sd2) ** 0.5
        shifted = sigma - self.sigma_min if self.is_consistency else sigma
        c_skip = sd2 / (shifted ** 2 + sd2)
        c_out = shifted * self.sigma_data / root
        c_in = 1 / root
        c_noise = 1000 * 0.25 * torch.log(sigma + 1e-44)
        return c_skip, c_out, c_in, c_noise

    def _labels(self, class_labels, x):
        """One-hot float32 labels (N, label_dim) from one-hot or integer labels; None when unconditional."""
        if self.label_dim == 0:
            return None
        if class_labels is None:
            return torch.zeros([x.shape[0], self.label_dim], device=x.device)
        if not class_labels.is_floating_point():
            return torch.nn.functional.one_hot(class_labels.reshape(-1), self.label_dim).to(torch.float32)
        return class_labels.to(torch.float32).reshape(-1, self.label_dim)

    def denoise(self, x, sigma, class_labels=None, force_fp32=False):
        """(F, D): the raw U-Net output F(c_in x, c_noise, y) and the denoised D = c_skip x + c_out F, float32."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        sigma = sigma.expand(x.shape[0]) if sigma.shape[0] == 1 else sigma
        c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1, 1, 1) for c in self.coefficients(sigma))
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == 'cuda') else torch.float32
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=self._labels(class_labels, x))
        F_x = F_x.to(torch.float32)
        return F_x, c_out * F_x + c_skip * x

    def forward(self, x, sigma, class_labels=None, force_fp32=False):
        return self.denoise(x, sigma, class_labels, force_fp32)[1]

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)
